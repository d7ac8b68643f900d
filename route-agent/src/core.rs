//! Desired state and difference, without I/O.
//!
//! Every route the agent owns lives in its own table, is reached through its own `ip rule`,
//! and carries its own route protocol number, so the applier can tell its routes from
//! everyone else's and never touches the others.
//!
//! - On the active gateway node: each remote CIDR into the tunnel device.
//! - On every other node: each remote CIDR via the overlay (VXLAN) device toward the active
//!   gateway node's overlay address, so it works whatever the CNI does with the node's own
//!   routes.
//!
//! Routes carry the tunnel MTU, so TCP picks an MSS that fits without packet-filter rules.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// Table, rule priority and route protocol of the agent's own routes.
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

/// What the agent knows of the world at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// Is this node the cluster's active gateway?
    pub this_node_is_active_gateway: bool,
    /// The active gateway node's address on the overlay; `None` while no gateway is active.
    pub active_gateway_overlay_ip: Option<IpAddr>,
    /// Every remote cluster's pod and service CIDRs.
    pub remote_cidrs: BTreeSet<IpNet>,
    pub tunnel_device: String,
    pub overlay_device: String,
    pub tunnel_mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NextHop {
    /// Out of this device, no gateway (the tunnel device on the gateway node).
    Device(String),
    /// Via this address on this device (the overlay toward the gateway node).
    Via(IpAddr, String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub destination: IpNet,
    pub next_hop: NextHop,
    pub mtu: u32,
    pub table: u32,
    pub protocol: u8,
}

/// `ip rule`: look up `table` for every destination in `destinations`, at `priority`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub destination: IpNet,
    pub table: u32,
    pub priority: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeSet<Route>,
    pub rules: BTreeSet<Rule>,
}

/// The routes and rules this node should have.
pub fn desired(view: &ClusterView, own: Ownership) -> Desired {
    let next_hop = if view.this_node_is_active_gateway {
        Some(NextHop::Device(view.tunnel_device.clone()))
    } else {
        view.active_gateway_overlay_ip
            .map(|ip| NextHop::Via(ip, view.overlay_device.clone()))
    };
    let Some(next_hop) = next_hop else {
        // No active gateway: no routes (traffic to remote clusters fails fast rather than
        // leaking out of the node's default route), but keep the rules in place.
        return Desired {
            routes: BTreeSet::new(),
            rules: rules(view, own),
        };
    };
    Desired {
        routes: view
            .remote_cidrs
            .iter()
            .map(|d| Route {
                destination: *d,
                next_hop: next_hop.clone(),
                mtu: view.tunnel_mtu,
                table: own.table,
                protocol: own.protocol,
            })
            .collect(),
        rules: rules(view, own),
    }
}

fn rules(view: &ClusterView, own: Ownership) -> BTreeSet<Rule> {
    view.remote_cidrs
        .iter()
        .map(|d| Rule {
            destination: *d,
            table: own.table,
            priority: own.rule_priority,
        })
        .collect()
}

/// What to change to get from `installed` to `desired`. Only entries of the agent's own
/// table and protocol are ever considered: anything else in `installed` is ignored, never
/// removed. The kernel keys a route by table and destination, so a route whose next hop or
/// MTU changed is one replace (`add_routes` is applied with replace semantics), never a
/// remove and an add.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub add_routes: Vec<Route>,
    pub remove_routes: Vec<Route>,
    pub add_rules: Vec<Rule>,
    pub remove_rules: Vec<Rule>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add_routes.is_empty()
            && self.remove_routes.is_empty()
            && self.add_rules.is_empty()
            && self.remove_rules.is_empty()
    }
}

pub fn diff(installed: &Desired, desired: &Desired, own: Ownership) -> Changes {
    let mine_r = |r: &&Route| r.table == own.table && r.protocol == own.protocol;
    let mine_u = |r: &&Rule| r.table == own.table && r.priority == own.rule_priority;
    Changes {
        add_routes: desired
            .routes
            .difference(&installed.routes)
            .cloned()
            .collect(),
        remove_routes: installed
            .routes
            .iter()
            .filter(mine_r)
            .filter(|r| {
                !desired
                    .routes
                    .iter()
                    .any(|d| d.table == r.table && d.destination == r.destination)
            })
            .cloned()
            .collect(),
        add_rules: desired
            .rules
            .difference(&installed.rules)
            .cloned()
            .collect(),
        remove_rules: installed
            .rules
            .iter()
            .filter(mine_u)
            .filter(|r| !desired.rules.contains(*r))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(active: bool, gw: Option<&str>, cidrs: &[&str]) -> ClusterView {
        ClusterView {
            this_node_is_active_gateway: active,
            active_gateway_overlay_ip: gw.map(|g| g.parse().unwrap()),
            remote_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            tunnel_device: "cl0".into(),
            overlay_device: "clvx0".into(),
            tunnel_mtu: 1420,
        }
    }

    #[test]
    fn gateway_node_routes_into_the_tunnel_others_via_the_overlay() {
        let own = Ownership::default();
        let gw = desired(&view(true, None, &["10.2.0.0/16", "10.102.0.0/16"]), own);
        assert_eq!(gw.routes.len(), 2);
        assert!(
            gw.routes
                .iter()
                .all(|r| r.next_hop == NextHop::Device("cl0".into()) && r.mtu == 1420)
        );
        let worker = desired(&view(false, Some("240.0.0.1"), &["10.2.0.0/16"]), own);
        let r = worker.routes.iter().next().unwrap();
        assert_eq!(
            r.next_hop,
            NextHop::Via("240.0.0.1".parse().unwrap(), "clvx0".into())
        );
        assert_eq!((r.table, r.protocol), (211, 211));
        assert_eq!(worker.rules.len(), 1);
        // No active gateway: no routes, rules kept.
        let none = desired(&view(false, None, &["10.2.0.0/16"]), own);
        assert!(none.routes.is_empty());
        assert_eq!(none.rules.len(), 1);
    }

    #[test]
    fn diff_adds_removes_and_never_touches_what_it_does_not_own() {
        let own = Ownership::default();
        let before = desired(
            &view(false, Some("240.0.0.1"), &["10.2.0.0/16", "10.3.0.0/16"]),
            own,
        );
        let mut installed = before.clone();
        // Someone else's route in another table, and one of ours deleted by hand.
        let foreign = Route {
            destination: "10.9.0.0/16".parse().unwrap(),
            next_hop: NextHop::Device("eth0".into()),
            mtu: 1500,
            table: 254,
            protocol: 4,
        };
        installed.routes.insert(foreign.clone());
        let deleted = installed
            .routes
            .iter()
            .find(|r| r.destination.to_string() == "10.2.0.0/16")
            .unwrap()
            .clone();
        installed.routes.remove(&deleted);
        // Cluster 3 leaves and the active gateway moves.
        let after = desired(&view(false, Some("240.0.0.2"), &["10.2.0.0/16"]), own);
        let ch = diff(&installed, &after, own);
        assert_eq!(
            ch.add_routes.len(),
            1,
            "10.2/16 re-pointed (and restored), as one replace"
        );
        assert_eq!(
            ch.add_routes[0].next_hop,
            NextHop::Via("240.0.0.2".parse().unwrap(), "clvx0".into())
        );
        assert_eq!(
            ch.remove_routes.len(),
            1,
            "10.3/16 via the old gateway goes"
        );
        assert!(
            !ch.remove_routes.contains(&foreign),
            "never removes what it does not own"
        );
        assert_eq!(ch.remove_rules.len(), 1);
        // A route whose next hop changed is replaced, not removed.
        let repointed = desired(&view(false, Some("240.0.0.9"), &["10.2.0.0/16"]), own);
        let ch2 = diff(&after, &repointed, own);
        assert_eq!((ch2.add_routes.len(), ch2.remove_routes.len()), (1, 0));
        // Applied (replace semantics), nothing is left to do.
        let mut now = installed.clone();
        for r in &ch.remove_routes {
            now.routes.remove(r);
        }
        for r in &ch.add_routes {
            now.routes
                .retain(|i| !(i.table == r.table && i.destination == r.destination));
            now.routes.insert(r.clone());
        }
        for r in &ch.remove_rules {
            now.rules.remove(r);
        }
        now.rules.extend(ch.add_rules.iter().cloned());
        assert!(diff(&now, &after, own).is_empty());
    }
}
