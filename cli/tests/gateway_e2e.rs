//! Gateways in a full mesh, from real processes in network namespaces (needs root).
//!
//! ```text
//!   a-gw0 (10.1.255.1) ─┐                 ┌─ b-gw0 (10.2.255.1)
//!                        ├── wan ── broker ┤
//!   c-gw0 (10.3.255.1) ─┘  (c behind NAT: 100.64.3.1)
//! ```
//!
//! Traffic between the gateways' tunnel addresses must cross as WireGuard: the wan counts
//! what it forwards, and no ICMP between clusters may appear there, only UDP to 51820.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use clusterlink_e2e::topology::nft;
use clusterlink_e2e::{ClusterSpec, Lab, Netns, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_clusterlink");

fn specs(nat_c: bool) -> Vec<ClusterSpec> {
    ["a", "b", "c"]
        .iter()
        .map(|n| ClusterSpec {
            name: n.to_string(),
            gateways: 1,
            nat: nat_c && *n == "c",
        })
        .collect()
}

fn ping(from: &Netns, to: &str) -> bool {
    from.exec("ping", &["-c1", "-W1", to]).is_ok()
}

fn up(nat_c: bool) -> Lab {
    let lab = Lab::up(Path::new(BIN), &specs(nat_c), &|_| {}).expect("lab up (needs root)");
    if let Err(e) = lab.wait_connected(Duration::from_secs(30)) {
        let logs: String = std::fs::read_dir(&lab.state.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| {
                format!(
                    "--- {}\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                )
            })
            .collect();
        panic!("{e}\n{:?}\n{logs}", lab.connections());
    }
    lab
}

/// nft counters in the wan: ICMP and WireGuard UDP forwarded between clusters.
fn count_wan(lab: &Lab) {
    nft(
        &lab.topology.wan,
        "add table inet cl_count\n\
         add chain inet cl_count count_forward { type filter hook forward priority -10; }\n\
         add counter inet cl_count icmp_pkts\n\
         add counter inet cl_count wg_pkts\n\
         add rule inet cl_count count_forward meta l4proto icmp counter name icmp_pkts\n\
         add rule inet cl_count count_forward udp dport 51820 counter name wg_pkts\n\
         add rule inet cl_count count_forward udp sport 51820 counter name wg_pkts\n",
    )
    .unwrap();
}

fn counter(lab: &Lab, name: &str) -> u64 {
    let out = lab
        .topology
        .wan
        .exec("nft", &["list", "counter", "inet", "cl_count", name])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[test]
fn three_clusters_form_a_full_mesh_through_wireguard() {
    let lab = up(true);
    count_wan(&lab);
    let tunnel = |c: usize| lab.state.clusters[c].gateways[0].tunnel_ip.to_string();
    for from in 0..3 {
        for to in 0..3 {
            if from != to {
                let ns = lab.gateway_ns(from, 0);
                assert!(
                    ping(&ns, &tunnel(to)),
                    "{} cannot reach {}",
                    lab.state.clusters[from].name,
                    tunnel(to)
                );
            }
        }
    }
    // It went through the tunnel: the route is the TUN device, the wan forwarded no ICMP,
    // and it forwarded WireGuard datagrams.
    let route = lab
        .gateway_ns(0, 0)
        .exec("ip", &["route", "get", &tunnel(1)])
        .unwrap();
    assert!(String::from_utf8_lossy(&route.stdout).contains("dev cl0"));
    assert_eq!(
        counter(&lab, "icmp_pkts"),
        0,
        "ICMP crossed the wan outside the tunnel"
    );
    assert!(
        counter(&lab, "wg_pkts") >= 12,
        "the pings crossed as WireGuard UDP"
    );
    // show connections lists every tunnel with an RTT.
    let conns = lab.connections().unwrap();
    assert_eq!(conns.len(), 6);
    assert!(
        conns
            .iter()
            .all(|c| c["state"] == "connected" && c["rttMs"].as_f64().is_some_and(|r| r > 0.0)),
        "{conns:?}"
    );
}

#[test]
fn a_gateway_restarted_with_a_new_key_is_picked_up_by_the_others() {
    let mut lab = up(false);
    let b_ip = lab.state.clusters[1].gateways[0].tunnel_ip.to_string();
    let c_ip = lab.state.clusters[2].gateways[0].tunnel_ip.to_string();
    let a = lab.gateway_ns(0, 0);
    assert!(ping(&a, &b_ip));
    let old_key = std::fs::read_to_string(&lab.state.clusters[1].gateways[0].key_file).unwrap();
    lab.restart_gateway(1, 0, true).unwrap();
    wait_until("a reaches the restarted b", Duration::from_secs(20), || {
        ping(&a, &b_ip)
    })
    .unwrap();
    let new_key = std::fs::read_to_string(&lab.state.clusters[1].gateways[0].key_file).unwrap();
    assert_ne!(old_key, new_key, "b came back with a new key");
    // The tunnel to c was never disturbed.
    assert!(ping(&a, &c_ip));
    lab.wait_connected(Duration::from_secs(20)).unwrap();
}

#[test]
fn existing_tunnels_survive_a_broker_outage() {
    let lab = up(false);
    lab.stop_broker();
    let b_ip = lab.state.clusters[1].gateways[0].tunnel_ip.to_string();
    let c_ip = lab.state.clusters[2].gateways[0].tunnel_ip.to_string();
    // Two seconds of pings each way, every one answered, with the broker gone.
    for (from, to) in [(0, &b_ip), (1, &c_ip)] {
        let out = lab
            .gateway_ns(from, 0)
            .exec("ping", &["-c", "10", "-i", "0.2", "-W", "1", to])
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"));
    }
}
