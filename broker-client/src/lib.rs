//! What every member component (gateway, route agent, DNS plugin, the CLI) needs of the
//! broker, and nothing of its server side: no store, no CA.
//!
//! - [`files`]: the broker-info and credentials files, parsed and checked once at load.
//! - [`connect`]: a TLS connection to the broker with a credentials file's identity.
//! - [`follow`]: list + watch of the records a component acts on, into a
//!   [`clusterlink_api::ClusterSet`].
//! - [`backoff`]: the one reconnect-with-backoff schedule.
//! - [`fs`]: the one atomic file write.
//! - [`renew`]: credentials that follow their file and renew their certificate.

pub mod backoff;
pub mod connect;
pub mod files;
pub mod follow;
pub mod fs;
#[cfg(feature = "kube")]
pub mod node;
pub mod ready;
pub mod renew;

pub use backoff::Backoff;
pub use connect::{BROKER_SERVER_NAME, ConnectError, connect, connect_with};
pub use files::{
    BrokerInfo, Credentials, FileError, Identity, JoinOutput, PendingJoin, address_ip,
    check_address, check_host, rfc3339_from_unix_ms,
};
pub use follow::{FollowError, follow};
pub use ready::{Readiness, Ready};
pub use renew::{KeepOptions, LiveCredentials, keep};
