//! The route agent: on every node, kernel routes for the remote clusters' CIDRs toward the
//! active gateway.
//!
//! - [`core`]: the desired routes and rule from the cluster view, and the difference to what
//!   is installed, without I/O. (The rtnetlink applier, the daemon and the lab wiring are
//!   not written yet.)

pub mod core;
