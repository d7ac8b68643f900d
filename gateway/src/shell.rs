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
use clusterlink_api::proto::broker_client::BrokerClient;
use clusterlink_api::{
    ClusterId, ConnectionStatus, GatewayEndpoint, GatewayRole, Kind, NodeName, Record, proto,
};
use clusterlink_broker::client::{ClientError, Credentials, connect_with};
use clusterlink_broker::follow::{ClusterSet, follow};
use futures::{StreamExt, TryStreamExt};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
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
    /// The longest the data plane polls for the next packet before it sleeps (zero: never);
    /// see [`crate::busy_poll`].
    pub busy_poll: Duration,
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

/// Status records written to the broker at once (each is one round trip).
const STATUS_PUTS_IN_FLIGHT: usize = 16;

fn put_request(lease_id: i64, record: Record) -> proto::PublishRequest {
    proto::PublishRequest {
        record: Some(record.into()),
        lease_id,
        expected_revision: 0,
        create_only: false,
    }
}

/// The broker calls made under a lease: a trait, so that a test can make them slow.
pub(crate) trait LeaseCalls: Clone + Send {
    fn keep_alive(&mut self, lease_id: i64) -> impl Future<Output = Result<(), String>> + Send;
    fn publish(
        &mut self,
        request: proto::PublishRequest,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn withdraw(
        &mut self,
        request: proto::WithdrawRequest,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

impl LeaseCalls for BrokerClient<Channel> {
    async fn keep_alive(&mut self, lease_id: i64) -> Result<(), String> {
        BrokerClient::keep_alive(self, proto::KeepAliveRequest { lease_id })
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_owned())
    }
    async fn publish(&mut self, request: proto::PublishRequest) -> Result<(), String> {
        BrokerClient::publish(self, request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_owned())
    }
    async fn withdraw(&mut self, request: proto::WithdrawRequest) -> Result<(), String> {
        BrokerClient::withdraw(self, request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_owned())
    }
}

/// Holds a granted lease: renews it four times per TTL (three renewals may be lost before it
/// lapses) and republishes the endpoint when the election changes its role; beside that, and
/// never in its way, publishes the tunnels' status under the same lease. A status snapshot
/// is one put per tunnel, each a round trip to the broker: done in line with the renewals,
/// a large mesh or a distant broker held them up past the TTL, the lease lapsed and another
/// gateway took the role. Returns `Ok` when the gateway shuts down, `Err` when a call fails
/// (the caller reconnects; status records are then all published again under a new lease).
async fn hold<C: LeaseCalls>(
    client: C,
    lease_id: i64,
    ttl: Duration,
    endpoint: &mut GatewayEndpoint,
    view: &mut watch::Receiver<Option<ClusterSet>>,
    status: &mut watch::Receiver<Vec<PeerStatus>>,
) -> Result<(), String> {
    let (from_cluster, from_node) = (endpoint.cluster.clone(), endpoint.node.clone());
    let mut lease_client = client.clone();
    let lease = async {
        let mut keepalive = tokio::time::interval((ttl / 4).max(Duration::from_millis(50)));
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = keepalive.tick() => lease_client.keep_alive(lease_id).await?,
                changed = view.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let role = view.borrow_and_update().as_ref().map(|set| {
                        decide_role(&endpoint.cluster, &endpoint.node, &endpoint.public_key, endpoint.role, &set.gateways)
                    });
                    if let Some(role) = role.filter(|r| *r != endpoint.role) {
                        info!(from = ?endpoint.role, to = ?role, "gateway role changed");
                        endpoint.role = role;
                        LeaseCalls::publish(&mut lease_client, put_request(lease_id, Record::Gateway(endpoint.clone()))).await?;
                    }
                }
            }
        }
    };
    let mut status_client = client;
    let statuses = async {
        let mut schedule = StatusSchedule::new(STATUS_REFRESH);
        loop {
            if status.changed().await.is_err() {
                return Ok(());
            }
            let snapshot = status.borrow_and_update().clone();
            let plan = schedule.plan(&snapshot, Instant::now());
            let now = SystemTime::now();
            let puts = plan.publish.into_iter().map(|s| {
                let record = Record::Connection(ConnectionStatus {
                    from_cluster: from_cluster.clone(),
                    from_node: from_node.clone(),
                    to_cluster: s.cluster,
                    to_node: s.node,
                    state: s.state,
                    rtt_micros: s.rtt.map(|r| r.as_micros() as u64).unwrap_or(0),
                    last_handshake_unix_ms: s
                        .since_handshake
                        .map(|d| unix_ms(now - d))
                        .unwrap_or(0),
                    tx_bytes: s.tx_bytes,
                    rx_bytes: s.rx_bytes,
                });
                let mut c = status_client.clone();
                async move { LeaseCalls::publish(&mut c, put_request(lease_id, record)).await }
            });
            futures::stream::iter(puts)
                .buffer_unordered(STATUS_PUTS_IN_FLIGHT)
                .try_for_each(|()| async { Ok(()) })
                .await?;
            // A peer that left (its endpoint lapsed, its cluster was revoked) must not stay
            // "connected" in the broker: withdraw its status.
            for (to_cluster, to_node) in plan.withdraw {
                status_client
                    .withdraw(proto::WithdrawRequest {
                        kind: proto::Kind::Connections as i32,
                        name: format!("{from_node}/{to_cluster}/{to_node}"),
                    })
                    .await?;
            }
        }
    };
    tokio::select! {
        r = lease => r,
        r = statuses => r,
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
            LeaseCalls::publish(&mut client, put_request(lease.lease_id, Record::Gateway(endpoint.clone())))
                .await?;
            info!(role = ?endpoint.role, lease_ms = granted.as_millis() as u64, "gateway endpoint published");
            backoff = Duration::from_millis(200);
            view.mark_changed();
            hold(client, lease.lease_id, granted, &mut endpoint, &mut view, &mut status).await
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clusterlink_api::ConnectionState;

    use super::*;

    /// A broker whose every put takes `put_takes` (a distant broker); it notes when each
    /// renewal came and how many status records were written.
    #[derive(Clone)]
    struct SlowBroker {
        put_takes: Duration,
        renewals: Arc<Mutex<Vec<tokio::time::Instant>>>,
        statuses: Arc<Mutex<usize>>,
    }

    impl LeaseCalls for SlowBroker {
        async fn keep_alive(&mut self, _: i64) -> Result<(), String> {
            self.renewals
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            Ok(())
        }
        async fn publish(&mut self, request: proto::PublishRequest) -> Result<(), String> {
            tokio::time::sleep(self.put_takes).await;
            let record = Record::try_from(request.record.unwrap()).unwrap();
            if matches!(record, Record::Connection(_)) {
                *self.statuses.lock().unwrap() += 1;
            }
            Ok(())
        }
        async fn withdraw(&mut self, _: proto::WithdrawRequest) -> Result<(), String> {
            Ok(())
        }
    }

    fn tunnel(i: usize) -> PeerStatus {
        PeerStatus {
            cluster: format!("c{i}").parse().unwrap(),
            node: "gw-0".parse().unwrap(),
            state: ConnectionState::Connected,
            rtt: Some(Duration::from_micros(150)),
            since_handshake: Some(Duration::from_secs(1)),
            endpoint: None,
            tx_bytes: 1,
            rx_bytes: 1,
        }
    }

    /// 40 tunnels' status, each put taking 100 ms, under a lease of 800 ms (renewed every
    /// 200 ms): one put after another would hold the renewals up for 4 s and the lease
    /// would lapse. The renewals keep their pace while the puts go on, and the puts go
    /// several at a time. Virtual time (tokio's paused clock): nothing really waits.
    #[tokio::test(start_paused = true)]
    async fn status_puts_never_hold_up_the_lease_renewals() {
        let broker = SlowBroker {
            put_takes: Duration::from_millis(100),
            renewals: Arc::default(),
            statuses: Arc::default(),
        };
        let mut endpoint = GatewayEndpoint {
            cluster: "a".parse().unwrap(),
            node: "gw-0".parse().unwrap(),
            public_key: [7; 32],
            private_addr: "192.0.2.1".parse().unwrap(),
            public_addr: None,
            port: 51820,
            role: GatewayRole::Active,
            generation: 1,
        };
        let (_view_tx, mut view) = watch::channel::<Option<ClusterSet>>(None);
        let (status_tx, mut status) = watch::channel::<Vec<PeerStatus>>(Vec::new());
        status_tx.send((0..40).map(tunnel).collect()).unwrap();
        let ttl = Duration::from_millis(800);
        let start = tokio::time::Instant::now();
        let held = tokio::time::timeout(
            Duration::from_secs(2),
            hold(
                broker.clone(),
                1,
                ttl,
                &mut endpoint,
                &mut view,
                &mut status,
            ),
        )
        .await;
        assert!(held.is_err(), "hold returned early: {held:?}");

        let renewals = broker.renewals.lock().unwrap().clone();
        let mut at = start;
        for r in &renewals {
            assert!(
                *r - at <= ttl / 4 + Duration::from_millis(1),
                "a renewal waited {:?} (renewals at {:?})",
                *r - at,
                renewals.iter().map(|r| *r - start).collect::<Vec<_>>()
            );
            at = *r;
        }
        assert!(renewals.len() >= 9, "{} renewals in 2 s", renewals.len());
        // Every tunnel's status was written, 16 at a time: 300 ms, not 4 s.
        assert_eq!(*broker.statuses.lock().unwrap(), 40);
    }
}
