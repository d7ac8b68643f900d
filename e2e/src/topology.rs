//! Multi-cluster topologies.
//!
//! ```text
//!                         wan  (routes the underlay; NAT per cluster, optional)
//!          c1 172.31.1.1 /   \ c2 172.31.2.1          public address of a NATed cluster:
//!                       /     \                        100.64.<i>.1 (on wan's loopback)
//!    <a>-gw0 172.31.1.2/24   <b>-gw0 172.31.2.2/24  ...  (gateway K: 172.31.<i>.<2+K>)
//! ```
//!
//! A cluster behind NAT has its underlay source-NATed to 100.64.<i>.1 when it leaves for
//! another cluster, and connections into it that it did not start are dropped, as at a
//! real NAT. The broker, when a test wants one, runs in the wan namespace itself.

use std::net::Ipv4Addr;

use serde::Serialize;

use crate::netns::{Netns, Testbed, TestbedError};

#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub name: String,
    pub gateways: usize,
    pub nat: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct GatewayNode {
    pub namespace: String,
    pub node: String,
    pub underlay: Ipv4Addr,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterNet {
    pub name: String,
    pub index: u8,
    pub nat: bool,
    /// The address the other clusters see this cluster's gateways come from.
    pub public: Ipv4Addr,
    pub gateways: Vec<GatewayNode>,
}

pub struct Topology {
    pub wan: Netns,
    /// A namespace of its own behind the wan, at [`Topology::BROKER_ADDR`], so that what the
    /// broker sees of a NATed cluster is its public address.
    pub broker: Netns,
    pub clusters: Vec<ClusterNet>,
}

impl ClusterNet {
    pub fn gateway_ns(&self, k: usize) -> Netns {
        Netns {
            name: self.gateways[k].namespace.clone(),
        }
    }
}

impl Topology {
    pub const BROKER_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);

    /// Wan address on cluster `i`'s link.
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
            let idx = u8::try_from(i + 1).map_err(|_| TestbedError::Command {
                command: "topology".into(),
                stderr: "at most 250 clusters".into(),
            })?;
            let link = format!("c{idx}");
            let wan_ip = Self::wan_addr(idx);
            let mut gateways = Vec::new();
            for k in 0..spec.gateways.max(1) {
                let node = format!("{}-gw{k}", spec.name);
                let ns = bed.namespace(&node)?;
                let underlay = Ipv4Addr::new(172, 31, idx, 2 + k as u8);
                if k == 0 {
                    bed.veth(&wan, &link, &ns, "eth0")?;
                    wan.ip(&["addr", "add", &format!("{wan_ip}/24"), "dev", &link])?;
                } else {
                    // Further gateway nodes share the cluster's segment through a bridge in wan.
                    let port = format!("c{idx}g{k}");
                    bed.veth(&wan, &port, &ns, "eth0")?;
                    ensure_bridge(&wan, idx, &link)?;
                    wan.ip(&["link", "set", &port, "master", &format!("br{idx}")])?;
                }
                ns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", "eth0"])?;
                ns.ip(&["route", "add", "default", "via", &wan_ip.to_string()])?;
                gateways.push(GatewayNode {
                    namespace: ns.name.clone(),
                    node,
                    underlay,
                });
            }
            let public = if spec.nat {
                let public = Ipv4Addr::new(100, 64, idx, 1);
                wan.ip(&["addr", "add", &format!("{public}/32"), "dev", "lo"])?;
                let iface = if spec.gateways > 1 {
                    format!("br{idx}")
                } else {
                    link.clone()
                };
                nat_rules.push_str(&format!(
                    "add rule ip clusterlink_lab nat_post ip saddr 172.31.{idx}.0/24 oifname != \"{iface}\" snat to {public}\n\
                     add rule ip clusterlink_lab nat_forward oifname \"{iface}\" ct state new drop\n"
                ));
                public
            } else {
                gateways[0].underlay
            };
            clusters.push(ClusterNet {
                name: spec.name.clone(),
                index: idx,
                nat: spec.nat,
                public,
                gateways,
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

fn ensure_bridge(wan: &Netns, idx: u8, first_link: &str) -> Result<(), TestbedError> {
    let br = format!("br{idx}");
    if wan.ip(&["link", "show", &br]).is_ok() {
        return Ok(());
    }
    // Move the wan address from the first gateway's link to a bridge holding both.
    let wan_ip = Topology::wan_addr(idx);
    wan.ip(&["link", "add", &br, "type", "bridge"])?;
    wan.ip(&["link", "set", &br, "up"])?;
    wan.ip(&["addr", "del", &format!("{wan_ip}/24"), "dev", first_link])?;
    wan.ip(&["link", "set", first_link, "master", &br])?;
    wan.ip(&["addr", "add", &format!("{wan_ip}/24"), "dev", &br])?;
    Ok(())
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
