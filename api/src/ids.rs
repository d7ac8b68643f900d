use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// True if `s` is an RFC 1123 DNS label as Kubernetes uses them.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// True if `s` is an RFC 1123 DNS subdomain (dot-separated labels, at most 253 characters).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

macro_rules! label_type {
    ($(#[$m:meta])* $name:ident, $what:literal, $check:path, $variant:ident) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                if $check(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(ValidationError::$variant { what: $what, value: s.to_owned() })
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

label_type!(
    /// A cluster's identity: a DNS label, unique at the broker, named in the cluster's certificate.
    ClusterId,
    "cluster ID",
    is_dns_label,
    DnsLabel
);
label_type!(
    /// A Kubernetes namespace or service name (DNS label).
    DnsLabel,
    "name",
    is_dns_label,
    DnsLabel
);
label_type!(
    /// A node name (DNS subdomain, as Kubernetes node names are).
    NodeName,
    "node name",
    is_dns_subdomain,
    DnsSubdomain
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids() {
        for ok in ["a", "east", "east-1", "0abc", &"a".repeat(63)] {
            assert!(ok.parse::<ClusterId>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "East", "a_b", "a.b", &"a".repeat(64), "a b"] {
            let err = bad.parse::<ClusterId>().unwrap_err();
            assert!(err.to_string().contains("cluster ID"), "{err}");
        }
    }

    #[test]
    fn node_names() {
        assert!("gw-0.east".parse::<NodeName>().is_ok());
        assert!("gw..east".parse::<NodeName>().is_err());
        assert!("Gw".parse::<NodeName>().is_err());
    }
}
