//! The controllers over a manifest directory: every 250 ms, and whenever the broker's view
//! changes, read the directory, reconcile every ServiceExport ([`crate::export`]), publish
//! the records that changed, withdraw this cluster's records that are no longer exported,
//! and write each export's conditions to `status/` (only when they change). Then write the
//! cluster set's ServiceImports and EndpointSlices ([`crate::import`]) to `imported/`, one
//! file per service, removing those no longer exported anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clusterlink_api::mcs::{ServiceExport, ServiceExportStatus};
use clusterlink_api::proto::broker_client::BrokerClient;
use clusterlink_api::{ClusterId, Record, ServiceRecord, proto};
use clusterlink_broker::client::{Credentials, connect_with};
use clusterlink_broker::follow::ClusterSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::export::reconcile_export;
use crate::manifests::{export_file, read_dir};

type Key = (String, String);

pub struct ExportController {
    dir: PathBuf,
    creds: Credentials,
    local: ClusterId,
    client: Option<BrokerClient<Channel>>,
    first_seen: BTreeMap<Key, Timestamp>,
    statuses: BTreeMap<Key, Vec<Condition>>,
    imported: BTreeMap<String, String>,
    last_errors: Vec<String>,
}

impl ExportController {
    pub fn new(dir: PathBuf, creds: Credentials, local: ClusterId) -> Self {
        Self {
            dir,
            creds,
            local,
            client: None,
            first_seen: BTreeMap::new(),
            statuses: BTreeMap::new(),
            imported: BTreeMap::new(),
            last_errors: Vec::new(),
        }
    }

    /// Runs until the broker view's sender is gone.
    pub async fn run(mut self, mut view: watch::Receiver<Option<ClusterSet>>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(dir = %self.dir.display(), "export controller watching the manifest directory");
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = view.changed() => if changed.is_err() { return },
            }
            let set = view.borrow().clone();
            if let Some(set) = set
                && let Err(e) = self.reconcile(&set).await
            {
                warn!(error = %e, "export controller: cannot reach the broker; retrying");
                self.client = None;
            }
        }
    }

    async fn reconcile(&mut self, set: &ClusterSet) -> Result<(), String> {
        let (m, errors) = read_dir(&self.dir);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        if errors != self.last_errors {
            for e in &errors {
                warn!(error = %e, "manifest left out");
            }
            self.last_errors = errors;
        }
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
            self.write_status(&export, &key, outcome.conditions);
            if let Some(r) = outcome.record {
                desired.insert(key.clone(), r);
            }
            seen.push(key);
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
            let _ = std::fs::remove_file(self.status_path(&k));
        }
        self.write_imports(set);
        let mine: BTreeMap<Key, &ServiceRecord> = set
            .services
            .values()
            .filter(|r| r.cluster == self.local)
            .map(|r| ((r.namespace.to_string(), r.name.to_string()), r))
            .collect();
        for (k, r) in &desired {
            if mine.get(k) != Some(&r) {
                let client = self.client().await?;
                client
                    .publish(proto::PublishRequest {
                        record: Some(Record::Service(r.clone()).into()),
                        lease_id: 0,
                        expected_revision: 0,
                        create_only: false,
                    })
                    .await
                    .map_err(|s| s.message().to_owned())?;
                info!(namespace = %k.0, name = %k.1, ready = r.ready, "service exported");
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
                .map_err(|s| s.message().to_owned())?;
            info!(namespace = %k.0, name = %k.1, "service unexported");
        }
        Ok(())
    }

    /// `imported/serviceimport.NS.NAME.yaml`: the ServiceImport and its EndpointSlices.
    fn write_imports(&mut self, set: &ClusterSet) {
        let dir = self.dir.join("imported");
        let mut want = BTreeMap::new();
        for i in crate::import::imports(set.services.values()) {
            let ns = i.import.metadata.namespace.clone().unwrap_or_default();
            let name = i.import.metadata.name.clone().unwrap_or_default();
            let file = format!("serviceimport.{ns}.{name}.yaml");
            let mut docs = vec![serde_saphyr::to_string(&i.import)];
            docs.extend(i.slices.iter().map(serde_saphyr::to_string));
            let Ok(docs) = docs.into_iter().collect::<Result<Vec<_>, _>>() else {
                continue;
            };
            want.insert(file, docs.join("---\n"));
        }
        for (file, text) in &want {
            if self.imported.get(file) != Some(text) {
                match write_atomic(&dir.join(file), text) {
                    Ok(()) => {
                        self.imported.insert(file.clone(), text.clone());
                    }
                    Err(e) => warn!(file, error = %e, "cannot write an import"),
                }
            }
        }
        let gone: Vec<String> = self
            .imported
            .keys()
            .filter(|f| !want.contains_key(*f))
            .cloned()
            .collect();
        for f in gone {
            let _ = std::fs::remove_file(dir.join(&f));
            self.imported.remove(&f);
        }
    }

    async fn client(&mut self) -> Result<&mut BrokerClient<Channel>, String> {
        if self.client.is_none() {
            self.client = Some(connect_with(&self.creds).await.map_err(|e| e.to_string())?);
        }
        self.client.as_mut().ok_or_else(|| "no client".to_owned())
    }

    fn status_path(&self, (ns, name): &Key) -> PathBuf {
        self.dir.join("status").join(export_file(ns, name))
    }

    /// Writes an export's conditions when they change; a condition whose status did not
    /// change keeps its transition time.
    fn write_status(&mut self, export: &ServiceExport, key: &Key, mut conditions: Vec<Condition>) {
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
        let mut out = export.clone();
        out.status = Some(ServiceExportStatus {
            conditions: conditions.clone(),
        });
        let path = self.status_path(key);
        let written = serde_saphyr::to_string(&out)
            .map_err(|e| e.to_string())
            .and_then(|text| write_atomic(&path, &text).map_err(|e| e.to_string()));
        match written {
            Ok(()) => {
                self.statuses.insert(key.clone(), conditions);
            }
            Err(e) => warn!(path = %path.display(), error = %e, "cannot write the export's status"),
        }
    }
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}
