//! Service discovery, from pods, with `dig` (needs root): every cluster runs `clusterlink dns
//! run` on its gateway node and its pods resolve through it. The first test publishes service
//! records itself (every record form, health); the second goes through the export path:
//! manifests, `clusterlink export`/`unexport`, the export controller and its conditions.

use std::path::Path;
use std::time::Duration;

use clusterlink_lab::{ClusterSpec, Lab, Netns, wait_until};

use crate::support::BIN;

fn up() -> Lab {
    let specs = ClusterSpec::many(&["a", "b", "c"], 1, &[]);
    let lab = Lab::up(Path::new(BIN), &specs, &|_| {}).expect("lab up (needs root)");
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    lab
}

/// A Service `name` (ClusterIP `ip`, or headless with "None") with one endpoint, as
/// manifests in cluster `c`'s directory, exported with the CLI.
fn export_service(lab: &Lab, c: usize, name: &str, ip: &str, endpoint: &str, ready: bool) {
    let dir = &lab.state.clusters[c].manifests;
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec:\n  clusterIP: \"{ip}\"\n  ports: [{{name: tcp-echo, port: 7, protocol: TCP}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nendpoints:\n- addresses: [\"{endpoint}\"]\n  hostname: {name}-0\n  conditions: {{ready: {ready}}}\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["export", "service", name, "-n", "demo", "--manifests"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let pods: Vec<String> = (0..3)
        .map(|c| lab.worker(c).pod.address.to_string())
        .collect();
    for (c, ip) in ["10.101.0.7", "10.102.0.7", "10.103.0.7"]
        .into_iter()
        .enumerate()
    {
        export_service(&lab, c, "web", ip, &pods[c], true);
    }
    let b_pod = lab.worker(1).pod.clone();
    export_service(&lab, 1, "db", "None", &pods[1], true);
    let pod = lab.worker(0).pod.ns();
    let name = "web.demo.svc.clusterset.local";

    // Every healthy cluster, the local one first.
    wait_until(
        "web from all three clusters",
        Duration::from_secs(10),
        || short(&pod, name, "A", &[]).len() == 3,
    )
    .unwrap();
    let ips = short(&pod, name, "A", &[]);
    assert_eq!(ips[0], "10.101.0.7", "{ips:?}");
    // The same over TCP, and whatever the case of the name.
    assert_eq!(
        short(&pod, "WEB.Demo.SVC.clusterset.LOCAL", "A", &["+tcp"]).len(),
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
        short(&pod, "b.web.demo.svc.clusterset.local", "A", &[]),
        ["10.102.0.7"]
    );
    let srv = short(
        &pod,
        "_tcp-echo._tcp.web.demo.svc.clusterset.local",
        "SRV",
        &[],
    );
    assert_eq!(srv.len(), 3, "{srv:?}");
    assert!(
        srv[0].ends_with(" 7 a.web.demo.svc.clusterset.local."),
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
    assert!(full(&pod, &["db-9.b.db.demo.svc.clusterset.local", "A"]).contains("status: NXDOMAIN"));

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
    export_service(&lab, 2, "web", "10.103.0.7", &pods[2], false);
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
    for c in 0..3 {
        std::fs::remove_file(
            lab.state.clusters[c]
                .manifests
                .join("serviceexport.demo.web.yaml"),
        )
        .unwrap();
    }
    wait_until("web to be gone", Duration::from_secs(10), || {
        full(&pod, &[name, "A"]).contains("status: NXDOMAIN")
    })
    .unwrap();
}

fn status_of(lab: &Lab, cluster: usize, name: &str) -> String {
    let path = lab.state.clusters[cluster]
        .manifests
        .join("status")
        .join(format!("serviceexport.demo.{name}.yaml"));
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The condition of a type in a status file, as "Status/Reason".
fn condition(status: &str, kind: &str) -> Option<String> {
    let v: serde_json::Value = serde_saphyr::from_str(status).ok()?;
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            format!(
                "{}/{}",
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or("")
            )
        })
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn export_unexport_unready_and_conflict_through_manifests() {
    let lab = up();
    lab.wait_services(Duration::from_secs(20)).unwrap();
    let pod = lab.worker(0).pod.ns();
    let name = clusterlink_lab::lab::ECHO_NAME;
    let c_ip = lab.worker(2).pod.address.to_string();
    let dir = |c: usize| lab.state.clusters[c].manifests.display().to_string();
    assert_eq!(
        condition(&status_of(&lab, 0, "echo"), "Valid").as_deref(),
        Some("True/Valid")
    );
    assert_eq!(
        condition(&status_of(&lab, 0, "echo"), "Ready").as_deref(),
        Some("True/Exported")
    );
    // Every cluster imports it: a ServiceImport naming the three clusters, a slice each.
    let imported = lab.state.clusters[0]
        .manifests
        .join("imported/serviceimport.demo.echo.yaml");
    wait_until(
        "the import to list three clusters",
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&imported).unwrap_or_default();
            text.contains("kind: ServiceImport")
                && text.matches("kind: EndpointSlice").count() == 3
                && ["cluster: a", "cluster: b", "cluster: c"]
                    .iter()
                    .all(|c| text.contains(c))
        },
    )
    .unwrap();

    // Unexported in c: c's address goes from a's answers; exported again, it comes back.
    let out = cli(&[
        "unexport",
        "service",
        "echo",
        "-n",
        "demo",
        "--manifests",
        &dir(2),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("c's echo to go", Duration::from_secs(10), || {
        let a = short(&pod, name, "A", &[]);
        a.len() == 2 && !a.contains(&c_ip)
    })
    .unwrap();
    let again = cli(&[
        "unexport",
        "service",
        "echo",
        "-n",
        "demo",
        "--manifests",
        &dir(2),
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not exported here"));
    assert!(
        cli(&[
            "export",
            "service",
            "echo",
            "-n",
            "demo",
            "--manifests",
            &dir(2)
        ])
        .status
        .success()
    );
    wait_until("c's echo to come back", Duration::from_secs(10), || {
        short(&pod, name, "A", &[]).contains(&c_ip)
    })
    .unwrap();

    // c's endpoint becomes unready: it drops out of the answers.
    let echo_yaml = lab.state.clusters[2].manifests.join("echo.yaml");
    let text = std::fs::read_to_string(&echo_yaml).unwrap();
    std::fs::write(&echo_yaml, text.replace("ready: true", "ready: false")).unwrap();
    wait_until("c's unready echo to go", Duration::from_secs(10), || {
        !short(&pod, name, "A", &[]).contains(&c_ip)
    })
    .unwrap();

    // b exports echo with another port: b's export says Conflict.
    let b_yaml = lab.state.clusters[1].manifests.join("echo.yaml");
    let text = std::fs::read_to_string(&b_yaml).unwrap();
    std::fs::write(&b_yaml, text.replacen("port: 7", "port: 8", 1)).unwrap();
    wait_until("b's Conflict condition", Duration::from_secs(10), || {
        condition(&status_of(&lab, 1, "echo"), "Conflict").as_deref() == Some("True/PortConflict")
    })
    .unwrap();

    // Exporting a Service that does not exist: not valid, not published, not resolvable.
    assert!(
        cli(&[
            "export",
            "service",
            "nope",
            "-n",
            "demo",
            "--manifests",
            &dir(0)
        ])
        .status
        .success()
    );
    wait_until("nope's Valid condition", Duration::from_secs(10), || {
        condition(&status_of(&lab, 0, "nope"), "Valid").as_deref() == Some("False/ServiceNotFound")
    })
    .unwrap();
    assert!(full(&pod, &["nope.demo.svc.clusterset.local", "A"]).contains("status: NXDOMAIN"));

    // A manifest that does not parse is left out whole, and says why in the log.
    std::fs::write(
        lab.state.clusters[0].manifests.join("broken.yaml"),
        "kind: [",
    )
    .unwrap();

    // Unexported everywhere: NXDOMAIN.
    for c in 0..3 {
        assert!(
            cli(&[
                "unexport",
                "service",
                "echo",
                "-n",
                "demo",
                "--manifests",
                &dir(c)
            ])
            .status
            .success()
        );
    }
    wait_until("echo to be gone", Duration::from_secs(10), || {
        full(&pod, &[name, "A"]).contains("status: NXDOMAIN")
    })
    .unwrap();
    wait_until("the import to go", Duration::from_secs(10), || {
        !imported.exists()
    })
    .unwrap();
    let log = std::fs::read_to_string(lab.bed.log_path("a-dns")).unwrap();
    assert!(
        log.contains("broken.yaml") && log.contains("not YAML"),
        "{log}"
    );
}

#[test]
fn large_answers_over_edns_and_a_file_caught_half_written_keeps_its_services() {
    let lab = up();
    lab.wait_services(Duration::from_secs(20)).unwrap();
    let pod = lab.worker(1).pod.ns();
    // A headless service of 200 endpoints in a.
    let endpoints: String = (0..200)
        .map(|i| {
            format!(
                "- addresses: [\"10.1.{}.{}\"]\n  hostname: big-{i}\n  conditions: {{ready: true}}\n",
                50 + i / 100,
                1 + i % 100
            )
        })
        .collect();
    std::fs::write(
        lab.state.clusters[0].manifests.join("big.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: demo}}\n\
             spec:\n  clusterIP: None\n  ports: [{{name: tcp, port: 80, protocol: TCP}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: big-1, namespace: demo, labels: {{kubernetes.io/service-name: big}}}}\n\
             addressType: IPv4\nendpoints:\n{endpoints}---\n\
             apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
             metadata: {{name: big, namespace: demo}}\n"
        ),
    )
    .unwrap();
    let big = "big.demo.svc.clusterset.local";
    wait_until(
        "b to resolve a's 200 endpoints",
        Duration::from_secs(20),
        || short(&pod, big, "A", &["+tcp"]).len() == 200,
    )
    .unwrap();
    // Over UDP with EDNS(0), a client that offers 8 KiB gets all 200 in one reply, not
    // truncated, with an OPT record back. (200 A records take about 4.5 KiB: hickory
    // compresses the first 120 names of a message only.)
    let udp = full(&pod, &["+notcp", "+ignore", "+bufsize=8192", big, "A"]);
    let flags = udp
        .lines()
        .find(|l| l.contains("flags:"))
        .unwrap_or_default()
        .to_owned();
    assert!(!flags.contains(" tc"), "truncated: {flags}");
    assert!(udp.contains("OPT PSEUDOSECTION"), "{udp}");
    assert_eq!(
        udp.lines().filter(|l| l.starts_with(big)).count(),
        200,
        "{udp}"
    );
    // A smaller offer is honoured: as many as fit, and TC.
    let small = full(&pod, &["+notcp", "+ignore", "+bufsize=1232", big, "A"]);
    assert!(
        small
            .lines()
            .any(|l| l.contains("flags:") && l.contains(" tc")),
        "{small}"
    );
    let fitted = small.lines().filter(|l| l.starts_with(big)).count();
    assert!(
        (60..200).contains(&fitted),
        "{fitted} answers in 1232 bytes"
    );
    // Without EDNS the 512-byte limit stands, and the reply says so.
    let plain = full(&pod, &["+notcp", "+ignore", "+noedns", big, "A"]);
    assert!(
        plain
            .lines()
            .any(|l| l.contains("flags:") && l.contains(" tc")),
        "{plain}"
    );
    // The name server the SOA and NS records name resolves.
    let ns = short(&pod, "ns.clusterset.local", "A", &[]);
    assert_eq!(
        ns,
        [lab.state.clusters[1].dns_address.to_string()],
        "ns.clusterset.local"
    );

    // a rewrites big.yaml in place in two halves with a pause between (an editor, `cat >`,
    // `kubectl get -o yaml > f`): throughout, b still gets all of a's endpoints.
    let path = lab.state.clusters[0].manifests.join("big.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Cut inside the 101st address, as a writer's buffer boundary would.
    let half = text.find("\"10.1.51.").unwrap() + 5;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&text.as_bytes()[..half]).unwrap();
        f.flush().unwrap();
        // The pause is the scenario (the writer is slow), not a wait for a result: over it,
        // b is asked again and again, and must never miss a's endpoints.
        let until = std::time::Instant::now() + Duration::from_millis(1500);
        let mut asked = 0;
        while std::time::Instant::now() < until {
            let got = short(&pod, big, "A", &["+tcp"]).len();
            assert_eq!(
                got, 200,
                "a's endpoints flapped away while big.yaml was half written"
            );
            asked += 1;
        }
        assert!(asked >= 3, "b was asked only {asked} times");
        f.write_all(&text.as_bytes()[half..]).unwrap();
    }
    // Parsed again: the same answer, and a's plugin said what it held on to.
    assert_eq!(short(&pod, big, "A", &["+tcp"]).len(), 200);
    let log = std::fs::read_to_string(lab.bed.log_path("a-dns")).unwrap();
    assert!(
        log.contains("big.yaml") && log.contains("last good version"),
        "{log}"
    );
}

#[test]
fn a_cluster_whose_dns_plugin_died_stops_being_answered_when_its_lease_lapses() {
    let lab = up();
    lab.wait_services(Duration::from_secs(20)).unwrap();
    let pod = lab.worker(0).pod.ns();
    let name = clusterlink_lab::lab::ECHO_NAME;
    let c_ip = lab.worker(2).pod.address.to_string();
    wait_until("c's echo in a's answers", Duration::from_secs(20), || {
        short(&pod, name, "A", &[]).contains(&c_ip)
    })
    .unwrap();
    // c's DNS plugin dies without a word (its tunnels stay up): its records go with the
    // lease it can no longer renew (10 s by default), and a stops answering c's address.
    lab.bed.kill(lab.state.clusters[2].dns_pid);
    wait_until(
        "c's echo to leave a's answers when its lease lapses",
        Duration::from_secs(30),
        || {
            let a = short(&pod, name, "A", &[]);
            !a.is_empty() && !a.contains(&c_ip)
        },
    )
    .unwrap();
}
