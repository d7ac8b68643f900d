//! The node a component runs on, as the Kubernetes API describes it (feature `kube`): its
//! internal address, its pod CIDRs, and what an operator says of it in annotations of
//! clusterlink's own group. Read once at start by the gateway and the route agent in their
//! Kubernetes mode; [`facts`] is pure, [`read`] the one API call.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use thiserror::Error;

/// The address other clusters' gateways reach this gateway at, when it is not the node's
/// internal address (a NAT's, a load balancer's).
pub const PUBLIC_ADDRESS_ANNOTATION: &str = "gateway.clusterlink.dev/public-address";
/// The gateway's address on its TUN device, when the default (the last address of the node's
/// IPv4 pod CIDR) would collide with the CNI's allocations.
pub const TUNNEL_IP_ANNOTATION: &str = "gateway.clusterlink.dev/tunnel-ip";
/// The label that puts a gateway on a node (the gateway DaemonSet's node selector).
pub const GATEWAY_LABEL: &str = "gateway.clusterlink.dev/enabled";

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("cannot read node {node} from the Kubernetes API: {source}")]
    Api {
        node: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "node {node} has no InternalIP in status.addresses; give the address with --private-addr (gateway) or --node-ip (route agent)"
    )]
    NoInternalIp { node: String },
    #[error("node {node}: {what} {value:?} is not valid: {reason}")]
    Invalid {
        node: String,
        what: String,
        value: String,
        reason: String,
    },
    #[error(
        "node {node} has no IPv4 pod CIDR (spec.podCIDRs) to take the gateway's tunnel address from (the CNI may not allocate per node); annotate the node with {TUNNEL_IP_ANNOTATION}=ADDRESS (inside the cluster's pod CIDR, unused by pods) or give --tunnel-ip"
    )]
    NoPodCidr { node: String },
}

/// What a component needs to know of its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub internal_ip: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
    pub public_address: Option<IpAddr>,
    pub tunnel_ip: Option<Ipv4Addr>,
}

impl NodeFacts {
    /// The gateway's TUN address: the annotation's, or the last usable address of the node's
    /// first IPv4 pod CIDR (host-local IPAM hands addresses out from the start of the range).
    pub fn tunnel_ip(&self) -> Result<Ipv4Addr, NodeError> {
        if let Some(ip) = self.tunnel_ip {
            return Ok(ip);
        }
        self.pod_cidrs
            .iter()
            .find_map(|n| match n {
                IpNet::V4(n) if n.prefix_len() <= 30 => Some(last_usable(n)),
                _ => None,
            })
            .ok_or_else(|| NodeError::NoPodCidr {
                node: self.name.clone(),
            })
    }
}

fn last_usable(n: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(n.broadcast()).saturating_sub(1))
}

/// The facts of `node`, checked: an address or CIDR that does not parse is an error naming it.
pub fn facts(node: &Node) -> Result<NodeFacts, NodeError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let invalid = |what: &str, value: &str, reason: String| NodeError::Invalid {
        node: name.clone(),
        what: what.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let internal = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
        .ok_or_else(|| NodeError::NoInternalIp { node: name.clone() })?;
    let internal_ip = internal
        .address
        .parse()
        .map_err(|e: std::net::AddrParseError| {
            invalid("InternalIP", &internal.address, e.to_string())
        })?;
    let spec = node.spec.clone().unwrap_or_default();
    let mut cidrs: Vec<String> = spec.pod_cidrs.unwrap_or_default();
    if cidrs.is_empty()
        && let Some(c) = spec.pod_cidr
    {
        cidrs.push(c);
    }
    let pod_cidrs = cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map_err(|e| invalid("pod CIDR", c, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    let public_address = annotations
        .get(PUBLIC_ADDRESS_ANNOTATION)
        .map(|v| {
            v.parse::<IpAddr>()
                .map_err(|e| invalid(PUBLIC_ADDRESS_ANNOTATION, v, e.to_string()))
        })
        .transpose()?;
    let tunnel_ip = annotations
        .get(TUNNEL_IP_ANNOTATION)
        .map(|v| {
            v.parse::<Ipv4Addr>()
                .map_err(|e| invalid(TUNNEL_IP_ANNOTATION, v, e.to_string()))
        })
        .transpose()?;
    Ok(NodeFacts {
        name,
        internal_ip,
        pod_cidrs,
        public_address,
        tunnel_ip,
    })
}

/// A key of a Secret holding a credentials file (`NAMESPACE/NAME`, key `credentials.yaml`).
#[derive(Clone)]
pub struct SecretRef {
    pub client: kube::Client,
    pub namespace: String,
    pub name: String,
    pub key: String,
}

impl std::fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret {}/{} key {}",
            self.namespace, self.name, self.key
        )
    }
}

/// The key a credentials Secret holds the file under.
pub const CREDENTIALS_KEY: &str = "credentials.yaml";

impl SecretRef {
    /// Parses `NAMESPACE/NAME`.
    pub fn parse(client: kube::Client, s: &str) -> Result<Self, String> {
        let (namespace, name) = s
            .split_once('/')
            .filter(|(n, m)| !n.is_empty() && !m.is_empty() && !m.contains('/'))
            .ok_or_else(|| format!("{s:?} is not NAMESPACE/NAME"))?;
        Ok(SecretRef {
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key: CREDENTIALS_KEY.to_owned(),
        })
    }

    fn api(&self) -> kube::Api<k8s_openapi::api::core::v1::Secret> {
        kube::Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Can the Secret be read (and so, with the same grant, written)?
    pub async fn check(&self) -> Result<(), kube::Error> {
        self.api().get(&self.name).await.map(drop)
    }

    /// Replaces the key's value (a merge patch: the Secret's other keys stay).
    pub async fn write(&self, value: Vec<u8>) -> Result<(), kube::Error> {
        let patch = serde_json::json!({ "data": {
            &self.key: k8s_openapi::ByteString(value) } });
        self.api()
            .patch(
                &self.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .map(drop)
    }
}

/// Reads node `name` (the pod's own, from the downward API) and its facts.
pub async fn read(client: kube::Client, name: &str) -> Result<NodeFacts, NodeError> {
    let node = kube::Api::<Node>::all(client)
        .get(name)
        .await
        .map_err(|e| NodeError::Api {
            node: name.to_owned(),
            source: Box::new(e),
        })?;
    facts(&node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn facts_from_a_node_and_its_annotations() {
        let n = node(serde_json::json!({
            "metadata": {"name": "gw-1", "annotations": {
                PUBLIC_ADDRESS_ANNOTATION: "203.0.113.7"}},
            "spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24", "fd00:3::/64"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "gw-1"},
                {"type": "InternalIP", "address": "192.168.1.21"}]}
        }));
        let f = facts(&n).unwrap();
        assert_eq!(f.internal_ip, "192.168.1.21".parse::<IpAddr>().unwrap());
        assert_eq!(f.pod_cidrs.len(), 2);
        assert_eq!(f.public_address, Some("203.0.113.7".parse().unwrap()));
        // The last usable address of the IPv4 pod CIDR, unless annotated.
        assert_eq!(f.tunnel_ip().unwrap(), Ipv4Addr::new(10, 244, 3, 254));
        let mut annotated = n.clone();
        annotated
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(TUNNEL_IP_ANNOTATION.into(), "10.244.255.1".into());
        assert_eq!(
            facts(&annotated).unwrap().tunnel_ip().unwrap(),
            Ipv4Addr::new(10, 244, 255, 1)
        );
        // Only the old single field: still read.
        let old = node(serde_json::json!({
            "metadata": {"name": "w"}, "spec": {"podCIDR": "10.1.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}));
        assert_eq!(
            facts(&old).unwrap().tunnel_ip().unwrap(),
            Ipv4Addr::new(10, 1, 2, 254)
        );
    }

    #[test]
    fn what_a_node_lacks_or_gets_wrong_is_named() {
        let no_ip =
            node(serde_json::json!({"metadata": {"name": "n1"}, "status": {"addresses": []}}));
        let e = facts(&no_ip).unwrap_err().to_string();
        assert!(
            e.contains("n1 has no InternalIP") && e.contains("--private-addr"),
            "{e}"
        );
        let no_cidr = node(serde_json::json!({"metadata": {"name": "n2"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}));
        let e = facts(&no_cidr)
            .unwrap()
            .tunnel_ip()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(TUNNEL_IP_ANNOTATION) && e.contains("--tunnel-ip"),
            "{e}"
        );
        let bad = node(serde_json::json!({"metadata": {"name": "n3",
            "annotations": {PUBLIC_ADDRESS_ANNOTATION: "not-an-ip"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}));
        let e = facts(&bad).unwrap_err().to_string();
        assert!(e.contains("n3") && e.contains("not-an-ip"), "{e}");
    }

    #[tokio::test]
    async fn read_gets_the_node_by_name_from_the_api() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a request");
            let path = request.uri().path().to_owned();
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "gw-1"}, "spec": {"podCIDRs": ["10.244.3.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.21"}]}});
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&body).unwrap(),
            )));
            (request.method().clone(), path)
        });
        let f = read(kube::Client::new(service, "default"), "gw-1")
            .await
            .unwrap();
        assert_eq!(f.name, "gw-1");
        let (method, path) = server.await.unwrap();
        assert_eq!(method, http::Method::GET);
        assert_eq!(path, "/api/v1/nodes/gw-1");
        // Refused by the API (403): the error names the node and says why.
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("a request");
            let status = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "message": "nodes \"gw-1\" is forbidden: User cannot get resource \"nodes\"",
                "reason": "Forbidden", "code": 403});
            let mut r = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
            *r.status_mut() = http::StatusCode::FORBIDDEN;
            send.send_response(r);
        });
        let e = read(kube::Client::new(service, "default"), "gw-1")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read node gw-1") && e.contains("forbidden"),
            "{e}"
        );
    }

    /// The gateway's and the route agent's ClusterRoles grant exactly what reading their
    /// Node needs.
    #[tokio::test]
    async fn the_node_readers_roles_grant_exactly_what_they_use() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let recorder = tokio::spawn(async move {
            let mut needed = std::collections::BTreeSet::new();
            while let Some((request, send)) = handle.next_request().await {
                needed.extend(clusterlink_testkit::rbac::needs(
                    request.method().as_str(),
                    request.uri().path(),
                    "",
                ));
                let body = serde_json::json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "gw-1"}, "spec": {"podCIDRs": ["10.244.3.0/24"]},
                    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.21"}]}});
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&body).unwrap(),
                )));
            }
            needed
        });
        let client = kube::Client::new(service, "default");
        read(client.clone(), "gw-1").await.unwrap();
        drop(client);
        let needed = recorder.await.unwrap();
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/base/member/node-rbac.yaml");
        for role in ["clusterlink-gateway", "clusterlink-route-agent"] {
            clusterlink_testkit::rbac::check(&needed, &file, &[role])
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
