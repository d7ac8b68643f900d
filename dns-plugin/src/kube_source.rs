//! The Kubernetes API (kube-rs) as the controllers' source and sink, and the Kubernetes side
//! of `export`/`unexport`. Tested against kube's tower-test mock of the API server.
//!
//! - [`read`]: the ServiceExports, Services and EndpointSlices the export reconciler needs;
//! - [`write_status`]: an export's conditions (merge patch of the status subresource);
//! - [`apply_import`] / [`delete_import`]: a ServiceImport and its EndpointSlices
//!   (server-side apply, field manager `clusterlink`).

use crate::mcs::{ServiceExport, ServiceExportSpec, ServiceImport};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use std::sync::Arc;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::debug;

use crate::import::{Imported, SERVICE_NAME_LABEL};
use crate::manifests::Manifests;

/// Field manager of what the controllers apply.
pub const FIELD_MANAGER: &str = "clusterlink";

/// ServiceExports, Services and EndpointSlices as the API last said they were, kept by
/// watches (list once, then every change; relisted when a watch cannot resume), instead of
/// listing everything again and again. Each change wakes [`Mirror::changed`].
pub struct Mirror {
    exports: reflector::Store<ServiceExport>,
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Watches `api` into a store; every event wakes `changed`. Errors (the API gone, a watch
/// expired) are retried with kube's default backoff.
fn mirror_of<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> (reflector::Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher::watcher(api, config)).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => debug!(error = %e, "watch interrupted; resuming"),
            }
        }
    });
    (reader, task)
}

impl Mirror {
    /// Starts the three watches.
    pub fn start(client: Client) -> Self {
        let changed = Arc::new(Notify::new());
        let (exports, a) = mirror_of(
            Api::<ServiceExport>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
        );
        let (services, b) = mirror_of(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
        );
        let (slices, c) = mirror_of(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default().labels("kubernetes.io/service-name"),
            changed.clone(),
        );
        Mirror {
            exports,
            services,
            slices,
            changed,
            tasks: vec![a, b, c],
        }
    }

    /// Resolves once every watch has listed once.
    pub async fn ready(&self) {
        let _ = self.exports.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
    }

    /// Woken at each change.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// What the watches hold now.
    pub fn snapshot(&self) -> Manifests {
        fn owned<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
            v.into_iter().map(|a| (*a).clone()).collect()
        }
        Manifests {
            exports: owned(self.exports.state()),
            services: owned(self.services.state()),
            slices: own_slices(owned(self.slices.state())),
        }
    }
}

/// Imported slices carry the MCS label: they are not this cluster's to export.
fn own_slices(slices: Vec<EndpointSlice>) -> Vec<EndpointSlice> {
    slices
        .into_iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key(SERVICE_NAME_LABEL))
        })
        .collect()
}

/// Every ServiceExport, and the Services and EndpointSlices they may name, listed once.
pub async fn read(client: Client) -> Result<Manifests, KubeError> {
    let lp = ListParams::default();
    let exports = Api::<ServiceExport>::all(client.clone())
        .list(&lp)
        .await?
        .items;
    let services = Api::<Service>::all(client.clone()).list(&lp).await?.items;
    let slices = own_slices(
        Api::<EndpointSlice>::all(client)
            .list(&ListParams::default().labels("kubernetes.io/service-name"))
            .await?
            .items,
    );
    Ok(Manifests {
        exports,
        services,
        slices,
    })
}

/// Sets an export's conditions (the status subresource).
pub async fn write_status(
    client: Client,
    ns: &str,
    name: &str,
    conditions: &[Condition],
) -> Result<(), KubeError> {
    let patch = serde_json::json!({ "status": { "conditions": conditions } });
    Api::<ServiceExport>::namespaced(client, ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Applies a ServiceImport (then its status) and its EndpointSlices.
pub async fn apply_import(client: Client, imported: &Imported) -> Result<(), KubeError> {
    let (ns, name) = imported.key();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut import = imported.import.clone();
    let status = import.status.take();
    let api = Api::<ServiceImport>::namespaced(client.clone(), &ns);
    api.patch(&name, &pp, &Patch::Apply(&import)).await?;
    if let Some(status) = status {
        let patch = serde_json::json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let slices = Api::<EndpointSlice>::namespaced(client, &ns);
    for s in &imported.slices {
        let slice_name = s.metadata.name.clone().unwrap_or_default();
        slices.patch(&slice_name, &pp, &Patch::Apply(s)).await?;
    }
    Ok(())
}

/// Deletes a ServiceImport and its EndpointSlices (by their MCS label).
pub async fn delete_import(client: Client, ns: &str, name: &str) -> Result<(), KubeError> {
    match Api::<ServiceImport>::namespaced(client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Api::<EndpointSlice>::namespaced(client, ns)
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}")),
        )
        .await?;
    Ok(())
}

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("the Kubernetes API refused: {0}")]
    Api(String),
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(#[from] kube::Error),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    AlreadyExported,
    Deleted,
    NotExported,
}

/// Creates ServiceExport `ns/name` (already there is not an error).
pub async fn export(client: Client, ns: &str, name: &str) -> Result<Outcome, KubeError> {
    let api: Api<ServiceExport> = Api::namespaced(client, ns);
    let object = ServiceExport {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            ..ObjectMeta::default()
        },
        spec: ServiceExportSpec {},
        status: None,
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(Outcome::Created),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::AlreadyExported),
        Err(kube::Error::Api(s)) => Err(KubeError::Api(format!("{} ({})", s.message, s.reason))),
        Err(e) => Err(e.into()),
    }
}

/// Deletes ServiceExport `ns/name`.
pub async fn unexport(client: Client, ns: &str, name: &str) -> Result<Outcome, KubeError> {
    let api: Api<ServiceExport> = Api::namespaced(client, ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(Outcome::Deleted),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Outcome::NotExported),
        Err(kube::Error::Api(s)) => Err(KubeError::Api(format!("{} ({})", s.message, s.reason))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;

    /// A client whose API server answers one request with `status` and `body`, and hands
    /// back the request it got.
    fn mock(
        status: u16,
        body: serde_json::Value,
    ) -> (
        Client,
        tokio::task::JoinHandle<(Method, String, serde_json::Value)>,
    ) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a request");
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let sent = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let mut response =
                Response::new(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
            send.send_response(response);
            (method, path, sent)
        });
        (Client::new(service, "default"), server)
    }

    /// What the mock API server was asked: method, path with query, body.
    type Asked = (Method, String, serde_json::Value);

    /// An API server answering `n` requests from `answer(method, path, query)`, and handing
    /// back what it was asked (method, path with query, body).
    fn serve(
        n: usize,
        answer: impl Fn(&Method, &str) -> serde_json::Value + Send + 'static,
    ) -> (Client, tokio::task::JoinHandle<Vec<Asked>>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..n {
                let Some((request, send)) = handle.next_request().await else {
                    break;
                };
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or("").to_owned();
                eprintln!("REQ {method} {path}?{query}");
                let bytes = request
                    .into_body()
                    .collect_bytes()
                    .await
                    .unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                let out = answer(&method, &path);
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&out).unwrap_or_default(),
                )));
                seen.push((method, format!("{path}?{query}"), body));
            }
            seen
        });
        (Client::new(service, "default"), server)
    }

    fn list(kind: &str, api: &str, items: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"apiVersion": api, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "1"}, "items": items})
    }

    #[tokio::test]
    async fn read_lists_exports_services_and_their_slices() {
        let (client, server) = serve(3, |_, path| {
            if path.ends_with("/serviceexports") {
                list(
                    "ServiceExport",
                    "multicluster.x-k8s.io/v1alpha1",
                    serde_json::json!([
                    {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                     "metadata": {"name": "echo", "namespace": "demo"}}]),
                )
            } else if path.ends_with("/services") {
                list(
                    "Service",
                    "v1",
                    serde_json::json!([
                    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "demo"},
                     "spec": {"clusterIP": "None", "ports": [{"port": 7}]}}]),
                )
            } else {
                list(
                    "EndpointSlice",
                    "discovery.k8s.io/v1",
                    serde_json::json!([
                    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": "echo-1", "namespace": "demo",
                                  "labels": {"kubernetes.io/service-name": "echo"}},
                     "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.2.3"]}]},
                    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": "echo-b", "namespace": "demo",
                                  "labels": {"kubernetes.io/service-name": "echo",
                                             "multicluster.kubernetes.io/service-name": "echo"}},
                     "addressType": "IPv4", "endpoints": [{"addresses": ["10.2.2.3"]}]}]),
                )
            }
        });
        let m = read(client).await.unwrap();
        assert_eq!((m.exports.len(), m.services.len()), (1, 1));
        assert_eq!(
            m.slices_of("demo", "echo").len(),
            1,
            "imported slices are not ours to export"
        );
        let asked = server.await.unwrap();
        assert_eq!(
            asked[0].1,
            "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports?"
        );
        assert_eq!(asked[1].1, "/api/v1/services?");
        assert!(
            asked[2]
                .1
                .starts_with("/apis/discovery.k8s.io/v1/endpointslices?"),
            "{}",
            asked[2].1
        );
        assert!(
            asked[2]
                .1
                .contains("labelSelector=kubernetes.io%2Fservice-name"),
            "{}",
            asked[2].1
        );
    }

    #[tokio::test]
    async fn conditions_go_to_the_status_subresource_and_imports_are_applied() {
        let export = serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport", "metadata": {"name": "echo", "namespace": "demo"}});
        let (client, server) = serve(1, move |_, _| export.clone());
        let cond = crate::export::reconcile_export(
            &"a".parse().unwrap(),
            &serde_json::from_value(
                serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport", "metadata": {"name": "echo", "namespace": "demo"}}),
            )
            .unwrap(),
            None,
            &[],
            &[],
            k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        )
        .conditions;
        write_status(client, "demo", "echo", &cond).await.unwrap();
        let asked = server.await.unwrap();
        assert_eq!(asked[0].0, Method::PATCH);
        assert!(asked[0].1.starts_with(
            "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceexports/echo/status"
        ));
        assert_eq!(asked[0].2["status"]["conditions"][0]["type"], "Valid");
        assert_eq!(
            asked[0].2["status"]["conditions"][0]["reason"],
            "ServiceNotFound"
        );

        let record = exported_by_b();
        let imported = crate::import::imports([&record]).remove(0);
        let (client, server) = serve(3, |_, path| {
            if path.contains("endpointslices") {
                serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "echo-b", "namespace": "demo"}, "addressType": "IPv4", "endpoints": []})
            } else {
                serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                    "metadata": {"name": "echo", "namespace": "demo"}, "spec": {"type": "Headless", "ports": []}})
            }
        });
        apply_import(client, &imported).await.unwrap();
        let asked = server.await.unwrap();
        assert!(asked[0].1.starts_with(
            "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceimports/echo?"
        ));
        assert!(
            asked[0].1.contains("fieldManager=clusterlink") && asked[0].1.contains("force=true")
        );
        assert_eq!(asked[0].2["kind"], "ServiceImport");
        assert!(asked[1].1.contains("/serviceimports/echo/status"));
        assert_eq!(asked[1].2["status"]["clusters"][0]["cluster"], "b");
        assert!(
            asked[2]
                .1
                .starts_with("/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices/echo-b?")
        );
    }

    /// The controllers over the API: an export of a missing Service gets Valid=False on its
    /// status subresource (nothing is published), and another cluster's export is applied
    /// as a ServiceImport with its status and slice.
    #[tokio::test]
    async fn the_controllers_read_and_write_through_the_api() {
        let (client, server) = serve(7, |method, path| {
            if method == Method::GET && path.ends_with("/serviceexports") {
                list(
                    "ServiceExport",
                    "multicluster.x-k8s.io/v1alpha1",
                    serde_json::json!([
                    {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                     "metadata": {"name": "gone", "namespace": "demo"}}]),
                )
            } else if method == Method::GET && path.ends_with("/services") {
                list("Service", "v1", serde_json::json!([]))
            } else if method == Method::GET {
                list(
                    "EndpointSlice",
                    "discovery.k8s.io/v1",
                    serde_json::json!([]),
                )
            } else if path.contains("serviceexports") {
                serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
                    "kind": "ServiceExport", "metadata": {"name": "gone", "namespace": "demo"}})
            } else if path.contains("endpointslices") {
                serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "echo-b", "namespace": "demo"}, "addressType": "IPv4", "endpoints": []})
            } else {
                serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                    "metadata": {"name": "echo", "namespace": "demo"}, "spec": {"type": "Headless", "ports": []}})
            }
        });
        let creds = crate::testing::unreachable_broker_credentials();
        let mut controller = crate::controller::ExportController::new(
            crate::controller::Source::Kube(client),
            creds,
            "a".parse().unwrap(),
        );
        let mut set = clusterlink_api::ClusterSet::default();
        // b is registered: its records are vetted against its CIDRs.
        set.clusters.insert(
            "b".parse().unwrap(),
            clusterlink_api::Cluster {
                id: "b".parse().unwrap(),
                pod_cidrs: "10.2.0.0/16".parse().unwrap(),
                service_cidrs: "10.102.0.0/16".parse().unwrap(),
                labels: Default::default(),
            },
        );
        let record = exported_by_b();
        set.services.insert(
            (
                record.cluster.clone(),
                record.namespace.clone(),
                record.name.clone(),
            ),
            record,
        );
        controller.reconcile(&set).await.unwrap();
        // Every request the mock expects, or a failure (not a hang) if one never comes.
        let asked = tokio::time::timeout(std::time::Duration::from_secs(20), server)
            .await
            .expect("the controller made fewer API calls than expected")
            .unwrap();
        let paths: Vec<String> = asked
            .iter()
            .map(|(m, p, _)| format!("{m} {}", p.split('?').next().unwrap_or("")))
            .collect();
        assert_eq!(
            paths,
            [
                "GET /apis/multicluster.x-k8s.io/v1alpha1/serviceexports",
                "GET /api/v1/services",
                "GET /apis/discovery.k8s.io/v1/endpointslices",
                "PATCH /apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceexports/gone/status",
                "PATCH /apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceimports/echo",
                "PATCH /apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceimports/echo/status",
                "PATCH /apis/discovery.k8s.io/v1/namespaces/demo/endpointslices/echo-b",
            ]
        );
        assert_eq!(
            asked[3].2["status"]["conditions"][0]["reason"],
            "ServiceNotFound"
        );
    }

    /// Cluster b's headless export demo/echo.
    fn exported_by_b() -> clusterlink_api::ServiceRecord {
        clusterlink_api::ServiceRecord {
            cluster: "b".parse().unwrap(),
            namespace: "demo".parse().unwrap(),
            name: "echo".parse().unwrap(),
            service_type: clusterlink_api::ServiceType::Headless,
            ports: Vec::new(),
            ips: Vec::new(),
            endpoints: Vec::new(),
            ready: true,
            exported_at_unix_ms: 1,
        }
    }

    fn status(code: u16, reason: &str) -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("{reason} it"), "reason": reason, "code": code})
    }

    #[tokio::test]
    async fn export_creates_the_service_export() {
        let created = serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport", "metadata": {"name": "echo", "namespace": "demo"}});
        let (client, server) = mock(201, created);
        assert_eq!(
            export(client, "demo", "echo").await.unwrap(),
            Outcome::Created
        );
        let (method, path, sent) = server.await.unwrap();
        assert_eq!(method, Method::POST);
        assert_eq!(
            path,
            "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceexports"
        );
        assert_eq!(sent["kind"], "ServiceExport");
        assert_eq!(sent["metadata"]["name"], "echo");
    }

    #[tokio::test]
    async fn export_twice_and_unexport_what_is_not_there_are_reported() {
        let (client, _s) = mock(409, status(409, "AlreadyExists"));
        assert_eq!(
            export(client, "demo", "echo").await.unwrap(),
            Outcome::AlreadyExported
        );
        let (client, server) = mock(404, status(404, "NotFound"));
        assert_eq!(
            unexport(client, "demo", "echo").await.unwrap(),
            Outcome::NotExported
        );
        let (method, path, _) = server.await.unwrap();
        assert_eq!(method, Method::DELETE);
        assert_eq!(
            path,
            "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceexports/echo"
        );
        let (client, _s) = mock(403, status(403, "Forbidden"));
        let err = export(client, "demo", "echo").await.unwrap_err();
        assert!(err.to_string().contains("Forbidden"), "{err}");
    }

    /// The DNS plugin's ClusterRole grants exactly what its code asks of the API: every
    /// call the daemon makes (the reads, an export's conditions, an import applied and
    /// deleted) against the mock, each mapped to the verb it needs.
    #[tokio::test]
    async fn the_dns_plugins_role_grants_exactly_what_its_code_uses() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let watches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen_watches = watches.clone();
        let recorder = tokio::spawn(async move {
            let mut needed = std::collections::BTreeSet::new();
            let mut held: Vec<tower_test::mock::SendResponse<Response<Body>>> = Vec::new();
            let mut lease_reads = 0usize;
            while let Some((request, send)) = handle.next_request().await {
                let content_type = request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let (method, path) = (request.method().clone(), request.uri().path().to_owned());
                let query = request.uri().query().unwrap_or("").to_owned();
                needed.extend(clusterlink_testkit::rbac::needs(
                    method.as_str(),
                    &format!("{path}?{query}"),
                    &content_type,
                ));
                if query.contains("watch=true") {
                    // A watch stays open (nothing changes): held until the test ends.
                    held.push(send);
                    seen_watches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    continue;
                }
                let body = if path.contains("/leases") {
                    lease_reads += usize::from(method == Method::GET);
                    if method == Method::GET && lease_reads == 1 {
                        let mut r = Response::new(Body::from(
                            serde_json::to_vec(&serde_json::json!({"apiVersion": "v1",
                                "kind": "Status", "status": "Failure", "reason": "NotFound",
                                "code": 404, "message": "not found"}))
                            .unwrap_or_default(),
                        ));
                        *r.status_mut() = http::StatusCode::NOT_FOUND;
                        send.send_response(r);
                        continue;
                    }
                    // Held by a replica that stopped renewing it long ago.
                    serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": "clusterlink-dns", "namespace": "clusterlink-system",
                                     "resourceVersion": "3"},
                        "spec": {"holderIdentity": "pod-gone", "leaseDurationSeconds": 15,
                                 "renewTime": "2020-01-01T00:00:00.000000Z"}})
                } else if path.contains("/secrets/") {
                    serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "clusterlink-credentials", "namespace": "clusterlink-system"}})
                } else if method == Method::GET
                    || (method == Method::DELETE && path.ends_with("endpointslices"))
                {
                    serde_json::json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "1"}, "items": []})
                } else if path.contains("endpointslices") {
                    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": "echo-b", "namespace": "demo"}, "addressType": "IPv4", "endpoints": []})
                } else if path.contains("serviceimports") {
                    serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                        "metadata": {"name": "echo", "namespace": "demo"}, "spec": {"type": "Headless", "ports": []}})
                } else {
                    serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
                        "kind": "ServiceExport", "metadata": {"name": "echo", "namespace": "demo"}})
                };
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&body).unwrap_or_default(),
                )));
            }
            needed
        });
        let client = Client::new(service, "default");
        // What the controller reads: the three kinds, listed then watched.
        let mirror = Mirror::start(client.clone());
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            mirror.ready().await;
            while watches.load(std::sync::atomic::Ordering::SeqCst) < 3 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the three kinds listed, then watched");
        write_status(client.clone(), "demo", "echo", &[])
            .await
            .unwrap();
        let imported = crate::import::imports([&exported_by_b()]).remove(0);
        assert!(!imported.slices.is_empty() && imported.import.status.is_some());
        apply_import(client.clone(), &imported).await.unwrap();
        delete_import(client.clone(), "demo", "echo").await.unwrap();
        // Renewed credentials saved to their Secret (--credentials-secret).
        let secret = clusterlink_broker_client::node::SecretRef::parse(
            client.clone(),
            "clusterlink-system/clusterlink-credentials",
        )
        .unwrap();
        secret.check().await.unwrap();
        secret.write(b"x".to_vec()).await.unwrap();
        drop(secret);
        // The Lease the replicas elect the writer with: made, then taken over.
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), "clusterlink-system");
        let now = k8s_openapi::jiff::Timestamp::now();
        let d = std::time::Duration::from_secs(15);
        assert!(
            crate::election::round(&leases, "clusterlink-dns", "pod-a", d, now)
                .await
                .unwrap()
        );
        assert!(
            crate::election::round(&leases, "clusterlink-dns", "pod-a", d, now)
                .await
                .unwrap()
        );
        drop(leases);
        drop(mirror);
        drop(client);
        let needed = recorder.await.unwrap();
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/base/member/dns-rbac.yaml");
        clusterlink_testkit::rbac::check(
            &needed,
            &file,
            &["clusterlink-dns", "clusterlink-dns-namespaced"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The controller works from watches: a ServiceExport added after the list reaches the
    /// mirror, and wakes it, without another list.
    #[tokio::test]
    async fn the_mirror_follows_watch_events_and_wakes_the_controller() {
        let export = |name: &str| {
            serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport", "metadata": {"name": name, "namespace": "demo",
                "resourceVersion": "2"}})
        };
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let lists = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = lists.clone();
        let first = export("echo");
        let added = export("other");
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut exports_watched = false;
            while let Some((request, send)) = handle.next_request().await {
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or("").to_owned();
                let body = if query.contains("watch=true") {
                    if path.ends_with("/serviceexports") && !exports_watched {
                        exports_watched = true;
                        let mut line = serde_json::to_vec(
                            &serde_json::json!({"type": "ADDED", "object": added}),
                        )
                        .unwrap();
                        line.push(b'\n');
                        send.send_response(Response::new(Body::from(line)));
                    } else {
                        held.push(send);
                    }
                    continue;
                } else {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let items = if path.ends_with("/serviceexports") {
                        serde_json::json!([first])
                    } else {
                        serde_json::json!([])
                    };
                    serde_json::json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "1"}, "items": items})
                };
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&body).unwrap(),
                )));
            }
        });
        let mirror = Mirror::start(Client::new(service, "default"));
        tokio::time::timeout(std::time::Duration::from_secs(10), mirror.ready())
            .await
            .expect("listed");
        let changed = mirror.changed();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let mut names: Vec<String> = mirror
                    .snapshot()
                    .exports
                    .iter()
                    .filter_map(|e| e.metadata.name.clone())
                    .collect();
                names.sort();
                if names == ["echo", "other"] {
                    return;
                }
                changed.notified().await;
            }
        })
        .await
        .expect("the export added by the watch reaches the mirror");
        assert_eq!(
            lists.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "one list per kind, no more"
        );
    }
}
