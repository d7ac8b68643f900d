//! A TLS connection to the broker.

use std::time::Duration;

use clusterlink_api::{MAX_MESSAGE_BYTES, proto::broker_client::BrokerClient};
use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::files::{Credentials, FileError, check_address};

/// The name the broker's server certificate carries, whatever its address: clients verify
/// it, so the broker can move without new certificates.
pub const BROKER_SERVER_NAME: &str = "broker.clusterlink.internal";

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error(transparent)]
    Address(#[from] FileError),
    #[error(
        "cannot reach the broker at {address}: {source}; check that it runs (clusterlink broker run) and that the address is reachable from here"
    )]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to the broker at `address`, trusting `ca_pem`, presenting `identity` (a PEM
/// certificate and key) if given.
pub async fn connect(
    address: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<BrokerClient<Channel>, ConnectError> {
    check_address(address)?;
    let mut tls = ClientTlsConfig::new()
        .domain_name(BROKER_SERVER_NAME)
        .ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let cerr = |source| ConnectError::Connect {
        address: address.to_owned(),
        source,
    };
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| {
            ConnectError::Address(FileError::Address {
                address: address.to_owned(),
                reason: e.to_string(),
            })
        })?
        .tls_config(tls)
        .map_err(cerr)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(cerr)?;
    Ok(BrokerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Connects with a credentials file's identity.
pub async fn connect_with(creds: &Credentials) -> Result<BrokerClient<Channel>, ConnectError> {
    connect(
        &creds.address,
        &creds.ca_certificate,
        Some((&creds.certificate, &creds.private_key)),
    )
    .await
}
