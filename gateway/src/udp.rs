//! The gateway's UDP socket, batched: `recvmmsg` with GRO on receive (one system call can
//! bring many datagrams, coalesced by the kernel), GSO on send (consecutive equal-size
//! datagrams to one peer leave in one system call). Falls back to one datagram per call
//! where the kernel lacks either.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit as UdpTransmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::core::Transmit;

/// Messages per `recvmmsg`.
const RECV_BATCH: usize = 16;
/// Largest GSO send: the kernel's limit on one UDP send.
const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffers asked for, each way (wireguard-go asks for the same). The kernel's
/// default (about 208 KiB) holds three GSO bursts: a receiver a moment behind drops
/// datagrams, and every drop is a TCP loss inside the tunnel.
pub const SOCKET_BUFFER: usize = 7 << 20;

pub struct BatchedUdp {
    socket: UdpSocket,
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
    gso: Vec<u8>,
}

impl BatchedUdp {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        size_buffers(&socket, SOCKET_BUFFER);
        let state = UdpSocketState::new((&socket).into())?;
        let buf_len = (state.gro_segments() * 1600).max(65_536);
        Ok(Self {
            socket,
            state,
            bufs: (0..RECV_BATCH).map(|_| vec![0u8; buf_len]).collect(),
            metas: vec![RecvMeta::default(); RECV_BATCH],
            gso: Vec::with_capacity(MAX_GSO_BYTES),
        })
    }

    /// The socket's receive and send buffers, in bytes, as the kernel reports them.
    pub fn buffer_sizes(&self) -> io::Result<(usize, usize)> {
        use nix::sys::socket::{getsockopt, sockopt};
        Ok((
            getsockopt(&self.socket, sockopt::RcvBuf)?,
            getsockopt(&self.socket, sockopt::SndBuf)?,
        ))
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Receives what is ready (without waiting) and hands each datagram to `f`. Returns the
    /// number of datagrams, 0 when nothing was ready.
    pub fn try_recv(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> =
            self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let state = &self.state;
        let metas = &mut self.metas;
        let n = match self.socket.try_io(Interest::READABLE, || {
            state.recv((&self.socket).into(), &mut slices, metas)
        }) {
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
    /// sends. Waits for room when the socket is full. Each payload goes to `spent` once
    /// copied out, for reuse.
    pub async fn send_all(&mut self, queue: &mut VecDeque<Transmit>, spent: &mut Vec<Vec<u8>>) {
        let max_segments = self.state.max_gso_segments().max(1);
        while let Some(first) = queue.pop_front() {
            let size = first.payload.len();
            self.gso.clear();
            self.gso.extend_from_slice(&first.payload);
            let mut segments = 1;
            while segments < max_segments && self.gso.len() + size <= MAX_GSO_BYTES {
                match queue.front() {
                    Some(next) if next.dst == first.dst && next.payload.len() == size => {
                        if let Some(next) = queue.pop_front() {
                            self.gso.extend_from_slice(&next.payload);
                            spent.push(next.payload);
                            segments += 1;
                        }
                    }
                    _ => break,
                }
            }
            spent.push(first.payload);
            let transmit = UdpTransmit {
                destination: first.dst,
                ecn: None,
                contents: &self.gso,
                segment_size: (segments > 1).then_some(size),
                src_ip: None,
            };
            loop {
                let state = &self.state;
                match self.socket.try_io(Interest::WRITABLE, || {
                    state.try_send((&self.socket).into(), &transmit)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, dst = %first.dst, "UDP send failed");
                        break;
                    }
                    Ok(()) => break,
                }
            }
        }
    }
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
    if let Ok(got) = nix::sys::socket::getsockopt(socket, sockopt::RcvBuf)
        && got < bytes
    {
        tracing::warn!(
            asked = bytes,
            got,
            "small UDP receive buffer: bursts may drop; raise net.core.rmem_max or run with CAP_NET_ADMIN"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffers are sized past the kernel's default. As root (CI) the forced size is
    /// granted whatever `rmem_max` says; the kernel reports twice the size asked for.
    #[tokio::test]
    async fn socket_buffers_are_sized_for_bursts() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp = BatchedUdp::new(socket).unwrap();
        let (rcv, snd) = udp.buffer_sizes().unwrap();
        assert!(rcv >= SOCKET_BUFFER, "receive buffer {rcv}");
        assert!(snd >= SOCKET_BUFFER, "send buffer {snd}");
    }
}
