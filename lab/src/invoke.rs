//! The `clusterlink` invocations the lab launches, as types: a flag the CLI renames or drops
//! breaks the CLI's test that parses every one of these ([`examples`]), not a lab at run
//! time.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// A `clusterlink` command line (the arguments after the binary's name).
pub trait Invocation {
    fn args(&self) -> Vec<String>;
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|&a| a.to_owned()).collect()
}

/// Where each component serves /healthz and /readyz: on the loopback of its node's
/// namespace (each namespace has its own), a port per component (several share a node).
pub const BROKER_HEALTH_PORT: u16 = 9100;
pub const GATEWAY_HEALTH_PORT: u16 = 9101;
pub const AGENT_HEALTH_PORT: u16 = 9102;
pub const DNS_HEALTH_PORT: u16 = 9103;

fn health(port: u16) -> [String; 2] {
    ["--health-listen".into(), format!("127.0.0.1:{port}")]
}

/// `deploy-broker`: the broker's data directory, embedded store.
pub struct DeployBroker {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
}

impl Invocation for DeployBroker {
    fn args(&self) -> Vec<String> {
        let (dir, listen) = (path(&self.data_dir), self.listen.to_string());
        strings(&["deploy-broker", "--data-dir", &dir, "--listen", &listen])
    }
}

/// `broker run`.
pub struct BrokerRun {
    pub data_dir: PathBuf,
}

impl Invocation for BrokerRun {
    fn args(&self) -> Vec<String> {
        let mut args = strings(&["broker", "run", "--data-dir", &path(&self.data_dir)]);
        args.extend(health(BROKER_HEALTH_PORT));
        args
    }
}

/// `join`: a cluster's registration, its credentials written to `output`.
pub struct Join {
    pub broker_info: PathBuf,
    pub cluster_id: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    pub output: PathBuf,
}

impl Invocation for Join {
    fn args(&self) -> Vec<String> {
        let (info, out) = (path(&self.broker_info), path(&self.output));
        strings(&[
            "join",
            &info,
            "--cluster-id",
            &self.cluster_id,
            "--pod-cidr",
            &self.pod_cidr,
            "--service-cidr",
            &self.service_cidr,
            "-o",
            &out,
        ])
    }
}

/// `gateway run`.
pub struct GatewayRun {
    pub credentials: PathBuf,
    pub node: String,
    pub private_addr: IpAddr,
    pub tunnel_ip: IpAddr,
    pub key_file: PathBuf,
    pub tun_name: String,
}

impl Invocation for GatewayRun {
    fn args(&self) -> Vec<String> {
        let (creds, key) = (path(&self.credentials), path(&self.key_file));
        let (private, tunnel) = (self.private_addr.to_string(), self.tunnel_ip.to_string());
        let mut args = strings(&[
            "gateway",
            "run",
            "--credentials",
            &creds,
            "--node",
            &self.node,
            "--private-addr",
            &private,
            "--tunnel-ip",
            &tunnel,
            "--key-file",
            &key,
            "--tun-name",
            &self.tun_name,
        ]);
        args.extend(health(GATEWAY_HEALTH_PORT));
        args
    }
}

/// `route-agent run`.
pub struct RouteAgentRun {
    pub credentials: PathBuf,
    pub node: String,
    pub node_ip: IpAddr,
    pub tunnel_device: String,
    /// Remove everything it added when it stops.
    pub cleanup_on_exit: bool,
}

impl Invocation for RouteAgentRun {
    fn args(&self) -> Vec<String> {
        let (creds, ip) = (path(&self.credentials), self.node_ip.to_string());
        let mut args = strings(&[
            "route-agent",
            "run",
            "--credentials",
            &creds,
            "--node",
            &self.node,
            "--tunnel-device",
            &self.tunnel_device,
            "--node-ip",
            &ip,
        ]);
        if self.cleanup_on_exit {
            args.push("--cleanup-on-exit".into());
        }
        args.extend(health(AGENT_HEALTH_PORT));
        args
    }
}

/// `dns run` in standalone mode, over a manifest directory.
pub struct DnsRun {
    pub credentials: PathBuf,
    pub listen: SocketAddr,
    pub zone: String,
    pub manifests: PathBuf,
}

impl Invocation for DnsRun {
    fn args(&self) -> Vec<String> {
        let (creds, dir, listen) = (
            path(&self.credentials),
            path(&self.manifests),
            self.listen.to_string(),
        );
        let mut args = strings(&[
            "dns",
            "run",
            "--credentials",
            &creds,
            "--listen",
            &listen,
            "--zone",
            &self.zone,
            "--manifests",
            &dir,
        ]);
        args.extend(health(DNS_HEALTH_PORT));
        args
    }
}

/// `export service NAME -n NAMESPACE --manifests DIR`.
pub struct ExportService {
    pub name: String,
    pub namespace: String,
    pub manifests: PathBuf,
}

impl Invocation for ExportService {
    fn args(&self) -> Vec<String> {
        strings(&[
            "export",
            "service",
            &self.name,
            "-n",
            &self.namespace,
            "--manifests",
            &path(&self.manifests),
        ])
    }
}

/// `lab echo-server`: the demo TCP echo server.
pub struct EchoServer {
    pub listen: SocketAddr,
}

impl Invocation for EchoServer {
    fn args(&self) -> Vec<String> {
        strings(&["lab", "echo-server", "--listen", &self.listen.to_string()])
    }
}

/// What `show` lists, as JSON.
#[derive(Clone, Copy, Debug)]
pub enum ShowWhat {
    Connections,
    Gateways,
}

/// `show connections|gateways -o json`.
pub struct ShowJson {
    pub what: ShowWhat,
    pub credentials: PathBuf,
}

impl Invocation for ShowJson {
    fn args(&self) -> Vec<String> {
        let what = match self.what {
            ShowWhat::Connections => "connections",
            ShowWhat::Gateways => "gateways",
        };
        strings(&[
            "show",
            what,
            "-o",
            "json",
            "--credentials",
            &path(&self.credentials),
        ])
    }
}

/// One of each invocation, every option set: what the CLI's test parses.
pub fn examples() -> Vec<Vec<String>> {
    let p = PathBuf::from;
    let ip: IpAddr = [192, 0, 2, 1].into();
    let addr = SocketAddr::new(ip, 53);
    vec![
        DeployBroker {
            data_dir: p("/d"),
            listen: addr,
        }
        .args(),
        BrokerRun { data_dir: p("/d") }.args(),
        Join {
            broker_info: p("/i.yaml"),
            cluster_id: "east".into(),
            pod_cidr: "10.1.0.0/16".into(),
            service_cidr: "10.101.0.0/16".into(),
            output: p("/c.yaml"),
        }
        .args(),
        GatewayRun {
            credentials: p("/c.yaml"),
            node: "gw0".into(),
            private_addr: ip,
            tunnel_ip: ip,
            key_file: p("/k"),
            tun_name: "cl0".into(),
        }
        .args(),
        RouteAgentRun {
            credentials: p("/c.yaml"),
            node: "w1".into(),
            node_ip: ip,
            tunnel_device: "cl0".into(),
            cleanup_on_exit: true,
        }
        .args(),
        DnsRun {
            credentials: p("/c.yaml"),
            listen: addr,
            zone: "clusterset.local".into(),
            manifests: p("/m"),
        }
        .args(),
        ExportService {
            name: "echo".into(),
            namespace: "demo".into(),
            manifests: p("/m"),
        }
        .args(),
        EchoServer { listen: addr }.args(),
        ShowJson {
            what: ShowWhat::Connections,
            credentials: p("/c.yaml"),
        }
        .args(),
        ShowJson {
            what: ShowWhat::Gateways,
            credentials: p("/c.yaml"),
        }
        .args(),
    ]
}
