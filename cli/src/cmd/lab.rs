//! `clusterlink lab up|status|exec|down`: a multi-cluster setup from network namespaces on
//! this host (root). Nothing is changed in the host's own network namespace.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use clusterlink_broker_client::files::MAX_FILE_BYTES;
use clusterlink_broker_client::fs::read_limited;
use clusterlink_lab::checks::{Discovery, Reach};
use clusterlink_lab::lab::{ECHO_NAME, LAB_PREFIX, LabProcess, LabState, is_lab_process};
use clusterlink_lab::netns::{ip, remove_namespace, sweep_stale};
use clusterlink_lab::{ClusterSpec, Lab, Netns, Role, Testbed};
use serde::Serialize;

use clusterlink_cli::output::{Format, Tabular, print, render, serialize};

const NAMES: [&str; 8] = [
    "east", "west", "north", "south", "central", "edge", "core", "metro",
];

#[derive(Subcommand)]
pub enum LabCommand {
    /// Build clusters, a broker and gateways; wait for every tunnel; verify reachability.
    Up(UpArgs),
    /// What the lab is made of, and its tunnels.
    Status(StatusArgs),
    /// Run a command in a lab pod or node: `lab exec CLUSTER POD|NODE -- CMD…` (e.g.
    /// `w1-pod`, `gw0-pod`, `w1`, `gw0`), or `lab exec broker -- CMD…`.
    Exec(ExecArgs),
    /// Stop every lab process and remove every lab namespace.
    Down(DirArg),
    /// The lab's demo TCP echo server (run inside a pod by `lab up`).
    #[command(hide = true)]
    EchoServer(EchoArgs),
}

#[derive(Args)]
pub struct EchoArgs {
    #[arg(long, default_value = "0.0.0.0:7")]
    pub listen: std::net::SocketAddr,
}

async fn echo_server(a: EchoArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("Cannot listen on {}", a.listen))?;
    tracing::info!(listen = %a.listen, "echo server up");
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

#[derive(Args, Clone)]
pub struct DirArg {
    /// Where the running lab's state is kept.
    #[arg(
        long,
        env = "CLUSTERLINK_LAB_DIR",
        default_value = "/run/clusterlink-lab"
    )]
    pub lab_dir: PathBuf,
}

#[derive(Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=99))]
    pub clusters: u8,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub gateways_per_cluster: u8,
    /// Worker nodes per cluster (besides the gateway nodes), each with a pod.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub workers_per_cluster: u8,
    /// Put this cluster behind NAT (repeatable).
    #[arg(long)]
    pub nat: Vec<String>,
    #[command(flatten)]
    pub dir: DirArg,
}

#[derive(Args)]
pub struct StatusArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(flatten)]
    pub dir: DirArg,
}

#[derive(Args)]
pub struct ExecArgs {
    /// A cluster name, or `broker`.
    pub target: String,
    /// A pod or node of the cluster (`w1-pod`, `gw0`, or the full name `east-w1-pod`).
    pub node: Option<String>,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub dir: DirArg,
}

fn state_path(dir: &DirArg) -> PathBuf {
    dir.lab_dir.join("state.json")
}

fn load(dir: &DirArg) -> Result<LabState> {
    let path = state_path(dir);
    let text = read_limited(&path, MAX_FILE_BYTES).with_context(|| {
        format!(
            "No lab is running (no {}); start one with `clusterlink lab up`",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a lab state file", path.display()))
}

#[allow(clippy::print_stderr)]
fn progress(s: &str) {
    eprintln!("lab: {s}");
}

pub async fn run(c: LabCommand) -> Result<()> {
    match c {
        LabCommand::Up(a) => tokio::task::spawn_blocking(move || up(a)).await?,
        LabCommand::Status(a) => tokio::task::spawn_blocking(move || status(a)).await?,
        LabCommand::Exec(a) => tokio::task::spawn_blocking(move || exec(a)).await?,
        LabCommand::Down(a) => tokio::task::spawn_blocking(move || down(&a)).await?,
        LabCommand::EchoServer(a) => echo_server(a).await,
    }
}

/// Namespaces with the lab's prefix that exist now.
fn lab_namespaces() -> Vec<String> {
    let listed = ip(&["netns", "list"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(LAB_PREFIX))
        .map(str::to_owned)
        .collect()
}

fn up(a: UpArgs) -> Result<()> {
    if state_path(&a.dir).exists() {
        bail!(
            "A lab is already running (state in {}); remove it first with `clusterlink lab down`",
            a.dir.lab_dir.display()
        );
    }
    let leftovers = lab_namespaces();
    if !leftovers.is_empty() {
        bail!(
            "Namespaces of an earlier lab are still there ({}); remove them with `clusterlink lab down`",
            leftovers.join(", ")
        );
    }
    let names: Vec<String> = (0..a.clusters as usize)
        .map(|i| {
            NAMES
                .get(i)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("c{}", i + 1))
        })
        .collect();
    for n in &a.nat {
        if !names.contains(n) {
            bail!(
                "--nat {n}: no such cluster; the clusters are {}",
                names.join(", ")
            );
        }
    }
    let specs: Vec<ClusterSpec> = names
        .iter()
        .map(|n| ClusterSpec {
            name: n.clone(),
            gateways: a.gateways_per_cluster as usize,
            workers: a.workers_per_cluster as usize,
            nat: a.nat.contains(n),
        })
        .collect();
    let bin = std::env::current_exe().context("Cannot find the clusterlink binary")?;
    // On any failure below, dropping the lab removes everything it made.
    let bed = Testbed::with_prefix(LAB_PREFIX.to_owned()).context("Failed to start the testbed")?;
    let mut lab = Lab::up_in(bed, &bin, &specs, &progress)
        .context("Failed to build the lab (it needs root, iproute2 and nftables)")?;
    progress("waiting for every tunnel");
    lab.wait_connected(Duration::from_secs(60))
        .context("Not every tunnel came up; see the logs")?;
    progress("waiting for every node's routes");
    lab.wait_routes(Duration::from_secs(30))
        .context("Not every route agent programmed its routes; see the logs")?;
    progress("checking pod-to-pod reachability between every pair of clusters");
    let matrix: Vec<ReachRow> = clusterlink_lab::checks::reachability(&lab.state)
        .into_iter()
        .map(ReachRow)
        .collect();
    progress("waiting for the demo service to resolve in every cluster");
    let resolved = lab.wait_services(Duration::from_secs(20));
    let discovery: Vec<DiscoveryRow> = clusterlink_lab::checks::discovery(&lab.state)
        .into_iter()
        .map(DiscoveryRow)
        .collect();
    std::fs::create_dir_all(&a.dir.lab_dir)?;
    std::fs::write(
        state_path(&a.dir),
        serde_json::to_string_pretty(&lab.state)?,
    )?;
    let failed = matrix.iter().filter(|r| !r.0.ok).count()
        + discovery.iter().filter(|d| !d.0.ok).count()
        + usize::from(resolved.is_err());
    print(&describe(&lab.state));
    print("\nReachability (pod on a worker node to pod on a worker node, across clusters):\n");
    print(&render(&matrix, Format::Table)?);
    print(&format!(
        "\nService discovery ({ECHO_NAME} from a pod in every cluster, then a TCP echo to each answer):\n"
    ));
    print(&render(&discovery, Format::Table)?);
    print("\nTunnels:\n");
    print(&connections_table(&lab.state)?);
    if failed > 0 {
        // Leave nothing half-working behind.
        drop(lab);
        let _ = std::fs::remove_file(state_path(&a.dir));
        bail!("{failed} check(s) failed (reachability, service discovery); the lab was removed");
    }
    lab.bed.release();
    print(
        "\nThe lab is up. `clusterlink lab status`, `clusterlink lab exec east w1-pod -- ping 10.2.101.10`,\n`clusterlink lab exec west w1-pod -- dig echo.demo.svc.clusterset.local`, `clusterlink lab down`.\n",
    );
    Ok(())
}

/// A reachability check, as `lab up` shows it.
#[derive(Serialize)]
#[serde(transparent)]
struct ReachRow(Reach);

impl Tabular for ReachRow {
    fn header() -> Vec<&'static str> {
        vec!["FROM", "TO", "ADDRESS", "RESULT"]
    }
    fn row(&self) -> Vec<String> {
        let r = &self.0;
        vec![
            r.from.clone(),
            r.to.clone(),
            r.address.clone(),
            if r.ok { "ok".into() } else { "FAIL".into() },
        ]
    }
}

/// A discovery check, as `lab up` shows it.
#[derive(Serialize)]
#[serde(transparent)]
struct DiscoveryRow(Discovery);

impl Tabular for DiscoveryRow {
    fn header() -> Vec<&'static str> {
        vec!["FROM", "ANSWERS", "ECHO", "RESULT"]
    }
    fn row(&self) -> Vec<String> {
        let d = &self.0;
        vec![
            d.from.clone(),
            d.answers.join(","),
            format!("{}/{}", d.echoed, d.answers.len()),
            if d.ok { "ok".into() } else { "FAIL".into() },
        ]
    }
}

fn describe(state: &LabState) -> String {
    let mut s = format!(
        "Lab {} (logs and credentials in {})\n  broker   {} in namespace {}\n",
        state.prefix.trim_end_matches('-'),
        state.dir.display(),
        state.broker_address,
        state.broker_namespace
    );
    for c in &state.clusters {
        s.push_str(&format!(
            "  cluster {:<8} pods {} services {}{}\n",
            c.name,
            c.pod_cidr,
            c.service_cidr,
            if c.nat {
                format!(" behind NAT ({})", c.public_address)
            } else {
                String::new()
            }
        ));
        for g in &c.gateways {
            s.push_str(&format!(
                "    gateway {:<12} underlay {:<14} tunnel {:<12} namespace {}\n",
                g.node, g.underlay, g.tunnel_ip, g.namespace
            ));
        }
        for n in &c.nodes {
            s.push_str(&format!(
                "    {:<7} {:<12} underlay {:<14} pod {} {} (namespace {})\n",
                match n.node.role {
                    Role::Gateway => "node",
                    Role::Worker => "worker",
                },
                n.node.name,
                n.node.underlay,
                n.node.pod.name,
                n.node.pod.address,
                n.node.pod.namespace
            ));
        }
    }
    s
}

fn connections_table(state: &LabState) -> Result<String> {
    let out = Netns {
        name: state.broker_namespace.clone(),
    }
    .exec(
        &std::env::current_exe()?.display().to_string(),
        &[
            "show",
            "connections",
            "--credentials",
            &state.admin_credentials.display().to_string(),
        ],
    )
    .context("Cannot ask the broker for the tunnels")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(a: StatusArgs) -> Result<()> {
    let state = load(&a.dir)?;
    let processes = state.processes();
    match a.output {
        Format::Table => {
            print(&describe(&state));
            print("\nProcesses:\n");
            let mut t = String::new();
            for p in &processes {
                t.push_str(&format!(
                    "  {:<8} {:>7}  {}\n",
                    if p.running { "running" } else { "exited" },
                    p.pid,
                    p.role
                ));
            }
            print(&t);
            print("\nTunnels:\n");
            print(&connections_table(&state)?);
        }
        Format::Json | Format::Yaml => {
            #[derive(serde::Serialize)]
            struct Status<'a> {
                #[serde(flatten)]
                state: &'a LabState,
                processes: &'a [LabProcess],
            }
            let s = Status {
                state: &state,
                processes: &processes,
            };
            print(&serialize(&s, a.output)?);
        }
    }
    Ok(())
}

fn exec(a: ExecArgs) -> Result<()> {
    let state = load(&a.dir)?;
    let ns = if a.target == "broker" {
        state.broker_namespace.clone()
    } else {
        let c = state
            .clusters
            .iter()
            .find(|c| c.name == a.target)
            .with_context(|| {
                format!(
                    "No cluster {:?} in the lab; the clusters are {}",
                    a.target,
                    state
                        .clusters
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let want = a.node.clone().unwrap_or_else(|| "gw0".into());
        let full = |n: &str| n == want || n == format!("{}-{want}", c.name);
        c.nodes
            .iter()
            .find_map(|n| {
                if full(&n.node.name) {
                    Some(n.node.namespace.clone())
                } else if full(&n.node.pod.name) {
                    Some(n.node.pod.namespace.clone())
                } else {
                    None
                }
            })
            .with_context(|| {
                format!(
                    "No pod or node {want:?} in cluster {}; there are {}",
                    c.name,
                    c.nodes
                        .iter()
                        .flat_map(|n| [n.node.pod.name.as_str(), n.node.name.as_str()])
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?
    };
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(&a.command)
        .status()
        .context("Cannot run the command")?;
    if !status.success() {
        bail!("the command exited with {status}");
    }
    Ok(())
}

fn down(dir: &DirArg) -> Result<()> {
    let path = state_path(dir);
    let Ok(text) = read_limited(&path, MAX_FILE_BYTES) else {
        sweep_stale();
        // No state, but maybe the namespaces of a lab whose `up` died midway.
        let orphans = lab_namespaces();
        for name in &orphans {
            remove_namespace(name).with_context(|| format!("Cannot remove namespace {name}"))?;
        }
        if orphans.is_empty() {
            print("No lab is running.\n");
        } else {
            print(&format!(
                "Removed {} namespace(s) of an earlier lab.\n",
                orphans.len()
            ));
        }
        return Ok(());
    };
    let state: LabState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a lab state file", path.display()))?;
    // Only processes that are still the lab's: a recorded pid may belong to another process
    // by now.
    let live: Vec<LabProcess> = state
        .processes()
        .into_iter()
        .filter(|p| p.running)
        .collect();
    for p in &live {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let stuck: Vec<&LabProcess> = live
        .iter()
        .filter(|p| {
            clusterlink_lab::netns::wait_until(
                "a lab process to stop",
                Duration::from_secs(5),
                || !is_lab_process(p.pid),
            )
            .is_err()
        })
        .collect();
    // Every namespace with the lab's prefix, recorded or not; each tried, whatever fails.
    let mut left = Vec::new();
    for name in lab_namespaces() {
        if let Err(e) = remove_namespace(&name) {
            left.push(format!("namespace {name} ({e})"));
        }
    }
    for p in stuck {
        left.push(format!("{} (pid {}) did not stop", p.role, p.pid));
    }
    if !left.is_empty() {
        // The state stays, so that `lab down` can be run again once the cause is fixed.
        bail!(
            "Lab {} could not be removed completely; still there:\n  {}",
            state.prefix.trim_end_matches('-'),
            left.join("\n  ")
        );
    }
    let _ = std::fs::remove_dir_all(&state.dir);
    std::fs::remove_file(&path)?;
    print(&format!(
        "Lab {} removed ({} process(es) stopped).\n",
        state.prefix.trim_end_matches('-'),
        live.len()
    ));
    Ok(())
}
