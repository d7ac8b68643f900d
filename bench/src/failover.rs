//! `clusterlink-bench failover`: how long pod-to-pod traffic stops when a cluster's
//! active gateway dies.
//!
//! A two-cluster lab: `a` with two gateway nodes and a worker, `b` with one gateway and a
//! worker. A pod on b's worker pings a pod on a's worker every 10 ms (`ping -D`, the
//! kernel's timestamps). Each round SIGKILLs a's active gateway (no hand-over: it is the
//! lease that tells), then measures the longest gap between two replies, and the pings
//! lost; then restarts the dead gateway, which comes back passive, for the next round.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use clusterlink_lab::{ClusterSpec, Lab, wait_until};
use serde::Serialize;

use clusterlink_cli::output::{Format, Tabular, print, render};

use crate::probe::parse_reply;
use crate::progress;
use crate::stats::{max, median};

#[derive(Args)]
pub struct FailoverBenchArgs {
    /// Times the active gateway is killed.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Round {
    pub round: u32,
    pub killed: String,
    pub took_over: String,
    /// Longest time without a reply, around the kill.
    pub outage_ms: f64,
    pub pings_lost: u64,
}

impl Tabular for Round {
    fn header() -> Vec<&'static str> {
        vec!["ROUND", "KILLED", "TOOK OVER", "OUTAGE ms", "PINGS LOST"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.round.to_string(),
            self.killed.clone(),
            self.took_over.clone(),
            format!("{:.0}", self.outage_ms),
            self.pings_lost.to_string(),
        ]
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The longest gap between consecutive replies that ends after `since`, and the sequence
/// numbers missing among the replies.
fn outage(replies: &[(f64, u64)], since: f64) -> (f64, u64) {
    let gap = replies
        .windows(2)
        .filter(|w| w[1].0 >= since)
        .map(|w| w[1].0 - w[0].0)
        .fold(0.0, f64::max);
    let lost = match (replies.first(), replies.last()) {
        (Some(first), Some(last)) => (last.1 - first.1 + 1).saturating_sub(replies.len() as u64),
        _ => 0,
    };
    (gap * 1000.0, lost)
}

pub fn run(a: FailoverBenchArgs, bin: &Path) -> Result<()> {
    let spec = |name: &str, gateways| ClusterSpec {
        name: name.into(),
        gateways,
        workers: 1,
        nat: false,
    };
    progress("building a two-cluster lab (cluster a with two gateways)");
    let mut lab = Lab::up(bin, &[spec("a", 2), spec("b", 1)], &progress)
        .context("the benchmark needs root")?;
    lab.wait_connected(Duration::from_secs(60))?;
    lab.wait_routes(Duration::from_secs(30))?;
    let target = lab.worker(0).pod.address.to_string();
    let source = lab.worker(1).pod.namespace.clone();
    let mut rounds = Vec::new();
    let mut killed_last: Option<String> = None;
    for round in 1..=a.rounds {
        let active = lab.wait_one_active(0, killed_last.as_deref(), Duration::from_secs(30))?;
        let k = lab.state.clusters[0]
            .gateways
            .iter()
            .position(|g| g.node == active)
            .ok_or_else(|| anyhow!("{active} is not a gateway of the lab"))?;
        let mut ping = Command::new("ip")
            .args([
                "netns", "exec", &source, "ping", "-D", "-n", "-i", "0.01", "-W", "1",
            ])
            .arg(&target)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("ping")?;
        let replies: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
        let stdout = ping.stdout.take().context("ping's output")?;
        let sink = replies.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(r) = parse_reply(&line) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            }
        });
        let count = || replies.lock().unwrap_or_else(|p| p.into_inner()).len();
        let steady = wait_until(
            "steady pings before the kill",
            Duration::from_secs(10),
            || count() >= 50,
        );
        let kill_at = unix_secs(SystemTime::now());
        if steady.is_ok() {
            progress(&format!("round {round}: killing {active}"));
            lab.kill_gateway(0, k);
        }
        let after = |replies: &Vec<(f64, u64)>| replies.iter().filter(|r| r.0 > kill_at).count();
        let recovered = steady.and_then(|()| {
            wait_until("pings to come back", Duration::from_secs(30), || {
                after(&replies.lock().unwrap_or_else(|p| p.into_inner())) >= 50
            })
        });
        let _ = ping.kill();
        let _ = ping.wait();
        let _ = reader.join();
        recovered?;
        let took_over = lab.wait_one_active(0, Some(&active), Duration::from_secs(30))?;
        let (outage_ms, pings_lost) =
            outage(&replies.lock().unwrap_or_else(|p| p.into_inner()), kill_at);
        rounds.push(Round {
            round,
            killed: active.clone(),
            took_over,
            outage_ms,
            pings_lost,
        });
        lab.restart_gateway(0, k, false)?;
        lab.wait_connected(Duration::from_secs(60))?;
        killed_last = Some(active);
    }
    print(&render(&rounds, a.output)?);
    let outages: Vec<f64> = rounds.iter().map(|r| r.outage_ms).collect();
    if matches!(a.output, Format::Table) {
        print(&format!(
            "outage: median {:.0} ms, max {:.0} ms over {} rounds (target: under 1000 ms)\n",
            median(outages.iter().copied()).unwrap_or(0.0),
            max(&outages),
            outages.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outage_is_the_longest_gap_after_the_kill() {
        let replies = [(10.00, 1), (10.01, 2), (10.02, 3), (10.72, 73), (10.73, 74)];
        let (ms, lost) = outage(&replies, 10.015);
        assert!((ms - 700.0).abs() < 1e-6, "{ms}");
        assert_eq!(lost, 69);
        // A gap before the kill does not count.
        let replies = [(9.0, 1), (9.5, 51), (10.2, 52), (10.21, 53)];
        assert!((outage(&replies, 10.0).0 - 700.0).abs() < 1e-6);
    }
}
