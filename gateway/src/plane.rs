//! The data plane: the TUN device, the UDP socket and the core's timers around
//! [`GatewayCore`], in one epoll loop on a thread of its own.
//!
//! No async runtime: the thread that waits in `epoll_wait` is the one that handles the
//! packet, and one wake-up costs one `epoll_wait` and no futures, wakers or timer wheel.
//! Each wake-up takes at most one TUN read and one `recvmmsg`, and sends what they brought
//! on before it waits again, so the peer decrypts while this side encrypts more
//! (BENCHMARKS.md, "The pipeline"). The descriptors are level-triggered: what is still
//! waiting is reported again by the next `epoll_wait`, at once, and an idle plane goes back
//! to sleep without a read that fails with `EAGAIN`.
//!
//! The core's deadline is a timerfd in the same epoll set, armed only when the deadline
//! comes earlier than the one armed (a later one is re-armed when the earlier fires), and
//! `epoll_wait` has no timeout of its own: a wake-up by a packet starts and cancels no
//! kernel timer (in a VM, each is a trap to the hypervisor).
//!
//! Before it sleeps, the plane polls the epoll set (yielding the CPU between polls) for an
//! adaptive window ([`BusyPoll`]): a reply that comes back soon after its request is picked
//! up without a wake-up.
//!
//! The rest of the gateway (broker follower, publisher) runs on tokio and talks to the
//! plane through watch channels, with an eventfd ([`Wake`]) to wake it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::{GatewayConfig, GatewayError};
use crate::udp::{BatchedUdp, Source};
use clusterlink_gateway_core::busy_poll::BusyPoll;
use clusterlink_gateway_core::core::{GatewayCore, PeerSpec, PeerStatus};
use clusterlink_gateway_core::wg::MAX_DATAGRAM;

/// Room in front of each packet written to the TUN device (its virtio-net header).
pub const TUN_HEADROOM: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// How often the tunnels' status goes to the publisher.
const STATUS_EVERY: Duration = Duration::from_millis(500);

const TUN: u64 = 0;
const UDP: u64 = 1;
const WAKE: u64 = 2;
const TIMER: u64 = 3;
/// Peer sockets are registered under this plus their token.
const PEER: u64 = 16;

/// Wakes the data plane so it looks at its channels (new peers, stop).
pub struct Wake(EventFd);

impl Wake {
    pub fn new() -> io::Result<Self> {
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map(Self)
            .map_err(io::Error::from)
    }

    pub fn poke(&self) {
        // Fails only when the counter is full, and then the plane is awake anyway.
        let _ = self.0.write(1);
    }

    fn clear(&self) {
        let _ = self.0.read();
    }
}

/// What the data plane hears from, and tells, the rest of the gateway.
pub struct Control {
    pub peers: watch::Receiver<Option<Vec<PeerSpec>>>,
    pub status: watch::Sender<Vec<PeerStatus>>,
    pub stop: watch::Receiver<bool>,
    pub wake: Arc<Wake>,
}

/// The data plane's devices, made before it runs so that a failure is reported at start.
pub struct Plane {
    tun: tun_rs::SyncDevice,
    udp: BatchedUdp,
    epoll: Epoll,
    timer: TimerFd,
    busy_poll: Duration,
}

impl Plane {
    /// Makes the TUN device and the UDP socket, and the epoll set over them and `wake`.
    pub fn open(config: &GatewayConfig, wake: &Wake) -> Result<Self, GatewayError> {
        let tun_err = |source| GatewayError::Tun {
            name: config.tun_name.clone(),
            source,
        };
        let tun = tun_rs::DeviceBuilder::new()
            .name(&config.tun_name)
            .ipv4(config.tunnel_ip, 32u8, None)
            .mtu(config.mtu)
            // IFF_VNET_HDR with TSO: the kernel hands over TCP super-packets, split here.
            .offload(true)
            .build_sync()
            .map_err(tun_err)?;
        tun.set_nonblocking(true).map_err(tun_err)?;
        let udp_err = |source| GatewayError::Udp {
            port: config.listen_port,
            source,
        };
        let udp = BatchedUdp::bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            config.listen_port,
        ))
        .map_err(udp_err)?;
        let (epoll, timer) = (|| {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            let timer = TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )?;
            epoll.add(&tun, EpollEvent::new(EpollFlags::EPOLLIN, TUN))?;
            epoll.add(udp.socket(), EpollEvent::new(EpollFlags::EPOLLIN, UDP))?;
            epoll.add(&wake.0, EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
            epoll.add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER))?;
            Ok::<_, Errno>((epoll, timer))
        })()
        .map_err(|e| GatewayError::Runtime(e.into()))?;
        Ok(Self {
            tun,
            udp,
            epoll,
            timer,
            busy_poll: config.busy_poll,
        })
    }

    /// Runs until `stop` is set or the peers' sender goes away.
    pub fn run(mut self, mut core: GatewayCore, mut ctl: Control) {
        let mut busy = BusyPoll::new(self.busy_poll);
        core.set_tun_headroom(TUN_HEADROOM);
        let mut tun_raw = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
        let mut tun_segs: Vec<Vec<u8>> = (0..tun_rs::IDEAL_BATCH_SIZE)
            .map(|_| vec![0u8; MAX_DATAGRAM])
            .collect();
        let mut tun_sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
        let mut tun_out: Vec<Vec<u8>> = Vec::new();
        let mut gro = tun_rs::GROTable::default();
        let mut outgoing = std::collections::VecDeque::new();
        let mut spent: Vec<Vec<u8>> = Vec::new();
        let mut events = [EpollEvent::empty(); 64];
        let mut peer_ready: Vec<u64> = Vec::new();
        let mut endpoints_seen = None;
        let mut status_due = Instant::now();
        // When the timerfd fires, if armed.
        let mut armed: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let deadline = core
                .poll_timeout()
                .map_or(status_due, |d| d.min(status_due));
            let timeout = if deadline <= now {
                EpollTimeout::ZERO
            } else {
                if armed.is_none_or(|at| deadline < at) {
                    let after = TimeSpec::from_duration(deadline - now);
                    match self
                        .timer
                        .set(Expiration::OneShot(after), TimerSetTimeFlags::empty())
                    {
                        Ok(()) => armed = Some(deadline),
                        Err(e) => warn!(error = %e, "cannot arm the data plane's timer"),
                    }
                }
                // Without an armed timer (it failed), the deadline bounds the wait instead.
                armed.map_or_else(|| timeout_until(deadline, now), |_| EpollTimeout::NONE)
            };
            // Poll for the window first, yielding the CPU to anything runnable, then sleep.
            // A deadline already due is not kept waiting for the window.
            let poll_until = if deadline <= now {
                now
            } else {
                now + busy.window()
            };
            let n = loop {
                // No clock read when there is no window to poll in.
                let polling = poll_until > now && Instant::now() < poll_until;
                let t = if polling { EpollTimeout::ZERO } else { timeout };
                match self.epoll.wait(&mut events, t) {
                    Ok(0) if polling => {
                        let _ = nix::sched::sched_yield();
                    }
                    Ok(n) => break n,
                    Err(Errno::EINTR) => break 0,
                    Err(e) => {
                        warn!(error = %e, "epoll_wait failed; the data plane stops");
                        return;
                    }
                }
            };
            if n > 0 {
                busy.idle_ended(Instant::now().saturating_duration_since(now));
            }
            let (mut tun_ready, mut udp_ready) = (false, false);
            for event in &events[..n] {
                match event.data() {
                    TUN => tun_ready = true,
                    UDP => udp_ready = true,
                    TIMER => {
                        // Clears the expiry count; what is due is decided by the clock below.
                        let _ = nix::unistd::read(&self.timer, &mut [0u8; 8]);
                        armed = None;
                    }
                    WAKE => ctl.wake.clear(),
                    // Readable, or an ICMP error to report (EPOLLERR): read either way, or
                    // a level-triggered error would wake the loop forever.
                    token => peer_ready.push(token - PEER),
                }
            }
            // The channels are read on every wake-up (two atomic loads); the eventfd only
            // makes sure there is one soon after a change.
            if *ctl.stop.borrow() {
                return;
            }
            match ctl.peers.has_changed() {
                Ok(false) => {}
                Ok(true) => {
                    let specs = ctl.peers.borrow_and_update().clone();
                    if let Some(specs) = specs {
                        core.set_peers(specs, Instant::now());
                    }
                }
                Err(_) => return,
            }
            let now = Instant::now();
            if tun_ready {
                match self
                    .tun
                    .recv_multiple(&mut tun_raw, &mut tun_segs, &mut tun_sizes, 0)
                {
                    Ok(n) => {
                        for i in 0..n {
                            core.handle_tun_packet(&tun_segs[i][..tun_sizes[i]], now);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    // The device is gone or broken: level-triggered, it would be reported
                    // ready again at once, so stop rather than spin; the gateway exits and
                    // its supervisor restarts it with a new device.
                    Err(e) => {
                        warn!(error = %e, tun = %self.tun.name().unwrap_or_default(), "TUN read failed; the data plane stops");
                        return;
                    }
                }
            }
            if udp_ready
                && let Err(e) = self
                    .udp
                    .try_recv(|from, d| core.handle_datagram(from, d, now))
            {
                debug!(error = %e, "UDP receive failed");
            }
            for token in peer_ready.drain(..) {
                if let Err(e) = self.udp.try_recv_on(Source::Peer(token), |from, d| {
                    core.handle_datagram(from, d, now)
                }) {
                    debug!(error = %e, "UDP receive failed");
                }
            }
            if core.poll_timeout().is_some_and(|d| d <= now) {
                core.handle_timeout(now);
            }
            // Each peer whose endpoint is known gets a connected socket, before anything is
            // sent to it.
            if endpoints_seen != Some(core.endpoints_generation()) {
                endpoints_seen = Some(core.endpoints_generation());
                for token in self.udp.connect_peers(core.endpoints()) {
                    if let Some(socket) = self.udp.peer_socket(token)
                        && let Err(e) = self
                            .epoll
                            .add(socket, EpollEvent::new(EpollFlags::EPOLLIN, PEER + token))
                    {
                        warn!(error = %e, "cannot wait on a peer socket; its peer uses the shared one");
                        self.udp.forget_peer(token);
                    }
                }
            }
            core.drain_transmits(&mut outgoing);
            self.udp.send_all(&mut outgoing, &mut spent);
            for b in spent.drain(..) {
                core.recycle(b);
            }
            // Decrypted packets go to the TUN device together, so TCP segments can be
            // coalesced (GRO) into fewer writes; each has room in front for the virtio header.
            while let Some(p) = core.poll_tun() {
                tun_out.push(p);
            }
            if !tun_out.is_empty()
                && let Err(e) = self.tun.send_multiple(&mut gro, &mut tun_out, TUN_HEADROOM)
            {
                debug!(error = %e, "TUN write failed");
            }
            for b in tun_out.drain(..) {
                core.recycle(b);
            }
            if now >= status_due {
                status_due = now + STATUS_EVERY;
                let _ = ctl.status.send(core.status(now));
            }
        }
    }
}

/// `epoll_wait`'s timeout for `deadline`, rounded up to whole milliseconds: waking before
/// the deadline would only mean waiting again.
fn timeout_until(deadline: Instant, now: Instant) -> EpollTimeout {
    let ms = deadline
        .saturating_duration_since(now)
        .as_micros()
        .div_ceil(1000);
    EpollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_the_millisecond() {
        let now = Instant::now();
        let ms = |d: EpollTimeout| i32::from(d);
        assert_eq!(ms(timeout_until(now, now)), 0);
        assert_eq!(ms(timeout_until(now - Duration::from_secs(1), now)), 0);
        assert_eq!(ms(timeout_until(now + Duration::from_micros(1), now)), 1);
        assert_eq!(
            ms(timeout_until(now + Duration::from_micros(2_001), now)),
            3
        );
        assert_eq!(
            ms(timeout_until(now + Duration::from_secs(500), now)),
            65_535
        );
    }
}
