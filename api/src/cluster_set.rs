//! The cluster set as a member component sees it: the records it follows, as last seen.
//! Pure data: `broker-client`'s follower fills it from list + watch; the gateway, route
//! agent and DNS plugin read it.

use std::collections::BTreeMap;

use crate::{
    Cluster, ClusterId, ConnectionKey, ConnectionStatus, DnsLabel, GatewayEndpoint, Kind, NodeName,
    Record, RecordKey, ServiceRecord,
};

/// The records followed, as last seen (kinds not followed stay empty).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSet {
    pub clusters: BTreeMap<ClusterId, Cluster>,
    pub gateways: BTreeMap<(ClusterId, NodeName), GatewayEndpoint>,
    pub services: BTreeMap<(ClusterId, DnsLabel, DnsLabel), ServiceRecord>,
    pub connections: BTreeMap<ConnectionKey, ConnectionStatus>,
}

impl ClusterSet {
    /// Replaces every record of `kind` with `records` (a fresh list); records of other kinds
    /// in `records` are ignored.
    pub fn reset(&mut self, kind: Kind, records: Vec<Record>) {
        match kind {
            Kind::Clusters => self.clusters.clear(),
            Kind::Gateways => self.gateways.clear(),
            Kind::Services => self.services.clear(),
            Kind::Connections => self.connections.clear(),
        }
        for r in records.into_iter().filter(|r| r.key().kind() == kind) {
            self.put(r);
        }
    }

    /// Adds or replaces one record.
    pub fn put(&mut self, record: Record) {
        match record {
            Record::Cluster(c) => {
                self.clusters.insert(c.cluster.id.clone(), c.cluster);
            }
            Record::Gateway(g) => {
                self.gateways.insert((g.cluster.clone(), g.node.clone()), g);
            }
            Record::Service(s) => {
                self.services
                    .insert((s.cluster.clone(), s.namespace.clone(), s.name.clone()), s);
            }
            Record::Connection(c) => {
                self.connections.insert(c.tunnel(), c);
            }
        }
    }

    /// Removes the record at `key`, if held.
    pub fn delete(&mut self, key: RecordKey) {
        match key {
            RecordKey::Cluster(id) => {
                self.clusters.remove(&id);
            }
            RecordKey::Gateway(c, n) => {
                self.gateways.remove(&(c, n));
            }
            RecordKey::Service(c, ns, n) => {
                self.services.remove(&(c, ns, n));
            }
            RecordKey::Connection(f, fnode, t, n) => {
                self.connections.remove(&(f, fnode, t, n));
            }
        }
    }
}
