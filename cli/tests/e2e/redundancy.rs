//! Several gateways in one cluster: one active by election, the others warm; when the active
//! one dies, another takes over and the pods' traffic follows (needs root).
//!
//! ```text
//!   a: a-gw0, a-gw1 (gateways), a-w1 (worker) ──wan── b: b-gw0, b-w1
//! ```

use std::path::Path;
use std::time::Duration;

use clusterlink_lab::{ClusterSpec, Lab, wait_until};

use crate::support::{BIN, ping};

fn gateway_index(lab: &Lab, cluster: usize, node: &str) -> usize {
    lab.state.clusters[cluster]
        .gateways
        .iter()
        .position(|g| g.node == node)
        .unwrap()
}

/// Waits until exactly one gateway of the cluster is active, other than `not`.
fn one_active(lab: &Lab, cluster: usize, not: Option<&str>, what: &str) -> String {
    lab.wait_one_active(cluster, not, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what}: {e}: {:?}", lab.gateways()))
}

#[test]
fn a_passive_gateway_takes_over_from_a_dead_active_one_and_keeps_the_role() {
    let specs = vec![
        ClusterSpec {
            name: "a".into(),
            gateways: 2,
            workers: 1,
            nat: false,
        },
        ClusterSpec {
            name: "b".into(),
            gateways: 1,
            workers: 1,
            nat: false,
        },
    ];
    let mut lab = Lab::up(Path::new(BIN), &specs, &|_| {}).expect("lab up (needs root)");
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    lab.wait_routes(Duration::from_secs(30)).unwrap();
    let first = one_active(&lab, 0, None, "one active gateway in cluster a");
    // Both of a's gateways keep a session to b's, and each reports its own.
    let from_a: Vec<String> = lab
        .connections()
        .unwrap()
        .iter()
        .filter(|c| c["from"] == "a" && c["state"] == "connected")
        .filter_map(|c| c["fromNode"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(from_a, ["a-gw0", "a-gw1"], "{:?}", lab.connections());
    let (a_pod, b_pod) = (lab.worker(0).pod.clone(), lab.worker(1).pod.clone());
    let (a_addr, b_addr) = (a_pod.address.to_string(), b_pod.address.to_string());
    wait_until("pods to reach each other", Duration::from_secs(20), || {
        ping(&b_pod.ns(), &a_addr) && ping(&a_pod.ns(), &b_addr)
    })
    .unwrap();

    // The active gateway dies without a word.
    let k = gateway_index(&lab, 0, &first);
    lab.kill_gateway(0, k);
    let second = one_active(&lab, 0, Some(&first), "the other gateway to take over");
    wait_until(
        "pods to reach each other through the new active gateway",
        Duration::from_secs(20),
        || ping(&b_pod.ns(), &a_addr) && ping(&a_pod.ns(), &b_addr),
    )
    .unwrap();

    // It comes back: passive, and the role stays where it is (no flapping back).
    lab.restart_gateway(0, k, false).unwrap();
    wait_until(
        "the restarted gateway to publish",
        Duration::from_secs(20),
        || {
            lab.gateways()
                .unwrap_or_default()
                .iter()
                .any(|g| g["node"] == first.as_str() && g["role"] == "passive")
        },
    )
    .unwrap();
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    assert_eq!(lab.active_gateways(0), vec![second.clone()]);
    assert!(ping(&b_pod.ns(), &a_addr));

    // A graceful stop hands over at once (the endpoint is withdrawn, not left to lapse).
    let k2 = gateway_index(&lab, 0, &second);
    // While the pods' traffic flows and the peers hold sessions to it, it exits cleanly
    // within its shutdown timeout (5 s by default).
    let (status, took) = lab
        .terminate_gateway(0, k2)
        .expect("the gateway exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let third = one_active(&lab, 0, Some(&second), "the restarted gateway to take over");
    assert_eq!(third, first);
    wait_until(
        "pods to reach each other after the hand-over",
        Duration::from_secs(20),
        || ping(&b_pod.ns(), &a_addr) && ping(&a_pod.ns(), &b_addr),
    )
    .unwrap();
    // Its successor on that node starts at once (the UDP port and the TUN name are free).
    lab.restart_gateway(0, k2, false).unwrap();
    lab.wait_connected(Duration::from_secs(30)).unwrap();
}
