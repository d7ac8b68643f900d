//! A whole multi-cluster setup on one host, from real `clusterlink` processes in the
//! testbed's namespaces: the broker in its own namespace, each cluster joined from its
//! gateway node, and a gateway on every gateway node. Used by `clusterlink lab` and by the
//! end-to-end tests.
//!
//! Addresses: cluster i (from 1) has pods 10.i.0.0/16 and services 10.(100+i).0.0/16; its
//! gateway k has tunnel address 10.i.255.(k+1).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::netns::{Netns, Testbed, TestbedError, run, wait_until};
use crate::topology::{ClusterSpec, Topology};

pub const BROKER_PORT: u16 = 7443;
pub const WG_PORT: u16 = 51820;
pub const TUN: &str = "cl0";
/// Namespace prefix of `clusterlink lab` (one lab per host at a time).
pub const LAB_PREFIX: &str = "cllab-";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabGateway {
    pub node: String,
    pub namespace: String,
    pub underlay: Ipv4Addr,
    pub tunnel_ip: Ipv4Addr,
    pub pid: u32,
    pub key_file: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabCluster {
    pub name: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    pub nat: bool,
    pub public_address: Ipv4Addr,
    pub credentials: PathBuf,
    pub gateways: Vec<LabGateway>,
}

/// Everything `lab status` shows and `lab down` removes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub prefix: String,
    pub dir: PathBuf,
    pub broker_namespace: String,
    pub broker_address: String,
    pub broker_pid: u32,
    pub admin_credentials: PathBuf,
    pub wan_namespace: String,
    pub namespaces: Vec<String>,
    pub clusters: Vec<LabCluster>,
}

pub struct Lab {
    pub bed: Testbed,
    pub topology: Topology,
    pub state: LabState,
    bin: PathBuf,
}

fn ns(name: &str) -> Netns {
    Netns {
        name: name.to_owned(),
    }
}

impl Lab {
    /// Builds the topology and starts broker and gateways. Does not wait for tunnels.
    pub fn up(
        bin: &Path,
        specs: &[ClusterSpec],
        progress: &dyn Fn(&str),
    ) -> Result<Self, TestbedError> {
        Self::up_in(Testbed::new()?, bin, specs, progress)
    }

    /// Like [`Lab::up`], in a given testbed (`clusterlink lab` uses one with the
    /// [`LAB_PREFIX`], which outlives the command).
    pub fn up_in(
        bed: Testbed,
        bin: &Path,
        specs: &[ClusterSpec],
        progress: &dyn Fn(&str),
    ) -> Result<Self, TestbedError> {
        progress("building namespaces");
        let topology = Topology::build(&bed, specs)?;
        let dir = bed.log_dir.clone();
        let broker_address = format!("{}:{BROKER_PORT}", Topology::BROKER_ADDR);
        progress("deploying the broker (embedded store)");
        run(Command::new(bin)
            .args(["deploy-broker", "--data-dir"])
            .arg(dir.join("broker"))
            .args(["--listen", &broker_address]))?;
        let data_dir = dir.join("broker").display().to_string();
        let broker_pid = bed.spawn(
            &topology.broker,
            "broker",
            &bin.display().to_string(),
            &["broker", "run", "--data-dir", &data_dir],
        )?;
        let log = bed.log_path("broker");
        wait_until("the broker to serve", Duration::from_secs(20), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("broker serving"))
        })?;
        let info = dir.join("broker").join("broker-info.yaml");
        let mut clusters = Vec::new();
        for c in &topology.clusters {
            progress(&format!("joining cluster {}", c.name));
            let pod_cidr = format!("10.{}.0.0/16", c.index);
            let service_cidr = format!("10.{}.0.0/16", 100 + u16::from(c.index));
            let credentials = dir.join(format!("{}.yaml", c.name));
            c.gateway_ns(0).exec(
                &bin.display().to_string(),
                &[
                    "join",
                    &info.display().to_string(),
                    "--cluster-id",
                    &c.name,
                    "--pod-cidr",
                    &pod_cidr,
                    "--service-cidr",
                    &service_cidr,
                    "-o",
                    &credentials.display().to_string(),
                ],
            )?;
            let mut gateways = Vec::new();
            for (k, g) in c.gateways.iter().enumerate() {
                let tunnel_ip = Ipv4Addr::new(10, c.index, 255, k as u8 + 1);
                let key_file = dir.join(format!("{}.key", g.node));
                let pid = bed.spawn(
                    &ns(&g.namespace),
                    &g.node,
                    &bin.display().to_string(),
                    &[
                        "gateway",
                        "run",
                        "--credentials",
                        &credentials.display().to_string(),
                        "--node",
                        &g.node,
                        "--private-addr",
                        &g.underlay.to_string(),
                        "--tunnel-ip",
                        &tunnel_ip.to_string(),
                        "--key-file",
                        &key_file.display().to_string(),
                        "--tun-name",
                        TUN,
                    ],
                )?;
                gateways.push(LabGateway {
                    node: g.node.clone(),
                    namespace: g.namespace.clone(),
                    underlay: g.underlay,
                    tunnel_ip,
                    pid,
                    key_file,
                });
            }
            clusters.push(LabCluster {
                name: c.name.clone(),
                pod_cidr,
                service_cidr,
                nat: c.nat,
                public_address: c.public,
                credentials,
                gateways,
            });
        }
        let state = LabState {
            prefix: bed.prefix.clone(),
            dir: dir.clone(),
            broker_namespace: topology.broker.name.clone(),
            broker_address,
            broker_pid,
            admin_credentials: dir.join("broker").join("admin.yaml"),
            wan_namespace: topology.wan.name.clone(),
            namespaces: bed.namespaces().into_iter().map(|n| n.name).collect(),
            clusters,
        };
        Ok(Lab {
            bed,
            topology,
            state,
            bin: bin.to_owned(),
        })
    }

    /// Runs `clusterlink ARGS…` inside the broker's namespace (where the broker is reachable).
    pub fn clusterlink(&self, args: &[&str]) -> Result<String, TestbedError> {
        let out = ns(&self.state.broker_namespace).exec(&self.bin.display().to_string(), args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `show connections -o json` as the admin.
    pub fn connections(&self) -> Result<Vec<serde_json::Value>, TestbedError> {
        let admin = self.state.admin_credentials.display().to_string();
        let out =
            self.clusterlink(&["show", "connections", "-o", "json", "--credentials", &admin])?;
        serde_json::from_str(&out).map_err(|e| TestbedError::Command {
            command: "show connections".into(),
            stderr: e.to_string(),
        })
    }

    /// Waits until every gateway reports a connected tunnel to every other cluster's gateways.
    pub fn wait_connected(&self, timeout: Duration) -> Result<(), TestbedError> {
        let expected: usize = self
            .state
            .clusters
            .iter()
            .map(|c| {
                c.gateways.len()
                    * self
                        .state
                        .clusters
                        .iter()
                        .filter(|o| o.name != c.name)
                        .map(|o| o.gateways.len())
                        .sum::<usize>()
            })
            .sum();
        wait_until("every tunnel to connect", timeout, || {
            self.connections()
                .is_ok_and(|cs| cs.iter().filter(|c| c["state"] == "connected").count() >= expected)
        })
    }

    /// Stops the broker (the data plane must not notice).
    pub fn stop_broker(&self) {
        self.bed.kill(self.state.broker_pid);
    }

    /// Stops a gateway and starts it again, with a fresh WireGuard key if `new_key`.
    pub fn restart_gateway(
        &mut self,
        cluster: usize,
        k: usize,
        new_key: bool,
    ) -> Result<(), TestbedError> {
        let c = self.state.clusters[cluster].clone();
        let g = c.gateways[k].clone();
        self.bed.kill(g.pid);
        if new_key {
            let _ = std::fs::remove_file(&g.key_file);
        }
        let pid = self.bed.spawn(
            &ns(&g.namespace),
            &format!("{}-restarted", g.node),
            &self.bin.display().to_string(),
            &[
                "gateway",
                "run",
                "--credentials",
                &c.credentials.display().to_string(),
                "--node",
                &g.node,
                "--private-addr",
                &g.underlay.to_string(),
                "--tunnel-ip",
                &g.tunnel_ip.to_string(),
                "--key-file",
                &g.key_file.display().to_string(),
                "--tun-name",
                TUN,
            ],
        )?;
        self.state.clusters[cluster].gateways[k].pid = pid;
        Ok(())
    }

    pub fn gateway_ns(&self, cluster: usize, k: usize) -> Netns {
        ns(&self.state.clusters[cluster].gateways[k].namespace)
    }
}
