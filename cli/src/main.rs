//! `clusterlink`: the one binary. This file only parses and dispatches.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "clusterlink",
    version,
    about = "Layer-3 multi-cluster connectivity for Kubernetes"
)]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `clusterlink_broker=debug`.
    #[arg(long, global = true, env = "CLUSTERLINK_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "CLUSTERLINK_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a broker: its CA, certificates, config, and a broker-info file to join with.
    DeployBroker(cmd::broker::DeployArgs),
    /// Run or administer a broker.
    #[command(subcommand)]
    Broker(cmd::broker::BrokerCommand),
    /// Run this node's gateway.
    #[command(subcommand)]
    Gateway(cmd::gateway::GatewayCommand),
    /// Run or uninstall this node's route agent.
    #[command(subcommand)]
    RouteAgent(cmd::route_agent::RouteAgentCommand),
    /// Run this cluster's DNS plugin (the `clusterset.local` zone).
    #[command(subcommand)]
    Dns(cmd::dns::DnsCommand),
    /// Export a Service to the cluster set (a ServiceExport).
    #[command(subcommand)]
    Export(cmd::export::ExportCommand),
    /// Stop exporting a Service.
    #[command(subcommand)]
    Unexport(cmd::export::ExportCommand),
    /// Join this cluster to a broker with a broker-info file.
    Join(cmd::join::JoinArgs),
    /// Show what the broker knows.
    #[command(subcommand)]
    Show(cmd::show::ShowCommand),
    /// A multi-cluster lab from network namespaces on this host (root).
    #[command(subcommand)]
    Lab(cmd::lab::LabCommand),
}

#[allow(clippy::print_stderr)] // the binary reports its error on stderr
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::DeployBroker(a) => cmd::broker::deploy(a).await,
            Command::Broker(c) => cmd::broker::run(c).await,
            Command::Join(a) => cmd::join::run(a).await,
            Command::Gateway(c) => cmd::gateway::run(c).await,
            Command::RouteAgent(c) => cmd::route_agent::run(c).await,
            Command::Dns(c) => cmd::dns::run(c).await,
            Command::Export(c) => cmd::export::export(c).await,
            Command::Unexport(c) => cmd::export::unexport(c).await,
            Command::Show(c) => cmd::show::run(c).await,
            Command::Lab(c) => cmd::lab::run(c).await,
        }
    });
    // Tasks left behind (a blocking call, a client that did not let go) do not hold the exit
    // up: each daemon has had its --shutdown-timeout already.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(quiet_per_query(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(quiet_per_query("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A broker holds a connection per cluster: lift the soft open-files limit to the hard one.
/// The error and its causes, each said once: many errors name their cause in their own
/// message already (`cannot listen on X: address in use`), and would say it twice in a
/// plain `{:#}`.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// hickory-server logs two lines at info for every DNS query it answers; at info they are
/// noise (and cost: one write per query), so unless the filter asks for debug or trace, or
/// names hickory itself, they are left out.
fn quiet_per_query(filter: &str) -> String {
    let verbose = filter
        .split(',')
        .any(|d| !d.contains('=') && matches!(d.trim(), "debug" | "trace"));
    if verbose || filter.contains("hickory") {
        filter.to_owned()
    } else {
        format!("{filter},hickory_server::server=warn")
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    /// The lab launches `clusterlink` with typed invocations; each must parse here, so a
    /// renamed or dropped flag fails this test rather than a lab at run time.
    #[test]
    fn an_error_says_its_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let listen = clusterlink_dns::server::DnsError::Listen {
            addr: "127.0.0.1:53".parse().unwrap(),
            source: io,
        };
        let e = anyhow::Error::new(listen).context("DNS plugin failed");
        assert_eq!(
            super::report(&e),
            "DNS plugin failed: cannot listen on 127.0.0.1:53: address in use"
        );
        assert!(format!("{e:#}").matches("address in use").count() == 2);
    }

    #[test]
    fn dns_queries_are_not_logged_one_line_each_at_info() {
        assert_eq!(
            super::quiet_per_query("info"),
            "info,hickory_server::server=warn"
        );
        assert_eq!(super::quiet_per_query("debug"), "debug");
        assert_eq!(
            super::quiet_per_query("info,hickory_server=debug"),
            "info,hickory_server=debug"
        );
    }

    #[test]
    fn every_invocation_the_lab_launches_parses() {
        let examples = clusterlink_lab::invoke::examples();
        assert!(examples.len() >= 10);
        for args in examples {
            let argv = std::iter::once("clusterlink".to_owned()).chain(args.iter().cloned());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("`clusterlink {}` does not parse: {e}", args.join(" "));
            }
        }
    }
}
