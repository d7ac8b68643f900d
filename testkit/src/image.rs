//! The clusterlink image for tests, built as a user builds it (deploy/image/Containerfile,
//! target `prebuilt`) from a local Debian base, since no registry can be reached: the base
//! made once per machine by `debootstrap --variant=minbase` and `podman import`, the binary
//! the one cargo built on this host. podman runs with the repository's containers.conf
//! (runc; no default ulimits) through `CONTAINERS_CONF`, never with changes to /etc.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

/// The local base image: Debian bookworm, minbase.
pub const BASE_IMAGE: &str = "localhost/clusterlink-base:bookworm";

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run {command}: {source} (is it installed? scripts/install-deps.sh)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// podman's configuration in the repository.
pub fn containers_conf(repo: &Path) -> PathBuf {
    repo.join("deploy/image/containers.conf")
}

fn run(c: &mut Command) -> Result<String, ImageError> {
    let command = format!("{c:?}");
    let out = c.output().map_err(|source| ImageError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn podman(conf: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf);
    c
}

/// Makes [`BASE_IMAGE`] unless podman has it (about 25 s: debootstrap from the Debian mirror,
/// `CLUSTERLINK_DEBIAN_MIRROR` or deb.debian.org).
pub fn ensure_base(conf: &Path) -> Result<(), ImageError> {
    if podman(conf)
        .args(["image", "exists", BASE_IMAGE])
        .status()
        .is_ok_and(|s| s.success())
    {
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let mirror = std::env::var("CLUSTERLINK_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    run(Command::new("debootstrap").args([
        "--variant=minbase",
        "bookworm",
        &root.path().display().to_string(),
        &mirror,
    ]))?;
    let mut tar = Command::new("tar")
        .args(["-C", &root.path().display().to_string(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            command: "tar".into(),
            source,
        })?;
    let stdout = tar
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("tar has no stdout"))?;
    let imported = run(podman(conf).args(["import", "-", BASE_IMAGE]).stdin(stdout));
    let tarred = tar.wait()?;
    imported?;
    if !tarred.success() {
        return Err(ImageError::Failed {
            command: "tar the debootstrapped root".into(),
            status: tarred.to_string(),
            stderr: String::new(),
        });
    }
    Ok(())
}

/// Builds `tag` from the repository's Containerfile (target `prebuilt`) with `binary`, on
/// [`BASE_IMAGE`]; one build at a time on this machine. Checks `clusterlink --version` in it.
pub fn build(repo: &Path, binary: &Path, tag: &str) -> Result<String, ImageError> {
    let conf = containers_conf(repo);
    let lock_path = std::env::temp_dir().join("clusterlink-image-build.lock");
    let _lock = Flock::lock(File::create(&lock_path)?, FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))?;
    ensure_base(&conf)?;
    let context = tempfile::tempdir()?;
    std::fs::copy(binary, context.path().join("clusterlink"))?;
    run(podman(&conf).args([
        "build",
        "--pull=never",
        "--quiet",
        "--file",
        &repo
            .join("deploy/image/Containerfile")
            .display()
            .to_string(),
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("RUNTIME_IMAGE={BASE_IMAGE}"),
        "--tag",
        tag,
        &context.path().display().to_string(),
    ]))?;
    let version = run(podman(&conf).args(["run", "--rm", "--pull=never", tag, "--version"]))?;
    if !version.contains("clusterlink") {
        return Err(ImageError::Failed {
            command: format!("podman run {tag} --version"),
            status: "unexpected output".into(),
            stderr: version,
        });
    }
    Ok(version.trim().to_owned())
}
