//! Desired state and difference, without I/O.
//!
//! Everything the agent owns is marked so the shell can tell it from everyone else's and
//! never touches the rest:
//! - routes live in the agent's own table and carry its own route protocol number;
//! - its one `ip rule` (look up the table, for every destination) has its own priority,
//!   table and protocol;
//! - its overlay link has its own name and an alias naming the agent.
//!
//! Where the routes point:
//! - on the cluster's active gateway node, each remote CIDR goes into the tunnel device;
//! - on every other node, each remote CIDR goes via the overlay (VXLAN, point to point to
//!   the active gateway node) to the gateway's overlay address, so it works whatever the CNI
//!   does with the node's own routes. Replies come back through the CNI as any pod traffic.
//!
//! Routes carry the tunnel MTU, so TCP picks an MSS that fits without packet-filter rules,
//! and, where the node has an address inside its cluster's pod CIDR, that address as the
//! preferred source, so traffic the node itself sends can be answered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use clusterlink_api::ClusterSet;
use clusterlink_api::{ClusterId, NodeName, active_gateway};
use ipnet::{IpNet, Ipv4Net};

/// Table, rule priority and route protocol of the agent's own routes and rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub table: u32,
    pub rule_priority: u32,
    pub protocol: u8,
}

impl Default for Ownership {
    fn default() -> Self {
        Self {
            table: 211,
            rule_priority: 211,
            protocol: 211,
        }
    }
}

/// The alias the agent gives the links it creates; a link of the overlay's name without it
/// belongs to someone else and is never touched.
pub const LINK_ALIAS: &str = "clusterlink-route-agent";

/// VXLAN header and the outer UDP, IP and Ethernet headers (IPv4 underlay).
pub const VXLAN_OVERHEAD: u32 = 50;

/// This node, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub cluster: ClusterId,
    pub node: NodeName,
    /// The node's underlay address (the overlay's local end).
    pub node_ip: Ipv4Addr,
    pub tunnel_device: String,
    pub overlay_device: String,
    pub tunnel_mtu: u32,
    pub underlay_mtu: u32,
    pub vni: u32,
    pub vxlan_port: u16,
    /// The broker's addresses (from the credentials, where they name an IP): never steered
    /// into the tunnel, so a bad view cannot cut the path a corrected one would come by.
    pub broker: Vec<Ipv4Addr>,
}

/// What the shell found on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Names of the links present.
    pub links: BTreeSet<String>,
    /// IPv4 addresses on links other than the tunnel and the overlay.
    pub addresses: Vec<Ipv4Addr>,
    /// The subnets of those addresses (the node's underlay among them).
    pub subnets: Vec<Ipv4Net>,
}

/// The overlay link (VXLAN) to the active gateway node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Overlay {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    /// The active gateway node's underlay address; `None` on the gateway node itself (it
    /// only receives) and while no gateway is active.
    pub remote: Option<Ipv4Addr>,
    /// This node's address on the overlay (a /8 in [`OVERLAY_NET`]).
    pub address: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NextHop {
    /// Out of this device, no gateway (the tunnel device on the gateway node).
    Device(Arc<str>),
    /// Via this address on this device (the overlay toward the gateway node).
    Via(Ipv4Addr, Arc<str>),
    /// Not here: a `throw` route, so the lookup goes on to the next rule (the main table).
    /// It keeps what the mesh itself runs on (the node's underlay, the gateways, the broker)
    /// out of the tunnel when a remote CIDR covers it.
    Throw,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub destination: Ipv4Net,
    pub next_hop: NextHop,
    pub mtu: u32,
    pub source: Option<Ipv4Addr>,
    pub table: u32,
    pub protocol: u8,
}

/// `ip rule priority P lookup T protocol X`: the agent's table, for every destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub priority: u32,
    pub table: u32,
    pub protocol: u8,
}

/// The agent's part of the node, as wanted or as found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub overlay: Option<Overlay>,
    pub routes: BTreeMap<Ipv4Net, Route>,
    pub rules: Vec<Rule>,
}

/// The desired state, and what could not be expressed in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub state: State,
    /// The active gateway node, if any.
    pub active_gateway: Option<NodeName>,
    /// Why there are no routes, when there are none although remote clusters exist.
    pub waiting_for: Option<&'static str>,
    /// Remote CIDRs the agent cannot route (IPv6: the overlay is IPv4 for now).
    pub unsupported: Vec<IpNet>,
    /// Remote CIDRs that cover what the mesh runs on, and what that is: only the rest of
    /// each is routed (the broker refuses such CIDRs; this is the second line).
    pub excluded: Vec<(Ipv4Net, String)>,
}

/// What must never go into the tunnel, whatever the cluster set says: the node's underlay
/// subnet, every gateway's underlay and public address, and the broker.
fn protected(config: &NodeConfig, set: &ClusterSet, facts: &NodeFacts) -> Vec<(Ipv4Net, String)> {
    let host = |ip: Ipv4Addr| Ipv4Net::from(ip);
    let mut out: Vec<(Ipv4Net, String)> = facts
        .subnets
        .iter()
        .filter(|n| n.contains(&config.node_ip))
        .map(|n| (n.trunc(), "the node's underlay subnet".to_owned()))
        .collect();
    out.push((host(config.node_ip), "the node's underlay address".into()));
    for g in set.gateways.values() {
        for (what, addr) in clusterlink_api::ownership::gateway_addresses(g) {
            if let IpAddr::V4(ip) = addr {
                out.push((
                    host(ip),
                    format!("the {what} of gateway {} of cluster {}", g.node, g.cluster),
                ));
            }
        }
    }
    out.extend(
        config
            .broker
            .iter()
            .map(|ip| (host(*ip), "the broker".to_owned())),
    );
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    // One throw route covers what lies inside it.
    let all: Vec<Ipv4Net> = out.iter().map(|(n, _)| *n).collect();
    out.retain(|(n, _)| !all.iter().any(|o| o != n && o.contains(n)));
    out
}

/// The overlay addresses: 240.0.0.0/8, as Submariner does; a node's is 240 followed by the
/// low three bytes of its underlay address.
pub const OVERLAY_NET: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(240, 0, 0, 0), 8) {
    Ok(n) => n,
    Err(_) => panic!("240.0.0.0/8"),
};

pub fn overlay_address(underlay: Ipv4Addr) -> Ipv4Addr {
    let [_, b, c, d] = underlay.octets();
    Ipv4Addr::new(240, b, c, d)
}

/// The routes, rule and overlay this node should have.
pub fn desired(
    config: &NodeConfig,
    set: &ClusterSet,
    facts: &NodeFacts,
    own: Ownership,
) -> Desired {
    let mut out = Desired::default();
    let mut remote: Vec<Ipv4Net> = Vec::new();
    for (id, c) in &set.clusters {
        if id == &config.cluster {
            continue;
        }
        for net in c.pod_cidrs.iter().chain(c.service_cidrs.iter()) {
            match net {
                IpNet::V4(v4) => remote.push(*v4),
                IpNet::V6(_) => out.unsupported.push(*net),
            }
        }
    }
    remote.sort_unstable();
    remote.dedup();
    let gateway = active_gateway(&set.gateways, &config.cluster);
    out.active_gateway = gateway.map(|g| g.node.clone());
    let this_is_gateway = gateway.is_some_and(|g| g.node == config.node);
    let gateway_ip = gateway.and_then(|g| match g.private_addr {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    });
    out.state.overlay = Some(Overlay {
        name: config.overlay_device.clone(),
        vni: config.vni,
        port: config.vxlan_port,
        local: config.node_ip,
        remote: if this_is_gateway { None } else { gateway_ip },
        address: overlay_address(config.node_ip),
        mtu: config.underlay_mtu.saturating_sub(VXLAN_OVERHEAD),
    });
    out.state.rules = vec![Rule {
        priority: own.rule_priority,
        table: own.table,
        protocol: own.protocol,
    }];
    let next_hop = if this_is_gateway {
        if facts.links.contains(&config.tunnel_device) {
            Some(NextHop::Device(config.tunnel_device.as_str().into()))
        } else {
            out.waiting_for = Some("the tunnel device (is the gateway running on this node?)");
            None
        }
    } else if let Some(ip) = gateway_ip {
        Some(NextHop::Via(
            overlay_address(ip),
            config.overlay_device.as_str().into(),
        ))
    } else if gateway.is_some() {
        out.waiting_for = Some("a gateway with an IPv4 underlay address");
        None
    } else {
        out.waiting_for = Some("an active gateway in this cluster");
        None
    };
    let Some(next_hop) = next_hop else {
        // No way out: no routes, so traffic to remote clusters fails fast rather than leaking
        // out of the node's default route.
        if remote.is_empty() {
            out.waiting_for = None;
        }
        return out;
    };
    // A remote CIDR that holds something protected gets a throw route for it (longer prefix,
    // so it wins); one that lies inside something protected is not routed at all.
    let guard = protected(config, set, facts);
    let mut throws: Vec<Ipv4Net> = Vec::new();
    remote.retain(|r| {
        if let Some((p, what)) = guard.iter().find(|(p, _)| p.contains(r)) {
            out.excluded.push((*r, format!("inside {p}, {what}")));
            throws.push(*r);
            return false;
        }
        for (p, what) in guard.iter().filter(|(p, _)| r.contains(p)) {
            out.excluded.push((*r, format!("covers {p}, {what}")));
            throws.push(*p);
        }
        true
    });
    throws.sort_unstable();
    throws.dedup();
    let local_pods: Vec<IpNet> = set
        .clusters
        .get(&config.cluster)
        .map(|c| c.pod_cidrs.iter().copied().collect())
        .unwrap_or_default();
    let source = facts
        .addresses
        .iter()
        .copied()
        .find(|a| local_pods.iter().any(|n| n.contains(&IpAddr::V4(*a))));
    out.state.routes = remote
        .into_iter()
        .map(|destination| {
            let route = Route {
                destination,
                next_hop: next_hop.clone(),
                mtu: config.tunnel_mtu,
                source,
                table: own.table,
                protocol: own.protocol,
            };
            (destination, route)
        })
        .collect();
    for destination in throws {
        out.state.routes.insert(
            destination,
            Route {
                destination,
                next_hop: NextHop::Throw,
                mtu: 0,
                source: None,
                table: own.table,
                protocol: own.protocol,
            },
        );
    }
    out
}

/// What to change to get from `installed` to `desired`. Only the agent's own entries are in
/// either (the shell reads nothing else), and they are checked again here: nothing of
/// another table, protocol or priority is ever removed. The kernel keys a route by table and
/// destination, so a route whose next hop, MTU or source changed is one replace, never a
/// remove and an add.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Remove the overlay link (it is ours and differs, or is no longer wanted).
    pub delete_overlay: bool,
    pub create_overlay: Option<Overlay>,
    pub replace_routes: Vec<Route>,
    pub remove_routes: Vec<Route>,
    pub add_rules: Vec<Rule>,
    pub remove_rules: Vec<Rule>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.delete_overlay
            && self.create_overlay.is_none()
            && self.replace_routes.is_empty()
            && self.remove_routes.is_empty()
            && self.add_rules.is_empty()
            && self.remove_rules.is_empty()
    }
}

pub fn diff(installed: &State, desired: &State, own: Ownership) -> Changes {
    let mut ch = Changes::default();
    let recreate = installed.overlay != desired.overlay;
    if recreate {
        ch.delete_overlay = installed.overlay.is_some();
        ch.create_overlay = desired.overlay.clone();
    }
    // Recreating the overlay takes the kernel's routes through it along.
    let gone_with_overlay = |r: &Route| {
        recreate
            && matches!(&r.next_hop, NextHop::Via(_, dev)
                if installed.overlay.as_ref().is_some_and(|o| o.name == **dev))
    };
    let mine = |r: &Route| r.table == own.table && r.protocol == own.protocol;
    // Both maps are ordered by destination: one pass over the two, side by side.
    let mut have = installed.routes.iter().peekable();
    let mut want = desired.routes.iter().peekable();
    loop {
        match (have.peek(), want.peek()) {
            (None, None) => break,
            (Some((hd, h)), Some((wd, w))) if hd == wd => {
                if h != w || gone_with_overlay(h) {
                    ch.replace_routes.push((*w).clone());
                }
                have.next();
                want.next();
            }
            (Some((hd, h)), w) if w.is_none_or(|(wd, _)| hd < wd) => {
                if mine(h) && !gone_with_overlay(h) {
                    ch.remove_routes.push((*h).clone());
                }
                have.next();
            }
            (_, Some((_, w))) => {
                ch.replace_routes.push((*w).clone());
                want.next();
            }
            (Some(_), None) => unreachable!("handled above"),
        }
    }
    let own_rule = |r: &&Rule| {
        r.priority == own.rule_priority && r.table == own.table && r.protocol == own.protocol
    };
    let have: Vec<Rule> = installed.rules.iter().filter(own_rule).copied().collect();
    for want in &desired.rules {
        if !have.contains(want) {
            ch.add_rules.push(*want);
        }
    }
    // Keep one of each wanted rule; duplicates and unwanted ones go.
    let mut kept = BTreeSet::new();
    for r in have {
        if !desired.rules.contains(&r) || !kept.insert(r) {
            ch.remove_rules.push(r);
        }
    }
    ch
}

/// Everything the agent added goes: its routes, its rule and its overlay link.
pub fn uninstall(installed: &State, own: Ownership) -> Changes {
    Changes {
        delete_overlay: installed.overlay.is_some(),
        create_overlay: None,
        replace_routes: Vec::new(),
        remove_routes: installed
            .routes
            .values()
            .filter(|r| r.table == own.table && r.protocol == own.protocol)
            .cloned()
            .collect(),
        add_rules: Vec::new(),
        remove_rules: installed
            .rules
            .iter()
            .filter(|r| {
                r.priority == own.rule_priority
                    && r.table == own.table
                    && r.protocol == own.protocol
            })
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests;
