//! `clusterlink gateway run`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use clusterlink_api::NodeName;
use clusterlink_gateway::{GatewayConfig, run as run_gateway};

use super::DaemonCredentialsArg;
use clusterlink_cli::daemon::{self, ShutdownArgs};
use clusterlink_cli::health::HealthArgs;

#[derive(Subcommand)]
pub enum GatewayCommand {
    /// Run this node's gateway until SIGINT or SIGTERM.
    Run(GatewayRunArgs),
}

#[derive(Args)]
pub struct GatewayRunArgs {
    #[command(flatten)]
    pub credentials: DaemonCredentialsArg,
    /// This node's name.
    #[arg(long, env = "CLUSTERLINK_NODE")]
    pub node: NodeName,
    /// The node's underlay address, offered to the other gateways (Kubernetes mode: the
    /// Node's InternalIP).
    #[arg(long, required_unless_present = "kubernetes")]
    pub private_addr: Option<IpAddr>,
    /// The address other clusters' gateways reach this one at, when not the private one (a
    /// NAT's; Kubernetes mode: the Node's gateway.clusterlink.dev/public-address annotation).
    #[arg(long)]
    pub public_addr: Option<IpAddr>,
    /// This gateway's address on the tunnel device (inside its cluster's pod CIDR; Kubernetes
    /// mode: the Node's gateway.clusterlink.dev/tunnel-ip annotation, else the last address of
    /// its IPv4 pod CIDR).
    #[arg(long, required_unless_present = "kubernetes")]
    pub tunnel_ip: Option<Ipv4Addr>,
    /// Kubernetes mode: what is not given above comes from this node's Node object (the pod
    /// needs `get` on nodes; --node from the downward API, spec.nodeName).
    #[arg(long)]
    pub kubernetes: bool,
    /// UDP port of the tunnels (WireGuard). It must be free: the gateway will not share it with
    /// another process; it opens one more socket on it per peer, connected to that peer.
    #[arg(long, default_value_t = 51820)]
    pub listen_port: u16,
    /// The WireGuard private key (made, mode 0600, if missing).
    #[arg(long, default_value = "/var/lib/clusterlink/gateway.key")]
    pub key_file: PathBuf,
    /// Name of the TUN device the gateway makes (the route agent's --tunnel-device).
    #[arg(long, default_value = "clusterlink0")]
    pub tun_name: String,
    /// Tunnel MTU: the underlay's MTU less WireGuard's 80 bytes (IPv6 underlay).
    #[arg(long, default_value_t = 1420)]
    pub mtu: u16,
    /// TTL in milliseconds of the broker lease this gateway's endpoint lives under. When the
    /// active gateway dies, another of the cluster's gateways takes over once it has
    /// expired (renewed every quarter TTL; 200 to 300000; the etcd store rounds up to
    /// seconds).
    #[arg(long, default_value_t = 800, value_parser = clap::value_parser!(u32).range(200..=300_000))]
    pub lease_ms: u32,
    /// The longest, in µs, the data plane keeps polling for the next packet before it
    /// sleeps (0 to 1000; 0: never). It saves a wake-up when a reply comes back soon after
    /// its request, for up to that much CPU each time the plane goes idle. The window adapts:
    /// where replies take longer (a WAN between the clusters), it shrinks to nothing.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub busy_poll_us: u32,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

/// The gateway's private, public and tunnel addresses: the flags', and in Kubernetes mode
/// what the flags leave out from the Node object.
async fn addresses(a: &GatewayRunArgs) -> Result<(IpAddr, Option<IpAddr>, Ipv4Addr)> {
    if !a.kubernetes {
        return match (a.private_addr, a.tunnel_ip) {
            (Some(p), Some(t)) => Ok((p, a.public_addr, t)),
            _ => anyhow::bail!("give --private-addr and --tunnel-ip, or --kubernetes"),
        };
    }
    let client = kube::Client::try_default()
        .await
        .context("Cannot reach the Kubernetes API (no kubeconfig and not in a pod); without --kubernetes give --private-addr and --tunnel-ip")?;
    let node = clusterlink_broker_client::node::read(client, a.node.as_str()).await?;
    let tunnel_ip = match a.tunnel_ip {
        Some(t) => t,
        None => node.tunnel_ip()?,
    };
    tracing::info!(node = %node.name, private = %node.internal_ip, public = ?node.public_address, %tunnel_ip, "addresses from the Node object");
    Ok((
        a.private_addr.unwrap_or(node.internal_ip),
        a.public_addr.or(node.public_address),
        tunnel_ip,
    ))
}

pub async fn run(c: GatewayCommand) -> Result<()> {
    match c {
        GatewayCommand::Run(a) => {
            let (private_addr, public_addr, tunnel_ip) = addresses(&a).await?;
            let mut config = GatewayConfig {
                credentials: a.credentials.keep().await?,
                node: a.node,
                listen_port: a.listen_port,
                private_addr,
                public_addr,
                key_file: a.key_file,
                tun_name: a.tun_name,
                tunnel_ip,
                mtu: a.mtu,
                lease: std::time::Duration::from_millis(u64::from(a.lease_ms)),
                busy_poll: std::time::Duration::from_micros(u64::from(a.busy_poll_us)),
                ready: Default::default(),
            };
            daemon::run_with_health(
                "gateway",
                a.shutdown.grace(),
                &a.health,
                |stop, ready| async move {
                    config.ready = ready;
                    run_gateway(config, stop).await.context("Gateway failed")
                },
            )
            .await
        }
    }
}
