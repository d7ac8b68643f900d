//! The clusterlink gateway's shell: the I/O around `clusterlink-gateway-core`.
//!
//! - [`config`]: configuration and errors, the WireGuard key file, the open-files limit.
//! - [`plane`]: the data plane, an epoll loop over the TUN device and the UDP sockets.
//! - [`udp`]: the UDP sockets, batched (recvmmsg/GRO, GSO).
//! - [`publisher`]: this gateway's endpoint under a broker lease, and its tunnels' status.
//! - [`run`]: `run(config, shutdown)`: the data plane's thread, the broker follower and the
//!   publisher.
//!
//! The modules depend one way: `run` → `plane`, `publisher` → `config`; nothing depends on
//! `run`.

pub mod config;
pub mod plane;
pub mod publisher;
pub mod run;
pub mod udp;

pub use config::{GatewayConfig, GatewayError};
pub use run::run;
