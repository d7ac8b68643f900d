//! From the broker's view (clusters and gateway endpoints) to the gateway core's peers.
//! Pure: unit-tested without a broker.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use clusterlink_api::{Cluster, ClusterId, GatewayEndpoint, NodeName, active_gateway};

use crate::core::PeerSpec;

/// One peer per remote gateway node whose cluster is known; AllowedIPs are its cluster's
/// CIDRs. Endpoints: the private address first, then the one the broker saw if different.
pub fn peer_specs(
    local: &ClusterId,
    clusters: &BTreeMap<ClusterId, Cluster>,
    gateways: &BTreeMap<(ClusterId, NodeName), GatewayEndpoint>,
) -> Vec<PeerSpec> {
    gateways
        .values()
        .filter(|g| &g.cluster != local)
        .filter_map(|g| {
            let cluster = clusters.get(&g.cluster)?;
            let mut endpoints = vec![SocketAddr::new(g.private_addr, g.port)];
            if let Some(public) = g.public_addr.filter(|p| *p != g.private_addr) {
                endpoints.push(SocketAddr::new(public, g.port));
            }
            Some(PeerSpec {
                cluster: g.cluster.clone(),
                node: g.node.clone(),
                public_key: g.public_key,
                endpoints,
                cidrs: cluster
                    .pod_cidrs
                    .iter()
                    .chain(cluster.service_cidrs.iter())
                    .copied()
                    .collect(),
                // Of two endpoints that both say active, the one every observer picks.
                active: active_gateway(gateways, &g.cluster).is_some_and(|a| a.node == g.node),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterlink_api::GatewayRole;

    fn cluster(id: &str, pods: &str, svcs: &str) -> (ClusterId, Cluster) {
        let c = Cluster {
            id: id.parse().unwrap(),
            pod_cidrs: pods.parse().unwrap(),
            service_cidrs: svcs.parse().unwrap(),
            labels: Default::default(),
        };
        (c.id.clone(), c)
    }

    fn gw(
        cluster: &str,
        node: &str,
        private: &str,
        public: Option<&str>,
    ) -> ((ClusterId, NodeName), GatewayEndpoint) {
        let g = GatewayEndpoint {
            cluster: cluster.parse().unwrap(),
            node: node.parse().unwrap(),
            public_key: [cluster.len() as u8; 32],
            private_addr: private.parse().unwrap(),
            public_addr: public.map(|p| p.parse().unwrap()),
            port: 51820,
            role: GatewayRole::Active,
            generation: 1,
        };
        ((g.cluster.clone(), g.node.clone()), g)
    }

    #[test]
    fn remote_gateways_become_peers_with_their_clusters_cidrs() {
        let clusters = BTreeMap::from([
            cluster("a", "10.1.0.0/16", "10.101.0.0/16"),
            cluster("b", "10.2.0.0/16", "10.102.0.0/16"),
        ]);
        let gateways = BTreeMap::from([
            gw("a", "gw0", "172.31.1.2", Some("172.31.1.2")),
            gw("b", "gw0", "172.31.2.2", Some("100.64.2.1")),
            // A gateway of a cluster not (yet) known is skipped.
            gw("c", "gw0", "172.31.3.2", None),
        ]);
        let specs = peer_specs(&"a".parse().unwrap(), &clusters, &gateways);
        assert_eq!(specs.len(), 1);
        let b = &specs[0];
        assert_eq!(b.cluster.as_str(), "b");
        assert_eq!(
            b.endpoints,
            vec![
                "172.31.2.2:51820".parse().unwrap(),
                "100.64.2.1:51820".parse().unwrap()
            ]
        );
        assert_eq!(b.cidrs.len(), 2);
        assert!(b.active);
    }
}
