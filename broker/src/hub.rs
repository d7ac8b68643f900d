//! Watch fan-out. A broker keeps one store watch for all record kinds and fans its events out
//! to every client watcher, each event decoded once. The hub keeps the last events in memory,
//! so a watcher that resumes from a recent revision replays from there; one that resumes from
//! further back (or falls behind) gets a watch of its own on the store, which replays from its
//! history or says "relist".

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use clusterlink_api::{Kind, proto};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{Event, Revision, Store, StoreError, WatchMessage};

/// An event as clients receive it, decoded once.
#[derive(Clone, Debug)]
pub struct HubEvent {
    pub revision: Revision,
    pub kind: Kind,
    pub event: proto::WatchEvent,
}

#[derive(Clone, Debug)]
enum HubMsg {
    Events(Arc<Vec<HubEvent>>),
    /// The hub lost its place in the store's history; every watcher must relist.
    Reset,
}

struct HubState {
    /// Every event with a revision in (floor, current], oldest first.
    history: VecDeque<HubEvent>,
    floor: Revision,
    current: Revision,
}

#[derive(Clone)]
pub struct Hub<S: Store> {
    store: S,
    /// Cancelled when the broker stops: the hub stops following the store.
    closing: CancellationToken,
    state: Arc<Mutex<HubState>>,
    tx: broadcast::Sender<HubMsg>,
    capacity: usize,
}

/// Converts a store event under a record prefix into what clients see. Keys outside the four
/// record kinds (the broker's internal bookkeeping) give `None`.
pub fn to_hub_event(e: &Event) -> Option<HubEvent> {
    let kind = Kind::ALL
        .into_iter()
        .find(|k| e.key().starts_with(k.prefix()))?;
    let (ty, record) = match e {
        Event::Put(kv) => match <proto::Record as prost::Message>::decode(kv.value.as_slice()) {
            Ok(r) => (proto::EventType::Put, Some(r)),
            Err(err) => {
                warn!(key = %kv.key, error = %err, "undecodable record in store; skipped");
                return None;
            }
        },
        Event::Delete { .. } => (proto::EventType::Delete, None),
    };
    Some(HubEvent {
        revision: e.revision(),
        kind,
        event: proto::WatchEvent {
            r#type: ty as i32,
            revision: e.revision(),
            key: e.key().to_owned(),
            record,
        },
    })
}

/// What a watcher is sent: events, or the instruction to relist.
pub type WatchItem = Result<proto::WatchResponse, StoreError>;

const BATCH: usize = 512;

impl<S: Store> Hub<S> {
    /// Starts following the store from its current revision, until `closing` is cancelled.
    pub async fn start(
        store: S,
        capacity: usize,
        closing: CancellationToken,
    ) -> Result<Self, StoreError> {
        let (_, rev) = store.list("internal/hub/").await?;
        let (tx, _) = broadcast::channel(4096);
        let hub = Hub {
            store,
            closing,
            state: Arc::new(Mutex::new(HubState {
                history: VecDeque::new(),
                floor: rev,
                current: rev,
            })),
            tx,
            capacity,
        };
        let h = hub.clone();
        tokio::spawn(async move { h.follow(rev).await });
        Ok(hub)
    }

    async fn follow(self, from: Revision) {
        let closing = self.closing.clone();
        tokio::select! {
            _ = self.follow_store(from) => {}
            _ = closing.cancelled() => debug!("hub stopped following the store"),
        }
    }

    async fn follow_store(self, mut from: Revision) {
        loop {
            let mut watch = match self.store.watch("", from).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "hub cannot watch the store; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                match watch.next().await {
                    Some(Ok(WatchMessage::Events(evs))) => {
                        if let Some(last) = evs.last() {
                            from = last.revision();
                        }
                        let converted: Vec<HubEvent> =
                            evs.iter().filter_map(to_hub_event).collect();
                        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                        st.current = from;
                        if converted.is_empty() {
                            continue;
                        }
                        st.history.extend(converted.iter().cloned());
                        while st.history.len() > self.capacity {
                            if let Some(old) = st.history.pop_front() {
                                st.floor = old.revision;
                            }
                        }
                        while st.history.front().is_some_and(|e| e.revision <= st.floor) {
                            st.history.pop_front();
                        }
                        // Sent under the lock: a subscriber sees either the history or this.
                        let _ = self.tx.send(HubMsg::Events(Arc::new(converted)));
                    }
                    Some(Ok(WatchMessage::Relist { compact_revision })) => {
                        info!(
                            compact_revision,
                            "hub fell behind store compaction; watchers relist"
                        );
                        let rev = match self.store.list("internal/hub/").await {
                            Ok((_, rev)) => rev,
                            Err(_) => compact_revision,
                        };
                        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                        st.history.clear();
                        st.floor = rev;
                        st.current = rev;
                        from = rev;
                        let _ = self.tx.send(HubMsg::Reset);
                        break;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "hub store watch failed; resuming");
                        break;
                    }
                    None => {
                        debug!("hub store watch ended; resuming");
                        break;
                    }
                }
            }
        }
    }

    /// Starts a client watch of `kind` after `after`; messages go to `out`.
    pub fn watch(&self, kind: Kind, after: Revision, out: mpsc::Sender<WatchItem>) {
        let (replay, rx) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let rx = self.tx.subscribe();
            if after < st.floor {
                (None, rx)
            } else {
                let replay: Vec<HubEvent> = st
                    .history
                    .iter()
                    .filter(|e| e.revision > after && e.kind == kind)
                    .cloned()
                    .collect();
                (Some(replay), rx)
            }
        };
        let this = self.clone();
        tokio::spawn(async move {
            match replay {
                Some(replay) => this.serve_from_hub(kind, after, replay, rx, out).await,
                None => {
                    drop(rx);
                    this.serve_from_store(kind, after, out).await
                }
            }
        });
    }

    async fn serve_from_hub(
        &self,
        kind: Kind,
        mut after: Revision,
        replay: Vec<HubEvent>,
        mut rx: broadcast::Receiver<HubMsg>,
        out: mpsc::Sender<WatchItem>,
    ) {
        for chunk in replay.chunks(BATCH) {
            if send(&out, chunk.iter()).await.is_err() {
                return;
            }
            if let Some(last) = chunk.last() {
                after = last.revision;
            }
        }
        loop {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = out.closed() => return,
            };
            match msg {
                Ok(HubMsg::Events(evs)) => {
                    let mut batch = Vec::new();
                    take(&evs, kind, &mut after, &mut batch);
                    // Fold whatever is already queued into the same response.
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(HubMsg::Events(more)) => take(&more, kind, &mut after, &mut batch),
                            _ => break,
                        }
                    }
                    if !batch.is_empty() && send_events(&out, batch).await.is_err() {
                        return;
                    }
                }
                Ok(HubMsg::Reset) => {
                    let _ = out.send(Ok(relist(0))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(
                        skipped = n,
                        after, "watcher fell behind the hub; continuing from the store"
                    );
                    drop(rx);
                    return self.serve_from_store(kind, after, out).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn serve_from_store(&self, kind: Kind, after: Revision, out: mpsc::Sender<WatchItem>) {
        let mut watch = match self.store.watch(kind.prefix(), after).await {
            Ok(w) => w,
            Err(e) => {
                let _ = out.send(Err(e)).await;
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                m = watch.next() => m,
                _ = out.closed() => return,
            };
            match msg {
                Some(Ok(WatchMessage::Events(evs))) => {
                    let converted: Vec<HubEvent> = evs.iter().filter_map(to_hub_event).collect();
                    if send(&out, converted.iter()).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WatchMessage::Relist { compact_revision })) => {
                    let _ = out.send(Ok(relist(compact_revision))).await;
                    return;
                }
                Some(Err(e)) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
                None => return,
            }
        }
    }
}

fn relist(compact_revision: Revision) -> proto::WatchResponse {
    proto::WatchResponse {
        events: Vec::new(),
        relist_required: true,
        compact_revision,
    }
}

/// Appends the events of `kind` after `after` to `batch`, and moves `after` past `evs`.
fn take(evs: &[HubEvent], kind: Kind, after: &mut Revision, batch: &mut Vec<proto::WatchEvent>) {
    batch.extend(
        evs.iter()
            .filter(|e| e.revision > *after && e.kind == kind)
            .map(|e| e.event.clone()),
    );
    if let Some(last) = evs.last() {
        *after = (*after).max(last.revision);
    }
}

async fn send<'a>(
    out: &mpsc::Sender<WatchItem>,
    events: impl Iterator<Item = &'a HubEvent>,
) -> Result<(), ()> {
    send_events(out, events.map(|e| e.event.clone()).collect()).await
}

async fn send_events(
    out: &mpsc::Sender<WatchItem>,
    events: Vec<proto::WatchEvent>,
) -> Result<(), ()> {
    if events.is_empty() {
        return Ok(());
    }
    out.send(Ok(proto::WatchResponse {
        events,
        relist_required: false,
        compact_revision: 0,
    }))
    .await
    .map_err(|_| ())
}
