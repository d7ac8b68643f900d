//! The end-to-end scenarios: real `clusterlink` processes, most of them in network
//! namespaces built by `clusterlink-lab` (root), checked at the network level (ping, TCP,
//! `dig`, the wan's nft counters). One test binary, a module per concern; each module opens
//! with the topology it builds.
//!
//! - [`broker`]: the broker through the CLI (deploy, join, show, revoke, errors, crash).
//! - [`dataplane`]: gateways in a full mesh, NAT, wireguard-go interop, MTU, floods.
//! - [`redundancy`]: several gateways per cluster: election, failover, hand-over.
//! - [`routes`]: route agents: pod to pod across clusters, repair, re-point, cleanup.
//! - [`discovery`]: `clusterset.local` from pods, the export path and its conditions.
//! - [`certificates`]: a CA rotation under traffic: renewals without restarts or loss.
//! - [`hardening`]: bounded shutdown with clients attached, crash-safe join, honest outputs.
//! - [`image`]: the container image built, and the lab's components run from it.
//! - [`lab`]: `clusterlink lab up|status|exec|down` as an operator runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod broker;
mod certificates;
mod dataplane;
mod discovery;
mod hardening;
mod image;
mod lab;
mod redundancy;
mod routes;
