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

use std::path::Path;
use std::time::Duration;

use clusterlink_lab::topology::nft;
use clusterlink_lab::{ClusterSpec, Lab, wait_until};

use crate::support::AsCluster;
use crate::support::{BIN, ping};

fn specs(nat_c: bool) -> Vec<ClusterSpec> {
    ClusterSpec::many(&["a", "b", "c"], 0, if nat_c { &["c"] } else { &[] })
}

fn up(nat_c: bool) -> Lab {
    up_with(&specs(nat_c))
}

fn up_with(specs: &[ClusterSpec]) -> Lab {
    let lab = Lab::up(Path::new(BIN), specs, &|_| {}).expect("lab up (needs root)");
    if let Err(e) = lab.wait_connected(Duration::from_secs(30)) {
        panic!(
            "{e}\n{:?}\n{}",
            lab.connections(),
            crate::support::logs(&lab)
        );
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
    // Each gateway sends to each peer from a socket of its own, connected to where that
    // peer is (routed once, not per datagram).
    for c in 0..3 {
        let out = lab
            .gateway_ns(c, 0)
            .exec(
                "ss",
                &["-Huan", "state", "established", "sport", "=", ":51820"],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            text.lines().count(),
            2,
            "{}: one connected socket per peer:\n{text}",
            lab.state.clusters[c].name
        );
    }
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

/// A gateway whose TUN device is deleted under it stops with an error, for its supervisor
/// to restart it, rather than spinning on a dead descriptor; the other tunnels carry on.
#[test]
fn a_gateway_whose_tun_device_is_deleted_exits_with_an_error() {
    let lab = up(false);
    lab.gateway_ns(0, 0)
        .ip(&["link", "del", clusterlink_lab::lab::TUN])
        .unwrap();
    let mut status = None;
    wait_until("a-gw0 to exit", Duration::from_secs(10), || {
        status = lab.gateway_exit(0, 0);
        status.is_some()
    })
    .unwrap();
    assert!(!status.unwrap().success(), "exit status {status:?}");
    let log = std::fs::read_to_string(lab.state.dir.join("a-gw0.log")).unwrap();
    assert!(log.contains("the data plane stops"), "{log}");
    assert!(log.contains("its supervisor restarts it"), "{log}");
    let c_ip = lab.state.clusters[2].gateways[0].tunnel_ip.to_string();
    assert!(ping(&lab.gateway_ns(1, 0), &c_ip));
}

/// An underlay whose MTU is smaller than the tunnel's datagrams (a cloud VPN or an overlay
/// under the nodes): packets that fit the tunnel's MTU still cross, their datagrams
/// fragmented by the kernel, as with kernel WireGuard. With Don't Fragment on the datagrams
/// (quinn-udp's default) every full-size packet was lost while small ones passed.
#[test]
fn full_size_packets_cross_an_underlay_with_a_smaller_mtu() {
    let lab = up_with(&ClusterSpec::many(&["a", "b"], 0, &[]));
    // Every underlay link at 1300 bytes: both gateways' and all of the wan's.
    let wan = &lab.topology.wan;
    let links = wan.exec("ip", &["-o", "link", "show"]).unwrap();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        let name = line.split(':').nth(1).unwrap().trim();
        let name = name.split('@').next().unwrap();
        if name != "lo" {
            wan.ip(&["link", "set", name, "mtu", "1300"]).unwrap();
        }
    }
    for c in 0..2 {
        lab.gateway_ns(c, 0)
            .ip(&["link", "set", "eth0", "mtu", "1300"])
            .unwrap();
    }
    let a = lab.gateway_ns(0, 0);
    let b_ip = lab.state.clusters[1].gateways[0].tunnel_ip.to_string();
    // Small packets cross either way.
    assert!(ping(&a, &b_ip));
    // 1400-byte packets with DF set: they fit the tunnel (MTU 1420); their WireGuard
    // datagrams (1460 bytes with IP and UDP headers) do not fit the underlay.
    let big = a.exec("ping", &["-c3", "-W2", "-M", "do", "-s", "1372", &b_ip]);
    assert!(
        big.is_ok(),
        "full-size packets did not cross a 1300-byte underlay: {big:?}"
    );
}

/// A flood of handshake initiations at a's gateway (valid MAC1: gateways' public keys are
/// published) from the wan: past the limit the flooder gets cookie replies instead of key
/// exchanges; meanwhile a's tunnels keep carrying traffic, and b, restarted with a new key,
/// is reached again.
#[test]
fn a_handshake_flood_gets_cookies_and_tunnels_carry_on() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use clusterlink_gateway_core::wg::{Output, PublicKey, Session, StaticSecret};

    let mut lab = up(false);
    let a = &lab.state.clusters[0].gateways[0];
    let a_public = {
        let text = std::fs::read_to_string(&a.key_file).unwrap();
        PublicKey::from(&StaticSecret::from(base64_decode(text.trim())))
    };
    let target = std::net::SocketAddr::from((a.underlay, 51820));
    // Initiations from 200 keys a does not know, sent round and round.
    let inits: Vec<Vec<u8>> = (0..200u8)
        .map(|i| {
            let mut session =
                Session::new(&StaticSecret::from([i; 32]), a_public.as_bytes(), None, 1);
            let mut buf = vec![0u8; 2048];
            match session.encapsulate(&[0x45; 21], &mut buf) {
                Output::Network(b) => b.to_vec(),
                other => panic!("expected a handshake initiation, got {other:?}"),
            }
        })
        .collect();
    let socket = lab
        .topology
        .wan
        .run_in(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
        .unwrap();
    socket.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The flood stops however the test ends (a failed assertion included).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_on_drop = StopOnDrop(stop.clone());
    let cookies = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, cookies) = (stop.clone(), cookies.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // About 2,000 a second: twenty times the gate's limit.
                for init in &inits[(sent % 200) as usize..][..20] {
                    let _ = socket.send_to(init, target);
                    sent += 1;
                }
                while let Ok((n, _)) = socket.recv_from(&mut buf) {
                    if n == 64 && buf[0] == 3 {
                        cookies.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Pacing the flood, not waiting for anything.
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let a_ns = lab.gateway_ns(0, 0);
    let b_ip = lab.state.clusters[1].gateways[0].tunnel_ip.to_string();
    let c_ip = lab.state.clusters[2].gateways[0].tunnel_ip.to_string();
    wait_until(
        "cookie replies to the flood",
        Duration::from_secs(10),
        || cookies.load(Ordering::Relaxed) > 0,
    )
    .unwrap();
    assert!(ping(&a_ns, &c_ip), "a's tunnel to c during the flood");
    lab.restart_gateway(1, 0, true).unwrap();
    wait_until(
        "a reaches b, restarted with a new key, during the flood",
        Duration::from_secs(30),
        || ping(&a_ns, &b_ip),
    )
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    assert!(
        cookies.load(Ordering::Relaxed) > 100,
        "cookie replies: {cookies:?}"
    );
}

/// Our gateway in cluster a, wireguard-go (Debian's, configured with `wg`) standing in for
/// cluster b's gateway: handshake, then traffic both ways.
#[test]
fn interoperates_with_wireguard_go() {
    let specs = ClusterSpec::many(&["a", "b"], 0, &[]);
    let lab = Lab::up(Path::new(BIN), &specs, &|_| {}).unwrap();
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    let a = &lab.state.clusters[0].gateways[0];
    let b = &lab.state.clusters[1].gateways[0];
    let b_ns = lab.gateway_ns(1, 0);
    // Replace our gateway in b with wireguard-go.
    lab.bed.kill(b.pid);
    let iface = format!("wgi{}", std::process::id() % 100_000);
    // wireguard-go's control socket outlives its SIGKILL; remove it however the test ends.
    let _socket = RemoveOnDrop(Path::new("/var/run/wireguard").join(format!("{iface}.sock")));
    let dir = &lab.state.dir;
    let key = b_ns.exec("wg", &["genkey"]).unwrap().stdout;
    std::fs::write(dir.join("wg-go.key"), &key).unwrap();
    let our_public = String::from_utf8(run_with_stdin(
        "wg",
        &["pubkey"],
        &std::fs::read(&a.key_file).unwrap(),
    ))
    .unwrap();
    let go_public = String::from_utf8(run_with_stdin("wg", &["pubkey"], &key)).unwrap();
    lab.bed
        .spawn(&b_ns, "wireguard-go", "wireguard-go", &["-f", &iface])
        .unwrap();
    wait_until("wireguard-go's interface", Duration::from_secs(10), || {
        b_ns.ip(&["link", "show", &iface]).is_ok()
    })
    .unwrap();
    b_ns.exec(
        "wg",
        &[
            "set",
            &iface,
            "private-key",
            &dir.join("wg-go.key").display().to_string(),
            "listen-port",
            "51820",
            "peer",
            our_public.trim(),
            "allowed-ips",
            &lab.state.clusters[0].pod_cidr,
            "endpoint",
            &format!("{}:51820", a.underlay),
            "persistent-keepalive",
            "5",
        ],
    )
    .unwrap();
    b_ns.ip(&["addr", "add", &format!("{}/32", b.tunnel_ip), "dev", &iface])
        .unwrap();
    b_ns.ip(&["link", "set", &iface, "up"]).unwrap();
    b_ns.ip(&[
        "route",
        "replace",
        &lab.state.clusters[0].pod_cidr,
        "dev",
        &iface,
    ])
    .unwrap();
    // Tell the broker b's gateway now has wireguard-go's key.
    let public: [u8; 32] = base64_decode(go_public.trim());
    lab.publish(
        1,
        clusterlink_api::Record::Gateway(clusterlink_api::GatewayEndpoint {
            cluster: "b".parse().unwrap(),
            node: b.node.parse().unwrap(),
            public_key: public,
            private_addr: b.underlay.into(),
            public_addr: None,
            port: 51820,
            role: clusterlink_api::GatewayRole::Active,
            generation: 99,
        }),
    )
    .unwrap();
    let a_ns = lab.gateway_ns(0, 0);
    wait_until("a reaches wireguard-go", Duration::from_secs(20), || {
        ping(&a_ns, &b.tunnel_ip.to_string())
    })
    .unwrap();
    assert!(
        ping(&b_ns, &a.tunnel_ip.to_string()),
        "wireguard-go reaches our gateway"
    );
    let hs = b_ns
        .exec("wg", &["show", &iface, "latest-handshakes"])
        .unwrap();
    let when: u64 = String::from_utf8_lossy(&hs.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        when > 0,
        "wireguard-go completed a handshake with our gateway"
    );
}

/// Removes a file when dropped (also during a panic).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_with_stdin(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap().stdout
}

fn base64_decode(s: &str) -> [u8; 32] {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap()
        .try_into()
        .unwrap()
}
