//! The clusterlink gateway: WireGuard tunnels to the other clusters' gateways.
//!
//! - [`wg`]: the WireGuard implementation, behind one small interface.
//! - [`core`]: peers, routing, endpoints and health probes, without I/O.

pub mod core;
pub mod wg;
