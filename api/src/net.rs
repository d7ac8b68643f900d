use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Parses one CIDR strictly: the address must be the network address (`10.0.0.5/16` is refused,
/// because what the user meant is ambiguous).
pub fn parse_cidr(s: &str) -> Result<IpNet, ValidationError> {
    let net: IpNet =
        s.trim()
            .parse()
            .map_err(|e: ipnet::AddrParseError| ValidationError::Cidr {
                value: s.to_owned(),
                reason: e.to_string(),
            })?;
    if net.network() != net.addr() {
        return Err(ValidationError::Cidr {
            value: s.to_owned(),
            reason: format!("host bits are set; did you mean {}?", net.trunc()),
        });
    }
    Ok(net)
}

/// A non-empty, sorted set of CIDRs with no two overlapping each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct CidrSet(Vec<IpNet>);

impl CidrSet {
    /// Builds a set, refusing an empty list and CIDRs that overlap each other.
    pub fn new(what: &'static str, mut nets: Vec<IpNet>) -> Result<Self, ValidationError> {
        if nets.is_empty() {
            return Err(ValidationError::EmptyCidrs { what });
        }
        nets.sort();
        nets.dedup();
        for (i, a) in nets.iter().enumerate() {
            for b in &nets[i + 1..] {
                if overlaps(a, b) {
                    return Err(ValidationError::SelfOverlap {
                        a: a.to_string(),
                        b: b.to_string(),
                    });
                }
            }
        }
        Ok(Self(nets))
    }

    /// Parses strings (each may itself be a comma-separated list).
    pub fn parse<S: AsRef<str>>(what: &'static str, items: &[S]) -> Result<Self, ValidationError> {
        let nets = items
            .iter()
            .flat_map(|s| s.as_ref().split(','))
            .filter(|s| !s.trim().is_empty())
            .map(parse_cidr)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(what, nets)
    }

    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.0.iter()
    }

    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }

    /// Every pair `(mine, theirs)` that overlaps.
    pub fn overlaps_with(&self, other: &CidrSet) -> Vec<(IpNet, IpNet)> {
        let mut out = Vec::new();
        for a in &self.0 {
            for b in &other.0 {
                if overlaps(a, b) {
                    out.push((*a, *b));
                }
            }
        }
        out
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

/// True if the two networks share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl TryFrom<Vec<String>> for CidrSet {
    type Error = ValidationError;
    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        Self::parse("CIDR list", &v)
    }
}

impl From<CidrSet> for Vec<String> {
    fn from(v: CidrSet) -> Self {
        v.to_strings()
    }
}

impl FromStr for CidrSet {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("CIDR list", &[s])
    }
}

impl fmt::Display for CidrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_strings().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_cidrs() {
        assert!(parse_cidr("10.0.0.0/16").is_ok());
        assert!(parse_cidr("fd00::/64").is_ok());
        let e = parse_cidr("10.0.0.5/16").unwrap_err().to_string();
        assert!(e.contains("did you mean 10.0.0.0/16"), "{e}");
        assert!(parse_cidr("10.0.0.0").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }

    #[test]
    fn sets() {
        let s = CidrSet::parse("pod CIDRs", &["10.1.0.0/16,10.2.0.0/16"]).unwrap();
        assert_eq!(s.as_slice().len(), 2);
        assert!(matches!(
            CidrSet::parse("pod CIDRs", &["10.1.0.0/16", "10.1.2.0/24"]),
            Err(ValidationError::SelfOverlap { .. })
        ));
        assert!(matches!(
            CidrSet::parse::<&str>("pod CIDRs", &[]),
            Err(ValidationError::EmptyCidrs { what: "pod CIDRs" })
        ));
        let other = CidrSet::parse("x", &["10.0.0.0/8"]).unwrap();
        assert_eq!(s.overlaps_with(&other).len(), 2);
        let apart = CidrSet::parse("x", &["192.168.0.0/16"]).unwrap();
        assert!(s.overlaps_with(&apart).is_empty());
    }
}
