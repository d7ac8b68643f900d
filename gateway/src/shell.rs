//! `clusterlink gateway run`: the I/O around [`crate::core::GatewayCore`].
//!
//! Three parts: the data plane (owns the core; TUN device, UDP socket, timers; an epoll loop
//! on its own thread, [`crate::plane`]), and two tokio tasks: the broker
//! follower (list+watch of clusters and gateways, turned into peers), and the publisher
//! (this gateway's endpoint under a lease, and its tunnels' status). The data plane never
//! waits on the broker: through a broker outage it keeps the last peers it had.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use clusterlink_api::{
    ClusterId, ConnectionStatus, GatewayEndpoint, GatewayRole, Kind, NodeName, Record, proto,
};
use clusterlink_broker::client::{ClientError, Credentials, connect_with};
use clusterlink_broker::follow::{ClusterSet, follow};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::core::{GatewayCore, PeerSpec, PeerStatus};
use crate::election::decide_role;
use crate::plane::{Control, Plane, Wake};
use crate::status::{STATUS_REFRESH, StatusSchedule};
use crate::view::peer_specs;
use crate::wg::StaticSecret;

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
    Broker(#[from] ClientError),
    #[error("cannot start the data plane's thread: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(
        "the data plane stopped on an error (logged above); the gateway exits so that its supervisor restarts it"
    )]
    PlaneStopped,
    #[error(
        "the credentials name no cluster (identity {0:?}); use the file `clusterlink join` wrote"
    )]
    NotACluster(String),
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub credentials: Credentials,
    pub node: NodeName,
    pub listen_port: u16,
    /// The node's underlay address, offered to peers.
    pub private_addr: IpAddr,
    pub key_file: PathBuf,
    pub tun_name: String,
    /// This gateway's address on the TUN device (inside its cluster's pod CIDR).
    pub tunnel_ip: Ipv4Addr,
    pub mtu: u16,
    /// TTL of the lease this gateway's endpoint is published under. When the active
    /// gateway dies, a passive one takes over once it has expired: this bounds failover.
    pub lease: Duration,
}

/// Loads the WireGuard key, or makes one (mode 0600). The private key never leaves the node.
pub fn load_or_create_key(path: &Path) -> Result<StaticSecret, GatewayError> {
    let kerr = |reason: String| GatewayError::Key {
        path: path.to_owned(),
        reason,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    match std::fs::read_to_string(path) {
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
            clusterlink_broker::client::write_file(path, &b64.encode(bytes), 0o600)
                .map_err(|e| kerr(e.to_string()))?;
            Ok(secret)
        }
        Err(e) => Err(kerr(e.to_string())),
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError> {
    let cluster: ClusterId = config
        .credentials
        .identity
        .parse()
        .map_err(|_| GatewayError::NotACluster(config.credentials.identity.clone()))?;
    let secret = load_or_create_key(&config.key_file)?;
    let core = GatewayCore::new(secret);
    let public_key = core.public_key();
    raise_open_files_limit();

    let (peers_tx, peers_rx) = watch::channel::<Option<Vec<PeerSpec>>>(None);
    let (status_tx, status_rx) = watch::channel::<Vec<PeerStatus>>(Vec::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let wake = Arc::new(Wake::new().map_err(GatewayError::Runtime)?);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), GatewayError>>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    // The data plane is an epoll loop on an OS thread of its own (crate::plane).
    let plane = {
        let config = config.clone();
        let ctl = Control {
            peers: peers_rx,
            status: status_tx,
            stop: stop_rx,
            wake: wake.clone(),
        };
        std::thread::Builder::new()
            .name("clusterlink-data".into())
            .spawn(move || {
                match Plane::open(&config, &ctl.wake) {
                    Ok(plane) => {
                        let _ = ready_tx.send(Ok(()));
                        plane.run(core, ctl);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
                let _ = done_tx.send(());
            })
            .map_err(GatewayError::Runtime)?
    };
    match ready_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(GatewayError::Runtime(std::io::Error::other(
                "the data plane thread ended before it started",
            )));
        }
    }
    info!(%cluster, node = %config.node, port = config.listen_port, tun = %config.tun_name, "gateway up");

    let view = follow(
        config.credentials.clone(),
        &[Kind::Clusters, Kind::Gateways],
    );
    let follower = tokio::spawn(follow_broker(
        view.clone(),
        cluster.clone(),
        peers_tx,
        wake.clone(),
    ));
    let endpoint = GatewayEndpoint {
        cluster: cluster.clone(),
        node: config.node.clone(),
        public_key,
        private_addr: config.private_addr,
        public_addr: None,
        port: config.listen_port,
        // Every gateway starts passive; the election makes one active.
        role: GatewayRole::Passive,
        generation: unix_ms(SystemTime::now()) as u64,
    };
    let publisher = tokio::spawn(publish(
        config.credentials.clone(),
        endpoint,
        config.lease,
        view,
        status_rx,
    ));

    tokio::pin!(shutdown);
    let plane_failed = tokio::select! {
        _ = &mut shutdown => false,
        _ = done_rx => {
            warn!("the data plane stopped");
            true
        }
    };
    info!("gateway stopping");
    publisher.abort();
    // Hand over now rather than when the lease lapses: withdraw this endpoint first, while
    // the data plane still carries what is in flight, then stop it.
    let withdraw = async {
        let mut client = connect_with(&config.credentials).await.ok()?;
        client
            .withdraw(proto::WithdrawRequest {
                kind: proto::Kind::Gateways as i32,
                name: config.node.to_string(),
            })
            .await
            .ok()
    };
    match tokio::time::timeout(Duration::from_secs(1), withdraw).await {
        Ok(Some(_)) => info!("endpoint withdrawn"),
        _ => warn!("could not withdraw the endpoint; it lapses with its lease"),
    }
    let _ = stop_tx.send(true);
    wake.poke();
    let _ = tokio::task::spawn_blocking(move || plane.join()).await;
    follower.abort();
    if plane_failed {
        return Err(GatewayError::PlaneStopped);
    }
    Ok(())
}

/// Turns the broker's view into peers, for as long as the data plane listens.
async fn follow_broker(
    mut set: watch::Receiver<Option<ClusterSet>>,
    local: ClusterId,
    out: watch::Sender<Option<Vec<PeerSpec>>>,
    wake: Arc<Wake>,
) {
    while set.changed().await.is_ok() {
        let specs = set
            .borrow_and_update()
            .as_ref()
            .map(|s| peer_specs(&local, &s.clusters, &s.gateways));
        if specs.is_some() {
            if out.send(specs).is_err() {
                return;
            }
            wake.poke();
        }
    }
}

/// Keeps this gateway's endpoint published under a lease, holds the election for its role,
/// and publishes tunnel status.
async fn publish(
    creds: Credentials,
    mut endpoint: GatewayEndpoint,
    ttl: Duration,
    mut view: watch::Receiver<Option<ClusterSet>>,
    mut status: watch::Receiver<Vec<PeerStatus>>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let result: Result<(), String> = async {
            let mut client = connect_with(&creds).await.map_err(|e| e.to_string())?;
            let lease = client
                .grant_lease(proto::GrantLeaseRequest {
                    ttl_seconds: 0,
                    ttl_millis: ttl.as_millis().try_into().unwrap_or(u32::MAX),
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
            let granted = Duration::from_millis(u64::from(lease.ttl_millis));
            let put = |record: Record| proto::PublishRequest {
                record: Some(record.into()),
                lease_id: lease.lease_id,
                expected_revision: 0,
                create_only: false,
            };
            client
                .publish(put(Record::Gateway(endpoint.clone())))
                .await
                .map_err(|s| s.message().to_owned())?;
            info!(role = ?endpoint.role, lease_ms = granted.as_millis() as u64, "gateway endpoint published");
            backoff = Duration::from_millis(200);
            // Four renewals per TTL: three may be lost before the lease lapses.
            let mut keepalive = tokio::time::interval((granted / 4).max(Duration::from_millis(50)));
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            view.mark_changed();
            // Status records are published under this connection's lease: a new connection
            // publishes them all again.
            let mut schedule = StatusSchedule::new(STATUS_REFRESH);
            loop {
                tokio::select! {
                    _ = keepalive.tick() => {
                        client
                            .keep_alive(proto::KeepAliveRequest { lease_id: lease.lease_id })
                            .await
                            .map_err(|s| s.message().to_owned())?;
                    }
                    changed = view.changed() => {
                        if changed.is_err() { return Ok(()); }
                        let role = view.borrow_and_update().as_ref().map(|set| {
                            decide_role(&endpoint.cluster, &endpoint.node, &endpoint.public_key, endpoint.role, &set.gateways)
                        });
                        if let Some(role) = role.filter(|r| *r != endpoint.role) {
                            info!(from = ?endpoint.role, to = ?role, "gateway role changed");
                            endpoint.role = role;
                            client
                                .publish(put(Record::Gateway(endpoint.clone())))
                                .await
                                .map_err(|s| s.message().to_owned())?;
                        }
                    }
                    changed = status.changed() => {
                        if changed.is_err() { return Ok(()); }
                        let snapshot = status.borrow_and_update().clone();
                        let plan = schedule.plan(&snapshot, Instant::now());
                        let now = SystemTime::now();
                        for s in plan.publish {
                            let record = Record::Connection(ConnectionStatus {
                                from_cluster: endpoint.cluster.clone(),
                                from_node: endpoint.node.clone(),
                                to_cluster: s.cluster,
                                to_node: s.node,
                                state: s.state,
                                rtt_micros: s.rtt.map(|r| r.as_micros() as u64).unwrap_or(0),
                                last_handshake_unix_ms: s.since_handshake.map(|d| unix_ms(now - d)).unwrap_or(0),
                                tx_bytes: s.tx_bytes,
                                rx_bytes: s.rx_bytes,
                            });
                            client.publish(put(record)).await.map_err(|s| s.message().to_owned())?;
                        }
                        // A peer that left (its endpoint lapsed, its cluster was revoked) must
                        // not stay "connected" in the broker: withdraw its status.
                        for (to_cluster, to_node) in plan.withdraw {
                            client
                                .withdraw(proto::WithdrawRequest {
                                    kind: proto::Kind::Connections as i32,
                                    name: format!("{}/{to_cluster}/{to_node}", endpoint.node),
                                })
                                .await
                                .map_err(|s| s.message().to_owned())?;
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            // The role is republished as held: if another node took over meanwhile, the
            // election's tie-break settles it without a gap in between.
            warn!(error = %e, "broker unreachable; tunnels keep running, retrying");
            tokio::time::sleep(backoff).await;
            // Back within half a TTL of the broker's return, before the endpoint lapses.
            backoff = (backoff * 2).min(ttl / 2).max(Duration::from_millis(100));
        }
    }
}
