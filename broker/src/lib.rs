//! The clusterlink broker: the meeting point of clusters.
//!
//! - [`store`]: the storage contract and its embedded (redb) and etcd backends.

pub mod store;
pub mod testing;
