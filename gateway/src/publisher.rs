//! The publisher: this gateway's endpoint under a broker lease (renewed, and republished
//! when the election changes its role), and its tunnels' status beside it.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use clusterlink_api::proto::broker_client::BrokerClient;
use clusterlink_api::{
    ClusterSet, ConnectionStatus, GatewayEndpoint, Kind, Record, RecordKey, proto, unix_ms,
};
use clusterlink_broker_client::{Backoff, ConnectError, LiveCredentials, connect_with};
use clusterlink_gateway_core::core::PeerStatus;
use clusterlink_gateway_core::election::decide_role;
use clusterlink_gateway_core::status::{STATUS_REFRESH, StatusSchedule};
use futures::{StreamExt, TryStreamExt};
use thiserror::Error;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

/// Why the publisher lost its lease (it then connects again and publishes anew).
#[derive(Debug, Error)]
pub enum PublishError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the broker refused to {call}: {}", .status.message())]
    Refused {
        call: &'static str,
        status: tonic::Status,
    },
}

fn refused(call: &'static str) -> impl FnOnce(tonic::Status) -> PublishError {
    move |status| PublishError::Refused { call, status }
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
    fn keep_alive(
        &mut self,
        lease_id: i64,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
    fn publish(
        &mut self,
        request: proto::PublishRequest,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
    fn withdraw(
        &mut self,
        request: proto::WithdrawRequest,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

impl LeaseCalls for BrokerClient<Channel> {
    async fn keep_alive(&mut self, lease_id: i64) -> Result<(), PublishError> {
        BrokerClient::keep_alive(self, proto::KeepAliveRequest { lease_id })
            .await
            .map(|_| ())
            .map_err(refused("renew the lease"))
    }
    async fn publish(&mut self, request: proto::PublishRequest) -> Result<(), PublishError> {
        BrokerClient::publish(self, request)
            .await
            .map(|_| ())
            .map_err(refused("publish"))
    }
    async fn withdraw(&mut self, request: proto::WithdrawRequest) -> Result<(), PublishError> {
        BrokerClient::withdraw(self, request)
            .await
            .map(|_| ())
            .map_err(refused("withdraw"))
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
) -> Result<(), PublishError> {
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
                    rtt_micros: s
                        .rtt
                        .map(|r| u64::try_from(r.as_micros()).unwrap_or(u64::MAX))
                        .unwrap_or(0),
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
                let key = RecordKey::Connection(
                    from_cluster.clone(),
                    from_node.clone(),
                    to_cluster,
                    to_node,
                );
                status_client
                    .withdraw(proto::WithdrawRequest {
                        kind: Kind::Connections.to_proto() as i32,
                        name: key.name(),
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
pub(crate) async fn publish(
    mut creds: LiveCredentials,
    mut endpoint: GatewayEndpoint,
    ttl: Duration,
    mut view: watch::Receiver<Option<ClusterSet>>,
    mut status: watch::Receiver<Vec<PeerStatus>>,
) {
    // Back within half a TTL of the broker's return, before the endpoint lapses.
    let mut backoff = Backoff::new(Duration::from_millis(100), ttl / 2);
    loop {
        let result: Result<(), PublishError> = async {
            let mut client = connect_with(&creds.current()).await?;
            let lease = client
                .grant_lease(proto::GrantLeaseRequest {
                    ttl_seconds: 0,
                    ttl_millis: ttl.as_millis().try_into().unwrap_or(u32::MAX),
                })
                .await
                .map_err(refused("grant a lease"))?
                .into_inner();
            let granted = Duration::from_millis(u64::from(lease.ttl_millis));
            LeaseCalls::publish(&mut client, put_request(lease.lease_id, Record::Gateway(endpoint.clone())))
                .await?;
            info!(role = ?endpoint.role, lease_ms = granted.as_millis() as u64, "gateway endpoint published");
            backoff.reset();
            view.mark_changed();
            // A renewed certificate: a new connection (and lease) with it, the endpoint
            // republished under the new lease before the old one lapses.
            tokio::select! {
                r = hold(client, lease.lease_id, granted, &mut endpoint, &mut view, &mut status) => r,
                _ = creds.changed() => {
                    info!("credentials changed; reconnecting with them");
                    Ok(())
                }
            }
        }
        .await;
        if let Err(e) = result {
            // The role is republished as held: if another node took over meanwhile, the
            // election's tie-break settles it without a gap in between.
            warn!(error = %e, "broker unreachable; tunnels keep running, retrying");
            backoff.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use std::sync::Arc;

    use clusterlink_api::{ConnectionState, GatewayRole};

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
        async fn keep_alive(&mut self, _: i64) -> Result<(), PublishError> {
            self.renewals
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            Ok(())
        }
        async fn publish(&mut self, request: proto::PublishRequest) -> Result<(), PublishError> {
            tokio::time::sleep(self.put_takes).await;
            let record = Record::try_from(request.record.unwrap()).unwrap();
            if matches!(record, Record::Connection(_)) {
                *self.statuses.lock().unwrap() += 1;
            }
            Ok(())
        }
        async fn withdraw(&mut self, _: proto::WithdrawRequest) -> Result<(), PublishError> {
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
