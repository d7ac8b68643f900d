//! The broker's storage contract and its two backends.
//!
//! The contract is etcd's, reduced to what the broker needs: keys with revisions, prefix lists
//! that say at which revision they were taken, multi-key transactions guarded by compares,
//! watches that deliver every change after a revision exactly once and in order (or say
//! "relist" when that revision has been compacted away), and leases for liveness.
//!
//! The same contract suite (`tests/store_contract.rs`) runs against both backends.

pub mod embedded;
pub mod etcd;

use std::future::Future;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A store-wide, strictly increasing version number. Every committed transaction gets one.
pub type Revision = u64;
/// A lease; 0 means none.
pub type LeaseId = i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub lease: LeaseId,
}

/// A guard of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last modified at this revision.
    ModRevision(String, Revision),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
}

/// Applies `ops` atomically, and only if every compare holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn put(key: impl Into<String>, value: Vec<u8>) -> Self {
        Txn::default().and_put(key, value, 0)
    }

    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }

    pub fn and_put(mut self, key: impl Into<String>, value: Vec<u8>, lease: LeaseId) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            lease,
        });
        self
    }

    pub fn and_delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    pub fn and_delete_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.ops.push(Op::DeletePrefix {
            prefix: prefix.into(),
        });
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied at `revision`; `deleted` keys were removed by its deletes.
    Committed { revision: Revision, deleted: usize },
    /// A compare did not hold; nothing was written.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// Changes in revision order; never empty.
    Events(Vec<Event>),
    /// The requested start was compacted away. List again and watch from the list's revision.
    /// The watch ends after this message.
    Relist { compact_revision: Revision },
}

/// A running watch. Dropping it cancels the watch.
pub struct Watch {
    rx: mpsc::Receiver<Result<WatchMessage, StoreError>>,
}

impl Watch {
    pub fn channel(capacity: usize) -> (mpsc::Sender<Result<WatchMessage, StoreError>>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Watch { rx })
    }

    /// The next message, or `None` when the watch has ended.
    pub async fn next(&mut self) -> Option<Result<WatchMessage, StoreError>> {
        self.rx.recv().await
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("embedded store at {path}: {source}")]
    Embedded {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error(
        "etcd at {endpoints} over TLS: {source}; check that ca= is the CA that signed etcd's certificate and that cert= and key= are a client certificate etcd trusts"
    )]
    EtcdTls {
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("stored data is corrupt at key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("the write was not committed: {0}")]
    CommitFailed(String),
    #[error("the store has shut down")]
    Closed,
    #[error("invalid store address {value:?}: {reason}")]
    Address { value: String, reason: String },
}

/// The storage contract. Implementations are cheap to clone (a handle to shared state).
pub trait Store: Clone + Send + Sync + 'static {
    /// A short name for logs and benchmarks ("embedded", "etcd").
    fn backend(&self) -> &'static str;

    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Every key under `prefix`, sorted by key, and the revision the list was taken at.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, Revision), StoreError>> + Send;

    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnOutcome, StoreError>> + Send;

    /// Every change under `prefix` with a revision greater than `after`, then live changes.
    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> impl Future<Output = Result<Watch, StoreError>> + Send;

    /// Forgets history up to and including `revision`; later watches from before it relist.
    fn compact(&self, revision: Revision) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn grant_lease(
        &self,
        ttl: Duration,
    ) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Renews the lease for its full TTL; returns that TTL.
    fn keep_alive(
        &self,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Duration, StoreError>> + Send;

    /// Ends the lease now, deleting every key attached to it.
    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The smallest key greater than every key that starts with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).ok();
        }
    }
    None
}
