//! Certificates that rotate while the cluster set runs (needs root): `broker rotate-ca`
//! with pods pinging each other across the tunnel the whole time. Every component (gateways,
//! route agents, DNS plugins) renews onto the new CA by itself and saves it; none restarts;
//! no packet is lost.
//!
//! ```text
//!   a: a-gw0, a-w1 ──wan── b: b-gw0, b-w1        broker (embedded) in its own namespace
//!   a-w1's pod ── ping every 10 ms ──> b-w1's pod, from before `start` to after `finish`
//! ```

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clusterlink_lab::{Lab, Testbed, wait_until};

use crate::support::{BIN, ping};

/// The issuer of a credentials file's certificate.
fn issuer(creds: &Path) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate, parse_x509_pem};
    let c = clusterlink_broker_client::Credentials::read(creds).unwrap();
    let (_, pem) = parse_x509_pem(c.certificate.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
    cert.issuer().to_string()
}

#[test]
fn a_ca_rotation_under_traffic_loses_nothing_and_restarts_nothing() {
    // Components look at their credentials every second (a minute by default).
    let bed = Testbed::new()
        .expect("testbed (needs root)")
        .with_env("CLUSTERLINK_CREDENTIALS_CHECK_INTERVAL", "1s");
    let mut lab = Lab::up_in(
        bed,
        Path::new(BIN),
        &crate::support::small(&["a", "b"]),
        &|_| {},
    )
    .expect("lab up (needs root)");
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    lab.wait_routes(Duration::from_secs(30)).unwrap();
    let (a_pod, b_pod) = (lab.worker(0).pod.clone(), lab.worker(1).pod.clone());
    let b_addr = b_pod.address.to_string();
    wait_until("pods to reach each other", Duration::from_secs(20), || {
        ping(&a_pod.ns(), &b_addr)
    })
    .unwrap();
    let pids_before = lab.state.pids();
    let agent_before = lab.state.clusters[1].nodes[1].agent_pid;
    let creds: Vec<_> = lab
        .state
        .clusters
        .iter()
        .map(|c| c.credentials.clone())
        .collect();
    let old_issuer = issuer(&creds[0]);

    // Pods ping each other through the tunnel for the whole rotation.
    let pinger = a_pod
        .ns()
        .command("ping")
        .args(["-i", "0.01", "-W", "1", &b_addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let data_dir = lab.state.dir.join("broker");
    let dir = data_dir.display().to_string();
    let out = lab
        .clusterlink(&["broker", "rotate-ca", "start", "--data-dir", &dir])
        .unwrap();
    assert!(out.contains("CA rotation started"), "{out}");
    // Refused while clusters are on the old CA... until every component has renewed.
    wait_until(
        "every cluster to renew onto the new CA",
        Duration::from_secs(30),
        || {
            lab.clusterlink(&["broker", "rotate-ca", "status", "--data-dir", &dir])
                .is_ok_and(|s| s.contains("Every cluster holds a certificate of the new CA"))
        },
    )
    .unwrap();
    for c in &creds {
        assert_ne!(
            issuer(c),
            old_issuer,
            "{} was renewed and saved",
            c.display()
        );
    }
    let out = lab
        .clusterlink(&["broker", "rotate-ca", "finish", "--data-dir", &dir])
        .unwrap();
    assert!(out.contains("CA rotation finished"), "{out}");
    // The components follow the CA bundle (the old CA dropped from what they trust).
    wait_until(
        "the credentials files to trust the new CA only",
        Duration::from_secs(30),
        || {
            creds.iter().all(|c| {
                clusterlink_broker_client::Credentials::read(c)
                    .is_ok_and(|c| c.ca_certificate.matches("BEGIN CERTIFICATE").count() == 1)
            })
        },
    )
    .unwrap();

    // Still one mesh: statuses flow through the broker (with the new certificates) and a
    // route agent started now (from the saved file, against the new server certificate)
    // programs its routes.
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    lab.stop_agent(1, 1).expect("b's worker agent stops");
    lab.start_agent(1, 1, false).unwrap();
    lab.wait_routes(Duration::from_secs(30)).unwrap();
    assert!(ping(&a_pod.ns(), &b_addr));

    // Not a packet lost, not a process restarted (but the agent restarted on purpose).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pinger.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = pinger.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    let line = summary
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {summary}"));
    let count = |what: &str| -> u64 {
        line.split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{what} in {line:?}"))
    };
    let (sent, received) = (count("transmitted"), count("received"));
    assert!(
        sent > 50,
        "pings from before the start to after the finish: {line}"
    );
    // The interrupt may come with the last echo still in flight: every echo before it had
    // its reply.
    let replied: std::collections::BTreeSet<u64> = summary
        .lines()
        .filter_map(|l| {
            l.split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let lost: Vec<u64> = (1..sent).filter(|s| !replied.contains(s)).collect();
    assert!(
        lost.is_empty(),
        "echoes {lost:?} lost during the rotation: {line}"
    );
    assert!(received + 1 >= sent, "{line}");
    // Every process of the lab from before the rotation still runs (the agent restarted on
    // purpose aside): nothing restarted to pick up its new certificate.
    for p in pids_before {
        let state = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let running = state
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'));
        assert!(
            running || p == agent_before,
            "process {p} died during the rotation"
        );
    }
}

/// The operator's side, with no component running (so no cluster renews): what `rotate-ca`
/// refuses, and what `--force` costs.
#[test]
fn rotate_ca_refuses_to_retire_a_ca_still_in_use_unless_forced() {
    use crate::broker::{BrokerProc, clusterlink, deploy, fails, join, ok};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &[]);
    let _broker = BrokerProc::start(dir, "broker");
    ok(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "east.yaml"],
    ));
    let show = |creds: &str| clusterlink(dir, &["show", "clusters", "--credentials", creds]);
    let rotate = |args: &[&str]| {
        let mut all = vec!["broker", "rotate-ca"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", "broker"]);
        clusterlink(dir, &all)
    };
    ok(&show("east.yaml"));
    let err = fails(&rotate(&["finish"]));
    assert!(err.contains("no CA rotation is under way"), "{err}");
    let out = ok(&rotate(&["start"]));
    assert!(out.contains("CA rotation started"), "{out}");
    let err = fails(&rotate(&["start"]));
    assert!(err.contains("already under way"), "{err}");
    // `start` waits for the running broker to pick the new CA up (a client refused under
    // TLS 1.3 learns it only at its first read: better not to try too early). Then the
    // rewritten admin credentials (new CA) work, and so do east's (old CA) in the overlap.
    assert!(out.contains("The running broker has picked it up"), "{out}");
    ok(&show("broker/admin.yaml"));
    ok(&show("east.yaml"));
    let status = ok(&rotate(&["status"]));
    assert!(status.contains("east\told CA"), "{status}");
    let err = fails(&rotate(&["finish"]));
    assert!(
        err.contains("still hold a certificate of the old CA: east"),
        "{err}"
    );
    let out = ok(&rotate(&["finish", "--force"]));
    assert!(out.contains("The running broker has picked it up"), "{out}");
    // east never renewed: it is cut off; the admin is not.
    fails(&show("east.yaml"));
    ok(&show("broker/admin.yaml"));
}

/// In Kubernetes the credentials file is a Secret mounted read-only: a renewal is saved to
/// the Secret through the API (a merge patch of its key), used at once, and not undone by
/// the mounted file, which lags until the kubelet syncs it.
#[test]
fn a_renewal_in_kubernetes_is_saved_to_the_secret_and_not_undone_by_the_lagging_mount() {
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    use clusterlink_broker_client::renew::SaveTo;
    use clusterlink_broker_client::{Credentials, KeepOptions};
    use http::{Request, Response};
    use kube::client::Body;

    use crate::broker::{BrokerProc, deploy, join, ok};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _port = deploy(dir, &[]);
    let _broker = BrokerProc::start(dir, "broker");
    ok(&join(
        dir,
        "broker/broker-info.yaml",
        "east",
        1,
        &["-o", "east.yaml"],
    ));
    let mount = dir.join("east.yaml");
    let before = Credentials::read(&mount).unwrap();
    // The mount is read-only, as the kubelet makes it.
    std::fs::set_permissions(&mount, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The API server: GET and PATCH of Secret clusterlink-system/clusterlink-credentials.
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let patched: Arc<Mutex<Vec<(String, String, serde_json::Value)>>> = Arc::default();
        let seen = patched.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (method, path) = (request.method().to_string(), request.uri().path().to_owned());
                let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                seen.lock().unwrap().push((method, path, body));
                let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "clusterlink-credentials", "namespace": "clusterlink-system"}});
                send.send_response(Response::new(Body::from(serde_json::to_vec(&secret).unwrap())));
            }
        });
        let secret = clusterlink_broker_client::node::SecretRef::parse(
            kube::Client::new(service, "default"),
            "clusterlink-system/clusterlink-credentials",
        )
        .unwrap();
        // The component's clock says, once, that the certificate is due (300 of its 365
        // days gone); then it reads the real time, and the renewed certificate is not due.
        let due_once = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut live = clusterlink_broker_client::keep(
            mount.clone(),
            before.clone(),
            KeepOptions {
                check_every: Duration::from_millis(50),
                now: Arc::new(move || {
                    let days = if due_once.swap(false, std::sync::atomic::Ordering::SeqCst) { 300 } else { 0 };
                    SystemTime::now() + Duration::from_secs(days * 24 * 3600)
                }),
                save_to: SaveTo::Secret(secret),
            },
        );
        live.current();
        tokio::time::timeout(Duration::from_secs(10), live.changed())
            .await
            .expect("renewed");
        let renewed = live.current();
        assert_ne!(renewed.certificate, before.certificate);
        // Saved to the Secret: checked (GET), then its key patched with the new file.
        let calls = patched.lock().unwrap().clone();
        assert_eq!(calls[0].0, "GET");
        assert_eq!(
            calls[0].1,
            "/api/v1/namespaces/clusterlink-system/secrets/clusterlink-credentials"
        );
        let patch = calls.iter().find(|c| c.0 == "PATCH").expect("a patch");
        use base64::Engine;
        let saved = base64::engine::general_purpose::STANDARD
            .decode(patch.2["data"]["credentials.yaml"].as_str().unwrap())
            .unwrap();
        let saved: Credentials = serde_saphyr::from_str(std::str::from_utf8(&saved).unwrap()).unwrap();
        assert_eq!(saved, *renewed);
        // The mount still holds the old file: the renewed credentials stay in use.
        assert_eq!(Credentials::read(&mount).unwrap(), before);
        let settled = tokio::time::timeout(Duration::from_millis(300), live.changed()).await;
        assert!(settled.is_err(), "the lagging mount must not undo the renewal");
        assert_eq!(live.current().certificate, renewed.certificate);
    });
}
