//! `clusterlink-bench`: clusterlink measured against reference systems on this machine, each
//! in one run beside its reference (wireguard-go and boringtun-cli, Knot DNS, a bare veth).
//! It runs the `clusterlink` binary beside itself (or `--clusterlink PATH`), so it measures
//! what ships. This file parses and dispatches; BENCHMARKS.md has the method and figures.

mod broker;
mod dns;
mod failover;
mod probe;
mod routes;
mod stats;
mod tunnel;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "clusterlink-bench",
    version,
    about = "Measure clusterlink beside reference systems on this machine"
)]
struct Cli {
    /// The clusterlink binary to measure [default: `clusterlink` beside this binary].
    #[arg(long, global = true, env = "CLUSTERLINK_BIN")]
    clusterlink: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax) of the benchmark's own server (`serve-dns`).
    #[arg(long, global = true, env = "CLUSTERLINK_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Broker watch fan-out: many clusters watching, many updates, per store backend.
    Broker(broker::BrokerBenchArgs),
    /// Tunnel throughput and RTT: veth, clusterlink, wireguard-go, boringtun-cli (root).
    Tunnel(tunnel::TunnelBenchArgs),
    /// Route agent: programming N remote CIDRs and a one-route change; pod-to-pod next to
    /// gateway-to-gateway throughput across two lab clusters (root).
    Routes(routes::RoutesBenchArgs),
    /// DNS: our answer path next to Knot DNS with dnsperf; export-to-resolvable and
    /// unready-to-withdrawn times across lab clusters (root).
    Dns(dns::DnsBenchArgs),
    /// Gateway failover: how long pod-to-pod traffic stops when the active gateway dies
    /// (root).
    Failover(failover::FailoverBenchArgs),
    /// The DNS plugin's answer path over N synthetic services, without a broker (what
    /// `dns` measures; started by it in a namespace of its own).
    #[command(hide = true)]
    ServeDns(dns::ServeArgs),
}

#[allow(clippy::print_stderr)] // the binary reports its error on stderr
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Command::ServeDns(a) = cli.command {
        return dns::serve(a);
    }
    let bin = clusterlink_bin(cli.clusterlink)?;
    match cli.command {
        Command::Broker(a) => broker::run(a, &bin),
        Command::Tunnel(a) => tunnel::run(a, &bin),
        Command::Routes(a) => routes::run(a, &bin),
        Command::Dns(a) => dns::run(a, &bin),
        Command::Failover(a) => failover::run(a, &bin),
        Command::ServeDns(_) => unreachable!("handled above"),
    }
}

/// The binary under test: `--clusterlink PATH`, or `clusterlink` in this binary's directory
/// (where `cargo build` puts both).
fn clusterlink_bin(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("Cannot find this binary's directory")?
            .with_file_name("clusterlink"),
    };
    check_binary(&path)?;
    // Absolute: the benchmarks run it from other directories and namespaces.
    std::path::absolute(&path).with_context(|| format!("Cannot resolve {}", path.display()))
}

fn check_binary(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => bail!("{} is not an executable file", path.display()),
        Err(e) => bail!(
            "no clusterlink binary at {}: {e}; build it (cargo build --release -p clusterlink) or pass --clusterlink PATH",
            path.display()
        ),
    }
}

/// One line of progress on stderr (stdout carries only the results).
#[allow(clippy::print_stderr)]
pub fn progress(s: &str) {
    eprintln!("benchmark: {s}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_says_how_to_get_one() {
        let e = clusterlink_bin(Some("/nonexistent/clusterlink".into())).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("--clusterlink PATH"), "{msg}");
        let plain = tempfile::NamedTempFile::new().unwrap();
        let e = clusterlink_bin(Some(plain.path().into())).unwrap_err();
        assert!(format!("{e:#}").contains("not an executable"), "{e:#}");
    }
}
