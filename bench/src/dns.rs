//! `clusterlink-bench dns`: the DNS plugin next to Knot DNS, and service discovery's
//! reaction times in a lab.
//!
//! 1. dnsperf against our server (`clusterlink-bench serve-dns`: the DNS plugin's handler,
//!    the one `clusterlink dns run` serves with, over N exported services and no broker) and against Knot DNS (Debian's knotd)
//!    serving a zone file with the same N names, one after the other, each in a namespace of
//!    its own on loopback: queries/s and average latency.
//! 2. In a three-cluster lab: export a new service in one cluster and time until a pod in
//!    another resolves it; make its endpoint unready and time until it is withdrawn from
//!    the answers.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use clusterlink_lab::lab::resolve;
use clusterlink_lab::{ClusterSpec, Lab, Netns, Testbed, wait_until};
use serde::Serialize;

use clusterlink_cli::output::{Format, Tabular, print, render};

use crate::progress;
use crate::stats::{max, median};

#[derive(Args)]
pub struct DnsBenchArgs {
    /// Names in the zone (and in the query file).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub names: u32,
    /// Seconds of dnsperf per server.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// dnsperf clients (concurrent queries in flight are many more).
    #[arg(long, default_value_t = 10)]
    pub clients: u32,
    /// Export/unready rounds in the lab (0: skip the lab part).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerResult {
    pub server: String,
    pub queries_per_s: f64,
    pub avg_latency_ms: f64,
    pub lost: u64,
    pub vs_knot: Option<f64>,
}

impl Tabular for ServerResult {
    fn header() -> Vec<&'static str> {
        vec!["SERVER", "queries/s", "avg latency ms", "lost", "x knot"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.server.clone(),
            format!("{:.0}", self.queries_per_s),
            format!("{:.3}", self.avg_latency_ms),
            self.lost.to_string(),
            self.vs_knot
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
        ]
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timing {
    pub what: String,
    pub rounds: usize,
    pub median_ms: f64,
    pub max_ms: f64,
}

impl Tabular for Timing {
    fn header() -> Vec<&'static str> {
        vec!["WHAT", "ROUNDS", "median ms", "max ms"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.what.clone(),
            self.rounds.to_string(),
            format!("{:.0}", self.median_ms),
            format!("{:.0}", self.max_ms),
        ]
    }
}

pub fn run(a: DnsBenchArgs, bin: &Path) -> Result<()> {
    let servers = servers(&a)?;
    let timings = if a.rounds > 0 {
        discovery(bin, a.rounds as usize)?
    } else {
        Vec::new()
    };
    match a.output {
        Format::Table => {
            print(&format!(
                "DNS servers, {} names, dnsperf {} s with {} clients each:\n",
                a.names, a.seconds, a.clients
            ));
            print(&render(&servers, a.output)?);
            if !timings.is_empty() {
                print("\nService discovery across clusters (lab, 3 clusters):\n");
                print(&render(&timings, a.output)?);
            }
        }
        // One document on stdout, nothing else.
        Format::Json | Format::Yaml => {
            #[derive(Serialize)]
            struct Report<'a> {
                servers: &'a [ServerResult],
                discovery: &'a [Timing],
            }
            let report = Report {
                servers: &servers,
                discovery: &timings,
            };
            print(&clusterlink_cli::output::serialize(&report, a.output)?);
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ServeArgs {
    /// Synthetic ClusterSetIP services `svcI.demo` of the local cluster, at 10.100.x.y.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub names: u32,
    #[arg(long, default_value = "127.0.0.1:53")]
    pub listen: std::net::SocketAddr,
}

/// The DNS plugin's answer path (`clusterlink_dns::server`, as `dns run` serves it) over N
/// synthetic services, until SIGINT or SIGTERM.
pub fn serve(a: ServeArgs) -> Result<()> {
    let config = clusterlink_dns::server::DnsConfig {
        listen: a.listen,
        zone: "clusterset.local".into(),
        ttl: 5,
        policy: clusterlink_dns::answer::Policy::RoundRobin,
        ns_addresses: vec![a.listen.ip()],
        controllers: None,
        record_lease: clusterlink_dns::controller::DEFAULT_RECORD_LEASE,
        ready: Default::default(),
        leader: None,
    };
    let view = synthetic(a.names)?;
    tokio::runtime::Runtime::new()
        .context("Cannot start the async runtime")?
        .block_on(clusterlink_dns::server::serve_fixed(
            config,
            view,
            clusterlink_cli::shutdown_signal(),
        ))
        .context("DNS server failed")
}

/// N ClusterSetIP services `svcI.demo` of the local cluster `a`, at 10.100.x.y.
fn synthetic(names: u32) -> Result<clusterlink_dns::answer::View> {
    let mut view = clusterlink_dns::answer::View {
        local: Some("a".parse()?),
        ..Default::default()
    };
    for i in 0..names {
        let [_, _, hi, lo] = i.to_be_bytes();
        view.insert(clusterlink_api::ServiceRecord {
            cluster: "a".parse()?,
            namespace: "demo".parse()?,
            name: format!("svc{i}").parse()?,
            service_type: clusterlink_api::ServiceType::ClusterSetIP,
            ports: Vec::new(),
            ips: vec![std::net::Ipv4Addr::new(10, 100, hi, lo).into()],
            endpoints: Vec::new(),
            ready: true,
            exported_at_unix_ms: 0,
        });
    }
    Ok(view)
}

fn dnsperf(ns: &Netns, port: u16, queries: &Path, a: &DnsBenchArgs) -> Result<(f64, f64, u64)> {
    let out = ns.exec(
        "dnsperf",
        &[
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
            &queries.display().to_string(),
            "-l",
            &a.seconds.to_string(),
            "-c",
            &a.clients.to_string(),
            "-T",
            "1",
            "-t",
            "2",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |label: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
    };
    let qps: f64 = field("Queries per second")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("cannot read dnsperf's queries/s from:\n{text}"))?;
    let latency: f64 = field("Average Latency (s)")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("cannot read dnsperf's latency from:\n{text}"))?;
    let lost: u64 = field("Queries lost")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((qps, latency * 1000.0, lost))
}

fn servers(a: &DnsBenchArgs) -> Result<Vec<ServerResult>> {
    let bed = Testbed::new().context("the benchmark needs root")?;
    let dir = bed.log_dir.clone();
    let queries = dir.join("queries.txt");
    let zone_file = dir.join("clusterset.local.zone");
    let mut q = String::new();
    let mut z = String::from(
        "$ORIGIN clusterset.local.\n$TTL 5\n@ SOA ns hostmaster 1 7200 1800 86400 5\n@ NS ns\nns A 127.0.0.1\n",
    );
    for i in 0..a.names {
        q.push_str(&format!("svc{i}.demo.svc.clusterset.local A\n"));
        z.push_str(&format!(
            "svc{i}.demo.svc A 10.100.{}.{}\n",
            (i >> 8) & 0xff,
            i & 0xff
        ));
    }
    std::fs::write(&queries, q)?;
    std::fs::write(&zone_file, z)?;
    // Our server is this binary's `serve-dns`: the DNS plugin's handler, linked here.
    let bench = std::env::current_exe()?.display().to_string();
    let mut out = Vec::new();

    progress("our DNS plugin");
    let ours = bed.namespace("dns-ours")?;
    let pid = bed.spawn(
        &ours,
        "dns-ours",
        &bench,
        &[
            "--log",
            "warn",
            "serve-dns",
            "--names",
            &a.names.to_string(),
            "--listen",
            "127.0.0.1:53",
        ],
    )?;
    out.push(measure(&bed, &ours, pid, "clusterlink dns", &queries, a)?);

    progress("Knot DNS");
    let knot = bed.namespace("dns-knot")?;
    let conf = dir.join("knot.conf");
    std::fs::create_dir_all(dir.join("knot"))?;
    std::fs::write(
        &conf,
        format!(
            "server:\n  listen: 127.0.0.1@53\n  rundir: {run}\n  user: root:root\n\
             database:\n  storage: {run}\n\
             log:\n  - target: stderr\n    any: warning\n\
             template:\n  - id: default\n    storage: {run}\n    semantic-checks: off\n\
             zone:\n  - domain: clusterset.local\n    file: {zone}\n",
            run = dir.join("knot").display(),
            zone = zone_file.display()
        ),
    )?;
    let pid = bed.spawn(
        &knot,
        "knotd",
        "knotd",
        &["-c", &conf.display().to_string()],
    )?;
    out.push(measure(&bed, &knot, pid, "Knot DNS (knotd)", &queries, a)?);
    let knot_qps = out[1].queries_per_s;
    for r in &mut out {
        r.vs_knot = (knot_qps > 0.0).then(|| r.queries_per_s / knot_qps);
    }
    Ok(out)
}

/// Waits until the server in `ns` answers, runs dnsperf against it, and stops it.
fn measure(
    bed: &Testbed,
    ns: &Netns,
    pid: u32,
    server: &str,
    queries: &Path,
    a: &DnsBenchArgs,
) -> Result<ServerResult> {
    wait_until(server, Duration::from_secs(20), || {
        ns.exec(
            "dig",
            &[
                "@127.0.0.1",
                "+short",
                "+time=1",
                "svc0.demo.svc.clusterset.local",
            ],
        )
        .is_ok_and(|o| !o.stdout.is_empty())
    })?;
    let measured = dnsperf(ns, 53, queries, a);
    bed.kill(pid);
    let (qps, ms, lost) = measured?;
    Ok(ServerResult {
        server: server.into(),
        queries_per_s: qps,
        avg_latency_ms: ms,
        lost,
        vs_knot: None,
    })
}

fn discovery(bin: &Path, rounds: usize) -> Result<Vec<Timing>> {
    let specs = ClusterSpec::many(&["a", "b", "c"], 1, &[]);
    progress("a three-cluster lab");
    let lab = Lab::up(bin, &specs, &|s| progress(s))?;
    lab.wait_connected(Duration::from_secs(60))?;
    lab.wait_services(Duration::from_secs(30))?;
    let from = lab.worker(0).pod.ns();
    let b = &lab.state.clusters[1];
    let b_pod = lab.worker(1).pod.address;
    let (mut exported, mut withdrawn) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let name = format!("timing{round}");
        let fqdn = format!("{name}.demo.svc.clusterset.local");
        let manifest = |ready: bool| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
                 spec:\n  clusterIP: None\n  ports: [{{name: tcp, port: 7, protocol: TCP}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nendpoints:\n- addresses: [\"{b_pod}\"]\n  conditions: {{ready: {ready}}}\n"
            )
        };
        std::fs::write(b.manifests.join(format!("{name}.yaml")), manifest(true))?;
        let t = Instant::now();
        std::fs::write(
            b.manifests.join(format!("serviceexport.demo.{name}.yaml")),
            format!(
                "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: demo}}\n"
            ),
        )?;
        wait_until("the export to resolve", Duration::from_secs(10), || {
            !resolve(&from, &fqdn).is_empty()
        })?;
        exported.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        std::fs::write(b.manifests.join(format!("{name}.yaml")), manifest(false))?;
        wait_until(
            "the unready endpoint to go",
            Duration::from_secs(10),
            || resolve(&from, &fqdn).is_empty(),
        )?;
        withdrawn.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(vec![
        Timing {
            what: "export (ServiceExport written) to resolvable from another cluster".into(),
            rounds,
            max_ms: max(&exported),
            median_ms: median(exported).unwrap_or(0.0),
        },
        Timing {
            what: "endpoint unready to withdrawn from another cluster's answers".into(),
            rounds,
            max_ms: max(&withdrawn),
            median_ms: median(withdrawn).unwrap_or(0.0),
        },
    ])
}
