//! Which of a cluster's gateway nodes is active. Pure: a function of the broker's view.
//!
//! Every gateway node publishes its endpoint under a short broker lease, with the role it
//! holds. A node that dies stops renewing; its lease expires and its endpoint leaves every
//! view. Then:
//!
//! - the active one stays active while it holds its lease (no flapping back to a node that
//!   returns: a node always starts passive);
//! - with no active endpoint left, the live node with the lowest name takes over;
//! - two active endpoints (a partition healed, both took over): the lowest name keeps it,
//!   the other steps down. Observers (route agents, remote gateways) use the same rule
//!   ([`clusterlink_api::active_gateway`]), so they agree even while the two are still both
//!   published as active.
//!
//! A node whose own endpoint is not in the view (not published yet, or its lease lapsed)
//! is passive: it cannot know that nobody else took over.

use std::collections::BTreeMap;

use clusterlink_api::{ClusterId, GatewayEndpoint, GatewayRole, NodeName};

/// The role this node should hold now.
pub fn decide_role(
    cluster: &ClusterId,
    me: &NodeName,
    my_key: &[u8; 32],
    current: GatewayRole,
    gateways: &BTreeMap<(ClusterId, NodeName), GatewayEndpoint>,
) -> GatewayRole {
    let mine = gateways
        .values()
        .filter(|g| &g.cluster == cluster)
        .collect::<Vec<_>>();
    let published = mine
        .iter()
        .any(|g| &g.node == me && &g.public_key == my_key);
    if !published {
        return GatewayRole::Passive;
    }
    let lowest_other_active = mine
        .iter()
        .filter(|g| &g.node != me && g.role == GatewayRole::Active)
        .map(|g| &g.node)
        .min();
    let active = match lowest_other_active {
        None => current == GatewayRole::Active || mine.iter().map(|g| &g.node).min() == Some(me),
        Some(other) => current == GatewayRole::Active && me < other,
    };
    if active {
        GatewayRole::Active
    } else {
        GatewayRole::Passive
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GatewayRole::{Active, Passive};
    use clusterlink_api::active_gateway;

    type View = BTreeMap<(ClusterId, NodeName), GatewayEndpoint>;

    fn key(node: &str) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..node.len()].copy_from_slice(node.as_bytes());
        k
    }

    fn view(cluster: &str, nodes: &[(&str, GatewayRole)]) -> View {
        nodes
            .iter()
            .map(|(n, role)| {
                let g = GatewayEndpoint {
                    cluster: cluster.parse().unwrap(),
                    node: n.parse().unwrap(),
                    public_key: key(n),
                    private_addr: "192.0.2.1".parse().unwrap(),
                    public_addr: None,
                    port: 51820,
                    role: *role,
                    generation: 1,
                };
                ((g.cluster.clone(), g.node.clone()), g)
            })
            .collect()
    }

    fn decide(v: &View, me: &str, current: GatewayRole) -> GatewayRole {
        decide_role(
            &"c1".parse().unwrap(),
            &me.parse().unwrap(),
            &key(me),
            current,
            v,
        )
    }

    #[test]
    fn the_lowest_live_node_takes_over_when_none_is_active() {
        let v = view("c1", &[("gw0", Passive), ("gw1", Passive)]);
        assert_eq!(decide(&v, "gw0", Passive), Active);
        assert_eq!(decide(&v, "gw1", Passive), Passive);
        // gw0 died: its endpoint left the view.
        let v = view("c1", &[("gw1", Passive)]);
        assert_eq!(decide(&v, "gw1", Passive), Active);
    }

    #[test]
    fn the_active_node_keeps_its_role_when_a_lower_one_returns() {
        let v = view("c1", &[("gw0", Passive), ("gw1", Active)]);
        assert_eq!(decide(&v, "gw1", Active), Active);
        assert_eq!(decide(&v, "gw0", Passive), Passive);
    }

    #[test]
    fn of_two_active_nodes_the_lowest_name_stays() {
        let v = view("c1", &[("gw0", Active), ("gw1", Active)]);
        assert_eq!(decide(&v, "gw0", Active), Active);
        assert_eq!(decide(&v, "gw1", Active), Passive);
        assert_eq!(
            active_gateway(&v, &"c1".parse().unwrap())
                .unwrap()
                .node
                .as_str(),
            "gw0"
        );
    }

    #[test]
    fn a_node_not_in_the_view_is_passive() {
        let v = view("c1", &[("gw1", Passive)]);
        assert_eq!(decide(&v, "gw0", Active), Passive);
        // Same name, another key (a stale record of an earlier incarnation).
        let mut v = view("c1", &[("gw0", Passive)]);
        v.values_mut().for_each(|g| g.public_key = key("other"));
        assert_eq!(decide(&v, "gw0", Passive), Passive);
    }

    #[test]
    fn other_clusters_do_not_count() {
        let mut v = view("c2", &[("gw0", Active)]);
        v.extend(view("c1", &[("gw1", Passive)]));
        assert_eq!(decide(&v, "gw1", Passive), Active);
        assert_eq!(active_gateway(&v, &"c1".parse().unwrap()), None);
    }
}
