//! `clusterlink-bench tunnel`: throughput (iperf3, one TCP stream) and RTT (ping) between
//! two namespaces over one veth pair: bare, through clusterlink's gateway, through Debian's
//! wireguard-go, and through boringtun-cli, in one run.
//!
//! Both are measured once every tunnel is up, in rounds: each round runs iperf3 (or pings)
//! over every path in turn, so a slow or fast phase of the machine falls on all paths alike
//! rather than on whichever was measured then. Throughput is the median of a path's rounds,
//! and "× wireguard-go" the median of its ratios within each round.
//!
//! ```text
//!   bench-l 10.99.0.1 ──veth── 10.99.0.2 bench-r
//!   tunnels:  clusterlink 10.1.255.1 ⇄ 10.2.255.1   (udp 51820; broker in bench-l)
//!             wireguard-go 10.98.0.1 ⇄ 10.98.0.2    (udp 51821)
//!             boringtun-cli 10.97.0.1 ⇄ 10.97.0.2   (udp 51822)
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use clusterlink_lab::netns::run as run_command;
use clusterlink_lab::{Netns, Testbed, wait_until};
use serde::Serialize;

use clusterlink_cli::output::{Format, Tabular, print, render};

use crate::probe::{PingStats, iperf, pings};
use crate::progress;
use crate::stats::median;

#[derive(Args)]
pub struct TunnelBenchArgs {
    /// Seconds of iperf3 per path and round.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Throughput rounds; each runs iperf3 over every path in turn.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// RTT rounds; each pings every path 100 times, 10 ms apart.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rtt_rounds: u32,
    /// boringtun-cli binary (`cargo install boringtun-cli`); skipped if absent.
    #[arg(long, default_value = "/opt/boringtun-cli/bin/boringtun-cli")]
    pub boringtun: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathResult {
    pub path: String,
    pub gbit_per_s: f64,
    pub rtt_avg_ms: f64,
    pub rtt_min_ms: f64,
    pub rtt_overhead_ms: f64,
    /// Rounds whose average RTT was below boringtun-cli's in the same round.
    pub rtt_rounds_below_boringtun: Option<u32>,
    pub vs_wireguard_go: Option<f64>,
}

impl Tabular for PathResult {
    fn header() -> Vec<&'static str> {
        vec![
            "PATH",
            "Gbit/s",
            "RTT avg ms",
            "RTT min ms",
            "RTT over veth ms",
            "x wireguard-go",
            "RTT rounds below boringtun-cli",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.path.clone(),
            format!("{:.2}", self.gbit_per_s),
            format!("{:.3}", self.rtt_avg_ms),
            format!("{:.3}", self.rtt_min_ms),
            format!("{:.3}", self.rtt_overhead_ms),
            self.vs_wireguard_go
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            self.rtt_rounds_below_boringtun
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
        ]
    }
}

/// One line of progress for a round: each path with its figure.
fn rounds_progress(
    what: &str,
    round: u32,
    of: u32,
    paths: &[PathResult],
    figures: &[f64],
    decimals: usize,
) {
    let line: Vec<String> = paths
        .iter()
        .zip(figures)
        .map(|(p, f)| format!("{} {f:.decimals$}", p.path))
        .collect();
    progress(&format!("{what} round {round}/{of}: {}", line.join(", ")));
}

fn with_stdin(program: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} failed");
    }
    Ok(out.stdout)
}

/// A kernel-interface WireGuard implementation driven by `wg` (wireguard-go, boringtun-cli).
fn wg_pair(
    bed: &Testbed,
    l: &Netns,
    r: &Netns,
    start: &dyn Fn(&Netns, &str) -> Result<u32>,
    tag: &str,
    port: u16,
    net: &str,
) -> Result<()> {
    let dir = &bed.log_dir;
    let mut keys = Vec::new();
    for side in ["l", "r"] {
        let key = run_command(Command::new("wg").arg("genkey"))?.stdout;
        let path = dir.join(format!("{tag}-{side}.key"));
        std::fs::write(&path, &key)?;
        let public = String::from_utf8(with_stdin("wg", &["pubkey"], &key)?)?;
        keys.push((path, public.trim().to_owned()));
    }
    for (i, (ns, peer_ip)) in [(l, "10.99.0.2"), (r, "10.99.0.1")].into_iter().enumerate() {
        let iface = format!("{tag}{i}");
        start(ns, &iface)?;
        wait_until("the WireGuard interface", Duration::from_secs(10), || {
            ns.ip(&["link", "show", &iface]).is_ok()
        })?;
        let (key, _) = &keys[i];
        let (_, peer_pub) = &keys[1 - i];
        ns.exec(
            "wg",
            &[
                "set",
                &iface,
                "private-key",
                &key.display().to_string(),
                "listen-port",
                &port.to_string(),
                "peer",
                peer_pub,
                "allowed-ips",
                &format!("{net}.0/24"),
                "endpoint",
                &format!("{peer_ip}:{port}"),
            ],
        )?;
        ns.ip(&["addr", "add", &format!("{net}.{}/24", i + 1), "dev", &iface])?;
        ns.ip(&["link", "set", &iface, "mtu", "1420", "up"])?;
    }
    Ok(())
}

pub fn run(a: TunnelBenchArgs, bin: &Path) -> Result<()> {
    let bed = Testbed::new().context("the benchmark needs root")?;
    let l = bed.namespace("bench-l")?;
    let r = bed.namespace("bench-r")?;
    bed.veth(&l, "eth0", &r, "eth0")?;
    l.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"])?;
    r.ip(&["addr", "add", "10.99.0.2/24", "dev", "eth0"])?;
    let mut results: Vec<PathResult> = Vec::new();
    let mut addrs: Vec<&str> = Vec::new();
    // Paths are measured once all are up (below); each is added as it comes up.
    let mut add = |name: &str, addr: &'static str| {
        results.push(PathResult {
            path: name.into(),
            gbit_per_s: 0.0,
            rtt_avg_ms: 0.0,
            rtt_min_ms: 0.0,
            rtt_overhead_ms: 0.0,
            vs_wireguard_go: None,
            rtt_rounds_below_boringtun: None,
        });
        addrs.push(addr);
    };
    add("veth (no tunnel)", "10.99.0.2");

    // clusterlink: a broker in bench-l, both sides joined, a gateway on each.
    let bin = bin.display().to_string();
    let dir = bed.log_dir.clone();
    run_command(
        Command::new(&bin)
            .args(["deploy-broker", "--data-dir"])
            .arg(dir.join("broker"))
            .args(["--listen", "10.99.0.1:7443"]),
    )?;
    bed.spawn(
        &l,
        "broker",
        &bin,
        &[
            "broker",
            "run",
            "--data-dir",
            &dir.join("broker").display().to_string(),
        ],
    )?;
    let blog = bed.log_path("broker");
    wait_until("the broker", Duration::from_secs(20), || {
        std::fs::read_to_string(&blog).is_ok_and(|s| s.contains("broker serving"))
    })?;
    let info = dir.join("broker/broker-info.yaml").display().to_string();
    for (i, ns) in [&l, &r].into_iter().enumerate() {
        let id = format!("c{}", i + 1);
        let creds = dir.join(format!("{id}.yaml")).display().to_string();
        ns.exec(
            &bin,
            &[
                "join",
                &info,
                "--cluster-id",
                &id,
                "--pod-cidr",
                &format!("10.{}.0.0/16", i + 1),
                "--service-cidr",
                &format!("10.{}.0.0/16", 101 + i),
                "-o",
                &creds,
            ],
        )?;
        bed.spawn(
            ns,
            &format!("gw-{id}"),
            &bin,
            &[
                "--log",
                "warn",
                "gateway",
                "run",
                "--credentials",
                &creds,
                "--node",
                &format!("{id}-gw0"),
                "--private-addr",
                &format!("10.99.0.{}", i + 1),
                "--tunnel-ip",
                &format!("10.{}.255.1", i + 1),
                "--key-file",
                &dir.join(format!("{id}.key")).display().to_string(),
                "--tun-name",
                "cl0",
            ],
        )?;
        // The route agent puts the other side's CIDRs into the tunnel device.
        bed.spawn(
            ns,
            &format!("agent-{id}"),
            &bin,
            &[
                "--log",
                "warn",
                "route-agent",
                "run",
                "--credentials",
                &creds,
                "--node",
                &format!("{id}-gw0"),
                "--node-ip",
                &format!("10.99.0.{}", i + 1),
                "--tunnel-device",
                "cl0",
            ],
        )?;
    }
    wait_until("the clusterlink tunnel", Duration::from_secs(30), || {
        l.exec("ping", &["-c1", "-W1", "10.2.255.1"]).is_ok()
    })?;
    add("clusterlink gateway", "10.2.255.1");

    let wg_go = |ns: &Netns, iface: &str| -> Result<u32> {
        Ok(bed.spawn(ns, iface, "wireguard-go", &["-f", iface])?)
    };
    wg_pair(&bed, &l, &r, &wg_go, "wgb", 51821, "10.98.0")?;
    wait_until("the wireguard-go tunnel", Duration::from_secs(20), || {
        l.exec("ping", &["-c1", "-W1", "10.98.0.2"]).is_ok()
    })?;
    add("wireguard-go", "10.98.0.2");

    if a.boringtun.exists() {
        let bt = a.boringtun.display().to_string();
        let start = |ns: &Netns, iface: &str| -> Result<u32> {
            Ok(bed.spawn(
                ns,
                iface,
                &bt,
                &["--foreground", "--disable-drop-privileges", iface],
            )?)
        };
        wg_pair(&bed, &l, &r, &start, "btb", 51822, "10.97.0")?;
        wait_until("the boringtun-cli tunnel", Duration::from_secs(20), || {
            l.exec("ping", &["-c1", "-W1", "10.97.0.2"]).is_ok()
        })?;
        add("boringtun-cli", "10.97.0.2");
    } else {
        progress(&format!(
            "{} not found: boringtun-cli skipped (cargo install boringtun-cli --root /opt/boringtun-cli)",
            a.boringtun.display()
        ));
    }
    // Throughput in rounds, every path in each (all tunnels stay up; the others idle
    // meanwhile).
    let mut gbit_rounds: Vec<Vec<f64>> = Vec::new();
    for round in 1..=a.rounds {
        let mut this = Vec::new();
        for (path, addr) in results.iter().zip(&addrs) {
            progress(&format!(
                "throughput round {round}/{}: {}: iperf3 {}s",
                a.rounds, path.path, a.seconds
            ));
            this.push(iperf(&l, &r, &bed, addr, a.seconds)?);
        }
        rounds_progress("throughput", round, a.rounds, &results, &this, 2);
        gbit_rounds.push(this);
    }
    let wg_go_at = results.iter().position(|p| p.path == "wireguard-go");
    for (i, path) in results.iter_mut().enumerate() {
        path.gbit_per_s = median(gbit_rounds.iter().map(|round| round[i])).unwrap_or(0.0);
        path.vs_wireguard_go = wg_go_at.and_then(|w| {
            median(
                gbit_rounds
                    .iter()
                    .filter(|round| round[w] > 0.0)
                    .map(|round| round[i] / round[w]),
            )
        });
    }
    // RTT in rounds, the same way.
    let mut rounds: Vec<Vec<PingStats>> = Vec::new();
    for round in 1..=a.rtt_rounds {
        let mut this = Vec::new();
        for addr in &addrs {
            this.push(pings(&l, addr, 100)?);
        }
        let avgs: Vec<f64> = this.iter().map(|p| p.avg_ms).collect();
        rounds_progress("RTT", round, a.rtt_rounds, &results, &avgs, 3);
        rounds.push(this);
    }
    let boringtun_at = results.iter().position(|r| r.path == "boringtun-cli");
    for (i, r) in results.iter_mut().enumerate() {
        let column: Vec<PingStats> = rounds.iter().map(|round| round[i]).collect();
        r.rtt_avg_ms = column.iter().map(|p| p.avg_ms).sum::<f64>() / column.len() as f64;
        r.rtt_min_ms = column
            .iter()
            .map(|p| p.min_ms)
            .fold(f64::INFINITY, f64::min);
        r.rtt_rounds_below_boringtun = boringtun_at.filter(|&b| b != i).map(|b| {
            rounds
                .iter()
                .filter(|round| round[i].avg_ms < round[b].avg_ms)
                .count() as u32
        });
    }
    for sock in ["wgb0", "wgb1", "btb0", "btb1"] {
        let _ = std::fs::remove_file(Path::new("/var/run/wireguard").join(format!("{sock}.sock")));
    }
    let veth_rtt = results[0].rtt_avg_ms;
    for path in &mut results {
        path.rtt_overhead_ms = path.rtt_avg_ms - veth_rtt;
    }
    print(&render(&results, a.output)?);
    Ok(())
}
