//! `clusterlink dns run`.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use clusterlink_dns::answer::Policy;
use clusterlink_dns::controller::Source;
use clusterlink_dns::server::{DnsConfig, run as run_dns};

use super::CredentialsArg;
use super::broker::shutdown_signal;

#[derive(Subcommand)]
pub enum DnsCommand {
    /// Answer the cluster set's zone (UDP and TCP) until SIGINT or SIGTERM.
    Run(RunArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PolicyArg {
    /// Remote clusters in turn.
    RoundRobin,
    /// Remote clusters by measured tunnel RTT, nearest first.
    Nearest,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub credentials: CredentialsArg,
    /// Address to answer on (UDP and TCP).
    #[arg(long, default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,
    /// The zone served.
    #[arg(long, default_value = "clusterset.local")]
    pub zone: String,
    /// TTL of every answer, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub ttl: u32,
    /// Order of the remote clusters' addresses (the local cluster's always come first).
    #[arg(long, value_enum, default_value_t = PolicyArg::RoundRobin)]
    pub policy: PolicyArg,
    /// Standalone mode: export the Services this directory's ServiceExport manifests name
    /// (with their Service and EndpointSlice manifests); statuses go to DIR/status/.
    #[arg(long, value_name = "DIR", conflicts_with = "kubernetes")]
    pub manifests: Option<std::path::PathBuf>,
    /// Run the export and import controllers against this cluster's Kubernetes API
    /// (kubeconfig or in-cluster config): ServiceExport status, ServiceImports and
    /// EndpointSlices.
    #[arg(long)]
    pub kubernetes: bool,
}

pub async fn run(c: DnsCommand) -> Result<()> {
    match c {
        DnsCommand::Run(a) => {
            let config = DnsConfig {
                listen: a.listen,
                zone: a.zone,
                ttl: a.ttl,
                policy: match a.policy {
                    PolicyArg::RoundRobin => Policy::RoundRobin,
                    PolicyArg::Nearest => Policy::Nearest,
                },
                controllers: match (a.manifests, a.kubernetes) {
                    (Some(dir), _) => Some(Source::Dir(dir)),
                    (None, true) => Some(Source::Kube(kube::Client::try_default().await.context(
                        "Cannot reach the Kubernetes API (no kubeconfig and not in a cluster); \
                         in standalone mode give --manifests DIR",
                    )?)),
                    (None, false) => None,
                },
            };
            run_dns(config, a.credentials.load()?, shutdown_signal())
                .await
                .context("DNS plugin failed")
        }
    }
}
