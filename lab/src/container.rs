//! Running the lab's components from the clusterlink image instead of the host's binary:
//! `podman run` into the node's network namespace, with only what the Kubernetes manifests
//! grant each component (NET_ADMIN and /dev/net/tun for a gateway, NET_ADMIN for a route
//! agent, NET_BIND_SERVICE for the DNS plugin), and the lab's directory mounted at its own
//! path (credentials, keys, manifests).

use std::path::{Path, PathBuf};
use std::process::Command;

/// How components are run from an image.
#[derive(Clone, Debug)]
pub struct ContainerRunner {
    /// The image (`localhost/clusterlink:test`, say).
    pub image: String,
    /// podman's configuration (`CONTAINERS_CONF`): the repository's deploy/image/containers.conf.
    pub containers_conf: PathBuf,
}

/// What a component may do in its container: the Kubernetes manifests grant the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub capabilities: &'static [&'static str],
    pub tun: bool,
}

/// The grant of the component a `clusterlink` command line runs, `None` for one that is not
/// a component (the CLI, the lab's echo server).
pub fn grant_of<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Option<Grant> {
    let first = args.first()?.as_ref().to_str()?;
    match first {
        "gateway" => Some(Grant {
            capabilities: &["NET_ADMIN"],
            tun: true,
        }),
        "route-agent" => Some(Grant {
            capabilities: &["NET_ADMIN"],
            tun: false,
        }),
        "dns" => Some(Grant {
            capabilities: &["NET_BIND_SERVICE"],
            tun: false,
        }),
        _ => None,
    }
}

impl ContainerRunner {
    /// `podman run` for `args` (a component's command line) in the namespace `netns`, as
    /// container `name`, with `mount` (a directory) at its own path.
    pub fn command<S: AsRef<std::ffi::OsStr>>(
        &self,
        name: &str,
        netns: &str,
        grant: Grant,
        mount: &Path,
        env: &[(String, String)],
        args: &[S],
    ) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.containers_conf);
        c.args(["run", "--rm", "--name", name, "--pull", "never"]);
        c.arg(format!("--network=ns:/run/netns/{netns}"));
        // The lab's files are root's (0600 credentials): the components run as root here, with
        // every capability dropped but their grant. (In Kubernetes the DNS plugin runs as
        // non-root: its Secret is mounted readable to its group.)
        c.args(["--user", "0", "--cap-drop", "all"]);
        for cap in grant.capabilities {
            c.args(["--cap-add", cap]);
        }
        if grant.tun {
            c.args(["--device", "/dev/net/tun"]);
        }
        let m = mount.display();
        c.args(["--volume", &format!("{m}:{m}")]);
        for (k, v) in env {
            c.args(["--env", &format!("{k}={v}")]);
        }
        c.arg(&self.image);
        c.args(args);
        c
    }

    /// Removes container `name` at once, if it exists.
    pub fn remove(&self, name: &str) {
        let _ = Command::new("podman")
            .env("CONTAINERS_CONF", &self.containers_conf)
            .args(["rm", "--force", "--time", "0", "--ignore", name])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_component_gets_only_its_grant() {
        let runner = ContainerRunner {
            image: "localhost/clusterlink:test".into(),
            containers_conf: "/repo/deploy/image/containers.conf".into(),
        };
        let gw = grant_of(&["gateway", "run"]).unwrap();
        assert_eq!(gw.capabilities, ["NET_ADMIN"]);
        assert!(gw.tun);
        assert!(!grant_of(&["route-agent", "run"]).unwrap().tun);
        assert_eq!(
            grant_of(&["dns", "run"]).unwrap().capabilities,
            ["NET_BIND_SERVICE"]
        );
        assert_eq!(grant_of(&["lab", "echo"]), None);
        assert_eq!(grant_of::<&str>(&[]), None);
        let c = runner.command(
            "cl-1-a-gw0",
            "cl-1-a-gw0",
            gw,
            Path::new("/tmp/lab"),
            &[],
            &["gateway", "run"],
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(
            line.contains("--cap-drop all --cap-add NET_ADMIN --device /dev/net/tun"),
            "{line}"
        );
        assert!(
            line.contains("--network=ns:/run/netns/cl-1-a-gw0"),
            "{line}"
        );
        assert!(
            line.ends_with("localhost/clusterlink:test gateway run"),
            "{line}"
        );
    }
}
