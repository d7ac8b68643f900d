//! The broker through the `clusterlink` binary, as an operator uses it: deploy, run, join,
//! show, revoke, and the errors a person sees. Includes the crash test: a broker killed with
//! SIGKILL in the middle of writes and restarted has every write it acknowledged.
//!
//! ```text
//!   clusterlink (CLI) ──mTLS── broker run ── store: redb in DIR/broker | etcd (loopback)
//!   every process on loopback, in the host's namespace; no links, no routes
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use clusterlink_api::{Kind, proto};
use clusterlink_broker_client::{Credentials, connect_with};
use clusterlink_testkit::{PortLease, wait_until};

use crate::support::BIN;

pub(crate) fn clusterlink(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("CLUSTERLINK_CREDENTIALS")
        .output()
        .expect("run clusterlink")
}

/// `join INFO --cluster-id ID` with pod CIDR 10.N.0.0/16 and service CIDR 10.(100+N).0.0/16.
pub(crate) fn join(
    dir: &Path,
    info: &str,
    id: &str,
    n: u8,
    extra: &[&str],
) -> std::process::Output {
    let pods = format!("10.{n}.0.0/16");
    let svcs = format!("10.{}.0.0/16", 100 + u16::from(n));
    let mut args = vec![
        "join",
        info,
        "--cluster-id",
        id,
        "--pod-cidr",
        &pods,
        "--service-cidr",
        &svcs,
    ];
    args.extend_from_slice(extra);
    clusterlink(dir, &args)
}

pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "clusterlink failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A loopback port held for the test's lifetime (no other test is handed it meanwhile).
pub(crate) fn free_port() -> PortLease {
    PortLease::new().expect("a free loopback port")
}

/// Waits for `cond` with a deadline; never a fixed sleep.
pub(crate) fn wait_for(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    if let Err(e) = wait_until(what, timeout, cond) {
        panic!("{e}");
    }
}

/// A broker process; killed on drop.
pub(crate) struct BrokerProc {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl BrokerProc {
    pub(crate) fn start(dir: &Path, data: &str) -> Self {
        Self::start_with(dir, data, &[])
    }

    pub(crate) fn start_with(dir: &Path, data: &str, extra: &[&str]) -> Self {
        let log = dir.join(format!(
            "broker-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["broker", "run", "--data-dir", data])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        let mut p = BrokerProc { child, log };
        p.wait_serving();
        p
    }

    pub(crate) fn wait_serving(&mut self) {
        wait_for("the broker to serve", Duration::from_secs(20), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the broker exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains("broker serving"))
        });
    }

    fn sigkill(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deploys a broker in `dir/broker` listening on a port held for the caller.
pub(crate) fn deploy(dir: &Path, extra: &[&str]) -> PortLease {
    let port = free_port();
    let listen = format!("127.0.0.1:{}", port.port());
    let mut args = vec!["deploy-broker", "--data-dir", "broker", "--listen", &listen];
    args.extend_from_slice(extra);
    ok(&clusterlink(dir, &args));
    port
}

#[test]
fn deploy_join_show_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &[]);
    // Private keys and tokens are for their owner's eyes only.
    for f in [
        "broker/admin.yaml",
        "broker/broker-info.yaml",
        "broker/pki/ca.key",
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{f} must not be readable by others");
    }
    let again = fails(&clusterlink(
        dir,
        &["deploy-broker", "--data-dir", "broker"],
    ));
    assert!(again.contains("already holds a broker"), "{again}");
    // What an init container runs at every start: the broker is left as it is.
    let ca = std::fs::read(dir.join("broker/pki/ca.crt")).unwrap();
    let kept = ok(&clusterlink(
        dir,
        &["deploy-broker", "--data-dir", "broker", "--exist-ok"],
    ));
    assert!(kept.contains("left as it is"), "{kept}");
    assert_eq!(std::fs::read(dir.join("broker/pki/ca.crt")).unwrap(), ca);
    let _broker = BrokerProc::start(dir, "broker");
    let out = ok(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
            "--label",
            "region=eu",
        ],
    ));
    assert!(out.contains("Cluster east joined"), "{out}");
    ok(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "west",
            "--pod-cidr",
            "10.2.0.0/16,10.3.0.0/16",
            "--service-cidr",
            "10.102.0.0/16",
        ],
    ));
    let table = ok(&clusterlink(
        dir,
        &["show", "clusters", "--credentials", "clusterlink-east.yaml"],
    ));
    assert!(
        table.contains("east") && table.contains("10.2.0.0/16,10.3.0.0/16"),
        "{table}"
    );
    let json = ok(&clusterlink(
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
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["labels"]["region"], "eu");
    // When each cluster's certificate expires (a year after its join).
    let expires = v[0]["certificateExpiresAt"].as_str().unwrap_or_default();
    assert!(
        expires.len() >= 20 && expires > v[0]["joinedAt"].as_str().unwrap(),
        "{v}"
    );
    let yaml = ok(&clusterlink(
        dir,
        &[
            "show",
            "clusters",
            "-o",
            "yaml",
            "--credentials",
            "broker/admin.yaml",
        ],
    ));
    assert!(yaml.contains("- id: west"), "{yaml}");

    let dup = fails(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.9.0.0/16",
            "--service-cidr",
            "10.109.0.0/16",
        ],
    ));
    assert!(dup.contains("\"east\" has already joined"), "{dup}");
    let overlap = fails(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "south",
            "--pod-cidr",
            "10.1.5.0/24",
            "--service-cidr",
            "10.105.0.0/16",
        ],
    ));
    assert!(
        overlap.contains("overlaps 10.1.0.0/16 of cluster \"east\""),
        "{overlap}"
    );
    let bad = fails(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "south",
            "--pod-cidr",
            "10.5.0.1/16",
            "--service-cidr",
            "10.105.0.0/16",
        ],
    ));
    assert!(bad.contains("did you mean 10.5.0.0/16"), "{bad}");

    let denied = fails(&clusterlink(
        dir,
        &[
            "broker",
            "revoke",
            "west",
            "--credentials",
            "clusterlink-east.yaml",
        ],
    ));
    assert!(denied.contains("admin"), "{denied}");
    ok(&clusterlink(
        dir,
        &[
            "broker",
            "revoke",
            "west",
            "--credentials",
            "broker/admin.yaml",
        ],
    ));
    let cut = fails(&clusterlink(
        dir,
        &["show", "clusters", "--credentials", "clusterlink-west.yaml"],
    ));
    assert!(cut.contains("no longer"), "{cut}");

    // A fresh single-use token from the admin.
    ok(&clusterlink(
        dir,
        &[
            "broker",
            "token",
            "create",
            "--single-use",
            "-o",
            "one.yaml",
            "--credentials",
            "broker/admin.yaml",
        ],
    ));
    ok(&clusterlink(
        dir,
        &[
            "join",
            "one.yaml",
            "--cluster-id",
            "north",
            "--pod-cidr",
            "10.4.0.0/16",
            "--service-cidr",
            "10.104.0.0/16",
        ],
    ));
    let used = fails(&clusterlink(
        dir,
        &[
            "join",
            "one.yaml",
            "--cluster-id",
            "south",
            "--pod-cidr",
            "10.6.0.0/16",
            "--service-cidr",
            "10.106.0.0/16",
        ],
    ));
    assert!(used.contains("already used"), "{used}");
}

#[test]
fn operator_errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = deploy(dir, &["--token-ttl", "1h"]);
    // No broker runs yet: unreachable.
    let down = fails(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
        ],
    ));
    assert!(
        down.contains(&format!(
            "cannot reach the broker at 127.0.0.1:{}",
            port.port()
        )),
        "{down}"
    );
    // Malformed broker-info.
    std::fs::write(dir.join("junk.yaml"), "apiVersion: [").unwrap();
    let junk = fails(&clusterlink(
        dir,
        &[
            "join",
            "junk.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
        ],
    ));
    assert!(
        junk.contains("junk.yaml is not a valid BrokerInfo file"),
        "{junk}"
    );
    let missing = fails(&clusterlink(
        dir,
        &[
            "join",
            "nope.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
        ],
    ));
    assert!(missing.contains("cannot read nope.yaml"), "{missing}");
    // Expired broker-info: refused before any network traffic.
    let info = std::fs::read_to_string(dir.join("broker/broker-info.yaml")).unwrap();
    let expired: String = info
        .lines()
        .map(|l| {
            if l.starts_with("tokenExpiresAt") {
                "tokenExpiresAt: 2020-01-01T00:00:00Z".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("old.yaml"), expired).unwrap();
    let old = fails(&clusterlink(
        dir,
        &[
            "join",
            "old.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
        ],
    ));
    assert!(
        old.contains("expired at 2020-01-01T00:00:00Z") && old.contains("fresh broker-info"),
        "{old}"
    );
    // Bad arguments.
    let id = fails(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "East_1",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
        ],
    ));
    assert!(id.contains("invalid cluster ID \"East_1\""), "{id}");
    let store = fails(&clusterlink(
        dir,
        &["deploy-broker", "--data-dir", "b2", "--store", "mysql://x"],
    ));
    assert!(
        store.contains("use `embedded`, `etcd://") && store.contains("`etcds://"),
        "{store}"
    );
    let etcd_down = fails(&clusterlink(
        dir,
        &[
            "deploy-broker",
            "--data-dir",
            "b3",
            "--store",
            &format!("etcd://127.0.0.1:{}", free_port().port()),
        ],
    ));
    assert!(
        etcd_down.contains("Failed to open the store"),
        "{etcd_down}"
    );
    assert!(
        !dir.join("b3/pki").exists(),
        "a failed deploy leaves no CA behind"
    );
    let not_deployed = fails(&clusterlink(dir, &["broker", "run", "--data-dir", "b4"]));
    assert!(not_deployed.contains("holds no broker"), "{not_deployed}");
}

#[test]
fn sigkilled_broker_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &[]);
    let broker = BrokerProc::start(dir, "broker");
    ok(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
        ],
    ));
    let creds = Credentials::read(&dir.join("clusterlink-east.yaml")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Eight writers publish as fast as they can; the broker is killed while they do.
    let acked: Vec<String> = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..8 {
            let creds = creds.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = connect_with(&creds).await.unwrap();
                let mut acked = Vec::new();
                for i in 0..100_000 {
                    let name = format!("s{w}-{i}");
                    let r = c.publish(proto::PublishRequest {
                        record: Some(proto::Record {
                            kind: Some(proto::record::Kind::Service(proto::ServiceRecord {
                                cluster: "east".into(),
                                namespace: "crash".into(),
                                name: name.clone(),
                                r#type: proto::ServiceType::ClusterSetIp as i32,
                                ports: vec![],
                                ips: vec![],
                                endpoints: vec![],
                                ready: true,
                                exported_at_unix_ms: 0,
                            })),
                        }),
                        lease_id: 0,
                        expected_revision: 0,
                        create_only: false,
                    });
                    match tokio::time::timeout(Duration::from_secs(5), r).await {
                        Ok(Ok(_)) => acked.push(name),
                        _ => break,
                    }
                }
                acked
            }));
        }
        let mut c = connect_with(&creds).await.unwrap();
        // Kill once a good number of writes is acknowledged (polled, with a deadline).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "300 writes were not stored within 30 s"
            );
            let n = c
                .list(proto::ListRequest {
                    kind: Kind::Services.to_proto() as i32,
                })
                .await
                .unwrap()
                .into_inner()
                .records
                .len();
            // Up to one write per writer may be stored but not yet acknowledged when the
            // broker dies: wait for that many more.
            if n >= 300 + 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        broker.sigkill();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert!(
        acked.len() >= 300,
        "only {} writes acknowledged before the kill",
        acked.len()
    );
    let _broker = BrokerProc::start(dir, "broker");
    let stored: std::collections::BTreeSet<String> = rt.block_on(async {
        let mut c = connect_with(&creds).await.unwrap();
        c.list(proto::ListRequest {
            kind: Kind::Services.to_proto() as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .filter_map(|r| match r.kind {
            Some(proto::record::Kind::Service(s)) => Some(s.name),
            _ => None,
        })
        .collect()
    });
    let lost: Vec<&String> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn two_broker_processes_on_one_etcd_serve_the_same_data() {
    let etcd = clusterlink_testkit::EtcdServer::start().expect("start etcd (Debian etcd-server)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port_a = deploy(dir, &["--store", &etcd.url()]);
    // The second broker: the same data directory (CA, config), another address.
    let port_b = free_port();
    let log = dir.join("broker-b.log");
    let child = Command::new(BIN)
        .args([
            "broker",
            "run",
            "--data-dir",
            "broker",
            "--listen",
            &format!("127.0.0.1:{}", port_b.port()),
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut b = BrokerProc { child, log };
    b.wait_serving();
    let _a = BrokerProc::start(dir, "broker");
    // Join through A (the address in broker-info), read through B.
    ok(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "east",
            "--pod-cidr",
            "10.1.0.0/16",
            "--service-cidr",
            "10.101.0.0/16",
        ],
    ));
    let creds = std::fs::read_to_string(dir.join("clusterlink-east.yaml")).unwrap();
    std::fs::write(
        dir.join("east-via-b.yaml"),
        creds.replace(
            &format!("127.0.0.1:{}", port_a.port()),
            &format!("127.0.0.1:{}", port_b.port()),
        ),
    )
    .unwrap();
    let via_b = ok(&clusterlink(
        dir,
        &[
            "show",
            "clusters",
            "-o",
            "json",
            "--credentials",
            "east-via-b.yaml",
        ],
    ));
    assert!(via_b.contains("\"east\""), "{via_b}");
    // Revoked through A, refused by B.
    ok(&clusterlink(
        dir,
        &[
            "broker",
            "revoke",
            "east",
            "--credentials",
            "broker/admin.yaml",
        ],
    ));
    let refused = fails(&clusterlink(
        dir,
        &["show", "clusters", "--credentials", "east-via-b.yaml"],
    ));
    assert!(refused.contains("no longer"), "{refused}");
}

/// A stand-in for a cluster's API server (plain HTTP on loopback) that answers what `join
/// --kubeconfig` reads: ServiceCIDRs (404 when `modern` is false, as before 1.33) and the
/// kubeadm ConfigMap; and takes the server-side applies of the namespace and the credentials
/// Secret (their bodies kept in the returned list). Returns a kubeconfig file pointing at it.
type Applied = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

fn fake_cluster_api(
    dir: &Path,
    modern: bool,
    kubeadm: Option<&'static str>,
) -> (PathBuf, tokio::runtime::Runtime, Applied) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let applied: Applied = Default::default();
    // Every apply and patch is taken, and kept: the path and the body.
    let record = {
        let applied = applied.clone();
        move |uri: axum::http::Uri, body: String| {
            let applied = applied.clone();
            async move {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                applied
                    .lock()
                    .unwrap()
                    .push((uri.path().to_owned(), v.clone()));
                (
                    StatusCode::OK,
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        v.to_string(),
                    ),
                )
            }
        }
    };
    fn json(v: serde_json::Value) -> ([(axum::http::HeaderName, &'static str); 1], String) {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            v.to_string(),
        )
    }
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            json(
                serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
        )
    };
    let app = axum::Router::new()
        .route(
            "/apis/networking.k8s.io/v1/servicecidrs",
            get(move || async move {
                if modern {
                    (
                        StatusCode::OK,
                        json(serde_json::json!({"apiVersion": "networking.k8s.io/v1",
                            "kind": "ServiceCIDRList", "metadata": {"resourceVersion": "1"},
                            "items": [{"metadata": {"name": "kubernetes"},
                                       "spec": {"cidrs": ["10.196.0.0/16"]}}]})),
                    )
                } else {
                    not_found()
                }
            }),
        )
        .route(
            "/api/v1/namespaces/kube-system/configmaps/kubeadm-config",
            get(move || async move {
                match kubeadm {
                    Some(conf) => (
                        StatusCode::OK,
                        json(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
                            "data": {"ClusterConfiguration": conf}})),
                    ),
                    None => not_found(),
                }
            }),
        )
        .route(
            "/api/v1/namespaces/clusterlink-system/services/clusterlink-dns",
            get(move || async move {
                (
                    StatusCode::OK,
                    json(serde_json::json!({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "clusterlink-dns", "namespace": "clusterlink-system"},
                        "spec": {"clusterIP": "10.196.0.53"}})),
                )
            })
            .patch(record.clone()),
        )
        .route(
            "/api/v1/namespaces/kube-system/configmaps/coredns",
            get(move || async move {
                (
                    StatusCode::OK,
                    json(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "coredns", "namespace": "kube-system"},
                        "data": {"Corefile": ".:53 {\n    errors\n    forward . /etc/resolv.conf\n}\n"}})),
                )
            })
            .patch(record.clone()),
        )
        .fallback(move |method: axum::http::Method, uri: axum::http::Uri, body: String| {
            let record = record.clone();
            async move {
                if method == axum::http::Method::PATCH {
                    record(uri, body).await
                } else {
                    let (status, body) = not_found();
                    (status, body)
                }
            }
        });
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster: {{server: \"http://{addr}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\nusers:\n- name: test\n  user: {{token: t}}\n"
        ),
    )
    .unwrap();
    (kubeconfig, rt, applied)
}

/// `join --kubeconfig` learns the CIDRs it is not given from the cluster's API and puts the
/// credentials in the cluster's Secret; what the API cannot tell is an error naming the flag.
#[test]
fn join_learns_the_clusters_cidrs_from_its_api() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &[]);
    let _broker = BrokerProc::start(dir, "broker");
    let (kubeconfig, _api, applied) = fake_cluster_api(
        dir,
        true,
        Some("networking:\n  podSubnet: 10.40.0.0/16\n  serviceSubnet: 10.41.0.0/16\n"),
    );
    let k = kubeconfig.display().to_string();
    // join waits until the cluster is in the mesh: here, until its gateway is active (there
    // is no other cluster), which this test publishes as the gateway DaemonSet would.
    let join = Command::new(BIN)
        .args([
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "east",
            "--kubeconfig",
            &k,
            "--gateway-node",
            "node-1",
            "--image",
            "registry.example/clusterlink:1.0",
            "--wait",
            "60s",
        ])
        .current_dir(dir)
        .env_remove("CLUSTERLINK_CREDENTIALS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // What it says, line by line: the gateway comes once join says it waits for it.
    let mut join = join;
    let (said_tx, said) = std::sync::mpsc::channel::<String>();
    let stdout = join.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = said_tx.send(line);
        }
    });
    let mut out = String::new();
    let until = |out: &mut String, what: &str| loop {
        let line = said
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("join never said {what:?}: {out}"));
        out.push_str(&line);
        out.push('\n');
        if line.contains(what) {
            return;
        }
    };
    until(&mut out, "waiting for a gateway of east to become active");
    let creds_path = dir.join("clusterlink-east.yaml");
    let creds = Credentials::read(&creds_path).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = connect_with(&creds).await.unwrap();
        let gateway = proto::Record {
            kind: Some(proto::record::Kind::Gateway(proto::GatewayEndpoint {
                cluster: "east".into(),
                node: "node-1".into(),
                public_key: vec![7; 32],
                private_addr: "192.0.2.10".into(),
                public_addr: String::new(),
                port: 51820,
                role: proto::GatewayRole::Active as i32,
                generation: 1,
            })),
        };
        c.publish(proto::PublishRequest {
            record: Some(gateway),
            lease_id: 0,
            expected_revision: 0,
            create_only: false,
        })
        .await
        .unwrap();
    });
    until(&mut out, "is in the mesh");
    let status = join.wait().unwrap();
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("Cluster east joined"), "{out}");
    assert!(
        out.contains("waiting for a gateway of east to become active"),
        "{out}"
    );
    assert!(
        out.contains("Cluster east is in the mesh: gateway node-1 active"),
        "{out}"
    );
    // The credentials are in the Secret the member components mount, as in the file.
    assert!(
        out.contains("clusterlink-system/clusterlink-credentials"),
        "{out}"
    );
    let applied = applied.lock().unwrap().clone();
    let paths: Vec<&str> = applied.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths[0], "/api/v1/namespaces/clusterlink-system");
    let (what, secret) = &applied[1];
    assert_eq!(
        what,
        "/api/v1/namespaces/clusterlink-system/secrets/clusterlink-credentials"
    );
    assert_eq!(
        secret["stringData"]["credentials.yaml"].as_str().unwrap(),
        std::fs::read_to_string(dir.join("clusterlink-east.yaml")).unwrap()
    );
    // The member overlay applied (CRDs, roles, the DaemonSets, the DNS plugin) with the image
    // asked for, and the gateway node labelled.
    for p in [
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/serviceexports.multicluster.x-k8s.io",
        "/apis/apps/v1/namespaces/clusterlink-system/daemonsets/clusterlink-gateway",
        "/apis/apps/v1/namespaces/clusterlink-system/daemonsets/clusterlink-route-agent",
        "/apis/apps/v1/namespaces/clusterlink-system/deployments/clusterlink-dns",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/clusterlink-dns",
    ] {
        assert!(paths.contains(&p), "{p} not applied: {paths:#?}");
    }
    let gw = &applied
        .iter()
        .find(|(p, _)| p.ends_with("/daemonsets/clusterlink-gateway"))
        .unwrap()
        .1;
    assert_eq!(
        gw["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/clusterlink:1.0"
    );
    let label = &applied
        .iter()
        .find(|(p, _)| p == "/api/v1/nodes/node-1")
        .expect("the gateway node labelled")
        .1;
    assert_eq!(
        label["metadata"]["labels"]["gateway.clusterlink.dev/enabled"],
        "true"
    );
    assert!(out.contains("Installed the member components"), "{out}");
    // CoreDNS forwards the cluster set's zone to the plugin's Service.
    let corefile = applied
        .iter()
        .find(|(p, _)| p == "/api/v1/namespaces/kube-system/configmaps/coredns")
        .expect("CoreDNS edited")
        .1["data"]["Corefile"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(corefile.starts_with(".:53 {"), "{corefile}");
    assert!(
        corefile.contains("clusterset.local:53") && corefile.contains("forward . 10.196.0.53"),
        "{corefile}"
    );
    assert!(
        out.contains("forwards clusterset.local to 10.196.0.53"),
        "{out}"
    );
    let shown = ok(&clusterlink(
        dir,
        &[
            "show",
            "clusters",
            "--credentials",
            "clusterlink-east.yaml",
            "-o",
            "json",
        ],
    ));
    // Pods from kubeadm's configuration, services from the ServiceCIDR objects.
    assert!(shown.contains("10.40.0.0/16"), "{shown}");
    assert!(
        shown.contains("10.196.0.0/16") && !shown.contains("10.41.0.0/16"),
        "{shown}"
    );

    // An older cluster, no kubeadm: nothing to learn the pod CIDR from.
    let other = dir.join("older");
    std::fs::create_dir(&other).unwrap();
    let (kubeconfig, _api2, _) = fake_cluster_api(&other, false, None);
    let k = kubeconfig.display().to_string();
    let err = fails(&clusterlink(
        dir,
        &[
            "join",
            "broker/broker-info.yaml",
            "--cluster-id",
            "west",
            "--kubeconfig",
            &k,
            "--service-cidr",
            "10.102.0.0/16",
            "-o",
            "west.yaml",
        ],
    ));
    assert!(err.contains("give --pod-cidr"), "{err}");
    assert!(
        !dir.join("west.yaml").exists(),
        "nothing written, no token spent"
    );
}
