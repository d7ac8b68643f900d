//! The gateway's configuration and errors, its WireGuard key file and its open-files limit:
//! what `run` needs before the data plane starts.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use clusterlink_api::NodeName;
use clusterlink_broker_client::{ConnectError, Identity, LiveCredentials};
use clusterlink_gateway_core::wg::StaticSecret;
use thiserror::Error;
use tracing::{debug, warn};

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot create TUN device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind UDP port {port}: {source} (the gateway needs the port to itself)")]
    Udp {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(#[from] ConnectError),
    #[error("cannot start the data plane's thread: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(
        "the data plane stopped on an error (logged above); the gateway exits so that its supervisor restarts it"
    )]
    PlaneStopped,
    #[error(
        "the credentials name no cluster (identity {0}); use the file `clusterlink join` wrote"
    )]
    NotACluster(Identity),
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub credentials: LiveCredentials,
    pub node: NodeName,
    pub listen_port: u16,
    /// The node's underlay address, offered to peers.
    pub private_addr: IpAddr,
    /// The address peers reach this gateway at, when not the private one (a NAT's).
    pub public_addr: Option<IpAddr>,
    pub key_file: PathBuf,
    pub tun_name: String,
    /// This gateway's address on the TUN device (inside its cluster's pod CIDR).
    pub tunnel_ip: Ipv4Addr,
    pub mtu: u16,
    /// TTL of the lease this gateway's endpoint is published under. When the active
    /// gateway dies, a passive one takes over once it has expired: this bounds failover.
    pub lease: Duration,
    /// The longest the data plane polls for the next packet before it sleeps (zero: never);
    /// see [`clusterlink_gateway_core::busy_poll`].
    pub busy_poll: Duration,
    /// Told when the gateway can carry traffic: its TUN device open and the cluster set
    /// received from the broker.
    pub ready: clusterlink_broker_client::Ready,
}

/// Loads the WireGuard key, or makes one (mode 0600). The private key never leaves the node.
pub fn load_or_create_key(path: &Path) -> Result<StaticSecret, GatewayError> {
    let kerr = |reason: String| GatewayError::Key {
        path: path.to_owned(),
        reason,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    match clusterlink_broker_client::fs::read_limited(path, 4096) {
        Ok(text) => {
            let bytes = b64
                .decode(text.trim())
                .map_err(|e| kerr(format!("not base64: {e}")))?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| kerr("not a 32-byte key".into()))?;
            Ok(StaticSecret::from(arr))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            let secret = StaticSecret::from(bytes);
            clusterlink_broker_client::fs::write_atomic(path, b64.encode(bytes).as_bytes(), 0o600)
                .map_err(|e| kerr(e.to_string()))?;
            Ok(secret)
        }
        Err(e) => Err(kerr(e.to_string())),
    }
}

/// Raises the soft limit on open files to the hard one, as Go programs (wireguard-go among
/// them) do at start: each peer has a socket of its own, and the usual soft limit of 1024
/// would send a large mesh's later peers to the shared socket. Returns the limit in force.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            debug!(from = soft, to = hard, "open files limit raised");
            Some(hard)
        }
        Err(e) => {
            warn!(error = %e, limit = soft, "cannot raise the open files limit; peers past it share one socket");
            Some(soft)
        }
    }
}
