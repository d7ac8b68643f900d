//! The DNS plugin's query path on arbitrary bytes: parse as a DNS message (as the server
//! does), answer every query from a zone with ClusterSetIP, headless and IPv6 services and
//! a mix of healthy and unhealthy clusters, build the response and encode it. Nothing here
//! may panic, whatever the input.

#![no_main]

use std::sync::LazyLock;

use clusterlink_api::{Endpoint, ServicePort, ServiceRecord, ServiceType};
use clusterlink_dns::answer::{Policy, View};
use clusterlink_dns::server::Zone;
use hickory_server::proto::op::Message;
use libfuzzer_sys::fuzz_target;

fn record(
    cluster: &str,
    name: &str,
    kind: ServiceType,
    ips: &[&str],
    ready: bool,
) -> ServiceRecord {
    ServiceRecord {
        cluster: cluster.parse().unwrap(),
        namespace: "demo".parse().unwrap(),
        name: name.parse().unwrap(),
        service_type: kind,
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: "TCP".into(),
            port: 80,
            app_protocol: String::new(),
        }],
        ips: if kind == ServiceType::ClusterSetIP {
            ips.iter().map(|i| i.parse().unwrap()).collect()
        } else {
            Vec::new()
        },
        endpoints: ips
            .iter()
            .enumerate()
            .map(|(i, ip)| Endpoint {
                ip: ip.parse().unwrap(),
                hostname: Some(format!("{name}-{i}").parse().unwrap()),
                ready: i % 2 == 0,
            })
            .collect(),
        ready,
        exported_at_unix_ms: 0,
    }
}

static ZONE: LazyLock<Zone> = LazyLock::new(|| {
    Zone::new("clusterset.local", 5, vec!["10.96.0.10".parse().unwrap()]).unwrap()
});
static VIEW: LazyLock<View> = LazyLock::new(|| {
    let mut v = View {
        local: Some("east".parse().unwrap()),
        ..View::default()
    };
    v.insert(record(
        "east",
        "web",
        ServiceType::ClusterSetIP,
        &["10.101.0.7"],
        true,
    ));
    v.insert(record(
        "west",
        "web",
        ServiceType::ClusterSetIP,
        &["10.102.0.7", "fd00::7"],
        true,
    ));
    v.insert(record(
        "north",
        "web",
        ServiceType::ClusterSetIP,
        &["10.103.0.7"],
        false,
    ));
    v.insert(record(
        "west",
        "db",
        ServiceType::Headless,
        &["10.2.1.5", "10.2.1.6", "fd00::5"],
        true,
    ));
    v.live.insert(
        "west".parse().unwrap(),
        Some(std::time::Duration::from_micros(700)),
    );
    v
});

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::from_vec(data) else {
        return;
    };
    for (turn, q) in msg.queries.iter().enumerate() {
        for policy in [Policy::RoundRobin, Policy::Nearest] {
            let reply = ZONE.reply(&VIEW, policy, turn as u64, q.name(), q.query_type());
            let mut out = Message::response(msg.metadata.id, msg.metadata.op_code);
            out.add_query(q.clone());
            out.add_answers(reply.answers);
            out.add_authorities(reply.authority);
            let _ = out.to_vec();
        }
    }
});
