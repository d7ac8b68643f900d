//! What a cluster may claim (design: Security). A cluster publishes only addresses it owns
//! (inside its registered pod or service CIDRs); no cluster CIDR may cover what the mesh
//! itself runs on (the broker, the gateways' underlay and public addresses) or a reserved
//! range. The broker refuses the rest when it is written; the DNS plugin applies the same
//! rule when it builds its view, so a record that bypassed the broker still cannot make it
//! answer a foreign address. Pure functions: callers pass what they know.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::net::overlaps;
use crate::{CidrSet, Cluster, ClusterId, GatewayEndpoint, ServiceRecord};

/// An address a record claims that its cluster does not own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// What the address is in the record (`service IP`, `endpoint`).
    pub what: &'static str,
    pub addr: IpAddr,
}

/// True if `ip` lies in one of the cluster's pod or service CIDRs.
pub fn owns(cluster: &Cluster, ip: IpAddr) -> bool {
    cluster
        .pod_cidrs
        .iter()
        .chain(cluster.service_cidrs.iter())
        .any(|net| net.contains(&ip))
}

/// The first address of a service record (its IPs, then every endpoint, ready or not) that
/// its cluster does not own.
pub fn foreign_in_service(record: &ServiceRecord, owner: &Cluster) -> Option<Foreign> {
    let ips = record.ips.iter().map(|ip| ("service IP", *ip));
    let endpoints = record.endpoints.iter().map(|e| ("endpoint", e.ip));
    ips.chain(endpoints)
        .find(|(_, ip)| !owns(owner, *ip))
        .map(|(what, addr)| Foreign { what, addr })
}

/// Why an address cannot be a gateway's underlay address (`None`: it can be).
pub fn bad_underlay(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// The underlay and public addresses of a gateway endpoint, each with what it is.
pub fn gateway_addresses(g: &GatewayEndpoint) -> Vec<(&'static str, IpAddr)> {
    let mut out = vec![("private address", g.private_addr)];
    if let Some(p) = g.public_addr {
        out.push(("public address", p));
    }
    out
}

/// A reserved range no cluster CIDR may overlap: the CIDR would take traffic the hosts
/// need (the default route, loopback, link-local, multicast) into the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub net: &'static str,
    pub what: &'static str,
}

/// Reserved ranges, IPv4 then IPv6.
pub const RESERVED: &[Reserved] = &[
    Reserved {
        net: "0.0.0.0/8",
        what: "\"this network\" (and the default route)",
    },
    Reserved {
        net: "127.0.0.0/8",
        what: "loopback",
    },
    Reserved {
        net: "169.254.0.0/16",
        what: "link-local",
    },
    Reserved {
        net: "224.0.0.0/4",
        what: "multicast",
    },
    Reserved {
        net: "240.0.0.0/4",
        what: "reserved (240/4) and broadcast",
    },
    Reserved {
        net: "::/127",
        what: "unspecified and loopback",
    },
    Reserved {
        net: "fe80::/10",
        what: "link-local",
    },
    Reserved {
        net: "ff00::/8",
        what: "multicast",
    },
];

/// The shortest prefix a cluster CIDR may have: shorter ones cover too much to be a
/// cluster's own (and the default route, at /0).
pub const MIN_PREFIX_V4: u8 = 8;
pub const MIN_PREFIX_V6: u8 = 16;

/// Something a cluster's CIDR may not cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Covered {
    /// A prefix shorter than [`MIN_PREFIX_V4`]/[`MIN_PREFIX_V6`].
    TooWide { cidr: IpNet, min: u8 },
    /// A reserved range.
    Reserved { cidr: IpNet, range: Reserved },
    /// An address the mesh runs on.
    Infrastructure {
        cidr: IpNet,
        addr: IpAddr,
        what: String,
    },
}

impl fmt::Display for Covered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Covered::TooWide { cidr, min } => write!(
                f,
                "{cidr} is wider than a cluster's CIDR can be (at most /{min})"
            ),
            Covered::Reserved { cidr, range } => {
                write!(f, "{cidr} overlaps {} ({})", range.net, range.what)
            }
            Covered::Infrastructure { cidr, addr, what } => write!(
                f,
                "{cidr} covers {addr}, {what}; its traffic would be routed into the tunnels"
            ),
        }
    }
}

/// An address the mesh depends on, and what it is (`the broker's address`, `gateway b-gw0
/// of cluster b (private address)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Infrastructure {
    pub addr: IpAddr,
    pub what: String,
}

/// The first thing one of `cidrs` covers that it may not.
pub fn covers(cidrs: &CidrSet, infrastructure: &[Infrastructure]) -> Option<Covered> {
    for cidr in cidrs.iter() {
        let min = match cidr {
            IpNet::V4(_) => MIN_PREFIX_V4,
            IpNet::V6(_) => MIN_PREFIX_V6,
        };
        if cidr.prefix_len() < min {
            return Some(Covered::TooWide { cidr: *cidr, min });
        }
        for range in RESERVED {
            let Ok(net) = range.net.parse::<IpNet>() else {
                continue;
            };
            if overlaps(cidr, &net) {
                return Some(Covered::Reserved {
                    cidr: *cidr,
                    range: *range,
                });
            }
        }
        if let Some(i) = infrastructure.iter().find(|i| cidr.contains(&i.addr)) {
            return Some(Covered::Infrastructure {
                cidr: *cidr,
                addr: i.addr,
                what: i.what.clone(),
            });
        }
    }
    None
}

/// The first cluster (other than none: the gateway's own included) one of whose CIDRs holds
/// an address of the gateway: `(what, address, cluster, its CIDR)`.
pub fn gateway_inside_a_cluster<'a>(
    g: &GatewayEndpoint,
    clusters: impl IntoIterator<Item = &'a Cluster>,
) -> Option<(&'static str, IpAddr, ClusterId, IpNet)> {
    let addrs = gateway_addresses(g);
    for c in clusters {
        for net in c.pod_cidrs.iter().chain(c.service_cidrs.iter()) {
            if let Some((what, addr)) = addrs.iter().find(|(_, a)| net.contains(a)) {
                return Some((what, *addr, c.id.clone(), *net));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endpoint, ServiceType};

    fn cluster(id: &str, pods: &str, svcs: &str) -> Cluster {
        Cluster {
            id: id.parse().unwrap(),
            pod_cidrs: pods.parse().unwrap(),
            service_cidrs: svcs.parse().unwrap(),
            labels: Default::default(),
        }
    }

    fn service(ips: &[&str], endpoints: &[&str]) -> ServiceRecord {
        ServiceRecord {
            cluster: "east".parse().unwrap(),
            namespace: "demo".parse().unwrap(),
            name: "echo".parse().unwrap(),
            service_type: if ips.is_empty() {
                ServiceType::Headless
            } else {
                ServiceType::ClusterSetIP
            },
            ports: vec![],
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            endpoints: endpoints
                .iter()
                .map(|s| Endpoint {
                    ip: s.parse().unwrap(),
                    hostname: None,
                    ready: false,
                })
                .collect(),
            ready: true,
            exported_at_unix_ms: 0,
        }
    }

    #[test]
    fn a_service_claims_only_its_clusters_addresses() {
        let east = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
        assert_eq!(
            foreign_in_service(&service(&["10.101.0.7"], &[]), &east),
            None
        );
        assert_eq!(
            foreign_in_service(&service(&[], &["10.1.3.4", "10.1.9.9"]), &east),
            None
        );
        // Another cluster's pod, and an address on the internet; unready endpoints count.
        assert_eq!(
            foreign_in_service(&service(&[], &["10.1.3.4", "10.2.0.9"]), &east),
            Some(Foreign {
                what: "endpoint",
                addr: "10.2.0.9".parse().unwrap()
            })
        );
        assert_eq!(
            foreign_in_service(&service(&["8.8.8.8"], &[]), &east),
            Some(Foreign {
                what: "service IP",
                addr: "8.8.8.8".parse().unwrap()
            })
        );
    }

    #[test]
    fn cidrs_may_not_cover_the_mesh_or_reserved_ranges() {
        let infra = [
            Infrastructure {
                addr: "192.168.7.1".parse().unwrap(),
                what: "the broker's address".into(),
            },
            Infrastructure {
                addr: "172.16.0.4".parse().unwrap(),
                what: "gateway b-gw0 of cluster b (private address)".into(),
            },
        ];
        let set = |s: &str| s.parse::<CidrSet>().unwrap();
        assert_eq!(covers(&set("10.1.0.0/16"), &infra), None);
        let broker = covers(&set("10.1.0.0/16,192.168.0.0/16"), &infra).unwrap();
        assert!(
            broker
                .to_string()
                .contains("192.168.0.0/16 covers 192.168.7.1, the broker's address"),
            "{broker}"
        );
        let gw = covers(&set("172.16.0.0/24"), &infra).unwrap();
        assert!(gw.to_string().contains("gateway b-gw0"), "{gw}");
        for (cidr, says) in [
            ("0.0.0.0/0", "wider than"),
            ("8.0.0.0/7", "wider than"),
            ("127.0.0.0/16", "loopback"),
            ("169.254.0.0/24", "link-local"),
            ("224.0.0.0/24", "multicast"),
            ("240.0.0.0/8", "240/4"),
            ("::/0", "wider than"),
            ("::1/128", "loopback"),
            ("fe80::/64", "link-local"),
            ("ff02::/16", "multicast"),
        ] {
            let c = covers(&set(cidr), &[]).unwrap_or_else(|| panic!("{cidr} accepted"));
            assert!(c.to_string().contains(says), "{cidr}: {c}");
        }
        assert_eq!(covers(&set("fd00:1::/64"), &[]), None);
        assert_eq!(covers(&set("100.64.0.0/10"), &[]), None);
    }

    #[test]
    fn underlay_addresses() {
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.5",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
        ] {
            assert!(bad_underlay(bad.parse().unwrap()).is_some(), "{bad}");
        }
        assert_eq!(bad_underlay("192.0.2.10".parse().unwrap()), None);
    }
}
