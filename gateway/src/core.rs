//! The gateway's decisions, free of I/O: which peer a packet from the TUN device goes to,
//! which session a datagram belongs to, where to send, when to probe. The shell feeds it
//! packets, datagrams and `now`, and drains what it produced.
//!
//! Health probes travel inside each tunnel as tiny IPv4 packets of protocol 253 (reserved
//! for experiments) between unspecified addresses; the core answers and consumes them, so
//! they never reach a TUN device, and they prove the whole path: UDP, crypto, both cores.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use clusterlink_api::{ClusterId, ConnectionState, NodeName};
use ipnet::IpNet;
use tracing::{debug, info, trace};

use crate::wg::{self, Output, PublicKey, Session, StaticSecret};

pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A peer that answered no probe for this long is not connected.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);
const PROBE_PROTO: u8 = 253;
const PROBE_MAGIC: &[u8; 4] = b"CLPB";
const PROBE_LEN: usize = 20 + 16;
const KEEPALIVE_SECS: u16 = 5;

/// A remote gateway node, as the broker describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub cluster: ClusterId,
    pub node: NodeName,
    pub public_key: [u8; 32],
    /// Where it may be reached, in order of preference (private, then broker-observed).
    pub endpoints: Vec<SocketAddr>,
    /// Its cluster's pod and service CIDRs.
    pub cidrs: Vec<IpNet>,
    /// Traffic for the CIDRs goes to the active gateway; passive ones are kept warm.
    pub active: bool,
}

pub type PeerKey = (ClusterId, NodeName);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub cluster: ClusterId,
    pub node: NodeName,
    pub state: ConnectionState,
    pub rtt: Option<Duration>,
    pub since_handshake: Option<Duration>,
    pub endpoint: Option<SocketAddr>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Packets dropped, by reason (per-packet errors are counted, not raised).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub no_route: u64,
    pub not_allowed: u64,
    pub unknown_peer: u64,
    pub wireguard_errors: u64,
}

struct Peer {
    spec: PeerSpec,
    session: Session,
    index: u32,
    /// The address the peer was last authenticated from.
    endpoint: Option<SocketAddr>,
    probes: VecDeque<(u64, Instant)>,
    rtt: Option<Duration>,
    last_reply: Option<Instant>,
}

pub struct GatewayCore {
    secret: StaticSecret,
    public: PublicKey,
    peers: BTreeMap<PeerKey, Peer>,
    by_index: HashMap<u32, PeerKey>,
    by_key: HashMap<[u8; 32], PeerKey>,
    /// Longest prefix first.
    routes: Vec<(IpNet, PeerKey)>,
    next_index: u32,
    transmits: VecDeque<Transmit>,
    to_tun: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    next_tick: Option<Instant>,
    probe_seq: u64,
    /// Bytes left free in front of each packet for the TUN device (its virtio header).
    tun_headroom: usize,
    pub counters: Counters,
}

fn dst_addr(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?)),
        6 if packet.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?)),
        _ => None,
    }
}

/// A probe packet: IPv4, protocol 253, 0.0.0.0 → 0.0.0.0, magic, kind, sequence.
fn probe_packet(kind: u8, seq: u64) -> [u8; PROBE_LEN] {
    let mut p = [0u8; PROBE_LEN];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PROBE_LEN as u16).to_be_bytes());
    p[8] = 64;
    p[9] = PROBE_PROTO;
    p[20..24].copy_from_slice(PROBE_MAGIC);
    p[24] = kind;
    p[28..36].copy_from_slice(&seq.to_be_bytes());
    p
}

/// (kind, seq) if this is a probe.
fn parse_probe(p: &[u8]) -> Option<(u8, u64)> {
    (p.len() >= PROBE_LEN && p[0] == 0x45 && p[9] == PROBE_PROTO && &p[20..24] == PROBE_MAGIC).then(
        || {
            (
                p[24],
                u64::from_be_bytes(p[28..36].try_into().unwrap_or_default()),
            )
        },
    )
}

impl GatewayCore {
    pub fn new(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        Self {
            secret,
            public,
            peers: BTreeMap::new(),
            by_index: HashMap::new(),
            by_key: HashMap::new(),
            routes: Vec::new(),
            next_index: 1,
            transmits: VecDeque::new(),
            to_tun: VecDeque::new(),
            buf: vec![0; wg::MAX_DATAGRAM],
            next_tick: None,
            probe_seq: 0,
            tun_headroom: 0,
            counters: Counters::default(),
        }
    }

    /// Packets from [`poll_tun`](Self::poll_tun) start with this many zero bytes, so the
    /// shell can write them to a TUN device with offloads without another copy.
    pub fn set_tun_headroom(&mut self, bytes: usize) {
        self.tun_headroom = bytes;
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// Makes the peer set equal to `specs`. A peer whose key is unchanged keeps its session
    /// (no new handshake); the others are unaffected by any one peer's change.
    pub fn set_peers(&mut self, specs: Vec<PeerSpec>, now: Instant) {
        let wanted: BTreeMap<PeerKey, PeerSpec> = specs
            .into_iter()
            .filter(|s| s.public_key != self.public_key())
            .map(|s| ((s.cluster.clone(), s.node.clone()), s))
            .collect();
        let gone: Vec<PeerKey> = self
            .peers
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(p) = self.peers.remove(&key) {
                info!(cluster = %key.0, node = %key.1, "peer removed");
                self.by_index.remove(&p.index);
                self.by_key.remove(&p.spec.public_key);
            }
        }
        let mut added = Vec::new();
        for (key, spec) in wanted {
            match self.peers.get_mut(&key) {
                Some(p) if p.spec.public_key == spec.public_key => {
                    if p.spec.endpoints != spec.endpoints {
                        debug!(cluster = %key.0, node = %key.1, "peer endpoints changed");
                    }
                    p.spec = spec;
                }
                existing => {
                    if let Some(old) = existing {
                        info!(cluster = %key.0, node = %key.1, "peer key changed; new session");
                        self.by_index.remove(&old.index);
                        self.by_key.remove(&old.spec.public_key);
                    } else {
                        info!(cluster = %key.0, node = %key.1, "peer added");
                    }
                    let index = self.next_index;
                    self.next_index = (self.next_index + 1) & 0x00ff_ffff;
                    let session =
                        Session::new(&self.secret, &spec.public_key, Some(KEEPALIVE_SECS), index);
                    self.by_index.insert(index, key.clone());
                    self.by_key.insert(spec.public_key, key.clone());
                    added.push(key.clone());
                    self.peers.insert(
                        key.clone(),
                        Peer {
                            spec,
                            session,
                            index,
                            endpoint: None,
                            probes: VecDeque::new(),
                            rtt: None,
                            last_reply: None,
                        },
                    );
                }
            }
        }
        self.routes = self
            .peers
            .iter()
            .filter(|(_, p)| p.spec.active)
            .flat_map(|(k, p)| p.spec.cidrs.iter().map(move |c| (*c, k.clone())))
            .collect();
        self.routes
            .sort_by_key(|r| std::cmp::Reverse(r.0.prefix_len()));
        // Warm every new session now rather than on first traffic.
        let mut buf = std::mem::take(&mut self.buf);
        for key in added {
            let init = self
                .peers
                .get_mut(&key)
                .and_then(|p| match p.session.initiate(&mut buf) {
                    Output::Network(b) => Some(b.to_vec()),
                    _ => None,
                });
            if let Some(b) = init {
                self.send(&key, b);
            }
        }
        self.buf = buf;
        // Start handshakes now rather than at the next tick.
        self.next_tick = Some(now);
    }

    fn route(&self, dst: IpAddr) -> Option<&PeerKey> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&dst))
            .map(|(_, k)| k)
    }

    /// Queues `payload` for the peer: moved, not copied, except for a handshake sent to
    /// several candidate addresses.
    fn send(&mut self, key: &PeerKey, payload: Vec<u8>) {
        let Some(p) = self.peers.get(key) else { return };
        match p.endpoint {
            Some(dst) => self.transmits.push_back(Transmit { dst, payload }),
            // Until the peer has answered, handshakes try every address it may be at.
            None if wg::is_handshake_init(&payload) => {
                for dst in &p.spec.endpoints {
                    self.transmits.push_back(Transmit {
                        dst: *dst,
                        payload: payload.clone(),
                    });
                }
            }
            None => {
                if let Some(dst) = p.spec.endpoints.first() {
                    self.transmits.push_back(Transmit { dst: *dst, payload });
                }
            }
        }
    }

    /// A packet read from the TUN device.
    pub fn handle_tun_packet(&mut self, packet: &[u8], _now: Instant) {
        let Some(key) = dst_addr(packet).and_then(|d| self.route(d)).cloned() else {
            self.counters.no_route += 1;
            trace!("no route for packet from TUN");
            return;
        };
        self.encapsulate_to(&key, packet);
    }

    fn encapsulate_to(&mut self, key: &PeerKey, packet: &[u8]) {
        let mut buf = std::mem::take(&mut self.buf);
        if let Some(p) = self.peers.get_mut(key) {
            match p.session.encapsulate(packet, &mut buf) {
                // The one copy out of the reused scratch buffer.
                Output::Network(b) => {
                    let b = b.to_vec();
                    self.send(key, b);
                }
                Output::Error(e) => {
                    self.counters.wireguard_errors += 1;
                    debug!(error = %e, "encapsulate failed");
                }
                _ => {}
            }
        }
        self.buf = buf;
    }

    /// A datagram received on the UDP socket.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let key = match wg::receiver_index(datagram) {
            Some(idx) => self.by_index.get(&idx).cloned(),
            None => wg::initiator_key(&self.secret, &self.public, datagram)
                .and_then(|k| self.by_key.get(&k).cloned()),
        };
        let Some(key) = key else {
            self.counters.unknown_peer += 1;
            trace!(%from, "datagram from no known peer");
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut delivered: Option<(Vec<u8>, IpAddr)> = None;
        let mut ok = false;
        if let Some(p) = self.peers.get_mut(&key) {
            match p.session.decapsulate(from.ip(), datagram, &mut buf) {
                Output::Network(b) => {
                    replies.push(b.to_vec());
                    ok = true;
                    while let Output::Network(b) = p.session.flush(&mut buf) {
                        replies.push(b.to_vec());
                    }
                }
                Output::Tunnel(b, src) => {
                    let mut packet = Vec::with_capacity(self.tun_headroom + b.len());
                    packet.resize(self.tun_headroom, 0);
                    packet.extend_from_slice(b);
                    delivered = Some((packet, src));
                    ok = true;
                }
                Output::Nothing => ok = true,
                Output::Error(e) => {
                    self.counters.wireguard_errors += 1;
                    debug!(error = %e, %from, "decapsulate failed");
                }
            }
            if ok && p.endpoint != Some(from) {
                // Authenticated from here: this is where the peer is now (roaming, NAT).
                info!(cluster = %key.0, node = %key.1, %from, "peer endpoint learned");
                p.endpoint = Some(from);
            }
        }
        self.buf = buf;
        for r in replies {
            self.transmits.push_back(Transmit {
                dst: from,
                payload: r,
            });
        }
        if let Some((packet, src)) = delivered {
            self.deliver(&key, packet, src, now);
        }
    }

    fn deliver(&mut self, key: &PeerKey, packet: Vec<u8>, src: IpAddr, now: Instant) {
        if let Some((kind, seq)) = parse_probe(&packet[self.tun_headroom..]) {
            match kind {
                1 => self.encapsulate_to(key, &probe_packet(2, seq)),
                2 => {
                    if let Some(p) = self.peers.get_mut(key)
                        && let Some(pos) = p.probes.iter().position(|(s, _)| *s == seq)
                    {
                        let (_, sent) = p.probes[pos];
                        p.probes.drain(..=pos);
                        p.rtt = Some(now.saturating_duration_since(sent));
                        p.last_reply = Some(now);
                    }
                }
                _ => {}
            }
            return;
        }
        // AllowedIPs: a peer may only send from its own cluster's CIDRs.
        let allowed = self
            .peers
            .get(key)
            .is_some_and(|p| p.spec.cidrs.iter().any(|c| c.contains(&src)));
        if allowed {
            self.to_tun.push_back(packet);
        } else {
            self.counters.not_allowed += 1;
            trace!(%src, "source not allowed for this peer");
        }
    }

    /// Drives timers and probes; call when [`poll_timeout`](Self::poll_timeout) says.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_tick.is_some_and(|t| t > now) {
            return;
        }
        self.next_tick = Some(now + TICK);
        let keys: Vec<PeerKey> = self.peers.keys().cloned().collect();
        let mut buf = std::mem::take(&mut self.buf);
        for key in &keys {
            let mut out = Vec::new();
            let mut probe = false;
            if let Some(p) = self.peers.get_mut(key) {
                if let Output::Network(b) = p.session.tick(&mut buf) {
                    out.push(b.to_vec());
                }
                probe = p.session.stats().0.is_some();
            }
            for b in out {
                self.send(key, b);
            }
            if probe {
                self.probe_seq += 1;
                let seq = self.probe_seq;
                if let Some(p) = self.peers.get_mut(key) {
                    p.probes.push_back((seq, now));
                    while p.probes.len() > 32 {
                        p.probes.pop_front();
                    }
                }
                self.buf = std::mem::take(&mut buf);
                self.encapsulate_to(key, &probe_packet(1, seq));
                buf = std::mem::take(&mut self.buf);
            }
        }
        self.buf = buf;
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Moves every pending transmit into `out`, in order (for batched sending).
    pub fn drain_transmits(&mut self, out: &mut VecDeque<Transmit>) {
        out.append(&mut self.transmits);
    }

    /// The next decrypted packet for the TUN device, after the configured headroom.
    pub fn poll_tun(&mut self) -> Option<Vec<u8>> {
        self.to_tun.pop_front()
    }

    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|((cluster, node), p)| {
                let (since_handshake, tx_bytes, rx_bytes) = p.session.stats();
                let live = p
                    .last_reply
                    .is_some_and(|t| now.saturating_duration_since(t) < PROBE_DEADLINE);
                let state = if live {
                    ConnectionState::Connected
                } else if p.session.is_expired() {
                    ConnectionState::Error
                } else {
                    ConnectionState::Connecting
                };
                PeerStatus {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    state,
                    rtt: p.rtt,
                    since_handshake,
                    endpoint: p.endpoint,
                    tx_bytes,
                    rx_bytes,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
