//! How every long-running command stops. The first SIGTERM or SIGINT asks it to stop (each
//! daemon then ends its client streams, withdraws what it published and cleans up); it has
//! `--shutdown-timeout` to do so, and past that the process exits anyway, so a rolling
//! restart never waits on a client that does not let go. A second signal exits at once.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{info, warn};

/// The shutdown bound every daemon takes.
#[derive(clap::Args, Clone, Debug)]
pub struct ShutdownArgs {
    /// How long the daemon may take to stop after SIGTERM/SIGINT before it exits regardless
    /// (0.1s to 5m).
    #[arg(long, default_value = "5s", value_parser = parse_grace)]
    pub shutdown_timeout: humantime::Duration,
}

impl ShutdownArgs {
    pub fn grace(&self) -> Duration {
        *self.shutdown_timeout
    }
}

fn parse_grace(s: &str) -> Result<humantime::Duration, String> {
    crate::duration_within(s, Duration::from_millis(100), Duration::from_secs(300))
}

/// What a daemon waits on: resolves when it is asked to stop.
pub type Shutdown = WaitForCancellationFutureOwned;

/// Runs `work` until it ends by itself, or until a signal asks it to stop and it does so within
/// `grace`. `what` names the daemon in logs and errors.
pub async fn run<T, F>(what: &str, grace: Duration, work: impl FnOnce(Shutdown) -> F) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    run_inner(what, grace, crate::Signals::new()?, || {}, work).await
}

/// Like [`run`], with `/healthz` and `/readyz` served on `health.health_listen` (if given):
/// `work` reports its readiness through the sender it is handed (not ready, saying
/// `starting`, until it does); from the stop signal on, readyz says `stopping`.
pub async fn run_with_health<T, F>(
    what: &str,
    grace: Duration,
    health: &crate::health::HealthArgs,
    work: impl FnOnce(Shutdown, crate::health::Ready) -> F,
) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    let signals = crate::Signals::new()?;
    let (ready, watched) = tokio::sync::watch::channel(Err("starting".to_owned()));
    if let Some(addr) = health.health_listen {
        let bound = crate::health::serve(addr, watched).await?;
        info!(%bound, "serving /healthz and /readyz");
    }
    let stopping = ready.clone();
    run_inner(
        what,
        grace,
        signals,
        move || {
            let _previous = stopping.send_replace(Err("stopping".to_owned()));
        },
        |stop| work(stop, crate::health::Ready::new(ready)),
    )
    .await
}

async fn run_inner<T, F>(
    what: &str,
    grace: Duration,
    mut signals: crate::Signals,
    on_stop: impl FnOnce(),
    work: impl FnOnce(Shutdown) -> F,
) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    // `signals` listens from before the work starts: a SIGTERM while the daemon is still
    // starting (its sockets already answering) asks it to stop rather than killing it.
    let stop = CancellationToken::new();
    let work = work(stop.clone().cancelled_owned());
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        () = signals.recv() => {}
    }
    info!(grace = %humantime::format_duration(grace), "{what} stopping");
    on_stop();
    stop.cancel();
    tokio::select! {
        r = tokio::time::timeout(grace, &mut work) => match r {
            Ok(r) => r,
            Err(_) => {
                warn!("{what} did not stop within its shutdown timeout");
                Err(anyhow!(
                    "{what} did not stop within {} of the signal and was ended without \
                     finishing (raise --shutdown-timeout if it needs longer)",
                    humantime::format_duration(grace)
                ))
            }
        },
        () = signals.recv() => Err(anyhow!("{what} ended at once by a second signal")),
    }
}
