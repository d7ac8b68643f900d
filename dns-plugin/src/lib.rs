//! The DNS plugin: answers `clusterset.local` names for services exported with the
//! Kubernetes MCS API from any cluster.
//!
//! - [`answer`]: the zone's answers from the broker's service records and the local
//!   gateway's live tunnels, without I/O or clock.
//! - [`server`]: `clusterlink dns run`: hickory-server on UDP and TCP over that core, fed by
//!   the broker (services and tunnel status).

pub mod answer;
pub mod server;
