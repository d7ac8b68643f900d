//! The container image (needs root, podman, runc and debootstrap): built from
//! deploy/image/Containerfile as a user builds it (on a local Debian base: no registry is
//! reachable here), then the lab's gateways, route agents and DNS plugins run **from it**,
//! each with only the capabilities its manifest grants, and pass the checks `lab up` makes.
//!
//! ```text
//!   a: a-gw0, a-w1 ──wan── b: b-gw0, b-w1     broker and echo servers: the host's binary
//!   every gateway, route agent and DNS plugin: podman run --network ns:… IMAGE
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use clusterlink_lab::container::ContainerRunner;
use clusterlink_lab::{Lab, Testbed, wait_until};

use crate::support::BIN;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test's image tag, removed however the test ends.
struct Tag(String);

impl Drop for Tag {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .env(
                "CONTAINERS_CONF",
                clusterlink_testkit::image::containers_conf(&repo()),
            )
            .args(["rmi", "--force", &self.0])
            .output();
    }
}

#[test]
fn the_labs_components_run_from_the_image_and_reach_each_other() {
    let tag = Tag(format!("localhost/clusterlink:e2e-{}", std::process::id()));
    let tag = &tag.0;
    let version = clusterlink_testkit::image::build(&repo(), Path::new(BIN), tag)
        .expect("build the image (podman, runc, debootstrap: scripts/install-deps.sh)");
    assert!(version.starts_with("clusterlink "), "{version}");
    // Non-root by default: the manifests give root only to the components that need it.
    let user = std::process::Command::new("podman")
        .env(
            "CONTAINERS_CONF",
            clusterlink_testkit::image::containers_conf(&repo()),
        )
        .args(["image", "inspect", "--format", "{{.Config.User}}", tag])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532");
    let runner = ContainerRunner {
        image: tag.to_owned(),
        containers_conf: clusterlink_testkit::image::containers_conf(&repo()),
    };
    let bed = Testbed::new()
        .expect("testbed (needs root)")
        .with_containers(runner.clone());
    let specs = crate::support::small(&["a", "b"]);
    let lab = Lab::up_in(bed, Path::new(BIN), &specs, &|_| {}).expect("lab up (needs root)");
    // The components are containers: podman lists one per gateway, route agent, DNS plugin.
    let running = || {
        let listed = std::process::Command::new("podman")
            .env("CONTAINERS_CONF", &runner.containers_conf)
            .args(["ps", "--format", "{{.Names}}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|n| n.starts_with(&lab.state.prefix))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    if wait_until(
        "every component's container",
        Duration::from_secs(30),
        || running().len() == 2 * (1 + 2 + 1),
    )
    .is_err()
    {
        panic!("running: {:?}\n{}", running(), crate::support::logs(&lab));
    }

    lab.wait_connected(Duration::from_secs(60)).unwrap();
    lab.wait_routes(Duration::from_secs(30)).unwrap();
    let reach = clusterlink_lab::checks::reachability(&lab.state);
    assert!(reach.iter().all(|r| r.ok), "{reach:?}");
    lab.wait_services(Duration::from_secs(30)).unwrap();
    // Their /readyz, served from inside the containers, says so too.
    wait_until(
        "every component to be ready",
        Duration::from_secs(20),
        || crate::support::all_ready(&lab),
    )
    .unwrap_or_else(|e| panic!("{e}: {:#?}", crate::support::readiness(&lab)));
    let found = clusterlink_lab::checks::discovery(&lab.state);
    assert!(found.iter().all(|d| d.ok), "{found:?}");
    drop(lab);
    // Nothing left running.
    let listed = std::process::Command::new("podman")
        .env("CONTAINERS_CONF", &runner.containers_conf)
        .args(["ps", "-a", "--format", "{{.Names}}"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        !left
            .lines()
            .any(|n| n.contains(&format!("cl-{}-", std::process::id()))),
        "{left}"
    );
}
