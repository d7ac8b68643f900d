//! Shared API of clusterlink: the broker's protobuf service and the domain types.
//!
//! Strings from the wire or the command line become domain types here, once: a
//! [`ClusterId`] is always a valid DNS label, a [`CidrSet`] never holds a CIDR with host bits
//! set, and a record that fails validation never reaches the broker's store.

pub mod cluster_set;
pub mod error;
pub mod ids;
pub mod keys;
pub mod net;
pub mod ownership;
pub mod records;

pub use cluster_set::{ClusterSet, MeshProgress};
pub use error::ValidationError;
pub use ids::{ClusterId, DnsLabel, NodeName};
pub use keys::{Kind, RecordKey};
pub use net::CidrSet;
pub use records::{
    Cluster, ClusterRegistration, ConnectionKey, ConnectionState, ConnectionStatus, Endpoint,
    GatewayEndpoint, GatewayRole, Record, RetiringSerial, ServicePort, ServiceRecord, ServiceType,
    active_gateway,
};

/// Generated protobuf code for `clusterlink.broker.v1`, with the gRPC client and server
/// (`broker_client`, `broker_server`) under the `grpc` feature.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/clusterlink.broker.v1.rs"));
}

/// Largest message the broker accepts or sends, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Milliseconds since the Unix epoch, as records carry time (0 before the epoch).
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
