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
    /// Serve N synthetic services without a broker (`benchmark dns` uses it).
    #[command(hide = true)]
    ServeFixed(FixedArgs),
}

#[derive(Args)]
pub struct FixedArgs {
    #[arg(long, default_value_t = 10_000)]
    pub names: u32,
    #[arg(long, default_value = "127.0.0.1:53")]
    pub listen: SocketAddr,
}

/// N ClusterSetIP services `svcI.demo` of the local cluster `a`, at 10.100.x.y.
fn synthetic(names: u32) -> Result<clusterlink_dns::answer::View> {
    let mut view = clusterlink_dns::answer::View {
        local: Some("a".parse()?),
        ..Default::default()
    };
    for i in 0..names {
        view.insert(clusterlink_api::ServiceRecord {
            cluster: "a".parse()?,
            namespace: "demo".parse()?,
            name: format!("svc{i}").parse()?,
            service_type: clusterlink_api::ServiceType::ClusterSetIP,
            ports: Vec::new(),
            ips: vec![
                std::net::Ipv4Addr::new(10, 100, ((i >> 8) & 0xff) as u8, (i & 0xff) as u8).into(),
            ],
            endpoints: Vec::new(),
            ready: true,
            exported_at_unix_ms: 0,
        });
    }
    Ok(view)
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
        DnsCommand::ServeFixed(a) => {
            let config = DnsConfig {
                listen: a.listen,
                zone: "clusterset.local".into(),
                ttl: 5,
                policy: Policy::RoundRobin,
                controllers: None,
            };
            clusterlink_dns::server::serve_fixed(config, synthetic(a.names)?, shutdown_signal())
                .await
                .context("DNS server failed")
        }
    }
}
