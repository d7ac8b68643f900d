//! The DNS plugin: answers `clusterset.local` names for services exported with the
//! Kubernetes MCS API from any cluster.
//!
//! - [`answer`]: the zone's answers from the broker's service records and the local
//!   gateway's live tunnels, without I/O or clock.
//! - [`export`]: the export reconciler (ServiceExport + Service + EndpointSlices to a
//!   ServiceRecord and the export's conditions), a plain function.
//! - [`import`]: the import reconciler (the cluster set's records to ServiceImports and
//!   EndpointSlices), a plain function.
//! - [`manifests`] and [`controller`]: the manifest-directory source and the loop that
//!   publishes what it exports and writes what it imports (standalone mode, the lab).
//! - [`mcs`]: the MCS API's ServiceExport and ServiceImport (kube CustomResource); the CRDs
//!   in `deploy/crds/` are generated from them.
//! - [`server`]: `clusterlink dns run`: hickory-server on UDP and TCP over that core, fed by
//!   the broker (services and tunnel status).

pub mod answer;
pub mod controller;
pub mod election;
pub mod export;
pub mod import;
pub mod kube_source;
pub mod manifests;
pub mod mcs;
pub mod server;

/// What the unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    /// Credentials of cluster "a" for a broker nobody listens on (127.0.0.1:1): for a
    /// controller whose test makes no broker call.
    pub fn unreachable_broker_credentials() -> clusterlink_broker_client::LiveCredentials {
        clusterlink_broker_client::LiveCredentials::fixed(clusterlink_broker_client::Credentials {
            api_version: String::new(),
            kind: String::new(),
            address: "127.0.0.1:1".into(),
            ca_certificate: String::new(),
            identity: clusterlink_broker_client::Identity::Cluster("a".parse().unwrap()),
            certificate: String::new(),
            private_key: String::new(),
        })
    }
}
