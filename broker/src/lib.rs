//! The clusterlink broker: the meeting point of clusters.
//!
//! - [`store`]: the storage contract and its embedded (redb) and etcd backends.

pub mod audit;
pub mod core;
pub mod deploy;
pub mod hub;
pub mod limits;
pub mod pki;
pub mod server;
pub mod service;
pub mod store;
