//! Credentials that stay valid. A component's credentials file is read again when it
//! changes, and a cluster's certificate is renewed before it expires, or at once when the
//! broker says so (a CA rotation, or a renewal made by another component sharing the file).
//! Every connection made after a change uses the new credentials, and [`LiveCredentials::changed`]
//! lets long-lived ones (watches, leases) reconnect at once.
//!
//! The decision ([`decide`]) is pure; [`keep`] is the thin loop around it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clusterlink_api::proto;
use rand::Rng;
use rcgen::PublicKeyData;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::connect::{ConnectError, connect_with};
use crate::files::{Credentials, FileError, Identity};
use crate::fs::write_atomic;

/// The credentials a component uses now. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LiveCredentials {
    rx: watch::Receiver<Arc<Credentials>>,
}

impl LiveCredentials {
    /// Credentials that never change (a CLI command, a test).
    pub fn fixed(creds: Credentials) -> Self {
        // No sender: `changed` then waits forever, `has_changed` says no.
        let (_, rx) = watch::channel(Arc::new(creds));
        LiveCredentials { rx }
    }

    /// The credentials to connect with now; marks them seen.
    pub fn current(&mut self) -> Arc<Credentials> {
        self.rx.borrow_and_update().clone()
    }

    /// The credentials now, without marking them seen.
    pub fn peek(&self) -> Arc<Credentials> {
        self.rx.borrow().clone()
    }

    /// Were the credentials replaced since [`Self::current`] was last called?
    pub fn has_changed(&self) -> bool {
        self.rx.has_changed().unwrap_or(false)
    }

    /// Resolves when the credentials were replaced since [`Self::current`] was last called.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A certificate's validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The validity of the (first) certificate of a PEM text.
pub fn validity(pem: &str) -> Result<Validity, String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = p.parse_x509().map_err(|e| e.to_string())?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok(Validity {
        not_before: at(cert.validity().not_before),
        not_after: at(cert.validity().not_after),
    })
}

/// What the broker said of the caller's certificate (WhoAmI).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advice {
    /// The CA certificates the broker trusts now.
    pub ca_bundle: String,
    /// Non-empty: renew now, for this reason.
    pub renew_reason: String,
}

/// What to do with a cluster's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Renew the certificate, for this reason.
    Renew(String),
    /// Trust this CA bundle instead (a rotation started or ended).
    Trust(String),
}

/// The share of a certificate's lifetime after which it is renewed.
pub const RENEW_AFTER: (u32, u32) = (2, 3);

/// Decides, at `now`, for a certificate valid for `v`, given what the broker advised (if it
/// could be asked) and the CA bundle the credentials trust now. Renews at two thirds of the
/// lifetime, or when the broker asks; otherwise follows the broker's CA bundle.
pub fn decide(now: SystemTime, v: Validity, advice: Option<&Advice>, trusted: &str) -> Action {
    if let Some(a) = advice.filter(|a| !a.renew_reason.is_empty()) {
        return Action::Renew(a.renew_reason.clone());
    }
    let lifetime = v.not_after.duration_since(v.not_before).unwrap_or_default();
    let renew_at = v.not_before + lifetime * RENEW_AFTER.0 / RENEW_AFTER.1;
    if now >= renew_at {
        return Action::Renew(format!(
            "the certificate expires at {}",
            humantime::format_rfc3339_seconds(v.not_after)
        ));
    }
    match advice {
        Some(a) if !a.ca_bundle.is_empty() && !same_pem(&a.ca_bundle, trusted) => {
            Action::Trust(a.ca_bundle.clone())
        }
        _ => Action::Keep,
    }
}

/// Same certificates, whatever the whitespace around them.
fn same_pem(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> impl Iterator<Item = &str> {
        s.lines().map(str::trim).filter(|l| !l.is_empty())
    }
    norm(a).eq(norm(b))
}

#[derive(Debug, Error)]
pub enum RenewError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the broker refused to {call}: {}", .status.message())]
    Refused {
        call: &'static str,
        status: tonic::Status,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot make a key pair: {0}")]
    Key(String),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot save the credentials: {0}")]
    Save(String),
}

/// Where renewed credentials are saved (and read back from by the components sharing them).
#[derive(Clone, Debug, Default)]
pub enum SaveTo {
    /// The credentials file itself (it must be writable).
    #[default]
    File,
    /// A Kubernetes Secret (its key holding the file), which the pods mount: the mounted file
    /// follows when the kubelet syncs it.
    #[cfg(feature = "kube")]
    Secret(crate::node::SecretRef),
}

/// How [`keep`] runs.
#[derive(Clone)]
pub struct KeepOptions {
    /// How often the file and the certificate are looked at (±10 %).
    pub check_every: Duration,
    /// Where the time comes from (tests move it by hand).
    pub now: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    /// Where renewed credentials go.
    pub save_to: SaveTo,
}

impl Default for KeepOptions {
    fn default() -> Self {
        KeepOptions {
            check_every: Duration::from_secs(60),
            now: Arc::new(SystemTime::now),
            save_to: SaveTo::File,
        }
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps the credentials at `path` (read already as `initial`) current, for as long as the
/// returned handle or a clone of it lives.
pub fn keep(path: PathBuf, initial: Credentials, options: KeepOptions) -> LiveCredentials {
    let (tx, rx) = watch::channel(Arc::new(initial.clone()));
    tokio::spawn(async move {
        // The file as last read: a change to it is adopted; the credentials in use may be
        // ahead of it (saved to a Secret whose mount has not caught up).
        let mut last_file = initial;
        loop {
            let jitter = rand::rng().random_range(0.9..1.1);
            tokio::select! {
                _ = tokio::time::sleep(options.check_every.mul_f64(jitter)) => {}
                _ = tx.closed() => return,
            }
            if let Err(e) = check(&path, &tx, &options, &mut last_file).await {
                warn!(path = %path.display(), error = %e, "cannot keep the credentials current; retrying");
            }
        }
    });
    LiveCredentials { rx }
}

/// One look: the file again, then the broker's advice, then what [`decide`] says.
async fn check(
    path: &Path,
    tx: &watch::Sender<Arc<Credentials>>,
    options: &KeepOptions,
    last_file: &mut Credentials,
) -> Result<(), RenewError> {
    // Another component (or the operator) may have written the file.
    let on_disk = Credentials::read(path)?;
    if on_disk != *last_file {
        *last_file = on_disk.clone();
        tx.send_if_modified(|cur| {
            let changed = **cur != on_disk;
            if changed {
                info!(path = %path.display(), "credentials file changed; using it");
                *cur = Arc::new(on_disk);
            }
            changed
        });
    }
    let creds = tx.borrow().clone();
    if !matches!(creds.identity, Identity::Cluster(_)) {
        return Ok(());
    }
    let v = validity(&creds.certificate).map_err(|reason| FileError::Malformed {
        path: path.to_owned(),
        kind: "Credentials",
        reason: format!("certificate: {reason}"),
    })?;
    let advice = match advise(&creds).await {
        Ok(a) => Some(a),
        Err(e) => {
            warn!(error = %e, "cannot ask the broker about the certificate");
            None
        }
    };
    match decide((options.now)(), v, advice.as_ref(), &creds.ca_certificate) {
        Action::Keep => Ok(()),
        Action::Trust(bundle) => {
            let next = Credentials {
                ca_certificate: bundle,
                ..(*creds).clone()
            };
            save(path, &options.save_to, &next, last_file).await?;
            info!(path = %path.display(), "the broker's CAs changed; credentials now trust them");
            tx.send_replace(Arc::new(next));
            Ok(())
        }
        Action::Renew(reason) => {
            // Where the result goes must take it: a certificate renewed and then lost would
            // leave the old one to lapse at the end of its grace.
            can_save(path, &options.save_to).await?;
            info!(path = %path.display(), %reason, "renewing the cluster certificate");
            let next = renew(&creds).await?;
            save(path, &options.save_to, &next, last_file).await?;
            info!(path = %path.display(), "cluster certificate renewed and saved");
            tx.send_replace(Arc::new(next));
            Ok(())
        }
    }
}

/// Checks, before renewing, that the result can be saved.
async fn can_save(path: &Path, to: &SaveTo) -> Result<(), RenewError> {
    match to {
        SaveTo::File => {
            // Writing the file's own bytes again proves it (and its directory) writable.
            let text =
                crate::fs::read_limited(path, crate::files::MAX_FILE_BYTES).map_err(|source| {
                    FileError::Read {
                        path: path.to_owned(),
                        source,
                    }
                })?;
            write_atomic(path, text.as_bytes(), 0o600).map_err(|source| FileError::Write {
                path: path.to_owned(),
                source,
            })?;
            Ok(())
        }
        #[cfg(feature = "kube")]
        SaveTo::Secret(secret) => secret
            .check()
            .await
            .map_err(|e| RenewError::Save(e.to_string())),
    }
}

/// Saves `c`: to the file (then the file as last read is `c`), or to the Secret (the mounted
/// file follows later).
async fn save(
    path: &Path,
    to: &SaveTo,
    c: &Credentials,
    last_file: &mut Credentials,
) -> Result<(), RenewError> {
    match to {
        SaveTo::File => {
            c.write(path)?;
            *last_file = c.clone();
            Ok(())
        }
        #[cfg(feature = "kube")]
        SaveTo::Secret(secret) => {
            let text = serde_saphyr::to_string(c).map_err(|e| RenewError::Save(e.to_string()))?;
            secret
                .write(text.into_bytes())
                .await
                .map_err(|e| RenewError::Save(e.to_string()))
        }
    }
}

async fn advise(creds: &Credentials) -> Result<Advice, RenewError> {
    let mut client = connect_with(creds).await?;
    let r = tokio::time::timeout(CALL_TIMEOUT, client.who_am_i(proto::WhoAmIRequest {}))
        .await
        .map_err(|_| RenewError::Timeout(CALL_TIMEOUT))?
        .map_err(|status| RenewError::Refused {
            call: "say who we are",
            status,
        })?
        .into_inner();
    Ok(Advice {
        ca_bundle: r.ca_certificate_pem,
        renew_reason: r.renew_reason,
    })
}

/// A new key, made here, and a certificate for it from the broker.
pub async fn renew(creds: &Credentials) -> Result<Credentials, RenewError> {
    let (key_pem, public_key_der) = new_client_key().map_err(|e| RenewError::Key(e.to_string()))?;
    let mut client = connect_with(creds).await?;
    let r = tokio::time::timeout(
        CALL_TIMEOUT,
        client.renew_certificate(proto::RenewCertificateRequest { public_key_der }),
    )
    .await
    .map_err(|_| RenewError::Timeout(CALL_TIMEOUT))?
    .map_err(|status| RenewError::Refused {
        call: "renew the certificate",
        status,
    })?
    .into_inner();
    Ok(Credentials {
        ca_certificate: r.ca_certificate_pem,
        certificate: r.certificate_pem,
        private_key: key_pem,
        ..creds.clone()
    })
}

/// A key pair made locally (on a joining or renewing node); only its public half (DER
/// SubjectPublicKeyInfo) is ever sent.
pub fn new_client_key() -> Result<(String, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    Ok((key.serialize_pem(), key.subject_public_key_info()))
}

/// The public half (DER SubjectPublicKeyInfo) of a key made by [`new_client_key`].
pub fn client_public_key(key_pem: &str) -> Result<Vec<u8>, rcgen::Error> {
    Ok(rcgen::KeyPair::from_pem(key_pem)?.subject_public_key_info())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn year_from(start: SystemTime) -> Validity {
        Validity {
            not_before: start,
            not_after: start + 360 * DAY,
        }
    }

    #[test]
    fn renews_at_two_thirds_of_the_lifetime_or_when_the_broker_asks() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let v = year_from(t0);
        let fine = Advice {
            ca_bundle: "CA1".into(),
            renew_reason: String::new(),
        };
        assert_eq!(decide(t0 + 239 * DAY, v, Some(&fine), "CA1"), Action::Keep);
        assert!(matches!(
            decide(t0 + 240 * DAY, v, Some(&fine), "CA1"),
            Action::Renew(r) if r.contains("expires at")
        ));
        // Without the broker's advice the clock alone decides.
        assert_eq!(decide(t0, v, None, "CA1"), Action::Keep);
        assert!(matches!(
            decide(t0 + 300 * DAY, v, None, "CA1"),
            Action::Renew(_)
        ));
        // The broker asks (a CA rotation): at once, whatever the clock.
        let asked = Advice {
            ca_bundle: "CA2\nCA1".into(),
            renew_reason: "retiring CA".into(),
        };
        assert_eq!(
            decide(t0, v, Some(&asked), "CA1"),
            Action::Renew("retiring CA".into())
        );
    }

    #[test]
    fn follows_the_brokers_ca_bundle_whatever_the_whitespace() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let v = year_from(t0);
        let advice = |bundle: &str| Advice {
            ca_bundle: bundle.into(),
            renew_reason: String::new(),
        };
        assert_eq!(
            decide(t0, v, Some(&advice("CA2\nCA1\n")), "CA1\n"),
            Action::Trust("CA2\nCA1\n".into())
        );
        assert_eq!(
            decide(t0, v, Some(&advice("CA2\n  CA1\n\n")), "CA2\nCA1"),
            Action::Keep
        );
        // An old broker says nothing of its CAs: nothing changes.
        assert_eq!(decide(t0, v, Some(&advice("")), "CA1"), Action::Keep);
    }
}
