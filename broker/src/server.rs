//! Serving the broker: TLS with optional client certificates (joining needs none; everything
//! else checks one), message size limits, graceful shutdown. The TLS configuration is the
//! broker's own (tokio-rustls under tonic) so that a new CA or server certificate takes effect
//! on the next handshake, without a restart and without dropping a connection.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clusterlink_api::{MAX_MESSAGE_BYTES, proto::broker_server::BrokerServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tracing::{debug, error, info, warn};

use crate::pki::{CertAndKey, PkiError, Trust, certificates_der};
use crate::service::{BrokerService, CertificatePolicy, Clock};
use crate::store::{Store, StoreError};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("TLS configuration: {0}")]
    Tls(String),
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
    /// Certificate lifetime and renewal grace.
    pub certificates: CertificatePolicy,
    /// Told once the broker serves (its store open, its registry loaded).
    pub ready: clusterlink_broker_client::Ready,
}

/// The broker's TLS material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerTls {
    /// The CA that signs (and is trusted).
    pub ca: CertAndKey,
    pub server: CertAndKey,
    /// During a CA rotation: the CA being retired (PEM certificate), trusted until
    /// `rotate-ca finish`.
    pub retiring_ca: Option<String>,
}

impl BrokerTls {
    /// What the service trusts and signs with, and the rustls configuration that goes with
    /// it, both checked.
    fn load(&self) -> Result<(Arc<Trust>, Arc<ServerConfig>), ServeError> {
        let trust = Trust::new(&self.ca, self.retiring_ca.as_deref())?;
        let tls = |e: &dyn std::fmt::Display| ServeError::Tls(e.to_string());
        let mut roots = RootCertStore::empty();
        for der in certificates_der(&trust.bundle_pem, "the trusted CA certificates")? {
            roots.add(CertificateDer::from(der)).map_err(|e| tls(&e))?;
        }
        let verifier = WebPkiClientVerifier::builder(roots.into())
            .allow_unauthenticated()
            .build()
            .map_err(|e| tls(&e))?;
        let chain = certificates_der(&self.server.cert_pem, "the server certificate")?
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(self.server.key_pem.as_bytes())
            .map_err(|e| tls(&format!("the server key: {e}")))?;
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| tls(&e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(trust), Arc::new(config)))
    }
}

/// Serves the broker on `listener` until `shutdown` resolves. Then it stops accepting, ends
/// every watch stream with `UNAVAILABLE` (clients reconnect, to this broker's successor), lets
/// unary calls in flight finish, and returns; the store is released once the calls are done.
///
/// Each value `tls` takes (a CA rotation, a new server certificate) is checked and used from
/// the next handshake and the next call on; one that does not load is logged and the one in
/// use kept.
pub async fn serve<S: Store>(
    store: S,
    mut tls: watch::Receiver<BrokerTls>,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let backend = store.backend();
    let listen = listener.local_addr().ok().map(|a| a.ip());
    let (trust, config) = tls.borrow_and_update().load()?;
    let (trust_tx, trust_rx) = watch::channel(trust);
    let config = Arc::new(RwLock::new(config));
    let service = BrokerService::new(store, trust_rx, clock)
        .await?
        .protect(listen.into_iter().chain(options.protected))
        .with_limits(options.limits)
        .with_certificates(options.certificates);
    // However serving ends, the watch streams and the followers end with it and let go of the
    // store.
    let closing = service.closing();
    let _close_on_return = closing.clone().drop_guard();
    options.ready.ok();
    let reload = {
        let config = config.clone();
        tokio::spawn(closing.clone().run_until_cancelled_owned(async move {
            while tls.changed().await.is_ok() {
                let next = tls.borrow_and_update().clone();
                match next.load() {
                    Ok((trust, c)) => {
                        *config.write().unwrap_or_else(|p| p.into_inner()) = c;
                        trust_tx.send_replace(trust);
                        info!(
                            rotating = next.retiring_ca.is_some(),
                            "broker TLS reloaded: new handshakes use it"
                        );
                    }
                    Err(e) => {
                        error!(error = %e, "new TLS material refused; keeping the one in use")
                    }
                }
            }
        }))
    };
    let (conns_tx, conns) = mpsc::channel(64);
    let accept = tokio::spawn(accept(listener, config, conns_tx));
    let addr = listen;
    info!(?addr, store = backend, "broker serving");
    let served = Server::builder()
        .add_service(
            BrokerServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(conns), async move {
            shutdown.await;
            // The listener closes; the watch streams end now rather than when their clients
            // go (they would hold the server, and the store, open); unary calls in flight
            // finish.
            info!("broker stopping: ending watch streams");
            closing.cancel();
        })
        .await
        .map_err(ServeError::Transport);
    // The listening socket is closed when this returns: a successor can bind at once.
    accept.abort();
    let _ = accept.await;
    reload.abort();
    served
}

/// Accepts connections and runs each TLS handshake in a task of its own (a slow client holds
/// up nobody), with the configuration current at the handshake; hands the finished ones to
/// the server until it stops taking them.
async fn accept(
    listener: TcpListener,
    config: Arc<RwLock<Arc<ServerConfig>>>,
    conns: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: back off rather than spin.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = conns.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(config.read().unwrap_or_else(|p| p.into_inner()).clone());
        let conns = conns.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = conns.send(Ok(tls)).await;
                }
                Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
