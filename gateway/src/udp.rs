//! The gateway's UDP socket, batched: `recvmmsg` with GRO on receive (one system call can
//! bring many datagrams, coalesced by the kernel), GSO on send (consecutive equal-size
//! datagrams to one peer leave in one system call, from their own buffers). Falls back to
//! one datagram per call where the kernel lacks either, and where the datagrams are bigger
//! than the route's MTU: they leave without Don't Fragment, for the kernel to fragment.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::{getsockopt_impl, setsockopt_impl, sockopt_impl};
use quinn_udp::{RecvMeta, UdpSocketState};

use crate::core::Transmit;

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

/// A non-blocking UDP socket; the data plane's epoll loop waits for it to be readable.
pub struct BatchedUdp {
    socket: UdpSocket,
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
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
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        size_buffers(&socket, SOCKET_BUFFER);
        let state = UdpSocketState::new((&socket).into())?;
        quiet_ancillary(&socket);
        allow_fragments(&socket)?;
        let buf_len = (state.gro_segments() * 1600).max(65_536);
        Ok(Self {
            socket,
            state,
            bufs: (0..RECV_BATCH).map(|_| vec![0u8; buf_len]).collect(),
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

    /// Receives what is ready (without waiting) and hands each datagram to `f`. Returns the
    /// number of datagrams, 0 when nothing was ready.
    pub fn try_recv(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> =
            self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let state = &self.state;
        let metas = &mut self.metas;
        let n = match state.recv((&self.socket).into(), &mut slices, metas) {
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
    /// copied on the way. Waits for room when the socket is full (up to [`SEND_WAIT`]).
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
        let err = match send_waiting(&self.socket, dst, size, &self.batch) {
            Ok(()) => return,
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
            if let Err(e) = send_waiting(&self.socket, dst, d.len(), std::slice::from_ref(d)) {
                tracing::debug!(error = %e, dst = %dst, "UDP send failed");
            }
        }
    }
}

/// [`send_gso`], waiting for room in a full socket up to [`SEND_WAIT`]; past that the
/// datagrams are dropped (as a full link would drop them), with a warning.
fn send_waiting(
    socket: &UdpSocket,
    dst: SocketAddr,
    size: usize,
    datagrams: &[Vec<u8>],
) -> io::Result<()> {
    loop {
        match send_gso(socket, dst, size, datagrams) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_writable(socket, SEND_WAIT) {
                    tracing::warn!(dst = %dst, datagrams = datagrams.len(), "UDP socket full for {SEND_WAIT:?}; datagrams dropped");
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

/// One `sendmsg` of `datagrams` (each `size` bytes but possibly the last) to `dst`, with
/// UDP_SEGMENT when there is more than one.
fn send_gso(
    socket: &UdpSocket,
    dst: SocketAddr,
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
    let addr = SockaddrStorage::from(dst);
    sendmsg(
        socket.as_raw_fd(),
        &iov[..n],
        cmsgs,
        MsgFlags::empty(),
        Some(&addr),
    )?;
    Ok(())
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
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            if !wait_readable(udp.socket(), Duration::from_millis(100)) {
                continue;
            }
            udp.try_recv(|from, d| got.push((from, d.to_vec())))
                .unwrap();
        }
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
}
