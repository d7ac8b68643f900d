//! What `join --kubeconfig` learns of a cluster from its API before it joins: the pod and
//! service CIDRs. The service CIDRs from the `ServiceCIDR` objects (Kubernetes 1.33 and
//! later), else kubeadm's ClusterConfiguration; the pod CIDRs from kubeadm's, else
//! kube-proxy's `clusterCIDR`. What cannot be told is an error naming the flag to give. The
//! parsers are pure; [`discover`] makes the reads.

use anyhow::{Context, Result, anyhow};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, ListParams};

/// kubeadm's ClusterConfiguration (ConfigMap kube-system/kubeadm-config, key
/// ClusterConfiguration): `networking.podSubnet` and `networking.serviceSubnet`, each one
/// CIDR or a comma-separated pair (dual stack).
pub fn from_kubeadm(text: &str) -> Result<(Vec<IpNet>, Vec<IpNet>)> {
    let doc: serde_json::Value =
        serde_saphyr::from_str(text).context("kubeadm's ClusterConfiguration is not YAML")?;
    let field = |k: &str| -> Result<Vec<IpNet>> {
        doc["networking"][k]
            .as_str()
            .map(|v| cidrs(v, &format!("kubeadm networking.{k}")))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    Ok((field("podSubnet")?, field("serviceSubnet")?))
}

/// kube-proxy's configuration (ConfigMap kube-system/kube-proxy, key config.conf):
/// `clusterCIDR`, the pods' range.
pub fn from_kube_proxy(text: &str) -> Result<Vec<IpNet>> {
    let doc: serde_json::Value =
        serde_saphyr::from_str(text).context("kube-proxy's configuration is not YAML")?;
    doc["clusterCIDR"]
        .as_str()
        .filter(|v| !v.is_empty())
        .map(|v| cidrs(v, "kube-proxy clusterCIDR"))
        .transpose()
        .map(Option::unwrap_or_default)
}

fn cidrs(v: &str, what: &str) -> Result<Vec<IpNet>> {
    v.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .map(|n| n.trunc())
                .with_context(|| format!("{what}: {c:?} is not a CIDR"))
        })
        .collect()
}

/// A ConfigMap's key, `None` when the ConfigMap does not exist.
async fn config_key(api: &Api<ConfigMap>, name: &str, key: &str) -> Result<Option<String>> {
    match api.get_opt(name).await {
        Ok(cm) => Ok(cm.and_then(|cm| cm.data).and_then(|d| d.get(key).cloned())),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(anyhow!(
            "reading ConfigMap kube-system/{name} is forbidden ({}); give the CIDRs with --pod-cidr and --service-cidr, or use credentials that may read it",
            s.message
        )),
        Err(e) => Err(e).with_context(|| format!("Cannot read ConfigMap kube-system/{name}")),
    }
}

/// The cluster's pod and service CIDRs, as far as its API tells them; each empty list is what
/// it could not tell.
pub async fn discover(client: kube::Client) -> Result<(Vec<IpNet>, Vec<IpNet>)> {
    let mut services = match Api::<ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list
            .items
            .iter()
            .flat_map(|s| {
                s.spec
                    .as_ref()
                    .and_then(|s| s.cidrs.clone())
                    .unwrap_or_default()
            })
            .map(|c| cidrs(&c, "ServiceCIDR"))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect(),
        // Before Kubernetes 1.33 (or with the API off): no such resource.
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(e) => return Err(e).context("Cannot list the cluster's ServiceCIDRs"),
    };
    let config_maps = Api::<ConfigMap>::namespaced(client, "kube-system");
    let (mut pods, kubeadm_services) =
        match config_key(&config_maps, "kubeadm-config", "ClusterConfiguration").await? {
            Some(text) => from_kubeadm(&text)?,
            None => (Vec::new(), Vec::new()),
        };
    if services.is_empty() {
        services = kubeadm_services;
    }
    if pods.is_empty()
        && let Some(text) = config_key(&config_maps, "kube-proxy", "config.conf").await?
    {
        pods = from_kube_proxy(&text)?;
    }
    Ok((pods, services))
}

/// The namespace the member components run in, and the Secret they read their credentials
/// from (deploy/base/member).
pub const NAMESPACE: &str = "clusterlink-system";
pub const CREDENTIALS_SECRET: &str = "clusterlink-credentials";

/// Puts the credentials file's text in the Secret the member components mount (server-side
/// apply, field manager `clusterlink`; the namespace made if missing).
pub async fn store_credentials(client: kube::Client, text: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use kube::api::{Patch, PatchParams};
    let pp = PatchParams::apply("clusterlink").force();
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "clusterlink"}}});
    Api::<Namespace>::all(client.clone())
        .patch(NAMESPACE, &pp, &Patch::Apply(&ns))
        .await
        .with_context(|| format!("Cannot make the namespace {NAMESPACE}"))?;
    let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": CREDENTIALS_SECRET, "namespace": NAMESPACE,
                     "labels": {"app.kubernetes.io/part-of": "clusterlink"}},
        "type": "Opaque",
        "stringData": {clusterlink_broker_client::node::CREDENTIALS_KEY: text}});
    Api::<Secret>::namespaced(client, NAMESPACE)
        .patch(CREDENTIALS_SECRET, &pp, &Patch::Apply(&secret))
        .await
        .with_context(|| format!("Cannot write the Secret {NAMESPACE}/{CREDENTIALS_SECRET}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response, StatusCode};
    use kube::client::Body;

    #[test]
    fn kubeadm_and_kube_proxy_configurations_are_read() {
        let (p, s) = from_kubeadm(
            "apiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\nnetworking:\n  dnsDomain: cluster.local\n  podSubnet: 10.244.0.0/16,fd00:10:244::/56\n  serviceSubnet: 10.96.0.0/12\n",
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(s, ["10.96.0.0/12".parse::<IpNet>().unwrap()]);
        let (p, s) = from_kubeadm("networking: {dnsDomain: cluster.local}\n").unwrap();
        assert!(p.is_empty() && s.is_empty());
        assert!(from_kubeadm("networking: {podSubnet: not-a-cidr}\n").is_err());
        assert_eq!(
            from_kube_proxy(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nclusterCIDR: 10.42.0.0/16\n"
            )
            .unwrap(),
            ["10.42.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(from_kube_proxy("clusterCIDR: \"\"\n").unwrap().is_empty());
    }

    fn answer(status: StatusCode, body: serde_json::Value) -> Response<Body> {
        let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
        *r.status_mut() = status;
        r
    }

    fn not_found() -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"})
    }

    /// Request by request against kube's mock: ServiceCIDRs first; kubeadm's ConfigMap for
    /// the pods; kube-proxy's only when kubeadm's says nothing of them.
    #[tokio::test]
    async fn discovery_reads_service_cidrs_then_kubeadm_then_kube_proxy() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            let script = vec![
                answer(
                    StatusCode::OK,
                    serde_json::json!({"apiVersion": "networking.k8s.io/v1",
                    "kind": "ServiceCIDRList", "metadata": {"resourceVersion": "1"},
                    "items": [{"metadata": {"name": "kubernetes"},
                               "spec": {"cidrs": ["10.96.0.0/12"]}}]}),
                ),
                answer(
                    StatusCode::OK,
                    serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
                    "data": {"ClusterConfiguration": "networking:\n  serviceSubnet: 10.200.0.0/16\n"}}),
                ),
                answer(
                    StatusCode::OK,
                    serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
                    "data": {"config.conf": "clusterCIDR: 10.244.0.0/16\n"}}),
                ),
            ];
            for response in script {
                let (request, send) = handle.next_request().await.expect("a request");
                paths.push(request.uri().path().to_owned());
                send.send_response(response);
            }
            paths
        });
        let (pods, services) = discover(kube::Client::new(service, "default"))
            .await
            .unwrap();
        assert_eq!(pods, ["10.244.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(
            services,
            ["10.96.0.0/12".parse::<IpNet>().unwrap()],
            "the ServiceCIDR objects win over kubeadm's"
        );
        assert_eq!(
            server.await.unwrap(),
            [
                "/apis/networking.k8s.io/v1/servicecidrs",
                "/api/v1/namespaces/kube-system/configmaps/kubeadm-config",
                "/api/v1/namespaces/kube-system/configmaps/kube-proxy",
            ]
        );
    }

    #[tokio::test]
    async fn an_older_cluster_without_service_cidrs_or_kubeadm_tells_what_it_can() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            for response in [
                answer(StatusCode::NOT_FOUND, not_found()),
                answer(StatusCode::NOT_FOUND, not_found()),
                answer(StatusCode::NOT_FOUND, not_found()),
            ] {
                let (_, send) = handle.next_request().await.expect("a request");
                send.send_response(response);
            }
        });
        let (pods, services) = discover(kube::Client::new(service, "default"))
            .await
            .unwrap();
        assert!(pods.is_empty() && services.is_empty());
    }

    #[tokio::test]
    async fn a_forbidden_read_says_which_flags_to_give() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let forbidden = serde_json::json!({"apiVersion": "v1", "kind": "Status",
                "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": "configmaps \"kubeadm-config\" is forbidden"});
            for response in [
                answer(StatusCode::NOT_FOUND, not_found()),
                answer(StatusCode::FORBIDDEN, forbidden),
            ] {
                let (_, send) = handle.next_request().await.expect("a request");
                send.send_response(response);
            }
        });
        let e = discover(kube::Client::new(service, "default"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("forbidden") && e.contains("--pod-cidr"), "{e}");
    }
}
