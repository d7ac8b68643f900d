//! `clusterlink show …`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use clusterlink_api::{Kind, Record, proto};
use clusterlink_broker_client::{connect_with, rfc3339_from_unix_ms};
use serde::Serialize;

use super::{CredentialsArg, call};
use clusterlink_cli::output::{Format, Tabular, print, render};

#[derive(Subcommand)]
pub enum ShowCommand {
    /// The clusters joined to the broker.
    Clusters(ShowArgs),
    /// Every cluster's gateway nodes and where they are reached.
    Gateways(ShowArgs),
    /// The tunnels between clusters: state, RTT, last handshake, bytes each way. A state
    /// change shows at once; RTT and bytes are refreshed every 5 s.
    Connections(ShowArgs),
    /// Exported services: which clusters export each, and which of those are healthy.
    Services(ShowArgs),
    /// The broker's recent admin actions and refusals (admin credentials; this broker's
    /// own, newest last; the full trail is in its log, target clusterlink::audit).
    Events(EventsArgs),
}

#[derive(Args)]
pub struct EventsArgs {
    /// At most this many, newest last (0: all the broker keeps, up to 1,000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    pub at: String,
    pub who: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub reason: String,
}

impl Tabular for EventView {
    fn header() -> Vec<&'static str> {
        vec!["AT", "WHO", "ACTION", "TARGET", "OUTCOME", "REASON"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.at.clone(),
            self.who.clone(),
            self.action.clone(),
            self.target.clone(),
            self.outcome.clone(),
            self.reason.clone(),
        ]
    }
}

async fn events(a: EventsArgs) -> Result<()> {
    let creds = a.show.credentials.load()?;
    let mut client = connect_with(&creds).await?;
    let resp = call(
        "list events",
        client.list_events(proto::ListEventsRequest { limit: a.limit }),
    )
    .await?;
    let rows: Vec<EventView> = resp
        .events
        .into_iter()
        .map(|e| EventView {
            at: rfc3339_from_unix_ms(e.at_unix_ms),
            who: e.who,
            action: e.action,
            target: e.target,
            outcome: if e.refused { "refused" } else { "done" }.into(),
            reason: e.reason,
        })
        .collect();
    print(&render(&rows, a.show.output)?);
    Ok(())
}

#[derive(Args)]
pub struct ShowArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(flatten)]
    pub credentials: CredentialsArg,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub id: String,
    pub pod_cidrs: Vec<String>,
    pub service_cidrs: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub joined_at: String,
    /// When the cluster's certificate expires (empty if the broker did not record it).
    pub certificate_expires_at: String,
}

impl Tabular for ClusterView {
    fn header() -> Vec<&'static str> {
        vec![
            "CLUSTER",
            "POD CIDRS",
            "SERVICE CIDRS",
            "LABELS",
            "JOINED",
            "CERT EXPIRES",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.pod_cidrs.join(","),
            self.service_cidrs.join(","),
            self.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            self.joined_at.clone(),
            self.certificate_expires_at.clone(),
        ]
    }
}

pub async fn run(c: ShowCommand) -> Result<()> {
    match c {
        ShowCommand::Clusters(a) => clusters(a).await,
        ShowCommand::Gateways(a) => gateways(a).await,
        ShowCommand::Connections(a) => connections(a).await,
        ShowCommand::Services(a) => services(a).await,
        ShowCommand::Events(a) => events(a).await,
    }
}

/// The first `n` items and how many more: a headless service of 200 endpoints is one line in a
/// table (`-o json|yaml` lists every one).
fn summarize(items: &[String], n: usize) -> String {
    if items.len() <= n {
        items.join(",")
    } else {
        format!("{},… (+{} more)", items[..n].join(","), items.len() - n)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub service: String,
    pub cluster: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub addresses: Vec<String>,
    pub ports: Vec<String>,
    pub ready_endpoints: usize,
    pub ready: bool,
    /// Clusters with a connected tunnel to this one, of the others.
    pub reachable_from: Vec<String>,
    /// Ready, and every other cluster has a connected tunnel to it.
    pub healthy: bool,
}

impl Tabular for ServiceView {
    fn header() -> Vec<&'static str> {
        vec![
            "SERVICE",
            "CLUSTER",
            "TYPE",
            "ADDRESSES",
            "PORTS",
            "READY",
            "REACHABLE FROM",
            "HEALTHY",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.cluster.clone(),
            self.type_.clone(),
            summarize(&self.addresses, 4),
            self.ports.join(","),
            format!(
                "{} ({} endpoints)",
                if self.ready { "yes" } else { "no" },
                self.ready_endpoints
            ),
            self.reachable_from.join(","),
            if self.healthy { "yes" } else { "no" }.into(),
        ]
    }
}

async fn services(a: ShowArgs) -> Result<()> {
    let records = list(&a, Kind::Services).await?;
    let connections = list(&a, Kind::Connections).await?;
    let clusters = list(&a, Kind::Clusters).await?.len();
    let mut rows = Vec::new();
    for r in records {
        let Record::Service(s) = r else { continue };
        let reachable_from: std::collections::BTreeSet<String> = connections
            .iter()
            .filter_map(|c| match c {
                Record::Connection(c)
                    if c.to_cluster == s.cluster
                        && c.state == clusterlink_api::ConnectionState::Connected =>
                {
                    Some(c.from_cluster.to_string())
                }
                _ => None,
            })
            .collect();
        let addresses: Vec<String> = match s.service_type {
            clusterlink_api::ServiceType::ClusterSetIP => {
                s.ips.iter().map(ToString::to_string).collect()
            }
            clusterlink_api::ServiceType::Headless => s
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .map(|e| e.ip.to_string())
                .collect(),
        };
        rows.push(ServiceView {
            service: format!("{}/{}", s.namespace, s.name),
            cluster: s.cluster.to_string(),
            type_: format!("{:?}", s.service_type),
            addresses,
            ports: s
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol))
                .collect(),
            ready_endpoints: s.endpoints.iter().filter(|e| e.ready).count(),
            ready: s.ready,
            healthy: s.ready && reachable_from.len() + 1 >= clusters,
            reachable_from: reachable_from.into_iter().collect(),
        });
    }
    print(&render(&rows, a.output)?);
    Ok(())
}

async fn list(a: &ShowArgs, kind: Kind) -> Result<Vec<Record>> {
    let creds = a.credentials.load()?;
    let mut client = connect_with(&creds).await?;
    let resp = call(
        "list",
        client.list(proto::ListRequest {
            kind: kind.to_proto() as i32,
        }),
    )
    .await?;
    resp.records
        .into_iter()
        .map(|r| Record::try_from(r).context("The broker sent an invalid record"))
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    pub cluster: String,
    pub node: String,
    pub role: String,
    pub private_endpoint: String,
    pub public_address: String,
    pub public_key: String,
}

impl Tabular for GatewayView {
    fn header() -> Vec<&'static str> {
        vec!["CLUSTER", "NODE", "ROLE", "PRIVATE", "PUBLIC", "PUBLIC KEY"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.cluster.clone(),
            self.node.clone(),
            self.role.clone(),
            self.private_endpoint.clone(),
            self.public_address.clone(),
            self.public_key.clone(),
        ]
    }
}

async fn gateways(a: ShowArgs) -> Result<()> {
    use base64::Engine;
    let views: Vec<GatewayView> = list(&a, Kind::Gateways)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            Record::Gateway(g) => Some(GatewayView {
                cluster: g.cluster.to_string(),
                node: g.node.to_string(),
                role: format!("{:?}", g.role).to_lowercase(),
                private_endpoint: g.private_endpoint().to_string(),
                public_address: g.public_addr.map(|p| p.to_string()).unwrap_or_default(),
                public_key: base64::engine::general_purpose::STANDARD.encode(g.public_key),
            }),
            _ => None,
        })
        .collect();
    print(&render(&views, a.output)?);
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    pub from: String,
    pub from_node: String,
    pub to: String,
    pub node: String,
    pub state: String,
    pub rtt_ms: Option<f64>,
    pub last_handshake: String,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

impl Tabular for ConnectionView {
    fn header() -> Vec<&'static str> {
        vec![
            "FROM",
            "FROM NODE",
            "TO",
            "TO NODE",
            "STATE",
            "RTT",
            "LAST HANDSHAKE",
            "TX",
            "RX",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.from.clone(),
            self.from_node.clone(),
            self.to.clone(),
            self.node.clone(),
            self.state.clone(),
            self.rtt_ms
                .map(|r| format!("{r:.2}ms"))
                .unwrap_or_else(|| "-".into()),
            self.last_handshake.clone(),
            self.tx_bytes.to_string(),
            self.rx_bytes.to_string(),
        ]
    }
}

async fn connections(a: ShowArgs) -> Result<()> {
    let views: Vec<ConnectionView> = list(&a, Kind::Connections)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            Record::Connection(c) => Some(ConnectionView {
                from: c.from_cluster.to_string(),
                from_node: c.from_node.to_string(),
                to: c.to_cluster.to_string(),
                node: c.to_node.to_string(),
                state: format!("{:?}", c.state).to_lowercase(),
                rtt_ms: (c.rtt_micros > 0).then(|| c.rtt_micros as f64 / 1000.0),
                last_handshake: if c.last_handshake_unix_ms > 0 {
                    rfc3339_from_unix_ms(c.last_handshake_unix_ms)
                } else {
                    "never".into()
                },
                tx_bytes: c.tx_bytes,
                rx_bytes: c.rx_bytes,
            }),
            _ => None,
        })
        .collect();
    print(&render(&views, a.output)?);
    Ok(())
}

async fn clusters(a: ShowArgs) -> Result<()> {
    let creds = a.credentials.load()?;
    let mut client = connect_with(&creds).await?;
    let resp = call(
        "list clusters",
        client.list(proto::ListRequest {
            kind: Kind::Clusters.to_proto() as i32,
        }),
    )
    .await?;
    let mut views = Vec::new();
    for r in resp.records {
        if let Record::Cluster(reg) =
            Record::try_from(r).context("The broker sent an invalid record")?
        {
            views.push(ClusterView {
                id: reg.cluster.id.to_string(),
                pod_cidrs: reg.cluster.pod_cidrs.to_strings(),
                service_cidrs: reg.cluster.service_cidrs.to_strings(),
                labels: reg.cluster.labels,
                joined_at: rfc3339_from_unix_ms(reg.joined_at_unix_ms),
                certificate_expires_at: match reg.certificate_expires_at_unix_ms {
                    0 => String::new(),
                    ms => rfc3339_from_unix_ms(ms),
                },
            });
        }
    }
    print(&render(&views, a.output)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::summarize;

    #[test]
    fn long_address_lists_are_summarised_in_tables() {
        let few: Vec<String> = (1..=3).map(|i| format!("10.0.0.{i}")).collect();
        assert_eq!(summarize(&few, 4), "10.0.0.1,10.0.0.2,10.0.0.3");
        let many: Vec<String> = (1..=200)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
            .collect();
        let s = summarize(&many, 4);
        assert!(s.ends_with("(+196 more)"), "{s}");
        assert!(s.len() < 80, "{s}");
    }
}
