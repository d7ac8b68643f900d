//! `clusterlink-bench routes`: the route agent's cost and the worker-to-gateway hop's.
//!
//! 1. Programming, in a namespace of its own: the route agent's core and rtnetlink applier
//!    install routes for N remote CIDRs (via its VXLAN overlay, as on a worker node), then
//!    apply a one-route change with N present (as the daemon does: against what it last
//!    applied), read everything back (a full resync), and remove it all. Next to it, the
//!    same N routes through `ip -batch` (iproute2), in the same namespace.
//! 2. Throughput and RTT in a two-cluster lab, in one run: gateway node to gateway node
//!    (the tunnel alone), and pod on a worker node to pod on a worker node (overlay, tunnel
//!    and the CNI hop on the far side).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use clusterlink_api::ClusterSet;
use clusterlink_api::{Cluster, GatewayEndpoint, GatewayRole};
use clusterlink_lab::{ClusterSpec, Lab, Testbed};
use clusterlink_route_agent::core::{self, NodeConfig, NodeFacts, Ownership, State};
use clusterlink_route_agent::kernel::Kernel;
use serde::Serialize;

use clusterlink_cli::output::{Format, Tabular, print, render};

use crate::probe::{iperf, rtt};
use crate::progress;

#[derive(Args)]
pub struct RoutesBenchArgs {
    /// Remote CIDRs to program (half pod, half service CIDRs of N/2 clusters).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    pub cidrs: u32,
    /// Seconds of iperf3 per path (0: skip the throughput part).
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub step: String,
    pub routes: usize,
    pub ms: f64,
}

impl Tabular for Step {
    fn header() -> Vec<&'static str> {
        vec!["STEP", "ROUTES", "ms"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.step.clone(),
            self.routes.to_string(),
            format!("{:.2}", self.ms),
        ]
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathThroughput {
    pub path: String,
    pub gbit_per_s: f64,
    pub rtt_avg_ms: f64,
}

impl Tabular for PathThroughput {
    fn header() -> Vec<&'static str> {
        vec!["PATH", "Gbit/s", "RTT avg ms"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.path.clone(),
            format!("{:.2}", self.gbit_per_s),
            format!("{:.3}", self.rtt_avg_ms),
        ]
    }
}

pub fn run(a: RoutesBenchArgs, bin: &Path) -> Result<()> {
    let bed = Testbed::new().context("the benchmark needs root")?;
    let steps = programming(&bed, a.cidrs as usize)?;
    drop(bed);
    let paths = if a.seconds > 0 {
        throughput(bin, a.seconds)?
    } else {
        Vec::new()
    };
    match a.output {
        Format::Table => {
            print("Programming (route agent core + rtnetlink, and iproute2 for reference):\n");
            print(&render(&steps, a.output)?);
            if !paths.is_empty() {
                print("\nThroughput (one TCP stream) and RTT across two clusters:\n");
                print(&render(&paths, a.output)?);
            }
        }
        // One document on stdout, nothing else.
        Format::Json | Format::Yaml => {
            #[derive(Serialize)]
            struct Report<'a> {
                programming: &'a [Step],
                throughput: &'a [PathThroughput],
            }
            let report = Report {
                programming: &steps,
                throughput: &paths,
            };
            print(&clusterlink_cli::output::serialize(&report, a.output)?);
        }
    }
    Ok(())
}

const OWN: Ownership = Ownership {
    table: 211,
    rule_priority: 211,
    protocol: 211,
};

fn cluster(id: &str, pods: &str, services: &str) -> Result<Cluster> {
    Ok(Cluster {
        id: id.parse()?,
        pod_cidrs: pods.parse()?,
        service_cidrs: services.parse()?,
        labels: Default::default(),
    })
}

/// The local cluster `a` with its gateway, and `n / 2` remote clusters of two /24s each.
fn cluster_set(n: usize) -> Result<ClusterSet> {
    let mut set = ClusterSet::default();
    let a = cluster("a", "10.1.0.0/16", "10.101.0.0/16")?;
    set.clusters.insert(a.id.clone(), a);
    let gw = GatewayEndpoint {
        cluster: "a".parse()?,
        node: "a-gw0".parse()?,
        public_key: [1; 32],
        private_addr: "172.31.1.2".parse()?,
        public_addr: None,
        port: 51820,
        role: GatewayRole::Active,
        generation: 1,
    };
    set.gateways
        .insert((gw.cluster.clone(), gw.node.clone()), gw);
    for i in 0..n.div_ceil(2) as u32 {
        let pods = Ipv4Addr::from(0x6400_0000 + (i << 8));
        let svcs = Ipv4Addr::from(0x6600_0000 + (i << 8));
        let c = cluster(
            &format!("r{i}"),
            &format!("{pods}/24"),
            &format!("{svcs}/24"),
        )?;
        set.clusters.insert(c.id.clone(), c);
    }
    Ok(set)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn programming(bed: &Testbed, n: usize) -> Result<Vec<Step>> {
    let node = bed.namespace("routes")?;
    let peer = bed.namespace("routes-peer")?;
    bed.veth(&node, "eth0", &peer, "eth0")?;
    node.ip(&["addr", "add", "172.31.1.101/24", "dev", "eth0"])?;
    peer.ip(&["addr", "add", "172.31.1.2/24", "dev", "eth0"])?;
    let mut set = cluster_set(n)?;
    progress(&format!("programming {n} routes"));
    let steps = node.run_in(move || -> Result<Vec<Step>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let config = NodeConfig {
                cluster: "a".parse()?,
                node: "a-w1".parse()?,
                node_ip: "172.31.1.101".parse()?,
                tunnel_device: "cl0".into(),
                overlay_device: "vx-clusterlink".into(),
                tunnel_mtu: 1420,
                underlay_mtu: 1500,
                vni: 211,
                vxlan_port: 4803,
                broker: Vec::new(),
            };
            let kernel = Kernel::connect(OWN, "vx-clusterlink", "cl0")?;
            let mut steps = Vec::new();
            let facts = NodeFacts::default();

            let t = Instant::now();
            let (installed, _) = kernel.read().await?;
            let want = core::desired(&config, &set, &facts, OWN);
            let changes = core::diff(&installed, &want.state, OWN);
            let applied = kernel.apply(&changes).await?;
            let took = t.elapsed();
            ensure!(
                applied.failures.is_empty(),
                "{:?}",
                applied.failures.first()
            );
            steps.push(Step {
                step: "clusterlink: program all (read, desired, diff, apply)".into(),
                routes: applied.routes_replaced,
                ms: ms(took),
            });

            let t = Instant::now();
            let (read, _) = kernel.read().await?;
            let took = t.elapsed();
            ensure!(
                read.routes.len() == want.state.routes.len(),
                "read back {} routes",
                read.routes.len()
            );
            steps.push(Step {
                step: "clusterlink: read back (a full resync)".into(),
                routes: read.routes.len(),
                ms: ms(took),
            });

            // One cluster gains a pod CIDR: one route more, against what was applied.
            // (The middle cluster, whatever --cidrs is.)
            let i = (n.div_ceil(2) / 2) as u32;
            let id: clusterlink_api::ClusterId = format!("r{i}").parse()?;
            let mut changed = set
                .clusters
                .get(&id)
                .with_context(|| format!("no cluster {id} among {}", set.clusters.len()))?
                .clone();
            let pods = Ipv4Addr::from(0x6400_0000 + (i << 8));
            changed.pod_cidrs = format!("{pods}/24,103.0.0.0/24").parse()?;
            set.clusters.insert(id, changed);
            let t = Instant::now();
            let next = core::desired(&config, &set, &facts, OWN);
            let one = core::diff(&want.state, &next.state, OWN);
            let computed = t.elapsed();
            let applied = kernel.apply(&one).await?;
            let took = t.elapsed();
            ensure!(
                one.replace_routes.len() == 1 && applied.failures.is_empty(),
                "{one:?}"
            );
            steps.push(Step {
                step: format!(
                    "clusterlink: one-route change with {n} present (desired+diff {:.2} ms)",
                    ms(computed)
                ),
                routes: 1,
                ms: ms(took),
            });

            let t = Instant::now();
            let (installed, _) = kernel.read().await?;
            let un = core::uninstall(&installed, OWN);
            let applied = kernel.apply(&un).await?;
            let took = t.elapsed();
            ensure!(
                applied.failures.is_empty(),
                "{:?}",
                applied.failures.first()
            );
            let (left, _) = kernel.read().await?;
            ensure!(
                left == State::default(),
                "cleanup left {} routes",
                left.routes.len()
            );
            steps.push(Step {
                step: "clusterlink: remove all (cleanup)".into(),
                routes: installed.routes.len(),
                ms: ms(took),
            });
            Ok(steps)
        })
    })??;
    let mut steps = steps;

    // iproute2, same routes, same namespace: over a VXLAN link of its own.
    node.ip(&[
        "link",
        "add",
        "vx-ref",
        "type",
        "vxlan",
        "id",
        "212",
        "remote",
        "172.31.1.2",
        "local",
        "172.31.1.101",
        "dstport",
        "4804",
    ])?;
    node.ip(&["addr", "add", "240.31.1.101/8", "dev", "vx-ref"])?;
    node.ip(&["link", "set", "vx-ref", "up"])?;
    let batch = bed.log_dir.join("routes.batch");
    let mut text = String::new();
    for i in 0..n.div_ceil(2) as u32 {
        for base in [0x6400_0000u32, 0x6600_0000] {
            let net = Ipv4Addr::from(base + (i << 8));
            text.push_str(&format!(
                "route add {net}/24 via 240.31.1.2 dev vx-ref table 212 proto 212 mtu 1420\n"
            ));
        }
    }
    std::fs::write(&batch, text)?;
    let t = Instant::now();
    node.ip(&["-batch", &batch.display().to_string()])?;
    let took = t.elapsed();
    let count = String::from_utf8_lossy(&node.ip(&["route", "show", "table", "212"])?.stdout)
        .lines()
        .count();
    steps.push(Step {
        step: "iproute2: ip -batch, add all".into(),
        routes: count,
        ms: ms(took),
    });
    let t = Instant::now();
    node.ip(&[
        "route",
        "add",
        "103.0.0.0/24",
        "via",
        "240.31.1.2",
        "dev",
        "vx-ref",
        "table",
        "212",
        "proto",
        "212",
        "mtu",
        "1420",
    ])?;
    steps.push(Step {
        step: format!("iproute2: ip route add, one route with {n} present (a process)"),
        routes: 1,
        ms: ms(t.elapsed()),
    });
    Ok(steps)
}

fn throughput(bin: &Path, seconds: u32) -> Result<Vec<PathThroughput>> {
    let specs = ClusterSpec::many(&["a", "b"], 1, &[]);
    progress("a two-cluster lab");
    let lab = Lab::up(bin, &specs, &|s| progress(s))?;
    lab.wait_connected(Duration::from_secs(60))?;
    lab.wait_routes(Duration::from_secs(30))?;
    let a_gw = lab.state.clusters[0].nodes[0].node.clone();
    let b_gw = lab.state.clusters[1].nodes[0].node.clone();
    let b_tunnel = lab.state.clusters[1].gateways[0].tunnel_ip.to_string();
    let (a_pod, b_pod) = (lab.worker(0).pod.clone(), lab.worker(1).pod.clone());
    if a_pod.name == a_gw.pod.name {
        bail!("the lab has no worker nodes");
    }
    let mut out = Vec::new();
    for (path, from, to, addr) in [
        (
            "gateway node -> gateway node (tunnel)",
            a_gw.ns(),
            b_gw.ns(),
            b_tunnel.clone(),
        ),
        (
            "pod on worker -> pod on worker (overlay, tunnel, CNI)",
            a_pod.ns(),
            b_pod.ns(),
            b_pod.address.to_string(),
        ),
    ] {
        progress(&format!("{path}: iperf3 {seconds}s, then 200 pings"));
        let gbit = iperf(&from, &to, &lab.bed, &addr, seconds)?;
        let rtt_ms = rtt(&from, &addr)?;
        out.push(PathThroughput {
            path: path.into(),
            gbit_per_s: gbit,
            rtt_avg_ms: rtt_ms,
        });
    }
    if out.iter().any(|p| p.gbit_per_s <= 0.0) {
        return Err(anyhow!("a path carried nothing"));
    }
    Ok(out)
}
