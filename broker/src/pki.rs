//! The broker's certificate authority: one CA per broker deployment, a server certificate,
//! an admin client certificate, and one client certificate per joined cluster.
//!
//! Identities are SPIFFE-style URI SANs: `spiffe://clusterlink/cluster/<id>` for a cluster,
//! `spiffe://clusterlink/admin` for the operator. Clusters' keys are made on the cluster's node;
//! the broker only ever sees and signs their public keys.

use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use thiserror::Error;

use clusterlink_api::ClusterId;

/// The DNS name every broker certificate carries; clients verify against it, so the broker's
/// address can change without reissuing certificates.
pub use clusterlink_broker_client::BROKER_SERVER_NAME;
pub const ADMIN_URI: &str = "spiffe://clusterlink/admin";
const CLUSTER_URI_PREFIX: &str = "spiffe://clusterlink/cluster/";

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a certificate the CA issues to a cluster or the admin is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid public key from the joining node: {0}")]
    PublicKey(rcgen::Error),
    #[error("peer certificate could not be parsed: {0}")]
    Parse(String),
    #[error(
        "peer certificate names no clusterlink identity (expected a {CLUSTER_URI_PREFIX}<id> or {ADMIN_URI} URI SAN)"
    )]
    NoIdentity,
    #[error("peer certificate names an invalid cluster ID: {0}")]
    BadClusterId(#[from] clusterlink_api::ValidationError),
    #[error("{what} holds no PEM certificate")]
    NoCertificate { what: &'static str },
    #[error(
        "the certificate was issued by a CA this broker no longer trusts (it was retired by `clusterlink broker rotate-ca finish`); join again with a fresh token"
    )]
    RetiredCa,
    #[error(
        "the CA key does not belong to the CA certificate (a `rotate-ca start` cut short? run it again)"
    )]
    KeyMismatch,
}

/// PEM certificate and PEM private key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Who is calling, as proven by a certificate our CA signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Admin,
    Cluster { id: ClusterId, serial: String },
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Admin => f.write_str("admin"),
            Identity::Cluster { id, .. } => write!(f, "cluster/{id}"),
        }
    }
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte, so DER keeps all 16 bytes
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn leaf_params(
    now: SystemTime,
    validity: Duration,
    name: &str,
) -> Result<(CertificateParams, String), PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.not_before = to_offset(now - Duration::from_secs(3600));
    p.not_after = to_offset(now + validity);
    let (serial, hex) = random_serial();
    p.serial_number = Some(serial);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok((p, hex))
}

/// Makes a new CA.
pub fn new_ca(now: SystemTime) -> Result<CertAndKey, PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Each CA's name is its own: a certificate's issuer tells which CA made it (during a
    // rotation two are trusted at once).
    let (serial, hex) = random_serial();
    dn.push(
        DnType::CommonName,
        format!("clusterlink broker CA {}", &hex[..12]),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = to_offset(now - Duration::from_secs(3600));
    p.not_after = to_offset(now + CA_VALIDITY);
    p.serial_number = Some(serial);
    let cert = p.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DER of every certificate in a PEM text (a bundle holds several).
pub fn certificates_der(pem: &str, what: &'static str) -> Result<Vec<Vec<u8>>, PkiError> {
    let ders = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| {
            p.map(|p| p.contents)
                .map_err(|e| PkiError::Parse(format!("{what}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ders.is_empty() {
        return Err(PkiError::NoCertificate { what });
    }
    Ok(ders)
}

/// SHA-256 (hex) of the first certificate of a PEM text: how the registry names a CA.
pub fn fingerprint(pem: &str, what: &'static str) -> Result<String, PkiError> {
    use sha2::{Digest, Sha256};
    let der = certificates_der(pem, what)?.swap_remove(0);
    Ok(hex::encode(Sha256::digest(der)))
}

/// The raw subject of a DER certificate.
fn subject_of(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(cert.subject().as_raw().to_vec())
}

/// The CA, loaded for signing.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    /// SHA-256 (hex) of the CA certificate.
    pub sha256: String,
}

impl Ca {
    pub fn load(ca: &CertAndKey) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(&ca.key_pem)?;
        let der = certificates_der(&ca.cert_pem, "the CA certificate")?.swap_remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: ca.cert_pem.clone(),
            sha256: fingerprint(&ca.cert_pem, "the CA certificate")?,
        })
    }

    /// The broker's server certificate (new key), valid for [`BROKER_SERVER_NAME`] and
    /// `extra_names` (DNS names or IP addresses).
    pub fn server_cert(
        &self,
        now: SystemTime,
        extra_names: &[String],
    ) -> Result<CertAndKey, PkiError> {
        let key = KeyPair::generate()?;
        let (mut p, _) = leaf_params(now, LEAF_VALIDITY, BROKER_SERVER_NAME)?;
        p.subject_alt_names = std::iter::once(BROKER_SERVER_NAME.to_owned())
            .chain(extra_names.iter().cloned())
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A new server certificate (new key) for the names `old` (a server certificate, PEM) was
    /// valid for: what a CA rotation's end issues.
    pub fn reissue_server_cert(&self, now: SystemTime, old: &str) -> Result<CertAndKey, PkiError> {
        use x509_parser::prelude::*;
        let der = certificates_der(old, "the server certificate")?.swap_remove(0);
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let mut names = Vec::new();
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|e| PkiError::Parse(e.to_string()))?
        {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) if *d != BROKER_SERVER_NAME => {
                        names.push(d.to_string())
                    }
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => names.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                                .to_string(),
                        ),
                        16 => names.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                                .to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        self.server_cert(now, &names)
    }

    /// The operator's client certificate (new key).
    pub fn admin_cert(&self, now: SystemTime) -> Result<CertAndKey, PkiError> {
        let key = KeyPair::generate()?;
        let (mut p, _) = leaf_params(now, LEAF_VALIDITY, "clusterlink-admin")?;
        p.subject_alt_names = vec![SanType::URI(ADMIN_URI.try_into()?)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a joining cluster's public key (DER SubjectPublicKeyInfo). Returns the PEM
    /// certificate and its serial (hex).
    pub fn sign_cluster(
        &self,
        now: SystemTime,
        validity: Duration,
        id: &ClusterId,
        public_key_der: &[u8],
    ) -> Result<(String, String), PkiError> {
        let spki = SubjectPublicKeyInfo::from_der(public_key_der).map_err(PkiError::PublicKey)?;
        let (mut p, serial) = leaf_params(now, validity, id.as_str())?;
        p.subject_alt_names = vec![SanType::URI(
            format!("{CLUSTER_URI_PREFIX}{id}").try_into()?,
        )];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&spki, &self.issuer)?;
        Ok((cert.pem(), serial))
    }
}

pub use clusterlink_broker_client::renew::{client_public_key, new_client_key};

/// What the broker trusts and signs with; replaced whole when the CA rotates.
pub struct Trust {
    /// The CA that signs certificates now.
    pub signer: Ca,
    /// Subjects of every CA trusted for client certificates: the signer's, and during a
    /// rotation the retiring CA's.
    trusted_subjects: Vec<Vec<u8>>,
    /// Every trusted CA certificate (PEM), the signer's first: what clients should trust.
    pub bundle_pem: String,
    /// The retiring CA's subject, during a rotation.
    retiring_subject: Option<Vec<u8>>,
}

impl Trust {
    /// The signer `ca`, and `retiring` (a CA certificate, PEM) while a rotation retires it.
    pub fn new(ca: &CertAndKey, retiring: Option<&str>) -> Result<Self, PkiError> {
        let signer = Ca::load(ca)?;
        let signer_subject = subject_of(&certificates_der(&ca.cert_pem, "the CA certificate")?[0])?;
        let retiring_subject = retiring
            .map(|pem| {
                certificates_der(pem, "the retiring CA certificate").and_then(|d| subject_of(&d[0]))
            })
            .transpose()?;
        let mut bundle_pem = ca.cert_pem.trim_end().to_owned();
        bundle_pem.push('\n');
        if let Some(pem) = retiring {
            bundle_pem.push_str(pem.trim_end());
            bundle_pem.push('\n');
        }
        Ok(Trust {
            signer,
            trusted_subjects: std::iter::once(signer_subject)
                .chain(retiring_subject.clone())
                .collect(),
            bundle_pem,
            retiring_subject,
        })
    }

    /// Checks a peer certificate's issuer (raw subject of the CA) against the CAs trusted
    /// now: a connection made before a CA was retired does not outlive the retirement.
    pub fn check_issuer(&self, issuer: &[u8]) -> Result<(), PkiError> {
        if self.trusted_subjects.iter().any(|s| s == issuer) {
            Ok(())
        } else {
            Err(PkiError::RetiredCa)
        }
    }

    /// Is `issuer` the CA a rotation is retiring?
    pub fn is_retiring(&self, issuer: &[u8]) -> bool {
        self.retiring_subject.as_deref() == Some(issuer)
    }
}

/// A verified peer certificate: who it names, and the raw subject of the CA that issued it.
pub struct Peer {
    pub identity: Identity,
    pub issuer: Vec<u8>,
}

/// Reads the identity from a peer certificate that TLS has already verified against our CA.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    peer_of(cert_der).map(|p| p.identity)
}

/// Reads a peer certificate that TLS has already verified against a trusted CA.
pub fn peer_of(cert_der: &[u8]) -> Result<Peer, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let issuer = cert.issuer().as_raw().to_vec();
    let identity = identity_in(&cert)?;
    Ok(Peer { identity, issuer })
}

fn identity_in(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Identity, PkiError> {
    use x509_parser::prelude::*;
    let serial = hex::encode(cert.raw_serial());
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?
        .ok_or(PkiError::NoIdentity)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if *uri == ADMIN_URI {
                return Ok(Identity::Admin);
            }
            if let Some(id) = uri.strip_prefix(CLUSTER_URI_PREFIX) {
                return Ok(Identity::Cluster {
                    id: id.parse()?,
                    serial,
                });
            }
        }
    }
    Err(PkiError::NoIdentity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_cert_names_the_cluster_and_its_serial() {
        let now = SystemTime::now();
        let ca = Ca::load(&new_ca(now).unwrap()).unwrap();
        let (_key, spki) = new_client_key().unwrap();
        let id: ClusterId = "east".parse().unwrap();
        let (pem, serial) = ca.sign_cluster(now, LEAF_VALIDITY, &id, &spki).unwrap();
        let der = rustls_pemfile_der(&pem);
        assert_eq!(identity_of(&der).unwrap(), Identity::Cluster { id, serial });
        let admin = ca.admin_cert(now).unwrap();
        assert_eq!(
            identity_of(&rustls_pemfile_der(&admin.cert_pem)).unwrap(),
            Identity::Admin
        );
        let server = ca.server_cert(now, &["127.0.0.1".into()]).unwrap();
        assert!(matches!(
            identity_of(&rustls_pemfile_der(&server.cert_pem)),
            Err(PkiError::NoIdentity)
        ));
        assert!(matches!(
            ca.sign_cluster(now, LEAF_VALIDITY, &"x".parse().unwrap(), b"garbage"),
            Err(PkiError::PublicKey(_))
        ));
    }

    #[test]
    fn a_rotation_trusts_two_cas_and_names_the_retiring_one() {
        let now = SystemTime::now();
        let (old, new) = (new_ca(now).unwrap(), new_ca(now).unwrap());
        let issuer = |ca: &CertAndKey| {
            let (_, spki) = new_client_key().unwrap();
            let (pem, _) = Ca::load(ca)
                .unwrap()
                .sign_cluster(now, LEAF_VALIDITY, &"east".parse().unwrap(), &spki)
                .unwrap();
            peer_of(&rustls_pemfile_der(&pem)).unwrap().issuer
        };
        let (from_old, from_new) = (issuer(&old), issuer(&new));
        assert_ne!(from_old, from_new, "each CA has a name of its own");
        let steady = Trust::new(&old, None).unwrap();
        assert!(steady.check_issuer(&from_old).is_ok());
        assert!(matches!(
            steady.check_issuer(&from_new),
            Err(PkiError::RetiredCa)
        ));
        assert!(!steady.is_retiring(&from_old));
        let rotating = Trust::new(&new, Some(&old.cert_pem)).unwrap();
        assert!(rotating.check_issuer(&from_old).is_ok());
        assert!(rotating.check_issuer(&from_new).is_ok());
        assert!(rotating.is_retiring(&from_old));
        assert!(!rotating.is_retiring(&from_new));
        assert_eq!(
            certificates_der(&rotating.bundle_pem, "bundle")
                .unwrap()
                .len(),
            2
        );
        assert!(rotating.bundle_pem.starts_with(new.cert_pem.trim()));
        let finished = Trust::new(&new, None).unwrap();
        assert!(matches!(
            finished.check_issuer(&from_old),
            Err(PkiError::RetiredCa)
        ));
    }

    #[test]
    fn a_ca_key_that_is_not_the_certificates_is_refused() {
        let now = SystemTime::now();
        let (a, b) = (new_ca(now).unwrap(), new_ca(now).unwrap());
        let mixed = CertAndKey {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        };
        assert!(matches!(Ca::load(&mixed), Err(PkiError::KeyMismatch)));
        assert!(format!("{mixed:?}").contains("<redacted>"));
        assert!(!format!("{mixed:?}").contains(b.key_pem.trim()));
    }

    #[test]
    fn a_reissued_server_certificate_keeps_the_names() {
        let now = SystemTime::now();
        let old = Ca::load(&new_ca(now).unwrap()).unwrap();
        let new = Ca::load(&new_ca(now).unwrap()).unwrap();
        let server = old
            .server_cert(
                now,
                &[
                    "10.0.0.1".into(),
                    "broker.example.com".into(),
                    "fd00::1".into(),
                ],
            )
            .unwrap();
        let again = new.reissue_server_cert(now, &server.cert_pem).unwrap();
        let names = |pem: &str| {
            use x509_parser::prelude::*;
            let der = rustls_pemfile_der(pem);
            let (_, c) = X509Certificate::from_der(&der).unwrap();
            let mut v: Vec<String> = c
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&server.cert_pem), names(&again.cert_pem));
        assert_eq!(names(&again.cert_pem).len(), 4);
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
