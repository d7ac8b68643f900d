//! A child process that cannot outlive its test: killed (SIGKILL) and reaped when its guard
//! drops, on success, failure or panic.

use std::process::{Child, ExitStatus};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct ProcessGuard {
    child: Child,
}

impl ProcessGuard {
    pub fn new(child: Child) -> Self {
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it exited, or `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (SIGTERM to let it stop cleanly, SIGKILL for a crash).
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        let pid = i32::try_from(self.child.id()).map_err(|_| nix::errno::Errno::ESRCH)?;
        kill(Pid::from_raw(pid), signal)
    }

    /// Waits up to `timeout` for it to exit; `None` if it still runs then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        let _ = crate::wait::wait_until("the process to exit", timeout, || {
            status = self.try_wait();
            status.is_some()
        });
        status
    }

    /// SIGKILL and reap, now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_guard_leaves_no_process() {
        let guard = ProcessGuard::new(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .unwrap(),
        );
        let pid = Pid::from_raw(guard.pid() as i32);
        assert!(kill(pid, None).is_ok(), "it runs");
        drop(guard);
        // Reaped, so the PID is gone (not a zombie).
        assert_eq!(kill(pid, None), Err(nix::errno::Errno::ESRCH));
    }

    #[test]
    fn a_terminated_process_reports_its_exit() {
        let mut guard = ProcessGuard::new(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .unwrap(),
        );
        assert!(guard.try_wait().is_none());
        guard.signal(Signal::SIGTERM).unwrap();
        let status = guard.wait_timeout(Duration::from_secs(10)).expect("exits");
        assert!(!status.success());
    }
}
