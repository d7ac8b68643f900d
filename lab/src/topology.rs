//! Multi-cluster topologies.
//!
//! ```text
//!                            wan  (routes the underlay; NAT per cluster, optional)
//!          br1 172.31.1.1  /     \  br2 172.31.2.1        public address of a NATed cluster:
//!                         /       \                        100.64.<i>.1 (on wan's loopback)
//!   a-gw0 172.31.1.2  a-w1 172.31.1.101      b-gw0 …  b-w1 …
//!     │ pod0               │ pod0
//!   a-gw0-pod 10.1.1.10  a-w1-pod 10.1.101.10
//! ```
//!
//! Each cluster's nodes share one segment (a bridge in the wan namespace): gateway node K
//! at `172.31.<i>.<2+K>`, worker node K (from 1) at `172.31.<i>.<100+K>`. Every node has one
//! pod, a namespace on a veth pair to it, in the node's own /24 of the cluster's pod CIDR
//! (`10.<i>.<n>.0/24`, n = K+1 for gateways, 100+K for workers; the pod is .10, the node .1).
//! The nodes route each other's pod subnets over the segment, as a host-gateway CNI would.
//!
//! A cluster behind NAT has its underlay source-NATed to `100.64.<i>.1` when it leaves for
//! another cluster, and connections into it that it did not start are dropped, as at a
//! real NAT. The broker has a namespace of its own behind the wan.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::netns::{Netns, Testbed, TestbedError};

#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub name: String,
    pub gateways: usize,
    pub workers: usize,
    pub nat: bool,
}

impl ClusterSpec {
    /// One cluster per name, each with one gateway node and `workers` worker nodes; the
    /// clusters named in `nat` behind NAT.
    pub fn many(names: &[&str], workers: usize, nat: &[&str]) -> Vec<ClusterSpec> {
        names
            .iter()
            .map(|n| ClusterSpec {
                name: (*n).to_owned(),
                gateways: 1,
                workers,
                nat: nat.contains(n),
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Worker,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    /// `<node>-pod`.
    pub name: String,
    pub namespace: String,
    pub address: Ipv4Addr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// `<cluster>-gw<K>` or `<cluster>-w<K>`.
    pub name: String,
    pub role: Role,
    pub namespace: String,
    pub underlay: Ipv4Addr,
    /// The node's /24 of the pod CIDR.
    pub pod_subnet: String,
    /// The node's own address on its pods' link (.1 of the /24).
    pub pod_side: Ipv4Addr,
    pub pod: Pod,
}

impl Node {
    pub fn ns(&self) -> Netns {
        Netns {
            name: self.namespace.clone(),
        }
    }
}

impl Pod {
    pub fn ns(&self) -> Netns {
        Netns {
            name: self.namespace.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClusterNet {
    pub name: String,
    pub index: u8,
    pub nat: bool,
    /// The address the other clusters see this cluster's gateways come from.
    pub public: Ipv4Addr,
    /// Gateway nodes first, then workers.
    pub nodes: Vec<Node>,
}

impl ClusterNet {
    pub fn gateways(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.role == Role::Gateway)
    }

    pub fn workers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.role == Role::Worker)
    }
}

pub struct Topology {
    pub wan: Netns,
    /// A namespace of its own behind the wan, at [`Topology::BROKER_ADDR`], so that what the
    /// broker sees of a NATed cluster is its public address.
    pub broker: Netns,
    pub clusters: Vec<ClusterNet>,
}

impl Topology {
    pub const BROKER_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);

    /// Wan address on cluster `i`'s segment.
    pub fn wan_addr(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, i, 1)
    }

    pub fn build(bed: &Testbed, specs: &[ClusterSpec]) -> Result<Self, TestbedError> {
        let wan = bed.namespace("wan")?;
        wan.sysctl("net.ipv4.ip_forward", "1")?;
        let broker = bed.namespace("broker")?;
        bed.veth(&wan, "brk", &broker, "eth0")?;
        wan.ip(&["addr", "add", "172.31.0.1/24", "dev", "brk"])?;
        broker.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::BROKER_ADDR),
            "dev",
            "eth0",
        ])?;
        broker.ip(&["route", "add", "default", "via", "172.31.0.1"])?;
        let mut clusters = Vec::new();
        let mut nat_rules = String::new();
        for (i, spec) in specs.iter().enumerate() {
            let idx = u8::try_from(i + 1)
                .ok()
                .filter(|i| *i <= 99)
                .ok_or_else(|| TestbedError::Command {
                    command: "topology".into(),
                    stderr: "at most 99 clusters".into(),
                })?;
            if spec.gateways.max(1) > 50 || spec.workers > 99 {
                return Err(TestbedError::Command {
                    command: "topology".into(),
                    stderr: "at most 50 gateways and 99 workers per cluster".into(),
                });
            }
            let wan_ip = Self::wan_addr(idx);
            let br = format!("br{idx}");
            wan.ip(&["link", "add", &br, "type", "bridge"])?;
            wan.ip(&["link", "set", &br, "up"])?;
            wan.ip(&["addr", "add", &format!("{wan_ip}/24"), "dev", &br])?;
            let roles = (0..spec.gateways.max(1))
                .map(|k| (Role::Gateway, k, format!("gw{k}"), 2 + k as u8, 1 + k as u8))
                .chain((1..=spec.workers).map(|k| {
                    (
                        Role::Worker,
                        k,
                        format!("w{k}"),
                        100 + k as u8,
                        100 + k as u8,
                    )
                }));
            let mut nodes = Vec::new();
            for (role, _, short, host, subnet) in roles {
                let name = format!("{}-{short}", spec.name);
                let ns = bed.namespace(&name)?;
                let underlay = Ipv4Addr::new(172, 31, idx, host);
                bed.veth(&wan, &format!("c{idx}{short}"), &ns, "eth0")?;
                wan.ip(&["link", "set", &format!("c{idx}{short}"), "master", &br])?;
                ns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", "eth0"])?;
                ns.ip(&["route", "add", "default", "via", &wan_ip.to_string()])?;
                ns.sysctl("net.ipv4.ip_forward", "1")?;
                // The node's pod, as a CNI would wire it.
                let pod_name = format!("{name}-pod");
                let pod_ns = bed.namespace(&pod_name)?;
                bed.veth(&ns, "pod0", &pod_ns, "eth0")?;
                let node_side = Ipv4Addr::new(10, idx, subnet, 1);
                let address = Ipv4Addr::new(10, idx, subnet, 10);
                ns.ip(&["addr", "add", &format!("{node_side}/24"), "dev", "pod0"])?;
                pod_ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
                pod_ns.ip(&["route", "add", "default", "via", &node_side.to_string()])?;
                nodes.push(Node {
                    name,
                    role,
                    namespace: ns.name.clone(),
                    underlay,
                    pod_subnet: format!("10.{idx}.{subnet}.0/24"),
                    pod_side: node_side,
                    pod: Pod {
                        name: pod_name,
                        namespace: pod_ns.name.clone(),
                        address,
                    },
                });
            }
            // Host-gateway "CNI": every node routes the others' pod subnets over the segment.
            for n in &nodes {
                for m in nodes.iter().filter(|m| m.name != n.name) {
                    n.ns().ip(&[
                        "route",
                        "add",
                        &m.pod_subnet,
                        "via",
                        &m.underlay.to_string(),
                    ])?;
                }
            }
            let public = if spec.nat {
                let public = Ipv4Addr::new(100, 64, idx, 1);
                wan.ip(&["addr", "add", &format!("{public}/32"), "dev", "lo"])?;
                nat_rules.push_str(&format!(
                    "add rule ip clusterlink_lab nat_post ip saddr 172.31.{idx}.0/24 oifname != \"{br}\" snat to {public}\n\
                     add rule ip clusterlink_lab nat_forward iifname != \"{br}\" oifname \"{br}\" ct state new drop\n"
                ));
                public
            } else {
                nodes[0].underlay
            };
            clusters.push(ClusterNet {
                name: spec.name.clone(),
                index: idx,
                nat: spec.nat,
                public,
                nodes,
            });
        }
        if !nat_rules.is_empty() {
            let script = format!(
                "add table ip clusterlink_lab\n\
                 add chain ip clusterlink_lab nat_post {{ type nat hook postrouting priority 100; }}\n\
                 add chain ip clusterlink_lab nat_forward {{ type filter hook forward priority 0; }}\n{nat_rules}"
            );
            nft(&wan, &script)?;
        }
        Ok(Topology {
            wan,
            broker,
            clusters,
        })
    }
}

/// Loads an nft script inside a namespace.
pub fn nft(ns: &Netns, script: &str) -> Result<(), TestbedError> {
    use std::io::Write;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| TestbedError::Spawn {
            command: "nft -f -".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| TestbedError::Spawn {
            command: "nft -f -".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: format!("nft -f - <<{script}"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}
