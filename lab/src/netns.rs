use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, warn};

#[derive(Debug, Error)]
pub enum TestbedError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source} (the testbed needs root and iproute2)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), TestbedError> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Timeout {
                what: what.to_owned(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output, TestbedError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// `ip ARGS…`
pub fn ip(args: &[&str]) -> Result<Output, TestbedError> {
    run(Command::new("ip").args(args))
}

/// Removes a namespace and its per-namespace files (`/etc/netns/NAME`, which `ip netns
/// exec` mounts over `/etc`).
pub fn remove_namespace(name: &str) -> Result<(), TestbedError> {
    let files = std::path::Path::new("/etc/netns").join(name);
    if !name.is_empty() && !name.contains('/') {
        let _ = std::fs::remove_dir_all(files);
    }
    ip(&["netns", "del", name]).map(|_| ())
}

/// A network namespace of the testbed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip -n NS ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Makes `nameserver` the resolver of programs run in this namespace through `ip netns
    /// exec` (`/etc/netns/NAME/resolv.conf`, removed with the namespace).
    pub fn set_resolver(
        &self,
        nameserver: std::net::IpAddr,
        search: &str,
    ) -> Result<(), TestbedError> {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("resolv.conf"),
                format!("nameserver {nameserver}\nsearch {search}\noptions ndots:5\n"),
            )
        };
        write().map_err(|source| TestbedError::Spawn {
            command: format!("write {}/resolv.conf", dir.display()),
            source,
        })
    }

    /// A command to run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args…` inside the namespace and waits for it.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: &str,
        args: &[S],
    ) -> Result<Output, TestbedError> {
        run(self.command(program).args(args))
    }

    /// Runs `f` on a thread that has entered this namespace (a namespace belongs to a
    /// thread, not a process), and returns its result.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TestbedError> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T, TestbedError> {
            let file = std::fs::File::open(&path).map_err(|source| TestbedError::Spawn {
                command: format!("open {path}"),
                source,
            })?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                TestbedError::Command {
                    command: format!("setns {path}"),
                    stderr: e.to_string(),
                }
            })?;
            Ok(f())
        })
        .join()
        .map_err(|_| TestbedError::Command {
            command: "thread in namespace".into(),
            stderr: "panicked".into(),
        })?
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TestbedError> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }
}

static RUNS: AtomicU32 = AtomicU32::new(0);
/// Prefix of every namespace any testbed makes; followed by the owning PID.
pub const PREFIX: &str = "cl-";

/// Owns namespaces and processes; removes them all when dropped.
pub struct Testbed {
    pub prefix: String,
    namespaces: Mutex<Vec<Netns>>,
    children: Mutex<Vec<Child>>,
    /// Where processes of this testbed write their logs.
    pub log_dir: PathBuf,
    keep_logs: Option<tempfile_dir::Dir>,
    /// Set in the environment of every process spawned.
    env: Vec<(String, String)>,
    /// Components run from this image rather than the host's binary.
    containers: Option<crate::container::ContainerRunner>,
    /// Containers started, removed on drop (killing their `podman run` leaves them running).
    container_names: Mutex<Vec<String>>,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Testbed {
    /// A new testbed. Also removes namespaces left behind by testbeds of processes that no
    /// longer exist (a run killed with SIGKILL cannot clean up after itself).
    pub fn new() -> Result<Self, TestbedError> {
        sweep_stale();
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        Self::with_prefix(format!("{PREFIX}{}-{n}-", std::process::id()))
    }

    /// A testbed meant to outlive this process (`clusterlink lab`): its prefix is not one
    /// that [`sweep_stale`] removes.
    pub fn with_prefix(prefix: String) -> Result<Self, TestbedError> {
        let log_dir =
            std::env::temp_dir().join(format!("clusterlink-{}", prefix.trim_end_matches('-')));
        let _ = std::fs::create_dir_all(&log_dir);
        Ok(Self {
            prefix,
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            keep_logs: Some(tempfile_dir::Dir(log_dir.clone())),
            log_dir,
            env: Vec::new(),
            containers: None,
            container_names: Mutex::new(Vec::new()),
        })
    }

    /// Runs the components spawned from now on (gateways, route agents, DNS plugins) from
    /// an image, with only the capabilities their manifests grant.
    pub fn with_containers(mut self, runner: crate::container::ContainerRunner) -> Self {
        self.containers = Some(runner);
        self
    }

    /// Sets `key=value` in the environment of every process spawned from now on (a test's
    /// faster timers, say).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Keep the log directory after drop (for `lab`, and for looking at a failed test).
    pub fn keep_logs(&mut self) {
        if let Some(mut d) = self.keep_logs.take() {
            d.0 = PathBuf::new();
        }
    }

    /// Makes namespace `PREFIX+short`, with loopback up.
    pub fn namespace(&self, short: &str) -> Result<Netns, TestbedError> {
        let ns = Netns {
            name: format!("{}{short}", self.prefix),
        };
        ip(&["netns", "add", &ns.name])?;
        self.namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A veth pair between two namespaces, made inside `a` with its peer put straight into
    /// `b`; both ends up.
    pub fn veth(&self, a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<(), TestbedError> {
        a.ip(&[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ])?;
        a.ip(&["link", "set", a_if, "up"])?;
        b.ip(&["link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Starts a process inside `ns`, logging to `log_dir/<log>.log`; killed on drop.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(
        &self,
        ns: &Netns,
        log: &str,
        program: &str,
        args: &[S],
    ) -> Result<u32, TestbedError> {
        let path = self.log_path(log);
        let file = std::fs::File::create(&path).map_err(|source| TestbedError::Spawn {
            command: format!("create {}", path.display()),
            source,
        })?;
        let err = file.try_clone().map_err(|source| TestbedError::Spawn {
            command: "dup log".into(),
            source,
        })?;
        let mut command = match (&self.containers, crate::container::grant_of(args)) {
            (Some(runner), Some(grant)) => {
                let name = format!("{}{log}", self.prefix);
                runner.remove(&name);
                self.container_names
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(name.clone());
                runner.command(&name, &ns.name, grant, &self.log_dir, &self.env, args)
            }
            _ => {
                let mut c = ns.command(program);
                c.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
                c
            }
        };
        let child = command
            // Its own process group: a Ctrl-C meant for whoever started it does not reach it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|source| TestbedError::Spawn {
                command: format!(
                    "{program} {}",
                    args.iter()
                        .map(|a| a.as_ref().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                source,
            })?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
        Ok(pid)
    }

    pub fn log_path(&self, log: &str) -> PathBuf {
        self.log_dir.join(format!("{log}.log"))
    }

    /// Kills one process this testbed started.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut c = children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How a process this testbed started has exited, or `None` while it runs.
    pub fn exit_status(&self, pid: u32) -> Option<std::process::ExitStatus> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let c = children.iter_mut().find(|c| c.id() == pid)?;
        c.try_wait().ok().flatten()
    }

    /// Stops a process with SIGTERM, so that it may clean up, and waits up to 10 s for it
    /// to exit (then kills it). Returns whether it exited by itself.
    pub fn terminate(&self, pid: u32) -> bool {
        self.terminate_within(pid, Duration::from_secs(10))
            .is_some()
    }

    /// Sends SIGTERM to one process this testbed started and waits up to `timeout` for it to
    /// exit: how it exited and how long it took, or `None` if it did not (it is then killed).
    pub fn terminate_within(
        &self,
        pid: u32,
        timeout: Duration,
    ) -> Option<(std::process::ExitStatus, Duration)> {
        let mut c = {
            let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
            let i = children.iter().position(|c| c.id() == pid)?;
            children.remove(i)
        };
        let start = Instant::now();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let mut status = None;
        let _ = wait_until("the process to exit", timeout, || {
            status = c.try_wait().ok().flatten();
            status.is_some()
        });
        match status {
            Some(s) => Some((s, start.elapsed())),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                None
            }
        }
    }

    pub fn namespaces(&self) -> Vec<Netns> {
        self.namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Hands ownership of processes and namespaces over (to a `lab` that outlives this
    /// process); nothing is removed on drop afterwards.
    pub fn release(&mut self) -> (Vec<Netns>, Vec<u32>) {
        self.keep_logs();
        let ns = std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|p| p.into_inner()));
        let pids = std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .map(|c| c.id())
            .collect();
        (ns, pids)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for mut c in std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(runner) = &self.containers {
            for name in std::mem::take(
                &mut *self
                    .container_names
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            ) {
                runner.remove(&name);
            }
        }
        for ns in std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .rev()
        {
            if let Err(e) = remove_namespace(&ns.name) {
                warn!(namespace = %ns.name, error = %e, "cannot remove namespace");
            }
        }
    }
}

/// Removes `cl-<pid>-…` namespaces whose process is gone.
pub fn sweep_stale() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            debug!(namespace = name, "removing stale namespace");
            let _ = remove_namespace(name);
        }
    }
}
