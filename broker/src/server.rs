//! Serving the broker: TLS with optional client certificates (joining needs none; everything
//! else checks one), message size limits, graceful shutdown.

use std::future::Future;
use std::sync::Arc;

use clusterlink_api::{MAX_MESSAGE_BYTES, proto::broker_server::BrokerServer};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::pki::{Ca, CertAndKey, PkiError};
use crate::service::{BrokerService, Clock};
use crate::store::{Store, StoreError};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("serving: {0}")]
    Transport(#[source] tonic::transport::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("CA: {0}")]
    Ca(#[from] PkiError),
}

/// What a broker is told besides its store and TLS.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// The broker's addresses besides the listen address (the advertised one), which no
    /// cluster's CIDRs may cover.
    pub protected: Vec<std::net::IpAddr>,
    /// Per-cluster limits on records and write rate.
    pub limits: crate::limits::Limits,
}

/// The broker's TLS material.
#[derive(Clone, Debug)]
pub struct BrokerTls {
    pub ca: CertAndKey,
    pub server: CertAndKey,
}

/// Serves the broker on `listener` until `shutdown` resolves. Then it stops accepting, ends
/// every watch stream with `UNAVAILABLE` (clients reconnect, to this broker's successor), lets
/// unary calls in flight finish, and returns; the store is released once the calls are done.
pub async fn serve<S: Store>(
    store: S,
    tls: BrokerTls,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let backend = store.backend();
    let listen = listener.local_addr().ok().map(|a| a.ip());
    let service = BrokerService::new(store, Ca::load(&tls.ca)?, clock)
        .await?
        .protect(listen.into_iter().chain(options.protected))
        .with_limits(options.limits);
    // However serving ends, the watch streams and the followers end with it and let go of the
    // store.
    let closing = service.closing();
    let _close_on_return = closing.clone().drop_guard();
    let tls_config = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &tls.server.cert_pem,
            &tls.server.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&tls.ca.cert_pem))
        .client_auth_optional(true);
    let addr = listener.local_addr().ok();
    info!(?addr, store = backend, "broker serving");
    Server::builder()
        .tls_config(tls_config)
        .map_err(ServeError::Tls)?
        .add_service(
            BrokerServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            // The listener closes; the watch streams end now rather than when their clients
            // go (they would hold the server, and the store, open); unary calls in flight
            // finish.
            info!("broker stopping: ending watch streams");
            closing.cancel();
        })
        .await
        .map_err(ServeError::Transport)
}
