//! Waiting for a condition with a deadline, never for a fixed time.

use std::future::Future;
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("timed out after {timeout:?} waiting for {what}")]
pub struct Timeout {
    pub what: String,
    pub timeout: Duration,
}

const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), Timeout> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Timeout {
                what: what.to_owned(),
                timeout,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// [`wait_until`] for async conditions, on tokio's clock.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<(), Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Timeout {
                what: what.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_the_condition_holds_and_fails_at_the_deadline() {
        let mut n = 0;
        wait_until("three polls", Duration::from_secs(5), || {
            n += 1;
            n == 3
        })
        .unwrap();
        assert_eq!(n, 3);
        let e = wait_until("never", Duration::from_millis(50), || false).unwrap_err();
        assert!(e.to_string().contains("waiting for never"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_async_wait_runs_on_tokio_time() {
        let e = wait_for("never", Duration::from_secs(3600), || async { false })
            .await
            .unwrap_err();
        assert_eq!(e.timeout, Duration::from_secs(3600));
    }
}
