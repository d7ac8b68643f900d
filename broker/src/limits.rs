//! Per-cluster limits, so that no member can starve the broker (design: Security): at most
//! `max_records` records per cluster, and publishes and withdrawals at a sustained
//! `writes_per_second` with bursts up to `burst`. Pure: time comes in as an argument.

use std::collections::BTreeMap;
use std::time::Duration;

use clusterlink_api::ClusterId;
use serde::{Deserialize, Serialize};

/// The limits, as `broker.yaml` gives them (`limits:`; every field optional).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Records (services, gateways, connection statuses) one cluster may hold.
    pub max_records: u32,
    /// Writes (publish, withdraw) per second one cluster may sustain.
    pub writes_per_second: u32,
    /// Writes one cluster may make at once above the sustained rate.
    pub burst: u32,
}

impl Default for Limits {
    /// Far above what a cluster of thousands of services needs (a gateway writes its status
    /// every few seconds, a DNS plugin on each export change), far below what starves others.
    fn default() -> Self {
        Limits {
            max_records: 20_000,
            writes_per_second: 500,
            burst: 2_000,
        }
    }
}

impl Limits {
    /// Refuses limits that would stop every cluster (zero) or mean nothing.
    pub fn check(&self) -> Result<(), String> {
        if self.max_records == 0 || self.writes_per_second == 0 || self.burst == 0 {
            return Err(format!(
                "limits must be positive (maxRecords {}, writesPerSecond {}, burst {})",
                self.max_records, self.writes_per_second, self.burst
            ));
        }
        Ok(())
    }
}

/// A token bucket per cluster.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: BTreeMap<ClusterId, (f64, Duration)>,
}

impl RateLimiter {
    /// Takes one write for `cluster` at `now` (time since any fixed start), or says how long
    /// until one is available.
    pub fn take(
        &mut self,
        cluster: &ClusterId,
        now: Duration,
        limits: &Limits,
    ) -> Result<(), Duration> {
        let rate = f64::from(limits.writes_per_second);
        let burst = f64::from(limits.burst);
        // The cluster's ID is cloned once, at its first write, not on every one.
        if !self.buckets.contains_key(cluster) {
            self.buckets.insert(cluster.clone(), (burst, now));
        }
        let Some((tokens, last)) = self.buckets.get_mut(cluster) else {
            return Ok(());
        };
        let refill = now.saturating_sub(*last).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }

    /// Forgets a cluster (revoked).
    pub fn forget(&mut self, cluster: &ClusterId) {
        self.buckets.remove(cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_gets_its_burst_then_its_rate_and_others_are_not_touched() {
        let limits = Limits {
            max_records: 10,
            writes_per_second: 10,
            burst: 5,
        };
        let mut r = RateLimiter::default();
        let (east, west): (ClusterId, ClusterId) =
            ("east".parse().unwrap(), "west".parse().unwrap());
        let t0 = Duration::from_secs(100);
        for _ in 0..5 {
            assert_eq!(r.take(&east, t0, &limits), Ok(()));
        }
        let wait = r.take(&east, t0, &limits).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // West has its own bucket.
        assert_eq!(r.take(&west, t0, &limits), Ok(()));
        // 100 ms later, one more for east; a second later, at most the burst.
        assert_eq!(
            r.take(&east, t0 + Duration::from_millis(100), &limits),
            Ok(())
        );
        let later = t0 + Duration::from_secs(60);
        let granted = (0..100)
            .filter(|_| r.take(&east, later, &limits).is_ok())
            .count();
        assert_eq!(granted, 5);
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(Limits::default().check().is_ok());
        let zero = Limits {
            writes_per_second: 0,
            ..Limits::default()
        };
        assert!(zero.check().unwrap_err().contains("positive"));
    }
}
