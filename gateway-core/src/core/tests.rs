//! Gateway cores wired together through a simulated network: handshakes, data both ways,
//! AllowedIPs, probes, peer changes, and a peer behind NAT. No sockets, no root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use super::*;

fn secret(seed: u64) -> StaticSecret {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rng, &mut b);
    StaticSecret::from(b)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An IPv4 packet with a small payload.
fn packet(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv4Addr = src.parse().unwrap();
    let dst: std::net::Ipv4Addr = dst.parse().unwrap();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

struct Node {
    core: GatewayCore,
    addr: SocketAddr,
    /// Behind NAT: seen from outside as this address; reachable only by those it contacted.
    nat_public: Option<SocketAddr>,
    tun: Vec<Vec<u8>>,
}

/// Moves datagrams between nodes until nothing is in flight, advancing time by `step` per
/// round for `rounds` rounds.
struct Net {
    nodes: BTreeMap<&'static str, Node>,
    now: Instant,
    nat_seen: BTreeSet<(SocketAddr, SocketAddr)>,
    /// Handshake initiations sent, per destination.
    inits: BTreeMap<SocketAddr, usize>,
}

impl Net {
    fn new() -> Self {
        Net {
            nodes: BTreeMap::new(),
            now: Instant::now(),
            nat_seen: BTreeSet::new(),
            inits: BTreeMap::new(),
        }
    }

    fn add(
        &mut self,
        name: &'static str,
        seed: u64,
        addr: SocketAddr,
        nat_public: Option<SocketAddr>,
    ) -> [u8; 32] {
        let core = GatewayCore::new(secret(seed));
        let key = core.public_key();
        self.nodes.insert(
            name,
            Node {
                core,
                addr,
                nat_public,
                tun: Vec::new(),
            },
        );
        key
    }

    fn run(&mut self, rounds: usize, step: Duration) {
        for _ in 0..rounds {
            let names: Vec<&'static str> = self.nodes.keys().copied().collect();
            for n in &names {
                let now = self.now;
                self.nodes.get_mut(n).unwrap().core.handle_timeout(now);
            }
            // Deliver until quiet.
            for _ in 0..50 {
                let mut flight = Vec::new();
                for n in &names {
                    let node = self.nodes.get_mut(n).unwrap();
                    while let Some(t) = node.core.poll_transmit() {
                        let from = node.nat_public.unwrap_or(node.addr);
                        if node.nat_public.is_some() {
                            self.nat_seen.insert((from, t.dst));
                        }
                        flight.push((from, t));
                    }
                    while let Some(p) = node.core.poll_tun() {
                        node.tun.push(p);
                    }
                }
                if flight.is_empty() {
                    break;
                }
                for (from, t) in flight {
                    if wg::is_handshake_init(&t.payload) {
                        *self.inits.entry(t.dst).or_default() += 1;
                    }
                    let dest = self.nodes.values_mut().find(|n| {
                        n.addr == t.dst
                            || n.nat_public == Some(t.dst) && self.nat_seen.contains(&(t.dst, from))
                    });
                    // A NATed node's private address is unreachable from outside.
                    let dest = dest.filter(|n| !(n.nat_public.is_some() && n.addr == t.dst));
                    if let Some(d) = dest {
                        d.core.handle_datagram(from, &t.payload, self.now);
                    }
                }
            }
            self.now += step;
        }
    }

    fn core(&mut self, n: &str) -> &mut GatewayCore {
        &mut self.nodes.get_mut(n).unwrap().core
    }
}

fn spec(cluster: &str, key: [u8; 32], endpoints: &[&str], cidr: &str) -> PeerSpec {
    PeerSpec {
        cluster: cluster.parse().unwrap(),
        node: "gw-0".parse().unwrap(),
        public_key: key,
        endpoints: endpoints.iter().map(|e| addr(e)).collect(),
        cidrs: vec![cidr.parse().unwrap()],
        active: true,
    }
}

fn pair() -> (Net, [u8; 32], [u8; 32]) {
    let mut net = Net::new();
    let ka = net.add("a", 1, addr("192.0.2.1:51820"), None);
    let kb = net.add("b", 2, addr("192.0.2.2:51820"), None);
    let now = net.now;
    net.core("a").set_peers(
        vec![spec("b", kb, &["192.0.2.2:51820"], "10.2.0.0/16")],
        now,
    );
    net.core("b").set_peers(
        vec![spec("a", ka, &["192.0.2.1:51820"], "10.1.0.0/16")],
        now,
    );
    (net, ka, kb)
}

#[test]
fn data_crosses_both_ways_after_a_handshake() {
    let (mut net, _, _) = pair();
    let now = net.now;
    let p = packet("10.1.0.5", "10.2.0.7", b"hello");
    net.core("a").handle_tun_packet(&p, now);
    net.run(3, Duration::from_millis(10));
    assert_eq!(
        net.nodes["b"].tun,
        vec![p],
        "queued packet delivered once the handshake completes"
    );
    let r = packet("10.2.0.7", "10.1.0.5", b"world");
    let now = net.now;
    net.core("b").handle_tun_packet(&r, now);
    net.run(1, Duration::from_millis(10));
    assert_eq!(net.nodes["a"].tun, vec![r]);
    // No route: nothing sent.
    net.core("a")
        .handle_tun_packet(&packet("10.1.0.5", "10.9.0.1", b"x"), now);
    assert_eq!(net.core("a").counters.no_route, 1);
}

#[test]
fn a_peer_may_only_send_from_its_own_cidrs() {
    let (mut net, _, _) = pair();
    let now = net.now;
    net.core("a")
        .handle_tun_packet(&packet("10.1.0.5", "10.2.0.7", b"hi"), now);
    net.run(3, Duration::from_millis(10));
    // b's cluster claims a source outside its CIDRs: a drops it.
    let ka = net.nodes["a"].core.public_key();
    net.core("b")
        .set_peers(vec![spec("a", ka, &["192.0.2.1:51820"], "10.0.0.0/8")], now);
    net.core("b")
        .handle_tun_packet(&packet("10.9.9.9", "10.1.0.5", b"spoof"), now);
    net.run(1, Duration::from_millis(10));
    assert!(net.nodes["a"].tun.is_empty());
    assert_eq!(net.core("a").counters.not_allowed, 1);
}

#[test]
fn probes_measure_rtt_and_liveness() {
    let (mut net, _, _) = pair();
    net.run(5, PROBE_INTERVAL);
    let now = net.now;
    let st = net.core("a").status(now);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].state, ConnectionState::Connected, "{st:?}");
    assert!(st[0].rtt.is_some());
    assert!(
        net.nodes["a"].tun.is_empty() && net.nodes["b"].tun.is_empty(),
        "probes never reach a TUN device"
    );
    // The peer goes silent: after the deadline it is no longer connected.
    net.nodes.remove("b");
    net.run(15, PROBE_INTERVAL);
    let now = net.now;
    assert_ne!(
        net.core("a").status(now)[0].state,
        ConnectionState::Connected
    );
}

#[test]
fn a_key_change_replaces_one_session_and_leaves_the_others() {
    let mut net = Net::new();
    let ka = net.add("a", 1, addr("192.0.2.1:51820"), None);
    let kb = net.add("b", 2, addr("192.0.2.2:51820"), None);
    let kc = net.add("c", 3, addr("192.0.2.3:51820"), None);
    let now = net.now;
    let peers_of_a = |kc| {
        vec![
            spec("b", kb, &["192.0.2.2:51820"], "10.2.0.0/16"),
            spec("c", kc, &["192.0.2.3:51820"], "10.3.0.0/16"),
        ]
    };
    net.core("a").set_peers(peers_of_a(kc), now);
    net.core("b").set_peers(
        vec![spec("a", ka, &["192.0.2.1:51820"], "10.1.0.0/16")],
        now,
    );
    net.core("c").set_peers(
        vec![spec("a", ka, &["192.0.2.1:51820"], "10.1.0.0/16")],
        now,
    );
    net.run(3, Duration::from_millis(10));
    let to_b = net
        .inits
        .get(&addr("192.0.2.2:51820"))
        .copied()
        .unwrap_or(0);
    // c restarts with a new key; a follows the broker's update.
    let kc2 = net.add("c", 4, addr("192.0.2.3:51820"), None);
    let now = net.now;
    net.core("c").set_peers(
        vec![spec("a", ka, &["192.0.2.1:51820"], "10.1.0.0/16")],
        now,
    );
    net.core("a").set_peers(peers_of_a(kc2), now);
    let p = packet("10.1.0.5", "10.3.0.9", b"after");
    net.core("a").handle_tun_packet(&p, now);
    let q = packet("10.1.0.5", "10.2.0.9", b"still");
    net.core("a").handle_tun_packet(&q, now);
    net.run(3, Duration::from_millis(10));
    assert_eq!(net.nodes["c"].tun, vec![p], "the new c is reached");
    assert!(net.nodes["b"].tun.contains(&q));
    assert_eq!(
        net.inits
            .get(&addr("192.0.2.2:51820"))
            .copied()
            .unwrap_or(0),
        to_b,
        "no new handshake with b"
    );
}

/// a, and n behind NAT (at a private address, seen from outside as 198.51.100.1:51820),
/// each told of the other; a knows both of n's addresses. Nothing sent yet.
fn nat_pair() -> Net {
    let mut net = Net::new();
    let ka = net.add("a", 1, addr("192.0.2.1:51820"), None);
    let kn = net.add(
        "n",
        2,
        addr("10.0.0.2:51820"),
        Some(addr("198.51.100.1:51820")),
    );
    let now = net.now;
    net.core("a").set_peers(
        vec![spec(
            "n",
            kn,
            &["10.0.0.2:51820", "198.51.100.1:51820"],
            "10.2.0.0/16",
        )],
        now,
    );
    net.core("n").set_peers(
        vec![spec("a", ka, &["192.0.2.1:51820"], "10.1.0.0/16")],
        now,
    );
    net
}

#[test]
fn a_cluster_behind_nat_connects_through_its_public_address() {
    let mut net = nat_pair();
    net.run(5, PROBE_INTERVAL);
    let now = net.now;
    let st = net.core("a").status(now);
    assert_eq!(st[0].state, ConnectionState::Connected, "{st:?}");
    assert_eq!(st[0].endpoint, Some(addr("198.51.100.1:51820")));
    let p = packet("10.1.0.5", "10.2.0.7", b"through nat");
    net.core("a").handle_tun_packet(&p, now);
    net.run(1, Duration::from_millis(10));
    assert_eq!(net.nodes["n"].tun, vec![p]);
}

#[test]
fn packets_for_the_tun_device_come_with_the_requested_headroom() {
    let (mut net, _, _) = pair();
    net.core("b").set_tun_headroom(10);
    // A buffer handed back dirty must not leak its old bytes into the next packet.
    for _ in 0..4 {
        let mut dirty = Vec::with_capacity(wg::MAX_DATAGRAM + 64);
        dirty.resize(2000, 0xff);
        net.core("b").recycle(dirty);
    }
    let now = net.now;
    let p = packet("10.1.0.5", "10.2.0.7", b"room");
    net.core("a").handle_tun_packet(&p, now);
    net.run(5, PROBE_INTERVAL);
    let got = &net.nodes["b"].tun;
    assert_eq!(
        got.len(),
        1,
        "probes are still recognised behind the headroom: {got:?}"
    );
    assert_eq!(&got[0][..10], &[0u8; 10]);
    assert_eq!(&got[0][10..], &p[..]);
    let now = net.now;
    assert_eq!(
        net.core("b").status(now)[0].state,
        ConnectionState::Connected
    );
}

/// A handshake initiation to `to` from a key `to` does not know (an attacker can make these:
/// gateways' public keys are published).
fn stranger_initiation(seed: u64, to: [u8; 32]) -> Vec<u8> {
    let mut session = wg::Session::new(&secret(seed), &to, None, 1);
    let mut buf = vec![0u8; 2048];
    match session.encapsulate(&packet("10.9.0.1", "10.1.0.1", b"x"), &mut buf) {
        wg::Output::Network(b) => b.to_vec(),
        other => panic!("expected a handshake initiation, got {other:?}"),
    }
}

/// More than the limit of initiations in a second: the first ones cost a key exchange (and
/// are found to come from no known peer), the rest are answered with cookie replies, which
/// cost a hash. The data plane is not starved by Diffie-Hellman.
#[test]
fn a_handshake_flood_is_answered_with_cookies_past_the_limit() {
    let mut core = GatewayCore::new(secret(1));
    let now = Instant::now();
    let limit = wg::HANDSHAKE_RATE_LIMIT as usize;
    let flood = limit * 3;
    for i in 0..flood {
        let init = stranger_initiation(1_000 + i as u64, core.public_key());
        let from = addr(&format!("203.0.113.9:{}", 10_000 + i));
        core.handle_datagram(from, &init, now);
    }
    assert_eq!(
        core.counters.unknown_peer, limit as u64,
        "key exchanges made"
    );
    assert_eq!(core.counters.handshakes_under_load, (flood - limit) as u64);
    let mut replies = Vec::new();
    while let Some(t) = core.poll_transmit() {
        replies.push(t);
    }
    assert_eq!(replies.len(), flood - limit, "one cookie reply each");
    for (i, t) in replies.iter().enumerate() {
        assert_eq!(t.payload.len(), wg::COOKIE_REPLY_LEN);
        assert_eq!(t.payload[0], 3, "message type: cookie reply");
        assert_eq!(t.dst, addr(&format!("203.0.113.9:{}", 10_000 + limit + i)));
    }
}

/// An initiation whose MAC1 is not keyed with this gateway's public key (meant for another
/// key, or forged) is dropped before any key exchange, without a reply.
#[test]
fn handshakes_not_for_this_gateway_are_dropped_before_the_key_exchange() {
    let mut core = GatewayCore::new(secret(1));
    let other = GatewayCore::new(secret(2)).public_key();
    let now = Instant::now();
    let init = stranger_initiation(3, other);
    core.handle_datagram(addr("203.0.113.9:1"), &init, now);
    let mut forged = stranger_initiation(4, core.public_key());
    let n = forged.len();
    forged[n - 20] ^= 1; // inside MAC1
    core.handle_datagram(addr("203.0.113.9:2"), &forged, now);
    assert_eq!(core.counters.handshakes_rejected, 2);
    assert_eq!(core.counters.unknown_peer, 0, "no key exchange attempted");
    assert!(core.poll_transmit().is_none());
}

fn endpoints(core: &GatewayCore) -> Vec<SocketAddr> {
    let mut e: Vec<SocketAddr> = core.endpoints().collect();
    e.sort();
    e
}

/// Only addresses a peer was authenticated from are offered for a socket of their own: not
/// the candidates tried before it answered, and not a stranger. The generation tells when to
/// look again: when one is learned, moves, or its peer goes.
#[test]
fn learned_endpoints_and_when_they_change() {
    let gen0 = GatewayCore::new(secret(1)).endpoints_generation();
    let mut net = nat_pair();
    let ka = net.nodes["a"].core.public_key();
    // Two candidates tried, none answered yet: nothing learned, nothing changed.
    assert!(endpoints(net.core("a")).is_empty());
    assert_eq!(net.core("a").endpoints_generation(), gen0);

    net.run(5, PROBE_INTERVAL);
    assert_eq!(endpoints(net.core("a")), vec![addr("198.51.100.1:51820")]);
    assert_eq!(endpoints(net.core("n")), vec![addr("192.0.2.1:51820")]);
    let gen1 = net.core("a").endpoints_generation();
    assert_ne!(gen1, gen0);

    // Traffic from where it already is changes nothing.
    net.run(3, PROBE_INTERVAL);
    assert_eq!(net.core("a").endpoints_generation(), gen1);

    // A stranger's datagram teaches nothing.
    let now = net.now;
    let stranger = stranger_initiation(9, ka);
    net.core("a")
        .handle_datagram(addr("203.0.113.9:4000"), &stranger, now);
    assert_eq!(endpoints(net.core("a")), vec![addr("198.51.100.1:51820")]);
    assert_eq!(net.core("a").endpoints_generation(), gen1);

    // The NAT gives n a new public port: a learns it from n's next authenticated datagram.
    net.nodes.get_mut("n").unwrap().nat_public = Some(addr("198.51.100.1:40000"));
    let now = net.now;
    net.core("n")
        .handle_tun_packet(&packet("10.2.0.7", "10.1.0.5", b"moved"), now);
    net.run(1, Duration::from_millis(10));
    assert_eq!(endpoints(net.core("a")), vec![addr("198.51.100.1:40000")]);
    let gen2 = net.core("a").endpoints_generation();
    assert_ne!(gen2, gen1);

    // n leaves: its endpoint goes with it.
    let now = net.now;
    net.core("a").set_peers(Vec::new(), now);
    assert!(endpoints(net.core("a")).is_empty());
    assert_ne!(net.core("a").endpoints_generation(), gen2);
}
