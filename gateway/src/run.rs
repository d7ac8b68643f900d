//! `clusterlink gateway run`: the I/O around [`clusterlink_gateway_core::core::GatewayCore`].
//!
//! Three parts: the data plane (owns the core; TUN device, UDP socket, timers; an epoll loop
//! on its own thread, [`crate::plane`]), and two tokio tasks: the broker follower (list+watch
//! of clusters and gateways, turned into peers), and the publisher ([`crate::publisher`]:
//! this gateway's endpoint under a lease, and its tunnels' status). The data plane never
//! waits on the broker: through a broker outage it keeps the last peers it had.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clusterlink_api::{ClusterSet, GatewayEndpoint, GatewayRole, Kind, proto, unix_ms};
use clusterlink_broker_client::{connect_with, follow};
use clusterlink_gateway_core::core::{GatewayCore, PeerSpec, PeerStatus};
use clusterlink_gateway_core::view::peer_specs;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::config::{GatewayConfig, GatewayError, load_or_create_key, raise_open_files_limit};
use crate::plane::{Control, Plane, Wake};
use crate::publisher::publish;

pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError> {
    let creds = config.credentials.peek();
    let cluster = creds
        .cluster()
        .cloned()
        .ok_or_else(|| GatewayError::NotACluster(creds.identity.clone()))?;
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
    config
        .ready
        .not("waiting for the cluster set from the broker");

    let view = follow(
        config.credentials.clone(),
        &[Kind::Clusters, Kind::Gateways],
    );
    {
        let (mut view, ready) = (view.clone(), config.ready.clone());
        tokio::spawn(async move {
            if view.wait_for(Option::is_some).await.is_ok() {
                ready.ok();
            }
        });
    }
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
        public_addr: config.public_addr,
        port: config.listen_port,
        // Every gateway starts passive; the election makes one active.
        role: GatewayRole::Passive,
        generation: unix_ms(SystemTime::now()).unsigned_abs(),
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
        let mut client = connect_with(&config.credentials.peek()).await.ok()?;
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
    local: clusterlink_api::ClusterId,
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
