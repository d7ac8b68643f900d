//! What the scenarios share: the binary under test, a ping, and the test-only hooks that
//! stand in for a cluster's components at the broker.

use clusterlink_api::proto::broker_client::BrokerClient;
use clusterlink_api::{Kind, Record, RecordKey, proto};
use clusterlink_lab::{Lab, Netns, TestbedError};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_clusterlink");

/// One ping, one second to answer.
pub fn ping(from: &Netns, to: &str) -> bool {
    from.exec("ping", &["-c1", "-W1", to]).is_ok()
}

/// Broker calls made as one of the lab's clusters, for tests that stand in for one of its
/// components (a gateway that publishes an endpoint by hand, say).
pub trait AsCluster {
    /// Publishes a record as cluster `cluster` (its credentials, from its first node,
    /// without a lease).
    fn publish(&self, cluster: usize, record: Record) -> Result<(), TestbedError>;
    /// Withdraws cluster `cluster`'s record of `kind` named `name` (NODE for gateways,
    /// NAMESPACE/NAME for services).
    fn withdraw(&self, cluster: usize, kind: Kind, name: &str) -> Result<(), TestbedError>;
}

impl AsCluster for Lab {
    fn publish(&self, cluster: usize, record: Record) -> Result<(), TestbedError> {
        as_cluster(self, cluster, move |mut client| async move {
            client
                .publish(proto::PublishRequest {
                    record: Some(record.into()),
                    lease_id: 0,
                    expected_revision: 0,
                    create_only: false,
                })
                .await
                .map(|_| ())
        })
    }

    fn withdraw(&self, cluster: usize, kind: Kind, name: &str) -> Result<(), TestbedError> {
        let owner = self.state.clusters[cluster].name.parse().map_err(
            |e: clusterlink_api::ValidationError| TestbedError::Command {
                command: "withdraw".into(),
                stderr: e.to_string(),
            },
        )?;
        let key = RecordKey::from_name(kind, &owner, name).map_err(|e| TestbedError::Command {
            command: "withdraw".into(),
            stderr: e.to_string(),
        })?;
        as_cluster(self, cluster, move |mut client| async move {
            client
                .withdraw(proto::WithdrawRequest {
                    kind: key.kind().to_proto() as i32,
                    name: key.name(),
                })
                .await
                .map(|_| ())
        })
    }
}

/// Runs one broker call with cluster `cluster`'s credentials, from its first node.
fn as_cluster<F, Fut>(lab: &Lab, cluster: usize, call: F) -> Result<(), TestbedError>
where
    F: FnOnce(BrokerClient<Channel>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let c = &lab.state.clusters[cluster];
    let err = |stderr: String| TestbedError::Command {
        command: format!("a broker call as cluster {}", c.name),
        stderr,
    };
    let creds = clusterlink_broker_client::Credentials::read(&c.credentials)
        .map_err(|e| err(e.to_string()))?;
    c.nodes[0]
        .node
        .ns()
        .run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let client = clusterlink_broker_client::connect_with(&creds)
                    .await
                    .map_err(|e| e.to_string())?;
                call(client).await.map_err(|s| s.message().to_owned())
            })
        })?
        .map_err(err)
}

/// Every component of the lab and what its `/readyz` answers (`None`: nothing answered).
pub fn readiness(lab: &Lab) -> Vec<(String, Option<(u16, String)>)> {
    use clusterlink_lab::invoke::{
        AGENT_HEALTH_PORT, BROKER_HEALTH_PORT, DNS_HEALTH_PORT, GATEWAY_HEALTH_PORT,
    };
    use clusterlink_lab::lab::http_get;
    let ns = |name: &str| Netns {
        name: name.to_owned(),
    };
    let mut out = vec![(
        "broker".to_owned(),
        http_get(
            &ns(&lab.state.broker_namespace),
            BROKER_HEALTH_PORT,
            "/readyz",
        ),
    )];
    for c in &lab.state.clusters {
        for g in &c.gateways {
            out.push((
                format!("gateway {}", g.node),
                http_get(&ns(&g.namespace), GATEWAY_HEALTH_PORT, "/readyz"),
            ));
        }
        for n in &c.nodes {
            out.push((
                format!("route agent {}", n.node.name),
                http_get(&n.node.ns(), AGENT_HEALTH_PORT, "/readyz"),
            ));
        }
        out.push((
            format!("DNS plugin {}", c.name),
            http_get(&c.nodes[0].node.ns(), DNS_HEALTH_PORT, "/readyz"),
        ));
    }
    out
}

/// Is every component ready?
pub fn all_ready(lab: &Lab) -> bool {
    readiness(lab)
        .iter()
        .all(|(_, r)| matches!(r, Some((200, _))))
}

/// Clusters of one gateway node and one worker node each, no NAT.
pub fn small(names: &[&str]) -> Vec<clusterlink_lab::ClusterSpec> {
    names
        .iter()
        .map(|name| clusterlink_lab::ClusterSpec {
            name: (*name).into(),
            gateways: 1,
            workers: 1,
            nat: false,
        })
        .collect()
}

/// Every log of the lab, for a failure's message.
pub fn logs(lab: &Lab) -> String {
    std::fs::read_dir(&lab.state.dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| {
                    format!(
                        "--- {}\n{}\n",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
