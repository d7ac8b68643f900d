//! The gateway's UDP socket, batched: `recvmmsg` with GRO on receive (one system call can
//! bring many datagrams, coalesced by the kernel), GSO on send (consecutive equal-size
//! datagrams to one peer leave in one system call, from their own buffers). Falls back to
//! one datagram per call where the kernel lacks either, and where the datagrams are bigger
//! than the route's MTU: they leave without Don't Fragment, for the kernel to fragment.
//!
//! Each peer whose endpoint is known also gets a socket of its own on the gateway's port,
//! connected to that endpoint (as boringtun does; kernel WireGuard caches a route per peer
//! for the same reason). The kernel then routes that peer's datagrams once, not per send,
//! and finds the socket of a datagram from it without a route lookup (early demux): two
//! lookups through the node's routing rules saved per datagram. Datagrams from anywhere
//! else (handshakes from new addresses, cookie replies) use the shared socket.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::{getsockopt_impl, setsockopt_impl, sockopt_impl};
use quinn_udp::{RecvMeta, UdpSocketState};

use clusterlink_gateway_core::core::Transmit;

/// Messages per `recvmmsg` (each up to 64 datagrams with GRO). Small on purpose: the data
/// plane handles one `recvmmsg` per wake-up and writes what it decrypted before it reads
/// again, so the stages either side of it keep working (4 measured best; BENCHMARKS.md).
const RECV_BATCH: usize = 4;
/// Largest GSO send: the kernel's limit on one UDP send.
const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffers asked for, each way (wireguard-go asks for the same). The kernel's
/// default (about 208 KiB) holds three GSO bursts: a receiver a moment behind drops
/// datagrams, and every drop is a TCP loss inside the tunnel.
pub const SOCKET_BUFFER: usize = 7 << 20;

/// How long a send waits for room in a full socket before its datagrams are dropped (as a
/// full link would drop them): the data plane never hangs on one peer.
const SEND_WAIT: Duration = Duration::from_secs(1);

/// Which socket: the shared one, or a peer's (by the token it was registered under).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Shared,
    Peer(u64),
}

/// A socket on the gateway's port connected to one peer's endpoint.
struct PeerSocket {
    token: u64,
    socket: UdpSocket,
    state: UdpSocketState,
}

/// A non-blocking UDP socket, and one per known peer endpoint; the data plane's epoll loop
/// waits for them to be readable.
pub struct BatchedUdp {
    socket: UdpSocket,
    state: UdpSocketState,
    /// By the endpoint each is connected to.
    peers: HashMap<SocketAddr, PeerSocket>,
    /// Token → endpoint, for the receive side.
    tokens: HashMap<u64, SocketAddr>,
    next_token: u64,
    /// Set once a peer socket could not be made (warned about once).
    peer_sockets_failed: bool,
    bufs: [Vec<u8>; RECV_BATCH],
    metas: Vec<RecvMeta>,
    /// The datagrams of the GSO send being made (reused).
    batch: Vec<Vec<u8>>,
    /// Set once the kernel refused a GSO send.
    gso_off: bool,
    /// Set once datagrams had to be sent one by one because they exceed the route's MTU
    /// (warned about once).
    mtu_warned: bool,
}

impl BatchedUdp {
    /// Binds the gateway's port so that peer sockets can share it (SO_REUSEPORT), but fails,
    /// as a plain bind would, when anything already holds the port: another gateway on the
    /// same port would otherwise silently take a share of its datagrams.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        // A socket without SO_REUSEPORT cannot bind beside any other: this is the check.
        drop(UdpSocket::bind(addr)?);
        Self::new(bind_shared(addr)?)
    }

    /// Takes a bound socket. Peer sockets share its port only if it was bound with
    /// SO_REUSEPORT ([`bind`](Self::bind)); otherwise every datagram uses it.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let state = prepare(&socket)?;
        let buf_len = (state.gro_segments() * 1600).max(65_536);
        Ok(Self {
            socket,
            state,
            peers: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 0,
            peer_sockets_failed: false,
            bufs: std::array::from_fn(|_| vec![0u8; buf_len]),
            metas: vec![RecvMeta::default(); RECV_BATCH],
            batch: Vec::with_capacity(MAX_SEGMENTS),
            gso_off: false,
            mtu_warned: false,
        })
    }

    /// The socket's receive and send buffers, in bytes, as the kernel reports them.
    pub fn buffer_sizes(&self) -> io::Result<(usize, usize)> {
        buffer_sizes(&self.socket)
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The socket registered under `token`, if it is still in use.
    pub fn peer_socket(&self, token: u64) -> Option<&UdpSocket> {
        self.tokens
            .get(&token)
            .and_then(|dst| self.peers.get(dst))
            .map(|p| &p.socket)
    }

    /// Keeps one connected socket per endpoint in `endpoints`: makes the missing ones and
    /// closes those no longer wanted (closing takes them out of any epoll set). Returns the
    /// tokens of the new ones, for the caller to wait on ([`peer_socket`](Self::peer_socket)).
    /// Where one cannot be made, that peer's datagrams keep using the shared socket.
    pub fn connect_peers(&mut self, endpoints: impl IntoIterator<Item = SocketAddr>) -> Vec<u64> {
        let wanted: std::collections::HashSet<SocketAddr> = endpoints.into_iter().collect();
        self.peers.retain(|dst, p| {
            let keep = wanted.contains(dst);
            if !keep {
                self.tokens.remove(&p.token);
            }
            keep
        });
        let mut new = Vec::new();
        for dst in wanted {
            if self.peers.contains_key(&dst) {
                continue;
            }
            match self.connect(dst) {
                Ok((socket, state)) => {
                    let token = self.next_token;
                    self.next_token += 1;
                    self.tokens.insert(token, dst);
                    self.peers.insert(
                        dst,
                        PeerSocket {
                            token,
                            socket,
                            state,
                        },
                    );
                    new.push(token);
                }
                Err(e) if !self.peer_sockets_failed => {
                    self.peer_sockets_failed = true;
                    tracing::warn!(error = %e, peer = %dst, "cannot make a socket for this peer; its datagrams use the shared socket (routed per datagram)");
                }
                Err(e) => {
                    tracing::debug!(error = %e, peer = %dst, "cannot make a socket for this peer")
                }
            }
        }
        new
    }

    /// Closes the socket registered under `token`: its peer's datagrams use the shared
    /// socket again (for one the caller cannot wait on).
    pub fn forget_peer(&mut self, token: u64) {
        if let Some(dst) = self.tokens.remove(&token) {
            self.peers.remove(&dst);
        }
    }

    /// A socket on the shared socket's port, connected to `dst`.
    fn connect(&self, dst: SocketAddr) -> io::Result<(UdpSocket, UdpSocketState)> {
        let local = self.socket.local_addr()?;
        if local.is_ipv4() != dst.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the endpoint's address family differs from the socket's",
            ));
        }
        let socket = bind_shared(local)?;
        socket.connect(dst)?;
        let state = prepare(&socket)?;
        Ok((socket, state))
    }

    /// Receives what is ready on the shared socket (without waiting) and hands each
    /// datagram to `f`. Returns the number of datagrams, 0 when nothing was ready.
    pub fn try_recv(&mut self, f: impl FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        self.try_recv_on(Source::Shared, f)
    }

    /// Receives what is ready on `source`, as [`try_recv`](Self::try_recv). A peer socket
    /// reports an ICMP error from its endpoint (the peer's port closed) once, as
    /// ECONNREFUSED; the error is then cleared.
    pub fn try_recv_on(
        &mut self,
        source: Source,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let (socket, state) = match source {
            Source::Shared => (&self.socket, &self.state),
            Source::Peer(token) => match self.tokens.get(&token).and_then(|d| self.peers.get(d)) {
                Some(p) => (&p.socket, &p.state),
                // Closed since the event was reported.
                None => return Ok(0),
            },
        };
        // On the stack: no allocation per receive.
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
            self.bufs.each_mut().map(|b| IoSliceMut::new(b));
        let metas = &mut self.metas;
        let n = match state.recv(socket.into(), &mut slices, metas) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut count = 0;
        for (meta, buf) in self.metas.iter().zip(slices.iter()).take(n) {
            let data = &buf[..meta.len];
            let stride = meta.stride.max(1);
            for datagram in data.chunks(stride) {
                f(meta.addr, datagram);
                count += 1;
            }
        }
        Ok(count)
    }

    /// Sends every transmit, folding runs of equal-size datagrams to the same peer into GSO
    /// sends: one `sendmsg` whose iovec points at each datagram's own buffer, so nothing is
    /// copied on the way. Waits for room when the socket is full (up to `SEND_WAIT`, 1 s).
    /// Each payload goes to `spent` once sent, for reuse.
    pub fn send_all(&mut self, queue: &mut VecDeque<Transmit>, spent: &mut Vec<Vec<u8>>) {
        let max_segments = if self.gso_off {
            1
        } else {
            self.state.max_gso_segments().clamp(1, MAX_SEGMENTS)
        };
        while let Some(first) = queue.pop_front() {
            let size = first.payload.len();
            let dst = first.dst;
            self.batch.push(first.payload);
            while self.batch.len() < max_segments && (self.batch.len() + 1) * size <= MAX_GSO_BYTES
            {
                match queue.pop_front() {
                    Some(next) if next.dst == dst && next.payload.len() == size => {
                        self.batch.push(next.payload);
                    }
                    Some(other) => {
                        queue.push_front(other);
                        break;
                    }
                    None => break,
                }
            }
            self.send_batch(dst, size);
            spent.append(&mut self.batch);
        }
    }

    /// Sends `self.batch` (datagrams of `size` bytes each) to `dst` in one system call, or
    /// one by one where the kernel cannot take them together.
    fn send_batch(&mut self, dst: SocketAddr, size: usize) {
        // A peer's own socket sends without an address, on the route it cached.
        let (socket, to) = match self.peers.get(&dst) {
            Some(p) => (&p.socket, None),
            None => (&self.socket, Some(dst)),
        };
        let err = match send_waiting(socket, to, size, &self.batch) {
            Ok(()) => return,
            // An ICMP error from the peer's endpoint, reported by this send instead of
            // sending (the peer's port was closed a moment ago): reported, it is cleared.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                match send_waiting(socket, to, size, &self.batch) {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        if self.batch.len() == 1 {
            tracing::debug!(error = %err, dst = %dst, "UDP send failed");
            return;
        }
        match Errno::from_raw(err.raw_os_error().unwrap_or(0)) {
            // The datagrams are bigger than the route's MTU: a GSO send cannot be fragmented,
            // one datagram at a time can. Only this batch: smaller datagrams, or this size
            // once the route changes, still go together.
            Errno::EMSGSIZE => {
                if !self.mtu_warned {
                    self.mtu_warned = true;
                    tracing::warn!(
                        dst = %dst,
                        datagram = size,
                        "WireGuard datagrams exceed the underlay's MTU towards this peer; they leave \
                         fragmented, one per system call. Set the tunnel MTU (gateway --mtu, \
                         route-agent --tunnel-mtu) to the underlay's MTU less 60 bytes (80 on \
                         an IPv6 underlay)"
                    );
                }
            }
            // EIO: the kernel cannot segment on this route (an IPsec policy on it; before
            // Linux 6.11 also a device without checksum offload). Every later send goes one
            // by one too.
            Errno::EIO => {
                tracing::warn!(dst = %dst, "the kernel refused a UDP GSO send; sending datagrams one by one");
                self.gso_off = true;
            }
            _ => {
                tracing::debug!(error = %err, dst = %dst, "UDP send failed");
                return;
            }
        }
        for d in &self.batch {
            if let Err(e) = send_waiting(socket, to, d.len(), std::slice::from_ref(d)) {
                tracing::debug!(error = %e, dst = %dst, "UDP send failed");
            }
        }
    }
}

/// [`send_gso`], waiting for room in a full socket up to `SEND_WAIT` (1 s); past that the
/// datagrams are dropped (as a full link would drop them), with a warning.
fn send_waiting(
    socket: &UdpSocket,
    dst: Option<SocketAddr>,
    size: usize,
    datagrams: &[Vec<u8>],
) -> io::Result<()> {
    loop {
        match send_gso(socket, dst, size, datagrams) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_writable(socket, SEND_WAIT) {
                    tracing::warn!(dst = ?dst, datagrams = datagrams.len(), "UDP socket full for {SEND_WAIT:?}; datagrams dropped");
                    return Ok(());
                }
            }
            other => return other,
        }
    }
}

/// Waits until `socket` has room to send, or `limit` passes; true if it has.
fn wait_writable(socket: &UdpSocket, limit: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let timeout = PollTimeout::try_from(limit).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
    loop {
        match poll(&mut fds, timeout) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Most datagrams in one GSO send (the kernel's UDP_MAX_SEGMENTS).
const MAX_SEGMENTS: usize = 64;

/// One `sendmsg` of `datagrams` (each `size` bytes but possibly the last) to `dst` (or
/// where `socket` is connected), with UDP_SEGMENT when there is more than one.
fn send_gso(
    socket: &UdpSocket,
    dst: Option<SocketAddr>,
    size: usize,
    datagrams: &[Vec<u8>],
) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let n = datagrams.len();
    if n > MAX_SEGMENTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{n} datagrams in one GSO send; at most {MAX_SEGMENTS}"),
        ));
    }
    let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS];
    for (slot, d) in iov.iter_mut().zip(datagrams) {
        *slot = IoSlice::new(d);
    }
    let segment = u16::try_from(size).unwrap_or(u16::MAX);
    let gso = [ControlMessage::UdpGsoSegments(&segment)];
    let cmsgs: &[ControlMessage<'_>] = if n > 1 { &gso } else { &[] };
    let addr = dst.map(SockaddrStorage::from);
    sendmsg(
        socket.as_raw_fd(),
        &iov[..n],
        cmsgs,
        MsgFlags::empty(),
        addr.as_ref(),
    )?;
    Ok(())
}

/// A UDP socket bound to `addr` with SO_REUSEPORT (only sockets of this user that ask for it
/// too can share the port), close-on-exec.
fn bind_shared(addr: SocketAddr) -> io::Result<UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(UdpSocket::from(fd))
}

/// Sets a gateway socket up: non-blocking, buffers sized, GRO on, the other ancillary data
/// off, fragments allowed.
fn prepare(socket: &UdpSocket) -> io::Result<UdpSocketState> {
    socket.set_nonblocking(true)?;
    size_buffers(socket, SOCKET_BUFFER);
    let state = UdpSocketState::new(socket.into())?;
    quiet_ancillary(socket);
    allow_fragments(socket)?;
    Ok(state)
}

/// Asks for `bytes` of socket buffer each way: past `net.core.[rw]mem_max` with
/// CAP_NET_ADMIN (which a gateway has, for its TUN device), else up to that limit.
fn size_buffers(socket: &UdpSocket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
    }
    if let Ok((got, _)) = buffer_sizes(socket)
        && got < bytes
    {
        tracing::warn!(
            asked = bytes,
            got,
            "small UDP receive buffer: bursts may drop; raise net.core.rmem_max or run with CAP_NET_ADMIN"
        );
    }
}

/// Turns off the ancillary data quinn-udp asks for on behalf of a QUIC stack and a WireGuard
/// gateway does not use: receive timestamps (which also make the kernel timestamp every
/// packet it receives, host-wide), the TOS byte and the destination address. Each is a
/// control message per `recvmmsg` slot; UDP_GRO's segment size stays.
fn quiet_ancillary(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let results = [
        setsockopt(socket, sockopt::ReceiveTimestampns, &false),
        setsockopt(socket, sockopt::IpRecvTos, &false),
        setsockopt(socket, sockopt::Ipv4PacketInfo, &false),
    ];
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        tracing::debug!(error = %e, "cannot turn off a UDP control message");
    }
}

sockopt_impl!(
    /// IP_MTU_DISCOVER: whether datagrams leave with Don't Fragment set.
    IpMtuDiscover,
    Both,
    libc::IPPROTO_IP,
    libc::IP_MTU_DISCOVER,
    libc::c_int
);
sockopt_impl!(
    /// IPV6_MTU_DISCOVER: whether datagrams may be fragmented by this host.
    Ipv6MtuDiscover,
    Both,
    libc::IPPROTO_IPV6,
    libc::IPV6_MTU_DISCOVER,
    libc::c_int
);

/// Lets the kernel fragment datagrams bigger than the route's MTU, and routers fragment them
/// on the way, as kernel WireGuard does (quinn-udp sets Don't Fragment for QUIC's path MTU
/// discovery, under which such datagrams could not be sent at all). WireGuard's overhead must
/// not make a path with a small MTU lose every full-size packet.
fn allow_fragments(socket: &UdpSocket) -> io::Result<()> {
    use nix::sys::socket::setsockopt;
    match socket.local_addr()? {
        SocketAddr::V4(_) => setsockopt(socket, IpMtuDiscover, &libc::IP_PMTUDISC_DONT)?,
        SocketAddr::V6(_) => setsockopt(socket, Ipv6MtuDiscover, &libc::IPV6_PMTUDISC_DONT)?,
    }
    Ok(())
}

/// Receive and send buffer sizes, as the kernel reports them.
fn buffer_sizes(socket: &UdpSocket) -> io::Result<(usize, usize)> {
    use nix::sys::socket::{getsockopt, sockopt};
    Ok((
        getsockopt(socket, sockopt::RcvBuf)?,
        getsockopt(socket, sockopt::SndBuf)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffers are sized past the kernel's default. As root (CI) the forced size is
    /// granted whatever `rmem_max` says; the kernel reports twice the size asked for.
    #[test]
    fn socket_buffers_are_sized_for_bursts() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = BatchedUdp::new(socket).unwrap();
        let (rcv, snd) = udp.buffer_sizes().unwrap();
        // Without root (CAP_NET_ADMIN) the kernel caps the size at net.core.[rw]mem_max.
        assert!(rcv >= SOCKET_BUFFER, "receive buffer {rcv} (run as root)");
        assert!(snd >= SOCKET_BUFFER, "send buffer {snd} (run as root)");
    }

    /// Only GRO's control message stays on: no timestamps, TOS or destination address per
    /// datagram. Datagrams still arrive, with their sender.
    #[test]
    fn only_gro_ancillary_data_is_asked_for() {
        use nix::sys::socket::{getsockopt, sockopt};
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut udp = BatchedUdp::new(socket).unwrap();
        let s = udp.socket();
        assert!(!getsockopt(s, sockopt::ReceiveTimestampns).unwrap());
        assert!(!getsockopt(s, sockopt::IpRecvTos).unwrap());
        assert!(!getsockopt(s, sockopt::Ipv4PacketInfo).unwrap());
        assert!(getsockopt(s, sockopt::UdpGroSegment).unwrap());

        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = udp.socket().local_addr().unwrap();
        for i in 0..3u8 {
            sender.send_to(&[i; 100], to).unwrap();
        }
        let got = recv_n(&mut udp, Source::Shared, 3, Duration::from_secs(5));
        let want: Vec<(SocketAddr, Vec<u8>)> = (0..3u8)
            .map(|i| (sender.local_addr().unwrap(), vec![i; 100]))
            .collect();
        assert_eq!(got, want);
        // Nothing more waiting: an empty receive, not an error.
        assert_eq!(udp.try_recv(|_, _| {}).unwrap(), 0);
    }

    fn wait_readable(socket: &UdpSocket, limit: Duration) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::try_from(limit).unwrap()).unwrap() > 0
    }

    /// A queue of equal-size datagrams to one peer, then others, arrives whole and in order
    /// through GSO sends, and every buffer comes back for reuse.
    #[test]
    fn gso_sends_arrive_whole_and_in_order() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // Room for all of it, so nothing is dropped before it is read.
        nix::sys::socket::setsockopt(
            &receiver,
            nix::sys::socket::sockopt::RcvBufForce,
            &SOCKET_BUFFER,
        )
        .unwrap();
        let dst = receiver.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut udp = BatchedUdp::new(socket).unwrap();
        // 100 datagrams of 1200 bytes (more than one GSO send), then a short one and
        // 3 more of 1200: four sends at least.
        let sizes: Vec<usize> = (0..100)
            .map(|_| 1200)
            .chain([77])
            .chain((0..3).map(|_| 1200))
            .collect();
        let mut queue: VecDeque<Transmit> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| Transmit {
                dst,
                payload: (0..len).map(|j| (i * 7 + j) as u8).collect(),
            })
            .collect();
        let expected: Vec<Vec<u8>> = queue.iter().map(|t| t.payload.clone()).collect();
        let mut spent = Vec::new();
        udp.send_all(&mut queue, &mut spent);
        assert!(queue.is_empty());
        assert_eq!(spent.len(), expected.len(), "every buffer is returned");
        let mut buf = [0u8; 2048];
        for (i, want) in expected.iter().enumerate() {
            let n = receiver.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &want[..], "datagram {i}");
        }
    }

    /// Receives on `source` until `n` datagrams came or `limit` passed.
    fn recv_n(
        udp: &mut BatchedUdp,
        source: Source,
        n: usize,
        limit: Duration,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + limit;
        while got.len() < n && std::time::Instant::now() < deadline {
            let socket = match source {
                Source::Shared => udp.socket(),
                Source::Peer(t) => udp.peer_socket(t).expect("peer socket"),
            };
            if wait_readable(socket, Duration::from_millis(50)) {
                udp.try_recv_on(source, |from, d| got.push((from, d.to_vec())))
                    .unwrap();
            }
        }
        got
    }

    /// The gateway's port is shared only with its own peer sockets: binding it fails when
    /// anything holds it already, another gateway included.
    #[test]
    fn a_port_in_use_is_refused() {
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken = other.local_addr().unwrap();
        let err = BatchedUdp::bind(taken).err().expect("port in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);

        let first = BatchedUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = first.socket().local_addr().unwrap();
        let err = BatchedUdp::bind(port).err().expect("port in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    /// A peer's datagrams arrive on its own socket and ours leave from it, from the gateway's
    /// port; anyone else still reaches the shared socket. Once the peer is dropped its
    /// datagrams come to the shared socket again.
    #[test]
    fn a_peer_socket_carries_that_peers_datagrams_both_ways() {
        let mut udp = BatchedUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = udp.socket().local_addr().unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_addr = peer.local_addr().unwrap();

        let tokens = udp.connect_peers([peer_addr]);
        assert_eq!(tokens.len(), 1);
        let token = tokens[0];
        // Asked again for the same endpoint: nothing new.
        assert!(udp.connect_peers([peer_addr]).is_empty());
        assert_eq!(
            udp.peer_socket(token).unwrap().peer_addr().unwrap(),
            peer_addr
        );

        peer.send_to(b"from the peer", port).unwrap();
        stranger.send_to(b"from a stranger", port).unwrap();
        let on_peer = recv_n(&mut udp, Source::Peer(token), 1, Duration::from_secs(5));
        assert_eq!(on_peer, vec![(peer_addr, b"from the peer".to_vec())]);
        let on_shared = recv_n(&mut udp, Source::Shared, 1, Duration::from_secs(5));
        assert_eq!(
            on_shared,
            vec![(stranger.local_addr().unwrap(), b"from a stranger".to_vec())]
        );

        // Ours to the peer: three equal ones (one GSO send) and a short one, all from the
        // gateway's port.
        let mut queue: VecDeque<Transmit> =
            [vec![1u8; 500], vec![2; 500], vec![3; 500], vec![4; 9]]
                .into_iter()
                .map(|payload| Transmit {
                    dst: peer_addr,
                    payload,
                })
                .collect();
        let mut spent = Vec::new();
        udp.send_all(&mut queue, &mut spent);
        assert_eq!(spent.len(), 4);
        let mut buf = [0u8; 2048];
        for want in [vec![1u8; 500], vec![2; 500], vec![3; 500], vec![4; 9]] {
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(from, port);
            assert_eq!(&buf[..n], &want[..]);
        }

        // The peer is gone from the wanted set: its socket closes.
        assert!(udp.connect_peers([]).is_empty());
        assert!(udp.peer_socket(token).is_none());
        assert_eq!(udp.try_recv_on(Source::Peer(token), |_, _| {}).unwrap(), 0);
        peer.send_to(b"again", port).unwrap();
        let on_shared = recv_n(&mut udp, Source::Shared, 1, Duration::from_secs(5));
        assert_eq!(on_shared, vec![(peer_addr, b"again".to_vec())]);
    }

    /// A peer whose port closed makes its socket report the ICMP error once, not stay
    /// readable forever (which would spin the data plane); and the send after it, which the
    /// kernel would fail with that error, is made again and arrives.
    #[test]
    fn a_closed_peer_port_is_reported_once_and_the_next_send_arrives() {
        let mut udp = BatchedUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_addr = gone.local_addr().unwrap();
        drop(gone);
        let token = udp.connect_peers([peer_addr])[0];
        let send = |udp: &mut BatchedUdp, byte: u8| {
            let mut queue: VecDeque<Transmit> = [Transmit {
                dst: peer_addr,
                payload: vec![byte; 100],
            }]
            .into();
            udp.send_all(&mut queue, &mut Vec::new());
        };
        // Port unreachable comes back: the socket reports an error (it is ready).
        send(&mut udp, 1);
        assert!(wait_readable(
            udp.peer_socket(token).unwrap(),
            Duration::from_secs(5)
        ));
        let err = udp
            .try_recv_on(Source::Peer(token), |_, _| {})
            .expect_err("the ICMP error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        // Read once, cleared: nothing more to report.
        assert!(!wait_readable(
            udp.peer_socket(token).unwrap(),
            Duration::from_millis(200)
        ));

        // Another error is pending when the peer comes back...
        send(&mut udp, 2);
        assert!(wait_readable(
            udp.peer_socket(token).unwrap(),
            Duration::from_secs(5)
        ));
        let back = UdpSocket::bind(peer_addr).unwrap();
        back.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // ...and the next send still arrives.
        send(&mut udp, 3);
        let mut buf = [0u8; 256];
        let n = back.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[3u8; 100][..]);
    }
}
