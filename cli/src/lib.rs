//! What the `clusterlink` binary shares with `clusterlink-bench`: output in `-o
//! table|json|yaml`, and the shutdown signal every long-running command waits for. The
//! commands themselves are in the binary (`main.rs`, `cmd/`).

pub mod daemon;
pub mod health;
pub mod kube_cluster;
pub mod output;

/// SIGTERM and SIGINT, listened for from the moment this is made (not from the first poll:
/// a signal that comes while a daemon is still starting is not lost to the default action).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Parses a duration argument (`5s`, `500ms`, `24h`) that must lie in `min..=max`; the error
/// gives the range as people write it.
pub fn duration_within(
    s: &str,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = s
        .parse()
        .map_err(|e| format!("{e} (expected a duration such as 5s, 500ms or 24h)"))?;
    if (min..=max).contains(&*d) {
        Ok(d)
    } else {
        Err(format!(
            "{s} is out of range: give {} to {}",
            short(min),
            short(max)
        ))
    }
}

/// A duration in its largest whole unit: 365d, 5m, 100ms.
fn short(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_outside_their_range_say_the_range() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(365 * 86_400));
        assert!(super::duration_within("2h", min, max).is_ok());
        let e = super::duration_within("0s", min, max).unwrap_err();
        assert_eq!(e, "0s is out of range: give 1m to 365d");
        let e = super::duration_within("5", min, max).unwrap_err();
        assert!(e.contains("expected a duration"), "{e}");
        assert_eq!(super::short(Duration::from_millis(100)), "100ms");
    }
}
