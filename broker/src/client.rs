//! Client side of the broker: the files an operator hands around (broker-info, credentials)
//! and a TLS connection to the broker.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clusterlink_api::{ClusterId, MAX_MESSAGE_BYTES, proto::broker_client::BrokerClient};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pki::BROKER_SERVER_NAME;

pub const API_VERSION: &str = "clusterlink.dev/v1alpha1";

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {kind} file: {reason}")]
    Malformed {
        path: PathBuf,
        kind: &'static str,
        reason: String,
    },
    #[error(
        "the join token in {path} expired at {at}; ask the broker's operator for a fresh broker-info file (clusterlink broker token create)"
    )]
    Expired { path: PathBuf, at: String },
    #[error("invalid broker address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error(
        "cannot reach the broker at {address}: {source}; check that it runs (clusterlink broker run) and that the address is reachable from here"
    )]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// What `deploy-broker` writes and `join` reads: where the broker is, how to trust it, and a
/// token to join with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerInfo {
    pub api_version: String,
    pub kind: String,
    /// HOST:PORT of the broker.
    pub address: String,
    pub ca_certificate: String,
    pub token: String,
    /// RFC 3339.
    pub token_expires_at: String,
}

/// A client identity: a cluster's (written by `join`) or the admin's (by `deploy-broker`).
/// Holds a private key: written with mode 0600.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    pub api_version: String,
    pub kind: String,
    pub address: String,
    pub ca_certificate: String,
    /// "admin" or the cluster ID.
    pub identity: String,
    pub certificate: String,
    pub private_key: String,
}

pub fn rfc3339_from_unix_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn check_pem(
    path: &Path,
    kind: &'static str,
    field: &str,
    pem: &str,
    tag: &str,
) -> Result<(), ClientError> {
    if pem.contains(&format!("-----BEGIN {tag}")) && pem.contains(&format!("-----END {tag}")) {
        Ok(())
    } else {
        Err(ClientError::Malformed {
            path: path.to_owned(),
            kind,
            reason: format!("{field} is not a PEM {tag}"),
        })
    }
}

/// Checks HOST:PORT.
pub fn check_address(address: &str) -> Result<(), ClientError> {
    let bad = |reason: &str| ClientError::Address {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
    Ok(())
}

fn read_yaml<T: for<'de> Deserialize<'de>>(
    path: &Path,
    kind: &'static str,
) -> Result<T, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| ClientError::Malformed {
        path: path.to_owned(),
        kind,
        reason: e.to_string(),
    })
}

fn check_header(
    path: &Path,
    kind: &'static str,
    api_version: &str,
    got_kind: &str,
) -> Result<(), ClientError> {
    if api_version != API_VERSION || got_kind != kind {
        return Err(ClientError::Malformed {
            path: path.to_owned(),
            kind,
            reason: format!(
                "expected apiVersion {API_VERSION} and kind {kind}, found {api_version} and {got_kind}"
            ),
        });
    }
    Ok(())
}

/// What both file kinds carry: their header, the broker's address and its CA.
fn check_common(
    path: &Path,
    kind: &'static str,
    api_version: &str,
    got_kind: &str,
    address: &str,
    ca: &str,
) -> Result<(), ClientError> {
    check_header(path, kind, api_version, got_kind)?;
    check_address(address).map_err(|e| ClientError::Malformed {
        path: path.to_owned(),
        kind,
        reason: e.to_string(),
    })?;
    check_pem(path, kind, "caCertificate", ca, "CERTIFICATE")
}

/// Writes `contents` to `path` with `mode`, atomically (temp file + rename).
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), ClientError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| ClientError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(werr)?;
    f.write_all(contents.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

/// Serializes for writing to `path`; an error never leaves an empty file behind.
pub fn to_yaml<T: Serialize>(path: &Path, v: &T) -> Result<String, ClientError> {
    serde_saphyr::to_string(v).map_err(|e| ClientError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

impl BrokerInfo {
    pub fn new(
        address: String,
        ca_certificate: String,
        token: String,
        expires_unix_ms: i64,
    ) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: "BrokerInfo".into(),
            address,
            ca_certificate,
            token,
            token_expires_at: rfc3339_from_unix_ms(expires_unix_ms),
        }
    }

    /// Reads and checks a broker-info file; an expired token is an error here already.
    pub fn read(path: &Path, now: SystemTime) -> Result<Self, ClientError> {
        const KIND: &str = "BrokerInfo";
        let info: BrokerInfo = read_yaml(path, KIND)?;
        check_common(
            path,
            KIND,
            &info.api_version,
            &info.kind,
            &info.address,
            &info.ca_certificate,
        )?;
        if !info.token.starts_with("clt1.") || info.token.len() != 5 + 64 {
            return Err(ClientError::Malformed {
                path: path.to_owned(),
                kind: KIND,
                reason: "token is not a clusterlink join token (clt1.<64 hex digits>)".into(),
            });
        }
        let expires: SystemTime =
            humantime::parse_rfc3339(&info.token_expires_at).map_err(|e| {
                ClientError::Malformed {
                    path: path.to_owned(),
                    kind: KIND,
                    reason: format!("tokenExpiresAt {:?}: {e}", info.token_expires_at),
                }
            })?;
        if now >= expires {
            return Err(ClientError::Expired {
                path: path.to_owned(),
                at: info.token_expires_at.clone(),
            });
        }
        Ok(info)
    }

    pub fn write(&self, path: &Path) -> Result<(), ClientError> {
        // Holds a token: readable by its owner only.
        write_file(path, &to_yaml(path, self)?, 0o600)
    }
}

impl Credentials {
    pub fn new(address: String, ca: String, identity: String, cert: String, key: String) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: "Credentials".into(),
            address,
            ca_certificate: ca,
            identity,
            certificate: cert,
            private_key: key,
        }
    }

    pub fn read(path: &Path) -> Result<Self, ClientError> {
        const KIND: &str = "Credentials";
        let c: Credentials = read_yaml(path, KIND)?;
        check_common(
            path,
            KIND,
            &c.api_version,
            &c.kind,
            &c.address,
            &c.ca_certificate,
        )?;
        check_pem(path, KIND, "certificate", &c.certificate, "CERTIFICATE")?;
        check_pem(path, KIND, "privateKey", &c.private_key, "PRIVATE KEY")?;
        if c.identity != "admin" && c.identity.parse::<ClusterId>().is_err() {
            return Err(ClientError::Malformed {
                path: path.to_owned(),
                kind: KIND,
                reason: format!(
                    "identity {:?} is neither admin nor a cluster ID",
                    c.identity
                ),
            });
        }
        Ok(c)
    }

    pub fn write(&self, path: &Path) -> Result<(), ClientError> {
        write_file(path, &to_yaml(path, self)?, 0o600)
    }
}

/// Connects to the broker at `address`, trusting `ca_pem`, presenting `identity` if given.
pub async fn connect(
    address: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<BrokerClient<Channel>, ClientError> {
    check_address(address)?;
    let mut tls = ClientTlsConfig::new()
        .domain_name(BROKER_SERVER_NAME)
        .ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let cerr = |source| ClientError::Connect {
        address: address.to_owned(),
        source,
    };
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| ClientError::Address {
            address: address.to_owned(),
            reason: e.to_string(),
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
pub async fn connect_with(creds: &Credentials) -> Result<BrokerClient<Channel>, ClientError> {
    connect(
        &creds.address,
        &creds.ca_certificate,
        Some((&creds.certificate, &creds.private_key)),
    )
    .await
}
