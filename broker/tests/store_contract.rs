//! One contract, two backends: every test here runs against the embedded (redb) store and
//! against a real etcd (Debian's etcd-server) started on loopback for that test.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use clusterlink_broker::store::embedded::EmbeddedOptions;
use clusterlink_broker::store::{
    Compare, EmbeddedStore, EtcdStore, Event, Store, StoreError, Txn, TxnOutcome, Watch,
    WatchMessage,
};
use clusterlink_testkit::EtcdServer;

const WAIT: Duration = Duration::from_secs(10);

fn committed(o: TxnOutcome) -> u64 {
    match o {
        TxnOutcome::Committed { revision, .. } => revision,
        TxnOutcome::Failed => panic!("transaction unexpectedly failed"),
    }
}

/// Collects events until `n` have arrived, failing after a deadline.
async fn collect(w: &mut Watch, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, w.next()).await {
            Ok(Some(Ok(WatchMessage::Events(evs)))) => out.extend(evs),
            other => panic!("expected events, got {other:?} after {} of {n}", out.len()),
        }
    }
    out
}

async fn put_get_list(s: impl Store) {
    let r1 = committed(s.txn(Txn::put("a/1", b"one".to_vec())).await.unwrap());
    let r2 = committed(s.txn(Txn::put("a/2", b"two".to_vec())).await.unwrap());
    let r3 = committed(s.txn(Txn::put("b/1", b"other".to_vec())).await.unwrap());
    assert!(
        r1 < r2 && r2 < r3,
        "revisions must increase: {r1} {r2} {r3}"
    );
    let kv = s.get("a/1").await.unwrap().unwrap();
    assert_eq!(kv.value, b"one");
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r1));
    assert!(s.get("a/3").await.unwrap().is_none());
    let (items, rev) = s.list("a/").await.unwrap();
    assert_eq!(
        items.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2"]
    );
    assert_eq!(rev, r3, "a list reports the store's revision");
    let r4 = committed(s.txn(Txn::put("a/1", b"uno".to_vec())).await.unwrap());
    let kv = s.get("a/1").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r4));
}

async fn compare_and_swap(s: impl Store) {
    let r1 = committed(
        s.txn(Txn::put("k", b"v1".to_vec()).when(Compare::Absent("k".into())))
            .await
            .unwrap(),
    );
    // Create-only fails once the key exists.
    let again = s
        .txn(Txn::put("k", b"v2".to_vec()).when(Compare::Absent("k".into())))
        .await
        .unwrap();
    assert_eq!(again, TxnOutcome::Failed);
    // A stale revision fails, the current one succeeds.
    let stale = s
        .txn(Txn::put("k", b"v2".to_vec()).when(Compare::ModRevision("k".into(), r1 + 100)))
        .await
        .unwrap();
    assert_eq!(stale, TxnOutcome::Failed);
    committed(
        s.txn(Txn::put("k", b"v2".to_vec()).when(Compare::ModRevision("k".into(), r1)))
            .await
            .unwrap(),
    );
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"v2");
    // All or nothing: one failing compare means no op of the transaction applies.
    let txn = Txn::default()
        .when(Compare::Absent("x".into()))
        .when(Compare::Absent("k".into()))
        .and_put("x", b"x".to_vec(), 0)
        .and_delete("k");
    assert_eq!(s.txn(txn).await.unwrap(), TxnOutcome::Failed);
    assert!(s.get("x").await.unwrap().is_none());
    assert!(s.get("k").await.unwrap().is_some());
}

async fn concurrent_cas_loses_no_update(s: impl Store) {
    committed(s.txn(Txn::put("counter", b"0".to_vec())).await.unwrap());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let kv = s.get("counter").await.unwrap().unwrap();
                    let n: u64 = String::from_utf8(kv.value).unwrap().parse().unwrap();
                    let txn = Txn::put("counter", (n + 1).to_string().into_bytes())
                        .when(Compare::ModRevision("counter".into(), kv.mod_revision));
                    if let TxnOutcome::Committed { .. } = s.txn(txn).await.unwrap() {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.get("counter").await.unwrap().unwrap().value, b"80");
}

async fn deletes(s: impl Store) {
    for k in ["p/1", "p/2", "p/3", "q/1"] {
        committed(s.txn(Txn::put(k, b"x".to_vec())).await.unwrap());
    }
    let (_, before) = s.list("").await.unwrap();
    // Deleting an absent key changes nothing and makes no revision.
    match s.txn(Txn::default().and_delete("nope")).await.unwrap() {
        TxnOutcome::Committed { deleted, .. } => assert_eq!(deleted, 0),
        TxnOutcome::Failed => panic!("unconditional delete failed"),
    }
    assert_eq!(s.list("").await.unwrap().1, before);
    match s.txn(Txn::default().and_delete_prefix("p/")).await.unwrap() {
        TxnOutcome::Committed { deleted, revision } => {
            assert_eq!(deleted, 3);
            assert!(revision > before);
        }
        TxnOutcome::Failed => panic!("prefix delete failed"),
    }
    assert!(s.list("p/").await.unwrap().0.is_empty());
    assert_eq!(s.list("q/").await.unwrap().0.len(), 1);
}

async fn watch_resumes_exactly_once_in_order(s: impl Store) {
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(committed(
            s.txn(Txn::put(format!("w/{i}"), vec![i])).await.unwrap(),
        ));
    }
    committed(s.txn(Txn::put("other/x", vec![0])).await.unwrap());
    // Resume after the second write: the third, fourth and fifth follow, then live ones.
    let mut w = s.watch("w/", revs[1]).await.unwrap();
    let live = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut r = Vec::new();
            for i in 5..25u8 {
                r.push(committed(
                    s.txn(Txn::put(format!("w/{i}"), vec![i])).await.unwrap(),
                ));
            }
            r.push(committed(
                s.txn(Txn::default().and_delete("w/0")).await.unwrap(),
            ));
            r
        })
    };
    let got = collect(&mut w, 3 + 20 + 1).await;
    let live_revs = live.await.unwrap();
    let expected: Vec<u64> = revs[2..].iter().copied().chain(live_revs).collect();
    let seen: Vec<u64> = got.iter().map(Event::revision).collect();
    assert_eq!(
        seen, expected,
        "every change after the revision, once, in order"
    );
    assert!(matches!(got.last(), Some(Event::Delete { key, .. }) if key == "w/0"));
    assert!(
        got.iter().all(|e| e.key().starts_with("w/")),
        "prefix filter"
    );
    // Nothing more arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.next())
            .await
            .is_err()
    );
}

async fn watch_from_compacted_revision_relists(s: impl Store) {
    let first = committed(s.txn(Txn::put("c/1", vec![1])).await.unwrap());
    let mut last = first;
    for i in 2..10u8 {
        last = committed(s.txn(Txn::put(format!("c/{i}"), vec![i])).await.unwrap());
    }
    s.compact(last).await.unwrap();
    let mut w = s.watch("c/", first).await.unwrap();
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(WatchMessage::Relist { compact_revision }))) => {
            assert!(compact_revision >= last - 1, "{compact_revision} vs {last}");
        }
        other => panic!("expected relist, got {other:?}"),
    }
    // From the compaction point on, watching works again.
    let mut w = s.watch("c/", last).await.unwrap();
    let r = committed(s.txn(Txn::put("c/new", vec![0])).await.unwrap());
    let got = collect(&mut w, 1).await;
    assert_eq!(got[0].revision(), r);
}

async fn leases(s: impl Store) {
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    committed(
        s.txn(Txn::default().and_put("l/held", b"x".to_vec(), lease))
            .await
            .unwrap(),
    );
    assert_eq!(s.get("l/held").await.unwrap().unwrap().lease, lease);
    assert!(s.keep_alive(lease).await.unwrap() >= Duration::from_secs(1));
    let (_, rev) = s.list("").await.unwrap();
    let mut w = s.watch("l/", rev).await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    let got = collect(&mut w, 1).await;
    assert!(matches!(&got[0], Event::Delete { key, .. } if key == "l/held"));
    assert!(s.get("l/held").await.unwrap().is_none());
    let ka = s.keep_alive(lease).await;
    assert!(matches!(ka, Err(StoreError::LeaseNotFound(_))), "{ka:?}");
    assert!(matches!(
        s.txn(Txn::default().and_put("l/x", vec![], lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(s.get("l/x").await.unwrap().is_none());
}

async fn lease_expiry_deletes_keys(s: impl Store) {
    let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    let kept = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    committed(
        s.txn(
            Txn::default()
                .and_put("e/short", vec![], lease)
                .and_put("e/long", vec![], kept),
        )
        .await
        .unwrap(),
    );
    let (_, rev) = s.list("").await.unwrap();
    let mut w = s.watch("e/", rev).await.unwrap();
    // etcd rounds short TTLs up to its minimum; allow for that in the deadline.
    match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
        Ok(Some(Ok(WatchMessage::Events(evs)))) => {
            let keys: BTreeSet<&str> = evs.iter().map(Event::key).collect();
            assert_eq!(keys, BTreeSet::from(["e/short"]));
            assert!(matches!(evs[0], Event::Delete { .. }));
        }
        other => panic!("expected the expiry's delete, got {other:?}"),
    }
    assert!(s.get("e/long").await.unwrap().is_some());
}

async fn run_embedded<F, Fut>(test: F)
where
    F: FnOnce(EmbeddedStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
    test(s).await;
}

async fn run_etcd<F, Fut>(test: F)
where
    F: FnOnce(EtcdStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let etcd = EtcdServer::start().expect("start etcd (Debian etcd-server)");
    let s = EtcdStore::connect(&etcd.url(), "/clusterlink-test")
        .await
        .unwrap();
    test(s).await;
    drop(etcd);
}

/// The same contract against an etcd that serves clients over TLS only and checks their
/// certificates (`--client-cert-auth`), reached with `etcds://…?ca=…&cert=…&key=…`.
async fn run_etcd_tls<F, Fut>(test: F)
where
    F: FnOnce(EtcdStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let etcd = EtcdServer::start_tls().expect("start etcd with TLS (Debian etcd-server)");
    let s = EtcdStore::connect(&etcd.url(), "/clusterlink-test")
        .await
        .unwrap();
    test(s).await;
    drop(etcd);
}

/// An etcd with authentication on (`auth enable`), where the broker's user may touch its
/// namespace only; the password in a file, as the broker is given it.
struct EtcdWithAuth {
    etcd: EtcdServer,
    password_file: tempfile::NamedTempFile,
}

const NAMESPACE: &str = "/clusterlink-test";

impl EtcdWithAuth {
    async fn start() -> Self {
        use etcd_client::{Client, Permission};
        let etcd = EtcdServer::start().expect("start etcd (Debian etcd-server)");
        let endpoint = format!("http://127.0.0.1:{}", etcd.client_port);
        let mut c = Client::connect([endpoint], None).await.unwrap();
        c.user_add("root", "root-secret", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("clusterlink").await.unwrap();
        c.role_grant_permission(
            "clusterlink",
            Permission::read_write(format!("{NAMESPACE}/")).with_prefix(),
        )
        .await
        .unwrap();
        c.user_add("clusterlink", "broker-secret", None)
            .await
            .unwrap();
        c.user_grant_role("clusterlink", "clusterlink")
            .await
            .unwrap();
        c.auth_enable().await.unwrap();
        let password_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(password_file.path(), "broker-secret\n").unwrap();
        EtcdWithAuth {
            etcd,
            password_file,
        }
    }

    fn url(&self, user: &str, password_file: &std::path::Path) -> String {
        format!(
            "etcd://127.0.0.1:{}?user={user}&password-file={}",
            self.etcd.client_port,
            password_file.display()
        )
    }
}

async fn run_etcd_auth<F, Fut>(test: F)
where
    F: FnOnce(EtcdStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let etcd = EtcdWithAuth::start().await;
    let s = EtcdStore::connect(
        &etcd.url("clusterlink", etcd.password_file.path()),
        NAMESPACE,
    )
    .await
    .unwrap();
    test(s).await;
    drop(etcd);
}

#[tokio::test]
async fn etcd_with_auth_refuses_a_wrong_password_no_user_and_a_foreign_namespace() {
    let etcd = EtcdWithAuth::start().await;
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-it").unwrap();
    let e = EtcdStore::connect(&etcd.url("clusterlink", wrong.path()), NAMESPACE)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("authentication failed"), "{e}");
    let anonymous = format!("etcd://127.0.0.1:{}", etcd.etcd.client_port);
    let e = EtcdStore::connect(&anonymous, NAMESPACE)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("user name is empty") || e.contains("permission"),
        "{e}"
    );
    // A namespace the user has no access to: refused at connect, not at the first write.
    let e = EtcdStore::connect(
        &etcd.url("clusterlink", etcd.password_file.path()),
        "/other",
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("permission denied"), "{e}");
    // The password never goes in the URL; half the pair is refused.
    for (url, says) in [
        (
            format!("{anonymous}?user=clusterlink&password=x"),
            "password-file",
        ),
        (
            format!("{anonymous}?user=clusterlink"),
            "both user=NAME and password-file",
        ),
        (format!("{anonymous}?ca=/x"), "etcds:// only"),
    ] {
        let e = EtcdStore::connect(&url, NAMESPACE)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(says), "{url}: {e}");
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::run_embedded(super::$name).await })*
        }
        mod etcd {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::run_etcd(super::$name).await })*
        }
        mod etcd_auth {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::run_etcd_auth(super::$name).await })*
        }
        mod etcd_tls {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::run_etcd_tls(super::$name).await })*
        }
    };
}

#[tokio::test]
async fn etcd_over_tls_refuses_a_wrong_ca_a_missing_client_certificate_and_plain_text() {
    let etcd = EtcdServer::start_tls().expect("start etcd with TLS (Debian etcd-server)");
    let tls = etcd.tls.clone().unwrap();
    let port = etcd.client_port;
    // A CA that did not sign etcd's certificate.
    let wrong_ca = format!(
        "etcds://127.0.0.1:{port}?ca={}&cert={}&key={}",
        tls.other_ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let e = EtcdStore::connect(&wrong_ca, "/x")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("over TLS") && e.contains("ca="), "{e}");
    // No client certificate: etcd refuses it.
    let anonymous = format!("etcds://127.0.0.1:{port}?ca={}", tls.ca.display());
    let e = EtcdStore::connect(&anonymous, "/x")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("over TLS"), "{e}");
    // Plain text to a TLS port.
    assert!(
        EtcdStore::connect(&format!("etcd://127.0.0.1:{port}"), "/x")
            .await
            .is_err()
    );
    // Half a client identity, an unknown option: refused before connecting.
    let half = format!(
        "etcds://127.0.0.1:{port}?ca={}&cert={}",
        tls.ca.display(),
        tls.client_cert.display()
    );
    let e = EtcdStore::connect(&half, "/x")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("both cert=FILE and key=FILE"), "{e}");
    let e = EtcdStore::connect(&format!("etcds://127.0.0.1:{port}?pasword=x"), "/x")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown option"), "{e}");
    // And the right material works.
    EtcdStore::connect(&etcd.url(), "/x").await.unwrap();
}

contract!(
    put_get_list,
    compare_and_swap,
    concurrent_cas_loses_no_update,
    deletes,
    watch_resumes_exactly_once_in_order,
    watch_from_compacted_revision_relists,
    leases,
    lease_expiry_deletes_keys,
);

#[tokio::test]
async fn embedded_history_limit_relists_old_watchers() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path(), EmbeddedOptions { history: 10 }).unwrap();
    let first = committed(s.txn(Txn::put("h/0", vec![])).await.unwrap());
    for i in 1..40 {
        committed(s.txn(Txn::put(format!("h/{i}"), vec![])).await.unwrap());
    }
    let mut w = s.watch("h/", first).await.unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, w.next()).await,
        Ok(Some(Ok(WatchMessage::Relist { .. })))
    ));
}

#[tokio::test]
async fn etcd_unreachable_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = EtcdStore::connect(&format!("etcd://127.0.0.1:{port}"), "/x")
        .await
        .err()
        .expect("connecting to a closed port must fail");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    let err = EtcdStore::connect("http://127.0.0.1:2379", "/x")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("etcd://HOST:PORT"), "{err}");
}
