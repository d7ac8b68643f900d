//! A throwaway etcd for tests and benchmarks: Debian's etcd-server, single member, on
//! loopback ports leased for its lifetime, in a temporary directory; killed when dropped.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::ports::PortLease;
use crate::process::ProcessGuard;

#[derive(Debug, Error)]
pub enum EtcdHarnessError {
    #[error(
        "cannot run {binary}: {source} (install Debian's etcd-server, or set CLUSTERLINK_ETCD_BIN)"
    )]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd did not become ready on {endpoint} within {timeout:?}; its log:\n{log}")]
    NotReady {
        endpoint: String,
        timeout: Duration,
        log: String,
    },
    #[error("cannot prepare etcd's directory or ports: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot make etcd's certificates: {0}")]
    Certificates(#[from] rcgen::Error),
}

/// PEM files of a TLS etcd: its CA, and a client certificate and key it trusts.
#[derive(Clone, Debug)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA etcd does not trust (for the wrong-CA test).
    pub other_ca: PathBuf,
}

/// A throwaway single-member etcd on loopback.
pub struct EtcdServer {
    // Field order is drop order: the process first, then its ports and directory.
    child: ProcessGuard,
    _ports: [PortLease; 3],
    dir: tempfile::TempDir,
    pub client_port: u16,
    /// Where `/health` answers over plain HTTP.
    health_port: u16,
    /// Set for a TLS etcd.
    pub tls: Option<EtcdTlsFiles>,
}

impl EtcdServer {
    /// Starts etcd without fsync (tests: speed over durability) and waits until it answers.
    pub fn start() -> Result<Self, EtcdHarnessError> {
        Self::start_with(false, false)
    }

    /// Starts etcd with fsync on every commit, as in production (benchmarks).
    pub fn start_durable() -> Result<Self, EtcdHarnessError> {
        Self::start_with(true, false)
    }

    /// Starts etcd serving clients over TLS only, and only those with a certificate of its
    /// CA (`--client-cert-auth`), as a production etcd runs.
    pub fn start_tls() -> Result<Self, EtcdHarnessError> {
        Self::start_with(false, true)
    }

    fn start_with(durable: bool, tls: bool) -> Result<Self, EtcdHarnessError> {
        let binary = std::env::var("CLUSTERLINK_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = PortLease::new()?;
        let peer = PortLease::new()?;
        let metrics = PortLease::new()?;
        let client_port = client.port();
        let dir = tempfile::Builder::new()
            .prefix("clusterlink-etcd-")
            .tempdir()?;
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let scheme = if tls { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{}", peer.port());
        let mut cmd = Command::new(&binary);
        if !durable {
            cmd.arg("--unsafe-no-fsync");
        }
        cmd.arg(format!(
            "--listen-metrics-urls=http://127.0.0.1:{}",
            metrics.port()
        ));
        let tls_files = if tls {
            let files = make_certificates(dir.path())?;
            let server = dir.path().join("server.pem");
            let server_key = dir.path().join("server-key.pem");
            cmd.arg(format!("--cert-file={}", server.display()))
                .arg(format!("--key-file={}", server_key.display()))
                .arg(format!("--trusted-ca-file={}", files.ca.display()))
                .arg("--client-cert-auth");
            Some(files)
        } else {
            None
        };
        let child = cmd
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| EtcdHarnessError::Spawn { binary, source })?;
        let health_port = metrics.port();
        let mut server = EtcdServer {
            child: ProcessGuard::new(child),
            _ports: [client, peer, metrics],
            dir,
            client_port,
            health_port,
            tls: tls_files,
        };
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    /// The store URL a broker takes (`--store`): `etcd://` or, for a TLS etcd,
    /// `etcds://…?ca=…&cert=…&key=…` with the client certificate it trusts.
    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("etcd://127.0.0.1:{}", self.client_port),
            Some(t) => format!(
                "etcds://127.0.0.1:{}?ca={}&cert={}&key={}",
                self.client_port,
                t.ca.display(),
                t.client_cert.display(),
                t.client_key.display()
            ),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), EtcdHarnessError> {
        let deadline = Instant::now() + timeout;
        let endpoint = format!("127.0.0.1:{}", self.health_port);
        loop {
            // Ready means the HTTP health endpoint says so, not just that the port is open.
            if health(&endpoint).is_ok_and(|out| out.contains("\"health\":\"true\"")) {
                return Ok(());
            }
            if self.child.try_wait().is_some() || Instant::now() >= deadline {
                return Err(EtcdHarnessError::NotReady {
                    endpoint,
                    timeout,
                    log: std::fs::read_to_string(self.log_path()).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A CA, etcd's server certificate for 127.0.0.1 and a client certificate, as PEM files in
/// `dir`; and a second CA etcd does not know.
fn make_certificates(dir: &std::path::Path) -> Result<EtcdTlsFiles, EtcdHarnessError> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let write = |name: &str, pem: String| -> Result<PathBuf, EtcdHarnessError> {
        let p = dir.join(name);
        std::fs::write(&p, pem)?;
        Ok(p)
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = write("ca.pem", ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate()?;
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&server_key, &issuer)?;
    write("server.pem", server.pem())?;
    write("server-key.pem", server_key.serialize_pem())?;
    let client_key = KeyPair::generate()?;
    let client =
        CertificateParams::new(vec!["clusterlink".to_owned()])?.signed_by(&client_key, &issuer)?;
    let other_key = KeyPair::generate()?;
    let mut other_params = CertificateParams::new(Vec::<String>::new())?;
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = other_params.self_signed(&other_key)?;
    Ok(EtcdTlsFiles {
        ca,
        client_cert: write("client.pem", client.pem())?,
        client_key: write("client-key.pem", client_key.serialize_pem())?,
        other_ca: write("other-ca.pem", other.pem())?,
    })
}

/// GET /health over a plain TCP socket (no HTTP client dependency for one request).
fn health(endpoint: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(endpoint)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    write!(s, "GET /health HTTP/1.0\r\nHost: {endpoint}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcds_started_at_once_get_ports_of_their_own_and_answer() {
        let servers: Vec<EtcdServer> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3).map(|_| s.spawn(EtcdServer::start)).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().expect("etcd starts"))
                .collect()
        });
        let ports: std::collections::BTreeSet<u16> =
            servers.iter().map(|e| e.client_port).collect();
        assert_eq!(ports.len(), 3);
        for e in &servers {
            assert!(health(&format!("127.0.0.1:{}", e.client_port)).is_ok());
        }
    }
}
