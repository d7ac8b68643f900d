//! `clusterlink-bench broker`: watch fan-out on one machine.
//!
//! For each store backend, in one run: a real `clusterlink broker run` process (so its memory
//! and CPU are its own), N clusters joined and each watching services over its own mTLS
//! connection, and P publishing clusters writing U service updates between them. For each
//! update, the time from the start of its publish to its arrival at the last of the N
//! watchers is its publish-to-every-watcher latency.
//!
//! A run goes in phases: start the broker; join the clusters; open every watch; publish;
//! wait until every watcher has every update; read the latencies and the processes' figures.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Args, ValueEnum};
use clusterlink_api::{ClusterId, Kind, proto};
use clusterlink_broker::pki::new_client_key;
use clusterlink_broker_client::{BrokerInfo, Credentials, Identity, connect, connect_with};
use clusterlink_cli::output::{Format, Tabular, print, render};
use clusterlink_testkit::{EtcdServer, PortLease, ProcessGuard, wait_for};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::probe::{cpu_seconds, status_kib};
use crate::progress;
use crate::stats::percentile;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Embedded,
    Etcd,
}

#[derive(Args)]
pub struct BrokerBenchArgs {
    /// Clusters that join and watch (each gets a /20 of 10.0.0.0/8 for pods and one for
    /// services, so at most 2,048).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=2048))]
    pub clusters: u64,
    /// Service updates published in all.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub updates: u64,
    /// Clusters publishing at once (each its own records); at most --clusters.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=2048))]
    pub publishers: u64,
    /// Backends to run, side by side.
    #[arg(long, value_delimiter = ',', default_value = "embedded,etcd")]
    pub stores: Vec<Backend>,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerBenchResult {
    pub store: Backend,
    pub clusters: u64,
    pub updates: u64,
    pub publishers: u64,
    pub join_seconds: f64,
    pub updates_per_second: f64,
    pub deliveries_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub broker_peak_rss_mib: f64,
    pub broker_cpu_seconds: f64,
    pub etcd_peak_rss_mib: Option<f64>,
}

impl Tabular for BrokerBenchResult {
    fn header() -> Vec<&'static str> {
        vec![
            "STORE",
            "CLUSTERS",
            "UPDATES",
            "PUBLISHERS",
            "JOIN s",
            "UPDATES/s",
            "DELIVERIES/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "BROKER RSS MiB",
            "BROKER CPU s",
            "ETCD RSS MiB",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            format!("{:?}", self.store).to_lowercase(),
            self.clusters.to_string(),
            self.updates.to_string(),
            self.publishers.to_string(),
            format!("{:.1}", self.join_seconds),
            format!("{:.0}", self.updates_per_second),
            format!("{:.0}", self.deliveries_per_second),
            format!("{:.1}", self.p50_ms),
            format!("{:.1}", self.p99_ms),
            format!("{:.1}", self.max_ms),
            format!("{:.0}", self.broker_peak_rss_mib),
            format!("{:.1}", self.broker_cpu_seconds),
            self.etcd_peak_rss_mib
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "-".into()),
        ]
    }
}

pub fn run(a: BrokerBenchArgs, bin: &Path) -> Result<()> {
    ensure!(
        a.publishers <= a.clusters,
        "--publishers ({}) must not exceed --clusters ({}): each publisher is a joined cluster",
        a.publishers,
        a.clusters
    );
    let runtime = tokio::runtime::Runtime::new().context("Cannot start the async runtime")?;
    let mut results = Vec::new();
    for backend in &a.stores {
        progress(&format!(
            "{backend:?} store, {} clusters, {} updates",
            a.clusters, a.updates
        ));
        results.push(
            runtime
                .block_on(run_one(*backend, &a, bin))
                .with_context(|| format!("{backend:?} run failed"))?,
        );
    }
    print(&render(&results, a.output)?);
    Ok(())
}

/// A broker process in a temporary data directory, killed when dropped.
struct RunningBroker {
    // Drop order: the process before its port and directory.
    process: ProcessGuard,
    _port: PortLease,
    info: BrokerInfo,
    _dir: tempfile::TempDir,
}

async fn start_broker(bin: &Path, store: &str) -> Result<RunningBroker> {
    let dir = tempfile::Builder::new()
        .prefix("clusterlink-bench-")
        .tempdir()?;
    let data: PathBuf = dir.path().join("broker");
    let port = PortLease::new()?;
    let out = Command::new(bin)
        .args(["deploy-broker", "--data-dir"])
        .arg(&data)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", port.port()),
            "--store",
            store,
        ])
        .output()?;
    if !out.status.success() {
        bail!("deploy-broker: {}", String::from_utf8_lossy(&out.stderr));
    }
    let log = dir.path().join("broker.log");
    let child = Command::new(bin)
        .args([
            "--log",
            "warn,clusterlink_broker::server=info",
            "broker",
            "run",
            "--data-dir",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let process = ProcessGuard::new(child);
    wait_for("the broker to serve", Duration::from_secs(20), || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("broker serving"))
    })
    .await?;
    let info = BrokerInfo::read(&data.join("broker-info.yaml"), std::time::SystemTime::now())?;
    Ok(RunningBroker {
        process,
        _port: port,
        info,
        _dir: dir,
    })
}

/// Joins clusters `c0`…, four at a time (joins serialize on the registry).
async fn join_clusters(info: &BrokerInfo, n: u64) -> Result<Vec<Credentials>> {
    let creds: Arc<Mutex<Vec<Credentials>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let mut joiners = Vec::new();
    for _ in 0..4 {
        let (info, creds, next) = (info.clone(), creds.clone(), next.clone());
        joiners.push(tokio::spawn(async move {
            let mut client = connect(&info.address, &info.ca_certificate, None).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let (key, spki) = new_client_key()?;
                let id: ClusterId = format!("c{i}").parse()?;
                let resp = client
                    .join(proto::JoinRequest {
                        token: info.token.clone(),
                        cluster: Some(proto::Cluster {
                            id: id.to_string(),
                            // 10.0.0.0/8 split into /20s: pods, and services at +2048.
                            pod_cidrs: vec![cidr20(i)],
                            service_cidrs: vec![cidr20(i + 2048)],
                            labels: Default::default(),
                        }),
                        public_key_der: spki,
                    })
                    .await
                    .map_err(|s| anyhow!("join {id}: {}", s.message()))?
                    .into_inner();
                creds.lock().await.push(Credentials::new(
                    info.address.clone(),
                    resp.ca_certificate_pem,
                    Identity::Cluster(id),
                    resp.certificate_pem,
                    key,
                ));
            }
        }));
    }
    for j in joiners {
        j.await??;
    }
    Ok(std::mem::take(&mut *creds.lock().await))
}

/// Per update, by its revision's offset from the base: when its publish started, how many
/// watchers have it, and when the last of them got it (nanoseconds since `t0`).
struct Ledger {
    t0: Instant,
    base: u64,
    started: Vec<AtomicU64>,
    arrivals: Vec<AtomicUsize>,
    last_arrival: Vec<AtomicU64>,
}

impl Ledger {
    fn new(base: u64, updates: u64) -> Self {
        // Room for a few revisions that are not ours (lease or registry writes).
        let span = usize::try_from(updates).unwrap_or(usize::MAX) + 64;
        Self {
            t0: Instant::now(),
            base,
            started: (0..span).map(|_| AtomicU64::new(0)).collect(),
            arrivals: (0..span).map(|_| AtomicUsize::new(0)).collect(),
            last_arrival: (0..span).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn slot(&self, revision: u64) -> Option<usize> {
        usize::try_from(revision.checked_sub(self.base)?).ok()
    }

    /// Publish-to-every-watcher latencies in ms, sorted, of the updates all `watchers` got.
    fn latencies_ms(&self, watchers: usize) -> Vec<f64> {
        let mut v: Vec<f64> = (0..self.started.len())
            .filter(|&o| {
                self.arrivals[o].load(Ordering::Relaxed) == watchers
                    && self.started[o].load(Ordering::Relaxed) > 0
            })
            .map(|o| {
                let ns = self.last_arrival[o]
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.started[o].load(Ordering::Relaxed));
                Duration::from_nanos(ns).as_secs_f64() * 1000.0
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// Every cluster watches services from the ledger's base revision, on its own connection;
/// each task ends once it has seen `updates` events.
async fn start_watchers(
    creds: &[Credentials],
    ledger: &Arc<Ledger>,
    updates: u64,
) -> Result<Vec<JoinHandle<Result<()>>>> {
    let mut watchers = Vec::new();
    for c in creds {
        let mut client = connect_with(c).await?;
        let mut stream = client
            .watch(proto::WatchRequest {
                kind: Kind::Services.to_proto() as i32,
                from_revision: ledger.base,
            })
            .await?
            .into_inner();
        let ledger = ledger.clone();
        watchers.push(tokio::spawn(async move {
            let _client = client;
            let mut seen = 0u64;
            while let Some(msg) = stream.next().await {
                let msg = msg.map_err(|s| anyhow!("watch: {}", s.message()))?;
                if msg.relist_required {
                    bail!("watch asked to relist");
                }
                let now = ledger.now();
                for ev in msg.events {
                    if let Some(o) = ledger.slot(ev.revision)
                        && let (Some(n), Some(at)) =
                            (ledger.arrivals.get(o), ledger.last_arrival.get(o))
                    {
                        n.fetch_add(1, Ordering::Relaxed);
                        at.fetch_max(now, Ordering::Relaxed);
                    }
                    seen += 1;
                }
                if seen >= updates {
                    return Ok(());
                }
            }
            bail!("watch ended early after {seen} events")
        }));
    }
    Ok(watchers)
}

/// The first `publishers` clusters write `updates` service updates between them, each its
/// own records, rotating over 10 names.
async fn publish(
    creds: &[Credentials],
    publishers: u64,
    updates: u64,
    ledger: &Arc<Ledger>,
) -> Result<()> {
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in creds
        .iter()
        .take(usize::try_from(publishers).unwrap_or(usize::MAX))
    {
        let mut client = connect_with(c).await?;
        let cluster = c
            .cluster()
            .context("a publisher's credentials name no cluster")?
            .to_string();
        // Cluster ck's first service address: the broker takes only addresses a cluster owns.
        let index: u64 = cluster
            .strip_prefix('c')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("cluster {cluster} is not one the benchmark joined"))?;
        let ip = service_ip(index);
        let (issued, ledger) = (issued.clone(), ledger.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= updates {
                    return anyhow::Ok(());
                }
                let sent = ledger.now();
                let rev = client
                    .publish(proto::PublishRequest {
                        record: Some(service_update(&cluster, &ip, i)),
                        lease_id: 0,
                        expected_revision: 0,
                        create_only: false,
                    })
                    .await
                    .map_err(|s| anyhow!("publish: {}", s.message()))?
                    .into_inner()
                    .revision;
                if let Some(slot) = ledger.slot(rev).and_then(|o| ledger.started.get(o)) {
                    slot.store(sent, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn service_update(cluster: &str, ip: &str, i: u64) -> proto::Record {
    proto::Record {
        kind: Some(proto::record::Kind::Service(proto::ServiceRecord {
            cluster: cluster.to_owned(),
            namespace: "bench".into(),
            name: format!("svc-{}", i % 10),
            r#type: proto::ServiceType::ClusterSetIp as i32,
            ports: vec![proto::ServicePort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 80,
                app_protocol: String::new(),
            }],
            ips: vec![ip.to_owned()],
            endpoints: vec![],
            ready: true,
            exported_at_unix_ms: i64::try_from(i).unwrap_or(i64::MAX),
        })),
    }
}

async fn run_one(backend: Backend, a: &BrokerBenchArgs, bin: &Path) -> Result<BrokerBenchResult> {
    let etcd = match backend {
        Backend::Etcd => Some(EtcdServer::start_durable()?),
        Backend::Embedded => None,
    };
    let store = etcd
        .as_ref()
        .map(EtcdServer::url)
        .unwrap_or_else(|| "embedded".into());
    let broker = start_broker(bin, &store).await?;

    let join_start = Instant::now();
    let creds = join_clusters(&broker.info, a.clusters).await?;
    let join_seconds = join_start.elapsed().as_secs_f64();

    let base = connect_with(&creds[0])
        .await?
        .list(proto::ListRequest {
            kind: Kind::Services.to_proto() as i32,
        })
        .await?
        .into_inner()
        .revision;
    let ledger = Arc::new(Ledger::new(base, a.updates));
    let watchers = start_watchers(&creds, &ledger, a.updates).await?;

    let pub_start = Instant::now();
    publish(&creds, a.publishers, a.updates, &ledger).await?;
    let all_delivered = async {
        for w in watchers {
            w.await??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(600), all_delivered)
        .await
        .map_err(|_| anyhow!("not every watcher got every update within 10 minutes"))??;
    let elapsed = pub_start.elapsed().as_secs_f64();

    let latencies = ledger.latencies_ms(creds.len());
    let delivered = latencies.len() as u64;
    ensure!(
        delivered == a.updates,
        "{delivered} of {} updates reached every watcher",
        a.updates
    );
    let pid = broker.process.pid();
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(BrokerBenchResult {
        store: backend,
        clusters: a.clusters,
        updates: a.updates,
        publishers: a.publishers,
        join_seconds,
        updates_per_second: a.updates as f64 / elapsed,
        deliveries_per_second: (a.updates * creds.len() as u64) as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50).unwrap_or(0.0),
        p99_ms: percentile(&latencies, 0.99).unwrap_or(0.0),
        max_ms: percentile(&latencies, 1.0).unwrap_or(0.0),
        broker_peak_rss_mib: mib(status_kib(pid, "VmHWM:").unwrap_or(0)),
        broker_cpu_seconds: cpu_seconds(pid).unwrap_or(0.0),
        etcd_peak_rss_mib: etcd
            .as_ref()
            .and_then(|e| status_kib(e.pid(), "VmHWM:"))
            .map(mib),
    })
}

/// The first address of cluster `ci`'s service CIDR (`cidr20(i + 2048)`).
fn service_ip(i: u64) -> String {
    let base = (10u32 << 24) + (u32::try_from(i + 2048).unwrap_or(0) << 12);
    std::net::Ipv4Addr::from(base + 1).to_string()
}

/// The i-th /20 inside 10.0.0.0/8 (i < 4096).
fn cidr20(i: u64) -> String {
    let base = (10u32 << 24) + (u32::try_from(i).unwrap_or(0) << 12);
    format!("{}/20", std::net::Ipv4Addr::from(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_cidrs_are_distinct_slash_20s_of_10_slash_8() {
        assert_eq!(cidr20(0), "10.0.0.0/20");
        assert_eq!(cidr20(1), "10.0.16.0/20");
        assert_eq!(cidr20(2047 + 2048), "10.255.240.0/20");
        assert_eq!(service_ip(0), "10.128.0.1");
        assert_eq!(service_ip(2047), "10.255.240.1");
    }

    #[test]
    fn zero_clusters_is_refused_by_the_parser_not_a_panic() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: BrokerBenchArgs,
        }
        for bad in [
            ["--clusters", "0"],
            ["--updates", "0"],
            ["--publishers", "0"],
            ["--clusters", "2049"],
        ] {
            let e = T::try_parse_from(std::iter::once("x").chain(bad)).err();
            assert!(e.is_some(), "{bad:?} was accepted");
        }
        assert!(T::try_parse_from(["x", "--clusters", "5", "--publishers", "2"]).is_ok());
    }

    #[test]
    fn latencies_count_only_updates_every_watcher_got() {
        let l = Ledger::new(100, 3);
        let updates = [
            (1_000_000, 3_000_000, 2),
            (2_000_000, 7_000_000, 2),
            (1_000_000, 9_000_000, 1),
        ];
        for (o, (start, last, n)) in updates.into_iter().enumerate() {
            l.started[o].store(start, Ordering::Relaxed);
            l.last_arrival[o].store(last, Ordering::Relaxed);
            l.arrivals[o].store(n, Ordering::Relaxed);
        }
        // The third reached one of two watchers only.
        let v = l.latencies_ms(2);
        assert_eq!(v.len(), 2);
        assert_eq!(v, [2.0, 5.0]);
        assert_eq!(l.slot(103), Some(3));
        assert_eq!(l.slot(99), None);
    }
}
