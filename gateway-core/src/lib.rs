//! The gateway's decisions, without I/O: no sockets, no TUN device, no clock of its own
//! (time comes in as `now`), no async runtime. The shell (`clusterlink-gateway`) feeds it
//! packets and time and carries out what it returns.
//!
//! - [`wg`]: the WireGuard implementation (boringtun's `Tunn`), behind one small interface.
//! - [`core`]: peers, routing, endpoints and health probes.
//! - [`view`]: the broker's records turned into peers.
//! - [`election`]: which of a cluster's gateway nodes is active.
//! - [`status`]: which tunnel status records go to the broker, and when.
//! - [`busy_poll`]: how long the data plane polls before it sleeps.
//!
//! Maps whose order can reach an output are ordered (`BTreeMap`); the per-packet lookups by
//! session index use a `HashMap`, which this crate's clippy.toml forbids iterating.

pub mod busy_poll;
pub mod core;
pub mod election;
pub mod status;
pub mod view;
pub mod wg;
