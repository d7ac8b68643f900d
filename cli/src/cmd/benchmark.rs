//! `clusterlink benchmark broker`: watch fan-out on one machine.
//!
//! For each store backend, in one run: a real `clusterlink broker run` process (so its memory
//! and CPU are its own), N clusters joined and each watching services over its own mTLS
//! connection, and P publishing clusters writing U service updates between them. For each
//! update, the time from the start of its publish to its arrival at the last of the N
//! watchers is its publish-to-every-watcher latency.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use clusterlink_api::{Kind, proto};
use clusterlink_broker::pki::new_client_key;
use clusterlink_broker_client::{BrokerInfo, Credentials, connect, connect_with};
use clusterlink_testkit::EtcdServer;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::output::{Format, Tabular, print, render};

#[derive(Subcommand)]
pub enum BenchmarkCommand {
    /// Broker watch fan-out: many clusters watching, many updates.
    Broker(BrokerBenchArgs),
    /// Tunnel throughput and RTT: veth, clusterlink, wireguard-go, boringtun-cli (root).
    Tunnel(super::bench_tunnel::TunnelBenchArgs),
    /// Route agent: programming N remote CIDRs and a one-route change; pod-to-pod next to
    /// gateway-to-gateway throughput across two lab clusters (root).
    Routes(super::bench_routes::RoutesBenchArgs),
    /// DNS: our plugin next to Knot DNS with dnsperf; export-to-resolvable and
    /// unready-to-withdrawn times across lab clusters (root).
    Dns(super::bench_dns::DnsBenchArgs),
    /// Gateway failover: how long pod-to-pod traffic stops when the active gateway dies
    /// (root).
    Failover(super::bench_failover::FailoverBenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Embedded,
    Etcd,
}

#[derive(Args)]
pub struct BrokerBenchArgs {
    /// Clusters that join and watch.
    #[arg(long, default_value_t = 1000)]
    pub clusters: usize,
    /// Service updates published in all.
    #[arg(long, default_value_t = 10_000)]
    pub updates: usize,
    /// Clusters publishing at once (each its own records).
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
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
    pub clusters: usize,
    pub updates: usize,
    pub publishers: usize,
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

pub async fn run(c: BenchmarkCommand) -> Result<()> {
    match c {
        BenchmarkCommand::Broker(a) => broker(a).await,
        BenchmarkCommand::Tunnel(a) => {
            tokio::task::spawn_blocking(move || super::bench_tunnel::run_tunnel_bench(a)).await?
        }
        BenchmarkCommand::Dns(a) => {
            tokio::task::spawn_blocking(move || super::bench_dns::run_dns_bench(a)).await?
        }
        BenchmarkCommand::Failover(a) => {
            tokio::task::spawn_blocking(move || super::bench_failover::run_failover_bench(a))
                .await?
        }
        BenchmarkCommand::Routes(a) => {
            tokio::task::spawn_blocking(move || super::bench_routes::run_routes_bench(a)).await?
        }
    }
}

async fn broker(a: BrokerBenchArgs) -> Result<()> {
    if a.publishers == 0 || a.publishers > a.clusters || a.updates == 0 {
        bail!("need 1 <= --publishers <= --clusters and --updates >= 1");
    }
    let mut results = Vec::new();
    for backend in &a.stores {
        eprintln_progress(&format!(
            "benchmark: {backend:?} store, {} clusters, {} updates",
            a.clusters, a.updates
        ));
        results.push(
            run_one(*backend, &a)
                .await
                .with_context(|| format!("{backend:?} run failed"))?,
        );
    }
    print(&render(&results, a.output)?);
    Ok(())
}

#[allow(clippy::print_stderr)]
fn eprintln_progress(s: &str) {
    eprintln!("{s}");
}

/// A child process killed on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|l| l.contains(needle)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{needle:?} not in {} within {timeout:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

async fn run_one(backend: Backend, a: &BrokerBenchArgs) -> Result<BrokerBenchResult> {
    let tmp = tempfile::Builder::new()
        .prefix("clusterlink-bench-")
        .tempdir()?;
    let dir = tmp.path();
    let exe = std::env::current_exe().context("cannot find the clusterlink binary")?;
    let etcd = match backend {
        Backend::Etcd => Some(EtcdServer::start_durable()?),
        Backend::Embedded => None,
    };
    let store = etcd
        .as_ref()
        .map(|e| e.url())
        .unwrap_or_else(|| "embedded".into());
    let port = free_port()?;
    let out = Command::new(&exe)
        .args(["deploy-broker", "--data-dir"])
        .arg(dir.join("broker"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--store", &store])
        .output()?;
    if !out.status.success() {
        bail!("deploy-broker: {}", String::from_utf8_lossy(&out.stderr));
    }
    let log = dir.join("broker.log");
    let child = Command::new(&exe)
        .args([
            "--log",
            "warn,clusterlink_broker::server=info",
            "broker",
            "run",
            "--data-dir",
        ])
        .arg(dir.join("broker"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let broker = Proc(child);
    let pid = broker.0.id();
    wait_for_log(&log, "broker serving", Duration::from_secs(20)).await?;
    let info = BrokerInfo::read(
        &dir.join("broker/broker-info.yaml"),
        std::time::SystemTime::now(),
    )?;

    // Join every cluster, a few at a time (joins serialize on the registry).
    let join_start = Instant::now();
    let creds: Arc<Mutex<Vec<Credentials>>> = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut joiners = Vec::new();
    for _ in 0..4 {
        let (info, creds, next, n) = (info.clone(), creds.clone(), next.clone(), a.clusters);
        joiners.push(tokio::spawn(async move {
            let mut client = connect(&info.address, &info.ca_certificate, None).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let (key, spki) = new_client_key()?;
                let id = format!("c{i}");
                let resp = client
                    .join(proto::JoinRequest {
                        token: info.token.clone(),
                        cluster: Some(proto::Cluster {
                            id: id.clone(),
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
                    clusterlink_broker_client::Identity::Cluster(id.parse()?),
                    resp.certificate_pem,
                    key,
                ));
            }
        }));
    }
    for j in joiners {
        j.await??;
    }
    let join_seconds = join_start.elapsed().as_secs_f64();
    let creds = Arc::try_unwrap(creds)
        .map_err(|_| anyhow!("joiners still running"))?
        .into_inner();

    // Every cluster watches services from the current revision, on its own connection.
    let mut first = connect_with(&creds[0]).await?;
    let base = first
        .list(proto::ListRequest {
            kind: Kind::Services.to_proto() as i32,
        })
        .await?
        .into_inner()
        .revision;
    let t0 = Instant::now();
    // Per update (by revision offset): how many watchers have it, and the latest arrival.
    let span = a.updates + 64;
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..span).map(|_| AtomicUsize::new(0)).collect());
    let last_arrival: Arc<Vec<AtomicU64>> =
        Arc::new((0..span).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for c in &creds {
        let mut client = connect_with(c).await?;
        let mut stream = client
            .watch(proto::WatchRequest {
                kind: Kind::Services.to_proto() as i32,
                from_revision: base,
            })
            .await?
            .into_inner();
        ready.fetch_add(1, Ordering::Relaxed);
        let (counts, last_arrival, done, updates) = (
            counts.clone(),
            last_arrival.clone(),
            done.clone(),
            a.updates,
        );
        watchers.push(tokio::spawn(async move {
            let _client = client;
            let mut seen = 0usize;
            while let Some(msg) = stream.next().await {
                let msg = msg.map_err(|s| anyhow!("watch: {}", s.message()))?;
                if msg.relist_required {
                    bail!("watch asked to relist");
                }
                let now = t0.elapsed().as_nanos() as u64;
                for ev in msg.events {
                    let off = (ev.revision - base) as usize;
                    if let (Some(cnt), Some(at)) = (counts.get(off), last_arrival.get(off)) {
                        cnt.fetch_add(1, Ordering::Relaxed);
                        at.fetch_max(now, Ordering::Relaxed);
                    }
                    seen += 1;
                }
                if seen >= updates {
                    done.fetch_add(1, Ordering::Relaxed);
                    return anyhow::Ok(());
                }
            }
            bail!("watch ended early after {seen} events")
        }));
    }

    // Publishers: each writes its own services, rotating over 10 names.
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..span).map(|_| AtomicU64::new(0)).collect());
    let issued = Arc::new(AtomicUsize::new(0));
    let pub_start = Instant::now();
    let mut publishers = Vec::new();
    for c in creds.iter().take(a.publishers) {
        let mut client = connect_with(c).await?;
        let (issued, started, updates, cluster) = (
            issued.clone(),
            started.clone(),
            a.updates,
            c.identity.clone(),
        );
        publishers.push(tokio::spawn(async move {
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= updates {
                    return anyhow::Ok(());
                }
                let sent = t0.elapsed().as_nanos() as u64;
                let rev = client
                    .publish(proto::PublishRequest {
                        record: Some(proto::Record {
                            kind: Some(proto::record::Kind::Service(proto::ServiceRecord {
                                cluster: cluster.to_string(),
                                namespace: "bench".into(),
                                name: format!("svc-{}", i % 10),
                                r#type: proto::ServiceType::ClusterSetIp as i32,
                                ports: vec![proto::ServicePort {
                                    name: "http".into(),
                                    protocol: "TCP".into(),
                                    port: 80,
                                    app_protocol: String::new(),
                                }],
                                ips: vec!["10.255.0.1".into()],
                                endpoints: vec![],
                                ready: true,
                                exported_at_unix_ms: i as i64,
                            })),
                        }),
                        lease_id: 0,
                        expected_revision: 0,
                        create_only: false,
                    })
                    .await
                    .map_err(|s| anyhow!("publish: {}", s.message()))?
                    .into_inner()
                    .revision;
                if let Some(slot) = started.get((rev - base) as usize) {
                    slot.store(sent, Ordering::Relaxed);
                }
            }
        }));
    }
    for p in publishers {
        p.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.load(Ordering::Relaxed) < creds.len() {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} watchers got every update within 10 minutes",
                done.load(Ordering::Relaxed),
                creds.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = pub_start.elapsed().as_secs_f64();
    for w in watchers {
        w.await??;
    }
    let mut latencies: Vec<u64> = (0..span)
        .filter(|&o| {
            counts[o].load(Ordering::Relaxed) == creds.len()
                && started[o].load(Ordering::Relaxed) > 0
        })
        .map(|o| {
            last_arrival[o]
                .load(Ordering::Relaxed)
                .saturating_sub(started[o].load(Ordering::Relaxed))
        })
        .collect();
    if latencies.len() != a.updates {
        bail!(
            "{} of {} updates reached every watcher",
            latencies.len(),
            a.updates
        );
    }
    latencies.sort_unstable();
    let result = BrokerBenchResult {
        store: backend,
        clusters: a.clusters,
        updates: a.updates,
        publishers: a.publishers,
        join_seconds,
        updates_per_second: a.updates as f64 / elapsed,
        deliveries_per_second: (a.updates * creds.len()) as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: percentile(&latencies, 1.0),
        broker_peak_rss_mib: status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0,
        broker_cpu_seconds: cpu_seconds(pid).unwrap_or(0.0),
        etcd_peak_rss_mib: etcd
            .as_ref()
            .and_then(|e| status_kib(e.pid(), "VmHWM:"))
            .map(|k| k as f64 / 1024.0),
    };
    drop(broker);
    drop(etcd);
    Ok(result)
}

/// The i-th /20 inside 10.0.0.0/8.
fn cidr20(i: usize) -> String {
    let base = (10u32 << 24) + ((i as u32) << 12);
    let ip = std::net::Ipv4Addr::from(base);
    format!("{ip}/20")
}
