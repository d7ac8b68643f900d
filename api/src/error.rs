use thiserror::Error;

/// Why a value from outside (wire, CLI, file) was refused. Each variant says what was wrong
/// and what a valid value looks like.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ValidationError {
    #[error(
        "invalid {what} {value:?}: must be 1-63 characters of lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    DnsLabel { what: &'static str, value: String },
    #[error(
        "invalid {what} {value:?}: must be at most 253 characters of DNS labels separated by '.'"
    )]
    DnsSubdomain { what: &'static str, value: String },
    #[error("invalid CIDR {value:?}: {reason} (expected e.g. 10.0.0.0/16 or fd00::/64)")]
    Cidr { value: String, reason: String },
    #[error("{what} must list at least one CIDR")]
    EmptyCidrs { what: &'static str },
    #[error("CIDRs {a} and {b} overlap within the same cluster")]
    SelfOverlap { a: String, b: String },
    #[error("invalid address {value:?} for {what}: {reason}")]
    Address {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid WireGuard public key: expected 32 bytes, got {len}")]
    PublicKey { len: usize },
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("invalid label {key:?}={value:?}: {reason}")]
    Label {
        key: String,
        value: String,
        reason: String,
    },
}
