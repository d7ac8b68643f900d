//! The route agent: on every node, kernel routes for the remote clusters' CIDRs toward the
//! active gateway.
//!
//! - [`core`]: the desired routes, rule and overlay link from the cluster view, and the
//!   difference to what is installed, without I/O.
//! - [`kernel`]: reads and changes the agent's part of the node over rtnetlink.
//! - [`shell`]: `clusterlink route-agent run` and `cleanup`: follows the broker and the
//!   kernel's own notifications, and applies the difference.

pub mod core;
pub mod kernel;
pub mod shell;

pub use shell::{AgentConfig, AgentError, cleanup, run};
