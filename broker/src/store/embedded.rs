//! The embedded backend: one redb file in the broker's data directory.
//!
//! All writes go through one writer thread, which commits whatever is queued as one durable
//! redb transaction (group commit) and only then acknowledges and publishes the changes. Each
//! client transaction still gets its own revision. Every revision's changes are also kept in a
//! log table, which is what lets a watch start from an old revision; the log is trimmed to the
//! last `history` revisions, and a watch from before that is told to relist.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, warn};

use super::{
    Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn, TxnOutcome, Watch,
    WatchMessage,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");

const META_REVISION: &str = "revision";
const META_COMPACT: &str = "compact_revision";
const META_NEXT_LEASE: &str = "next_lease";

/// Most requests the writer folds into one commit.
const MAX_BATCH: usize = 1024;
/// Events a watch sends in one message at most.
const WATCH_CHUNK: usize = 512;

#[derive(Clone, PartialEq, Message)]
struct StoredKv {
    #[prost(bytes = "vec", tag = "1")]
    value: Vec<u8>,
    #[prost(uint64, tag = "2")]
    create_revision: u64,
    #[prost(uint64, tag = "3")]
    mod_revision: u64,
    #[prost(int64, tag = "4")]
    lease: i64,
}

#[derive(Clone, PartialEq, Message)]
struct StoredEvent {
    #[prost(string, tag = "1")]
    key: String,
    /// `None` for a delete.
    #[prost(message, optional, tag = "2")]
    kv: Option<StoredKv>,
}

#[derive(Clone, PartialEq, Message)]
struct StoredEvents {
    #[prost(message, repeated, tag = "1")]
    events: Vec<StoredEvent>,
}

/// Options of the embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Revisions of history kept for watches that resume from an old revision.
    pub history: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { history: 100_000 }
    }
}

#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    /// Taken on drop, which ends the writer thread.
    requests: Mutex<Option<std_mpsc::Sender<Request>>>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    /// The last handle to the store closes it: the writer finishes what it holds and exits, so
    /// that the database file is released (and can be opened again) when this returns.
    fn drop(&mut self) {
        drop(lock(&self.requests).take());
        if let Some(writer) = lock(&self.writer).take()
            && writer.join().is_err()
        {
            warn!(path = %self.path.display(), "the store's writer thread panicked");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Request {
    Txn(Txn, oneshot::Sender<Result<TxnOutcome, StoreError>>),
    Compact(Revision, oneshot::Sender<Result<(), StoreError>>),
    Grant(Duration, oneshot::Sender<Result<LeaseId, StoreError>>),
    KeepAlive(LeaseId, oneshot::Sender<Result<Duration, StoreError>>),
    Revoke(LeaseId, oneshot::Sender<Result<(), StoreError>>),
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/store.redb`. Only one process may have it open.
    pub fn open(dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Embedded {
            path: dir.display().to_string(),
            source: Box::new(redb::Error::Io(e)),
        })?;
        let path = dir.join("store.redb");
        let err = redb_err(&path);
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        {
            let w = db.begin_write().map_err(|e| err(e.into()))?;
            w.open_table(KV).map_err(|e| err(e.into()))?;
            w.open_table(LOG).map_err(|e| err(e.into()))?;
            w.open_table(META).map_err(|e| err(e.into()))?;
            w.open_table(LEASES).map_err(|e| err(e.into()))?;
            w.commit().map_err(|e| err(e.into()))?;
        }
        let db = Arc::new(db);
        let mut writer = Writer::load(db.clone(), path.clone(), options)?;
        let (tx, rx) = std_mpsc::channel();
        let (events, _) = broadcast::channel(1024);
        let events2 = events.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx, events2))
            .map_err(|e| err(redb::Error::Io(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path,
                requests: Mutex::new(Some(tx)),
                events,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.requests)
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(make(tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Reads the log after `after` under `prefix`: (events, revision read at, compact revision).
    fn read_log(
        db: &Database,
        path: &Path,
        prefix: &str,
        after: Revision,
    ) -> Result<(Vec<Event>, Revision, Revision), StoreError> {
        let err = redb_err(path);
        let r = db.begin_read().map_err(|e| err(e.into()))?;
        let meta = r.open_table(META).map_err(|e| err(e.into()))?;
        let current = meta_get(&meta, META_REVISION).map_err(err)?;
        let compact = meta_get(&meta, META_COMPACT).map_err(err)?;
        if after < compact {
            return Ok((Vec::new(), current, compact));
        }
        let log = r.open_table(LOG).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in log.range(after + 1..).map_err(|e| err(e.into()))? {
            let (rev, bytes) = item.map_err(|e| err(e.into()))?;
            let rev = rev.value();
            let stored = StoredEvents::decode(bytes.value()).map_err(|e| StoreError::Corrupt {
                key: format!("log/{rev}"),
                reason: e.to_string(),
            })?;
            out.extend(
                stored
                    .events
                    .into_iter()
                    .filter(|e| e.key.starts_with(prefix))
                    .map(|e| to_event(e, rev)),
            );
        }
        Ok((out, current, compact))
    }
}

/// Wraps a redb error with the store's path.
fn redb_err(path: &Path) -> impl Fn(redb::Error) -> StoreError + Copy + '_ {
    move |e| StoreError::Embedded {
        path: path.display().to_string(),
        source: Box::new(e),
    }
}

fn meta_get(t: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, redb::Error> {
    Ok(t.get(key)?.map(|v| v.value()).unwrap_or(0))
}

fn to_event(e: StoredEvent, revision: Revision) -> Event {
    match e.kv {
        Some(kv) => Event::Put(KeyValue {
            key: e.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }),
        None => Event::Delete {
            key: e.key,
            revision,
        },
    }
}

fn decode_kv(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let kv = StoredKv::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    })
}

impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        let path = self.inner.path.clone();
        self.blocking(move |db| {
            let err = redb_err(&path);
            let r = db.begin_read().map_err(|e| err(e.into()))?;
            let t = r.open_table(KV).map_err(|e| err(e.into()))?;
            let v = t.get(key.as_str()).map_err(|e| err(e.into()))?;
            v.map(|v| decode_kv(&key, v.value())).transpose()
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_owned();
        let path = self.inner.path.clone();
        self.blocking(move |db| {
            let err = redb_err(&path);
            let r = db.begin_read().map_err(|e| err(e.into()))?;
            let meta = r.open_table(META).map_err(|e| err(e.into()))?;
            let rev = meta_get(&meta, META_REVISION).map_err(err)?;
            let t = r.open_table(KV).map_err(|e| err(e.into()))?;
            let mut out = Vec::new();
            for item in t.range(prefix.as_str()..).map_err(|e| err(e.into()))? {
                let (k, v) = item.map_err(|e| err(e.into()))?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push(decode_kv(k.value(), v.value())?);
            }
            Ok((out, rev))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.request(|tx| Request::Txn(txn, tx)).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let (tx, watch) = Watch::channel(64);
        // Subscribe before reading the log, so nothing committed in between is missed; what is
        // seen twice is dropped by revision.
        let mut live = self.inner.events.subscribe();
        let this = self.clone();
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            let mut after = after;
            loop {
                let p = prefix.clone();
                let path = this.inner.path.clone();
                let read = this
                    .blocking(move |db| EmbeddedStore::read_log(db, &path, &p, after))
                    .await;
                let (events, current, compact) = match read {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if after < compact {
                    let _ = tx
                        .send(Ok(WatchMessage::Relist {
                            compact_revision: compact,
                        }))
                        .await;
                    return;
                }
                for chunk in events.chunks(WATCH_CHUNK) {
                    if tx
                        .send(Ok(WatchMessage::Events(chunk.to_vec())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                after = after.max(current);
                loop {
                    // A watch nobody reads any more ends here, not at the next write: it holds
                    // the store open.
                    let next = tokio::select! {
                        next = live.recv() => next,
                        _ = tx.closed() => return,
                    };
                    match next {
                        Ok(batch) => {
                            let fresh: Vec<Event> = batch
                                .iter()
                                .filter(|e| e.revision() > after && e.key().starts_with(&prefix))
                                .cloned()
                                .collect();
                            if let Some(last) = batch.last() {
                                after = after.max(last.revision());
                            }
                            if !fresh.is_empty()
                                && tx.send(Ok(WatchMessage::Events(fresh))).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            debug!(skipped = n, "watch fell behind; catching up from the log");
                            break;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(watch)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.request(|tx| Request::Compact(revision, tx)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.request(|tx| Request::Grant(ttl, tx)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.request(|tx| Request::KeepAlive(lease, tx)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.request(|tx| Request::Revoke(lease, tx)).await
    }
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// The single writer. Owns the revision counter and the lease deadlines.
struct Writer {
    db: Arc<Database>,
    path: PathBuf,
    options: EmbeddedOptions,
    revision: Revision,
    compact: Revision,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, LeaseState>,
}

/// A request's answer, held until its commit is durable.
enum Answer {
    Txn(Reply<TxnOutcome>, Result<TxnOutcome, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Lease(Reply<LeaseId>, Result<LeaseId, StoreError>),
    Ttl(Reply<Duration>, Result<Duration, StoreError>),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Txn(tx, r) => drop(tx.send(r)),
            Answer::Unit(tx, r) => drop(tx.send(r)),
            Answer::Lease(tx, r) => drop(tx.send(r)),
            Answer::Ttl(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, why: &StoreError) {
        let e = || StoreError::CommitFailed(why.to_string());
        match self {
            Answer::Txn(tx, _) => drop(tx.send(Err(e()))),
            Answer::Unit(tx, _) => drop(tx.send(Err(e()))),
            Answer::Lease(tx, _) => drop(tx.send(Err(e()))),
            Answer::Ttl(tx, _) => drop(tx.send(Err(e()))),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

impl Writer {
    fn load(
        db: Arc<Database>,
        path: PathBuf,
        options: EmbeddedOptions,
    ) -> Result<Self, StoreError> {
        let err = redb_err(&path);
        let r = db.begin_read().map_err(|e| err(e.into()))?;
        let meta = r.open_table(META).map_err(|e| err(e.into()))?;
        let revision = meta_get(&meta, META_REVISION).map_err(err)?;
        let compact = meta_get(&meta, META_COMPACT).map_err(err)?;
        let next_lease = (meta_get(&meta, META_NEXT_LEASE).map_err(err)? as LeaseId).max(1);
        let now = Instant::now();
        let mut leases = HashMap::new();
        // A lease's clock restarts with the process, as etcd's does: its keys live one more TTL.
        for item in r
            .open_table(LEASES)
            .map_err(|e| err(e.into()))?
            .iter()
            .map_err(|e| err(e.into()))?
        {
            let (id, ttl_ms) = item.map_err(|e| err(e.into()))?;
            let ttl = Duration::from_millis(ttl_ms.value());
            leases.insert(
                id.value(),
                LeaseState {
                    ttl,
                    deadline: now + ttl,
                    keys: BTreeSet::new(),
                },
            );
        }
        for item in r
            .open_table(KV)
            .map_err(|e| err(e.into()))?
            .iter()
            .map_err(|e| err(e.into()))?
        {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            let kv = decode_kv(k.value(), v.value())?;
            if kv.lease != 0
                && let Some(l) = leases.get_mut(&kv.lease)
            {
                l.keys.insert(kv.key);
            }
        }
        drop(r);
        Ok(Self {
            db,
            path,
            options,
            revision,
            compact,
            next_lease,
            leases,
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Embedded {
            path: self.path.display().to_string(),
            source: Box::new(e.into()),
        }
    }

    fn run(&mut self, rx: std_mpsc::Receiver<Request>, events: broadcast::Sender<Arc<Vec<Event>>>) {
        loop {
            let now = Instant::now();
            let next_deadline = self.leases.values().map(|l| l.deadline).min();
            let first = match next_deadline {
                Some(d) if d <= now => None,
                Some(d) => match rx.recv_timeout(d - now) {
                    Ok(r) => Some(r),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => return,
                },
            };
            let mut batch: Vec<Request> = first.into_iter().collect();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let mut published = Vec::new();
            let mut answers = Vec::with_capacity(batch.len());
            match self.commit_batch(batch, Instant::now(), &mut published, &mut answers) {
                Ok(()) => {
                    if !published.is_empty() {
                        let _ = events.send(Arc::new(published));
                    }
                    answers.into_iter().for_each(Answer::send);
                }
                Err(e) => {
                    warn!(error = %e, "embedded store commit failed; reloading state from disk");
                    answers.into_iter().for_each(|a| a.fail(&e));
                    match Writer::load(self.db.clone(), self.path.clone(), self.options.clone()) {
                        Ok(fresh) => *self = fresh,
                        Err(e) => {
                            warn!(error = %e, "embedded store cannot reload; stopping the writer");
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Applies a batch in one durable redb transaction. Answers are only sent by the caller,
    /// after the commit: an acknowledged write is on disk.
    fn commit_batch(
        &mut self,
        batch: Vec<Request>,
        now: Instant,
        published: &mut Vec<Event>,
        answers: &mut Vec<Answer>,
    ) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut wrote = false;
        {
            let mut kv = w.open_table(KV).map_err(|e| self.err(e))?;
            let mut log = w.open_table(LOG).map_err(|e| self.err(e))?;
            let mut leases_t = w.open_table(LEASES).map_err(|e| self.err(e))?;
            // Expired leases first: their keys go before anything else in this batch.
            let mut expired: Vec<LeaseId> = self
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            expired.sort_unstable();
            for id in expired {
                debug!(lease = id, "lease expired");
                self.end_lease(id, &mut kv, &mut log, &mut leases_t, published)?;
                wrote = true;
            }
            for req in batch {
                match req {
                    Request::Txn(txn, reply) => {
                        let r = self.apply_txn(&txn, &mut kv, &mut log, published);
                        wrote |= matches!(r, Ok(TxnOutcome::Committed { .. }));
                        answers.push(Answer::Txn(reply, r));
                    }
                    Request::Compact(rev, reply) => {
                        let rev = rev.min(self.revision);
                        if rev > self.compact {
                            log.retain_in(..=rev, |_, _| false)
                                .map_err(|e| self.err(e))?;
                            self.compact = rev;
                            wrote = true;
                        }
                        answers.push(Answer::Unit(reply, Ok(())));
                    }
                    Request::Grant(ttl, reply) => {
                        let id = self.next_lease;
                        self.next_lease += 1;
                        let ttl = ttl.max(Duration::from_millis(100));
                        leases_t
                            .insert(id, ttl.as_millis() as u64)
                            .map_err(|e| self.err(e))?;
                        self.leases.insert(
                            id,
                            LeaseState {
                                ttl,
                                deadline: now + ttl,
                                keys: BTreeSet::new(),
                            },
                        );
                        wrote = true;
                        answers.push(Answer::Lease(reply, Ok(id)));
                    }
                    Request::KeepAlive(id, reply) => {
                        let r = match self.leases.get_mut(&id) {
                            Some(l) => {
                                l.deadline = now + l.ttl;
                                Ok(l.ttl)
                            }
                            None => Err(StoreError::LeaseNotFound(id)),
                        };
                        answers.push(Answer::Ttl(reply, r));
                    }
                    Request::Revoke(id, reply) => {
                        let r = if self.leases.contains_key(&id) {
                            self.end_lease(id, &mut kv, &mut log, &mut leases_t, published)?;
                            wrote = true;
                            Ok(())
                        } else {
                            Err(StoreError::LeaseNotFound(id))
                        };
                        answers.push(Answer::Unit(reply, r));
                    }
                }
            }
            // Trim history in steps, not on every commit.
            let floor = self.revision.saturating_sub(self.options.history);
            if floor > self.compact + self.options.history / 10 {
                log.retain_in(..=floor, |_, _| false)
                    .map_err(|e| self.err(e))?;
                self.compact = floor;
                wrote = true;
            }
        }
        if wrote {
            {
                let mut meta = w.open_table(META).map_err(|e| self.err(e))?;
                meta.insert(META_REVISION, self.revision)
                    .map_err(|e| self.err(e))?;
                meta.insert(META_COMPACT, self.compact)
                    .map_err(|e| self.err(e))?;
                meta.insert(META_NEXT_LEASE, self.next_lease as u64)
                    .map_err(|e| self.err(e))?;
            }
            w.commit().map_err(|e| self.err(e))?;
        } else {
            w.abort().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn apply_txn(
        &mut self,
        txn: &Txn,
        kv: &mut redb::Table<&str, &[u8]>,
        log: &mut redb::Table<u64, &[u8]>,
        published: &mut Vec<Event>,
    ) -> Result<TxnOutcome, StoreError> {
        for op in &txn.ops {
            if let Op::Put { lease, .. } = op
                && *lease != 0
                && !self.leases.contains_key(lease)
            {
                return Err(StoreError::LeaseNotFound(*lease));
            }
        }
        for c in &txn.compares {
            let holds = match c {
                Compare::Absent(k) => kv.get(k.as_str()).map_err(|e| self.err(e))?.is_none(),
                Compare::ModRevision(k, rev) => {
                    match kv.get(k.as_str()).map_err(|e| self.err(e))? {
                        Some(v) => decode_kv(k, v.value())?.mod_revision == *rev,
                        None => false,
                    }
                }
            };
            if !holds {
                return Ok(TxnOutcome::Failed);
            }
        }
        if txn.ops.is_empty() {
            return Ok(TxnOutcome::Committed {
                revision: self.revision,
                deleted: 0,
            });
        }
        let revision = self.revision + 1;
        let mut stored = Vec::new();
        let mut deleted = 0;
        for op in &txn.ops {
            match op {
                Op::Put { key, value, lease } => {
                    let old = kv
                        .get(key.as_str())
                        .map_err(|e| self.err(e))?
                        .map(|v| decode_kv(key, v.value()))
                        .transpose()?;
                    if let Some(old) = &old {
                        self.detach(old.lease, key);
                    }
                    let entry = StoredKv {
                        value: value.clone(),
                        create_revision: old.map(|o| o.create_revision).unwrap_or(revision),
                        mod_revision: revision,
                        lease: *lease,
                    };
                    kv.insert(key.as_str(), entry.encode_to_vec().as_slice())
                        .map_err(|e| self.err(e))?;
                    if *lease != 0
                        && let Some(l) = self.leases.get_mut(lease)
                    {
                        l.keys.insert(key.clone());
                    }
                    stored.push(StoredEvent {
                        key: key.clone(),
                        kv: Some(entry),
                    });
                }
                Op::Delete { key } => {
                    if let Some(old) = kv.remove(key.as_str()).map_err(|e| self.err(e))? {
                        let old = decode_kv(key, old.value())?;
                        self.detach(old.lease, key);
                        stored.push(StoredEvent {
                            key: key.clone(),
                            kv: None,
                        });
                        deleted += 1;
                    }
                }
                Op::DeletePrefix { prefix } => {
                    let keys: Vec<(String, LeaseId)> = {
                        let mut out = Vec::new();
                        for item in kv.range(prefix.as_str()..).map_err(|e| self.err(e))? {
                            let (k, v) = item.map_err(|e| self.err(e))?;
                            if !k.value().starts_with(prefix.as_str()) {
                                break;
                            }
                            out.push((
                                k.value().to_owned(),
                                decode_kv(k.value(), v.value())?.lease,
                            ));
                        }
                        out
                    };
                    for (key, lease) in keys {
                        kv.remove(key.as_str()).map_err(|e| self.err(e))?;
                        self.detach(lease, &key);
                        stored.push(StoredEvent { key, kv: None });
                        deleted += 1;
                    }
                }
            }
        }
        if stored.is_empty() {
            // Only deletes of absent keys: nothing changed, no new revision (as etcd).
            return Ok(TxnOutcome::Committed {
                revision: self.revision,
                deleted: 0,
            });
        }
        self.revision = revision;
        log.insert(
            revision,
            StoredEvents {
                events: stored.clone(),
            }
            .encode_to_vec()
            .as_slice(),
        )
        .map_err(|e| self.err(e))?;
        published.extend(stored.into_iter().map(|e| to_event(e, revision)));
        Ok(TxnOutcome::Committed { revision, deleted })
    }

    fn detach(&mut self, lease: LeaseId, key: &str) {
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.remove(key);
        }
    }

    fn end_lease(
        &mut self,
        id: LeaseId,
        kv: &mut redb::Table<&str, &[u8]>,
        log: &mut redb::Table<u64, &[u8]>,
        leases_t: &mut redb::Table<i64, u64>,
        published: &mut Vec<Event>,
    ) -> Result<(), StoreError> {
        leases_t.remove(id).map_err(|e| self.err(e))?;
        let Some(lease) = self.leases.remove(&id) else {
            return Ok(());
        };
        if lease.keys.is_empty() {
            return Ok(());
        }
        let mut txn = Txn::default();
        for key in lease.keys {
            txn = txn.and_delete(key);
        }
        self.apply_txn(&txn, kv, log, published)?;
        Ok(())
    }
}
