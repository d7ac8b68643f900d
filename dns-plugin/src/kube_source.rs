//! The Kubernetes side of `export`/`unexport`: the ServiceExport object through the API
//! server (kube-rs). Tested against kube's tower-test mock of the API server.

use clusterlink_api::mcs::{ServiceExport, ServiceExportSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use thiserror::Error;

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
}
