//! `/healthz` and `/readyz` for the kubelet (and anyone else), on `--health-listen ADDR`:
//! healthz answers 200 while the process serves at all; readyz answers 200 only while the
//! component can do its job (what that means is each daemon's to say: the broker serves, the
//! gateway has its TUN device and a view of the cluster set, the route agent has programmed
//! its routes once, the DNS plugin has its first view) and 503 with the reason otherwise,
//! including from the moment it is asked to stop.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

pub use clusterlink_broker_client::{Readiness, Ready};

/// The flag every daemon takes.
#[derive(clap::Args, Clone, Debug)]
pub struct HealthArgs {
    /// Serve /healthz and /readyz here (e.g. 0.0.0.0:8081; off by default).
    #[arg(long, env = "CLUSTERLINK_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
}

/// The endpoints, over `ready`.
pub fn router(ready: watch::Receiver<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(
                |State(ready): State<watch::Receiver<Readiness>>| async move {
                    match &*ready.borrow() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                },
            ),
        )
        .with_state(ready)
}

/// Binds `addr` now (a port taken is an error at start, not later) and serves the endpoints
/// in the background for as long as the process runs.
pub async fn serve(addr: SocketAddr, ready: watch::Receiver<Readiness>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("Failed to listen on {addr} for /healthz and /readyz"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(ready)).await {
            tracing::warn!(error = %e, "the health endpoints stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readyz_follows_the_component_and_healthz_the_process() {
        let (tx, rx) = watch::channel(Err("waiting for the broker".to_owned()));
        let addr = serve("127.0.0.1:0".parse().unwrap(), rx).await.unwrap();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("not ready: waiting for the broker"), "{r}");
        let _old = tx.send_replace(Ok(()));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let _old = tx.send_replace(Err("stopping".into()));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/nothing").await.starts_with("HTTP/1.1 404"));
        // A port taken is an error at start.
        let (_, rx) = watch::channel(Ok(()));
        assert!(serve(addr, rx).await.is_err());
    }
}
