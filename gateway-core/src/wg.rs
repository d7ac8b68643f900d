//! The one place that knows the WireGuard implementation (boringtun's `noise::Tunn`).
//! Swapping it (for gotatun, say) changes this file only.
//!
//! boringtun keeps its own timers on the process clock; everything else in the gateway's core
//! takes `now` from its caller.

use std::net::IpAddr;
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
pub use boringtun::x25519::{PublicKey, StaticSecret};

/// Largest datagram a session produces or takes.
pub const MAX_DATAGRAM: usize = 65_535 + 32;

/// Bytes a data message adds to the packet it carries (header and tag).
const DATA_OVERHEAD: usize = 32;
/// The largest handshake message (an initiation).
const HANDSHAKE_MAX: usize = 148;

/// Room a session needs to write what `input_len` bytes in (either way) may produce: a data
/// message, or a handshake message sent in its place.
pub fn output_room(input_len: usize) -> usize {
    (input_len + DATA_OVERHEAD).max(HANDSHAKE_MAX)
}

/// What a call into a session produced; the bytes live in the caller's buffer.
#[derive(Debug)]
pub enum Output<'a> {
    Nothing,
    /// Send this to the peer. After a decapsulate, call [`Session::flush`] until `Nothing`.
    Network(&'a [u8]),
    /// Deliver this decrypted IP packet (from the given inner source address).
    Tunnel(&'a [u8], IpAddr),
    Error(String),
}

fn convert(r: TunnResult<'_>) -> Output<'_> {
    match r {
        TunnResult::Done => Output::Nothing,
        TunnResult::Err(e) => Output::Error(format!("{e:?}")),
        TunnResult::WriteToNetwork(b) => Output::Network(b),
        TunnResult::WriteToTunnelV4(b, a) => Output::Tunnel(b, IpAddr::V4(a)),
        TunnResult::WriteToTunnelV6(b, a) => Output::Tunnel(b, IpAddr::V6(a)),
    }
}

/// A WireGuard session with one peer.
pub struct Session {
    tunn: Tunn,
    index: u32,
}

impl Session {
    /// `index` must be unique among this gateway's sessions (24 bits are used).
    pub fn new(secret: &StaticSecret, peer: &[u8; 32], keepalive: Option<u16>, index: u32) -> Self {
        Self {
            tunn: Tunn::new(
                secret.clone(),
                PublicKey::from(*peer),
                None,
                keepalive,
                index,
                None,
            ),
            index,
        }
    }

    /// The index given at creation: datagrams for this session carry it.
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn encapsulate<'a>(&mut self, packet: &[u8], buf: &'a mut [u8]) -> Output<'a> {
        convert(self.tunn.encapsulate(packet, buf))
    }

    pub fn decapsulate<'a>(
        &mut self,
        from: IpAddr,
        datagram: &[u8],
        buf: &'a mut [u8],
    ) -> Output<'a> {
        convert(self.tunn.decapsulate(Some(from), datagram, buf))
    }

    /// Queued packets after a handshake completes.
    pub fn flush<'a>(&mut self, buf: &'a mut [u8]) -> Output<'a> {
        convert(self.tunn.decapsulate(None, &[], buf))
    }

    /// Starts a handshake now (sessions are kept warm before any traffic needs them).
    pub fn initiate<'a>(&mut self, buf: &'a mut [u8]) -> Output<'a> {
        convert(self.tunn.format_handshake_initiation(buf, false))
    }

    /// Drives handshakes, rekeys and keepalives; call every ~100 ms.
    pub fn tick<'a>(&mut self, buf: &'a mut [u8]) -> Output<'a> {
        convert(self.tunn.update_timers(buf))
    }

    /// Time since the last completed handshake, and data bytes sent and received.
    pub fn stats(&self) -> (Option<Duration>, u64, u64) {
        let (hs, tx, rx, _, _) = self.tunn.stats();
        (hs, tx as u64, rx as u64)
    }

    pub fn is_expired(&self) -> bool {
        self.tunn.is_expired()
    }
}

/// The session index a datagram is addressed to (responses, cookies, data), if any.
pub fn receiver_index(datagram: &[u8]) -> Option<u32> {
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeResponse(p) => Some(p.receiver_idx >> 8),
        Packet::PacketCookieReply(p) => Some(p.receiver_idx >> 8),
        Packet::PacketData(p) => Some(p.receiver_idx >> 8),
        Packet::HandshakeInit(_) => None,
    }
}

/// The static public key of whoever sent a handshake initiation to us.
pub fn initiator_key(
    secret: &StaticSecret,
    public: &PublicKey,
    datagram: &[u8],
) -> Option<[u8; 32]> {
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(init) => parse_handshake_anon(secret, public, &init)
            .ok()
            .map(|h| h.peer_static_public),
        _ => None,
    }
}

/// Handshake initiations a second that are taken at full cost (a Diffie-Hellman each, to
/// learn who sent it) before senders must prove their address with a cookie: WireGuard's
/// defence against handshake floods. boringtun's own device uses the same figure. Responses
/// are not counted here: only one to an initiation of ours finds a session, and each
/// session limits its own (boringtun, 10 a second), so a gateway that starts with hundreds
/// of peers is not throttled by their answers.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Size of a cookie reply (message type 3).
pub const COOKIE_REPLY_LEN: usize = 64;

/// What [`HandshakeGate::check`] decided.
#[derive(Debug)]
pub enum Gate<'a> {
    /// Go on: MAC1 is right and the gateway is not under load, or MAC2 carries a valid
    /// cookie.
    Pass,
    /// Under load, without a valid cookie: send this cookie reply back instead.
    Cookie(&'a [u8]),
    /// Not a well-formed initiation for this gateway (wrong MAC1, bad length): drop it.
    /// (No detail: under a flood, formatting one per packet would be work for the attacker.)
    Reject,
}

/// Checks handshake initiations before any key exchange is attempted: MAC1 (keyed with this
/// gateway's public key; a keyed hash, cheap), and, while more than the limit arrived in the
/// last second, MAC2 (a cookie bound to the sender's address), answering with a cookie
/// reply when it is missing. So a flood of initiations costs hashes, not Diffie-Hellman.
pub struct HandshakeGate(RateLimiter);

impl HandshakeGate {
    pub fn new(public: &PublicKey, limit: u64) -> Self {
        Self(RateLimiter::new(public, limit))
    }

    pub fn check<'a>(&self, src: IpAddr, datagram: &[u8], buf: &'a mut [u8]) -> Gate<'a> {
        match self.0.verify_packet(Some(src), datagram, buf) {
            Ok(_) => Gate::Pass,
            Err(TunnResult::WriteToNetwork(reply)) => Gate::Cookie(reply),
            Err(_) => Gate::Reject,
        }
    }

    /// Starts a new one-second window once a second has passed (boringtun reads its own
    /// clock here); call it from the core's timer tick.
    pub fn tick(&self) {
        self.0.reset_count();
    }
}

/// True for a handshake initiation (message type 1).
pub fn is_handshake_init(datagram: &[u8]) -> bool {
    datagram.first() == Some(&1)
}
