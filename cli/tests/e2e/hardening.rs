//! What an operator hits in a rolling restart, a typo or a crash (issue: hardening): daemons
//! that stop within their bound while clients hold them, a join that survives an unwritable
//! output or a crash, honest outputs (pure JSON, a closed pipe, granted token lifetimes), and
//! arguments refused at the edge.
//!
//! ```text
//!   clusterlink (CLI) ──mTLS── broker run ── store: redb in DIR/broker
//!   dns run (loopback) ── dig / held TCP connections
//!   every process on loopback, in the host's namespace; no links, no routes
//! ```

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterlink_api::{Kind, proto};
use clusterlink_broker_client::{Credentials, connect_with};

use crate::broker::{BrokerProc, clusterlink, deploy, fails, free_port, join, ok, wait_for};
use crate::support::BIN;

fn sigterm(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// Waits up to `timeout` for `child` to exit: its status and how long it took.
fn exit_within(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<(std::process::ExitStatus, Duration)> {
    let start = Instant::now();
    let mut status = None;
    let _ = clusterlink_testkit::wait_until("the process to exit", timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.map(|s| (s, start.elapsed()))
}

#[test]
fn a_signalled_broker_ends_its_watches_exits_in_time_and_a_successor_starts_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &[]);
    let mut broker = BrokerProc::start_with(dir, "broker", &["--shutdown-timeout", "4s"]);
    ok(&join(dir, "broker/broker-info.yaml", "east", 1, &[]));
    let admin = Credentials::read(&dir.join("broker/admin.yaml")).unwrap();
    let east = Credentials::read(&dir.join("clusterlink-east.yaml")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Twenty watchers, admin and cluster, on every kind: each holds its stream open and
    // reports how it ended; each says when its stream is open.
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
    let watchers: Vec<_> = (0..20)
        .map(|i| {
            let ready_tx = ready_tx.clone();
            let creds = if i % 2 == 0 {
                admin.clone()
            } else {
                east.clone()
            };
            let kind = Kind::ALL[i % Kind::ALL.len()];
            rt.spawn(async move {
                let mut c = connect_with(&creds).await.unwrap();
                let mut stream = c
                    .watch(proto::WatchRequest {
                        kind: kind.to_proto() as i32,
                        from_revision: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                ready_tx.send(()).unwrap();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return None,
                        Err(status) => return Some(status),
                    }
                }
            })
        })
        .collect();
    // Every watch is established at the broker before the signal.
    for _ in 0..20 {
        ready
            .recv_timeout(Duration::from_secs(20))
            .expect("a watch did not open within 20 s");
    }
    sigterm(&broker.child);
    let (status, took) = exit_within(&mut broker.child, Duration::from_secs(15))
        .expect("the broker did not exit within 15 s of SIGTERM");
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(
        status.success(),
        "the broker did not stop cleanly ({status}, after {took:?}): it waited for its watchers\n{log}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    for w in watchers {
        let ended = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), w).await })
            .expect("a watch outlived the broker")
            .unwrap();
        let status = ended.expect("a watch ended without saying why");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shutting down"), "{status:?}");
    }
    // The store is free: a successor opens it at once and has the data.
    let _next = BrokerProc::start(dir, "broker");
    let clusters = ok(&clusterlink(
        dir,
        &[
            "show",
            "clusters",
            "-o",
            "json",
            "--credentials",
            "broker/admin.yaml",
        ],
    ));
    assert!(clusters.contains("\"east\""), "{clusters}");
}

/// `dns run` on a loopback port, logging to `log`.
fn dns_run(dir: &Path, port: u16, log: &Path) -> std::process::Child {
    Command::new(BIN)
        .args([
            "dns",
            "run",
            "--credentials",
            "clusterlink-east.yaml",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shutdown-timeout",
            "3s",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_signalled_dns_plugin_stops_in_time_with_clients_connected_and_restarts_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &[]);
    let _broker = BrokerProc::start(dir, "broker");
    ok(&join(dir, "broker/broker-info.yaml", "east", 1, &[]));
    let port = free_port();
    let log = dir.join("dns.log");
    let mut dns = dns_run(dir, port.port(), &log);
    wait_for("the DNS plugin to answer", Duration::from_secs(20), || {
        dig(port.port(), &["+short", "ns.clusterset.local", "A"]).contains("127.0.0.1")
    });
    // Clients that hold TCP connections open, idle, as resolvers do.
    let held: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(("127.0.0.1", port.port())).unwrap())
        .collect();
    sigterm(&dns);
    let (status, took) = exit_within(&mut dns, Duration::from_secs(15))
        .expect("the DNS plugin did not exit within 15 s of SIGTERM");
    assert!(
        status.success(),
        "not a clean stop ({status} after {took:?}):\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // At the default level, a query is not a log line.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("ns.clusterset.local"), "{logged}");
    drop(held);
    // The port is free at once: a new instance binds it and answers.
    let log2 = dir.join("dns-2.log");
    let mut again = dns_run(dir, port.port(), &log2);
    wait_for(
        "the new DNS plugin to answer",
        Duration::from_secs(20),
        || {
            if let Ok(Some(s)) = again.try_wait() {
                panic!(
                    "the new instance exited ({s}): {}",
                    std::fs::read_to_string(&log2).unwrap_or_default()
                );
            }
            dig(port.port(), &["+short", "ns.clusterset.local", "A"]).contains("127.0.0.1")
        },
    );
    // Signalled as soon as it answers: it stops cleanly (it listens for the signal from
    // before its sockets answer; it used to be killed by a signal that came that early).
    sigterm(&again);
    let stopped = exit_within(&mut again, Duration::from_secs(15));
    assert!(
        stopped.is_some_and(|(s, _)| s.success()),
        "{stopped:?}: {}",
        std::fs::read_to_string(&log2).unwrap_or_default()
    );
}

#[test]
fn join_checks_its_output_first_and_a_retried_join_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &["--single-use"]);
    let _broker = BrokerProc::start(dir, "broker");
    // An output that cannot be written (its parent is a file; root can write anywhere else):
    // refused before the broker is asked, so the single-use token and the ID stay free.
    std::fs::write(dir.join("a-file"), "x").unwrap();
    let unwritable = fails(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "a-file/east.yaml"],
    ));
    assert!(
        unwritable.contains("nothing was sent to the broker"),
        "{unwritable}"
    );
    // An operator's file is never overwritten.
    std::fs::write(dir.join("notes.yaml"), "mine: true\n").unwrap();
    let taken = fails(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "notes.yaml"],
    ));
    assert!(taken.contains("notes.yaml"), "{taken}");
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.yaml")).unwrap(),
        "mine: true\n"
    );
    ok(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "east.yaml"],
    ));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("east.yaml"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let first = Credentials::read(&dir.join("east.yaml")).unwrap();

    // A crash after the broker registered the cluster and before the credentials were
    // saved leaves the pending join (its key) in the output. The same join again, with the
    // same single-use token, finishes it.
    std::fs::write(
        dir.join("east.yaml"),
        format!(
            "apiVersion: clusterlink.dev/v1alpha1\nkind: PendingJoin\naddress: {}\n\
             clusterId: east\nprivateKey: |\n{}",
            first.address,
            first
                .private_key
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect::<String>()
        ),
    )
    .unwrap();
    let resumed = ok(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "east.yaml"],
    ));
    assert!(resumed.contains("Cluster east joined"), "{resumed}");
    let second = Credentials::read(&dir.join("east.yaml")).unwrap();
    assert_eq!(second.private_key, first.private_key);
    assert_ne!(second.certificate, first.certificate);
    ok(&clusterlink(
        dir,
        &["show", "clusters", "--credentials", "east.yaml"],
    ));
    // Another key with that token and ID is someone else: refused.
    let other = fails(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "other.yaml"],
    ));
    assert!(other.contains("\"east\" has already joined"), "{other}");
    // And another ID with the spent single-use token.
    let spent = fails(&join(
        dir,
        "broker/broker-info.yaml",
        "west",
        2,
        &["-o", "other.yaml"],
    ));
    assert!(spent.contains("already used"), "{spent}");
    assert!(
        !dir.join("other.yaml").exists(),
        "a join the broker refused leaves no pending file"
    );
    // The finished join run again: a no-op that asks nothing new of the broker (the
    // certificate the components use stays valid).
    let again = ok(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "east.yaml"],
    ));
    assert!(again.contains("already joined"), "{again}");
    assert_eq!(
        Credentials::read(&dir.join("east.yaml"))
            .unwrap()
            .certificate,
        second.certificate
    );
    // With other CIDRs it says what differs.
    let moved = fails(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.9.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
            "-o",
            "east.yaml",
        ],
    ));
    assert!(
        moved.contains("\"east\" has already joined, with pod CIDRs 10.1.0.0/16"),
        "{moved}"
    );
    // Every file the CLI reads is bounded.
    let zero = fails(&join(dir, "/dev/zero", "south", 6, &[]));
    assert!(zero.contains("larger than"), "{zero}");
}

#[test]
fn outputs_are_honest_and_arguments_are_checked_at_the_edge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Out-of-range token lifetimes are refused with the range, never replaced.
    let long = fails(&clusterlink(
        dir,
        &["deploy-broker", "--data-dir", "b0", "--token-ttl", "400d"],
    ));
    assert!(long.contains("1m to 365d"), "{long}");
    let listen_port = free_port();
    let listen = format!("127.0.0.1:{}", listen_port.port());
    let no_port = fails(&clusterlink(
        dir,
        &[
            "deploy-broker",
            "--data-dir",
            "b1",
            "--listen",
            &listen,
            "--advertise",
            "10.0.0.1",
        ],
    ));
    assert!(no_port.contains("a port is needed"), "{no_port}");
    let bad_name = fails(&clusterlink(
        dir,
        &[
            "deploy-broker",
            "--data-dir",
            "b1",
            "--listen",
            &listen,
            "--server-name",
            "not a name",
        ],
    ));
    assert!(
        bad_name.contains("neither an IP address nor a DNS name"),
        "{bad_name}"
    );
    assert!(
        !dir.join("b1").exists(),
        "a refused deploy left files behind"
    );

    let deployed = ok(&clusterlink(
        dir,
        &[
            "deploy-broker",
            "--data-dir",
            "broker",
            "--listen",
            &listen,
            "--token-ttl",
            "2h",
        ],
    ));
    assert!(deployed.contains("token valid until 20"), "{deployed}");
    let _broker = BrokerProc::start(dir, "broker");
    let token = |ttl: &str| {
        clusterlink(
            dir,
            &[
                "broker",
                "token",
                "create",
                "--ttl",
                ttl,
                "-o",
                "t.yaml",
                "--credentials",
                "broker/admin.yaml",
            ],
        )
    };
    let zero = fails(&token("0s"));
    assert!(zero.contains("1m to 365d"), "{zero}");
    let granted = ok(&token("90m"));
    let info = std::fs::read_to_string(dir.join("t.yaml")).unwrap();
    let expires = info
        .lines()
        .find_map(|l| l.strip_prefix("tokenExpiresAt: "))
        .unwrap()
        .trim_matches(['"', '\''])
        .to_owned();
    assert!(granted.contains(&expires), "{granted} vs {expires}");

    // A label key given twice.
    let twice = fails(&join(
        dir,
        "t.yaml",
        "east",
        1,
        &["--label", "region=eu", "--label", "region=us"],
    ));
    assert!(twice.contains("given twice"), "{twice}");
    ok(&join(dir, "t.yaml", "east", 1, &["--label", "region=eu"]));
    // The ID as given, not its debug form; and the cause said once.
    let unknown = fails(&clusterlink(
        dir,
        &[
            "broker",
            "revoke",
            "nosuch",
            "--credentials",
            "broker/admin.yaml",
        ],
    ));
    assert!(
        unknown.contains("no cluster \"nosuch\"") && !unknown.contains("ClusterId("),
        "{unknown}"
    );
    // A port in use: the DNS plugin's error names its cause once, not twice.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let in_use = fails(&clusterlink(
        dir,
        &[
            "dns",
            "run",
            "--credentials",
            "clusterlink-east.yaml",
            "--listen",
            &taken.local_addr().unwrap().to_string(),
        ],
    ));
    assert_eq!(
        in_use.matches("Address already in use").count(),
        1,
        "{in_use}"
    );

    // Every -o json is one JSON document on stdout and nothing else.
    for what in ["clusters", "services", "gateways", "connections", "events"] {
        let out = ok(&clusterlink(
            dir,
            &[
                "show",
                what,
                "-o",
                "json",
                "--credentials",
                "broker/admin.yaml",
            ],
        ));
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("show {what} -o json is not pure JSON ({e}): {out}"));
    }

    // The refused revoke is in the broker's audit trail, with who and why.
    let events = ok(&clusterlink(
        dir,
        &[
            "show",
            "events",
            "-o",
            "json",
            "--credentials",
            "broker/admin.yaml",
        ],
    ));
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["who"] == "admin"
                && e["action"] == "revoke"
                && e["target"] == "nosuch"
                && e["outcome"] == "refused"
                && e["reason"].as_str().unwrap().contains("no cluster")),
        "{events}"
    );

    // A reader that goes away: the command ends quietly, no panic.
    let mut child = Command::new(BIN)
        .args(["show", "clusters", "--credentials", "broker/admin.yaml"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status}: {stderr}");
}
