//! Domain records, validated from their protobuf form. `TryFrom<proto::X>` is the only way in
//! from the wire; `From<X> for proto::X` the only way out.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::ids::{is_dns_label, is_dns_subdomain};
use crate::{CidrSet, ClusterId, DnsLabel, NodeName, RecordKey, ValidationError, proto};

/// A cluster as it joins the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub id: ClusterId,
    pub pod_cidrs: CidrSet,
    pub service_cidrs: CidrSet,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Cluster {
    /// Every CIDR of this cluster, pods and services.
    pub fn all_cidrs(&self) -> Result<CidrSet, ValidationError> {
        let nets = self
            .pod_cidrs
            .iter()
            .chain(self.service_cidrs.iter())
            .copied()
            .collect();
        CidrSet::new("cluster CIDRs", nets)
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if labels.len() > 64 {
        return Err(ValidationError::Invalid {
            what: "labels",
            reason: format!("{} labels given, at most 64 allowed", labels.len()),
        });
    }
    for (k, v) in labels {
        let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let prefix_ok = prefix.is_empty() || is_dns_subdomain(prefix);
        if !name_ok || !prefix_ok {
            return Err(ValidationError::Label {
                key: k.clone(),
                value: v.clone(),
                reason: "keys are [prefix/]name, name up to 63 of [A-Za-z0-9-_.]".into(),
            });
        }
        if v.len() > 63
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ValidationError::Label {
                key: k.clone(),
                value: v.clone(),
                reason: "values are up to 63 of [A-Za-z0-9-_.]".into(),
            });
        }
    }
    Ok(())
}

impl TryFrom<proto::Cluster> for Cluster {
    type Error = ValidationError;
    fn try_from(p: proto::Cluster) -> Result<Self, Self::Error> {
        let labels: BTreeMap<String, String> = p.labels.into_iter().collect();
        validate_labels(&labels)?;
        let c = Cluster {
            id: p.id.parse()?,
            pod_cidrs: CidrSet::parse("pod CIDRs", &p.pod_cidrs)?,
            service_cidrs: CidrSet::parse("service CIDRs", &p.service_cidrs)?,
            labels,
        };
        c.all_cidrs()?;
        Ok(c)
    }
}

impl From<Cluster> for proto::Cluster {
    fn from(c: Cluster) -> Self {
        proto::Cluster {
            id: c.id.into(),
            pod_cidrs: c.pod_cidrs.to_strings(),
            service_cidrs: c.service_cidrs.to_strings(),
            labels: c.labels.into_iter().collect(),
        }
    }
}

/// A joined cluster and the serial of the certificate that acts for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRegistration {
    pub cluster: Cluster,
    pub certificate_serial: String,
    pub joined_at_unix_ms: i64,
    /// SHA-256 (hex) of the public key the cluster joined with; empty in registrations made
    /// before it was recorded.
    #[serde(default)]
    pub public_key_sha256: String,
    /// When the cluster's certificate expires (unix ms); 0 if not recorded.
    #[serde(default)]
    pub certificate_expires_at_unix_ms: i64,
    /// Certificates renewed away from, each working until its time (the renewal's grace).
    #[serde(default)]
    pub retiring: Vec<RetiringSerial>,
    /// SHA-256 (hex) of the certificate of the CA that issued the current certificate; empty
    /// if not recorded.
    #[serde(default)]
    pub certificate_ca_sha256: String,
}

/// An earlier certificate of a cluster, still accepted until `valid_until_unix_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetiringSerial {
    pub serial: String,
    pub valid_until_unix_ms: i64,
}

impl TryFrom<proto::ClusterRegistration> for ClusterRegistration {
    type Error = ValidationError;
    fn try_from(p: proto::ClusterRegistration) -> Result<Self, Self::Error> {
        Ok(ClusterRegistration {
            cluster: p
                .cluster
                .ok_or(ValidationError::Missing("cluster"))?
                .try_into()?,
            certificate_serial: p.certificate_serial,
            joined_at_unix_ms: p.joined_at_unix_ms,
            public_key_sha256: p.public_key_sha256,
            certificate_expires_at_unix_ms: p.certificate_expires_at_unix_ms,
            retiring: p
                .retiring
                .into_iter()
                .map(|r| RetiringSerial {
                    serial: r.serial,
                    valid_until_unix_ms: r.valid_until_unix_ms,
                })
                .collect(),
            certificate_ca_sha256: p.certificate_ca_sha256,
        })
    }
}

impl From<ClusterRegistration> for proto::ClusterRegistration {
    fn from(r: ClusterRegistration) -> Self {
        proto::ClusterRegistration {
            cluster: Some(r.cluster.into()),
            certificate_serial: r.certificate_serial,
            joined_at_unix_ms: r.joined_at_unix_ms,
            public_key_sha256: r.public_key_sha256,
            certificate_expires_at_unix_ms: r.certificate_expires_at_unix_ms,
            retiring: r
                .retiring
                .into_iter()
                .map(|r| proto::RetiringSerial {
                    serial: r.serial,
                    valid_until_unix_ms: r.valid_until_unix_ms,
                })
                .collect(),
            certificate_ca_sha256: r.certificate_ca_sha256,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayRole {
    Active,
    Passive,
}

/// One gateway node of a cluster, as its peers need to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEndpoint {
    pub cluster: ClusterId,
    pub node: NodeName,
    /// WireGuard public key (Curve25519).
    pub public_key: [u8; 32],
    pub private_addr: IpAddr,
    /// As the broker saw it; `None` until a broker has filled it in.
    pub public_addr: Option<IpAddr>,
    pub port: u16,
    pub role: GatewayRole,
    pub generation: u64,
}

/// A cluster's active gateway as every component sees it (remote gateways, route agents, the
/// election itself): of its endpoints that say they are active, the one with the lowest node
/// name. While two claim the role (a healed partition), all agree on the same one.
pub fn active_gateway<'a>(
    gateways: &'a BTreeMap<(ClusterId, NodeName), GatewayEndpoint>,
    cluster: &ClusterId,
) -> Option<&'a GatewayEndpoint> {
    gateways
        .values()
        .filter(|g| &g.cluster == cluster && g.role == GatewayRole::Active)
        .min_by(|a, b| a.node.cmp(&b.node))
}

impl GatewayEndpoint {
    pub fn private_endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.private_addr, self.port)
    }
}

fn parse_ip(what: &'static str, s: &str) -> Result<IpAddr, ValidationError> {
    s.parse()
        .map_err(|e: std::net::AddrParseError| ValidationError::Address {
            what,
            value: s.to_owned(),
            reason: e.to_string(),
        })
}

impl TryFrom<proto::GatewayEndpoint> for GatewayEndpoint {
    type Error = ValidationError;
    fn try_from(p: proto::GatewayEndpoint) -> Result<Self, Self::Error> {
        let public_key: [u8; 32] =
            p.public_key
                .as_slice()
                .try_into()
                .map_err(|_| ValidationError::PublicKey {
                    len: p.public_key.len(),
                })?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ValidationError::Invalid {
                what: "gateway port",
                reason: format!("{} is not a UDP port (1-65535)", p.port),
            })?;
        let role = match proto::GatewayRole::try_from(p.role) {
            Ok(proto::GatewayRole::Active) => GatewayRole::Active,
            Ok(proto::GatewayRole::Passive) => GatewayRole::Passive,
            _ => {
                return Err(ValidationError::Invalid {
                    what: "gateway role",
                    reason: "must be active or passive".into(),
                });
            }
        };
        Ok(GatewayEndpoint {
            cluster: p.cluster.parse()?,
            node: p.node.parse()?,
            public_key,
            private_addr: parse_ip("private address", &p.private_addr)?,
            public_addr: if p.public_addr.is_empty() {
                None
            } else {
                Some(parse_ip("public address", &p.public_addr)?)
            },
            port,
            role,
            generation: p.generation,
        })
    }
}

impl From<GatewayEndpoint> for proto::GatewayEndpoint {
    fn from(g: GatewayEndpoint) -> Self {
        proto::GatewayEndpoint {
            cluster: g.cluster.into(),
            node: g.node.into(),
            public_key: g.public_key.to_vec(),
            private_addr: g.private_addr.to_string(),
            public_addr: g.public_addr.map(|a| a.to_string()).unwrap_or_default(),
            port: u32::from(g.port),
            role: match g.role {
                GatewayRole::Active => proto::GatewayRole::Active,
                GatewayRole::Passive => proto::GatewayRole::Passive,
            } as i32,
            generation: g.generation,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    ClusterSetIP,
    Headless,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub app_protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub hostname: Option<DnsLabel>,
    pub ready: bool,
}

/// A service exported from one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRecord {
    pub cluster: ClusterId,
    pub namespace: DnsLabel,
    pub name: DnsLabel,
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    pub ips: Vec<IpAddr>,
    pub endpoints: Vec<Endpoint>,
    pub ready: bool,
    pub exported_at_unix_ms: i64,
}

/// Bounds on one service record, so one export cannot bloat every watcher's memory.
pub const MAX_SERVICE_PORTS: usize = 100;
pub const MAX_SERVICE_IPS: usize = 16;
pub const MAX_SERVICE_ENDPOINTS: usize = 10_000;

fn at_most(what: &'static str, n: usize, max: usize) -> Result<(), ValidationError> {
    if n > max {
        return Err(ValidationError::Invalid {
            what,
            reason: format!("{n} given, at most {max} allowed"),
        });
    }
    Ok(())
}

impl TryFrom<proto::ServiceRecord> for ServiceRecord {
    type Error = ValidationError;
    fn try_from(p: proto::ServiceRecord) -> Result<Self, Self::Error> {
        at_most("service ports", p.ports.len(), MAX_SERVICE_PORTS)?;
        at_most("service IPs", p.ips.len(), MAX_SERVICE_IPS)?;
        at_most(
            "service endpoints",
            p.endpoints.len(),
            MAX_SERVICE_ENDPOINTS,
        )?;
        let service_type = match proto::ServiceType::try_from(p.r#type) {
            Ok(proto::ServiceType::ClusterSetIp) => ServiceType::ClusterSetIP,
            Ok(proto::ServiceType::Headless) => ServiceType::Headless,
            _ => {
                return Err(ValidationError::Invalid {
                    what: "service type",
                    reason: "must be ClusterSetIP or Headless".into(),
                });
            }
        };
        let ports = p
            .ports
            .into_iter()
            .map(|sp| {
                let port = u16::try_from(sp.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| ValidationError::Invalid {
                        what: "service port",
                        reason: format!("{} is not a port (1-65535)", sp.port),
                    })?;
                if !matches!(sp.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                    return Err(ValidationError::Invalid {
                        what: "service port protocol",
                        reason: format!("{:?} is not TCP, UDP or SCTP", sp.protocol),
                    });
                }
                if !sp.name.is_empty() && !is_dns_label(&sp.name) {
                    return Err(ValidationError::DnsLabel {
                        what: "port name",
                        value: sp.name,
                    });
                }
                Ok(ServicePort {
                    name: sp.name,
                    protocol: sp.protocol,
                    port,
                    app_protocol: sp.app_protocol,
                })
            })
            .collect::<Result<_, _>>()?;
        let ips = p
            .ips
            .iter()
            .map(|s| parse_ip("service IP", s))
            .collect::<Result<_, _>>()?;
        let endpoints = p
            .endpoints
            .into_iter()
            .map(|e| {
                Ok(Endpoint {
                    ip: parse_ip("endpoint IP", &e.ip)?,
                    hostname: if e.hostname.is_empty() {
                        None
                    } else {
                        Some(e.hostname.parse()?)
                    },
                    ready: e.ready,
                })
            })
            .collect::<Result<_, ValidationError>>()?;
        Ok(ServiceRecord {
            cluster: p.cluster.parse()?,
            namespace: p.namespace.parse()?,
            name: p.name.parse()?,
            service_type,
            ports,
            ips,
            endpoints,
            ready: p.ready,
            exported_at_unix_ms: p.exported_at_unix_ms,
        })
    }
}

impl From<ServiceRecord> for proto::ServiceRecord {
    fn from(s: ServiceRecord) -> Self {
        proto::ServiceRecord {
            cluster: s.cluster.into(),
            namespace: s.namespace.into(),
            name: s.name.into(),
            r#type: match s.service_type {
                ServiceType::ClusterSetIP => proto::ServiceType::ClusterSetIp,
                ServiceType::Headless => proto::ServiceType::Headless,
            } as i32,
            ports: s
                .ports
                .into_iter()
                .map(|p| proto::ServicePort {
                    name: p.name,
                    protocol: p.protocol,
                    port: u32::from(p.port),
                    app_protocol: p.app_protocol,
                })
                .collect(),
            ips: s.ips.iter().map(ToString::to_string).collect(),
            endpoints: s
                .endpoints
                .into_iter()
                .map(|e| proto::Endpoint {
                    ip: e.ip.to_string(),
                    hostname: e.hostname.map(String::from).unwrap_or_default(),
                    ready: e.ready,
                })
                .collect(),
            ready: s.ready,
            exported_at_unix_ms: s.exported_at_unix_ms,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    Connecting,
    Connected,
    Error,
}

/// The health of one tunnel, as gateway `from_node` of `from_cluster` measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    pub from_cluster: ClusterId,
    pub from_node: NodeName,
    pub to_cluster: ClusterId,
    pub to_node: NodeName,
    pub state: ConnectionState,
    pub rtt_micros: u64,
    pub last_handshake_unix_ms: i64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// (from cluster, from node, to cluster, to node): one tunnel as one gateway measured it.
pub type ConnectionKey = (ClusterId, NodeName, ClusterId, NodeName);

impl ConnectionStatus {
    pub fn tunnel(&self) -> ConnectionKey {
        (
            self.from_cluster.clone(),
            self.from_node.clone(),
            self.to_cluster.clone(),
            self.to_node.clone(),
        )
    }
}

impl TryFrom<proto::ConnectionStatus> for ConnectionStatus {
    type Error = ValidationError;
    fn try_from(p: proto::ConnectionStatus) -> Result<Self, Self::Error> {
        let state = match proto::ConnectionState::try_from(p.state) {
            Ok(proto::ConnectionState::Connecting) => ConnectionState::Connecting,
            Ok(proto::ConnectionState::Connected) => ConnectionState::Connected,
            Ok(proto::ConnectionState::Error) => ConnectionState::Error,
            _ => {
                return Err(ValidationError::Invalid {
                    what: "connection state",
                    reason: "must be connecting, connected or error".into(),
                });
            }
        };
        Ok(ConnectionStatus {
            from_cluster: p.from_cluster.parse()?,
            from_node: p.from_node.parse()?,
            to_cluster: p.to_cluster.parse()?,
            to_node: p.to_node.parse()?,
            state,
            rtt_micros: p.rtt_micros,
            last_handshake_unix_ms: p.last_handshake_unix_ms,
            tx_bytes: p.tx_bytes,
            rx_bytes: p.rx_bytes,
        })
    }
}

impl From<ConnectionStatus> for proto::ConnectionStatus {
    fn from(c: ConnectionStatus) -> Self {
        proto::ConnectionStatus {
            from_cluster: c.from_cluster.into(),
            from_node: c.from_node.into(),
            to_cluster: c.to_cluster.into(),
            to_node: c.to_node.into(),
            state: match c.state {
                ConnectionState::Connecting => proto::ConnectionState::Connecting,
                ConnectionState::Connected => proto::ConnectionState::Connected,
                ConnectionState::Error => proto::ConnectionState::Error,
            } as i32,
            rtt_micros: c.rtt_micros,
            last_handshake_unix_ms: c.last_handshake_unix_ms,
            tx_bytes: c.tx_bytes,
            rx_bytes: c.rx_bytes,
        }
    }
}

/// Any record the broker stores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    Cluster(ClusterRegistration),
    Gateway(GatewayEndpoint),
    Service(ServiceRecord),
    Connection(ConnectionStatus),
}

impl Record {
    pub fn key(&self) -> RecordKey {
        match self {
            Record::Cluster(r) => RecordKey::Cluster(r.cluster.id.clone()),
            Record::Gateway(g) => RecordKey::Gateway(g.cluster.clone(), g.node.clone()),
            Record::Service(s) => {
                RecordKey::Service(s.cluster.clone(), s.namespace.clone(), s.name.clone())
            }
            Record::Connection(c) => RecordKey::Connection(
                c.from_cluster.clone(),
                c.from_node.clone(),
                c.to_cluster.clone(),
                c.to_node.clone(),
            ),
        }
    }

    /// Encodes for the store (protobuf).
    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&proto::Record::from(self.clone()))
    }

    /// Decodes and validates a stored or received record.
    pub fn decode(bytes: &[u8]) -> Result<Self, ValidationError> {
        let p = <proto::Record as prost::Message>::decode(bytes).map_err(|e| {
            ValidationError::Invalid {
                what: "record encoding",
                reason: e.to_string(),
            }
        })?;
        p.try_into()
    }
}

impl TryFrom<proto::Record> for Record {
    type Error = ValidationError;
    fn try_from(p: proto::Record) -> Result<Self, Self::Error> {
        use proto::record::Kind as K;
        match p.kind.ok_or(ValidationError::Missing("record"))? {
            K::Cluster(c) => Ok(Record::Cluster(c.try_into()?)),
            K::Gateway(g) => Ok(Record::Gateway(g.try_into()?)),
            K::Service(s) => Ok(Record::Service(s.try_into()?)),
            K::Connection(c) => Ok(Record::Connection(c.try_into()?)),
        }
    }
}

impl From<Record> for proto::Record {
    fn from(r: Record) -> Self {
        use proto::record::Kind as K;
        proto::Record {
            kind: Some(match r {
                Record::Cluster(c) => K::Cluster(c.into()),
                Record::Gateway(g) => K::Gateway(g.into()),
                Record::Service(s) => K::Service(s.into()),
                Record::Connection(c) => K::Connection(c.into()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(id: &str, pods: &[&str], svcs: &[&str]) -> proto::Cluster {
        proto::Cluster {
            id: id.into(),
            pod_cidrs: pods.iter().map(|s| s.to_string()).collect(),
            service_cidrs: svcs.iter().map(|s| s.to_string()).collect(),
            labels: [("region".to_string(), "eu-west-1".to_string())].into(),
        }
    }

    #[test]
    fn cluster_validation() {
        let ok = Cluster::try_from(cluster("east", &["10.1.0.0/16"], &["10.101.0.0/16"])).unwrap();
        assert_eq!(ok.id.as_str(), "east");
        // Pod and service CIDRs of one cluster may not overlap either.
        let e = Cluster::try_from(cluster("east", &["10.0.0.0/8"], &["10.101.0.0/16"]));
        assert!(
            matches!(e, Err(ValidationError::SelfOverlap { .. })),
            "{e:?}"
        );
        assert!(Cluster::try_from(cluster("East", &["10.1.0.0/16"], &["10.2.0.0/16"])).is_err());
        assert!(Cluster::try_from(cluster("east", &[], &["10.2.0.0/16"])).is_err());
        let mut bad_label = cluster("east", &["10.1.0.0/16"], &["10.2.0.0/16"]);
        bad_label.labels.insert("a b".into(), "x".into());
        assert!(matches!(
            Cluster::try_from(bad_label),
            Err(ValidationError::Label { .. })
        ));
    }

    #[test]
    fn gateway_validation_and_round_trip() {
        let p = proto::GatewayEndpoint {
            cluster: "east".into(),
            node: "gw-0".into(),
            public_key: vec![7; 32],
            private_addr: "192.0.2.1".into(),
            public_addr: String::new(),
            port: 51820,
            role: proto::GatewayRole::Active as i32,
            generation: 3,
        };
        let g = GatewayEndpoint::try_from(p.clone()).unwrap();
        assert_eq!(proto::GatewayEndpoint::from(g), p);
        let mut short = p.clone();
        short.public_key = vec![1; 31];
        assert_eq!(
            GatewayEndpoint::try_from(short).unwrap_err(),
            ValidationError::PublicKey { len: 31 }
        );
        let mut port = p;
        port.port = 70000;
        assert!(GatewayEndpoint::try_from(port).is_err());
    }

    #[test]
    fn record_encoding_round_trip() {
        let r = Record::Service(ServiceRecord {
            cluster: "east".parse().unwrap(),
            namespace: "demo".parse().unwrap(),
            name: "echo".parse().unwrap(),
            service_type: ServiceType::Headless,
            ports: vec![ServicePort {
                name: "tcp".into(),
                protocol: "TCP".into(),
                port: 7,
                app_protocol: String::new(),
            }],
            ips: vec![],
            endpoints: vec![Endpoint {
                ip: "10.1.0.5".parse().unwrap(),
                hostname: Some("echo-0".parse().unwrap()),
                ready: true,
            }],
            ready: true,
            exported_at_unix_ms: 1,
        });
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        assert_eq!(r.key().to_string(), "services/east/demo/echo");
        assert!(Record::decode(b"\xff\xff").is_err());
    }
}
