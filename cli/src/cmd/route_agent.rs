//! `clusterlink route-agent run|cleanup`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use clusterlink_api::NodeName;
use clusterlink_route_agent::core::Ownership;
use clusterlink_route_agent::{AgentConfig, cleanup, run as run_agent};

use super::DaemonCredentialsArg;
use clusterlink_cli::daemon::{self, ShutdownArgs};
use clusterlink_cli::health::HealthArgs;

#[derive(Subcommand)]
pub enum RouteAgentCommand {
    /// Keep this node's routes to the remote clusters until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Remove every route, rule and link the agent added to this node.
    Cleanup(CleanupArgs),
}

/// Where the agent's routes, rule and overlay link live (everything it will ever touch).
#[derive(Args, Clone)]
pub struct OwnArgs {
    /// Routing table of the agent's routes.
    #[arg(long, default_value_t = 211, value_parser = clap::value_parser!(u32).range(1..=0xFFFF_FFFE))]
    pub table: u32,
    /// Priority of the agent's `ip rule` (before the main table's 32766).
    #[arg(long, default_value_t = 211, value_parser = clap::value_parser!(u32).range(1..32766))]
    pub rule_priority: u32,
    /// Route protocol number that marks the agent's routes and rule.
    #[arg(long, default_value_t = 211, value_parser = clap::value_parser!(u8).range(5..=255))]
    pub protocol: u8,
    /// Name of the overlay (VXLAN) link the agent creates.
    #[arg(long, default_value = "vx-clusterlink", value_parser = link_name)]
    pub overlay_device: String,
    /// The gateway's tunnel device (its `--tun-name`).
    #[arg(long, default_value = "clusterlink0", value_parser = link_name)]
    pub tunnel_device: String,
    /// VXLAN network identifier of the overlay.
    #[arg(long, default_value_t = 211, value_parser = clap::value_parser!(u32).range(1..(1 << 24)))]
    pub vni: u32,
    /// UDP port of the overlay.
    #[arg(long, default_value_t = 4803)]
    pub vxlan_port: u16,
}

impl OwnArgs {
    fn ownership(&self) -> Ownership {
        Ownership {
            table: self.table,
            rule_priority: self.rule_priority,
            protocol: self.protocol,
        }
    }
}

fn link_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 || s.contains(['/', ' ', ':']) {
        return Err(format!(
            "{s:?} is not a Linux link name (1 to 15 characters, no '/', ':' or spaces)"
        ));
    }
    Ok(s.to_owned())
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub credentials: DaemonCredentialsArg,
    /// This node's name.
    #[arg(long, env = "CLUSTERLINK_NODE")]
    pub node: NodeName,
    /// This node's underlay address (the overlay's local end; Kubernetes mode: the Node's
    /// InternalIP).
    #[arg(
        long,
        env = "CLUSTERLINK_NODE_IP",
        required_unless_present = "kubernetes"
    )]
    pub node_ip: Option<Ipv4Addr>,
    /// Kubernetes mode: what is not given above comes from this node's Node object (the pod
    /// needs `get` on nodes; --node from the downward API, spec.nodeName).
    #[arg(long)]
    pub kubernetes: bool,
    #[command(flatten)]
    pub own: OwnArgs,
    /// The tunnel MTU, carried on every route so TCP picks an MSS that fits.
    #[arg(long, default_value_t = 1420, value_parser = clap::value_parser!(u32).range(576..=65_535))]
    pub tunnel_mtu: u32,
    /// The underlay's MTU (the overlay's is 50 bytes less).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(626..=65_535))]
    pub underlay_mtu: u32,
    /// Read the node's routes again at least this often (changes are also noticed at once
    /// through the kernel's notifications).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub resync: Duration,
    /// Remove everything the agent added when it stops.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

#[derive(Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub own: OwnArgs,
}

pub async fn run(c: RouteAgentCommand) -> Result<()> {
    match c {
        RouteAgentCommand::Run(a) => {
            anyhow::ensure!(
                a.tunnel_mtu + clusterlink_route_agent::core::VXLAN_OVERHEAD <= a.underlay_mtu,
                "--tunnel-mtu {} does not fit in the overlay ({} = --underlay-mtu {} less VXLAN's {} bytes); lower it",
                a.tunnel_mtu,
                a.underlay_mtu - clusterlink_route_agent::core::VXLAN_OVERHEAD,
                a.underlay_mtu,
                clusterlink_route_agent::core::VXLAN_OVERHEAD
            );
            let node_ip = match (a.node_ip, a.kubernetes) {
                (Some(ip), _) => ip,
                (None, true) => {
                    let client = kube::Client::try_default().await.context(
                        "Cannot reach the Kubernetes API (no kubeconfig and not in a pod); without --kubernetes give --node-ip",
                    )?;
                    let node =
                        clusterlink_broker_client::node::read(client, a.node.as_str()).await?;
                    match node.internal_ip {
                        std::net::IpAddr::V4(ip) => ip,
                        std::net::IpAddr::V6(ip) => anyhow::bail!(
                            "node {} has an IPv6 InternalIP ({ip}); the overlay is IPv4: give --node-ip",
                            node.name
                        ),
                    }
                }
                (None, false) => anyhow::bail!("give --node-ip, or --kubernetes"),
            };
            let mut config = AgentConfig {
                credentials: a.credentials.keep().await?,
                node: a.node,
                node_ip,
                tunnel_device: a.own.tunnel_device.clone(),
                overlay_device: a.own.overlay_device.clone(),
                tunnel_mtu: a.tunnel_mtu,
                underlay_mtu: a.underlay_mtu,
                vni: a.own.vni,
                vxlan_port: a.own.vxlan_port,
                ownership: a.own.ownership(),
                resync: a.resync.max(Duration::from_millis(100)),
                cleanup_on_exit: a.cleanup_on_exit,
                ready: Default::default(),
            };
            daemon::run_with_health(
                "route agent",
                a.shutdown.grace(),
                &a.health,
                |stop, ready| async move {
                    config.ready = ready;
                    run_agent(config, stop).await.context("Route agent failed")
                },
            )
            .await
        }
        RouteAgentCommand::Cleanup(a) => {
            let removed = cleanup(
                a.own.ownership(),
                &a.own.overlay_device,
                &a.own.tunnel_device,
                (a.own.vni, a.own.vxlan_port),
            )
            .await
            .context("Route agent cleanup failed")?;
            clusterlink_cli::output::print(&format!(
                "Removed {removed} routes of table {}, the rule of priority {} and link {} (whichever were there).\n",
                a.own.table, a.own.rule_priority, a.own.overlay_device
            ));
            Ok(())
        }
    }
}
