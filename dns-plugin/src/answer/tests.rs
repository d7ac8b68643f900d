use super::*;
use clusterlink_api::{ConnectionState, ConnectionStatus, Endpoint, ServicePort};

fn labels(s: &str) -> Vec<String> {
    s.trim_end_matches('.')
        .split('.')
        .map(|l| l.to_ascii_lowercase())
        .collect()
}

fn zone() -> Vec<String> {
    labels("clusterset.local")
}

fn record(cluster: &str, ips: &[&str], ready: bool) -> ServiceRecord {
    ServiceRecord {
        cluster: cluster.parse().unwrap(),
        namespace: "demo".parse().unwrap(),
        name: "echo".parse().unwrap(),
        service_type: ServiceType::ClusterSetIP,
        ports: vec![ServicePort {
            name: "tcp-echo".into(),
            protocol: "TCP".into(),
            port: 7,
            app_protocol: String::new(),
        }],
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        endpoints: Vec::new(),
        ready,
        exported_at_unix_ms: 0,
    }
}

/// east is local; west and north export echo; the gateway has live tunnels to west (2 ms)
/// and north (1 ms).
fn view() -> View {
    let mut v = View {
        local: Some("east".parse().unwrap()),
        ..View::default()
    };
    v.insert(record("east", &["10.101.0.7"], true));
    v.insert(record("west", &["10.102.0.7"], true));
    v.insert(record("north", &["10.103.0.7", "fd00::7"], true));
    v.live
        .insert("west".parse().unwrap(), Some(Duration::from_millis(2)));
    v.live
        .insert("north".parse().unwrap(), Some(Duration::from_millis(1)));
    v
}

fn ask(v: &View, policy: Policy, turn: u64, name: &str, q: QType) -> Answer {
    answer(&zone(), v, policy, turn, &labels(name), q)
}

fn ips(a: &Answer) -> Vec<String> {
    match a {
        Answer::Records(r) => r
            .iter()
            .filter_map(|d| match d {
                Data::Ip(ip) => Some(ip.to_string()),
                _ => None,
            })
            .collect(),
        other => panic!("expected records, got {other:?}"),
    }
}

#[test]
fn local_first_then_round_robin_or_nearest() {
    let v = view();
    let name = "echo.demo.svc.clusterset.local";
    let first = ips(&ask(&v, Policy::RoundRobin, 0, name, QType::A));
    let second = ips(&ask(&v, Policy::RoundRobin, 1, name, QType::A));
    assert_eq!(first[0], "10.101.0.7", "the local cluster first");
    assert_eq!(second[0], "10.101.0.7");
    assert_eq!(first.len(), 3);
    assert_ne!(first[1], second[1], "remote clusters take turns");
    let nearest = ips(&ask(&v, Policy::Nearest, 7, name, QType::A));
    assert_eq!(
        nearest,
        ["10.101.0.7", "10.103.0.7", "10.102.0.7"],
        "north is nearer"
    );
    assert_eq!(
        ips(&ask(&v, Policy::Nearest, 0, name, QType::Aaaa)),
        ["fd00::7"]
    );
}

#[test]
fn unhealthy_clusters_drop_out() {
    let mut v = view();
    // west's tunnel goes down; north's endpoints become unready.
    v.live.remove(&"west".parse().unwrap());
    v.insert(record("north", &["10.103.0.7"], false));
    let a = ask(
        &v,
        Policy::RoundRobin,
        0,
        "echo.demo.svc.clusterset.local",
        QType::A,
    );
    assert_eq!(ips(&a), ["10.101.0.7"]);
    assert_eq!(
        ask(
            &v,
            Policy::RoundRobin,
            0,
            "west.echo.demo.svc.clusterset.local",
            QType::A
        ),
        Answer::NoData
    );
    // The local cluster unexports: nothing healthy is left, the name still exists.
    v.remove(&"east".parse().unwrap(), "demo", "echo");
    assert_eq!(
        ask(
            &v,
            Policy::RoundRobin,
            0,
            "echo.demo.svc.clusterset.local",
            QType::A
        ),
        Answer::NoData
    );
    // Everyone unexports: the name is gone.
    v.remove(&"west".parse().unwrap(), "demo", "echo");
    v.remove(&"north".parse().unwrap(), "demo", "echo");
    assert_eq!(
        ask(
            &v,
            Policy::RoundRobin,
            0,
            "echo.demo.svc.clusterset.local",
            QType::A
        ),
        Answer::NxDomain
    );
}

#[test]
fn per_cluster_headless_and_srv_names() {
    let mut v = view();
    assert_eq!(
        ips(&ask(
            &v,
            Policy::RoundRobin,
            0,
            "WEST.Echo.demo.svc.ClusterSet.local.",
            QType::A
        )),
        ["10.102.0.7"],
        "names are case-insensitive"
    );
    let mut headless = record("west", &[], true);
    headless.name = "db".parse().unwrap();
    headless.service_type = ServiceType::Headless;
    headless.endpoints = vec![
        Endpoint {
            ip: "10.2.1.5".parse().unwrap(),
            hostname: Some("db-0".parse().unwrap()),
            ready: true,
        },
        Endpoint {
            ip: "10.2.1.6".parse().unwrap(),
            hostname: Some("db-1".parse().unwrap()),
            ready: false,
        },
    ];
    v.insert(headless);
    assert_eq!(
        ips(&ask(
            &v,
            Policy::RoundRobin,
            0,
            "db.demo.svc.clusterset.local",
            QType::A
        )),
        ["10.2.1.5"],
        "only ready endpoints"
    );
    assert_eq!(
        ips(&ask(
            &v,
            Policy::RoundRobin,
            0,
            "db-1.west.db.demo.svc.clusterset.local",
            QType::A
        )),
        ["10.2.1.6"],
        "a named endpoint answers by its hostname"
    );
    assert_eq!(
        ask(
            &v,
            Policy::RoundRobin,
            0,
            "db-9.west.db.demo.svc.clusterset.local",
            QType::A
        ),
        Answer::NxDomain
    );
    let srv = ask(
        &v,
        Policy::Nearest,
        0,
        "_tcp-echo._tcp.echo.demo.svc.clusterset.local",
        QType::Srv,
    );
    let Answer::Records(srv) = srv else {
        panic!("{srv:?}")
    };
    assert_eq!(srv.len(), 3);
    assert_eq!(
        srv[0],
        Data::Srv {
            port: 7,
            target: labels("east.echo.demo.svc")
        }
    );
    assert_eq!(
        ask(
            &v,
            Policy::Nearest,
            0,
            "_udp-x._udp.echo.demo.svc.clusterset.local",
            QType::Srv
        ),
        Answer::NxDomain
    );
    assert_eq!(
        ask(
            &v,
            Policy::Nearest,
            0,
            "_tcp.echo.demo.svc.clusterset.local",
            QType::Srv
        ),
        Answer::NoData,
        "an empty non-terminal above the SRV names"
    );
}

#[test]
fn nxdomain_nodata_and_refused() {
    let v = view();
    let q = |n: &str, t: QType| ask(&v, Policy::RoundRobin, 0, n, t);
    assert_eq!(
        q("nope.demo.svc.clusterset.local", QType::A),
        Answer::NxDomain
    );
    assert_eq!(
        q("echo.nowhere.svc.clusterset.local", QType::A),
        Answer::NxDomain
    );
    assert_eq!(
        q("x.echo.demo.pods.clusterset.local", QType::A),
        Answer::NxDomain
    );
    assert_eq!(q("demo.svc.clusterset.local", QType::A), Answer::NoData);
    assert_eq!(q("svc.clusterset.local", QType::A), Answer::NoData);
    assert_eq!(
        q("clusterset.local", QType::Soa),
        Answer::Records(vec![Data::Soa])
    );
    assert_eq!(q("clusterset.local", QType::A), Answer::NoData);
    assert_eq!(
        q("echo.demo.svc.clusterset.local", QType::Other(16)),
        Answer::NoData
    );
    assert_eq!(
        q("west.echo.demo.svc.clusterset.local", QType::Aaaa),
        Answer::NoData
    );
    assert_eq!(q("example.com", QType::A), Answer::Refused);
    assert_eq!(q("local", QType::A), Answer::Refused);
    assert_eq!(q("clusterset.local.evil", QType::A), Answer::Refused);
}

fn status(
    from: &str,
    to: &str,
    node: &str,
    state: ConnectionState,
    rtt_us: u64,
    hs_ms: i64,
) -> ConnectionStatus {
    ConnectionStatus {
        from_cluster: from.parse().unwrap(),
        from_node: format!("{from}-gw0").parse().unwrap(),
        to_cluster: to.parse().unwrap(),
        to_node: node.parse().unwrap(),
        state,
        rtt_micros: rtt_us,
        last_handshake_unix_ms: hs_ms,
        tx_bytes: 0,
        rx_bytes: 0,
    }
}

/// east, west and north as registered: pods 10.N.0.0/16, services 10.10N.0.0/16.
fn clusters() -> BTreeMap<ClusterId, Cluster> {
    [("east", 1), ("west", 2), ("north", 3)]
        .into_iter()
        .map(|(id, n)| {
            let c = Cluster {
                id: id.parse().unwrap(),
                pod_cidrs: format!("10.{n}.0.0/16").parse().unwrap(),
                service_cidrs: format!("10.10{n}.0.0/16").parse().unwrap(),
                labels: Default::default(),
            };
            (c.id.clone(), c)
        })
        .collect()
}

#[test]
fn a_record_the_broker_did_not_vet_is_not_answered() {
    let mut services = BTreeMap::new();
    for (c, ip) in [
        ("east", "10.101.0.7"),
        // west claims north's service address, north an address on the internet, and south
        // is not a registered cluster at all.
        ("west", "10.103.0.9"),
        ("north", "8.8.8.8"),
        ("south", "10.104.0.7"),
    ] {
        let r = record(c, &[ip], true);
        services.insert((r.cluster.clone(), r.namespace.clone(), r.name.clone()), r);
    }
    let local: ClusterId = "east".parse().unwrap();
    let v = view_of(&local, &clusters(), &services, &BTreeMap::new(), 0);
    assert_eq!(
        ips(&ask(
            &v,
            Policy::RoundRobin,
            0,
            "echo.demo.svc.clusterset.local",
            QType::A
        )),
        ["10.101.0.7"]
    );
    for other in ["west", "north", "south"] {
        let name = format!("{other}.echo.demo.svc.clusterset.local");
        assert_eq!(
            ask(&v, Policy::RoundRobin, 0, &name, QType::A),
            Answer::NxDomain,
            "{other}"
        );
    }
}

#[test]
fn live_tunnels_are_connected_fresh_and_ours_with_simulated_time() {
    let mut services = BTreeMap::new();
    for (c, ip) in [
        ("east", "10.101.0.7"),
        ("west", "10.102.0.7"),
        ("north", "10.103.0.7"),
    ] {
        let r = record(c, &[ip], true);
        services.insert((r.cluster.clone(), r.namespace.clone(), r.name.clone()), r);
    }
    let t0: i64 = 1_800_000_000_000;
    let mut conns = BTreeMap::new();
    for s in [
        // Two gateway nodes of west: the better RTT counts.
        status(
            "east",
            "west",
            "w-gw0",
            ConnectionState::Connected,
            3000,
            t0,
        ),
        status("east", "west", "w-gw1", ConnectionState::Connected, 900, t0),
        status(
            "east",
            "north",
            "n-gw0",
            ConnectionState::Connected,
            2000,
            t0 - 100_000,
        ),
        // What west sees of north is no business of east's answers.
        status("west", "north", "n-gw0", ConnectionState::Error, 0, t0),
    ] {
        conns.insert(s.tunnel(), s);
    }
    let local: ClusterId = "east".parse().unwrap();
    let name = "echo.demo.svc.clusterset.local";
    let v = view_of(&local, &clusters(), &services, &conns, t0);
    assert_eq!(
        v.live[&"west".parse::<ClusterId>().unwrap()],
        Some(Duration::from_micros(900))
    );
    assert_eq!(
        ips(&ask(&v, Policy::Nearest, 0, name, QType::A)),
        ["10.101.0.7", "10.102.0.7", "10.103.0.7"]
    );
    // 81 s later north's last handshake is 181 s old: it drops out, west stays.
    let v = view_of(&local, &clusters(), &services, &conns, t0 + 81_000);
    assert_eq!(
        ips(&ask(&v, Policy::Nearest, 0, name, QType::A)),
        ["10.101.0.7", "10.102.0.7"]
    );
    // 181 s later every handshake is stale: only the local cluster answers.
    let v = view_of(&local, &clusters(), &services, &conns, t0 + 181_000);
    assert_eq!(
        ips(&ask(&v, Policy::Nearest, 0, name, QType::A)),
        ["10.101.0.7"]
    );
    // A tunnel that says connected but never completed a handshake is not live.
    let s = status("east", "west", "w-gw9", ConnectionState::Connected, 1, 0);
    conns.insert(s.tunnel(), s);
    let v = view_of(&local, &clusters(), &services, &conns, t0 + 181_000);
    assert!(v.live.is_empty());
}
