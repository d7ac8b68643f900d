//! The clusterlink gateway: WireGuard tunnels to the other clusters' gateways.
//!
//! - [`wg`]: the WireGuard implementation, behind one small interface.
//! - [`core`]: peers, routing, endpoints and health probes, without I/O.
//! - [`view`]: the broker's records turned into peers.
//! - [`election`]: which of a cluster's gateway nodes is active.
//! - [`shell`]: `run(config, shutdown)`: TUN, UDP, broker.

pub mod core;
pub mod election;
pub mod shell;
pub mod udp;
pub mod view;
pub mod wg;

pub use shell::{GatewayConfig, run};
