//! The broker's gRPC API over real mTLS on loopback: joins, the refusals of the identity and
//! authorization rules, watches, and several stateless brokers on one etcd.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clusterlink_api::proto::{self, broker_client::BrokerClient};
use clusterlink_api::{Kind, Record};
use clusterlink_broker::pki::{Ca, CertAndKey, new_ca, new_client_key};
use clusterlink_broker::server::{BrokerTls, ServeOptions, serve};
use clusterlink_broker::service::Clock;
use clusterlink_broker::store::embedded::EmbeddedOptions;
use clusterlink_broker::store::{EmbeddedStore, EtcdStore, Store};
use clusterlink_broker_client::connect;
use clusterlink_testkit::EtcdServer;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

#[derive(Clone)]
struct ManualClock(Arc<Mutex<SystemTime>>);

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

impl ManualClock {
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

struct TestBroker {
    address: String,
    tls: BrokerTls,
    admin: CertAndKey,
    clock: ManualClock,
    /// Replaces the broker's TLS material while it runs (a CA rotation).
    tls_tx: tokio::sync::watch::Sender<BrokerTls>,
    _stop: oneshot::Sender<()>,
    _dir: Option<tempfile::TempDir>,
}

fn make_tls() -> (BrokerTls, CertAndKey) {
    let now = SystemTime::now();
    let ca = new_ca(now).unwrap();
    let loaded = Ca::load(&ca).unwrap();
    let server = loaded.server_cert(now, &["127.0.0.1".into()]).unwrap();
    let admin = loaded.admin_cert(now).unwrap();
    (
        BrokerTls {
            ca,
            server,
            retiring_ca: None,
        },
        admin,
    )
}

impl TestBroker {
    async fn start<S: Store>(
        store: S,
        tls: BrokerTls,
        admin: CertAndKey,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        Self::start_with(store, tls, admin, dir, ServeOptions::default()).await
    }

    /// A broker with `options` (its protected addresses, its limits).
    async fn start_with<S: Store>(
        store: S,
        tls: BrokerTls,
        admin: CertAndKey,
        dir: Option<tempfile::TempDir>,
        options: ServeOptions,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let clock = ManualClock(Arc::new(Mutex::new(SystemTime::now())));
        let (stop, stopped) = oneshot::channel::<()>();
        let c: Arc<dyn Clock> = Arc::new(clock.clone());
        let (tls_tx, t) = tokio::sync::watch::channel(tls.clone());
        tokio::spawn(async move {
            serve(store, t, listener, c, options, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        TestBroker {
            address,
            tls,
            admin,
            clock,
            tls_tx,
            _stop: stop,
            _dir: dir,
        }
    }

    async fn embedded() -> (Self, EmbeddedStore) {
        Self::embedded_with(ServeOptions::default()).await
    }

    /// A broker on a fresh embedded store, with `options` (protected addresses, limits).
    async fn embedded_with(options: ServeOptions) -> (Self, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap();
        let (tls, admin) = make_tls();
        (
            Self::start_with(store.clone(), tls, admin, Some(dir), options).await,
            store,
        )
    }

    async fn anonymous(&self) -> BrokerClient<Channel> {
        connect(&self.address, &self.tls.ca.cert_pem, None)
            .await
            .unwrap()
    }

    async fn admin(&self) -> BrokerClient<Channel> {
        connect(
            &self.address,
            &self.tls.ca.cert_pem,
            Some((&self.admin.cert_pem, &self.admin.key_pem)),
        )
        .await
        .unwrap()
    }

    async fn token(&self, single_use: bool) -> String {
        self.admin()
            .await
            .create_token(proto::CreateTokenRequest {
                ttl_seconds: 3600,
                single_use,
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Joins a cluster; returns a client acting as it.
    async fn join(
        &self,
        token: &str,
        id: &str,
        pods: &str,
        svcs: &str,
    ) -> Result<BrokerClient<Channel>, tonic::Status> {
        let (key, spki) = new_client_key().unwrap();
        let resp = self
            .anonymous()
            .await
            .join(join_request(token, id, pods, svcs, spki))
            .await?
            .into_inner();
        Ok(connect(
            &self.address,
            &self.tls.ca.cert_pem,
            Some((&resp.certificate_pem, &key)),
        )
        .await
        .unwrap())
    }
}

fn join_request(
    token: &str,
    id: &str,
    pods: &str,
    svcs: &str,
    spki: Vec<u8>,
) -> proto::JoinRequest {
    proto::JoinRequest {
        token: token.into(),
        cluster: Some(proto::Cluster {
            id: id.into(),
            pod_cidrs: vec![pods.into()],
            service_cidrs: vec![svcs.into()],
            labels: Default::default(),
        }),
        public_key_der: spki,
    }
}

/// A service of `cluster` at an address in its service CIDR (east 10.101/16, west 10.102/16,
/// as the tests join them).
fn service(cluster: &str, ns: &str, name: &str) -> proto::Record {
    let ip = match cluster {
        "west" => "10.102.0.10",
        _ => "10.101.0.10",
    };
    proto::Record {
        kind: Some(proto::record::Kind::Service(proto::ServiceRecord {
            cluster: cluster.into(),
            namespace: ns.into(),
            name: name.into(),
            r#type: proto::ServiceType::ClusterSetIp as i32,
            ports: vec![proto::ServicePort {
                name: "tcp".into(),
                protocol: "TCP".into(),
                port: 7,
                app_protocol: String::new(),
            }],
            ips: vec![ip.into()],
            endpoints: vec![],
            ready: true,
            exported_at_unix_ms: 1,
        })),
    }
}

fn gateway(cluster: &str, node: &str) -> proto::Record {
    proto::Record {
        kind: Some(proto::record::Kind::Gateway(proto::GatewayEndpoint {
            cluster: cluster.into(),
            node: node.into(),
            public_key: vec![9; 32],
            private_addr: "192.0.2.10".into(),
            public_addr: "203.0.113.99".into(),
            port: 51820,
            role: proto::GatewayRole::Active as i32,
            generation: 1,
        })),
    }
}

fn publish(record: proto::Record) -> proto::PublishRequest {
    proto::PublishRequest {
        record: Some(record),
        lease_id: 0,
        expected_revision: 0,
        create_only: false,
    }
}

async fn list(c: &mut BrokerClient<Channel>, kind: Kind) -> Vec<Record> {
    c.list(proto::ListRequest {
        kind: kind.to_proto() as i32,
    })
    .await
    .unwrap()
    .into_inner()
    .records
    .into_iter()
    .map(|r| Record::try_from(r).unwrap())
    .collect()
}

#[tokio::test]
async fn clusters_join_publish_and_list() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut west = b
        .join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    let who = east
        .who_am_i(proto::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(who.identity, "cluster/east");
    east.publish(publish(service("east", "demo", "echo")))
        .await
        .unwrap();
    west.publish(publish(gateway("west", "gw-0")))
        .await
        .unwrap();
    let clusters = list(&mut west, Kind::Clusters).await;
    assert_eq!(clusters.len(), 2);
    let services = list(&mut west, Kind::Services).await;
    assert_eq!(services.len(), 1);
    // The broker records the address it saw, not the one the gateway claimed; here it saw
    // loopback, which means nothing to other gateways, so it records none.
    match &list(&mut east, Kind::Gateways).await[..] {
        [Record::Gateway(g)] => assert_eq!(g.public_addr, None),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_cluster_cannot_write_another_clusters_records() {
    let (b, store) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut west = b
        .join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    west.publish(publish(service("west", "demo", "echo")))
        .await
        .unwrap();
    let err = east
        .publish(publish(service("west", "demo", "evil")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("east may not write records of cluster west"),
        "{}",
        err.message()
    );
    assert!(
        store
            .get("services/west/demo/evil")
            .await
            .unwrap()
            .is_none()
    );
    // Nor overwrite one, nor a cluster registration.
    assert_eq!(
        east.publish(publish(service("west", "demo", "echo")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let forged = proto::Record {
        kind: Some(proto::record::Kind::Cluster(proto::ClusterRegistration {
            cluster: Some(proto::Cluster {
                id: "east".into(),
                pod_cidrs: vec!["10.0.0.0/8".into()],
                service_cidrs: vec!["172.16.0.0/16".into()],
                labels: Default::default(),
            }),
            certificate_serial: "00".into(),
            joined_at_unix_ms: 0,
            public_key_sha256: String::new(),
            certificate_expires_at_unix_ms: 0,
            retiring: Vec::new(),
            certificate_ca_sha256: String::new(),
        })),
    };
    assert_eq!(
        east.publish(publish(forged)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Withdrawing is scoped to the caller's own records: east's "demo/echo" is not west's.
    let w = east
        .withdraw(proto::WithdrawRequest {
            kind: Kind::Services.to_proto() as i32,
            name: "demo/echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!w.deleted);
    assert!(
        store
            .get("services/west/demo/echo")
            .await
            .unwrap()
            .is_some()
    );
    // Admins read but do not publish.
    assert_eq!(
        b.admin()
            .await
            .publish(publish(service("west", "demo", "x")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn joins_with_overlapping_cidrs_are_refused_naming_the_cluster() {
    let (b, store) = TestBroker::embedded().await;
    let t = b.token(false).await;
    b.join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let err = b
        .join(&t, "west", "10.2.0.0/16", "10.1.128.0/17")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("10.1.128.0/17 overlaps 10.1.0.0/16 of cluster \"east\""),
        "{}",
        err.message()
    );
    assert!(store.get("clusters/west").await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_overlapping_joins_admit_exactly_one() {
    let (b, store) = TestBroker::embedded().await;
    let t = b.token(false).await;
    for round in 0..20u8 {
        let pods = format!("10.{}.0.0/16", 10 + round);
        let (a, bb) = (format!("a{round}"), format!("b{round}"));
        let (sa, sb) = (
            format!("10.{}.0.0/16", 100 + round),
            format!("10.{}.0.0/16", 150 + round),
        );
        let (r1, r2) = tokio::join!(b.join(&t, &a, &pods, &sa), b.join(&t, &bb, &pods, &sb));
        assert_eq!(
            r1.is_ok() as u8 + r2.is_ok() as u8,
            1,
            "round {round}: exactly one of two overlapping joins wins"
        );
    }
    assert_eq!(store.list("clusters/").await.unwrap().0.len(), 20);
}

#[tokio::test]
async fn duplicate_cluster_ids_are_refused() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    b.join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let err = b
        .join(&t, "east", "10.3.0.0/16", "10.103.0.0/16")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("\"east\" has already joined"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn tokens_expire_and_single_use_tokens_are_used_once() {
    let (b, _) = TestBroker::embedded().await;
    let unknown = format!("clt1.{}", "0".repeat(64));
    let err = b
        .join(&unknown, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not known"), "{}", err.message());

    let once = b.token(true).await;
    b.join(&once, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let err = b
        .join(&once, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("\"east\" has already used it"),
        "{}",
        err.message()
    );

    let expiring = b.token(false).await; // valid for an hour on the broker's clock
    b.clock.advance(Duration::from_secs(3601));
    let err = b
        .join(&expiring, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn revoked_clusters_are_cut_off_and_their_records_removed() {
    let (b, store) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    east.publish(publish(service("east", "demo", "echo")))
        .await
        .unwrap();
    east.publish(publish(gateway("east", "gw-0")))
        .await
        .unwrap();
    // Only the admin may revoke.
    let err = east
        .revoke_cluster(proto::RevokeClusterRequest {
            cluster_id: "east".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let r = b
        .admin()
        .await
        .revoke_cluster(proto::RevokeClusterRequest {
            cluster_id: "east".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.records_removed, 3);
    let err = east
        .publish(publish(service("east", "demo", "again")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("no longer"), "{}", err.message());
    assert_eq!(
        east.list(proto::ListRequest {
            kind: Kind::Clusters.to_proto() as i32
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );
    assert!(store.list("services/east/").await.unwrap().0.is_empty());
    // Re-joining issues a new certificate; the old one stays void.
    let mut again = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    again
        .publish(publish(service("east", "demo", "echo")))
        .await
        .unwrap();
    assert_eq!(
        east.publish(publish(service("east", "demo", "echo")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let err = b
        .admin()
        .await
        .revoke_cluster(proto::RevokeClusterRequest {
            cluster_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn calls_without_a_certificate_or_from_another_ca_are_refused() {
    let (b, _) = TestBroker::embedded().await;
    let err = b
        .anonymous()
        .await
        .list(proto::ListRequest {
            kind: Kind::Clusters.to_proto() as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("client certificate"),
        "{}",
        err.message()
    );
    // A certificate from another CA fails the TLS handshake.
    let (_, foreign_admin) = make_tls();
    let res = connect(
        &b.address,
        &b.tls.ca.cert_pem,
        Some((&foreign_admin.cert_pem, &foreign_admin.key_pem)),
    )
    .await;
    let refused = match res {
        Err(_) => true,
        Ok(mut c) => c
            .list(proto::ListRequest {
                kind: Kind::Clusters.to_proto() as i32,
            })
            .await
            .is_err(),
    };
    assert!(refused, "a foreign CA's certificate must not be accepted");
}

#[tokio::test]
async fn invalid_and_oversized_records_are_refused() {
    let (b, store) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut bad = service("east", "Demo", "echo");
    let err = east.publish(publish(bad.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("\"Demo\""), "{}", err.message());
    if let Some(proto::record::Kind::Service(s)) = &mut bad.kind {
        s.namespace = "demo".into();
        s.ips = vec!["10.101.0.10".into(); 1000];
    }
    let err = east.publish(publish(bad.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most"), "{}", err.message());
    if let Some(proto::record::Kind::Service(s)) = &mut bad.kind {
        s.ips = vec!["10.101.0.10".into(); 400_000]; // over 5 MB on the wire
    }
    // A client that would send it: the broker's own limit refuses it.
    let mut east = east.max_encoding_message_size(64 << 20);
    let err = east.publish(publish(bad)).await.unwrap_err();
    assert!(err.message().contains("too large"), "{err:?}");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(store.list("services/").await.unwrap().0.is_empty());
}

#[tokio::test]
async fn leases_belong_to_their_cluster_and_take_records_with_them() {
    let (b, store) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut west = b
        .join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    let lease = grant(&mut east, 10, 0).await.lease_id;
    let mut req = publish(gateway("east", "gw-0"));
    req.lease_id = lease;
    east.publish(req).await.unwrap();
    // West cannot use or renew east's lease.
    let mut req = publish(gateway("west", "gw-0"));
    req.lease_id = lease;
    assert_eq!(west.publish(req).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        west.keep_alive(proto::KeepAliveRequest { lease_id: lease })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    east.keep_alive(proto::KeepAliveRequest { lease_id: lease })
        .await
        .unwrap();
    store.revoke_lease(lease).await.unwrap();
    assert!(store.get("gateways/east/gw-0").await.unwrap().is_none());
}

#[tokio::test]
async fn a_lease_in_milliseconds_lapses_and_takes_its_records() {
    let (b, store) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let granted = grant(&mut east, 0, 300).await;
    assert_eq!((granted.ttl_millis, granted.ttl_seconds), (300, 1));
    let mut req = publish(gateway("east", "gw-0"));
    req.lease_id = granted.lease_id;
    let published = east.publish(req).await.unwrap().into_inner().revision;
    let renewed = east
        .keep_alive(proto::KeepAliveRequest {
            lease_id: granted.lease_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.ttl_millis, 300);
    // Not renewed again: the record goes with the lease (the next event is its delete).
    let mut stream = watch_from(&mut east, Kind::Gateways, published).await;
    let events = watch_events(&mut stream, 1).await;
    assert_eq!(events[0].r#type, proto::EventType::Delete as i32);
    assert_eq!(events[0].key, "gateways/east/gw-0");
    assert!(store.get("gateways/east/gw-0").await.unwrap().is_none());
}

#[tokio::test]
async fn compare_and_swap_over_the_api() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut req = publish(service("east", "demo", "echo"));
    req.create_only = true;
    let rev = east
        .publish(req.clone())
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert_eq!(east.publish(req).await.unwrap_err().code(), Code::Aborted);
    let mut req = publish(service("east", "demo", "echo"));
    req.expected_revision = rev + 1000;
    assert_eq!(
        east.publish(req.clone()).await.unwrap_err().code(),
        Code::Aborted
    );
    req.expected_revision = rev;
    east.publish(req).await.unwrap();
}

/// The store revision a list of `kind` is taken at.
async fn revision(c: &mut BrokerClient<Channel>, kind: Kind) -> u64 {
    c.list(proto::ListRequest {
        kind: kind.to_proto() as i32,
    })
    .await
    .unwrap()
    .into_inner()
    .revision
}

/// A lease of `seconds`, or of `millis` when non-zero.
async fn grant(
    c: &mut BrokerClient<Channel>,
    seconds: u32,
    millis: u32,
) -> proto::GrantLeaseResponse {
    c.grant_lease(proto::GrantLeaseRequest {
        ttl_seconds: seconds,
        ttl_millis: millis,
    })
    .await
    .unwrap()
    .into_inner()
}

/// A watch of `kind` from revision `from`.
async fn watch_from(
    c: &mut BrokerClient<Channel>,
    kind: Kind,
    from: u64,
) -> tonic::Streaming<proto::WatchResponse> {
    c.watch(proto::WatchRequest {
        kind: kind.to_proto() as i32,
        from_revision: from,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Reads watch responses until `n` events arrived.
async fn watch_events(
    stream: &mut tonic::Streaming<proto::WatchResponse>,
    n: usize,
) -> Vec<proto::WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("watch event within 10 s")
            .unwrap()
            .unwrap();
        assert!(!msg.relist_required);
        out.extend(msg.events);
    }
    out
}

#[tokio::test]
async fn watches_resume_from_a_revision_exactly_once() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let start = revision(&mut east, Kind::Services).await;
    let mut stream = watch_from(&mut east, Kind::Services, start).await;
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(
            east.publish(publish(service("east", "demo", &format!("s{i}"))))
                .await
                .unwrap()
                .into_inner()
                .revision,
        );
        // Other kinds do not show up in a services watch.
        east.publish(publish(gateway("east", &format!("gw-{i}"))))
            .await
            .unwrap();
    }
    let got = watch_events(&mut stream, 5).await;
    assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), revs);
    drop(stream);
    // Reconnect after the third: exactly the fourth and fifth, then a live delete.
    let mut stream = watch_from(&mut east, Kind::Services, revs[2]).await;
    let del = east
        .withdraw(proto::WithdrawRequest {
            kind: Kind::Services.to_proto() as i32,
            name: "demo/s0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let got = watch_events(&mut stream, 3).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![revs[3], revs[4], del.revision]
    );
    assert_eq!(got[2].r#type, proto::EventType::Delete as i32);
    assert_eq!(got[2].key, "services/east/demo/s0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_stateless_brokers_serve_one_etcd() {
    let etcd = EtcdServer::start().expect("start etcd (Debian etcd-server)");
    let (tls, admin) = make_tls();
    let s1 = EtcdStore::connect(&etcd.url(), "/clusterlink")
        .await
        .unwrap();
    let s2 = EtcdStore::connect(&etcd.url(), "/clusterlink")
        .await
        .unwrap();
    let a = TestBroker::start(s1.clone(), tls.clone(), admin.clone(), None).await;
    let b = TestBroker::start(s2, tls, admin, None).await;
    // A token made through one broker is redeemed through the other.
    let t = a.token(false).await;
    let mut east_b = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut west_a = a
        .join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    // The overlap check sees clusters that joined through the other broker.
    assert_eq!(
        a.join(&t, "south", "10.1.0.0/24", "10.201.0.0/16")
            .await
            .err()
            .unwrap()
            .code(),
        Code::FailedPrecondition
    );
    // etcd counts leases in whole seconds: a grant reports what it really got.
    let granted = grant(&mut east_b, 0, 300).await;
    assert!(
        granted.ttl_millis >= 1000 && granted.ttl_millis % 1000 == 0,
        "{granted:?}"
    );
    assert_eq!(granted.ttl_seconds * 1000, granted.ttl_millis);
    // A watch on one broker sees a publish through the other.
    let rev = revision(&mut west_a, Kind::Services).await;
    let mut stream = watch_from(&mut west_a, Kind::Services, rev).await;
    let published = east_b
        .publish(publish(service("east", "demo", "echo")))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let got = watch_events(&mut stream, 1).await;
    assert_eq!(got[0].revision, published);
    assert_eq!(list(&mut west_a, Kind::Clusters).await.len(), 2);
    // Revoked through one broker, refused by the other.
    a.admin()
        .await
        .revoke_cluster(proto::RevokeClusterRequest {
            cluster_id: "east".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        east_b
            .publish(publish(service("east", "demo", "x")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(s1.get("services/east/demo/x").await.unwrap().is_none());
}

#[tokio::test]
async fn revoking_a_cluster_ends_its_open_watches() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut west = b
        .join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    let mut stream = watch_from(&mut east, Kind::Services, 0).await;
    west.publish(publish(service("west", "demo", "echo")))
        .await
        .unwrap();
    watch_events(&mut stream, 1).await;
    b.admin()
        .await
        .revoke_cluster(proto::RevokeClusterRequest {
            cluster_id: "east".into(),
        })
        .await
        .unwrap();
    // Idle or not, the stream ends with the refusal within a few seconds.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the revoked watch must end");
    let status = end.expect_err("a refusal, not more events");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("no longer"),
        "{}",
        status.message()
    );
}

/// A service record of `cluster` with `ips` (ClusterSetIP) or headless `endpoints`.
fn service_at(cluster: &str, name: &str, ips: &[&str], endpoints: &[&str]) -> proto::Record {
    proto::Record {
        kind: Some(proto::record::Kind::Service(proto::ServiceRecord {
            cluster: cluster.into(),
            namespace: "demo".into(),
            name: name.into(),
            r#type: if ips.is_empty() {
                proto::ServiceType::Headless as i32
            } else {
                proto::ServiceType::ClusterSetIp as i32
            },
            ports: vec![],
            ips: ips.iter().map(|s| s.to_string()).collect(),
            endpoints: endpoints
                .iter()
                .map(|ip| proto::Endpoint {
                    ip: ip.to_string(),
                    hostname: String::new(),
                    ready: true,
                })
                .collect(),
            ready: true,
            exported_at_unix_ms: 1,
        })),
    }
}

fn gateway_at(cluster: &str, node: &str, private: &str) -> proto::Record {
    let mut g = gateway(cluster, node);
    if let Some(proto::record::Kind::Gateway(e)) = &mut g.kind {
        e.private_addr = private.into();
    }
    g
}

#[tokio::test]
async fn a_cluster_publishes_only_addresses_it_owns() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    b.join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    // Its own: accepted.
    east.publish(publish(service_at("east", "ok", &[], &["10.1.0.5"])))
        .await
        .unwrap();
    // A headless endpoint in west's pods, a ClusterSetIP on the internet: refused, naming
    // the address and east's CIDRs.
    for (name, ips, endpoints, addr) in [
        ("steal", vec![], vec!["10.1.0.5", "10.2.0.9"], "10.2.0.9"),
        ("away", vec!["8.8.8.8"], vec![], "8.8.8.8"),
    ] {
        let e = east
            .publish(publish(service_at("east", name, &ips, &endpoints)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains(addr)
                && e.message()
                    .contains("pods 10.1.0.0/16, services 10.101.0.0/16"),
            "{e:?}"
        );
    }
    // Gateways: a loopback underlay, and one inside a cluster's CIDR (the route agents would
    // send the tunnels' own datagrams into the tunnels).
    let lo = east
        .publish(publish(gateway_at("east", "gw-0", "127.0.0.1")))
        .await
        .unwrap_err();
    assert!(lo.message().contains("loopback"), "{lo:?}");
    let inside = east
        .publish(publish(gateway_at("east", "gw-0", "10.2.3.4")))
        .await
        .unwrap_err();
    assert!(
        inside
            .message()
            .contains("10.2.3.4 lies in 10.2.0.0/16 of cluster \"west\""),
        "{inside:?}"
    );
    east.publish(publish(gateway_at("east", "gw-0", "192.0.2.10")))
        .await
        .unwrap();
    let services = list(&mut east, Kind::Services).await;
    assert_eq!(services.len(), 1, "only the owned service is stored");
}

#[tokio::test]
async fn no_cluster_cidr_may_cover_the_mesh_or_a_reserved_range() {
    // The broker is also reached at 198.51.100.7 (its advertised address).
    let (b, _) = TestBroker::embedded_with(ServeOptions {
        protected: vec!["198.51.100.7".parse().unwrap()],
        ..ServeOptions::default()
    })
    .await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    east.publish(publish(gateway_at("east", "gw-0", "192.0.2.10")))
        .await
        .unwrap();
    for (pods, says) in [
        // Another cluster's gateway node.
        (
            "192.0.2.0/24",
            "covers 192.0.2.10, the private address of gateway gw-0 of cluster east",
        ),
        // The broker.
        (
            "198.51.100.0/24",
            "covers 198.51.100.7, an address of the broker",
        ),
        // Reserved ranges.
        ("8.0.0.0/7", "wider than"),
        ("169.254.0.0/16", "link-local"),
        ("127.0.0.0/8", "loopback"),
        ("224.0.0.0/8", "multicast"),
    ] {
        let e = b
            .join(&t, "rogue", pods, "10.109.0.0/16")
            .await
            .err()
            .unwrap_or_else(|| panic!("{pods} was accepted"));
        assert_eq!(e.code(), Code::FailedPrecondition, "{pods}: {e:?}");
        assert!(e.message().contains(says), "{pods}: {e:?}");
    }
    // Nothing of the refused joins is left: the ID is free.
    b.join(&t, "rogue", "10.9.0.0/16", "10.109.0.0/16")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_flooding_the_broker_is_held_to_its_limits_and_others_are_not() {
    let (b, _) = TestBroker::embedded_with(ServeOptions {
        limits: clusterlink_broker::limits::Limits {
            max_records: 50,
            writes_per_second: 100,
            burst: 100,
        },
        ..ServeOptions::default()
    })
    .await;
    let t = b.token(false).await;
    let east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    let mut west = b
        .join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    let mut watcher = b
        .admin()
        .await
        .watch(proto::WatchRequest {
            kind: Kind::Services.to_proto() as i32,
            from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();

    // East floods: eight writers, as fast as they can, for two seconds, over 40 names.
    let started = std::time::Instant::now();
    let flood: Vec<_> = (0..8)
        .map(|w| {
            let mut c = east.clone();
            tokio::spawn(async move {
                let (mut ok, mut limited, mut hint) = (0u64, 0u64, String::new());
                let mut i = 0u64;
                while started.elapsed() < Duration::from_secs(2) {
                    let name = format!("f{}", (w * 5 + i) % 40);
                    i += 1;
                    match c.publish(publish(service("east", "flood", &name))).await {
                        Ok(_) => ok += 1,
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            limited += 1;
                            hint = s.message().to_owned();
                        }
                        Err(s) => panic!("{s:?}"),
                    }
                }
                (ok, limited, hint)
            })
        })
        .collect();
    // Meanwhile west's updates reach a watcher, every one, none refused.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let sent = std::time::Instant::now();
        let rev = west
            .publish(publish(service("west", "demo", &format!("w{i}"))))
            .await
            .unwrap()
            .into_inner()
            .revision;
        'seen: loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), watcher.message())
                .await
                .expect("west's update did not reach the watcher within 10 s")
                .unwrap()
                .unwrap();
            if msg
                .events
                .iter()
                .any(|e| e.revision >= rev && e.key.contains("/west/"))
            {
                break 'seen;
            }
        }
        worst = worst.max(sent.elapsed());
    }
    let (mut ok, mut limited, mut hint) = (0, 0, String::new());
    for f in flood {
        let (o, l, h) = f.await.unwrap();
        ok += o;
        limited += l;
        if !h.is_empty() {
            hint = h;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // East got its burst and its rate, no more (with one second of slack for the edges).
    let allowed = 100.0 + 100.0 * (elapsed + 1.0);
    assert!(
        (ok as f64) <= allowed,
        "east wrote {ok} in {elapsed:.1} s, allowed {allowed}"
    );
    assert!(limited > 0, "east was never held back ({ok} writes)");
    assert!(
        hint.contains("limit of 100 per second") && hint.contains("retry in"),
        "{hint}"
    );
    // A liveness bound, not a performance figure (BENCHMARKS has those).
    assert!(
        worst < Duration::from_secs(2),
        "west's slowest update took {worst:?}"
    );

    // The record limit: east holds 40 records; 10 more fit, the 11th new one does not. (Each
    // write is retried while the rate limit holds it back: east's bucket is still empty.)
    let mut east = east;
    let write = async |c: &mut BrokerClient<Channel>, name: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match c.publish(publish(service("east", "more", name))).await {
                Err(s)
                    if s.message().contains("writes faster")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => return r,
            }
        }
    };
    for i in 0..10 {
        write(&mut east, &format!("m{i}")).await.unwrap();
    }
    let full = write(&mut east, "m10").await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message()
            .contains("holds the most records the broker allows (50)"),
        "{full:?}"
    );
    // Updating one it holds is still taken; withdrawing one makes room.
    write(&mut east, "m0").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = east
            .withdraw(proto::WithdrawRequest {
                kind: proto::Kind::Services as i32,
                name: "more/m0".into(),
            })
            .await;
        match r {
            Err(s)
                if s.message().contains("writes faster")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r => {
                assert!(r.unwrap().into_inner().deleted);
                break;
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match write(&mut east, "m10").await {
            Ok(_) => break,
            Err(s) if std::time::Instant::now() < deadline => {
                // The census learns of the withdrawal through the hub: polled, with a deadline.
                assert!(s.message().contains("holds the most records"), "{s:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("no room after a withdrawal: {s:?}"),
        }
    }
}

#[tokio::test]
async fn the_broker_keeps_an_audit_trail_of_admin_actions_and_refusals() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let mut east = b
        .join(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await
        .unwrap();
    b.join(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await
        .unwrap();
    // A refused publish, a refused join, an admin revoke, a refused read of the trail.
    east.publish(publish(service_at("east", "away", &["8.8.8.8"], &[])))
        .await
        .unwrap_err();
    b.join("clt1.nope", "rogue", "10.9.0.0/16", "10.109.0.0/16")
        .await
        .err()
        .unwrap();
    let mut admin = b.admin().await;
    admin
        .revoke_cluster(proto::RevokeClusterRequest {
            cluster_id: "west".into(),
        })
        .await
        .unwrap();
    let denied = east
        .list_events(proto::ListEventsRequest { limit: 0 })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let events = admin
        .list_events(proto::ListEventsRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .events;
    let find = |who: &str, action: &str| {
        events
            .iter()
            .find(|e| e.who == who && e.action == action)
            .unwrap_or_else(|| panic!("no {who} {action} in {events:?}"))
    };
    let p = find("cluster/east", "publish");
    assert!(p.refused && p.target == "services/east/demo/away", "{p:?}");
    assert!(p.reason.contains("8.8.8.8"), "{p:?}");
    let j = find("anonymous", "join");
    assert!(
        j.refused && j.target == "rogue" && j.reason.contains("not known"),
        "{j:?}"
    );
    let r = find("admin", "revoke");
    assert!(!r.refused && r.target == "west", "{r:?}");
    assert!(
        events
            .iter()
            .any(|e| e.who == "cluster/east" && e.action == "join" && !e.refused)
    );
    // Newest last, and the limit keeps the newest.
    let last = admin
        .list_events(proto::ListEventsRequest { limit: 1 })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(last.len(), 1);
    assert_eq!(
        (
            last[0].who.as_str(),
            last[0].action.as_str(),
            last[0].refused
        ),
        ("cluster/east", "list-events", true)
    );
}

#[tokio::test]
async fn a_registration_says_when_the_clusters_certificate_expires() {
    use x509_parser::prelude::{FromDer, X509Certificate, parse_x509_pem};
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let (_, spki) = new_client_key().unwrap();
    let resp = b
        .anonymous()
        .await
        .join(join_request(
            &t,
            "east",
            "10.1.0.0/16",
            "10.101.0.0/16",
            spki,
        ))
        .await
        .unwrap()
        .into_inner();
    let (_, pem) = parse_x509_pem(resp.certificate_pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
    let not_after_ms = cert.validity().not_after.timestamp() * 1000;
    let mut admin = b.admin().await;
    let clusters = list(&mut admin, Kind::Clusters).await;
    let [Record::Cluster(reg)] = &clusters[..] else {
        panic!("{clusters:?}")
    };
    assert!(
        (reg.certificate_expires_at_unix_ms - not_after_ms).abs() < 2_000,
        "registration says {}, the certificate {not_after_ms}",
        reg.certificate_expires_at_unix_ms
    );
}

impl TestBroker {
    /// Joins a cluster and returns its credentials (as `clusterlink join` writes them).
    async fn join_credentials(
        &self,
        token: &str,
        id: &str,
        pods: &str,
        svcs: &str,
    ) -> clusterlink_broker_client::Credentials {
        let (key, spki) = new_client_key().unwrap();
        let resp = self
            .anonymous()
            .await
            .join(join_request(token, id, pods, svcs, spki))
            .await
            .unwrap()
            .into_inner();
        clusterlink_broker_client::Credentials::new(
            self.address.clone(),
            resp.ca_certificate_pem,
            clusterlink_broker_client::Identity::Cluster(id.parse().unwrap()),
            resp.certificate_pem,
            key,
        )
    }
}

async fn who_am_i(
    creds: &clusterlink_broker_client::Credentials,
) -> Result<proto::WhoAmIResponse, tonic::Status> {
    let mut c = clusterlink_broker_client::connect_with(creds)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    c.who_am_i(proto::WhoAmIRequest {})
        .await
        .map(|r| r.into_inner())
}

fn serial_of(pem: &str) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate, parse_x509_pem};
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
    hex::encode(cert.raw_serial())
}

#[tokio::test]
async fn a_renewed_certificate_works_for_its_grace_then_never_again() {
    let grace = Duration::from_secs(600);
    let (b, _) = TestBroker::embedded_with(ServeOptions {
        certificates: clusterlink_broker::service::CertificatePolicy {
            renewal_grace: grace,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let t = b.token(false).await;
    let old = b
        .join_credentials(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await;
    assert_eq!(who_am_i(&old).await.unwrap().renew_reason, "");
    // A watch held open with the old certificate across the renewal.
    let mut old_client = clusterlink_broker_client::connect_with(&old).await.unwrap();
    let mut stream = watch_from(&mut old_client, Kind::Services, 0).await;

    let new = clusterlink_broker_client::renew::renew(&old).await.unwrap();
    assert_ne!(serial_of(&new.certificate), serial_of(&old.certificate));
    assert_ne!(
        new.private_key, old.private_key,
        "a renewal makes a new key"
    );
    assert_eq!(who_am_i(&new).await.unwrap().identity, "cluster/east");
    let mut admin = b.admin().await;
    let clusters = list(&mut admin, Kind::Clusters).await;
    let [Record::Cluster(reg)] = &clusters[..] else {
        panic!("{clusters:?}")
    };
    assert_eq!(reg.certificate_serial, serial_of(&new.certificate));
    assert_eq!(reg.retiring.len(), 1);
    assert_eq!(reg.retiring[0].serial, serial_of(&old.certificate));

    // During the grace the old certificate still works, and is told to move on.
    b.clock.advance(grace - Duration::from_secs(1));
    let during = who_am_i(&old).await.unwrap();
    assert!(
        during.renew_reason.contains("renewed already"),
        "{during:?}"
    );
    let mut c = clusterlink_broker_client::connect_with(&new).await.unwrap();
    c.publish(publish(service("east", "demo", "echo")))
        .await
        .unwrap();
    watch_events(&mut stream, 1).await;

    // After it, the old certificate is refused, and its open watch ends.
    b.clock.advance(Duration::from_secs(2));
    let refused = who_am_i(&old).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("grace"), "{}", refused.message());
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the watch made with the old certificate must end");
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    // Nor can it renew again; the new one can.
    assert!(clusterlink_broker_client::renew::renew(&old).await.is_err());
    assert!(clusterlink_broker_client::renew::renew(&new).await.is_ok());
}

#[tokio::test]
async fn a_certificate_near_its_expiry_is_renewed_and_saved_without_a_restart() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let creds = b
        .join_credentials(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("east.yaml");
    creds.write(&path).unwrap();
    // The component's clock: the real time, but 300 days on (of the certificate's 365) for
    // the one check after `due` is set.
    let due = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = due.clone();
    let mut live = clusterlink_broker_client::keep(
        path.clone(),
        creds.clone(),
        clusterlink_broker_client::KeepOptions {
            check_every: Duration::from_millis(50),
            now: Arc::new(move || {
                let days = if once.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    300
                } else {
                    0
                };
                SystemTime::now() + Duration::from_secs(days * 24 * 3600)
            }),
            ..Default::default()
        },
    );
    let mut view = clusterlink_broker_client::follow(live.clone(), &[Kind::Services]);
    let first = live.current();
    // Far from expiry: several checks, nothing renewed.
    for _ in 0..5 {
        assert!(
            tokio::time::timeout(Duration::from_millis(120), live.changed())
                .await
                .is_err(),
            "nothing to renew yet"
        );
    }
    assert_eq!(live.current().certificate, first.certificate);
    // 300 of 365 days later: renewed, saved, and used (once: the new one is not due).
    due.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), live.changed())
        .await
        .expect("renewed");
    let renewed = live.current();
    assert_ne!(renewed.certificate, first.certificate);
    let saved = clusterlink_broker_client::Credentials::read(&path).unwrap();
    assert_eq!(saved, *renewed, "the file holds what is used");
    assert_eq!(who_am_i(&renewed).await.unwrap().identity, "cluster/east");
    // The follower reconnected with the new certificate and still sees changes.
    let mut c = clusterlink_broker_client::connect_with(&renewed)
        .await
        .unwrap();
    c.publish(publish(service("east", "demo", "echo")))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if view
                .borrow_and_update()
                .as_ref()
                .is_some_and(|s| s.services.len() == 1)
            {
                return;
            }
            view.changed().await.unwrap();
        }
    })
    .await
    .expect("the follower sees the record published after the renewal");
}

#[tokio::test]
async fn a_ca_rotation_moves_every_live_client_over_and_then_retires_the_old_ca() {
    let (b, _) = TestBroker::embedded().await;
    let t = b.token(false).await;
    let east = b
        .join_credentials(&t, "east", "10.1.0.0/16", "10.101.0.0/16")
        .await;
    // west never renews (its components are down during the rotation).
    let west = b
        .join_credentials(&t, "west", "10.2.0.0/16", "10.102.0.0/16")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("east.yaml");
    east.write(&path).unwrap();
    let mut live = clusterlink_broker_client::keep(
        path.clone(),
        east.clone(),
        clusterlink_broker_client::KeepOptions {
            check_every: Duration::from_millis(50),
            ..Default::default()
        },
    );
    let mut view = clusterlink_broker_client::follow(live.clone(), &[Kind::Services]);
    let mut west_client = clusterlink_broker_client::connect_with(&west)
        .await
        .unwrap();
    let sees = |view: &mut tokio::sync::watch::Receiver<Option<clusterlink_api::ClusterSet>>,
                n: usize| {
        let mut view = view.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if view
                        .borrow_and_update()
                        .as_ref()
                        .is_some_and(|s| s.services.len() == n)
                    {
                        return;
                    }
                    view.changed().await.unwrap();
                }
            })
            .await
            .unwrap_or_else(|_| panic!("east's follower should see {n} services"))
        }
    };
    live.current();

    // Start: a new CA signs; the old one stays trusted; the server keeps its certificate.
    let old = b.tls.clone();
    let new_ca = new_ca(SystemTime::now()).unwrap();
    b.tls_tx.send_replace(BrokerTls {
        ca: new_ca.clone(),
        server: old.server.clone(),
        retiring_ca: Some(old.ca.cert_pem.clone()),
    });
    // east's keeper is told, renews onto the new CA, and trusts both.
    tokio::time::timeout(Duration::from_secs(10), live.changed())
        .await
        .expect("east renews onto the new CA");
    let renewed = live.current();
    let issuer = |pem: &str| {
        use x509_parser::prelude::{FromDer, X509Certificate, parse_x509_pem};
        let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
        cert.issuer().to_string()
    };
    let ca_name = |pem: &str| {
        use x509_parser::prelude::{FromDer, X509Certificate, parse_x509_pem};
        let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
        cert.subject().to_string()
    };
    assert_eq!(issuer(&renewed.certificate), ca_name(&new_ca.cert_pem));
    assert!(renewed.ca_certificate.contains(new_ca.cert_pem.trim()));
    assert!(renewed.ca_certificate.contains(old.ca.cert_pem.trim()));
    // west, on the old CA, still works during the overlap, and is told to renew.
    let w = who_am_i(&west).await.unwrap();
    assert!(w.renew_reason.contains("retired"), "{w:?}");
    west_client
        .publish(publish(service("west", "demo", "one")))
        .await
        .unwrap();
    sees(&mut view, 1).await;

    // Finish: the server presents a certificate of the new CA; the old CA is not trusted.
    let new_server = Ca::load(&new_ca)
        .unwrap()
        .server_cert(SystemTime::now(), &["127.0.0.1".into()])
        .unwrap();
    b.tls_tx.send_replace(BrokerTls {
        ca: new_ca.clone(),
        server: new_server,
        retiring_ca: None,
    });
    // east's keeper drops the old CA from what it trusts.
    tokio::time::timeout(Duration::from_secs(10), live.changed())
        .await
        .expect("east follows the CA bundle");
    let after = live.current();
    assert!(!after.ca_certificate.contains(old.ca.cert_pem.trim()));
    assert_eq!(after.certificate, renewed.certificate);
    // east still publishes and follows, over new connections.
    let mut east_client = clusterlink_broker_client::connect_with(&after)
        .await
        .unwrap();
    east_client
        .publish(publish(service("east", "demo", "two")))
        .await
        .unwrap();
    sees(&mut view, 2).await;
    // west's open connection (made before the retirement) is refused from now on, and so is
    // a new one (its certificate's CA is not trusted, nor does it trust the new server).
    let refused = west_client
        .publish(publish(service("west", "demo", "three")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("no longer trusts"),
        "{}",
        refused.message()
    );
    assert!(who_am_i(&west).await.is_err());
}
