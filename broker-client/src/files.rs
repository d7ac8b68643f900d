//! The files an operator hands around: broker-info (`deploy-broker`, `broker token create`;
//! read by `join`) and credentials (`join`, `deploy-broker`'s admin.yaml; read by every
//! component). Each is parsed and checked once, at load.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clusterlink_api::ClusterId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fs::write_atomic;

pub const API_VERSION: &str = "clusterlink.dev/v1alpha1";

/// The largest broker-info or credentials file read (they are a few KiB): a path to
/// something else (`/dev/zero`, a log) is refused instead of read forever.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Error)]
pub enum FileError {
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
}

/// Who a credentials file speaks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Identity {
    /// The broker's operator (`DATA_DIR/admin.yaml`).
    Admin,
    /// A member cluster (written by `join`).
    Cluster(ClusterId),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Admin => f.write_str("admin"),
            Identity::Cluster(id) => write!(f, "{id}"),
        }
    }
}

impl FromStr for Identity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "admin" {
            return Ok(Identity::Admin);
        }
        s.parse::<ClusterId>()
            .map(Identity::Cluster)
            .map_err(|_| format!("identity {s:?} is neither admin nor a cluster ID"))
    }
}

impl TryFrom<String> for Identity {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Identity> for String {
    fn from(i: Identity) -> Self {
        i.to_string()
    }
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
    pub identity: Identity,
    pub certificate: String,
    pub private_key: String,
}

pub fn rfc3339_from_unix_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

fn check_pem(
    path: &Path,
    kind: &'static str,
    field: &str,
    pem: &str,
    tag: &str,
) -> Result<(), FileError> {
    if pem.contains(&format!("-----BEGIN {tag}")) && pem.contains(&format!("-----END {tag}")) {
        Ok(())
    } else {
        Err(FileError::Malformed {
            path: path.to_owned(),
            kind,
            reason: format!("{field} is not a PEM {tag}"),
        })
    }
}

/// Checks HOST:PORT.
pub fn check_address(address: &str) -> Result<(), FileError> {
    let bad = |reason: &str| FileError::Address {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| {
        bad("expected HOST:PORT (a port is needed, e.g. broker.example.com:7443)")
    })?;
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("the bracketed host is not an IPv6 address"))?;
        }
        None if host.contains(':') => {
            return Err(bad("an IPv6 address needs brackets: [ADDRESS]:PORT"));
        }
        None => check_host(host).map_err(|r| bad(&r))?,
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
    Ok(())
}

/// The IP of a HOST:PORT address when its host is one (`[v6]` too); `None` for a name.
pub fn address_ip(address: &str) -> Option<std::net::IpAddr> {
    let (host, _) = address.rsplit_once(':')?;
    host.trim_matches(['[', ']']).parse().ok()
}

/// Checks that `host` is an IP address or a DNS name (labels of letters, digits and `-`, not
/// starting or ending with `-`, at most 63 bytes each and 253 in all).
pub fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{host:?} is neither an IP address nor a DNS name (letters, digits, '-' and '.')"
        ));
    }
    Ok(())
}

/// Reads a small text file, refusing one over [`MAX_FILE_BYTES`].
pub fn read_bounded(path: &Path, kind: &'static str) -> Result<String, FileError> {
    crate::fs::read_limited(path, MAX_FILE_BYTES).map_err(|source| {
        if source.kind() == std::io::ErrorKind::FileTooLarge {
            FileError::Malformed {
                path: path.to_owned(),
                kind,
                reason: format!("it is {source}"),
            }
        } else {
            FileError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn read_yaml<T: for<'de> Deserialize<'de>>(
    path: &Path,
    kind: &'static str,
) -> Result<T, FileError> {
    let text = read_bounded(path, kind)?;
    serde_saphyr::from_str(&text).map_err(|e| FileError::Malformed {
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
) -> Result<(), FileError> {
    if api_version != API_VERSION || got_kind != kind {
        return Err(FileError::Malformed {
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
) -> Result<(), FileError> {
    check_header(path, kind, api_version, got_kind)?;
    check_address(address).map_err(|e| FileError::Malformed {
        path: path.to_owned(),
        kind,
        reason: e.to_string(),
    })?;
    check_pem(path, kind, "caCertificate", ca, "CERTIFICATE")
}

/// Serializes `v` as YAML and writes it to `path` atomically with `mode`; an error never
/// leaves an empty or partial file behind.
pub fn write_yaml<T: Serialize>(path: &Path, v: &T, mode: u32) -> Result<(), FileError> {
    let werr = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let text =
        serde_saphyr::to_string(v).map_err(|e| werr(std::io::Error::other(e.to_string())))?;
    write_atomic(path, text.as_bytes(), mode).map_err(werr)
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
    pub fn read(path: &Path, now: SystemTime) -> Result<Self, FileError> {
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
            return Err(FileError::Malformed {
                path: path.to_owned(),
                kind: KIND,
                reason: "token is not a clusterlink join token (clt1.<64 hex digits>)".into(),
            });
        }
        let expires: SystemTime =
            humantime::parse_rfc3339(&info.token_expires_at).map_err(|e| FileError::Malformed {
                path: path.to_owned(),
                kind: KIND,
                reason: format!("tokenExpiresAt {:?}: {e}", info.token_expires_at),
            })?;
        if now >= expires {
            return Err(FileError::Expired {
                path: path.to_owned(),
                at: info.token_expires_at.clone(),
            });
        }
        Ok(info)
    }

    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        // Holds a token: readable by its owner only.
        write_yaml(path, self, 0o600)
    }
}

/// What `join` writes to its output before it asks the broker anything: the key it joins
/// with. It proves the output can be written before a token is spent, and a join interrupted
/// after the broker registered the cluster is retried with the same key (the broker recognises
/// it). Replaced by the credentials when the join completes. Holds a private key: mode 0600.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PendingJoin {
    pub api_version: String,
    pub kind: String,
    /// HOST:PORT of the broker joined.
    pub address: String,
    pub cluster_id: ClusterId,
    pub private_key: String,
}

impl PendingJoin {
    const KIND: &'static str = "PendingJoin";

    pub fn new(address: String, cluster_id: ClusterId, private_key: String) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: Self::KIND.into(),
            address,
            cluster_id,
            private_key,
        }
    }

    /// Writes the file, failing if `path` exists (`create_new`): an operator's file is never
    /// replaced by a join that has not happened.
    pub fn create(&self, path: &Path) -> Result<(), FileError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let werr = |source| FileError::Write {
            path: path.to_owned(),
            source,
        };
        let text = serde_saphyr::to_string(self)
            .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(werr)?;
        let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
        if let Err(e) = written {
            drop(f);
            let _ = std::fs::remove_file(path);
            return Err(werr(e));
        }
        Ok(())
    }
}

/// What a join's output path holds already.
#[derive(Debug)]
pub enum JoinOutput {
    /// A join that did not finish: its key.
    Pending(PendingJoin),
    /// A join that did.
    Joined(Box<Credentials>),
}

impl JoinOutput {
    /// Reads `path` as either kind; `Ok(None)` if it does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>, FileError> {
        if !path.try_exists().map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })? {
            return Ok(None);
        }
        #[derive(Deserialize)]
        struct Header {
            kind: String,
        }
        let text = read_bounded(path, "credentials")?;
        let malformed = |kind, reason: String| FileError::Malformed {
            path: path.to_owned(),
            kind,
            reason,
        };
        let header: Header =
            serde_saphyr::from_str(&text).map_err(|e| malformed("credentials", e.to_string()))?;
        if header.kind == PendingJoin::KIND {
            let p: PendingJoin = serde_saphyr::from_str(&text)
                .map_err(|e| malformed(PendingJoin::KIND, e.to_string()))?;
            check_header(path, PendingJoin::KIND, &p.api_version, &p.kind)?;
            check_pem(
                path,
                PendingJoin::KIND,
                "privateKey",
                &p.private_key,
                "PRIVATE KEY",
            )?;
            Ok(Some(JoinOutput::Pending(p)))
        } else {
            Credentials::read(path).map(|c| Some(JoinOutput::Joined(Box::new(c))))
        }
    }
}

impl Credentials {
    pub fn new(address: String, ca: String, identity: Identity, cert: String, key: String) -> Self {
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

    pub fn read(path: &Path) -> Result<Self, FileError> {
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
        Ok(c)
    }

    /// The cluster these credentials speak for; `None` for the admin's.
    pub fn cluster(&self) -> Option<&ClusterId> {
        match &self.identity {
            Identity::Cluster(id) => Some(id),
            Identity::Admin => None,
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        write_yaml(path, self, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_once() {
        assert_eq!("admin".parse::<Identity>().unwrap(), Identity::Admin);
        assert_eq!(
            "east".parse::<Identity>().unwrap(),
            Identity::Cluster("east".parse().unwrap())
        );
        let e = "East_1".parse::<Identity>().unwrap_err();
        assert!(e.contains("neither admin nor a cluster ID"), "{e}");
        assert_eq!(Identity::Admin.to_string(), "admin");
    }

    #[test]
    fn a_huge_file_is_refused_not_read_whole() {
        let e = Credentials::read(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert!(check_address("broker:7443").is_ok());
        assert!(check_address("[::1]:7443").is_ok());
        assert!(check_address("10.0.0.1:7443").is_ok());
        assert_eq!(address_ip("10.0.0.1:7443"), "10.0.0.1".parse().ok());
        assert_eq!(address_ip("[fd00::1]:7443"), "fd00::1".parse().ok());
        assert_eq!(address_ip("broker:7443"), None);
        for bad in [
            "broker",
            ":7443",
            "broker:0",
            "broker:http",
            "fd00::1:7443",
            "[not-v6]:7443",
            "bro ker:7443",
            "-broker:7443",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }
}
