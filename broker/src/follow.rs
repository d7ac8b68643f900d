//! Following the broker: list, then watch, the clusters and the gateway endpoints, and keep
//! a local copy of them. Reconnects with backoff and relists when the broker says so; the
//! last copy stays valid through a broker outage. Used by every component that acts on the
//! cluster set (gateways, route agents).

use std::collections::BTreeMap;
use std::time::Duration;

use clusterlink_api::{
    Cluster, ClusterId, GatewayEndpoint, Kind, NodeName, Record, RecordKey, proto,
};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::client::{Credentials, connect_with};

/// The clusters and the gateway endpoints, as last seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSet {
    pub clusters: BTreeMap<ClusterId, Cluster>,
    pub gateways: BTreeMap<(ClusterId, NodeName), GatewayEndpoint>,
}

/// What one list+watch delivers.
enum Update {
    Reset(Vec<Record>),
    Put(Record),
    Delete(RecordKey),
}

impl ClusterSet {
    fn apply(&mut self, kind: Kind, update: Update) -> bool {
        match (kind, update) {
            (Kind::Clusters, Update::Reset(rs)) => {
                self.clusters = rs
                    .into_iter()
                    .filter_map(|r| match r {
                        Record::Cluster(c) => Some((c.cluster.id.clone(), c.cluster)),
                        _ => None,
                    })
                    .collect();
            }
            (Kind::Gateways, Update::Reset(rs)) => {
                self.gateways = rs
                    .into_iter()
                    .filter_map(|r| match r {
                        Record::Gateway(g) => Some(((g.cluster.clone(), g.node.clone()), g)),
                        _ => None,
                    })
                    .collect();
            }
            (_, Update::Put(Record::Cluster(c))) => {
                self.clusters.insert(c.cluster.id.clone(), c.cluster);
            }
            (_, Update::Put(Record::Gateway(g))) => {
                self.gateways.insert((g.cluster.clone(), g.node.clone()), g);
            }
            (_, Update::Delete(RecordKey::Cluster(id))) => {
                self.clusters.remove(&id);
            }
            (_, Update::Delete(RecordKey::Gateway(c, n))) => {
                self.gateways.remove(&(c, n));
            }
            _ => return false,
        }
        true
    }
}

/// Follows the broker until the receiver is dropped. The value is `None` until both lists
/// have arrived once, then every change (after the first, one per batch of events) is sent.
pub fn follow(creds: Credentials) -> watch::Receiver<Option<ClusterSet>> {
    let (out, rx) = watch::channel(None);
    tokio::spawn(async move {
        let (tx, mut updates) = mpsc::channel(256);
        let clusters = tokio::spawn(reflect(creds.clone(), Kind::Clusters, tx.clone()));
        let gateways = tokio::spawn(reflect(creds, Kind::Gateways, tx));
        let mut set = ClusterSet::default();
        let (mut have_clusters, mut have_gateways) = (false, false);
        loop {
            tokio::select! {
                _ = out.closed() => break,
                next = updates.recv() => {
                    let Some(first) = next else { break };
                    let mut changed = false;
                    // Take whatever else is queued before telling anyone.
                    let mut next = Some(first);
                    while let Some((kind, update)) = next {
                        have_clusters |= kind == Kind::Clusters;
                        have_gateways |= kind == Kind::Gateways;
                        changed |= set.apply(kind, update);
                        next = updates.try_recv().ok();
                    }
                    if changed && have_clusters && have_gateways {
                        out.send_replace(Some(set.clone()));
                    }
                }
            }
        }
        clusters.abort();
        gateways.abort();
    });
    rx
}

/// Lists then watches `kind`, forever: relists when told to, reconnects after failures.
async fn reflect(creds: Credentials, kind: Kind, tx: mpsc::Sender<(Kind, Update)>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let result: Result<(), String> = async {
            debug!(?kind, "connecting to the broker");
            let mut client = connect_with(&creds).await.map_err(|e| e.to_string())?;
            let list = client
                .list(proto::ListRequest {
                    kind: kind.to_proto() as i32,
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
            let records = list
                .records
                .into_iter()
                .filter_map(|r| Record::try_from(r).ok())
                .collect();
            tx.send((kind, Update::Reset(records)))
                .await
                .map_err(|_| "closed".to_owned())?;
            let mut stream = client
                .watch(proto::WatchRequest {
                    kind: kind.to_proto() as i32,
                    from_revision: list.revision,
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
            backoff = Duration::from_millis(200);
            debug!(?kind, revision = list.revision, "listed; watching");
            while let Some(msg) = stream.message().await.map_err(|s| s.message().to_owned())? {
                if msg.relist_required {
                    return Ok(());
                }
                for ev in msg.events {
                    let update = match (ev.r#type == proto::EventType::Put as i32, ev.record) {
                        (true, Some(r)) => match Record::try_from(r) {
                            Ok(r) => Update::Put(r),
                            Err(_) => continue,
                        },
                        _ => match ev.key.parse() {
                            Ok(k) => Update::Delete(k),
                            Err(_) => continue,
                        },
                    };
                    tx.send((kind, update))
                        .await
                        .map_err(|_| "closed".to_owned())?;
                }
            }
            Err("watch ended".into())
        }
        .await;
        if let Err(e) = result {
            if tx.is_closed() {
                return;
            }
            debug!(?kind, error = %e, "broker follow interrupted; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
