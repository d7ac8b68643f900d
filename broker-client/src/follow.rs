//! Following the broker: list, then watch, the kinds of record a component needs (clusters,
//! gateway endpoints, services, connection status), and keep a local copy of them.
//! Reconnects with backoff and relists when the broker says so; the last copy stays valid
//! through a broker outage. Used by every component that acts on the cluster set (gateways,
//! route agents, DNS plugins).

use std::collections::BTreeSet;
use std::time::Duration;

use clusterlink_api::{ClusterSet, Kind, Record, RecordKey, proto};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::backoff::Backoff;
use crate::connect::{ConnectError, connect_with};
use crate::renew::LiveCredentials;

/// Why one list + watch ended (it is then started again).
#[derive(Debug, Error)]
pub enum FollowError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the broker refused to {call} {kind:?}: {}", .status.message())]
    Refused {
        call: &'static str,
        kind: Kind,
        status: tonic::Status,
    },
    #[error("the broker ended the watch of {0:?}")]
    WatchEnded(Kind),
    /// Nobody follows any more.
    #[error("the follower was dropped")]
    Closed,
}

/// What one list+watch delivers.
enum Update {
    Reset(Vec<Record>),
    Put(Record),
    Delete(RecordKey),
}

fn apply(set: &mut ClusterSet, kind: Kind, update: Update) {
    match update {
        Update::Reset(records) => set.reset(kind, records),
        Update::Put(record) => set.put(record),
        Update::Delete(key) => set.delete(key),
    }
}

/// Follows `kinds` on the broker until the receiver is dropped. The value is `None` until
/// every kind's list has arrived once; then every change is sent (one per batch of events).
pub fn follow(creds: LiveCredentials, kinds: &[Kind]) -> watch::Receiver<Option<ClusterSet>> {
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
                        apply(&mut set, kind, update);
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
async fn reflect(mut creds: LiveCredentials, kind: Kind, tx: mpsc::Sender<(Kind, Update)>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match list_and_watch(&mut creds, kind, &tx, &mut backoff).await {
            Ok(()) => debug!(?kind, "the broker asked for a relist"),
            Err(FollowError::Closed) => return,
            Err(_) if tx.is_closed() => return,
            Err(error) => {
                debug!(?kind, %error, "broker follow interrupted; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// One list, then the watch from its revision: `Ok` when the broker asks for a relist, or the
/// credentials changed (a renewed certificate: the next list and watch use it).
async fn list_and_watch(
    creds: &mut LiveCredentials,
    kind: Kind,
    tx: &mpsc::Sender<(Kind, Update)>,
    backoff: &mut Backoff,
) -> Result<(), FollowError> {
    let refused = |call| move |status| FollowError::Refused { call, kind, status };
    debug!(?kind, "connecting to the broker");
    let mut client = connect_with(&creds.current()).await?;
    let list = client
        .list(proto::ListRequest {
            kind: kind.to_proto() as i32,
        })
        .await
        .map_err(refused("list"))?
        .into_inner();
    let records = list
        .records
        .into_iter()
        .filter_map(|r| Record::try_from(r).ok())
        .collect();
    tx.send((kind, Update::Reset(records)))
        .await
        .map_err(|_| FollowError::Closed)?;
    let mut stream = client
        .watch(proto::WatchRequest {
            kind: kind.to_proto() as i32,
            from_revision: list.revision,
        })
        .await
        .map_err(refused("watch"))?
        .into_inner();
    backoff.reset();
    debug!(?kind, revision = list.revision, "listed; watching");
    loop {
        let msg = tokio::select! {
            msg = stream.message() => msg.map_err(refused("watch"))?,
            _ = creds.changed() => {
                debug!(?kind, "credentials changed; reconnecting with them");
                return Ok(());
            }
        };
        let Some(msg) = msg else { break };
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
                .map_err(|_| FollowError::Closed)?;
        }
    }
    Err(FollowError::WatchEnded(kind))
}
