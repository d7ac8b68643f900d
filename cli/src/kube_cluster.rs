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

/// The member overlay, rendered (`kubectl kustomize deploy/overlays/member`; a test fails
/// when this copy differs from what kustomize renders, so the two never drift).
pub const MEMBER_MANIFESTS: &str = include_str!("../../deploy/rendered/member.yaml");

/// The plural (the API's resource name) and scope of each kind the member overlay holds.
fn resource_of(kind: &str) -> Option<(&'static str, bool)> {
    Some(match kind {
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "Namespace" => ("namespaces", false),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "DaemonSet" => ("daemonsets", true),
        "Deployment" => ("deployments", true),
        "Service" => ("services", true),
        "PodDisruptionBudget" => ("poddisruptionbudgets", true),
        _ => return None,
    })
}

/// The member overlay's objects, in order, with `image` (if given) in place of the
/// overlay's for every container.
pub fn member_objects(image: Option<&str>) -> Result<Vec<serde_json::Value>> {
    let mut docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(MEMBER_MANIFESTS)
        .context("the rendered member overlay is not YAML")?;
    if let Some(image) = image {
        for doc in &mut docs {
            let spec = &mut doc["spec"]["template"]["spec"];
            for list in ["initContainers", "containers"] {
                if let Some(cs) = spec[list].as_array_mut() {
                    for c in cs {
                        c["image"] = serde_json::Value::String(image.to_owned());
                    }
                }
            }
        }
    }
    Ok(docs)
}

/// Server-side applies the member overlay (field manager `clusterlink`, forced: the objects
/// are clusterlink's), in its order (CRDs and the namespace first). Returns what was applied
/// (`kind/name`).
pub async fn apply_member(client: kube::Client, image: Option<&str>) -> Result<Vec<String>> {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    let pp = PatchParams::apply("clusterlink").force();
    let mut applied = Vec::new();
    for doc in member_objects(image)? {
        let (api_version, kind) = (
            doc["apiVersion"].as_str().unwrap_or_default(),
            doc["kind"].as_str().unwrap_or_default(),
        );
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (plural, namespaced) = resource_of(kind)
            .ok_or_else(|| anyhow!("the member overlay holds a {kind} that join cannot apply"))?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = if namespaced {
            let ns = doc["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE);
            Api::namespaced_with(client.clone(), ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        api.patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .with_context(|| format!("Cannot apply {kind} {name}"))?;
        applied.push(format!("{kind}/{name}"));
    }
    Ok(applied)
}

/// Labels the nodes that run a gateway (`gateway.clusterlink.dev/enabled=true`).
pub async fn label_gateways(client: kube::Client, nodes: &[String]) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Patch, PatchParams};
    for node in nodes {
        let patch = serde_json::json!({"metadata": {"labels": {
            clusterlink_broker_client::node::GATEWAY_LABEL: "true"}}});
        Api::<Node>::all(client.clone())
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("Cannot label node {node} as a gateway"))?;
    }
    Ok(())
}

/// The server block CoreDNS needs for the cluster set's zone (deploy/coredns/Corefile.snippet,
/// its comments left out), forwarding to `dns` (the clusterlink-dns Service's address).
pub fn clusterset_block(dns: &str) -> String {
    let snippet = include_str!("../../deploy/coredns/Corefile.snippet");
    let body: String = snippet
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    body.replace("CLUSTERLINK_DNS", dns)
}

/// The Corefile with the cluster set's zone forwarded to `dns`; `None` when it has a
/// `clusterset.local` block already (left as the operator made it).
pub fn with_clusterset_forward(corefile: &str, dns: &str) -> Option<String> {
    if corefile
        .lines()
        .any(|l| l.trim_start().starts_with("clusterset.local"))
    {
        return None;
    }
    let mut out = corefile.trim_end().to_owned();
    out.push('\n');
    out.push_str(&clusterset_block(dns));
    Some(out)
}

/// What the CoreDNS step did.
#[derive(Debug, PartialEq, Eq)]
pub enum CoreDns {
    Added {
        forward_to: String,
    },
    AlreadyThere,
    /// No kube-system/coredns ConfigMap: the cluster's DNS is something else.
    NotCoreDns {
        forward_to: String,
    },
}

/// Forwards `clusterset.local` from the cluster's CoreDNS to the clusterlink-dns Service.
pub async fn forward_clusterset(client: kube::Client) -> Result<CoreDns> {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Patch, PatchParams};
    let service = Api::<Service>::namespaced(client.clone(), NAMESPACE)
        .get("clusterlink-dns")
        .await
        .context("Cannot read the clusterlink-dns Service")?;
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or_else(|| {
            anyhow!("the clusterlink-dns Service has no cluster IP yet; run the same join again")
        })?;
    let config_maps = Api::<ConfigMap>::namespaced(client, "kube-system");
    let Some(corefile) = config_key(&config_maps, "coredns", "Corefile").await? else {
        return Ok(CoreDns::NotCoreDns { forward_to: ip });
    };
    match with_clusterset_forward(&corefile, &ip) {
        None => Ok(CoreDns::AlreadyThere),
        Some(next) => {
            let patch = serde_json::json!({"data": {"Corefile": next}});
            config_maps
                .patch("coredns", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .context("Cannot edit kube-system/coredns")?;
            Ok(CoreDns::Added { forward_to: ip })
        }
    }
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

    #[test]
    fn the_member_objects_are_all_appliable_and_take_the_image() {
        let docs = member_objects(Some("registry.example/clusterlink:1.2")).unwrap();
        assert!(docs.len() > 10);
        for d in &docs {
            let kind = d["kind"].as_str().unwrap();
            assert!(resource_of(kind).is_some(), "join cannot apply a {kind}");
        }
        let images: Vec<&str> = docs
            .iter()
            .flat_map(|d| {
                d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|c| c["image"].as_str().unwrap_or_default().to_owned())
            .map(|s| Box::leak(s.into_boxed_str()) as &str)
            .collect();
        assert_eq!(images.len(), 3);
        assert!(
            images
                .iter()
                .all(|i| *i == "registry.example/clusterlink:1.2"),
            "{images:?}"
        );
        // The CRDs and the namespace come first: what follows needs them.
        assert_eq!(docs[0]["kind"], "Namespace");
    }

    #[test]
    fn the_clusterset_zone_is_added_to_a_corefile_once() {
        let corefile = ".:53 {\n    errors\n    kubernetes cluster.local in-addr.arpa ip6.arpa\n    forward . /etc/resolv.conf\n}\n";
        let next = with_clusterset_forward(corefile, "10.96.0.53").unwrap();
        assert!(
            next.starts_with(".:53 {"),
            "the existing block stays first: {next}"
        );
        assert!(next.contains("clusterset.local:53 {"), "{next}");
        assert!(next.contains("forward . 10.96.0.53 {"), "{next}");
        assert!(!next.contains('#'), "no comments: {next}");
        assert_eq!(with_clusterset_forward(&next, "10.96.0.99"), None, "once");
    }
}
