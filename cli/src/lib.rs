//! What the `clusterlink` binary shares with `clusterlink-bench`: output in `-o
//! table|json|yaml`, and the shutdown signal every long-running command waits for. The
//! commands themselves are in the binary (`main.rs`, `cmd/`).

pub mod daemon;
pub mod output;

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
