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
}

/// PEM certificate and PEM private key.
#[derive(Clone, Debug)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
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

fn leaf_params(now: SystemTime, name: &str) -> Result<(CertificateParams, String), PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.not_before = to_offset(now - Duration::from_secs(3600));
    p.not_after = to_offset(now + LEAF_VALIDITY);
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
    dn.push(DnType::CommonName, "clusterlink broker CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = to_offset(now - Duration::from_secs(3600));
    p.not_after = to_offset(now + CA_VALIDITY);
    p.serial_number = Some(random_serial().0);
    let cert = p.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The CA, loaded for signing.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

impl Ca {
    pub fn load(ca: &CertAndKey) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(&ca.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: ca.cert_pem.clone(),
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
        let (mut p, _) = leaf_params(now, BROKER_SERVER_NAME)?;
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

    /// The operator's client certificate (new key).
    pub fn admin_cert(&self, now: SystemTime) -> Result<CertAndKey, PkiError> {
        let key = KeyPair::generate()?;
        let (mut p, _) = leaf_params(now, "clusterlink-admin")?;
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
        id: &ClusterId,
        public_key_der: &[u8],
    ) -> Result<(String, String), PkiError> {
        let spki = SubjectPublicKeyInfo::from_der(public_key_der).map_err(PkiError::PublicKey)?;
        let (mut p, serial) = leaf_params(now, id.as_str())?;
        p.subject_alt_names = vec![SanType::URI(
            format!("{CLUSTER_URI_PREFIX}{id}").try_into()?,
        )];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&spki, &self.issuer)?;
        Ok((cert.pem(), serial))
    }
}

/// A key pair made locally (on a joining node); only its public half is sent.
pub fn new_client_key() -> Result<(String, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.subject_public_key_info()))
}

/// The public half (DER SubjectPublicKeyInfo) of a key made by [`new_client_key`].
pub fn client_public_key(key_pem: &str) -> Result<Vec<u8>, PkiError> {
    Ok(KeyPair::from_pem(key_pem)?.subject_public_key_info())
}

/// Reads the identity from a peer certificate that TLS has already verified against our CA.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| PkiError::Parse(e.to_string()))?;
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
        let (pem, serial) = ca.sign_cluster(now, &id, &spki).unwrap();
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
            ca.sign_cluster(now, &"x".parse().unwrap(), b"garbage"),
            Err(PkiError::PublicKey(_))
        ));
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
