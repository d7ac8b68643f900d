//! The network-namespace testbed behind the end-to-end tests and `clusterlink lab`.
//!
//! Everything it makes lives in namespaces it created, named with a per-run prefix, and is
//! removed when the [`netns::Testbed`] is dropped, on success, failure or panic. Nothing is
//! ever created or changed in the host's own network namespace: veth pairs are made inside a
//! namespace with their peer placed directly in another.

pub mod checks;
pub mod container;
pub mod invoke;
pub mod lab;
pub mod netns;
pub mod topology;

pub use lab::{Lab, LabState};
pub use netns::{Netns, Testbed, TestbedError, wait_until};
pub use topology::{ClusterNet, ClusterSpec, Node, Pod, Role, Topology};
