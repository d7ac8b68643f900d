//! The controllers, over a manifest directory or the Kubernetes API ([`Source`]): when a
//! file of the directory changes (inotify; a rescan every 30 s as the safety net; only changed
//! files are read, see [`ManifestDir`]) or every 2 s (the API), and whenever the broker's view
//! changes, read the source, reconcile every ServiceExport ([`crate::export`]), publish
//! the records that changed, withdraw this cluster's records that are no longer exported,
//! and write each export's conditions (only when they change: to `status/`, or the status
//! subresource). Then write the cluster set's ServiceImports and EndpointSlices
//! ([`crate::import`]) (to `imported/`, one file per service, or applied through the API),
//! removing those no longer exported anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clusterlink_api::ClusterSet;
use clusterlink_api::proto::broker_client::BrokerClient;
use clusterlink_api::{ClusterId, DnsLabel, Record, ServiceRecord, proto};
use clusterlink_broker_client::{ConnectError, LiveCredentials, connect_with};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use thiserror::Error;
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::export::reconcile_export;
use crate::kube_source::KubeError;
use crate::manifests::{ManifestDir, export_file};
use crate::mcs::{ServiceExport, ServiceExportStatus};

type Key = (String, String);

/// Where the controllers read exports from and write statuses and imports to.
#[derive(Clone)]
pub enum Source {
    /// A manifest directory (standalone mode, the lab).
    Dir(PathBuf),
    /// The cluster's Kubernetes API.
    Kube(kube::Client),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dir(d) => write!(f, "Dir({})", d.display()),
            Source::Kube(_) => f.write_str("Kube"),
        }
    }
}

pub struct ExportController {
    source: Source,
    creds: LiveCredentials,
    local: ClusterId,
    client: Option<BrokerClient<Channel>>,
    first_seen: BTreeMap<Key, Timestamp>,
    statuses: BTreeMap<Key, Vec<Condition>>,
    /// What was last written, per import file name: its text, and its namespace and name.
    imported: BTreeMap<String, (String, Key)>,
    /// The manifest directory as last read (a directory source only); `None` while a read
    /// is running off the runtime.
    manifests: Option<ManifestDir>,
    /// In Kubernetes, the watches of ServiceExports, Services and EndpointSlices (started by
    /// `run`; a single `reconcile` without them lists once).
    mirror: Option<crate::kube_source::Mirror>,
    /// With several replicas: whether this one holds the controllers' Lease (only the holder
    /// writes; all answer). `None`: the only replica.
    leader: Option<watch::Receiver<bool>>,
    /// The broker lease this plugin's service records live under: if the plugin dies, they
    /// go when it lapses. One lease for all of them (one renewal per period, not one per
    /// record).
    lease: Option<i64>,
    lease_ttl: Duration,
    /// The records published under the current lease (a new lease republishes the rest).
    leased: std::collections::BTreeSet<Key>,
    last_errors: Vec<String>,
}

impl ExportController {
    pub fn new(source: Source, creds: LiveCredentials, local: ClusterId) -> Self {
        let source_dir = match &source {
            Source::Dir(d) => Some(d.clone()),
            Source::Kube(_) => None,
        };
        Self {
            source,
            creds,
            local,
            client: None,
            first_seen: BTreeMap::new(),
            statuses: BTreeMap::new(),
            imported: BTreeMap::new(),
            last_errors: Vec::new(),
            manifests: source_dir.as_ref().map(ManifestDir::new),
            mirror: None,
            leader: None,
            lease: None,
            lease_ttl: DEFAULT_RECORD_LEASE,
            leased: Default::default(),
        }
    }

    /// Write only while `leader` says this replica holds the Lease ([`crate::election`]).
    pub fn with_leader(mut self, leader: watch::Receiver<bool>) -> Self {
        self.leader = Some(leader);
        self
    }

    fn leads(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| *l.borrow())
    }

    /// How long this plugin's service records outlive it (renewed every third of it).
    pub fn with_record_lease(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The current lease, granted when there is none.
    async fn lease(&mut self) -> Result<i64, ControllerError> {
        if let Some(l) = self.lease {
            return Ok(l);
        }
        let ttl = self.lease_ttl;
        let granted = self
            .client()
            .await?
            .grant_lease(proto::GrantLeaseRequest {
                ttl_seconds: 0,
                ttl_millis: ttl.as_millis().try_into().unwrap_or(u32::MAX),
            })
            .await
            .map_err(|status| ControllerError::Lease { status })?
            .into_inner();
        self.leased.clear();
        self.lease = Some(granted.lease_id);
        Ok(granted.lease_id)
    }

    /// Renews the lease; one that lapsed (a broker outage longer than its TTL) is replaced
    /// at the next pass, which publishes every record under the new one.
    async fn keep_alive(&mut self) {
        let Some(lease) = self.lease else { return };
        let Ok(client) = self.client().await else {
            return;
        };
        match client
            .keep_alive(proto::KeepAliveRequest { lease_id: lease })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {
                warn!(
                    lease,
                    "the service records' lease lapsed; publishing them again"
                );
                self.lease = None;
            }
            Err(s) => {
                debug!(error = %s.message(), "cannot renew the service records' lease; retrying");
                self.client = None;
            }
        }
    }

    /// Runs until the broker view's sender is gone.
    pub async fn run(mut self, mut view: watch::Receiver<Option<ClusterSet>>) {
        // A directory is read again when the kernel says it changed (inotify), the API's
        // objects when a watch says one changed; both at least every 30 s as well, in case a
        // notification was missed (a full queue, a network file system).
        let mut changed = Arc::new(Notify::new());
        let (period, _watcher) = match &self.source {
            Source::Dir(dir) => {
                info!(dir = %dir.display(), "controllers watching the manifest directory");
                let watcher = watch_dir(dir, changed.clone());
                if let Err(e) = &watcher {
                    warn!(dir = %dir.display(), error = %e, "cannot watch the manifest directory for changes; reading it every 2 s instead");
                }
                let period = if watcher.is_ok() { 30 } else { 2 };
                (Duration::from_secs(period), watcher.ok())
            }
            Source::Kube(client) => {
                info!("controllers watching the Kubernetes API");
                let mirror = crate::kube_source::Mirror::start(client.clone());
                changed = mirror.changed();
                mirror.ready().await;
                info!("ServiceExports, Services and EndpointSlices listed; watching them");
                self.mirror = Some(mirror);
                (Duration::from_secs(30), None)
            }
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew = tokio::time::interval(self.lease_ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leader = self.leader.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = renew.tick() => {
                    if self.leads() {
                        self.keep_alive().await;
                    }
                    continue;
                }
                // Elected: a pass at once. Deposed: the records' broker lease is let go (it
                // lapses; the new holder has published them under its own).
                Ok(()) = async {
                    match leader.as_mut() {
                        Some(l) => l.changed().await.map_err(drop),
                        None => std::future::pending().await,
                    }
                } => {
                    if !self.leads() {
                        self.lease = None;
                        self.leased.clear();
                        continue;
                    }
                }
                _ = changed.notified() => {
                    // An editor's save is several events: take them as one.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                changed = view.changed() => if changed.is_err() { return },
            }
            if !self.leads() {
                continue;
            }
            let set = view.borrow().clone();
            if let Some(set) = set
                && let Err(e) = self.reconcile(&set).await
            {
                warn!(error = %e, "export controller: retrying");
                self.client = None;
            }
        }
    }

    /// One pass: read, reconcile, publish and withdraw, write statuses and imports.
    pub async fn reconcile(&mut self, set: &ClusterSet) -> Result<(), ControllerError> {
        let (m, mut errors): (_, Vec<String>) = match &self.source {
            Source::Dir(dir) => {
                // Parsing is CPU work on files of any size: off the async runtime.
                let mut cache = self
                    .manifests
                    .take()
                    .unwrap_or_else(|| ManifestDir::new(dir));
                let (cache, (m, errors)) = tokio::task::spawn_blocking(move || {
                    let r = cache.refresh();
                    (cache, r)
                })
                .await
                .map_err(|e| ControllerError::Read(e.to_string()))?;
                self.manifests = Some(cache);
                (m, errors.iter().map(ToString::to_string).collect())
            }
            Source::Kube(client) => match &self.mirror {
                Some(mirror) => (mirror.snapshot(), Vec::new()),
                None => match crate::kube_source::read(client.clone()).await {
                    Ok(m) => (m, Vec::new()),
                    Err(e) => return Err(ControllerError::Kube(e)),
                },
            },
        };
        let now = Timestamp::now();
        let mut desired: BTreeMap<Key, ServiceRecord> = BTreeMap::new();
        let mut seen = Vec::new();
        for e in &m.exports {
            let ns = e
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = e.metadata.name.clone().unwrap_or_default();
            // Names become file names (status/, imported/) and broker keys: only the
            // Kubernetes names they claim to be (a `../` never leaves the directory).
            if ns.parse::<DnsLabel>().is_err() || name.parse::<DnsLabel>().is_err() {
                errors.push(format!(
                    "ServiceExport {ns:?}/{name:?}: not a valid Kubernetes namespace and name \
                     (lowercase letters, digits and '-', at most 63); ignored"
                ));
                continue;
            }
            let key = (ns.clone(), name.clone());
            let first = *self.first_seen.entry(key.clone()).or_insert(now);
            let mut export = e.clone();
            export.metadata.namespace = Some(ns.clone());
            if export.metadata.creation_timestamp.is_none() {
                export.metadata.creation_timestamp = Some(Time(first));
            }
            let others: Vec<ServiceRecord> = set
                .services
                .values()
                .filter(|r| r.namespace.as_str() == ns && r.name.as_str() == name)
                .filter(|r| r.cluster != self.local)
                .cloned()
                .collect();
            let outcome = reconcile_export(
                &self.local,
                &export,
                m.service(&ns, &name),
                &m.slices_of(&ns, &name),
                &others,
                now,
            );
            self.write_status(&export, &key, outcome.conditions).await;
            if let Some(r) = outcome.record {
                desired.insert(key.clone(), r);
            }
            seen.push(key);
        }
        if errors != self.last_errors {
            for e in &errors {
                warn!(error = %e, "manifest left out");
            }
            self.last_errors = errors;
        }
        // Exports that went: forget them and their status.
        let gone: Vec<Key> = self
            .statuses
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for k in gone {
            self.statuses.remove(&k);
            self.first_seen.remove(&k);
            if let Source::Dir(dir) = &self.source
                && let Some(path) = status_path(dir, &k)
            {
                let _ = std::fs::remove_file(path);
            }
        }
        self.write_imports(set).await;
        let mine: BTreeMap<Key, &ServiceRecord> = set
            .services
            .values()
            .filter(|r| r.cluster == self.local)
            .map(|r| ((r.namespace.to_string(), r.name.to_string()), r))
            .collect();
        for (k, r) in &desired {
            if mine.get(k) != Some(&r) || !self.leased.contains(k) {
                let lease_id = self.lease().await?;
                let client = self.client().await?;
                let sent = client
                    .publish(proto::PublishRequest {
                        record: Some(Record::Service(r.clone()).into()),
                        lease_id,
                        expected_revision: 0,
                        create_only: false,
                    })
                    .await;
                if let Err(s) = &sent
                    && s.code() == tonic::Code::NotFound
                {
                    // The lease lapsed: a new one at the next pass.
                    self.lease = None;
                }
                sent.map_err(refused("publish", k))?;
                self.leased.insert(k.clone());
                if mine.get(k) != Some(&r) {
                    info!(namespace = %k.0, name = %k.1, ready = r.ready, "service exported");
                }
            }
        }
        for k in mine.keys().filter(|k| !desired.contains_key(*k)) {
            let client = self.client().await?;
            client
                .withdraw(proto::WithdrawRequest {
                    kind: proto::Kind::Services as i32,
                    name: format!("{}/{}", k.0, k.1),
                })
                .await
                .map_err(refused("withdraw", k))?;
            self.leased.remove(k);
            info!(namespace = %k.0, name = %k.1, "service unexported");
        }
        Ok(())
    }

    /// The ServiceImports and their EndpointSlices: `imported/serviceimport.NS.NAME.yaml`,
    /// or applied through the API. Only what changed is written.
    async fn write_imports(&mut self, set: &ClusterSet) {
        let mut want = BTreeMap::new();
        // Only vetted records become ServiceImports, as only they are answered.
        for i in crate::import::imports(crate::answer::vetted(&set.clusters, set.services.values()))
        {
            let (ns, name) = i.key();
            let file = format!("serviceimport.{ns}.{name}.yaml");
            let mut docs = vec![serde_saphyr::to_string(&i.import)];
            docs.extend(i.slices.iter().map(serde_saphyr::to_string));
            let Ok(docs) = docs.into_iter().collect::<Result<Vec<_>, _>>() else {
                continue;
            };
            want.insert(file, (docs.join("---\n"), i));
        }
        for (file, (text, imported)) in &want {
            if self.imported.get(file).map(|(t, _)| t) == Some(text) {
                continue;
            }
            let written = match &self.source {
                Source::Dir(dir) => write_atomic(&dir.join("imported").join(file), text),
                Source::Kube(client) => crate::kube_source::apply_import(client.clone(), imported)
                    .await
                    .map_err(SinkError::from),
            };
            match written {
                Ok(()) => {
                    self.imported
                        .insert(file.clone(), (text.clone(), imported.key()));
                }
                Err(e) => warn!(file, error = %e, "cannot write an import"),
            }
        }
        let gone: Vec<(String, Key)> = self
            .imported
            .iter()
            .filter(|(f, _)| !want.contains_key(*f))
            .map(|(f, (_, k))| (f.clone(), k.clone()))
            .collect();
        for (f, (ns, name)) in gone {
            let removed = match &self.source {
                Source::Dir(dir) => {
                    let _ = std::fs::remove_file(dir.join("imported").join(&f));
                    Ok(())
                }
                Source::Kube(client) => {
                    crate::kube_source::delete_import(client.clone(), &ns, &name).await
                }
            };
            match removed {
                Ok(()) => {
                    self.imported.remove(&f);
                }
                Err(e) => warn!(file = f, error = %e, "cannot remove an import"),
            }
        }
    }

    async fn client(&mut self) -> Result<&mut BrokerClient<Channel>, ConnectError> {
        // A renewed certificate: the next call connects with it.
        let client = match self.client.take() {
            Some(client) if !self.creds.has_changed() => client,
            _ => connect_with(&self.creds.current()).await?,
        };
        Ok(self.client.insert(client))
    }

    /// Writes an export's conditions when they change; a condition whose status did not
    /// change keeps its transition time.
    async fn write_status(
        &mut self,
        export: &ServiceExport,
        key: &Key,
        mut conditions: Vec<Condition>,
    ) {
        let old = self.statuses.get(key);
        let same = |a: &Condition, b: &Condition| {
            (&a.type_, &a.status, &a.reason, &a.message)
                == (&b.type_, &b.status, &b.reason, &b.message)
        };
        if let Some(old) = old {
            if old.len() == conditions.len() && old.iter().zip(&conditions).all(|(a, b)| same(a, b))
            {
                return;
            }
            for c in &mut conditions {
                if let Some(o) = old
                    .iter()
                    .find(|o| o.type_ == c.type_ && o.status == c.status)
                {
                    c.last_transition_time = o.last_transition_time.clone();
                }
            }
        }
        let written = match &self.source {
            Source::Dir(dir) => {
                let mut out = export.clone();
                out.status = Some(ServiceExportStatus {
                    conditions: conditions.clone(),
                });
                match status_path(dir, key) {
                    Some(path) => serde_saphyr::to_string(&out)
                        .map_err(SinkError::from)
                        .and_then(|text| write_atomic(&path, &text)),
                    None => Ok(()),
                }
            }
            Source::Kube(client) => {
                crate::kube_source::write_status(client.clone(), &key.0, &key.1, &conditions)
                    .await
                    .map_err(SinkError::from)
            }
        };
        match written {
            Ok(()) => {
                self.statuses.insert(key.clone(), conditions);
            }
            Err(e) => {
                warn!(namespace = %key.0, name = %key.1, error = %e, "cannot write the export's status")
            }
        }
    }
}

/// `DIR/status/serviceexport.NS.NAME.yaml`; `None` for names that are not DNS labels (they
/// never get this far: reconcile leaves them out).
fn status_path(dir: &Path, (ns, name): &Key) -> Option<PathBuf> {
    let (ns, name) = (ns.parse::<DnsLabel>().ok()?, name.parse::<DnsLabel>().ok()?);
    Some(dir.join("status").join(export_file(&ns, &name)))
}

fn write_atomic(path: &Path, text: &str) -> Result<(), SinkError> {
    clusterlink_broker_client::fs::write_atomic(path, text.as_bytes(), 0o644).map_err(|source| {
        SinkError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// Why a pass of the export controller stopped (it runs again at the next tick).
/// How long a DNS plugin's service records outlive it by default.
pub const DEFAULT_RECORD_LEASE: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("the broker granted no lease for the service records: {}", .status.message())]
    Lease { status: tonic::Status },
    #[error("reading the manifest directory: {0}")]
    Read(String),
    #[error("reading the Kubernetes API: {0}")]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the broker refused to {call} service {namespace}/{name}: {}", .status.message())]
    Refused {
        call: &'static str,
        namespace: String,
        name: String,
        status: tonic::Status,
    },
}

/// Pokes `changed` whenever an entry of `dir` (not of its subdirectories) changes.
fn watch_dir(dir: &Path, changed: Arc<Notify>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // An error (the queue overflowed) may hide a change: read again either way.
        if event.map_or(true, |e| !e.kind.is_access()) {
            changed.notify_one();
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

fn refused(call: &'static str, (ns, name): &Key) -> impl FnOnce(tonic::Status) -> ControllerError {
    let (namespace, name) = (ns.clone(), name.clone());
    move |status| ControllerError::Refused {
        call,
        namespace,
        name,
        status,
    }
}

/// Why an export's status or an import could not be written (logged; tried again when it
/// changes).
#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode it as YAML: {0}")]
    Encode(#[from] serde_saphyr::SerializeError),
    #[error(transparent)]
    Kube(#[from] KubeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_export_named_to_escape_its_directory_is_left_out_and_writes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("evil.yaml"),
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
             metadata: {name: \"x/../../../escaped\", namespace: demo}\n",
        )
        .unwrap();
        let creds = crate::testing::unreachable_broker_credentials();
        let mut c = ExportController::new(Source::Dir(dir.clone()), creds, "a".parse().unwrap());
        c.reconcile(&ClusterSet::default()).await.unwrap();
        // Nothing outside the directory, nothing in status/.
        let outside: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(outside, ["manifests"]);
        assert!(
            !dir.join("status").exists()
                || std::fs::read_dir(dir.join("status")).unwrap().count() == 0
        );
        assert!(
            c.last_errors
                .iter()
                .any(|e| e.contains("x/../../../escaped") && e.contains("ignored")),
            "{:?}",
            c.last_errors
        );
    }

    /// With several replicas only the Lease holder writes: a replica that does not hold it
    /// writes no status; once elected it does, at once.
    #[tokio::test]
    async fn only_the_lease_holder_writes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        // An export without its Service: its status (Valid=False) is the first write.
        std::fs::write(
            dir.join("export.yaml"),
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
             metadata: {name: echo, namespace: demo}\n",
        )
        .unwrap();
        let (leads, leader) = watch::channel(false);
        let c = ExportController::new(
            Source::Dir(dir.clone()),
            crate::testing::unreachable_broker_credentials(),
            "a".parse().unwrap(),
        )
        .with_leader(leader);
        let (_view_tx, view) = watch::channel(Some(ClusterSet::default()));
        let task = tokio::spawn(c.run(view));
        let status = dir.join("status");
        let written = || {
            std::fs::read_dir(&status)
                .map(|d| d.count() > 0)
                .unwrap_or(false)
        };
        // A pass runs at once when the controller starts; a follower's writes nothing. (A
        // window for an absence: were the gate missing, the first pass would have written
        // within milliseconds.)
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!written(), "a replica without the Lease wrote a status");
        leads.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), async {
            while !written() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the elected replica writes at once");
        task.abort();
    }
}
