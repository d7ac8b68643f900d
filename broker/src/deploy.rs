//! The broker's data directory:
//!
//! ```text
//! DATA_DIR/broker.yaml          listen and advertised address, store
//! DATA_DIR/pki/ca.crt, ca.key   the CA (key mode 0600)
//! DATA_DIR/pki/server.crt, .key the broker's server certificate
//! DATA_DIR/pki/retiring-ca.crt  during a CA rotation: the CA being retired (still trusted)
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
    #[error(
        "a CA rotation is already under way in {0} (pki/retiring-ca.crt exists); finish it first: clusterlink broker rotate-ca finish --data-dir {0}"
    )]
    RotationUnderWay(PathBuf),
    #[error(
        "no CA rotation is under way in {0}; start one with clusterlink broker rotate-ca start --data-dir {0}"
    )]
    NoRotation(PathBuf),
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
                "{s:?} is not a store: use `embedded`, `etcd://HOST:PORT[,HOST:PORT...]` or `etcds://HOST:PORT[,...]?ca=FILE&cert=FILE&key=FILE`, either with `user=NAME&password-file=FILE` for etcd's own authentication"
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
    /// How cluster certificates are issued (each field optional; defaults otherwise).
    #[serde(default)]
    pub certificates: CertificatesConfig,
}

/// broker.yaml's `certificates:`, durations as `365d`, `1h`, ...
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CertificatesConfig {
    /// How long a certificate issued to a cluster is valid (1h to 5y; default 365d).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validity: Option<String>,
    /// How long a cluster's certificate keeps working after it was renewed (1m to 7d, and
    /// under half the validity; default 1h).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewal_grace: Option<String>,
}

impl CertificatesConfig {
    /// The policy, checked; an error says which field is wrong and what is allowed.
    pub fn policy(&self) -> Result<crate::service::CertificatePolicy, String> {
        use std::time::Duration;
        let mut p = crate::service::CertificatePolicy::default();
        let parse = |field: &str, v: &str, min: Duration, max: Duration| {
            let d = humantime::parse_duration(v)
                .map_err(|e| format!("certificates.{field} {v:?}: {e}"))?;
            if d < min || d > max {
                return Err(format!(
                    "certificates.{field} {v:?} is out of range: give {} to {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ));
            }
            Ok(d)
        };
        const DAY: u64 = 24 * 3600;
        if let Some(v) = &self.validity {
            p.validity = parse(
                "validity",
                v,
                Duration::from_secs(3600),
                Duration::from_secs(5 * 365 * DAY),
            )?;
        }
        if let Some(v) = &self.renewal_grace {
            p.renewal_grace = parse(
                "renewalGrace",
                v,
                Duration::from_secs(60),
                Duration::from_secs(7 * DAY),
            )?;
        }
        if p.renewal_grace * 2 > p.validity {
            return Err(format!(
                "certificates.renewalGrace ({}) must be under half of certificates.validity ({})",
                humantime::format_duration(p.renewal_grace),
                humantime::format_duration(p.validity)
            ));
        }
        Ok(p)
    }
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

    /// Writes `pki/NAME` atomically with `mode`.
    fn write_pki(&self, name: &str, text: &str, mode: u32) -> Result<(), FileError> {
        let path = self.pki(name);
        write_atomic(&path, text.as_bytes(), mode)
            .map_err(|source| FileError::Write { path, source })
    }

    /// Moves `pki/FROM` over `pki/TO` (one atomic step).
    fn rename_pki(&self, from: &str, to: &str) -> Result<(), FileError> {
        let path = self.pki(to);
        std::fs::rename(self.pki(from), &path).map_err(|source| FileError::Write { path, source })
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
        self.write_pki("ca.key", &ca.key_pem, 0o600)?;
        self.write_pki("server.key", &server.key_pem, 0o600)?;
        self.write_pki("server.crt", &server.cert_pem, 0o644)?;
        write_yaml(&self.config_path(), config, 0o644)?;
        // Last: its presence marks the directory as deployed.
        self.write_pki("ca.crt", &ca.cert_pem, 0o644)?;
        Ok((
            BrokerTls {
                ca,
                server,
                retiring_ca: None,
            },
            admin,
        ))
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
            .and_then(|_| c.limits.check())
            .and_then(|_| c.certificates.policy().map(drop))
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
            retiring_ca: match self.pki("retiring-ca.crt") {
                p if p.exists() => Some(read("retiring-ca.crt")?),
                _ => None,
            },
        })
    }

    /// Renews what the broker itself holds before it expires: its server certificate (same
    /// names, same CA) and the admin credentials, each at two thirds of its life, as the
    /// clusters' components do theirs. Returns what was renewed. The running broker picks a
    /// new server certificate up like any other TLS change.
    pub fn renew_own_certificates(
        &self,
        now: SystemTime,
    ) -> Result<Vec<&'static str>, DeployError> {
        use clusterlink_broker_client::renew::{Action, decide, validity};
        let due = |pem: &str| {
            validity(pem).is_ok_and(|v| matches!(decide(now, v, None, ""), Action::Renew(_)))
        };
        let tls = self.load_tls()?;
        let ca = Ca::load(&tls.ca)?;
        let mut renewed = Vec::new();
        if due(&tls.server.cert_pem) {
            let server = ca.reissue_server_cert(now, &tls.server.cert_pem)?;
            self.replace_server_cert(&server)?;
            renewed.push("the broker's server certificate");
        }
        let admin_path = self.admin_path();
        if let Ok(admin) = clusterlink_broker_client::Credentials::read(&admin_path)
            && due(&admin.certificate)
        {
            let fresh = ca.admin_cert(now)?;
            clusterlink_broker_client::Credentials {
                certificate: fresh.cert_pem,
                private_key: fresh.key_pem,
                ..admin
            }
            .write(&admin_path)?;
            renewed.push("the admin credentials");
        }
        Ok(renewed)
    }

    /// Puts a new server certificate and key in place (each written aside, then renamed).
    fn replace_server_cert(&self, server: &CertAndKey) -> Result<(), DeployError> {
        self.write_pki("next-server.key", &server.key_pem, 0o600)?;
        self.write_pki("next-server.crt", &server.cert_pem, 0o644)?;
        self.rename_pki("next-server.key", "server.key")?;
        self.rename_pki("next-server.crt", "server.crt")?;
        Ok(())
    }

    /// Is a CA rotation under way?
    pub fn rotating(&self) -> bool {
        self.pki("retiring-ca.crt").exists()
    }

    /// Starts a CA rotation: a new CA signs from now on, and the old one stays trusted (its
    /// certificate in `pki/retiring-ca.crt`) until [`DataDir::finish_rotation`]. The server
    /// keeps its certificate (from the old CA: clients that have not renewed yet trust only
    /// that one). Returns the new admin credentials (from the new CA, trusting both).
    ///
    /// Crash-safe: the new CA is written aside first; the step that commits is the rename of
    /// its certificate over `ca.crt`, and a start that was cut short anywhere is completed by
    /// the next one.
    pub fn start_rotation(&self, now: SystemTime) -> Result<(BrokerTls, CertAndKey), DeployError> {
        // Written in this order: retiring-ca.crt, next-ca.key, next-ca.crt; then next-ca.key
        // and next-ca.crt are moved over ca.key and ca.crt. Whatever step a crash stopped at,
        // the next start goes on from there.
        let staged = self.pki("next-ca.crt").exists();
        if !staged {
            let old = self.load_tls()?;
            if let Some(retiring) = &old.retiring_ca
                && *retiring != old.ca.cert_pem
            {
                return Err(DeployError::RotationUnderWay(self.root.clone()));
            }
            self.write_pki("retiring-ca.crt", &old.ca.cert_pem, 0o644)?;
            let next = new_ca(now)?;
            self.write_pki("next-ca.key", &next.key_pem, 0o600)?;
            self.write_pki("next-ca.crt", &next.cert_pem, 0o644)?;
        }
        // The key first: until the certificate follows, ca.crt names the old CA and loading
        // fails loudly (key and certificate differ) rather than signing with the wrong key.
        if self.pki("next-ca.key").exists() {
            self.rename_pki("next-ca.key", "ca.key")?;
        }
        self.rename_pki("next-ca.crt", "ca.crt")?;
        let tls = self.load_tls()?;
        let admin = Ca::load(&tls.ca)?.admin_cert(now)?;
        Ok((tls, admin))
    }

    /// Ends a CA rotation: the server gets a certificate from the new CA (for the same names)
    /// and the retiring CA is no longer trusted. Returns the new admin credentials.
    pub fn finish_rotation(&self, now: SystemTime) -> Result<(BrokerTls, CertAndKey), DeployError> {
        if !self.rotating() {
            return Err(DeployError::NoRotation(self.root.clone()));
        }
        let tls = self.load_tls()?;
        let ca = Ca::load(&tls.ca)?;
        let server = ca.reissue_server_cert(now, &tls.server.cert_pem)?;
        self.replace_server_cert(&server)?;
        let path = self.pki("retiring-ca.crt");
        std::fs::remove_file(&path).map_err(|source| FileError::Write { path, source })?;
        let tls = self.load_tls()?;
        let admin = ca.admin_cert(now)?;
        Ok((tls, admin))
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
            certificates: CertificatesConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Trust;

    fn deployed() -> (tempfile::TempDir, DataDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let config = BrokerConfig::new(
            "127.0.0.1:7443".parse().unwrap(),
            "127.0.0.1:7443".into(),
            &StoreSpec::Embedded,
        );
        dir.init(SystemTime::now(), &config, &["127.0.0.1".into()])
            .unwrap();
        (tmp, dir)
    }

    #[test]
    fn a_rotation_signs_with_the_new_ca_trusts_both_then_retires_the_old() {
        let (_tmp, dir) = deployed();
        let before = dir.load_tls().unwrap();
        assert!(!dir.rotating());
        assert!(matches!(
            dir.finish_rotation(SystemTime::now()),
            Err(DeployError::NoRotation(_))
        ));
        let (during, _) = dir.start_rotation(SystemTime::now()).unwrap();
        assert!(dir.rotating());
        assert_ne!(during.ca, before.ca);
        assert_eq!(
            during.retiring_ca.as_deref(),
            Some(before.ca.cert_pem.as_str())
        );
        assert_eq!(
            during.server, before.server,
            "the server keeps its certificate"
        );
        assert_eq!(dir.load_tls().unwrap(), during);
        assert!(matches!(
            dir.start_rotation(SystemTime::now()),
            Err(DeployError::RotationUnderWay(_))
        ));
        let (after, _) = dir.finish_rotation(SystemTime::now()).unwrap();
        assert!(!dir.rotating());
        assert_eq!(after.ca, during.ca);
        assert_eq!(after.retiring_ca, None);
        assert_ne!(after.server, before.server);
        // The new server certificate is the new CA's, and loads with its key.
        Trust::new(&after.ca, None).unwrap();
        crate::pki::Ca::load(&after.ca).unwrap();
        assert_eq!(dir.load_tls().unwrap(), after);
    }

    #[test]
    fn the_broker_renews_its_own_certificates_at_two_thirds_of_their_life() {
        let (_tmp, dir) = deployed();
        let before = dir.load_tls().unwrap();
        let admin = clusterlink_broker_client::Credentials::read(&dir.admin_path()).ok();
        let now = SystemTime::now();
        assert!(dir.renew_own_certificates(now).unwrap().is_empty());
        let later = now + std::time::Duration::from_secs(250 * 24 * 3600);
        let renewed = dir.renew_own_certificates(later).unwrap();
        assert_eq!(
            renewed.len(),
            if admin.is_some() { 2 } else { 1 },
            "{renewed:?}"
        );
        let after = dir.load_tls().unwrap();
        assert_ne!(after.server, before.server);
        assert_eq!(after.ca, before.ca);
        // Renewed once: not again at the same moment.
        assert!(dir.renew_own_certificates(later).unwrap().is_empty());
    }

    #[test]
    fn a_rotation_start_cut_short_is_completed_by_the_next() {
        let (_tmp, dir) = deployed();
        let before = dir.load_tls().unwrap();
        // Cut short after the key was moved, before the certificate was.
        let next = new_ca(SystemTime::now()).unwrap();
        dir.write_pki("next-ca.key", &next.key_pem, 0o600).unwrap();
        dir.write_pki("next-ca.crt", &next.cert_pem, 0o644).unwrap();
        dir.write_pki("retiring-ca.crt", &before.ca.cert_pem, 0o644)
            .unwrap();
        dir.rename_pki("next-ca.key", "ca.key").unwrap();
        // Loading says what is wrong and how to mend it.
        let e = Trust::new(&dir.load_tls().unwrap().ca, None).err().unwrap();
        assert!(e.to_string().contains("run it again"), "{e}");
        // Mended: the key being staged no more, the certificate is.
        let (tls, _) = dir.start_rotation(SystemTime::now()).unwrap();
        assert_eq!(tls.ca, next);
        assert_eq!(
            tls.retiring_ca.as_deref(),
            Some(before.ca.cert_pem.as_str())
        );
    }

    #[test]
    fn certificate_settings_are_checked_with_a_clear_error() {
        let ok = CertificatesConfig {
            validity: Some("30d".into()),
            renewal_grace: Some("2h".into()),
        }
        .policy()
        .unwrap();
        assert_eq!(ok.validity, std::time::Duration::from_secs(30 * 24 * 3600));
        for (validity, grace, says) in [
            (
                Some("10m"),
                None,
                "certificates.validity \"10m\" is out of range",
            ),
            (Some("20y"), None, "out of range"),
            (
                None,
                Some("10s"),
                "certificates.renewalGrace \"10s\" is out of range",
            ),
            (Some("2h"), Some("2h"), "must be under half"),
            (Some("a year"), None, "certificates.validity \"a year\""),
        ] {
            let e = CertificatesConfig {
                validity: validity.map(str::to_owned),
                renewal_grace: grace.map(str::to_owned),
            }
            .policy()
            .unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        assert_eq!(
            CertificatesConfig::default()
                .policy()
                .unwrap()
                .renewal_grace,
            crate::service::CertificatePolicy::default().renewal_grace
        );
    }
}
