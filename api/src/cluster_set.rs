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

/// How far cluster `me` is into the mesh: its active gateway, and which other clusters with
/// an active gateway that one reports a connected tunnel to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshProgress {
    pub active_gateway: Option<NodeName>,
    pub connected: Vec<ClusterId>,
    /// Other clusters with an active gateway that `me`'s is not connected to (yet).
    pub missing: Vec<ClusterId>,
    /// Other clusters with no active gateway: nothing to connect to.
    pub without_gateway: Vec<ClusterId>,
}

impl MeshProgress {
    /// Joined: an active gateway, connected to every other cluster that has one.
    pub fn is_done(&self) -> bool {
        self.active_gateway.is_some() && self.missing.is_empty()
    }
}

impl ClusterSet {
    /// [`MeshProgress`] of cluster `me`.
    pub fn mesh_progress(&self, me: &ClusterId) -> MeshProgress {
        let mut p = MeshProgress {
            active_gateway: crate::active_gateway(&self.gateways, me).map(|g| g.node.clone()),
            ..MeshProgress::default()
        };
        for other in self.clusters.keys().filter(|c| *c != me) {
            let Some(theirs) = crate::active_gateway(&self.gateways, other) else {
                p.without_gateway.push(other.clone());
                continue;
            };
            let up = p.active_gateway.as_ref().is_some_and(|mine| {
                self.connections
                    .get(&(me.clone(), mine.clone(), other.clone(), theirs.node.clone()))
                    .is_some_and(|c| c.state == crate::ConnectionState::Connected)
            });
            if up {
                p.connected.push(other.clone());
            } else {
                p.missing.push(other.clone());
            }
        }
        p
    }
}

#[cfg(test)]
mod mesh_tests {
    use super::*;
    use crate::{ConnectionState, ConnectionStatus, GatewayEndpoint, GatewayRole};

    fn cluster(id: &str) -> Cluster {
        Cluster {
            id: id.parse().unwrap(),
            pod_cidrs: "10.1.0.0/16".parse().unwrap(),
            service_cidrs: "10.2.0.0/16".parse().unwrap(),
            labels: Default::default(),
        }
    }

    fn gateway(c: &str, node: &str, role: GatewayRole) -> GatewayEndpoint {
        GatewayEndpoint {
            cluster: c.parse().unwrap(),
            node: node.parse().unwrap(),
            public_key: [1; 32],
            private_addr: "192.0.2.1".parse().unwrap(),
            public_addr: None,
            port: 51820,
            role,
            generation: 1,
        }
    }

    #[test]
    fn done_when_the_active_gateway_is_connected_to_every_cluster_with_one() {
        let me: ClusterId = "east".parse().unwrap();
        let mut set = ClusterSet::default();
        for c in ["east", "west", "north"] {
            let c = cluster(c);
            set.clusters.insert(c.id.clone(), c);
        }
        assert_eq!(set.mesh_progress(&me).active_gateway, None);
        assert!(!set.mesh_progress(&me).is_done());
        for (c, n, role) in [
            ("east", "e0", GatewayRole::Active),
            ("east", "e1", GatewayRole::Passive),
            ("west", "w0", GatewayRole::Active),
        ] {
            let g = gateway(c, n, role);
            set.gateways.insert((g.cluster.clone(), g.node.clone()), g);
        }
        let p = set.mesh_progress(&me);
        assert_eq!(p.active_gateway, Some("e0".parse().unwrap()));
        assert_eq!(p.missing, ["west".parse::<ClusterId>().unwrap()]);
        assert_eq!(p.without_gateway, ["north".parse::<ClusterId>().unwrap()]);
        assert!(!p.is_done());
        let status = |state| ConnectionStatus {
            from_cluster: "east".parse().unwrap(),
            from_node: "e0".parse().unwrap(),
            to_cluster: "west".parse().unwrap(),
            to_node: "w0".parse().unwrap(),
            state,
            rtt_micros: 0,
            last_handshake_unix_ms: 0,
            tx_bytes: 0,
            rx_bytes: 0,
        };
        let key = (
            "east".parse().unwrap(),
            "e0".parse().unwrap(),
            "west".parse().unwrap(),
            "w0".parse().unwrap(),
        );
        set.connections
            .insert(key.clone(), status(ConnectionState::Connecting));
        assert!(!set.mesh_progress(&me).is_done());
        set.connections
            .insert(key, status(ConnectionState::Connected));
        let p = set.mesh_progress(&me);
        assert!(p.is_done(), "{p:?}");
        assert_eq!(p.connected, ["west".parse::<ClusterId>().unwrap()]);
    }
}
