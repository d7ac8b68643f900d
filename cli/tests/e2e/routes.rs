//! Pods on worker nodes reach pods in other clusters through the route agents, the VXLAN
//! overlay to their gateway node and the gateways' tunnels. Real processes in network
//! namespaces (needs root).
//!
//! ```text
//!   a-w1-pod ─ a-w1 ══vxlan══ a-gw0 ═══wireguard═══ b-gw0 ─(CNI)─ b-w1 ─ b-w1-pod
//!                                   ╚══wireguard═══ c-gw0 ─(CNI)─ c-w1 ─ c-w1-pod   (c behind NAT)
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use clusterlink_lab::lab::agent_routes;
use clusterlink_lab::{ClusterSpec, Lab, Netns, Pod, wait_until};
use sha2::{Digest, Sha256};

use crate::support::AsCluster;
use crate::support::BIN;

fn up() -> Lab {
    let specs = ClusterSpec::many(&["a", "b", "c"], 1, &["c"]);
    let lab = Lab::up(Path::new(BIN), &specs, &|_| {}).expect("lab up (needs root)");
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    lab.wait_routes(Duration::from_secs(30)).unwrap();
    lab
}

fn ping(from: &Netns, to: &str, args: &[&str]) -> bool {
    let mut a = vec!["-c1", "-W2"];
    a.extend(args);
    a.push(to);
    from.exec("ping", &a).is_ok()
}

/// What the receiving side of a TCP transfer saw.
struct Received {
    peer: SocketAddr,
    bytes: u64,
    sha256: Vec<u8>,
}

/// Sends `bytes` of a pseudo-random pattern over TCP from pod `from` to pod `to`; returns
/// what the receiver saw and the sender's hash.
fn transfer(from: &Pod, to: &Pod, port: u16, bytes: usize) -> (Received, Vec<u8>) {
    // Sockets stay in the namespace they were made in, whichever thread uses them.
    let listener = to
        .ns()
        .run_in(move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n as u64;
        }
        s.write_all(b"done").unwrap();
        Received {
            peer,
            bytes: total,
            sha256: hash.finalize().to_vec(),
        }
    });
    let dst = SocketAddr::new(to.address.into(), port);
    let mut stream = from
        .ns()
        .run_in(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut sent = 0;
    while sent < bytes {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = chunk.len().min(bytes - sent);
        stream.write_all(&chunk[..n]).unwrap();
        hash.update(&chunk[..n]);
        sent += n;
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).unwrap();
    (server.join().unwrap(), hash.finalize().to_vec())
}

#[test]
fn pods_on_worker_nodes_reach_each_other_across_clusters() {
    let lab = up();
    let pod = |c: usize| lab.worker(c).pod.clone();
    let (a, b, c) = (pod(0), pod(1), pod(2));
    // ICMP, both directions, with c behind NAT; a ping that fills the tunnel MTU exactly
    // (1392 + 28 = 1420) passes unfragmented, one byte more is refused at the first hop.
    for (from, to) in [(&a, &b), (&b, &a), (&a, &c), (&c, &a), (&b, &c), (&c, &b)] {
        let dst = to.address.to_string();
        assert!(ping(&from.ns(), &dst, &[]), "{} -> {}", from.name, to.name);
        assert!(
            ping(&from.ns(), &dst, &["-M", "do", "-s", "1392"]),
            "{} -> {} with 1420-byte packets",
            from.name,
            to.name
        );
    }
    assert!(!ping(
        &a.ns(),
        &b.address.to_string(),
        &["-M", "do", "-s", "1393"]
    ));
    // TCP, both directions: the receiver sees the sending pod's own address (no NAT
    // between pods, even out of the NATed cluster).
    for (i, (from, to)) in [(&a, &b), (&b, &a), (&a, &c), (&c, &a)].iter().enumerate() {
        let (got, sent) = transfer(from, to, 7100 + i as u16, 1 << 20);
        assert_eq!(
            got.peer.ip(),
            std::net::IpAddr::from(from.address),
            "source preserved"
        );
        assert_eq!((got.bytes, got.sha256), (1 << 20, sent));
    }
    // 100 MB across clusters, every byte intact (TCP picks an MSS that fits the tunnel).
    let (got, sent) = transfer(&a, &c, 7200, 100_000_000);
    assert_eq!(got.bytes, 100_000_000);
    assert_eq!(got.sha256, sent);
}

/// Everything on a node that is not the route agent's own: routes of every table, rules,
/// links and addresses, as `ip` prints them.
fn node_state(ns: &Netns) -> String {
    [
        &["-o", "link", "show"][..],
        &["-o", "addr", "show"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["rule", "show"],
    ]
    .iter()
    .map(|args| String::from_utf8_lossy(&ns.ip(args).unwrap().stdout).into_owned())
    .collect::<Vec<_>>()
    .join("\n")
}

fn has_rule(ns: &Netns) -> bool {
    String::from_utf8_lossy(&ns.ip(&["rule", "show"]).unwrap().stdout)
        .lines()
        .any(|l| l.starts_with("211:") && l.contains("lookup 211"))
}

fn our_routes(ns: &Netns) -> Vec<String> {
    String::from_utf8_lossy(
        &ns.ip(&["route", "show", "table", "211", "proto", "211"])
            .unwrap()
            .stdout,
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn routes_reconcile_follow_the_cluster_set_and_nothing_else_is_touched() {
    let mut lab = up();
    let node = lab.state.clusters[0].nodes[1].node.clone();
    let ns = node.ns();
    let b_pod = lab.worker(1).pod.address.to_string();
    let tunnel = "cl0";

    // Stop the agent and clean up: nothing of the agent's is left on the node. It stops
    // cleanly and within its shutdown timeout.
    let (status, took) = lab.stop_agent(0, 1).expect("the agent exits on SIGTERM");
    assert!(
        status.success() && took < Duration::from_secs(5),
        "{status} after {took:?}"
    );
    let out = ns
        .exec(BIN, &["route-agent", "cleanup", "--tunnel-device", tunnel])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Removed"));
    assert!(our_routes(&ns).is_empty() && !has_rule(&ns));
    assert!(ns.ip(&["link", "show", "vx-clusterlink"]).is_err());
    assert!(
        !ping(&node.pod.ns(), &b_pod, &[]),
        "no route agent, no way out"
    );

    // Things that carry one of the agent's marks but are not its own.
    ns.ip(&[
        "route",
        "add",
        "10.250.0.0/16",
        "dev",
        "eth0",
        "table",
        "211",
        "proto",
        "static",
    ])
    .unwrap();
    ns.ip(&[
        "route",
        "add",
        "10.251.0.0/16",
        "via",
        "172.31.1.1",
        "proto",
        "211",
    ])
    .unwrap();
    ns.ip(&["rule", "add", "priority", "211", "lookup", "100"])
        .unwrap();
    let before = node_state(&ns);

    // The agent again, this time cleaning up when it stops.
    lab.start_agent(0, 1, true).unwrap();
    wait_until("the agent's routes", Duration::from_secs(20), || {
        our_routes(&ns).len() == 4
    })
    .unwrap();
    wait_until("a pod in b", Duration::from_secs(10), || {
        ping(&node.pod.ns(), &b_pod, &[])
    })
    .unwrap();

    // A route, the rule and the overlay link deleted by hand come back.
    ns.ip(&["route", "del", "10.2.0.0/16", "table", "211"])
        .unwrap();
    wait_until(
        "the deleted route to come back",
        Duration::from_secs(5),
        || {
            agent_routes(&ns)
                .unwrap()
                .contains(&"10.2.0.0/16".to_owned())
        },
    )
    .unwrap();
    ns.ip(&["rule", "del", "priority", "211", "lookup", "211"])
        .unwrap();
    wait_until(
        "the deleted rule to come back",
        Duration::from_secs(5),
        || has_rule(&ns),
    )
    .unwrap();
    ns.ip(&["link", "del", "vx-clusterlink"]).unwrap();
    wait_until(
        "the overlay and its routes to come back",
        Duration::from_secs(5),
        || our_routes(&ns).len() == 4,
    )
    .unwrap();
    assert!(ping(&node.pod.ns(), &b_pod, &[]));

    // The active gateway moves (a gateway node that sorts first appears): the overlay and
    // every route re-point to it; when it goes, they point back.
    let stand_in = clusterlink_api::GatewayEndpoint {
        cluster: "a".parse().unwrap(),
        node: "a-gw".parse().unwrap(),
        public_key: [9; 32],
        private_addr: "172.31.1.50".parse().unwrap(),
        public_addr: None,
        port: 51820,
        role: clusterlink_api::GatewayRole::Active,
        generation: 1,
    };
    lab.publish(0, clusterlink_api::Record::Gateway(stand_in))
        .unwrap();
    wait_until(
        "routes via the new gateway",
        Duration::from_secs(10),
        || {
            let r = our_routes(&ns);
            r.len() == 4 && r.iter().all(|l| l.contains("via 240.31.1.50 "))
        },
    )
    .unwrap();
    let link = String::from_utf8_lossy(
        &ns.ip(&["-d", "link", "show", "vx-clusterlink"])
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(link.contains("remote 172.31.1.50 "), "{link}");
    lab.withdraw(0, clusterlink_api::Kind::Gateways, "a-gw")
        .unwrap();
    wait_until("routes back via a-gw0", Duration::from_secs(10), || {
        let r = our_routes(&ns);
        r.len() == 4 && r.iter().all(|l| l.contains("via 240.31.1.2 "))
    })
    .unwrap();
    wait_until("a pod in b again", Duration::from_secs(10), || {
        ping(&node.pod.ns(), &b_pod, &[])
    })
    .unwrap();

    // Cluster c leaves: its routes go from every node of a and b, the others stay.
    lab.clusterlink(&[
        "broker",
        "revoke",
        "c",
        "--credentials",
        &lab.state.admin_credentials.display().to_string(),
    ])
    .unwrap();
    for (cluster, other) in [(0, "10.2.0.0/16"), (1, "10.1.0.0/16")] {
        for n in &lab.state.clusters[cluster].nodes {
            wait_until("c's routes to go", Duration::from_secs(10), || {
                let r = agent_routes(&n.node.ns()).unwrap();
                !r.iter().any(|d| d == "10.3.0.0/16" || d == "10.103.0.0/16")
                    && r.iter().any(|d| d == other)
            })
            .unwrap();
        }
    }
    wait_until("a pod in b after c left", Duration::from_secs(10), || {
        ping(&node.pod.ns(), &b_pod, &[])
    })
    .unwrap();

    // Stopped (cleaning up), the agent leaves the node exactly as it found it: the foreign
    // route in its table, the main-table route with its protocol number and the rule at its
    // priority included.
    let (status, _) = lab.stop_agent(0, 1).expect("the agent exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert_eq!(node_state(&ns), before);
}

/// The route agent's second line, on a real kernel and without the broker's check: a cluster
/// set in which a rogue cluster's CIDRs cover this node's underlay subnet, another gateway and
/// the broker still sends those into the main table, not the tunnel; the rest of the rogue
/// CIDRs goes into the tunnel as any remote cluster's; the agent converges (a second pass
/// changes nothing).
#[test]
fn the_route_agent_keeps_the_mesh_out_of_the_tunnel_whatever_the_view_says() {
    use clusterlink_api::{Cluster, ClusterSet, GatewayEndpoint, GatewayRole};
    use clusterlink_route_agent::core::{self, NodeConfig, Ownership};
    use clusterlink_route_agent::kernel::Kernel;

    let bed = clusterlink_lab::Testbed::new().expect("a testbed (needs root)");
    let node = bed.namespace("guard").unwrap();
    let peer = bed.namespace("guard-peer").unwrap();
    bed.veth(&node, "eth0", &peer, "eth0").unwrap();
    node.ip(&["addr", "add", "172.31.1.5/24", "dev", "eth0"])
        .unwrap();
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        "172.31.1.1",
        "dev",
        "eth0",
    ])
    .unwrap();
    // The tunnel device the gateway would make (a veth pair stands in for its TUN).
    node.ip(&[
        "link", "add", "cl0", "type", "veth", "peer", "name", "cl0-end",
    ])
    .unwrap();
    for dev in ["cl0", "cl0-end"] {
        node.ip(&["link", "set", dev, "up"]).unwrap();
    }

    let mut set = ClusterSet::default();
    let cluster = |id: &str, pods: &str, svcs: &str| Cluster {
        id: id.parse().unwrap(),
        pod_cidrs: pods.parse().unwrap(),
        service_cidrs: svcs.parse().unwrap(),
        labels: Default::default(),
    };
    for c in [
        cluster("a", "10.1.0.0/16", "10.101.0.0/16"),
        cluster("b", "10.2.0.0/16", "10.102.0.0/16"),
        // The rogue: its pods cover the underlay, its services the broker.
        cluster("d", "172.31.0.0/16", "192.0.2.0/24"),
    ] {
        set.clusters.insert(c.id.clone(), c);
    }
    for (c, n, ip) in [("a", "a-gw0", "172.31.1.5"), ("b", "b-gw0", "172.31.9.2")] {
        let g = GatewayEndpoint {
            cluster: c.parse().unwrap(),
            node: n.parse().unwrap(),
            public_key: [7; 32],
            private_addr: ip.parse().unwrap(),
            public_addr: None,
            port: 51820,
            role: GatewayRole::Active,
            generation: 1,
        };
        set.gateways.insert((g.cluster.clone(), g.node.clone()), g);
    }
    let own = Ownership {
        table: 211,
        rule_priority: 211,
        protocol: 211,
    };
    let config = NodeConfig {
        cluster: "a".parse().unwrap(),
        node: "a-gw0".parse().unwrap(),
        node_ip: "172.31.1.5".parse().unwrap(),
        tunnel_device: "cl0".into(),
        overlay_device: "vx-guard".into(),
        tunnel_mtu: 1420,
        underlay_mtu: 1500,
        vni: 211,
        vxlan_port: 4809,
        broker: vec!["192.0.2.7".parse().unwrap()],
    };
    let second_pass = node
        .run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let kernel = Kernel::connect(own, "vx-guard", "cl0").unwrap();
                let (installed, facts) = kernel.read().await.unwrap();
                let want = core::desired(&config, &set, &facts, own);
                let applied = kernel
                    .apply(&core::diff(&installed, &want.state, own))
                    .await
                    .unwrap();
                assert!(applied.failures.is_empty(), "{:?}", applied.failures);
                let (again, facts) = kernel.read().await.unwrap();
                let want = core::desired(&config, &set, &facts, own);
                core::diff(&again, &want.state, own)
            })
        })
        .unwrap();
    assert!(second_pass.is_empty(), "not converged: {second_pass:?}");
    let via = |dst: &str| {
        let out = node.ip(&["route", "get", dst]).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for kept_out in ["192.0.2.7", "172.31.9.2", "172.31.1.77"] {
        let r = via(kept_out);
        assert!(
            r.contains("dev eth0") && !r.contains("cl0"),
            "{kept_out}: {r}"
        );
    }
    for tunneled in ["192.0.2.8", "172.31.200.1", "10.2.0.9"] {
        let r = via(tunneled);
        assert!(r.contains("dev cl0"), "{tunneled}: {r}");
    }
}
