//! `clusterlink join`: redeem a broker-info file's token for this cluster's credentials.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use clusterlink_api::{Cluster, proto};
use clusterlink_broker::pki::new_client_key;
use clusterlink_broker_client::{BrokerInfo, Credentials, connect};

use super::call;
use clusterlink_cli::output::print;

#[derive(Args)]
pub struct JoinArgs {
    /// The broker-info file from `clusterlink deploy-broker` or `broker token create`.
    pub broker_info: PathBuf,
    /// This cluster's ID: a DNS label, unique among the joined clusters.
    #[arg(long)]
    pub cluster_id: String,
    /// Pod CIDR(s) of this cluster (repeat, or comma-separate).
    #[arg(long = "pod-cidr", required = true)]
    pub pod_cidrs: Vec<String>,
    /// Service CIDR(s) of this cluster (repeat, or comma-separate).
    #[arg(long = "service-cidr", required = true)]
    pub service_cidrs: Vec<String>,
    /// Labels, KEY=VALUE (e.g. region=eu-west-1).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Where to write this cluster's credentials (default: ./clusterlink-ID.yaml).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub async fn run(a: JoinArgs) -> Result<()> {
    let info = BrokerInfo::read(&a.broker_info, SystemTime::now())?;
    let labels = a
        .labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow!("--label {l:?} is not KEY=VALUE"))
        })
        .collect::<Result<BrokerTreeMap>>()?;
    let request_cluster = proto::Cluster {
        id: a.cluster_id.clone(),
        pod_cidrs: a.pod_cidrs.clone(),
        service_cidrs: a.service_cidrs.clone(),
        labels: labels.into_iter().collect(),
    };
    // Validate here, before the broker does, for a clear message without a round trip.
    let cluster = Cluster::try_from(request_cluster.clone()).context("Invalid cluster")?;
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("clusterlink-{}.yaml", cluster.id)));
    // The key is made here and never leaves this machine; the broker signs its public half.
    let (key_pem, public_key_der) = new_client_key().context("Failed to make a key pair")?;
    let mut client = connect(&info.address, &info.ca_certificate, None).await?;
    let resp = call(
        "join",
        client.join(proto::JoinRequest {
            token: info.token.clone(),
            cluster: Some(request_cluster),
            public_key_der,
        }),
    )
    .await?;
    Credentials::new(
        info.address.clone(),
        resp.ca_certificate_pem,
        clusterlink_broker_client::Identity::Cluster(cluster.id.clone()),
        resp.certificate_pem,
        key_pem,
    )
    .write(&output)?;
    print(&format!(
        "Cluster {} joined the broker at {}.\nCredentials: {} (keep it private: it holds this cluster's key)\n",
        cluster.id,
        info.address,
        output.display()
    ));
    Ok(())
}

type BrokerTreeMap = BTreeMap<String, String>;
