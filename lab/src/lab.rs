//! A whole multi-cluster setup on one host, from real `clusterlink` processes in the
//! testbed's namespaces: the broker in its own namespace, each cluster joined from its
//! gateway node, a gateway on every gateway node and a route agent on every node. Used by
//! `clusterlink lab` and by the end-to-end tests.
//!
//! Addresses: cluster i (from 1) has pods 10.i.0.0/16 and services 10.(100+i).0.0/16; its
//! gateway k has tunnel address 10.i.255.(k+1); nodes and pods as in [`crate::topology`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::invoke::{
    BrokerRun, DeployBroker, DnsRun, EchoServer, ExportService, GatewayRun, Invocation, Join,
    RouteAgentRun, ShowJson, ShowWhat,
};
use crate::netns::{Netns, Testbed, TestbedError, run, wait_until};
use crate::topology::{ClusterSpec, Node, Role, Topology};

pub const BROKER_PORT: u16 = 7443;
pub const WG_PORT: u16 = 51820;
pub const TUN: &str = "cl0";
/// The zone the lab's DNS plugins serve.
pub const ZONE: &str = "clusterset.local";
/// The route agents' table (their defaults).
pub const ROUTE_TABLE: &str = "211";
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
    /// Every node (gateways first), each with its pod and its route agent.
    pub nodes: Vec<LabNode>,
    /// The cluster's DNS plugin (on its first gateway node, on the pods' side), which every
    /// pod of the cluster uses as its resolver.
    pub dns_address: Ipv4Addr,
    pub dns_pid: u32,
    /// The cluster's manifest directory (Service, EndpointSlice, ServiceExport), which its
    /// DNS plugin exports from.
    pub manifests: PathBuf,
    /// The demo echo server (TCP port 7) in the first worker's pod.
    pub echo_pid: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabNode {
    #[serde(flatten)]
    pub node: Node,
    pub agent_pid: u32,
}

/// One process of a lab as it is now.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabProcess {
    pub role: String,
    pub pid: u32,
    pub running: bool,
}

/// Is `pid` a live process of a clusterlink binary? A pid whose process exited (or became a
/// zombie), or was reused by something else, is not.
pub fn is_lab_process(pid: u32) -> bool {
    let proc = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(proc.join("stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X")) {
        return false;
    }
    std::fs::read(proc.join("cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| String::from_utf8_lossy(argv0).contains("clusterlink"))
    })
}

impl LabState {
    /// Every process the lab started, by role, and whether it still runs.
    pub fn processes(&self) -> Vec<LabProcess> {
        let p = |role: String, pid: u32| LabProcess {
            running: is_lab_process(pid),
            role,
            pid,
        };
        let mut all = vec![p("broker".into(), self.broker_pid)];
        for c in &self.clusters {
            for g in &c.gateways {
                all.push(p(format!("{} gateway {}", c.name, g.node), g.pid));
            }
            for n in &c.nodes {
                all.push(p(
                    format!("{} route agent {}", c.name, n.node.name),
                    n.agent_pid,
                ));
            }
            all.push(p(format!("{} DNS plugin", c.name), c.dns_pid));
            all.push(p(format!("{} echo server", c.name), c.echo_pid));
        }
        all
    }

    /// Every process the lab started.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.broker_pid)
            .chain(self.clusters.iter().flat_map(|c| {
                c.gateways
                    .iter()
                    .map(|g| g.pid)
                    .chain(c.nodes.iter().map(|n| n.agent_pid))
                    .chain([c.dns_pid, c.echo_pid])
            }))
            .collect()
    }
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
        let broker_listen = SocketAddr::new(Topology::BROKER_ADDR.into(), BROKER_PORT);
        let broker_address = broker_listen.to_string();
        progress("deploying the broker (embedded store)");
        let data_dir = dir.join("broker");
        run(Command::new(bin).args(
            DeployBroker {
                data_dir: data_dir.clone(),
                listen: broker_listen,
            }
            .args(),
        ))?;
        let broker_pid = bed.spawn(
            &topology.broker,
            "broker",
            &bin.display().to_string(),
            &BrokerRun { data_dir }.args(),
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
            c.nodes[0].ns().exec(
                &bin.display().to_string(),
                &Join {
                    broker_info: info.clone(),
                    cluster_id: c.name.clone(),
                    pod_cidr: pod_cidr.clone(),
                    service_cidr: service_cidr.clone(),
                    output: credentials.clone(),
                }
                .args(),
            )?;
            let mut gateways = Vec::new();
            for (k, g) in c.gateways().enumerate() {
                let tunnel_ip = Ipv4Addr::new(10, c.index, 255, k as u8 + 1);
                let key_file = dir.join(format!("{}.key", g.name));
                let pid = bed.spawn(
                    &ns(&g.namespace),
                    &g.name,
                    &bin.display().to_string(),
                    &GatewayRun {
                        credentials: credentials.clone(),
                        node: g.name.clone(),
                        private_addr: g.underlay.into(),
                        tunnel_ip: tunnel_ip.into(),
                        key_file: key_file.clone(),
                        tun_name: TUN.into(),
                    }
                    .args(),
                )?;
                gateways.push(LabGateway {
                    node: g.name.clone(),
                    namespace: g.namespace.clone(),
                    underlay: g.underlay,
                    tunnel_ip,
                    pid,
                    key_file,
                });
            }
            let mut nodes = Vec::new();
            for n in &c.nodes {
                let agent_pid = spawn_agent(
                    &bed,
                    bin,
                    &credentials,
                    n,
                    &format!("{}-agent", n.name),
                    false,
                )?;
                nodes.push(LabNode {
                    node: n.clone(),
                    agent_pid,
                });
            }
            // The demo: an echo server in the first worker's pod, its Service (headless) and
            // EndpointSlice as manifests, exported with the CLI.
            let manifests = dir.join(format!("{}-manifests", c.name));
            std::fs::create_dir_all(&manifests).map_err(|source| TestbedError::Spawn {
                command: format!("mkdir {}", manifests.display()),
                source,
            })?;
            let echo_node = c.workers().next().unwrap_or(&c.nodes[0]);
            std::fs::write(
                manifests.join("echo.yaml"),
                echo_manifests(echo_node.pod.address),
            )
            .map_err(|source| TestbedError::Spawn {
                command: "write echo.yaml".into(),
                source,
            })?;
            let echo_pid = bed.spawn(
                &echo_node.pod.ns(),
                &format!("{}-echo", c.name),
                &bin.display().to_string(),
                &EchoServer {
                    listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 7),
                }
                .args(),
            )?;
            run(Command::new(bin).args(
                ExportService {
                    name: "echo".into(),
                    namespace: "demo".into(),
                    manifests: manifests.clone(),
                }
                .args(),
            ))?;
            let dns_address = c.nodes[0].pod_side;
            let dns_pid = bed.spawn(
                &c.nodes[0].ns(),
                &format!("{}-dns", c.name),
                &bin.display().to_string(),
                &DnsRun {
                    credentials: credentials.clone(),
                    listen: SocketAddr::new(dns_address.into(), 53),
                    zone: ZONE.into(),
                    manifests: manifests.clone(),
                }
                .args(),
            )?;
            for n in &c.nodes {
                n.pod.ns().set_resolver(dns_address.into(), ZONE)?;
            }
            clusters.push(LabCluster {
                name: c.name.clone(),
                pod_cidr,
                service_cidr,
                nat: c.nat,
                public_address: c.public,
                credentials,
                gateways,
                nodes,
                dns_address,
                dns_pid,
                manifests,
                echo_pid,
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
    pub fn clusterlink<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
    ) -> Result<String, TestbedError> {
        let out = ns(&self.state.broker_namespace).exec(&self.bin.display().to_string(), args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `show connections -o json` as the admin.
    pub fn connections(&self) -> Result<Vec<serde_json::Value>, TestbedError> {
        let out = self.clusterlink(
            &ShowJson {
                what: ShowWhat::Connections,
                credentials: self.state.admin_credentials.clone(),
            }
            .args(),
        )?;
        serde_json::from_str(&out).map_err(|e| TestbedError::Command {
            command: "show connections".into(),
            stderr: e.to_string(),
        })
    }

    /// Waits until every gateway (passive ones too: their sessions are kept warm) reports a
    /// connected tunnel to every other cluster's gateways.
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

    /// Waits until every node's route agent has a route to every other cluster's pod and
    /// service CIDRs.
    pub fn wait_routes(&self, timeout: Duration) -> Result<(), TestbedError> {
        let remote = 2 * (self.state.clusters.len() - 1);
        let missing = || {
            self.state
                .clusters
                .iter()
                .flat_map(|c| &c.nodes)
                .find(|n| !agent_routes(&n.node.ns()).is_ok_and(|r| r.len() == remote))
        };
        wait_until("every node's routes to the other clusters", timeout, || {
            missing().is_none()
        })
        .map_err(|e| match missing() {
            Some(n) => {
                let log = self.bed.log_path(&format!("{}-agent", n.node.name));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                TestbedError::Command {
                    command: format!("route agent on {}", n.node.name),
                    stderr: format!(
                        "{e}; its log ends:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ),
                }
            }
            None => e,
        })
    }

    /// Waits until the demo echo service resolves, from the first worker pod of every
    /// cluster, to every cluster's echo server.
    pub fn wait_services(&self, timeout: Duration) -> Result<(), TestbedError> {
        let n = self.state.clusters.len();
        wait_until("echo.demo.svc to resolve everywhere", timeout, || {
            (0..n).all(|c| resolve(&self.worker(c).pod.ns(), ECHO_NAME).len() == n)
        })
    }

    /// `show gateways -o json` as the admin.
    pub fn gateways(&self) -> Result<Vec<serde_json::Value>, TestbedError> {
        let out = self.clusterlink(
            &ShowJson {
                what: ShowWhat::Gateways,
                credentials: self.state.admin_credentials.clone(),
            }
            .args(),
        )?;
        serde_json::from_str(&out).map_err(|e| TestbedError::Command {
            command: "show gateways".into(),
            stderr: e.to_string(),
        })
    }

    /// The nodes of a cluster's gateways that the broker lists as active.
    pub fn active_gateways(&self, cluster: usize) -> Vec<String> {
        let name = &self.state.clusters[cluster].name;
        self.gateways()
            .unwrap_or_default()
            .iter()
            .filter(|g| g["cluster"] == name.as_str() && g["role"] == "active")
            .filter_map(|g| g["node"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until exactly one gateway of the cluster is active, and it is not `not`; returns
    /// its node.
    pub fn wait_one_active(
        &self,
        cluster: usize,
        not: Option<&str>,
        timeout: Duration,
    ) -> Result<String, TestbedError> {
        let mut found = None;
        wait_until("one active gateway", timeout, || {
            let active = self.active_gateways(cluster);
            found =
                (active.len() == 1 && Some(active[0].as_str()) != not).then(|| active[0].clone());
            found.is_some()
        })?;
        found.ok_or_else(|| TestbedError::Command {
            command: "show gateways".into(),
            stderr: "no active gateway".into(),
        })
    }

    /// Kills gateway `k` of a cluster (SIGKILL: no hand-over).
    pub fn kill_gateway(&self, cluster: usize, k: usize) {
        self.bed.kill(self.state.clusters[cluster].gateways[k].pid);
    }

    /// How gateway `k` of a cluster has exited, or `None` while it runs.
    pub fn gateway_exit(&self, cluster: usize, k: usize) -> Option<std::process::ExitStatus> {
        self.bed
            .exit_status(self.state.clusters[cluster].gateways[k].pid)
    }

    /// Stops gateway `k` of a cluster with SIGTERM and waits up to 10 s for it to exit: how it
    /// exited and how long it took.
    pub fn terminate_gateway(
        &self,
        cluster: usize,
        k: usize,
    ) -> Option<(std::process::ExitStatus, Duration)> {
        self.bed.terminate_within(
            self.state.clusters[cluster].gateways[k].pid,
            Duration::from_secs(10),
        )
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
            &GatewayRun {
                credentials: c.credentials.clone(),
                node: g.node.clone(),
                private_addr: g.underlay.into(),
                tunnel_ip: g.tunnel_ip.into(),
                key_file: g.key_file.clone(),
                tun_name: TUN.into(),
            }
            .args(),
        )?;
        self.state.clusters[cluster].gateways[k].pid = pid;
        Ok(())
    }

    /// The first worker node of a cluster.
    pub fn worker(&self, cluster: usize) -> &Node {
        let c = &self.state.clusters[cluster];
        &c.nodes
            .iter()
            .find(|n| n.node.role == Role::Worker)
            .unwrap_or(&c.nodes[0])
            .node
    }

    /// Stops a node's route agent (SIGTERM, so it may clean up) and waits up to 10 s for it to
    /// exit: how it exited and how long it took.
    pub fn stop_agent(
        &mut self,
        cluster: usize,
        node: usize,
    ) -> Option<(std::process::ExitStatus, Duration)> {
        let pid = self.state.clusters[cluster].nodes[node].agent_pid;
        self.bed.terminate_within(pid, Duration::from_secs(10))
    }

    /// Starts a node's route agent again.
    pub fn start_agent(
        &mut self,
        cluster: usize,
        node: usize,
        cleanup_on_exit: bool,
    ) -> Result<(), TestbedError> {
        let c = &self.state.clusters[cluster];
        let n = c.nodes[node].node.clone();
        let pid = spawn_agent(
            &self.bed,
            &self.bin,
            &c.credentials,
            &n,
            &format!("{}-agent-restarted", n.name),
            cleanup_on_exit,
        )?;
        self.state.clusters[cluster].nodes[node].agent_pid = pid;
        Ok(())
    }

    pub fn gateway_ns(&self, cluster: usize, k: usize) -> Netns {
        ns(&self.state.clusters[cluster].gateways[k].namespace)
    }
}

/// Starts a node's route agent, logging to `log`.
fn spawn_agent(
    bed: &Testbed,
    bin: &Path,
    credentials: &Path,
    node: &Node,
    log: &str,
    cleanup_on_exit: bool,
) -> Result<u32, TestbedError> {
    let args = RouteAgentRun {
        credentials: credentials.to_owned(),
        node: node.name.clone(),
        node_ip: node.underlay.into(),
        tunnel_device: TUN.into(),
        cleanup_on_exit,
    }
    .args();
    bed.spawn(&node.ns(), log, &bin.display().to_string(), &args)
}

/// The destinations of the route agent's routes on a node (`ip route show table 211`).
pub fn agent_routes(node: &Netns) -> Result<Vec<String>, TestbedError> {
    let out = node.ip(&["-4", "route", "show", "table", ROUTE_TABLE])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// `GET path` from inside `ns` to `127.0.0.1:port` (a component's health endpoints): the
/// status code and the body, or `None` when nothing answers.
pub fn http_get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = ns.exec("bash", &["-c", &script]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// The lab's demo service.
pub const ECHO_NAME: &str = "echo.demo.svc.clusterset.local";

/// `dig +short NAME A` in a namespace, through its resolver.
pub fn resolve(ns: &Netns, name: &str) -> Vec<String> {
    ns.exec("dig", &["+short", "+time=2", "+tries=1", name, "A"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.parse::<std::net::IpAddr>().is_ok())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Sends a line to a TCP echo server from inside a namespace; true if it comes back.
pub fn echo_roundtrip(ns: &Netns, to: std::net::SocketAddr) -> bool {
    ns.run_in(move || -> std::io::Result<bool> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let line = b"hello from clusterlink\n";
        s.write_all(line)?;
        let mut back = vec![0u8; line.len()];
        s.read_exact(&mut back)?;
        Ok(back == line)
    })
    .is_ok_and(|r| r.unwrap_or(false))
}

/// The demo echo service's Service (headless) and EndpointSlice.
fn echo_manifests(pod: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\nspec:\n  clusterIP: None\n  ports:\n  - name: tcp-echo\n    port: 7\n    protocol: TCP\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels:\n    kubernetes.io/service-name: echo\naddressType: IPv4\nendpoints:\n- addresses: [\"{pod}\"]\n  hostname: echo-0\n  conditions:\n    ready: true\nports:\n- name: tcp-echo\n  port: 7\n  protocol: TCP\n"
    )
}
