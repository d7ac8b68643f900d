//! The clusterlink gateway: WireGuard tunnels to the other clusters' gateways.
//!
//! - [`wg`]: the WireGuard implementation, behind one small interface.
//! - [`core`]: peers, routing, endpoints and health probes, without I/O.
//! - [`view`]: the broker's records turned into peers.
//! - [`election`]: which of a cluster's gateway nodes is active.
//! - [`busy_poll`]: how long the data plane polls before it sleeps.
//! - [`plane`]: the data plane, an epoll loop over the TUN device and the UDP socket.
//! - [`udp`]: the UDP socket, batched (recvmmsg/GRO, GSO).
//! - [`status`]: which tunnel status records go to the broker, and when.
//! - [`shell`]: `run(config, shutdown)`: the data plane's thread, the broker follower and
//!   the publisher.

pub mod busy_poll;
pub mod core;
pub mod election;
pub mod plane;
pub mod shell;
pub mod status;
pub mod udp;
pub mod view;
pub mod wg;

pub use shell::{GatewayConfig, run};
