//! Following the broker: list, then watch, the kinds of record a component needs (clusters,
//! gateway endpoints, services, connection status), and keep a local copy of them.
//! Reconnects with backoff and relists when the broker says so; the last copy stays valid
//! through a broker outage. Used by every component that acts on the cluster set (gateways,
//! route agents, DNS plugins).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clusterlink_api::{
    Cluster, ClusterId, ConnectionKey, ConnectionStatus, DnsLabel, GatewayEndpoint, Kind, NodeName,
    Record, RecordKey, ServiceRecord, proto,
};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::client::{Credentials, connect_with};

/// The records followed, as last seen (kinds not followed stay empty).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSet {
    pub clusters: BTreeMap<ClusterId, Cluster>,
    pub gateways: BTreeMap<(ClusterId, NodeName), GatewayEndpoint>,
    pub services: BTreeMap<(ClusterId, DnsLabel, DnsLabel), ServiceRecord>,
    pub connections: BTreeMap<ConnectionKey, ConnectionStatus>,
}

/// What one list+watch delivers.
enum Update {
    Reset(Vec<Record>),
    Put(Record),
    Delete(RecordKey),
}

impl ClusterSet {
    fn apply(&mut self, kind: Kind, update: Update) {
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
            (Kind::Services, Update::Reset(rs)) => {
                self.services = rs
                    .into_iter()
                    .filter_map(|r| match r {
                        Record::Service(s) => {
                            Some(((s.cluster.clone(), s.namespace.clone(), s.name.clone()), s))
                        }
                        _ => None,
                    })
                    .collect();
            }
            (Kind::Connections, Update::Reset(rs)) => {
                self.connections = rs
                    .into_iter()
                    .filter_map(|r| match r {
                        Record::Connection(c) => Some((c.tunnel(), c)),
                        _ => None,
                    })
                    .collect();
            }
            (_, Update::Put(Record::Service(s))) => {
                self.services
                    .insert((s.cluster.clone(), s.namespace.clone(), s.name.clone()), s);
            }
            (_, Update::Put(Record::Connection(c))) => {
                self.connections.insert(c.tunnel(), c);
            }
            (_, Update::Delete(RecordKey::Service(c, ns, n))) => {
                self.services.remove(&(c, ns, n));
            }
            (_, Update::Delete(RecordKey::Connection(f, fnode, t, n))) => {
                self.connections.remove(&(f, fnode, t, n));
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
        }
    }
}

/// Follows `kinds` on the broker until the receiver is dropped. The value is `None` until
/// every kind's list has arrived once; then every change is sent (one per batch of events).
pub fn follow(creds: Credentials, kinds: &[Kind]) -> watch::Receiver<Option<ClusterSet>> {
    let (out, rx) = watch::channel(None);
    let kinds: BTreeSet<Kind> = kinds.iter().copied().collect();
    tokio::spawn(async move {
        let (tx, mut updates) = mpsc::channel(256);
        let reflectors: Vec<_> = kinds
            .iter()
            .map(|k| tokio::spawn(reflect(creds.clone(), *k, tx.clone())))
            .collect();
        drop(tx);
        let mut set = ClusterSet::default();
        let mut listed = BTreeSet::new();
        loop {
            tokio::select! {
                _ = out.closed() => break,
                next = updates.recv() => {
                    let Some(first) = next else { break };
                    // Take whatever else is queued before telling anyone.
                    let mut next = Some(first);
                    while let Some((kind, update)) = next {
                        listed.insert(kind);
                        set.apply(kind, update);
                        next = updates.try_recv().ok();
                    }
                    if listed == kinds {
                        out.send_replace(Some(set.clone()));
                    }
                }
            }
        }
        for r in reflectors {
            r.abort();
        }
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
