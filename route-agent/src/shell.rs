//! `clusterlink route-agent run` and `cleanup`.
//!
//! One loop: the broker's view (clusters and gateways, via [`follow`]), the kernel's own
//! notifications (links, addresses, routes and rules changing), and a periodic resync.
//! Whenever one of them says something may differ, the agent reads its part of the node,
//! computes the desired state and applies the difference. A view change alone is applied
//! against what the agent last read and applied, without reading the kernel again, so one
//! changed cluster is one netlink request however many routes there are.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use clusterlink_api::ClusterSet;
use clusterlink_api::{ClusterId, Kind, NodeName};
use clusterlink_broker_client::LiveCredentials;
use clusterlink_broker_client::follow;
use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::route::RouteAttribute;
use netlink_packet_route::rule::RuleAttribute;
use rtnetlink::MulticastGroup;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::core::{self, NodeConfig, Ownership, State};
use crate::kernel::{Kernel, KernelError};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(
        "the credentials name no cluster (identity {0}); use the file `clusterlink join` wrote"
    )]
    NotACluster(clusterlink_broker_client::Identity),
    #[error("cannot listen to the kernel's route notifications: {0}")]
    Monitor(#[source] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub credentials: LiveCredentials,
    pub node: NodeName,
    pub node_ip: Ipv4Addr,
    pub tunnel_device: String,
    pub overlay_device: String,
    pub tunnel_mtu: u32,
    pub underlay_mtu: u32,
    pub vni: u32,
    pub vxlan_port: u16,
    pub ownership: Ownership,
    /// Read the kernel again at least this often, notifications or not.
    pub resync: Duration,
    /// Remove everything the agent added when it stops.
    pub cleanup_on_exit: bool,
    /// Told when the node's routes match the cluster set (after each pass).
    pub ready: clusterlink_broker_client::Ready,
}

impl AgentConfig {
    fn node_config(&self, cluster: ClusterId) -> NodeConfig {
        NodeConfig {
            cluster,
            node: self.node.clone(),
            node_ip: self.node_ip,
            tunnel_device: self.tunnel_device.clone(),
            overlay_device: self.overlay_device.clone(),
            tunnel_mtu: self.tunnel_mtu,
            underlay_mtu: self.underlay_mtu,
            vni: self.vni,
            vxlan_port: self.vxlan_port,
            broker: broker_ips(&self.credentials.peek().address),
        }
    }
}

/// The broker's address, when the credentials name it by IP (a name is resolved by the
/// system; the agent does not guess its addresses).
fn broker_ips(address: &str) -> Vec<Ipv4Addr> {
    match clusterlink_broker_client::address_ip(address) {
        Some(std::net::IpAddr::V4(ip)) => vec![ip],
        _ => Vec::new(),
    }
}

pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let creds = config.credentials.peek();
    let cluster: ClusterId = creds
        .cluster()
        .cloned()
        .ok_or_else(|| AgentError::NotACluster(creds.identity.clone()))?;
    let own = config.ownership;
    let node = config.node_config(cluster.clone());
    let kernel = Kernel::connect(own, &config.overlay_device, &config.tunnel_device)?
        .with_overlay_vni(config.vni, config.vxlan_port);
    let (monitor, _, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Rule,
    ])
    .map_err(AgentError::Monitor)?;
    let monitor = tokio::spawn(monitor);
    // Fail early, before waiting for the broker, on what the operator must fix (a foreign
    // link of the overlay's name, no permission).
    let (mut installed, mut facts) = kernel.read().await?;
    let mut view = follow(
        config.credentials.clone(),
        &[Kind::Clusters, Kind::Gateways],
    );
    let mut set: Option<ClusterSet> = None;
    let mut resync = tokio::time::interval(config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reread = false;
    let mut last_waiting: Option<&'static str> = None;
    let mut last_excluded: Vec<(ipnet::Ipv4Net, String)> = Vec::new();
    info!(%cluster, node = %config.node, table = own.table, "route agent up");
    config
        .ready
        .not("waiting for the cluster set from the broker");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            changed = view.changed() => {
                if changed.is_err() { break; }
                set = view.borrow_and_update().clone();
                debug!(clusters = set.as_ref().map(|s| s.clusters.len()), "cluster set changed");
            }
            Some((msg, _)) = events.next() => {
                reread |= concerns_us(&msg.payload, own, &installed);
                // Take the rest of a burst (our own changes come as one) before acting, for
                // at most 100 ms.
                let until = tokio::time::Instant::now() + Duration::from_millis(100);
                let mut n = 1;
                while let Ok(Some((msg, _))) = tokio::time::timeout_at(until.min(tokio::time::Instant::now() + Duration::from_millis(5)), events.next()).await {
                    reread |= concerns_us(&msg.payload, own, &installed);
                    n += 1;
                }
                debug!(events = n, reread, "kernel notifications");
            }
            _ = resync.tick() => reread = true,
        }
        // Nothing is touched until the broker's view has arrived once.
        let Some(set) = &set else { continue };
        if reread {
            debug!("reading the node's routes");
            match kernel.read().await {
                Ok((i, f)) => (installed, facts, reread) = (i, f, false),
                Err(e) => {
                    warn!(error = %e, "cannot read the node's routes; retrying");
                    continue;
                }
            }
        }
        let desired = core::desired(&node, set, &facts, own);
        if desired.waiting_for != last_waiting {
            if let Some(w) = desired.waiting_for {
                info!(waiting_for = w, "no routes to remote clusters yet");
            }
            last_waiting = desired.waiting_for;
        }
        for net in &desired.unsupported {
            debug!(%net, "IPv6 CIDR not routed (the overlay is IPv4)");
        }
        if desired.excluded != last_excluded {
            for (net, why) in &desired.excluded {
                warn!(%net, why = %why, "a remote CIDR covers what the mesh runs on; that part stays out of the tunnel");
            }
            last_excluded = desired.excluded.clone();
        }
        let changes = core::diff(&installed, &desired.state, own);
        if changes.is_empty() {
            config.ready.ok();
            continue;
        }
        match kernel.apply(&changes).await {
            Ok(applied) => {
                info!(
                    replaced = applied.routes_replaced,
                    removed = applied.routes_removed,
                    rules_added = changes.add_rules.len(),
                    rules_removed = changes.remove_rules.len(),
                    overlay = ?changes.create_overlay.as_ref().map(|o| o.remote),
                    active_gateway = ?desired.active_gateway.as_ref().map(|n| n.as_str()),
                    "routes applied"
                );
                if applied.failures.is_empty() {
                    installed = desired.state;
                    config.ready.ok();
                } else {
                    config
                        .ready
                        .not(format!("{} route change(s) failed", applied.failures.len()));
                    for f in applied.failures.iter().take(5) {
                        warn!(failure = %f, "could not apply");
                    }
                    reread = true;
                }
            }
            Err(e) => {
                warn!(error = %e, "could not apply; retrying");
                config.ready.not(format!("could not apply routes: {e}"));
                reread = true;
            }
        }
    }
    monitor.abort();
    if config.cleanup_on_exit {
        let removed = uninstall(&kernel, own).await?;
        info!(removed, "route agent stopped; removed what it added");
    } else {
        info!(
            "route agent stopped; routes left in place (run `clusterlink route-agent cleanup` to remove them)"
        );
    }
    Ok(())
}

/// Removes everything the agent added to this node: its routes, its rule, its overlay link.
/// Returns how many routes went.
pub async fn cleanup(
    own: Ownership,
    overlay_device: &str,
    tunnel_device: &str,
    (vni, port): (u32, u16),
) -> Result<usize, AgentError> {
    let kernel = Kernel::connect(own, overlay_device, tunnel_device)?.with_overlay_vni(vni, port);
    uninstall(&kernel, own).await
}

async fn uninstall(kernel: &Kernel, own: Ownership) -> Result<usize, AgentError> {
    let (installed, _) = kernel.read().await?;
    let applied = kernel.apply(&core::uninstall(&installed, own)).await?;
    for f in &applied.failures {
        warn!(failure = %f, "could not remove");
    }
    Ok(installed.routes.len())
}

/// Does a kernel notification say the agent's part of the node may have changed? Its own
/// changes, echoed back, do not count: a new route of ours that it has, a deletion of one
/// it no longer has.
fn concerns_us(
    payload: &NetlinkPayload<RouteNetlinkMessage>,
    own: Ownership,
    installed: &State,
) -> bool {
    let NetlinkPayload::InnerMessage(msg) = payload else {
        return false;
    };
    let table = |m: &netlink_packet_route::route::RouteMessage| {
        m.attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(m.header.table))
    };
    let destination = |m: &netlink_packet_route::route::RouteMessage| {
        m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(netlink_packet_route::route::RouteAddress::Inet(d)) => {
                ipnet::Ipv4Net::new(*d, m.header.destination_prefix_length).ok()
            }
            _ => None,
        })
    };
    match msg {
        RouteNetlinkMessage::DelRoute(m) => {
            table(m) == own.table
                && destination(m).is_some_and(|d| installed.routes.contains_key(&d))
        }
        RouteNetlinkMessage::NewRoute(m) => {
            table(m) == own.table
                && u8::from(m.header.protocol) == own.protocol
                && destination(m).is_none_or(|d| !installed.routes.contains_key(&d))
        }
        RouteNetlinkMessage::DelRule(m) => m
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == own.rule_priority)),
        // Links come and go (the tunnel device with its gateway), addresses decide the source.
        RouteNetlinkMessage::NewLink(_)
        | RouteNetlinkMessage::DelLink(_)
        | RouteNetlinkMessage::NewAddress(_)
        | RouteNetlinkMessage::DelAddress(_) => true,
        _ => false,
    }
}
