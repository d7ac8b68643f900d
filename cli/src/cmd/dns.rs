//! `clusterlink dns run`.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use clusterlink_dns::answer::Policy;
use clusterlink_dns::controller::Source;
use clusterlink_dns::server::{DnsConfig, run as run_dns};

use super::DaemonCredentialsArg;
use clusterlink_cli::daemon::{self, ShutdownArgs};
use clusterlink_cli::health::HealthArgs;
use tracing::warn;

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
    pub credentials: DaemonCredentialsArg,
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
    /// With several replicas: only the one holding this Lease (NAMESPACE/NAME) runs the
    /// controllers; all answer. The replica's identity is its host name (a pod's name).
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "kubernetes")]
    pub leader_election: Option<String>,
    /// The address(es) the zone's name server `ns.<zone>` resolves to (repeat for several):
    /// where clients reach this plugin, e.g. its Service's ClusterIP. Default: the listen
    /// address, or with a wildcard listen address, this host's addresses of that family.
    #[arg(long = "ns-address")]
    pub ns_addresses: Vec<std::net::IpAddr>,
    /// How long this plugin's exported services outlive it if it dies (a broker lease,
    /// renewed every third of it; 3s to 10m).
    #[arg(long, default_value = "10s", value_parser = parse_record_lease)]
    pub record_lease: humantime::Duration,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

pub async fn run(c: DnsCommand) -> Result<()> {
    match c {
        DnsCommand::Run(a) => {
            let mut config = DnsConfig {
                listen: a.listen,
                zone: a.zone,
                ttl: a.ttl,
                policy: match a.policy {
                    PolicyArg::RoundRobin => Policy::RoundRobin,
                    PolicyArg::Nearest => Policy::Nearest,
                },
                record_lease: *a.record_lease,
                ns_addresses: if a.ns_addresses.is_empty() {
                    default_ns_addresses(a.listen.ip())
                } else {
                    a.ns_addresses
                },
                controllers: match (a.manifests, a.kubernetes) {
                    (Some(dir), _) => Some(Source::Dir(dir)),
                    (None, true) => Some(Source::Kube(kube::Client::try_default().await.context(
                        "Cannot reach the Kubernetes API (no kubeconfig and not in a cluster); \
                         in standalone mode give --manifests DIR",
                    )?)),
                    (None, false) => None,
                },
                ready: Default::default(),
                leader: None,
            };
            if let (Some(lease), Some(Source::Kube(client))) =
                (&a.leader_election, &config.controllers)
            {
                let (ns, name) = lease
                    .split_once('/')
                    .filter(|(n, m)| !n.is_empty() && !m.is_empty())
                    .with_context(|| {
                        format!("--leader-election {lease:?} is not NAMESPACE/NAME")
                    })?;
                let me = std::env::var("HOSTNAME")
                    .ok()
                    .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .context("No host name to stand for this replica in the Lease")?;
                config.leader = Some(clusterlink_dns::election::elect(
                    kube::Api::namespaced(client.clone(), ns),
                    name.to_owned(),
                    me,
                    std::time::Duration::from_secs(15),
                ));
            }
            let credentials = a.credentials.keep().await?;
            daemon::run_with_health(
                "DNS plugin",
                a.shutdown.grace(),
                &a.health,
                |stop, ready| async move {
                    config.ready = ready;
                    run_dns(config, credentials, stop)
                        .await
                        .context("DNS plugin failed")
                },
            )
            .await
        }
    }
}

/// The listen address; for a wildcard, the addresses of this host's interfaces that are up,
/// of the same family, loopback last (so a plugin on one host still names one).
fn default_ns_addresses(listen: IpAddr) -> Vec<IpAddr> {
    if !listen.is_unspecified() {
        return vec![listen];
    }
    let mut found: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
                .filter_map(|a| {
                    let sa = a.address?;
                    sa.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .filter(|ip| ip.is_ipv4() == listen.is_ipv4())
                .filter(|ip| match ip {
                    IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                    IpAddr::V4(_) => true,
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|ip| ip.is_loopback());
    found.dedup();
    if found.is_empty() {
        warn!("no interface address found for ns.<zone>; give --ns-address");
    }
    found
}

fn parse_record_lease(s: &str) -> Result<humantime::Duration, String> {
    clusterlink_cli::duration_within(
        s,
        std::time::Duration::from_secs(3),
        std::time::Duration::from_secs(600),
    )
}
