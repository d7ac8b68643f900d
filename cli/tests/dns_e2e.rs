//! The DNS plugin, from pods, with `dig` (needs root): every cluster runs `clusterlink dns
//! run` on its gateway node and its pods resolve through it. Service records are published
//! here as the export controller would; tunnel health comes from the real gateways.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use clusterlink_api::{Endpoint, Kind, Record, ServicePort, ServiceRecord, ServiceType};
use clusterlink_e2e::{ClusterSpec, Lab, Netns, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_clusterlink");

fn up() -> Lab {
    let specs: Vec<ClusterSpec> = ["a", "b", "c"]
        .iter()
        .map(|n| ClusterSpec {
            name: n.to_string(),
            gateways: 1,
            workers: 1,
            nat: false,
        })
        .collect();
    let lab = Lab::up(Path::new(BIN), &specs, &|_| {}).expect("lab up (needs root)");
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    lab
}

fn echo(cluster: &str, ip: &str, ready: bool) -> Record {
    Record::Service(ServiceRecord {
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
        ips: vec![ip.parse().unwrap()],
        endpoints: Vec::new(),
        ready,
        exported_at_unix_ms: 1,
    })
}

/// `dig +short NAME TYPE` in a pod, through its resolver.
fn short(pod: &Netns, name: &str, qtype: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["+short", "+time=2", "+tries=1", name, qtype];
    args.extend(extra);
    let out = pod.exec("dig", &args).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `dig` with the header and sections, for status, flags and the authority section.
fn full(pod: &Netns, args: &[&str]) -> String {
    let mut a = vec![
        "+time=2",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
        "+authority",
    ];
    a.extend(args);
    String::from_utf8_lossy(&pod.exec("dig", &a).unwrap().stdout).into_owned()
}

#[test]
fn clusterset_names_from_pods() {
    let lab = up();
    for (i, (c, ip)) in [
        ("a", "10.101.0.7"),
        ("b", "10.102.0.7"),
        ("c", "10.103.0.7"),
    ]
    .into_iter()
    .enumerate()
    {
        lab.publish(i, echo(c, ip, true)).unwrap();
    }
    let b_pod = lab.worker(1).pod.clone();
    lab.publish(
        1,
        Record::Service(ServiceRecord {
            cluster: "b".parse().unwrap(),
            namespace: "demo".parse().unwrap(),
            name: "db".parse().unwrap(),
            service_type: ServiceType::Headless,
            ports: Vec::new(),
            ips: Vec::new(),
            endpoints: vec![Endpoint {
                ip: b_pod.address.into(),
                hostname: Some("db-0".parse().unwrap()),
                ready: true,
            }],
            ready: true,
            exported_at_unix_ms: 1,
        }),
    )
    .unwrap();
    let pod = lab.worker(0).pod.ns();
    let name = "echo.demo.svc.clusterset.local";

    // Every healthy cluster, the local one first.
    wait_until(
        "echo from all three clusters",
        Duration::from_secs(10),
        || short(&pod, name, "A", &[]).len() == 3,
    )
    .unwrap();
    let ips = short(&pod, name, "A", &[]);
    assert_eq!(ips[0], "10.101.0.7", "{ips:?}");
    // The same over TCP, and whatever the case of the name.
    assert_eq!(
        short(&pod, "ECHO.Demo.SVC.clusterset.LOCAL", "A", &["+tcp"]).len(),
        3
    );
    // TTL 5 s, authoritative.
    let answer = full(&pod, &[name, "A"]);
    assert!(answer.contains(" aa"), "{answer}");
    assert!(
        answer
            .lines()
            .filter(|l| l.starts_with(name))
            .all(|l| l.split_whitespace().nth(1) == Some("5")),
        "{answer}"
    );
    // One cluster's address, SRV, a headless service and one of its endpoints by hostname.
    assert_eq!(
        short(&pod, "b.echo.demo.svc.clusterset.local", "A", &[]),
        ["10.102.0.7"]
    );
    let srv = short(
        &pod,
        "_tcp-echo._tcp.echo.demo.svc.clusterset.local",
        "SRV",
        &[],
    );
    assert_eq!(srv.len(), 3, "{srv:?}");
    assert!(
        srv[0].ends_with(" 7 a.echo.demo.svc.clusterset.local."),
        "{srv:?}"
    );
    let b_ip = b_pod.address.to_string();
    assert_eq!(
        short(&pod, "db.demo.svc.clusterset.local", "A", &[]),
        std::slice::from_ref(&b_ip)
    );
    assert_eq!(
        short(&pod, "db-0.b.db.demo.svc.clusterset.local", "A", &[]),
        [b_ip]
    );

    // NXDOMAIN and NODATA carry the SOA; outside the zone is REFUSED.
    let nx = full(&pod, &["nope.demo.svc.clusterset.local", "A"]);
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("SOA"),
        "{nx}"
    );
    let nodata = full(&pod, &[name, "AAAA"]);
    assert!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("SOA"),
        "{nodata}"
    );
    let dns = lab.state.clusters[0].dns_address.to_string();
    let refused = full(&pod, &[&format!("@{dns}"), "example.com", "A"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");

    // A malformed packet gets no crash: the server still answers after it.
    let target: std::net::SocketAddr = format!("{dns}:53").parse().unwrap();
    pod.run_in(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 0, 0, 0xff], target)
            .unwrap();
        s.send_to(&[0u8; 3], target).unwrap();
    })
    .unwrap();
    assert_eq!(short(&pod, name, "A", &[]).len(), 3);

    // c's endpoints become unready: c drops out.
    lab.publish(2, echo("c", "10.103.0.7", false)).unwrap();
    wait_until("c to drop out", Duration::from_secs(10), || {
        let ips = short(&pod, name, "A", &[]);
        ips.len() == 2 && !ips.contains(&"10.103.0.7".to_owned())
    })
    .unwrap();
    // b's gateway stops: a's tunnel to b goes down and b drops out too.
    lab.bed.kill(lab.state.clusters[1].gateways[0].pid);
    wait_until("b to drop out", Duration::from_secs(20), || {
        short(&pod, name, "A", &[]) == ["10.101.0.7"]
    })
    .unwrap();
    // Unexported everywhere: the name is gone.
    for i in 0..3 {
        lab.withdraw(i, Kind::Services, "demo/echo").unwrap();
    }
    wait_until("echo to be gone", Duration::from_secs(10), || {
        full(&pod, &[name, "A"]).contains("status: NXDOMAIN")
    })
    .unwrap();
}
