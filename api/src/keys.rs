//! The layout of the broker's key space. Every record lives under its kind's prefix and its
//! owning cluster, so "which cluster owns this key" is a property of the key itself.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ClusterId, DnsLabel, NodeName, ValidationError, proto};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Clusters,
    Gateways,
    Services,
    Connections,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Clusters,
        Kind::Gateways,
        Kind::Services,
        Kind::Connections,
    ];

    /// The key prefix of this kind, with its trailing '/'.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Clusters => "clusters/",
            Kind::Gateways => "gateways/",
            Kind::Services => "services/",
            Kind::Connections => "connections/",
        }
    }

    pub fn from_proto(k: i32) -> Result<Self, ValidationError> {
        match proto::Kind::try_from(k) {
            Ok(proto::Kind::Clusters) => Ok(Kind::Clusters),
            Ok(proto::Kind::Gateways) => Ok(Kind::Gateways),
            Ok(proto::Kind::Services) => Ok(Kind::Services),
            Ok(proto::Kind::Connections) => Ok(Kind::Connections),
            _ => Err(ValidationError::Invalid {
                what: "kind",
                reason: format!("{k} is not one of clusters, gateways, services, connections"),
            }),
        }
    }

    pub fn to_proto(self) -> proto::Kind {
        match self {
            Kind::Clusters => proto::Kind::Clusters,
            Kind::Gateways => proto::Kind::Gateways,
            Kind::Services => proto::Kind::Services,
            Kind::Connections => proto::Kind::Connections,
        }
    }
}

/// The store key of one record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    Cluster(ClusterId),
    Gateway(ClusterId, NodeName),
    Service(ClusterId, DnsLabel, DnsLabel),
    /// From cluster, from node, to cluster, to node.
    Connection(ClusterId, NodeName, ClusterId, NodeName),
}

impl RecordKey {
    pub fn kind(&self) -> Kind {
        match self {
            RecordKey::Cluster(..) => Kind::Clusters,
            RecordKey::Gateway(..) => Kind::Gateways,
            RecordKey::Service(..) => Kind::Services,
            RecordKey::Connection(..) => Kind::Connections,
        }
    }

    /// The cluster that owns (and alone may write) this record.
    pub fn owner(&self) -> &ClusterId {
        match self {
            RecordKey::Cluster(c)
            | RecordKey::Gateway(c, _)
            | RecordKey::Service(c, _, _)
            | RecordKey::Connection(c, _, _, _) => c,
        }
    }

    /// The key for a record `name` of `kind` within `owner`, as a withdraw request names it.
    pub fn from_name(kind: Kind, owner: &ClusterId, name: &str) -> Result<Self, ValidationError> {
        let bad = || ValidationError::Invalid {
            what: "record name",
            reason: format!(
                "{name:?} does not name a {kind:?} record (gateways: NODE, services: NAMESPACE/NAME, connections: FROM_NODE/TO_CLUSTER/TO_NODE)"
            ),
        };
        let parts: Vec<&str> = name.split('/').collect();
        match (kind, parts.as_slice()) {
            (Kind::Clusters, [""]) => Ok(RecordKey::Cluster(owner.clone())),
            (Kind::Gateways, [node]) => Ok(RecordKey::Gateway(owner.clone(), node.parse()?)),
            (Kind::Services, [ns, svc]) => {
                Ok(RecordKey::Service(owner.clone(), ns.parse()?, svc.parse()?))
            }
            (Kind::Connections, [from, to, node]) => Ok(RecordKey::Connection(
                owner.clone(),
                from.parse()?,
                to.parse()?,
                node.parse()?,
            )),
            _ => Err(bad()),
        }
    }

    /// The name of this key within its owner, as a withdraw request names it: the inverse of
    /// [`RecordKey::from_name`].
    pub fn name(&self) -> String {
        match self {
            RecordKey::Cluster(_) => String::new(),
            RecordKey::Gateway(_, node) => node.to_string(),
            RecordKey::Service(_, ns, n) => format!("{ns}/{n}"),
            RecordKey::Connection(_, from, to, node) => format!("{from}/{to}/{node}"),
        }
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordKey::Cluster(c) => write!(f, "clusters/{c}"),
            RecordKey::Gateway(c, n) => write!(f, "gateways/{c}/{n}"),
            RecordKey::Service(c, ns, n) => write!(f, "services/{c}/{ns}/{n}"),
            RecordKey::Connection(c, from, to, n) => {
                write!(f, "connections/{c}/{from}/{to}/{n}")
            }
        }
    }
}

impl FromStr for RecordKey {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            ["clusters", c] => Ok(RecordKey::Cluster(c.parse()?)),
            ["gateways", c, n] => Ok(RecordKey::Gateway(c.parse()?, n.parse()?)),
            ["services", c, ns, n] => Ok(RecordKey::Service(c.parse()?, ns.parse()?, n.parse()?)),
            ["connections", c, from, to, n] => Ok(RecordKey::Connection(
                c.parse()?,
                from.parse()?,
                to.parse()?,
                n.parse()?,
            )),
            _ => Err(ValidationError::Invalid {
                what: "record key",
                reason: format!("{s:?} is not a clusterlink record key"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for s in [
            "clusters/east",
            "gateways/east/gw-0",
            "services/east/demo/echo",
            "connections/east/gw-1/west/gw-0",
        ] {
            let k: RecordKey = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
            assert_eq!(k.owner().as_str(), "east");
            assert!(s.starts_with(k.kind().prefix()));
        }
        assert!("services/east/demo".parse::<RecordKey>().is_err());
        assert!("gateways/East/gw".parse::<RecordKey>().is_err());
        // The old three-part connection key (no measuring node) is refused.
        assert!("connections/east/west/gw-0".parse::<RecordKey>().is_err());
    }

    #[test]
    fn names_within_owner() {
        let east: ClusterId = "east".parse().unwrap();
        let k = RecordKey::from_name(Kind::Services, &east, "demo/echo").unwrap();
        assert_eq!(k.to_string(), "services/east/demo/echo");
        assert!(RecordKey::from_name(Kind::Services, &east, "echo").is_err());
        assert!(RecordKey::from_name(Kind::Gateways, &east, "../west/gw").is_err());
        let k = RecordKey::from_name(Kind::Connections, &east, "gw-1/west/gw-0").unwrap();
        assert_eq!(k.to_string(), "connections/east/gw-1/west/gw-0");
        assert!(RecordKey::from_name(Kind::Connections, &east, "west/gw-0").is_err());
    }

    #[test]
    fn a_key_is_found_again_by_its_name() {
        for s in [
            "clusters/east",
            "gateways/east/gw-0",
            "services/east/demo/echo",
            "connections/east/gw-1/west/gw-0",
        ] {
            let k: RecordKey = s.parse().unwrap();
            assert_eq!(
                RecordKey::from_name(k.kind(), k.owner(), &k.name()).unwrap(),
                k
            );
        }
    }
}
