//! `clusterlink show …`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use clusterlink_api::{Kind, Record, proto};
use clusterlink_broker::client::{connect_with, rfc3339_from_unix_ms};
use serde::Serialize;

use super::{CredentialsArg, call};
use crate::output::{Format, Tabular, print, render};

#[derive(Subcommand)]
pub enum ShowCommand {
    /// The clusters joined to the broker.
    Clusters(ShowArgs),
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
}

impl Tabular for ClusterView {
    fn header() -> Vec<&'static str> {
        vec!["CLUSTER", "POD CIDRS", "SERVICE CIDRS", "LABELS", "JOINED"]
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
        ]
    }
}

pub async fn run(c: ShowCommand) -> Result<()> {
    match c {
        ShowCommand::Clusters(a) => clusters(a).await,
    }
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
            });
        }
    }
    print(&render(&views, a.output)?);
    Ok(())
}
