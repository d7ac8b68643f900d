//! The testbed itself, as root: topologies come up, NAT behaves like NAT, and everything is
//! gone afterwards, also after a panic.
//!
//! ```text
//!   a-gw0 ── wan ── b-gw0        c-gw0 behind NAT (100.64.3.1)
//! ```

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use clusterlink_lab::{ClusterSpec, Testbed, Topology, wait_until};

fn spec(name: &str, nat: bool) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        gateways: 1,
        workers: 1,
        nat,
    }
}

fn namespaces() -> String {
    String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

/// The host namespace's links, addresses, routes and rules.
fn host_state() -> String {
    ["link", "addr", "route", "rule"]
        .iter()
        .map(|o| {
            String::from_utf8_lossy(
                &std::process::Command::new("ip")
                    .args(["-o", o])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .into_owned()
        })
        .collect()
}

fn ping(from: &clusterlink_lab::Netns, to: &str) -> bool {
    from.exec("ping", &["-c1", "-W1", to]).is_ok()
}

#[test]
fn routes_between_clusters_and_nat_blocks_inbound() {
    let host_before = host_state();
    let bed = Testbed::new().expect("the testbed needs root");
    let topo =
        Topology::build(&bed, &[spec("a", false), spec("b", false), spec("c", true)]).unwrap();
    let a = topo.clusters[0].nodes[0].ns();
    let c = topo.clusters[2].nodes[0].ns();
    let b_ip = topo.clusters[1].nodes[0].underlay.to_string();
    let c_ip = topo.clusters[2].nodes[0].underlay.to_string();
    wait_until("a reaches b", Duration::from_secs(5), || ping(&a, &b_ip)).unwrap();
    // c reaches out; what a sees is c's public address.
    assert!(ping(&c, &b_ip));
    // Nobody reaches c's private address from outside.
    assert!(
        !ping(&a, &c_ip),
        "NAT must drop connections into the cluster"
    );
    assert_eq!(topo.clusters[2].public.to_string(), "100.64.3.1");
    // Inside a cluster, pods on different nodes reach each other (the lab's "CNI")…
    let a_gw_pod = &topo.clusters[0].nodes[0].pod;
    let a_w_pod = &topo.clusters[0].workers().next().unwrap().pod;
    assert!(ping(&a_w_pod.ns(), &a_gw_pod.address.to_string()));
    assert!(ping(&a_gw_pod.ns(), &a_w_pod.address.to_string()));
    // …but not across clusters: that takes clusterlink.
    let b_w_pod = &topo.clusters[1].workers().next().unwrap().pod;
    assert!(!ping(&a_w_pod.ns(), &b_w_pod.address.to_string()));
    // The host namespace has none of this: its links, addresses, routes and rules are as before.
    assert_eq!(host_state(), host_before);
    assert!(namespaces().contains(&format!("{}wan", bed.prefix)));
}

#[test]
fn namespaces_are_removed_on_drop_and_on_panic() {
    let prefix = {
        let bed = Testbed::new().unwrap();
        Topology::build(&bed, &[spec("x", false)]).unwrap();
        assert!(namespaces().contains(&bed.prefix));
        bed.prefix.clone()
    };
    assert!(
        !namespaces().contains(&prefix),
        "dropped testbed left namespaces"
    );
    let prefix = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let p2 = prefix.clone();
    let r = std::thread::spawn(move || {
        let bed = Testbed::new().unwrap();
        *p2.lock().unwrap() = bed.prefix.clone();
        Topology::build(&bed, &[spec("y", false)]).unwrap();
        panic!("test panic inside a testbed");
    })
    .join();
    assert!(r.is_err());
    let p = prefix.lock().unwrap().clone();
    assert!(
        !p.is_empty() && !namespaces().contains(&p),
        "a panic left namespaces behind"
    );
}
