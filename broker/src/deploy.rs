//! The broker's data directory:
//!
//! ```text
//! DATA_DIR/broker.yaml          listen and advertised address, store
//! DATA_DIR/pki/ca.crt, ca.key   the CA (key mode 0600)
//! DATA_DIR/pki/server.crt, .key the broker's server certificate
//! DATA_DIR/admin.yaml           the operator's credentials (mode 0600)
//! DATA_DIR/broker-info.yaml     what clusters join with (holds a token; mode 0600)
//! DATA_DIR/store.redb           the embedded store, when it is used
//! ```
//!
//! Brokers sharing one etcd each need a copy of `pki/` (they sign with the same CA).

use clusterlink_broker_client::files::MAX_FILE_BYTES;
use clusterlink_broker_client::fs::read_limited;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::pki::{Ca, CertAndKey, PkiError, new_ca};
use crate::server::BrokerTls;
use crate::store::embedded::EmbeddedOptions;
use crate::store::{EmbeddedStore, EtcdStore, StoreError};
use clusterlink_broker_client::files::{API_VERSION, FileError, write_yaml};
use clusterlink_broker_client::fs::write_atomic;

#[derive(Debug, Error)]
pub enum DeployError {
    #[error(
        "{0} already holds a broker (pki/ca.crt exists); run it with `clusterlink broker run --data-dir {0}`, or choose an empty directory"
    )]
    AlreadyDeployed(PathBuf),
    #[error(
        "{0} holds no broker (no broker.yaml); create one with `clusterlink deploy-broker --data-dir {0}`"
    )]
    NotDeployed(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid broker config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Write(#[from] FileError),
    #[error("certificates: {0}")]
    Pki(#[from] PkiError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Which store a broker uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// redb in the data directory.
    Embedded,
    /// `etcd://HOST:PORT[,HOST:PORT…]`.
    Etcd(String),
}

impl FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "embedded" {
            Ok(StoreSpec::Embedded)
        } else if (s.starts_with("etcd://") && s.len() > "etcd://".len())
            || (s.starts_with("etcds://") && s.len() > "etcds://".len())
        {
            Ok(StoreSpec::Etcd(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a store: use `embedded`, `etcd://HOST:PORT[,HOST:PORT...]` or `etcds://HOST:PORT[,...]?ca=FILE&cert=FILE&key=FILE`"
            ))
        }
    }
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Embedded => f.write_str("embedded"),
            StoreSpec::Etcd(u) => f.write_str(u),
        }
    }
}

/// An opened store of either kind.
#[derive(Clone)]
pub enum AnyStore {
    Embedded(EmbeddedStore),
    Etcd(Box<EtcdStore>),
}

pub const ETCD_NAMESPACE: &str = "/clusterlink";

impl StoreSpec {
    pub async fn open(&self, data_dir: &Path) -> Result<AnyStore, StoreError> {
        Ok(match self {
            StoreSpec::Embedded => {
                AnyStore::Embedded(EmbeddedStore::open(data_dir, EmbeddedOptions::default())?)
            }
            StoreSpec::Etcd(url) => {
                AnyStore::Etcd(Box::new(EtcdStore::connect(url, ETCD_NAMESPACE).await?))
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerConfig {
    pub api_version: String,
    pub kind: String,
    pub listen: SocketAddr,
    /// HOST:PORT that clusters use to reach this broker.
    pub advertise: String,
    /// `embedded` or `etcd://…`.
    pub store: String,
    /// Per-cluster limits (each field optional; defaults otherwise).
    #[serde(default)]
    pub limits: crate::limits::Limits,
}

pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("broker.yaml")
    }
    pub fn admin_path(&self) -> PathBuf {
        self.root.join("admin.yaml")
    }
    pub fn broker_info_path(&self) -> PathBuf {
        self.root.join("broker-info.yaml")
    }
    fn pki(&self, name: &str) -> PathBuf {
        self.root.join("pki").join(name)
    }

    /// Creates the CA, the server and admin certificates and the config. Refuses a directory
    /// that already holds a broker: its CA is what every joined cluster trusts.
    pub fn init(
        &self,
        now: SystemTime,
        config: &BrokerConfig,
        server_names: &[String],
    ) -> Result<(BrokerTls, CertAndKey), DeployError> {
        if self.pki("ca.crt").exists() {
            return Err(DeployError::AlreadyDeployed(self.root.clone()));
        }
        let ca = new_ca(now)?;
        let loaded = Ca::load(&ca)?;
        let server = loaded.server_cert(now, server_names)?;
        let admin = loaded.admin_cert(now)?;
        let write = |path: PathBuf, text: &str, mode| {
            write_atomic(&path, text.as_bytes(), mode)
                .map_err(|source| FileError::Write { path, source })
        };
        write(self.pki("ca.key"), &ca.key_pem, 0o600)?;
        write(self.pki("server.key"), &server.key_pem, 0o600)?;
        write(self.pki("server.crt"), &server.cert_pem, 0o644)?;
        write_yaml(&self.config_path(), config, 0o644)?;
        // Last: its presence marks the directory as deployed.
        write(self.pki("ca.crt"), &ca.cert_pem, 0o644)?;
        Ok((BrokerTls { ca, server }, admin))
    }

    pub fn load_config(&self) -> Result<BrokerConfig, DeployError> {
        let path = self.config_path();
        if !path.exists() {
            return Err(DeployError::NotDeployed(self.root.clone()));
        }
        let text = read_limited(&path, MAX_FILE_BYTES).map_err(|source| DeployError::Read {
            path: path.clone(),
            source,
        })?;
        let c: BrokerConfig = serde_saphyr::from_str(&text).map_err(|e| DeployError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if c.api_version != API_VERSION || c.kind != "BrokerConfig" {
            return Err(DeployError::Config {
                path,
                reason: format!("expected apiVersion {API_VERSION} and kind BrokerConfig"),
            });
        }
        c.store
            .parse::<StoreSpec>()
            .map_err(|reason| DeployError::Config {
                path: self.config_path(),
                reason,
            })?;
        Ok(c)
    }

    pub fn load_tls(&self) -> Result<BrokerTls, DeployError> {
        let read = |name: &str| {
            let path = self.pki(name);
            read_limited(&path, MAX_FILE_BYTES).map_err(|source| DeployError::Read { path, source })
        };
        Ok(BrokerTls {
            ca: CertAndKey {
                cert_pem: read("ca.crt")?,
                key_pem: read("ca.key")?,
            },
            server: CertAndKey {
                cert_pem: read("server.crt")?,
                key_pem: read("server.key")?,
            },
        })
    }
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr, advertise: String, store: &StoreSpec) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: "BrokerConfig".into(),
            listen,
            advertise,
            store: store.to_string(),
            limits: crate::limits::Limits::default(),
        }
    }
}
