//! Shared API of clusterlink: the broker's protobuf service and the domain types.
//!
//! Strings from the wire or the command line become domain types here, once: a
//! [`ClusterId`] is always a valid DNS label, a [`CidrSet`] never holds a CIDR with host bits
//! set, and a record that fails validation never reaches the broker's store.

pub mod error;
pub mod ids;
pub mod keys;
pub mod mcs;
pub mod net;
pub mod records;

pub use error::ValidationError;
pub use ids::{ClusterId, DnsLabel, NodeName};
pub use keys::{Kind, RecordKey};
pub use net::CidrSet;
pub use records::{
    Cluster, ClusterRegistration, ConnectionKey, ConnectionState, ConnectionStatus, Endpoint,
    GatewayEndpoint, GatewayRole, Record, ServicePort, ServiceRecord, ServiceType, active_gateway,
};

/// Generated protobuf and gRPC code for `clusterlink.broker.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("clusterlink.broker.v1");
}

/// Largest message the broker accepts or sends, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
