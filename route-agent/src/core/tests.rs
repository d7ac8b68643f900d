use super::*;
use clusterlink_api::{Cluster, GatewayEndpoint, GatewayRole};

const OWN: Ownership = Ownership {
    table: 211,
    rule_priority: 211,
    protocol: 211,
};

fn config(node: &str, ip: &str) -> NodeConfig {
    NodeConfig {
        cluster: "a".parse().unwrap(),
        node: node.parse().unwrap(),
        node_ip: ip.parse().unwrap(),
        tunnel_device: "cl0".into(),
        overlay_device: "clvx0".into(),
        tunnel_mtu: 1420,
        underlay_mtu: 1500,
        vni: 211,
        vxlan_port: 4800,
        broker: Vec::new(),
    }
}

fn facts(links: &[&str], addrs: &[&str]) -> NodeFacts {
    NodeFacts {
        links: links.iter().map(|l| l.to_string()).collect(),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        subnets: Vec::new(),
    }
}

fn add_cluster(set: &mut ClusterSet, id: &str, pods: &str, services: &str) {
    let c = Cluster {
        id: id.parse().unwrap(),
        pod_cidrs: pods.parse().unwrap(),
        service_cidrs: services.parse().unwrap(),
        labels: Default::default(),
    };
    set.clusters.insert(c.id.clone(), c);
}

fn add_gateway(set: &mut ClusterSet, cluster: &str, node: &str, ip: &str) {
    let g = GatewayEndpoint {
        cluster: cluster.parse().unwrap(),
        node: node.parse().unwrap(),
        public_key: [7; 32],
        private_addr: ip.parse().unwrap(),
        public_addr: None,
        port: 51820,
        role: GatewayRole::Active,
        generation: 1,
    };
    set.gateways.insert((g.cluster.clone(), g.node.clone()), g);
}

/// Three clusters, a's gateway on node a-gw0 (172.31.1.2).
fn three() -> ClusterSet {
    let mut set = ClusterSet::default();
    add_cluster(&mut set, "a", "10.1.0.0/16", "10.101.0.0/16");
    add_cluster(&mut set, "b", "10.2.0.0/16", "10.102.0.0/16");
    add_cluster(&mut set, "c", "10.3.0.0/16", "10.103.0.0/16");
    add_gateway(&mut set, "a", "a-gw0", "172.31.1.2");
    add_gateway(&mut set, "b", "b-gw0", "172.31.2.2");
    set
}

/// The kernel, as far as the agent's changes go: deleting a link takes its routes along.
fn apply(mut s: State, ch: &Changes) -> State {
    if ch.delete_overlay
        && let Some(o) = s.overlay.take()
    {
        s.routes
            .retain(|_, r| !matches!(&r.next_hop, NextHop::Via(_, d) if **d == *o.name));
    }
    if let Some(o) = &ch.create_overlay {
        s.overlay = Some(o.clone());
    }
    for r in &ch.remove_routes {
        s.routes.remove(&r.destination);
    }
    for r in &ch.replace_routes {
        s.routes.insert(r.destination, r.clone());
    }
    for r in &ch.remove_rules {
        let i = s.rules.iter().position(|x| x == r).unwrap();
        s.rules.remove(i);
    }
    s.rules.extend(ch.add_rules.iter().copied());
    s
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[test]
fn the_gateway_node_routes_into_the_tunnel_and_other_nodes_via_the_overlay() {
    let set = three();
    let gw = desired(
        &config("a-gw0", "172.31.1.2"),
        &set,
        &facts(&["eth0", "cl0"], &["172.31.1.2", "10.1.1.1"]),
        OWN,
    );
    assert_eq!(gw.active_gateway.as_ref().unwrap().as_str(), "a-gw0");
    // b's and c's pod and service CIDRs; never a's own.
    let dsts: Vec<String> = gw.state.routes.keys().map(|d| d.to_string()).collect();
    assert_eq!(
        dsts,
        [
            "10.2.0.0/16",
            "10.3.0.0/16",
            "10.102.0.0/16",
            "10.103.0.0/16"
        ]
    );
    for r in gw.state.routes.values() {
        assert_eq!(r.next_hop, NextHop::Device("cl0".into()));
        assert_eq!((r.mtu, r.table, r.protocol), (1420, 211, 211));
        assert_eq!(
            r.source,
            Some("10.1.1.1".parse().unwrap()),
            "an address in a's pod CIDR"
        );
    }
    let o = gw.state.overlay.as_ref().unwrap();
    assert_eq!(o.remote, None, "the gateway's overlay only receives");
    assert_eq!(o.address, "240.31.1.2".parse::<Ipv4Addr>().unwrap());
    assert_eq!(o.mtu, 1450);

    let worker = desired(
        &config("a-w1", "172.31.1.101"),
        &set,
        &facts(&["eth0"], &["172.31.1.101", "10.1.2.1"]),
        OWN,
    );
    let o = worker.state.overlay.as_ref().unwrap();
    assert_eq!(o.remote, Some("172.31.1.2".parse().unwrap()));
    assert_eq!(o.local, "172.31.1.101".parse::<Ipv4Addr>().unwrap());
    for r in worker.state.routes.values() {
        assert_eq!(
            r.next_hop,
            NextHop::Via("240.31.1.2".parse().unwrap(), "clvx0".into())
        );
        assert_eq!(r.source, Some("10.1.2.1".parse().unwrap()));
    }
    assert_eq!(
        worker.state.rules,
        vec![Rule {
            priority: 211,
            table: 211,
            protocol: 211
        }]
    );
}

#[test]
fn no_routes_until_there_is_a_way_out() {
    let mut set = three();
    // The gateway node before its tunnel device exists.
    let gw = desired(
        &config("a-gw0", "172.31.1.2"),
        &set,
        &facts(&["eth0"], &[]),
        OWN,
    );
    assert!(gw.state.routes.is_empty());
    assert!(gw.waiting_for.unwrap().contains("tunnel device"));
    // No active gateway in the cluster.
    set.gateways.retain(|(c, _), _| c.as_str() != "a");
    let w = desired(
        &config("a-w1", "172.31.1.101"),
        &set,
        &NodeFacts::default(),
        OWN,
    );
    assert!(w.state.routes.is_empty());
    assert_eq!(w.state.overlay.as_ref().unwrap().remote, None);
    assert!(w.waiting_for.unwrap().contains("active gateway"));
    assert_eq!(
        w.state.rules.len(),
        1,
        "the rule stays: it points at an empty table"
    );
    // Alone in the cluster set: nothing to wait for.
    set.clusters.retain(|id, _| id.as_str() == "a");
    let alone = desired(
        &config("a-w1", "172.31.1.101"),
        &set,
        &NodeFacts::default(),
        OWN,
    );
    assert_eq!(alone.waiting_for, None);
}

#[test]
fn ipv6_cidrs_are_reported_not_routed() {
    let mut set = three();
    add_cluster(&mut set, "d", "fd00:4::/48", "10.104.0.0/16");
    let d = desired(
        &config("a-w1", "172.31.1.101"),
        &set,
        &NodeFacts::default(),
        OWN,
    );
    assert_eq!(d.unsupported, vec!["fd00:4::/48".parse::<IpNet>().unwrap()]);
    assert!(d.state.routes.contains_key(&net("10.104.0.0/16")));
}

#[test]
fn the_diff_converges_restores_removes_and_repoints() {
    let mut set = three();
    let cfg = config("a-w1", "172.31.1.101");
    let f = facts(&["eth0"], &["10.1.2.1"]);
    let want = desired(&cfg, &set, &f, OWN).state;
    // From nothing: the overlay, four routes and the rule.
    let ch = diff(&State::default(), &want, OWN);
    assert!(!ch.delete_overlay && ch.create_overlay.is_some());
    assert_eq!((ch.replace_routes.len(), ch.add_rules.len()), (4, 1));
    let mut now = apply(State::default(), &ch);
    assert_eq!(now, want);
    assert!(
        diff(&now, &want, OWN).is_empty(),
        "applied, nothing is left to do"
    );

    // A route deleted by hand comes back, and only it.
    now.routes.remove(&net("10.3.0.0/16"));
    let ch = diff(&now, &want, OWN);
    assert_eq!(ch.replace_routes.len(), 1);
    assert_eq!(ch.replace_routes[0].destination, net("10.3.0.0/16"));
    assert!(ch.remove_routes.is_empty() && !ch.delete_overlay);
    now = apply(now, &ch);

    // Cluster c leaves: its two CIDRs go, nothing else changes.
    set.clusters.retain(|id, _| id.as_str() != "c");
    let want = desired(&cfg, &set, &f, OWN).state;
    let ch = diff(&now, &want, OWN);
    let gone: BTreeSet<String> = ch
        .remove_routes
        .iter()
        .map(|r| r.destination.to_string())
        .collect();
    assert_eq!(
        gone,
        BTreeSet::from(["10.3.0.0/16".to_owned(), "10.103.0.0/16".to_owned()])
    );
    assert!(ch.replace_routes.is_empty() && ch.create_overlay.is_none());
    now = apply(now, &ch);

    // The active gateway moves to a-gw1: the overlay is recreated toward it and every route
    // re-pointed at its overlay address.
    set.gateways.retain(|(c, _), _| c.as_str() != "a");
    add_gateway(&mut set, "a", "a-gw1", "172.31.1.3");
    let want = desired(&cfg, &set, &f, OWN).state;
    let ch = diff(&now, &want, OWN);
    assert!(ch.delete_overlay);
    assert_eq!(
        ch.create_overlay.as_ref().unwrap().remote,
        Some("172.31.1.3".parse().unwrap())
    );
    assert_eq!(ch.replace_routes.len(), 2);
    assert!(
        ch.replace_routes
            .iter()
            .all(|r| r.next_hop == NextHop::Via("240.31.1.3".parse().unwrap(), "clvx0".into()))
    );
    now = apply(now, &ch);
    assert!(diff(&now, &want, OWN).is_empty());
}

#[test]
fn what_the_agent_does_not_own_is_never_removed() {
    let set = three();
    let cfg = config("a-gw0", "172.31.1.2");
    let want = desired(&cfg, &set, &facts(&["cl0"], &[]), OWN).state;
    let mut found = want.clone();
    // A route of another protocol in our table (someone's, by hand), a rule of another
    // table at our priority, and a duplicate of our rule.
    found.routes.insert(
        net("10.9.0.0/16"),
        Route {
            destination: net("10.9.0.0/16"),
            next_hop: NextHop::Device("eth0".into()),
            mtu: 1500,
            source: None,
            table: 211,
            protocol: 4,
        },
    );
    let foreign_rule = Rule {
        priority: 211,
        table: 100,
        protocol: 4,
    };
    found.rules.push(foreign_rule);
    found.rules.push(want.rules[0]);
    let ch = diff(&found, &want, OWN);
    assert!(ch.remove_routes.is_empty(), "{ch:?}");
    assert_eq!(
        ch.remove_rules,
        vec![want.rules[0]],
        "only our duplicate goes"
    );
    assert!(ch.replace_routes.is_empty() && ch.add_rules.is_empty());

    let un = uninstall(&found, OWN);
    assert_eq!(
        un.remove_routes.len(),
        4,
        "our four routes, not the foreign one"
    );
    assert_eq!(un.remove_rules, vec![want.rules[0], want.rules[0]]);
    assert!(un.delete_overlay && un.create_overlay.is_none());
}

#[test]
fn ten_thousand_cidrs_and_one_change_is_one_replace() {
    let mut set = ClusterSet::default();
    add_cluster(&mut set, "a", "10.1.0.0/16", "10.101.0.0/16");
    add_gateway(&mut set, "a", "a-gw0", "172.31.1.2");
    for i in 0..5000u32 {
        let pods = Ipv4Addr::from(0x6400_0000 + (i << 8));
        let svcs = Ipv4Addr::from(0x6500_0000 + (i << 8));
        add_cluster(
            &mut set,
            &format!("r{i}"),
            &format!("{pods}/24"),
            &format!("{svcs}/24"),
        );
    }
    let cfg = config("a-w1", "172.31.1.101");
    let want = desired(&cfg, &set, &NodeFacts::default(), OWN).state;
    assert_eq!(want.routes.len(), 10_000);
    let now = apply(State::default(), &diff(&State::default(), &want, OWN));
    set.clusters.retain(|id, _| id.as_str() != "r77");
    let want = desired(&cfg, &set, &NodeFacts::default(), OWN).state;
    let ch = diff(&now, &want, OWN);
    assert_eq!((ch.replace_routes.len(), ch.remove_routes.len()), (0, 2));
}

#[test]
fn what_the_mesh_runs_on_never_goes_into_the_tunnel() {
    // A rogue cluster d whose pods cover the underlay (a's node subnet, b's gateway) and
    // whose services cover the broker: the broker refuses that join; if one got through,
    // the agent still keeps those addresses out of the tunnel.
    let mut set = three();
    add_cluster(&mut set, "d", "172.31.0.0/16", "192.0.2.0/24");
    let mut cfg = config("a-w1", "172.31.1.5");
    cfg.broker = vec!["192.0.2.7".parse().unwrap()];
    let mut node = facts(&["eth0"], &["172.31.1.5"]);
    node.subnets = vec!["172.31.1.0/24".parse().unwrap()];
    let d = desired(&cfg, &set, &node, OWN);
    let throws: Vec<String> = d
        .state
        .routes
        .values()
        .filter(|r| r.next_hop == NextHop::Throw)
        .map(|r| r.destination.to_string())
        .collect();
    assert_eq!(
        throws,
        [
            "172.31.1.0/24", // the node's underlay subnet (a-gw0 and this node in it)
            "172.31.2.2/32", // b's gateway
            "192.0.2.7/32",  // the broker
        ]
    );
    // The rest of d's CIDRs are routed as any remote cluster's.
    for routed in ["172.31.0.0/16", "192.0.2.0/24", "10.2.0.0/16"] {
        let r = &d.state.routes[&net(routed)];
        assert!(matches!(r.next_hop, NextHop::Via(..)), "{routed}: {r:?}");
    }
    assert!(
        d.excluded
            .iter()
            .any(|(n, why)| n.to_string() == "192.0.2.0/24" && why.contains("the broker")),
        "{:?}",
        d.excluded
    );
    // A remote CIDR inside the node's subnet is not routed at all: thrown whole.
    let mut inside = three();
    add_cluster(&mut inside, "e", "172.31.1.128/25", "10.105.0.0/16");
    let e = desired(&cfg, &inside, &node, OWN);
    assert_eq!(
        e.state.routes[&net("172.31.1.128/25")].next_hop,
        NextHop::Throw
    );
    assert!(matches!(
        e.state.routes[&net("10.105.0.0/16")].next_hop,
        NextHop::Via(..)
    ));
    // Nothing protected in the way: no throw routes at all.
    let plain = desired(&cfg, &three(), &node, OWN);
    assert!(
        plain
            .state
            .routes
            .values()
            .all(|r| r.next_hop != NextHop::Throw)
    );
}
