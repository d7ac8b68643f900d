//! What tests and benchmarks share, and what no product crate links: a throwaway etcd
//! ([`etcd`]), loopback ports held from the moment they are chosen until the process that
//! binds them is gone ([`ports`]), waits on a condition with a deadline ([`wait`]) and child
//! processes killed when their guard drops ([`process`]), and the clusterlink image built
//! from the repository's Containerfile on a local base ([`image`]).
//!
//! Only ever a dev-dependency (and a dependency of `clusterlink-bench`).

pub mod etcd;
pub mod image;
pub mod ports;
pub mod process;
pub mod rbac;
pub mod wait;

pub use etcd::{EtcdHarnessError, EtcdServer};
pub use ports::PortLease;
pub use process::ProcessGuard;
pub use wait::{Timeout, wait_for, wait_until};
