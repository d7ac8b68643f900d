//! The dependency rule, checked on the resolved dependency tree (`cargo tree`), so that a
//! dependency added in the wrong place fails here instead of in review:
//! - the gateway core links no async runtime, no TUN crate and no system-call crate of its
//!   own (nix reaches it only through boringtun, which reads its own clock);
//! - the member components (gateway, route agent, DNS plugin) link the broker client, not
//!   the broker: no redb, no etcd client, no CA code;
//! - no product crate ships the test kit.

use std::collections::BTreeSet;
use std::process::Command;

/// `cargo tree` of `packages` (normal dependencies, features as each package alone needs
/// them): the set of package names in it.
fn tree(packages: &[&str], invert: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    if let Some(i) = invert {
        cmd.args(["-i", i]);
    }
    let out = cmd.output().expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn names(tree: &str) -> BTreeSet<String> {
    tree.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_gateway_core_links_no_runtime_no_tun_and_no_nix_of_its_own() {
    let deps = names(&tree(&["clusterlink-gateway-core"], None));
    for banned in [
        "tokio",
        "tun-rs",
        "tonic",
        "quinn-udp",
        "socket2",
        "rtnetlink",
    ] {
        assert!(!deps.contains(banned), "gateway-core links {banned}");
    }
    // nix is there only as boringtun's (its timers' clock): nothing else pulls it in.
    let why_nix = names(&tree(&["clusterlink-gateway-core"], Some("nix")));
    let expected: BTreeSet<String> = ["nix", "boringtun", "clusterlink-gateway-core"]
        .map(str::to_owned)
        .into();
    assert_eq!(why_nix, expected, "nix reaches gateway-core another way");
}

#[test]
fn member_components_link_the_broker_client_not_the_broker() {
    let deps = names(&tree(
        &[
            "clusterlink-gateway",
            "clusterlink-route-agent",
            "clusterlink-dns",
        ],
        None,
    ));
    // rcgen is linked (through the broker client) for one thing only: a renewing component
    // makes its new key pair itself; signing stays with the broker.
    for banned in [
        "clusterlink-broker",
        "redb",
        "etcd-client",
        "clusterlink-testkit",
        "tempfile",
    ] {
        assert!(!deps.contains(banned), "a member component links {banned}");
    }
    assert!(deps.contains("clusterlink-broker-client"));
}

#[test]
fn no_product_crate_ships_the_test_kit() {
    let deps = names(&tree(&["clusterlink", "clusterlink-broker"], None));
    assert!(!deps.contains("clusterlink-testkit"));
    assert!(!deps.contains("tempfile"), "tempfile is test code");
}
