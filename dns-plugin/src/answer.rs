//! What the `clusterset.local` zone answers, without I/O and without a clock: the names of
//! exported services, from the broker's service records and the local gateway's view of
//! which clusters it has a live tunnel to.
//!
//! Names (all under the zone, case-insensitive):
//! - `<svc>.<ns>.svc`: A/AAAA of every healthy cluster exporting it (its cluster IPs, or for
//!   a headless service its ready endpoints), the local cluster first, then by policy;
//! - `<cluster>.<svc>.<ns>.svc`: the same, from that cluster only;
//! - `<host>.<cluster>.<svc>.<ns>.svc`: a headless service's endpoint with that hostname;
//! - `_<port>._<proto>.<svc>.<ns>.svc`: SRV, one per healthy cluster (target
//!   `<cluster>.<svc>.<ns>.svc`).
//!
//! A cluster is healthy for a service when its record is ready and it is the local cluster or
//! the local gateway has a live tunnel to it. Unknown names are NXDOMAIN; names that exist
//! without the asked type (the zone apex, `svc`, a namespace, or AAAA of an IPv4 service) are
//! NODATA; names outside the zone are REFUSED.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use clusterlink_api::{
    Cluster, ClusterId, ConnectionKey, ConnectionState, ConnectionStatus, DnsLabel, ServiceRecord,
    ServiceType, ownership,
};

/// The query types the zone knows; anything else is NODATA for a name that exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    A,
    Aaaa,
    Srv,
    Soa,
    Ns,
    Any,
    Other(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// Remote clusters in turn, a different one first for each query.
    #[default]
    RoundRobin,
    /// Remote clusters by the gateways' measured tunnel RTT, nearest first.
    Nearest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    Ip(IpAddr),
    /// priority, weight, port, target (labels under the zone).
    Srv {
        port: u16,
        target: Vec<String>,
    },
    Soa,
    Ns,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Records for the name asked (all with the zone's TTL).
    Records(Vec<Data>),
    /// The name exists, without records of the type asked (answer with the SOA).
    NoData,
    /// No such name (answer with the SOA).
    NxDomain,
    /// Not in this zone.
    Refused,
}

/// What the zone knows at one moment.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub local: Option<ClusterId>,
    /// (namespace, service) -> cluster -> record.
    pub services: BTreeMap<(String, String), BTreeMap<ClusterId, ServiceRecord>>,
    /// Clusters the local gateway has a live tunnel to, with the tunnel's RTT when known.
    pub live: BTreeMap<ClusterId, Option<Duration>>,
}

impl View {
    pub fn insert(&mut self, r: ServiceRecord) {
        self.services
            .entry((r.namespace.to_string(), r.name.to_string()))
            .or_default()
            .insert(r.cluster.clone(), r);
    }

    pub fn remove(&mut self, cluster: &ClusterId, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(m) = self.services.get_mut(&key) {
            m.remove(cluster);
            if m.is_empty() {
                self.services.remove(&key);
            }
        }
    }

    /// One cluster's record of a service.
    fn record(&self, ns: &str, svc: &str, cluster: &str) -> Option<&ServiceRecord> {
        self.services
            .get(&(ns.to_owned(), svc.to_owned()))?
            .iter()
            .find(|(c, _)| c.as_str() == cluster)
            .map(|(_, r)| r)
    }

    fn healthy(&self, r: &ServiceRecord) -> bool {
        r.ready && (self.local.as_ref() == Some(&r.cluster) || self.live.contains_key(&r.cluster))
    }

    /// The healthy clusters' records for a service: local first, then by policy.
    fn ordered<'a>(
        &'a self,
        records: &'a BTreeMap<ClusterId, ServiceRecord>,
        policy: Policy,
        turn: u64,
    ) -> Vec<&'a ServiceRecord> {
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for r in records.values().filter(|r| self.healthy(r)) {
            if self.local.as_ref() == Some(&r.cluster) {
                local.push(r);
            } else {
                remote.push(r);
            }
        }
        match policy {
            Policy::RoundRobin => {
                if !remote.is_empty() {
                    let k = (turn % remote.len() as u64) as usize;
                    remote.rotate_left(k);
                }
            }
            Policy::Nearest => remote.sort_by_key(|r| {
                self.live
                    .get(&r.cluster)
                    .copied()
                    .flatten()
                    .unwrap_or(Duration::MAX)
            }),
        }
        local.extend(remote);
        local
    }
}

/// A tunnel whose last handshake is older than this is not live, whatever its status says:
/// WireGuard itself rejects a session after 180 s, and rekeys every 120 s while it is used
/// (the gateways' probes use every tunnel ten times a second).
pub const HANDSHAKE_FRESH_MS: i64 = 180_000;

/// The service records a cluster may publish: those of a registered cluster whose every
/// address lies in that cluster's CIDRs (design: Security). The broker refuses the rest when
/// they are written; this is the same rule again, so that a record that bypassed the broker
/// (or came from an older one) still cannot make the plugin answer a foreign address.
pub fn vetted<'a>(
    clusters: &'a BTreeMap<ClusterId, Cluster>,
    services: impl IntoIterator<Item = &'a ServiceRecord> + 'a,
) -> impl Iterator<Item = &'a ServiceRecord> + 'a {
    services.into_iter().filter(|r| {
        clusters
            .get(&r.cluster)
            .is_some_and(|c| ownership::foreign_in_service(r, c).is_none())
    })
}

/// The view from the broker's records at `now_unix_ms`: every cluster's vetted service
/// records ([`vetted`]), and the clusters the local gateway reports a connected tunnel to with
/// a fresh handshake (with the best RTT over that cluster's gateway nodes).
pub fn view_of<'a>(
    local: &ClusterId,
    clusters: &'a BTreeMap<ClusterId, Cluster>,
    services: &'a BTreeMap<(ClusterId, DnsLabel, DnsLabel), ServiceRecord>,
    connections: &'a BTreeMap<ConnectionKey, ConnectionStatus>,
    now_unix_ms: i64,
) -> View {
    let mut view = View {
        local: Some(local.clone()),
        ..View::default()
    };
    for r in vetted(clusters, services.values()) {
        view.insert(r.clone());
    }
    for c in connections.values() {
        let fresh = c.last_handshake_unix_ms > 0
            && now_unix_ms.saturating_sub(c.last_handshake_unix_ms) <= HANDSHAKE_FRESH_MS;
        if &c.from_cluster != local || c.state != ConnectionState::Connected || !fresh {
            continue;
        }
        let rtt = (c.rtt_micros > 0).then(|| Duration::from_micros(c.rtt_micros));
        let best = view.live.entry(c.to_cluster.clone()).or_insert(rtt);
        *best = match (*best, rtt) {
            (Some(b), Some(r)) => Some(b.min(r)),
            (b, r) => b.or(r),
        };
    }
    view
}

/// Addresses a record contributes: its cluster IPs, or a headless service's ready endpoints.
fn addresses(r: &ServiceRecord) -> Vec<IpAddr> {
    match r.service_type {
        ServiceType::ClusterSetIP => r.ips.clone(),
        ServiceType::Headless => r
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| e.ip)
            .collect(),
    }
}

fn ips_of(addrs: impl IntoIterator<Item = IpAddr>, qtype: QType) -> Vec<Data> {
    addrs
        .into_iter()
        .filter(|ip| match qtype {
            QType::A => ip.is_ipv4(),
            QType::Aaaa => ip.is_ipv6(),
            QType::Any => true,
            _ => false,
        })
        .map(Data::Ip)
        .collect()
}

fn records_or_nodata(data: Vec<Data>) -> Answer {
    if data.is_empty() {
        Answer::NoData
    } else {
        Answer::Records(data)
    }
}

/// The answer for `name` (labels, lowercase, most specific first, without the trailing
/// root) of type `qtype`, in a zone whose origin is `zone` (labels likewise). `turn` picks
/// the round-robin rotation.
pub fn answer(
    zone: &[String],
    view: &View,
    policy: Policy,
    turn: u64,
    name: &[String],
    qtype: QType,
) -> Answer {
    if name.len() < zone.len() || name[name.len() - zone.len()..] != *zone {
        return Answer::Refused;
    }
    let rel: Vec<&str> = name[..name.len() - zone.len()]
        .iter()
        .rev()
        .map(String::as_str)
        .collect();
    // rel is now outermost first: ["svc", ns, svc, cluster?, host?]
    match rel.as_slice() {
        [] => match qtype {
            QType::Soa => Answer::Records(vec![Data::Soa]),
            QType::Ns => Answer::Records(vec![Data::Ns]),
            QType::Any => Answer::Records(vec![Data::Soa, Data::Ns]),
            _ => Answer::NoData,
        },
        ["svc"] => Answer::NoData,
        ["svc", ns] => {
            if view.services.keys().any(|(n, _)| n == ns) {
                Answer::NoData
            } else {
                Answer::NxDomain
            }
        }
        ["svc", ns, svc] => {
            let Some(records) = view.services.get(&(ns.to_string(), svc.to_string())) else {
                return Answer::NxDomain;
            };
            let ordered = view.ordered(records, policy, turn);
            records_or_nodata(ips_of(ordered.iter().flat_map(|r| addresses(r)), qtype))
        }
        ["svc", ns, svc, label] if label.starts_with('_') => {
            Answer::NxDomain.or_srv_parent(view, ns, svc, label)
        }
        ["svc", ns, svc, proto, port] if port.starts_with('_') && proto.starts_with('_') => {
            let Some(records) = view.services.get(&(ns.to_string(), svc.to_string())) else {
                return Answer::NxDomain;
            };
            let (port, proto) = (&port[1..], &proto[1..]);
            let ordered = view.ordered(records, policy, turn);
            let srv: Vec<Data> = ordered
                .iter()
                .filter_map(|r| {
                    let p = r.ports.iter().find(|p| {
                        p.name.eq_ignore_ascii_case(port) && p.protocol.eq_ignore_ascii_case(proto)
                    })?;
                    Some(Data::Srv {
                        port: p.port,
                        target: vec![
                            r.cluster.to_string(),
                            svc.to_string(),
                            ns.to_string(),
                            "svc".to_owned(),
                        ],
                    })
                })
                .collect();
            if srv.is_empty() {
                return Answer::NxDomain;
            }
            match qtype {
                QType::Srv | QType::Any => Answer::Records(srv),
                _ => Answer::NoData,
            }
        }
        ["svc", ns, svc, cluster] => {
            let Some(r) = view.record(ns, svc, cluster) else {
                return Answer::NxDomain;
            };
            if !view.healthy(r) {
                return Answer::NoData;
            }
            records_or_nodata(ips_of(addresses(r), qtype))
        }
        ["svc", ns, svc, cluster, host] => {
            let Some(r) = view.record(ns, svc, cluster) else {
                return Answer::NxDomain;
            };
            let endpoints: Vec<IpAddr> = r
                .endpoints
                .iter()
                .filter(|e| e.hostname.as_ref().is_some_and(|h| h.as_str() == *host))
                .map(|e| e.ip)
                .collect();
            if endpoints.is_empty() || r.service_type != ServiceType::Headless {
                return Answer::NxDomain;
            }
            if !view.healthy(r) {
                return Answer::NoData;
            }
            records_or_nodata(ips_of(endpoints, qtype))
        }
        _ => Answer::NxDomain,
    }
}

impl Answer {
    /// `_<proto>.<svc>.<ns>.svc` exists (an empty non-terminal above the SRV names) when the
    /// service has a port of that protocol.
    fn or_srv_parent(self, view: &View, ns: &str, svc: &str, label: &str) -> Answer {
        let proto = &label[1..];
        let exists = view
            .services
            .get(&(ns.to_owned(), svc.to_owned()))
            .is_some_and(|m| {
                m.values().any(|r| {
                    r.ports
                        .iter()
                        .any(|p| p.protocol.eq_ignore_ascii_case(proto))
                })
            });
        if exists { Answer::NoData } else { self }
    }
}

#[cfg(test)]
mod tests;
