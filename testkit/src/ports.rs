//! Loopback ports for servers a test starts, with no race between choosing a port and the
//! child binding it.
//!
//! A port from the kernel (`bind :0`, then let go) can be taken by anything before the child
//! binds it: another test's server, or the local port of any outgoing connection. A
//! [`PortLease`] closes both holes:
//! - it picks from below the kernel's ephemeral range (`ip_local_port_range`), so no
//!   outgoing connection is ever given the port;
//! - it holds an exclusive lock on a per-port file in the temporary directory for as long as
//!   the lease lives, so no other lease, in this process or any other, hands the port out
//!   again while the server that was given it may still be starting or running.

use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

/// A loopback port reserved for one server until dropped.
pub struct PortLease {
    port: u16,
    _lock: Flock<File>,
}

impl std::fmt::Debug for PortLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortLease({})", self.port)
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("clusterlink-testkit-ports")
}

/// The ports leases come from: 12,000 ports just below the ephemeral range.
fn range() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let end = ephemeral_start.max(4096);
    (end.saturating_sub(12_000).max(1025), end)
}

impl PortLease {
    /// Reserves a free loopback TCP port.
    pub fn new() -> std::io::Result<Self> {
        let (lo, hi) = range();
        let span = u64::from(hi - lo);
        let start = RandomState::new().hash_one(std::process::id()) % span;
        for i in 0..span {
            let port = lo + u16::try_from((start + i) % span).unwrap_or(0);
            if let Some(lease) = Self::try_port(port)? {
                return Ok(lease);
            }
        }
        Err(std::io::Error::other(format!(
            "no free port in {lo}..{hi}: every one is leased or bound"
        )))
    }

    /// Reserves `port` if no other lease holds it and nothing is bound to it now.
    pub fn try_port(port: u16) -> std::io::Result<Option<Self>> {
        let dir = lock_dir();
        std::fs::create_dir_all(&dir)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err(_) => return Ok(None),
        };
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Ok(None);
        }
        Ok(Some(Self { port, _lock: lock }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn a_leased_port_is_not_handed_out_again_until_dropped() {
        let lease = PortLease::new().unwrap();
        let port = lease.port();
        assert!(PortLease::try_port(port).unwrap().is_none());
        drop(lease);
        assert!(PortLease::try_port(port).unwrap().is_some());
    }

    #[test]
    fn a_bound_port_is_not_leased() {
        let (lo, hi) = range();
        let listener = (lo..hi)
            .find_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(PortLease::try_port(port).unwrap().is_none());
    }

    #[test]
    fn leases_held_at_once_are_distinct_and_below_the_ephemeral_range() {
        let leases: Vec<PortLease> = (0..50).map(|_| PortLease::new().unwrap()).collect();
        let ports: BTreeSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(ports.len(), 50);
        let (lo, hi) = range();
        assert!(ports.iter().all(|p| (lo..hi).contains(p)), "{ports:?}");
    }
}
