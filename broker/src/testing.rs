//! Helpers for tests and benchmarks that need a real etcd: Debian's etcd-server, started on
//! loopback on free ports in a temporary directory, and killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

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
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A throwaway single-member etcd on loopback.
pub struct EtcdServer {
    child: Child,
    dir: tempfile::TempDir,
    pub client_port: u16,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd without fsync (tests: speed over durability) and waits until it answers.
    pub fn start() -> Result<Self, EtcdHarnessError> {
        Self::start_with(false, free_port)
    }

    /// Starts etcd with fsync on every commit, as in production (benchmarks).
    pub fn start_durable() -> Result<Self, EtcdHarnessError> {
        Self::start_with(true, free_port)
    }

    /// The ports are free when chosen but not held: another test's etcd, or any outgoing
    /// connection's local port, can take one before etcd binds it. etcd then exits with
    /// "address already in use", and it is started again on other ports.
    fn start_with(
        durable: bool,
        mut port: impl FnMut() -> std::io::Result<u16>,
    ) -> Result<Self, EtcdHarnessError> {
        const ATTEMPTS: usize = 5;
        let mut attempt = 1;
        loop {
            match Self::start_once(durable, port()?, port()?) {
                Err(EtcdHarnessError::NotReady { log, .. })
                    if attempt < ATTEMPTS && log.contains("address already in use") =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(
        durable: bool,
        client_port: u16,
        peer_port: u16,
    ) -> Result<Self, EtcdHarnessError> {
        let binary = std::env::var("CLUSTERLINK_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let dir = tempfile::Builder::new()
            .prefix("clusterlink-etcd-")
            .tempdir()?;
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(&binary);
        if !durable {
            cmd.arg("--unsafe-no-fsync");
        }
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
        let mut server = EtcdServer {
            child,
            dir,
            client_port,
        };
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), EtcdHarnessError> {
        let deadline = Instant::now() + timeout;
        let endpoint = format!("127.0.0.1:{}", self.client_port);
        loop {
            // Ready means the HTTP health endpoint says so, not just that the port is open.
            if let Ok(out) = health(&endpoint)
                && out.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() >= deadline {
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

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_taken_before_etcd_binds_it_is_tried_again_elsewhere() {
        // The first client port handed out is held, as if another process took it after it
        // was chosen; the next ones are free.
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap().port();
        let mut handed = Vec::new();
        let etcd = EtcdServer::start_with(false, || {
            let port = if handed.is_empty() {
                taken
            } else {
                free_port()?
            };
            handed.push(port);
            Ok(port)
        })
        .expect("etcd starts on the second ports");
        assert_eq!(
            handed.len(),
            4,
            "two ports per attempt, two attempts: {handed:?}"
        );
        assert_ne!(etcd.client_port, taken);
        assert!(health(&format!("127.0.0.1:{}", etcd.client_port)).is_ok());
    }
}
