//! The gRPC service: a thin shell that reads from the store, asks [`crate::core`] and writes
//! back. Every write a cluster makes is a transaction guarded by the cluster's registration,
//! so a write racing with `broker revoke` cannot outlive the revocation.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use clusterlink_api::{
    Cluster, ClusterId, ClusterRegistration, Kind, Record, RecordKey, RetiringSerial,
    ValidationError, ownership, proto, unix_ms,
};
use prost::Message;
use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::audit;
use crate::core::{self, Denied, JoinDecision, JoinRefusal, StoredToken};
use crate::hub::Hub;
use crate::limits::{Limits, RateLimiter};
use crate::pki::{Identity, PkiError, Trust, peer_of};
use crate::store::{Compare, KeyValue, Revision, Store, StoreError, Txn, TxnOutcome};
use clusterlink_api::ownership::Infrastructure;

const REGISTRY_VERSION_KEY: &str = "internal/registry-version";
const TOKEN_PREFIX: &str = "internal/tokens/";
const LEASE_OWNER_PREFIX: &str = "internal/lease-owners/";
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);
/// Shortest lease granted: below it a healthy holder cannot keep up with its keepalives.
const MIN_LEASE_TTL: Duration = Duration::from_millis(200);

/// The TTL a grant asks for, clamped to what the broker grants.
fn lease_ttl(req: &proto::GrantLeaseRequest) -> Duration {
    let ttl = if req.ttl_millis > 0 {
        Duration::from_millis(u64::from(req.ttl_millis)).max(MIN_LEASE_TTL)
    } else {
        Duration::from_secs(u64::from(req.ttl_seconds.max(1)))
    };
    ttl.min(MAX_LEASE_TTL)
}

fn ttl_secs_up(ttl: Duration) -> u32 {
    ttl.as_millis().div_ceil(1000) as u32
}
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// The lifetimes a join token may have: long enough to hand a file over, at most a year.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Refuses a token lifetime outside [`MIN_TOKEN_TTL`]..=[`MAX_TOKEN_TTL`] (never silently
/// replaced by another).
pub fn check_token_ttl(ttl: Duration) -> Result<(), ServiceError> {
    if (MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&ttl) {
        Ok(())
    } else {
        Err(ServiceError::TokenTtl { ttl })
    }
}

/// Where the service reads the time. Tests pass a clock they move by hand.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationError),
    #[error("join refused: {0}")]
    Join(#[from] JoinRefusal),
    #[error("permission denied: {0}")]
    Denied(#[from] Denied),
    #[error("refused: {0}")]
    Content(#[from] crate::core::ContentRefusal),
    #[error(
        "this call needs a client certificate: use the credentials written by `clusterlink join`, or the admin credentials written by `clusterlink deploy-broker`"
    )]
    NoCertificate,
    #[error("client certificate rejected: {0}")]
    BadCertificate(#[source] PkiError),
    #[error("the joining node's public key was rejected: {0}")]
    PublicKey(#[source] PkiError),
    #[error("certificate authority failure: {0}")]
    Ca(#[source] PkiError),
    #[error("broker store unavailable: {0}")]
    Store(#[from] StoreError),
    #[error(
        "record {key} changed since the revision given (or already exists); read it again and retry"
    )]
    WriteConflict { key: RecordKey },
    #[error("the cluster registry kept changing during the join; retry")]
    RegistryBusy,
    #[error("lease {lease} belongs to another cluster")]
    ForeignLease { lease: i64 },
    #[error("lease {lease} not found (expired or revoked); grant a new one")]
    NoSuchLease { lease: i64 },
    #[error("no cluster \"{cluster}\" has joined this broker (see clusterlink show clusters)")]
    NoSuchCluster { cluster: ClusterId },
    #[error(
        "cluster {cluster} writes faster than the broker's limit of {rate} per second; retry in {} ms",
        retry_after.as_millis()
    )]
    TooFast {
        cluster: ClusterId,
        rate: u32,
        retry_after: Duration,
    },
    #[error(
        "cluster {cluster} holds the most records the broker allows ({max}); withdraw some, or raise limits.maxRecords in broker.yaml"
    )]
    TooManyRecords { cluster: ClusterId, max: u32 },
    #[error(
        "a join token lifetime of {} is out of range: give 1m to 365d",
        humantime::format_duration(*ttl)
    )]
    TokenTtl { ttl: Duration },
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::Invalid(_)
            | ServiceError::PublicKey(_)
            | ServiceError::TokenTtl { .. } => Status::invalid_argument(msg),
            ServiceError::Join(JoinRefusal::DuplicateCluster { .. }) => Status::already_exists(msg),
            ServiceError::Join(JoinRefusal::Overlap { .. } | JoinRefusal::Covers(_)) => {
                Status::failed_precondition(msg)
            }
            ServiceError::Join(_) => Status::permission_denied(msg),
            ServiceError::Denied(_) | ServiceError::Content(_) => Status::permission_denied(msg),
            ServiceError::NoCertificate | ServiceError::BadCertificate(_) => {
                Status::unauthenticated(msg)
            }
            ServiceError::Ca(_) => Status::internal(msg),
            ServiceError::Store(StoreError::LeaseNotFound(_)) => Status::not_found(msg),
            ServiceError::Store(_) => Status::unavailable(msg),
            ServiceError::WriteConflict { .. } | ServiceError::RegistryBusy => Status::aborted(msg),
            ServiceError::TooFast { .. } | ServiceError::TooManyRecords { .. } => {
                Status::resource_exhausted(msg)
            }
            ServiceError::ForeignLease { .. }
            | ServiceError::NoSuchLease { .. }
            | ServiceError::NoSuchCluster { .. } => Status::not_found(msg),
        }
    }
}

/// A joined cluster as this broker last saw it: its certificate serial, the revision of its
/// registration, and what it registered (the CIDRs its records must stay inside).
#[derive(Clone, Debug)]
struct Entry {
    serial: String,
    retiring: Arc<[RetiringSerial]>,
    rev: Revision,
    cluster: Arc<Cluster>,
}

impl Entry {
    fn of(r: ClusterRegistration, rev: Revision) -> Self {
        Entry {
            serial: r.certificate_serial,
            retiring: r.retiring.into(),
            rev,
            cluster: Arc::new(r.cluster),
        }
    }

    fn certificates(&self) -> core::Certificates<'_> {
        core::Certificates {
            current: &self.serial,
            retiring: &self.retiring,
        }
    }
}

/// Every joined cluster, as this broker last saw it. A miss is checked against the store, so
/// a cluster that just joined through another broker is not refused.
#[derive(Clone, Default)]
struct Registry {
    inner: Arc<RwLock<BTreeMap<ClusterId, Entry>>>,
}

impl Registry {
    fn get(&self, id: &ClusterId) -> Option<Entry> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
    fn set(&self, id: ClusterId, entry: Entry) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry);
    }
    /// Every registered cluster.
    fn clusters(&self) -> Vec<Arc<Cluster>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.cluster.clone())
            .collect()
    }
    fn remove(&self, id: &ClusterId) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
    fn replace(&self, all: BTreeMap<ClusterId, Entry>) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = all;
    }
}

/// The records of every cluster (services, gateways, connection statuses), as this broker
/// last saw them through the hub: for the per-cluster record limit.
#[derive(Clone, Default)]
struct Census {
    inner: Arc<RwLock<Counted>>,
}

/// Every record key, and how many each cluster holds.
type Counted = (std::collections::BTreeSet<String>, BTreeMap<ClusterId, u32>);

impl Census {
    fn count(&self, id: &ClusterId) -> u32 {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.1.get(id).copied().unwrap_or(0)
    }
    fn holds(&self, key: &str) -> bool {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.0.contains(key)
    }
    fn put(&self, key: &str) {
        // Most puts update a record already counted: a read lock, no allocation.
        if self.holds(key) {
            return;
        }
        let Ok(k) = key.parse::<RecordKey>() else {
            return;
        };
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if g.0.insert(key.to_owned()) {
            *g.1.entry(k.owner().clone()).or_default() += 1;
        }
    }
    fn delete(&self, key: &str) {
        let Ok(k) = key.parse::<RecordKey>() else {
            return;
        };
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if g.0.remove(key)
            && let Some(n) = g.1.get_mut(k.owner())
        {
            *n = n.saturating_sub(1);
        }
    }
    /// Replaces what is known of one kind with a full list.
    fn reset(&self, kind: Kind, keys: Vec<String>) {
        let stale: Vec<String> = {
            let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
            g.0.iter()
                .filter(|k| k.starts_with(kind.prefix()))
                .cloned()
                .collect()
        };
        for k in stale {
            self.delete(&k);
        }
        for k in keys {
            self.put(&k);
        }
    }
}

/// How the broker issues certificates (broker.yaml's `certificates`).
#[derive(Clone, Copy, Debug)]
pub struct CertificatePolicy {
    /// How long a certificate issued to a cluster is valid.
    pub validity: Duration,
    /// How long a cluster's certificate keeps working after it renewed away from it: long
    /// enough for every component sharing its credentials to pick the new one up.
    pub renewal_grace: Duration,
}

impl Default for CertificatePolicy {
    fn default() -> Self {
        CertificatePolicy {
            validity: crate::pki::LEAF_VALIDITY,
            renewal_grace: Duration::from_secs(3600),
        }
    }
}

pub struct BrokerService<S: Store> {
    store: S,
    /// What the broker trusts and signs with; replaced when the CA rotates.
    trust: watch::Receiver<Arc<Trust>>,
    certificates: CertificatePolicy,
    hub: Hub<S>,
    registry: Registry,
    clock: Arc<dyn Clock>,
    /// Cancelled when the broker stops: watch streams end (clients reconnect elsewhere) and
    /// the background followers let go of the store.
    closing: CancellationToken,
    /// The broker's own addresses (listen and advertised), which no cluster CIDR may cover.
    protected: Vec<IpAddr>,
    limits: Limits,
    census: Census,
    audit: Arc<audit::Audit>,
    rates: Arc<std::sync::Mutex<RateLimiter>>,
    started: tokio::time::Instant,
    /// Joins through this broker one at a time: each reads the whole registry and commits
    /// only if nothing changed meanwhile, so concurrent joins would mostly retry (a burst
    /// of a thousand ran out of retries). Joins through other brokers (etcd) still race,
    /// and the guarded commit settles those.
    joining: Arc<tokio::sync::Mutex<()>>,
}

fn token_key(token: &str) -> String {
    format!(
        "{TOKEN_PREFIX}{}",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

fn decode_registration(kv: &KeyValue) -> Option<ClusterRegistration> {
    match Record::decode(&kv.value) {
        Ok(Record::Cluster(r)) => Some(r),
        _ => {
            warn!(key = %kv.key, "undecodable cluster registration in store");
            None
        }
    }
}

/// Makes a join token valid for `ttl` (see [`check_token_ttl`]), stores its hash, and returns
/// the token and its expiry (unix ms).
pub async fn create_token<S: Store>(
    store: &S,
    now: SystemTime,
    ttl: Duration,
    single_use: bool,
) -> Result<(String, i64), ServiceError> {
    check_token_ttl(ttl)?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("clt1.{}", hex::encode(bytes));
    let expires = unix_ms(now + ttl);
    let stored = StoredToken {
        expires_at_unix_ms: expires,
        single_use,
        used_by: String::new(),
    };
    store
        .txn(Txn::put(token_key(&token), stored.encode_to_vec()))
        .await?;
    Ok((token, expires))
}

impl<S: Store> BrokerService<S> {
    pub async fn new(
        store: S,
        trust: watch::Receiver<Arc<Trust>>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let closing = CancellationToken::new();
        let hub = Hub::start(store.clone(), 100_000, closing.clone()).await?;
        let svc = Self {
            store,
            trust,
            certificates: CertificatePolicy::default(),
            hub,
            registry: Registry::default(),
            clock,
            closing,
            protected: Vec::new(),
            limits: Limits::default(),
            census: Census::default(),
            audit: Arc::default(),
            rates: Arc::default(),
            started: tokio::time::Instant::now(),
            joining: Arc::default(),
        };
        svc.follow_registry().await?;
        for kind in [Kind::Gateways, Kind::Services, Kind::Connections] {
            svc.follow_census(kind).await?;
        }
        Ok(svc)
    }

    /// How certificates are issued (broker.yaml's `certificates`).
    pub fn with_certificates(mut self, policy: CertificatePolicy) -> Self {
        self.certificates = policy;
        self
    }

    /// The per-cluster limits (broker.yaml's `limits`).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Counts the records of `kind` per cluster and keeps counting from the hub.
    async fn follow_census(&self, kind: Kind) -> Result<(), StoreError> {
        let census = self.census.clone();
        let listed = census.clone();
        self.mirror(
            kind,
            |kvs| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>(),
            move |keys| listed.reset(kind, keys),
            move |ev| {
                if ev.r#type == proto::EventType::Put as i32 {
                    census.put(&ev.key);
                } else {
                    census.delete(&ev.key);
                }
            },
        )
        .await
    }

    /// Mirrors the records of `kind`: a full list now (`of_list`, then `reset`), then every
    /// change through the hub (`apply`) until the broker closes; when the hub says relist, or
    /// the watch ends, a full list again (retried every 500 ms while the store fails).
    async fn mirror<T: Send + 'static>(
        &self,
        kind: Kind,
        of_list: impl Fn(Vec<KeyValue>) -> T + Send + 'static,
        reset: impl Fn(T) + Send + 'static,
        apply: impl Fn(proto::WatchEvent) + Send + 'static,
    ) -> Result<(), StoreError> {
        let (kvs, mut rev) = self.store.list(kind.prefix()).await?;
        reset(of_list(kvs));
        let (store, hub) = (self.store.clone(), self.hub.clone());
        let closing = self.closing.clone();
        tokio::spawn(closing.run_until_cancelled_owned(async move {
            loop {
                let (tx, mut rx) = mpsc::channel(64);
                hub.watch(kind, rev, tx);
                while let Some(Ok(resp)) = rx.recv().await {
                    if resp.relist_required {
                        break;
                    }
                    resp.events.into_iter().for_each(&apply);
                }
                loop {
                    match store.list(kind.prefix()).await {
                        Ok((kvs, r)) => {
                            reset(of_list(kvs));
                            rev = r;
                            break;
                        }
                        Err(e) => {
                            warn!(error = %e, ?kind, "cannot list the records again; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }));
        Ok(())
    }

    /// One write of `cluster` against its rate.
    fn take_write(&self, cluster: &ClusterId) -> Result<(), ServiceError> {
        let now = self.started.elapsed();
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        rates
            .take(cluster, now, &self.limits)
            .map_err(|retry_after| ServiceError::TooFast {
                cluster: cluster.clone(),
                rate: self.limits.writes_per_second,
                retry_after,
            })
    }

    /// Loads the registry and keeps it current from the hub.
    async fn follow_registry(&self) -> Result<(), StoreError> {
        let registry = self.registry.clone();
        let listed = registry.clone();
        self.mirror(
            Kind::Clusters,
            |kvs| registry_of(&kvs),
            move |all| listed.replace(all),
            move |ev| {
                let Ok(RecordKey::Cluster(id)) = ev.key.parse::<RecordKey>() else {
                    return;
                };
                match ev.record.map(Record::try_from) {
                    Some(Ok(Record::Cluster(r))) => registry.set(id, Entry::of(r, ev.revision)),
                    _ => registry.remove(&id),
                }
            },
        )
        .await
    }

    /// Addresses of the broker (besides the one each join arrives on) that no cluster CIDR may
    /// cover: its listen and advertised addresses.
    pub fn protect(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.protected.extend(addrs);
        self.protected.sort();
        self.protected.dedup();
        self
    }

    /// Records `r` in the audit trail (refusals always; successes when `record_ok`, the admin
    /// actions and joins) and turns it into the call's result.
    /// `who` and `target` are made only when something is recorded: most calls (a publish
    /// that is taken) record nothing and cost nothing here.
    fn audited<T>(
        &self,
        who: impl FnOnce() -> String,
        action: &str,
        target: impl FnOnce() -> String,
        r: Result<T, ServiceError>,
        record_ok: bool,
    ) -> Result<T, Status> {
        let refusal = match &r {
            Ok(_) if !record_ok => return r.map_err(Status::from),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        let at = unix_ms(self.clock.now());
        self.audit.record(at, who(), action, target(), refusal);
        r.map_err(Status::from)
    }

    /// Ends every watch stream and background follower; see `closing`.
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// A handle that ends the service's streams and followers when cancelled or dropped.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// The caller, from the certificate TLS verified; refused if its CA was retired since.
    fn identity<T>(&self, req: &Request<T>) -> Result<Identity, ServiceError> {
        Ok(self.peer(req)?.identity)
    }

    fn peer<T>(&self, req: &Request<T>) -> Result<crate::pki::Peer, ServiceError> {
        let certs = req.peer_certs().ok_or(ServiceError::NoCertificate)?;
        let leaf = certs.first().ok_or(ServiceError::NoCertificate)?;
        let peer = peer_of(leaf.as_ref()).map_err(ServiceError::BadCertificate)?;
        self.trust
            .borrow()
            .check_issuer(&peer.issuer)
            .map_err(ServiceError::BadCertificate)?;
        Ok(peer)
    }

    fn now_ms(&self) -> i64 {
        unix_ms(self.clock.now())
    }

    /// The registered serial and registration revision of a cluster: from the cache, or the
    /// store when the cache does not confirm the caller's serial.
    async fn registration(&self, identity: &Identity) -> Result<Option<Entry>, ServiceError> {
        let Identity::Cluster { id, serial } = identity else {
            return Ok(None);
        };
        if let Some(hit) = self.registry.get(id)
            && hit.certificates().accepts(serial, self.now_ms())
        {
            return Ok(Some(hit));
        }
        let kv = self
            .store
            .get(&RecordKey::Cluster(id.clone()).to_string())
            .await?;
        match kv
            .as_ref()
            .and_then(|kv| decode_registration(kv).map(|r| (r, kv.mod_revision)))
        {
            Some((r, rev)) => {
                let entry = Entry::of(r, rev);
                self.registry.set(id.clone(), entry.clone());
                Ok(Some(entry))
            }
            None => {
                self.registry.remove(id);
                Ok(None)
            }
        }
    }

    /// The caller's cluster, if the caller is a cluster with a valid registration (lease
    /// calls are a cluster's own business, not the admin's).
    async fn live_cluster<'a>(
        &self,
        identity: &'a Identity,
    ) -> Result<&'a ClusterId, ServiceError> {
        let Identity::Cluster { id, .. } = identity else {
            return Err(Denied::AdminWrite.into());
        };
        self.authorize_read(identity).await?;
        Ok(id)
    }

    async fn authorize_read(&self, identity: &Identity) -> Result<(), ServiceError> {
        let reg = self.registration(identity).await?;
        core::authorize_read(
            identity,
            reg.as_ref().map(Entry::certificates),
            self.now_ms(),
        )?;
        Ok(())
    }

    /// Checks a write of `key` and returns the caller's cluster and its registration.
    async fn authorize_write(
        &self,
        identity: &Identity,
        key: &RecordKey,
    ) -> Result<(ClusterId, Entry), ServiceError> {
        let reg = self.registration(identity).await?;
        let id = core::authorize_write(
            identity,
            reg.as_ref().map(Entry::certificates),
            self.now_ms(),
            key,
        )?;
        // authorize_write succeeded: the caller is a cluster with a registration.
        let entry = reg.ok_or_else(|| Denied::Revoked {
            cluster: id.clone(),
        })?;
        Ok((id, entry))
    }

    /// Explains a failed guarded write: revoked meanwhile, or the caller's own precondition.
    async fn explain_failed_write(&self, identity: &Identity, key: &RecordKey) -> ServiceError {
        match self.registration(identity).await {
            Ok(Some(_)) => ServiceError::WriteConflict { key: key.clone() },
            Ok(None) => match identity {
                Identity::Cluster { id, .. } => Denied::Revoked {
                    cluster: id.clone(),
                }
                .into(),
                Identity::Admin => Denied::AdminWrite.into(),
            },
            Err(e) => e,
        }
    }

    async fn lease_owner(&self, lease: i64) -> Result<Option<String>, ServiceError> {
        Ok(self
            .store
            .get(&format!("{LEASE_OWNER_PREFIX}{lease}"))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    async fn check_lease(&self, lease: i64, caller: &ClusterId) -> Result<(), ServiceError> {
        match self.lease_owner(lease).await? {
            Some(owner) if owner == caller.as_str() => Ok(()),
            Some(_) => Err(ServiceError::ForeignLease { lease }),
            None => Err(ServiceError::NoSuchLease { lease }),
        }
    }

    /// What no cluster CIDR may cover: the broker's addresses (`local`, the one this call
    /// came in on, and the configured ones) and every gateway's underlay and public address.
    async fn infrastructure(
        &self,
        local: Option<IpAddr>,
    ) -> Result<Vec<Infrastructure>, ServiceError> {
        let mut out: Vec<Infrastructure> = local
            .into_iter()
            .chain(self.protected.iter().copied())
            .filter(|ip| !ip.is_unspecified())
            .map(|addr| Infrastructure {
                addr,
                what: "an address of the broker".into(),
            })
            .collect();
        let (gateways, _) = self.store.list(Kind::Gateways.prefix()).await?;
        for kv in &gateways {
            let Ok(Record::Gateway(g)) = Record::decode(&kv.value) else {
                continue;
            };
            for (what, addr) in ownership::gateway_addresses(&g) {
                out.push(Infrastructure {
                    addr,
                    what: format!("the {what} of gateway {} of cluster {}", g.node, g.cluster),
                });
            }
        }
        Ok(out)
    }

    async fn do_join(
        &self,
        local: Option<IpAddr>,
        req: proto::JoinRequest,
    ) -> Result<proto::JoinResponse, ServiceError> {
        let cluster: Cluster = req
            .cluster
            .ok_or(ValidationError::Missing("cluster"))?
            .try_into()?;
        let _one_at_a_time = self.joining.lock().await;
        core::check_cidrs(&cluster, &self.infrastructure(local).await?)?;
        let tkey = token_key(&req.token);
        for _ in 0..16 {
            let now = self.clock.now();
            // The registry version first: a join that commits after this read changes it
            // and fails our guard below; one that committed before is in the list read next.
            // (Read the other way round, a join landing between the two reads would leave
            // a stale list under a fresh version, and two overlapping joins could both pass.)
            let version = self.store.get(REGISTRY_VERSION_KEY).await?;
            let token_kv = self.store.get(&tkey).await?;
            let token = token_kv
                .as_ref()
                .and_then(|kv| StoredToken::decode(kv.value.as_slice()).ok());
            let (existing_kvs, _) = self.store.list(Kind::Clusters.prefix()).await?;
            let existing: Vec<ClusterRegistration> = existing_kvs
                .iter()
                .filter_map(decode_registration)
                .collect();
            let key_sha256 = hex::encode(Sha256::digest(&req.public_key_der));
            let decision = core::decide_join(
                unix_ms(now),
                token.as_ref(),
                &cluster,
                &key_sha256,
                &existing,
            )?;
            let trust = self.trust.borrow().clone();
            let (cert_pem, serial) = self.sign(&trust, now, &cluster.id, &req.public_key_der)?;
            let key = RecordKey::Cluster(cluster.id.clone()).to_string();
            let previous = existing_kvs.iter().find(|kv| kv.key == key);
            let joined_at_unix_ms = match (&decision, previous.and_then(decode_registration)) {
                (JoinDecision::Retry, Some(r)) => r.joined_at_unix_ms,
                _ => unix_ms(now),
            };
            let reg = Record::Cluster(ClusterRegistration {
                cluster: cluster.clone(),
                certificate_serial: serial.clone(),
                joined_at_unix_ms,
                public_key_sha256: key_sha256,
                certificate_expires_at_unix_ms: unix_ms(now + self.certificates.validity),
                retiring: Vec::new(),
                certificate_ca_sha256: trust.signer.sha256.clone(),
            });
            // A new join: the key must still be free. A retry: the registration must be the
            // one decided on. The certificate issued first (never saved) stops working.
            let guard = match (&decision, previous) {
                (JoinDecision::Retry, Some(kv)) => {
                    Compare::ModRevision(key.clone(), kv.mod_revision)
                }
                _ => Compare::Absent(key.clone()),
            };
            // Guarded by the registry version: two concurrent joins with overlapping CIDRs
            // cannot both pass the overlap check.
            let mut txn = Txn::default()
                .when(guard)
                .when(match &version {
                    Some(v) => Compare::ModRevision(REGISTRY_VERSION_KEY.into(), v.mod_revision),
                    None => Compare::Absent(REGISTRY_VERSION_KEY.into()),
                })
                .and_put(key, reg.encode(), 0)
                .and_put(REGISTRY_VERSION_KEY, cluster.id.to_string().into_bytes(), 0);
            if let (Some(kv), Some(mut t)) = (token_kv, token) {
                txn = txn.when(Compare::ModRevision(tkey.clone(), kv.mod_revision));
                if t.single_use {
                    t.used_by = cluster.id.to_string();
                    txn = txn.and_put(tkey.clone(), t.encode_to_vec(), 0);
                }
            }
            if let TxnOutcome::Committed { revision, .. } = self.store.txn(txn).await? {
                let Record::Cluster(registered) = reg else {
                    unreachable!("built as a cluster registration above")
                };
                self.registry
                    .set(cluster.id.clone(), Entry::of(registered, revision));
                match decision {
                    JoinDecision::New => info!(cluster = %cluster.id, "cluster joined"),
                    JoinDecision::Retry => {
                        info!(cluster = %cluster.id, "cluster joined again with the same key (a retried join)")
                    }
                }
                return Ok(proto::JoinResponse {
                    certificate_pem: cert_pem,
                    ca_certificate_pem: trust.bundle_pem.clone(),
                    revision,
                });
            }
        }
        Err(ServiceError::RegistryBusy)
    }

    /// Signs a cluster's public key with the CA that signs now.
    fn sign(
        &self,
        trust: &Trust,
        now: SystemTime,
        id: &ClusterId,
        public_key_der: &[u8],
    ) -> Result<(String, String), ServiceError> {
        trust
            .signer
            .sign_cluster(now, self.certificates.validity, id, public_key_der)
            .map_err(|e| match e {
                PkiError::PublicKey(_) => ServiceError::PublicKey(e),
                e => ServiceError::Ca(e),
            })
    }

    /// A new certificate for the caller's cluster and a new key; the certificate the call
    /// came with keeps working for the renewal grace. Guarded by the registration's revision,
    /// so a renewal racing with `broker revoke` (or another renewal) is retried or refused.
    async fn do_renew(
        &self,
        identity: &Identity,
        req: proto::RenewCertificateRequest,
    ) -> Result<proto::RenewCertificateResponse, ServiceError> {
        let Identity::Cluster { id, serial } = identity else {
            return Err(Denied::AdminWrite.into());
        };
        let key = RecordKey::Cluster(id.clone()).to_string();
        for _ in 0..16 {
            let now = self.clock.now();
            let Some((kv, reg)) = self
                .store
                .get(&key)
                .await?
                .and_then(|kv| decode_registration(&kv).map(|r| (kv, r)))
            else {
                return Err(Denied::Revoked {
                    cluster: id.clone(),
                }
                .into());
            };
            let trust = self.trust.borrow().clone();
            let (certificate_pem, new_serial) = self.sign(&trust, now, id, &req.public_key_der)?;
            let expires_at_unix_ms = unix_ms(now + self.certificates.validity);
            let renewed = core::renew(
                &reg,
                serial,
                unix_ms(now),
                self.certificates.renewal_grace.as_millis() as i64,
                core::Issued {
                    serial: new_serial,
                    expires_at_unix_ms,
                    ca_sha256: trust.signer.sha256.clone(),
                    public_key_sha256: hex::encode(Sha256::digest(&req.public_key_der)),
                },
            )?;
            let previous_valid_until_unix_ms = core::Certificates::of(&renewed)
                .grace_of(serial)
                .unwrap_or_default();
            let txn = Txn::default()
                .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                .and_put(key.clone(), Record::Cluster(renewed.clone()).encode(), 0);
            if let TxnOutcome::Committed { revision, .. } = self.store.txn(txn).await? {
                self.registry.set(id.clone(), Entry::of(renewed, revision));
                info!(cluster = %id, "cluster certificate renewed");
                return Ok(proto::RenewCertificateResponse {
                    certificate_pem,
                    ca_certificate_pem: trust.bundle_pem.clone(),
                    expires_at_unix_ms,
                    previous_valid_until_unix_ms,
                });
            }
        }
        Err(ServiceError::RegistryBusy)
    }

    async fn do_publish(
        &self,
        identity: &Identity,
        remote: Option<SocketAddr>,
        req: proto::PublishRequest,
    ) -> Result<proto::PublishResponse, ServiceError> {
        let mut record: Record = req
            .record
            .ok_or(ValidationError::Missing("record"))?
            .try_into()?;
        let key = record.key();
        let (caller, entry) = self.authorize_write(identity, &key).await?;
        self.take_write(&caller)?;
        let skey = key.to_string();
        // A new record past the cluster's limit (an update of one it holds is always taken;
        // the census may lag a write made through another broker: the store says).
        if self.census.count(&caller) >= self.limits.max_records
            && !self.census.holds(&skey)
            && self.store.get(&skey).await?.is_none()
        {
            return Err(ServiceError::TooManyRecords {
                cluster: caller,
                max: self.limits.max_records,
            });
        }
        let reg_rev = entry.rev;
        if let Record::Gateway(g) = &mut record {
            // The public address is what the broker sees, not what the gateway claims; an
            // address local to the broker's host means nothing to other gateways.
            g.public_addr = remote
                .map(|a| a.ip())
                .filter(|ip| ownership::bad_underlay(*ip).is_none());
        }
        // Every cluster's CIDRs matter for a gateway's addresses only; a service is checked
        // against its own cluster's (no list of all clusters per publish).
        let all = match &record {
            Record::Gateway(_) => self.registry.clusters(),
            _ => Vec::new(),
        };
        core::check_content(&record, &entry.cluster, &all)?;
        if req.lease_id != 0 {
            self.check_lease(req.lease_id, &caller).await?;
        }
        let mut txn = Txn::default()
            .when(Compare::ModRevision(
                RecordKey::Cluster(caller).to_string(),
                reg_rev,
            ))
            .and_put(skey.clone(), record.encode(), req.lease_id);
        if req.create_only {
            txn = txn.when(Compare::Absent(skey.clone()));
        } else if req.expected_revision != 0 {
            txn = txn.when(Compare::ModRevision(skey.clone(), req.expected_revision));
        }
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { revision, .. } => Ok(proto::PublishResponse { revision }),
            TxnOutcome::Failed => Err(self.explain_failed_write(identity, &key).await),
        }
    }

    async fn do_withdraw(
        &self,
        identity: &Identity,
        req: &proto::WithdrawRequest,
    ) -> Result<proto::WithdrawResponse, ServiceError> {
        let kind = Kind::from_proto(req.kind)?;
        let Identity::Cluster { id, .. } = identity else {
            return Err(Denied::AdminWrite.into());
        };
        let key = RecordKey::from_name(kind, id, &req.name)?;
        let (caller, entry) = self.authorize_write(identity, &key).await?;
        self.take_write(&caller)?;
        let reg_rev = entry.rev;
        let txn = Txn::default()
            .when(Compare::ModRevision(
                RecordKey::Cluster(caller).to_string(),
                reg_rev,
            ))
            .and_delete(key.to_string());
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { revision, deleted } => Ok(proto::WithdrawResponse {
                deleted: deleted > 0,
                revision,
            }),
            TxnOutcome::Failed => Err(self.explain_failed_write(identity, &key).await),
        }
    }

    async fn do_revoke(&self, req: proto::RevokeClusterRequest) -> Result<u32, ServiceError> {
        let id: ClusterId = req.cluster_id.parse()?;
        let key = RecordKey::Cluster(id.clone()).to_string();
        if self.store.get(&key).await?.is_none() {
            return Err(ServiceError::NoSuchCluster { cluster: id });
        }
        let mut txn = Txn::default().and_delete(key);
        for kind in [Kind::Gateways, Kind::Services, Kind::Connections] {
            txn = txn.and_delete_prefix(format!("{}{id}/", kind.prefix()));
        }
        let deleted = match self.store.txn(txn).await? {
            TxnOutcome::Committed { deleted, .. } => deleted,
            TxnOutcome::Failed => 0,
        };
        self.registry.remove(&id);
        self.rates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&id);
        info!(cluster = %id, records = deleted, "cluster revoked");
        Ok(deleted as u32)
    }
}

/// The registry a full list of the cluster registrations makes.
fn registry_of(kvs: &[KeyValue]) -> BTreeMap<ClusterId, Entry> {
    kvs.iter()
        .filter_map(|kv| {
            decode_registration(kv).map(|r| (r.cluster.id.clone(), Entry::of(r, kv.mod_revision)))
        })
        .collect()
}

/// A record's key as the client sent it, for the audit (not validated: only a label).
fn record_label(r: &proto::Record) -> String {
    use proto::record::Kind as K;
    match &r.kind {
        Some(K::Service(s)) => format!("services/{}/{}/{}", s.cluster, s.namespace, s.name),
        Some(K::Gateway(g)) => format!("gateways/{}/{}", g.cluster, g.node),
        Some(K::Connection(c)) => format!(
            "connections/{}/{}/{}/{}",
            c.from_cluster, c.from_node, c.to_cluster, c.to_node
        ),
        Some(K::Cluster(c)) => format!(
            "clusters/{}",
            c.cluster
                .as_ref()
                .map(|c| c.id.as_str())
                .unwrap_or_default()
        ),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl<S: Store> proto::broker_server::Broker for BrokerService<S> {
    async fn join(
        &self,
        request: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        // The address the joiner reached the broker at is one its CIDRs may not cover.
        let local = request.local_addr().map(|a| a.ip());
        let target = request
            .get_ref()
            .cluster
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let r = self.do_join(local, request.into_inner()).await;
        let who = match &r {
            Ok(_) => format!("cluster/{target}"),
            Err(_) => audit::who(None),
        };
        self.audited(|| who, "join", || target, r, true)
            .map(Response::new)
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let identity = self.identity(&request)?;
        let read = self.authorize_read(&identity).await;
        self.audited(
            || audit::who(Some(&identity)),
            "list",
            String::new,
            read,
            false,
        )?;
        let kind = Kind::from_proto(request.get_ref().kind).map_err(ServiceError::from)?;
        let (kvs, revision) = self
            .store
            .list(kind.prefix())
            .await
            .map_err(ServiceError::from)?;
        let records = kvs
            .iter()
            .filter_map(|kv| proto::Record::decode(kv.value.as_slice()).ok())
            .collect();
        Ok(Response::new(proto::ListResponse { records, revision }))
    }

    type WatchStream = ReceiverStream<Result<proto::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let crate::pki::Peer { identity, issuer } = self.peer(&request)?;
        let read = self.authorize_read(&identity).await;
        self.audited(
            || audit::who(Some(&identity)),
            "watch",
            String::new,
            read,
            false,
        )?;
        let req = request.into_inner();
        let kind = Kind::from_proto(req.kind).map_err(ServiceError::from)?;
        let (hub_tx, mut hub_rx) = mpsc::channel(16);
        self.hub.watch(kind, req.from_revision, hub_tx);
        // A cluster's watch lasts only as long as its registration: revoking it (or a
        // re-join, which issues another certificate) ends the stream. The admin's lasts.
        let (tx, rx) = mpsc::channel(16);
        let registry = self.registry.clone();
        let closing = self.closing.clone();
        let (clock, trust) = (self.clock.clone(), self.trust.clone());
        let holder = match identity {
            Identity::Cluster { id, serial } => Some((id, serial)),
            Identity::Admin => None,
        };
        tokio::spawn(async move {
            // Valid while the certificate speaks for the cluster (not revoked, re-joined, or
            // renewed away from past its grace) and its CA is trusted.
            let valid = || {
                trust.borrow().check_issuer(&issuer).is_ok()
                    && holder.as_ref().is_none_or(|(id, serial)| {
                        registry
                            .get(id)
                            .is_some_and(|e| e.certificates().accepts(serial, unix_ms(clock.now())))
                    })
            };
            let mut check = tokio::time::interval(Duration::from_secs(1));
            loop {
                let item = tokio::select! {
                    item = hub_rx.recv() => item,
                    _ = check.tick() => {
                        if valid() { continue } else { None }
                    }
                    _ = tx.closed() => return,
                    _ = closing.cancelled() => {
                        // Not awaited: a client that reads nothing must not hold the broker up.
                        let _ = tx.try_send(Err(Status::unavailable(
                            "the broker is shutting down; reconnect",
                        )));
                        return;
                    }
                };
                match (item, &holder) {
                    (Some(item), _) if valid() => {
                        let item = item.map_err(|e| Status::from(ServiceError::Store(e)));
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    (_, Some((id, _))) if !valid() => {
                        let denied = ServiceError::from(Denied::Revoked {
                            cluster: id.clone(),
                        });
                        let _ = tx.send(Err(denied.into())).await;
                        return;
                    }
                    _ => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn publish(
        &self,
        request: Request<proto::PublishRequest>,
    ) -> Result<Response<proto::PublishResponse>, Status> {
        let identity = self.identity(&request);
        let remote = request.remote_addr();
        let req = request.into_inner();
        // What the audit names if this is refused: the record's key as sent (a label only).
        let label = req.record.as_ref().map(record_label).unwrap_or_default();
        let (caller, r) = match identity {
            Ok(identity) => {
                let r = self.do_publish(&identity, remote, req).await;
                (Some(identity), r)
            }
            Err(e) => (None, Err(e)),
        };
        self.audited(
            || audit::who(caller.as_ref()),
            "publish",
            || label,
            r,
            false,
        )
        .map(Response::new)
    }

    async fn withdraw(
        &self,
        request: Request<proto::WithdrawRequest>,
    ) -> Result<Response<proto::WithdrawResponse>, Status> {
        let identity = self.identity(&request);
        let req = request.into_inner();
        let (caller, r) = match identity {
            Ok(identity) => {
                let r = self.do_withdraw(&identity, &req).await;
                (Some(identity), r)
            }
            Err(e) => (None, Err(e)),
        };
        self.audited(
            || audit::who(caller.as_ref()),
            "withdraw",
            || format!("{}/{}", req.kind, req.name),
            r,
            false,
        )
        .map(Response::new)
    }

    async fn grant_lease(
        &self,
        request: Request<proto::GrantLeaseRequest>,
    ) -> Result<Response<proto::GrantLeaseResponse>, Status> {
        let identity = self.identity(&request)?;
        let id = self.live_cluster(&identity).await?;
        let ttl = lease_ttl(request.get_ref());
        let lease = self
            .store
            .grant_lease(ttl)
            .await
            .map_err(ServiceError::from)?;
        self.store
            .txn(Txn::default().and_put(
                format!("{LEASE_OWNER_PREFIX}{lease}"),
                id.to_string().into_bytes(),
                lease,
            ))
            .await
            .map_err(ServiceError::from)?;
        // What the store granted, which may be more than asked (etcd counts whole seconds,
        // and has a floor of its own): a renewal reports it.
        let granted = self
            .store
            .keep_alive(lease)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(proto::GrantLeaseResponse {
            lease_id: lease,
            ttl_seconds: ttl_secs_up(granted),
            ttl_millis: granted.as_millis() as u32,
        }))
    }

    async fn keep_alive(
        &self,
        request: Request<proto::KeepAliveRequest>,
    ) -> Result<Response<proto::KeepAliveResponse>, Status> {
        let identity = self.identity(&request)?;
        let id = self.live_cluster(&identity).await?;
        let lease = request.get_ref().lease_id;
        self.check_lease(lease, id).await?;
        let ttl = self
            .store
            .keep_alive(lease)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(proto::KeepAliveResponse {
            ttl_seconds: ttl_secs_up(ttl),
            ttl_millis: ttl.as_millis() as u32,
        }))
    }

    async fn revoke_cluster(
        &self,
        request: Request<proto::RevokeClusterRequest>,
    ) -> Result<Response<proto::RevokeClusterResponse>, Status> {
        let identity = self.identity(&request);
        let who = audit::who(identity.as_ref().ok());
        let target = request.get_ref().cluster_id.clone();
        let r = async {
            core::authorize_admin(&identity?)?;
            let records_removed = self.do_revoke(request.into_inner()).await?;
            Ok(proto::RevokeClusterResponse { records_removed })
        }
        .await;
        self.audited(|| who, "revoke", || target, r, true)
            .map(Response::new)
    }

    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let identity = self.identity(&request);
        let who = audit::who(identity.as_ref().ok());
        let req = request.into_inner();
        let target = format!(
            "token (ttl {} s{})",
            req.ttl_seconds,
            if req.single_use { ", single use" } else { "" }
        );
        let r = async {
            core::authorize_admin(&identity?)?;
            let ttl = if req.ttl_seconds == 0 {
                DEFAULT_TOKEN_TTL
            } else {
                Duration::from_secs(req.ttl_seconds)
            };
            let (token, expires_at_unix_ms) =
                create_token(&self.store, self.clock.now(), ttl, req.single_use).await?;
            Ok(proto::CreateTokenResponse {
                token,
                expires_at_unix_ms,
            })
        }
        .await;
        self.audited(|| who, "create-token", || target, r, true)
            .map(Response::new)
    }

    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        let identity = self.identity(&request)?;
        let allowed = core::authorize_admin(&identity).map_err(ServiceError::from);
        self.audited(
            || audit::who(Some(&identity)),
            "list-events",
            String::new,
            allowed,
            false,
        )?;
        Ok(Response::new(proto::ListEventsResponse {
            events: self.audit.recent(request.get_ref().limit as usize),
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        let peer = self.peer(&request)?;
        let reg = self.registration(&peer.identity).await?;
        core::authorize_read(
            &peer.identity,
            reg.as_ref().map(Entry::certificates),
            self.now_ms(),
        )
        .map_err(ServiceError::from)?;
        let trust = self.trust.borrow().clone();
        let renew_reason = match (&peer.identity, &reg) {
            (Identity::Cluster { serial, .. }, Some(entry)) if &entry.serial != serial => {
                "this certificate was renewed already and works only until the end of its grace; use the credentials file's current one, or renew"
            }
            _ if trust.is_retiring(&peer.issuer) => {
                "this certificate was issued by a CA that is being retired (clusterlink broker rotate-ca)"
            }
            _ => "",
        };
        Ok(Response::new(proto::WhoAmIResponse {
            identity: peer.identity.to_string(),
            ca_certificate_pem: trust.bundle_pem.clone(),
            renew_reason: renew_reason.to_owned(),
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<proto::RenewCertificateRequest>,
    ) -> Result<Response<proto::RenewCertificateResponse>, Status> {
        let identity = self.identity(&request);
        let who = audit::who(identity.as_ref().ok());
        let r = async {
            let identity = identity?;
            self.do_renew(&identity, request.into_inner()).await
        }
        .await;
        let target = who.clone();
        self.audited(|| who, "renew-certificate", || target, r, true)
            .map(Response::new)
    }
}

#[cfg(test)]
mod lease_ttl_tests {
    use super::*;

    fn req(ttl_seconds: u32, ttl_millis: u32) -> proto::GrantLeaseRequest {
        proto::GrantLeaseRequest {
            ttl_seconds,
            ttl_millis,
        }
    }

    #[test]
    fn milliseconds_win_and_both_units_are_clamped() {
        assert_eq!(lease_ttl(&req(10, 0)), Duration::from_secs(10));
        assert_eq!(lease_ttl(&req(10, 800)), Duration::from_millis(800));
        assert_eq!(lease_ttl(&req(0, 0)), Duration::from_secs(1));
        assert_eq!(lease_ttl(&req(0, 5)), MIN_LEASE_TTL);
        assert_eq!(lease_ttl(&req(100_000, 0)), MAX_LEASE_TTL);
        assert_eq!(lease_ttl(&req(0, 4_000_000)), MAX_LEASE_TTL);
        assert_eq!(ttl_secs_up(Duration::from_millis(800)), 1);
        assert_eq!(ttl_secs_up(Duration::from_millis(2001)), 3);
    }
}
