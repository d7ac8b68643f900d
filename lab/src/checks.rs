//! The checks `lab up` makes once every tunnel is up: pod-to-pod reachability between every
//! pair of clusters, and the demo service resolved and answering from every cluster.

use serde::Serialize;

use crate::lab::{ECHO_NAME, LabState, echo_roundtrip, resolve};
use crate::topology::Role;

/// One pod-to-pod ping across clusters.
#[derive(Clone, Debug, Serialize)]
pub struct Reach {
    pub from: String,
    pub to: String,
    pub address: String,
    pub ok: bool,
}

/// The demo service from one cluster: what DNS answered, how many answers echoed.
#[derive(Clone, Debug, Serialize)]
pub struct Discovery {
    pub from: String,
    pub answers: Vec<String>,
    pub echoed: usize,
    pub ok: bool,
}

/// From a worker pod of every cluster, one ping to a worker pod of every other.
pub fn reachability(state: &LabState) -> Vec<Reach> {
    let worker_pod = |c: &crate::lab::LabCluster| {
        c.nodes
            .iter()
            .find(|n| n.node.role == Role::Worker)
            .unwrap_or(&c.nodes[0])
            .node
            .pod
            .clone()
    };
    let mut out = Vec::new();
    for from in &state.clusters {
        let src = worker_pod(from);
        for to in state.clusters.iter().filter(|t| t.name != from.name) {
            let dst = worker_pod(to);
            let ok = src
                .ns()
                .exec("ping", &["-c1", "-W2", &dst.address.to_string()])
                .is_ok();
            out.push(Reach {
                from: src.name.clone(),
                to: dst.name.clone(),
                address: dst.address.to_string(),
                ok,
            });
        }
    }
    out
}

/// From a worker pod of every cluster: the demo service resolved through its DNS plugin
/// (one answer per cluster), and every answer echoing.
pub fn discovery(state: &LabState) -> Vec<Discovery> {
    state
        .clusters
        .iter()
        .map(|c| {
            let pod = &c
                .nodes
                .iter()
                .find(|n| n.node.role == Role::Worker)
                .unwrap_or(&c.nodes[0])
                .node
                .pod;
            let answers = resolve(&pod.ns(), ECHO_NAME);
            let echoed = answers
                .iter()
                .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                .filter(|ip| echo_roundtrip(&pod.ns(), std::net::SocketAddr::new(*ip, 7)))
                .count();
            Discovery {
                from: pod.name.clone(),
                ok: answers.len() == state.clusters.len() && echoed == answers.len(),
                answers,
                echoed,
            }
        })
        .collect()
}
