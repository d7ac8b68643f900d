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
    /// Handshake initiations answered with a cookie reply instead of a key exchange (more
    /// than [`wg::HANDSHAKE_RATE_LIMIT`] a second arrived).
    pub handshakes_under_load: u64,
    /// Handshake initiations dropped before any key exchange (wrong MAC1: not meant for
    /// this gateway's key, or forged).
    pub handshakes_rejected: u64,
}

struct Peer {
    key: PeerKey,
    spec: PeerSpec,
    session: Session,
    /// The address the peer was last authenticated from.
    endpoint: Option<SocketAddr>,
    probes: VecDeque<(u64, Instant)>,
    rtt: Option<Duration>,
    last_reply: Option<Instant>,
}

pub struct GatewayCore {
    secret: StaticSecret,
    public: PublicKey,
    /// By session index: the per-packet paths look peers up by the index a datagram carries
    /// (or a route yields), never by name.
    peers: HashMap<u32, Peer>,
    by_name: BTreeMap<PeerKey, u32>,
    by_key: HashMap<[u8; 32], u32>,
    /// Longest prefix first.
    routes: Vec<(IpNet, u32)>,
    next_index: u32,
    transmits: VecDeque<Transmit>,
    to_tun: VecDeque<Vec<u8>>,
    /// Scratch for control messages (handshakes, timers).
    buf: Vec<u8>,
    /// Packet buffers handed back by the shell once written, reused instead of allocated.
    pool: BufPool,
    next_tick: Option<Instant>,
    probe_seq: u64,
    /// Bytes left free in front of each packet for the TUN device (its virtio header).
    tun_headroom: usize,
    pub counters: Counters,
    /// MAC1 and cookie checks before any handshake's key exchange.
    gate: wg::HandshakeGate,
    /// Changes whenever the set of learned peer endpoints may have.
    endpoints_generation: u64,
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
            peers: HashMap::new(),
            by_name: BTreeMap::new(),
            by_key: HashMap::new(),
            routes: Vec::new(),
            next_index: 1,
            transmits: VecDeque::new(),
            to_tun: VecDeque::new(),
            buf: vec![0; wg::MAX_DATAGRAM],
            pool: BufPool::default(),
            next_tick: None,
            probe_seq: 0,
            tun_headroom: 0,
            counters: Counters::default(),
            gate: wg::HandshakeGate::new(&public, wg::HANDSHAKE_RATE_LIMIT),
            endpoints_generation: 0,
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
            .by_name
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(p) = self
                .by_name
                .remove(&key)
                .and_then(|i| self.peers.remove(&i))
            {
                info!(cluster = %key.0, node = %key.1, "peer removed");
                self.by_key.remove(&p.spec.public_key);
                self.endpoints_generation += 1;
            }
        }
        let mut added = Vec::new();
        for (key, spec) in wanted {
            let existing = self.by_name.get(&key).copied();
            match existing.and_then(|i| self.peers.get_mut(&i)) {
                Some(p) if p.spec.public_key == spec.public_key => {
                    if p.spec.endpoints != spec.endpoints {
                        debug!(cluster = %key.0, node = %key.1, "peer endpoints changed");
                    }
                    p.spec = spec;
                }
                _ => {
                    if let Some(old) = existing.and_then(|i| self.peers.remove(&i)) {
                        info!(cluster = %key.0, node = %key.1, "peer key changed; new session");
                        self.by_key.remove(&old.spec.public_key);
                        self.endpoints_generation += 1;
                    } else {
                        info!(cluster = %key.0, node = %key.1, "peer added");
                    }
                    let index = self.next_index;
                    self.next_index = (self.next_index + 1) & 0x00ff_ffff;
                    let session =
                        Session::new(&self.secret, &spec.public_key, Some(KEEPALIVE_SECS), index);
                    self.by_name.insert(key.clone(), index);
                    self.by_key.insert(spec.public_key, index);
                    added.push(index);
                    self.peers.insert(
                        index,
                        Peer {
                            key,
                            spec,
                            session,
                            endpoint: None,
                            probes: VecDeque::new(),
                            rtt: None,
                            last_reply: None,
                        },
                    );
                }
            }
        }
        // In name order, so that equal prefixes resolve the same way on every run.
        self.routes = self
            .by_name
            .values()
            .filter_map(|i| self.peers.get(i).map(|p| (*i, p)))
            .filter(|(_, p)| p.spec.active)
            .flat_map(|(i, p)| p.spec.cidrs.iter().map(move |c| (*c, i)))
            .collect();
        self.routes
            .sort_by_key(|r| std::cmp::Reverse(r.0.prefix_len()));
        // Warm every new session now rather than on first traffic.
        let mut buf = std::mem::take(&mut self.buf);
        for index in added {
            let init =
                self.peers
                    .get_mut(&index)
                    .and_then(|p| match p.session.initiate(&mut buf) {
                        Output::Network(b) => Some(b.to_vec()),
                        _ => None,
                    });
            if let Some(b) = init {
                self.send(index, b);
            }
        }
        self.buf = buf;
        // Start handshakes now rather than at the next tick.
        self.next_tick = Some(now);
    }

    /// Where each peer was last authenticated from: the addresses worth a socket of their
    /// own. Candidate addresses still being tried, and senders that are not peers, are not.
    pub fn endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_name
            .values()
            .filter_map(|i| self.peers.get(i))
            .filter_map(|p| p.endpoint)
    }

    /// Changes whenever [`endpoints`](Self::endpoints) may have: compare it to the last
    /// one seen instead of reading them all on every wake-up.
    pub fn endpoints_generation(&self) -> u64 {
        self.endpoints_generation
    }

    fn route(&self, dst: IpAddr) -> Option<u32> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&dst))
            .map(|(_, i)| *i)
    }

    /// Queues `payload` for the peer: moved, not copied, except for a handshake sent to
    /// several candidate addresses.
    fn send(&mut self, index: u32, payload: Vec<u8>) {
        let Some(p) = self.peers.get(&index) else {
            self.pool.give(payload);
            return;
        };
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
            None => match p.spec.endpoints.first() {
                Some(dst) => self.transmits.push_back(Transmit { dst: *dst, payload }),
                None => self.pool.give(payload),
            },
        }
    }

    /// A packet read from the TUN device.
    pub fn handle_tun_packet(&mut self, packet: &[u8], _now: Instant) {
        let Some(index) = dst_addr(packet).and_then(|d| self.route(d)) else {
            self.counters.no_route += 1;
            trace!("no route for packet from TUN");
            return;
        };
        self.encapsulate_to(index, packet);
    }

    /// Encrypts straight into a pooled buffer, which becomes the transmit's payload.
    fn encapsulate_to(&mut self, index: u32, packet: &[u8]) {
        let Some(p) = self.peers.get_mut(&index) else {
            return;
        };
        let mut out = self.pool.take(wg::output_room(packet.len()));
        let produced = match p.session.encapsulate(packet, &mut out) {
            Output::Network(b) => Some(b.len()),
            Output::Error(e) => {
                self.counters.wireguard_errors += 1;
                debug!(error = %e, "encapsulate failed");
                None
            }
            // Queued inside the session until its handshake completes.
            _ => None,
        };
        match produced {
            Some(len) => {
                out.truncate(len);
                self.send(index, out);
            }
            None => self.pool.give(out),
        }
    }

    /// A datagram received on the UDP socket.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if wg::is_handshake_init(datagram) {
            let mut reply = [0u8; wg::COOKIE_REPLY_LEN];
            match self.gate.check(from.ip(), datagram, &mut reply) {
                wg::Gate::Pass => {}
                wg::Gate::Cookie(cookie) => {
                    self.counters.handshakes_under_load += 1;
                    let mut payload = self.pool.take(cookie.len());
                    payload.copy_from_slice(cookie);
                    self.transmits.push_back(Transmit { dst: from, payload });
                    return;
                }
                wg::Gate::Reject => {
                    self.counters.handshakes_rejected += 1;
                    trace!(%from, "handshake initiation rejected (wrong MAC1)");
                    return;
                }
            }
        }
        let index = match wg::receiver_index(datagram) {
            Some(idx) => Some(idx),
            None => wg::initiator_key(&self.secret, &self.public, datagram)
                .and_then(|k| self.by_key.get(&k).copied()),
        };
        let Some(p) = index.and_then(|i| self.peers.get_mut(&i)) else {
            self.counters.unknown_peer += 1;
            trace!(%from, "datagram from no known peer");
            return;
        };
        let index = p.session.index();
        let headroom = self.tun_headroom;
        // Decrypted in place behind the TUN device's header room: no copy on the way out.
        let mut packet = self.pool.take(headroom + wg::output_room(datagram.len()));
        packet[..headroom].fill(0);
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut delivered: Option<(usize, IpAddr)> = None;
        let mut ok = false;
        match p
            .session
            .decapsulate(from.ip(), datagram, &mut packet[headroom..])
        {
            Output::Network(b) => {
                replies.push(b.to_vec());
                ok = true;
                let mut buf = std::mem::take(&mut self.buf);
                while let Output::Network(b) = p.session.flush(&mut buf) {
                    replies.push(b.to_vec());
                }
                self.buf = buf;
            }
            Output::Tunnel(b, src) => {
                delivered = Some((b.len(), src));
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
            info!(cluster = %p.key.0, node = %p.key.1, %from, "peer endpoint learned");
            p.endpoint = Some(from);
            self.endpoints_generation += 1;
        }
        for r in replies {
            self.transmits.push_back(Transmit {
                dst: from,
                payload: r,
            });
        }
        match delivered {
            Some((len, src)) => {
                packet.truncate(headroom + len);
                self.deliver(index, packet, src, now);
            }
            None => self.pool.give(packet),
        }
    }

    fn deliver(&mut self, index: u32, packet: Vec<u8>, src: IpAddr, now: Instant) {
        if let Some((kind, seq)) = parse_probe(&packet[self.tun_headroom..]) {
            self.pool.give(packet);
            match kind {
                1 => self.encapsulate_to(index, &probe_packet(2, seq)),
                2 => {
                    if let Some(p) = self.peers.get_mut(&index)
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
            .get(&index)
            .is_some_and(|p| p.spec.cidrs.iter().any(|c| c.contains(&src)));
        if allowed {
            self.to_tun.push_back(packet);
        } else {
            self.pool.give(packet);
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
        self.gate.tick();
        let indices: Vec<u32> = self.by_name.values().copied().collect();
        for index in indices {
            let mut buf = std::mem::take(&mut self.buf);
            let mut out = None;
            let mut probe = false;
            if let Some(p) = self.peers.get_mut(&index) {
                if let Output::Network(b) = p.session.tick(&mut buf) {
                    out = Some(b.to_vec());
                }
                probe = p.session.stats().0.is_some();
            }
            self.buf = buf;
            if let Some(b) = out {
                self.send(index, b);
            }
            if probe {
                self.probe_seq += 1;
                let seq = self.probe_seq;
                if let Some(p) = self.peers.get_mut(&index) {
                    p.probes.push_back((seq, now));
                    while p.probes.len() > 32 {
                        p.probes.pop_front();
                    }
                }
                self.encapsulate_to(index, &probe_packet(1, seq));
            }
        }
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

    /// Gives back a buffer from [`poll_tun`](Self::poll_tun) or a [`Transmit`] once it has
    /// been written, so the next packet reuses it.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.pool.give(buf);
    }

    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        self.by_name
            .iter()
            .filter_map(|((cluster, node), i)| self.peers.get(i).map(|p| (cluster, node, p)))
            .map(|(cluster, node, p)| {
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

/// Packet buffers kept for reuse. Each is allocated once with room for the largest packet
/// the TUN device may coalesce into it, so a buffer never reallocates on its way through.
/// A buffer comes back with its length, so taking it again zeroes only what it grew by: its
/// old bytes are overwritten by whoever fills it (and cut off after), and the header room is
/// zeroed where it is used.
#[derive(Default)]
struct BufPool {
    free: Vec<Vec<u8>>,
}

impl BufPool {
    /// Buffers kept at most (about 17 MB of address space; pages are touched only as used).
    const KEEP: usize = 256;
    const CAPACITY: usize = wg::MAX_DATAGRAM + 64;

    /// A buffer of `len` bytes, not necessarily zeroed.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let mut b = self
            .free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(Self::CAPACITY.max(len)));
        b.resize(len, 0);
        b
    }

    fn give(&mut self, b: Vec<u8>) {
        if self.free.len() < Self::KEEP && b.capacity() >= Self::CAPACITY {
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests;
