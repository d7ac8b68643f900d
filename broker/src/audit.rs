//! The audit trail: every admin action and every refusal, as one structured log line each
//! (target `clusterlink::audit`: who, what, on what, why) and in a bounded in-memory ring that
//! `show events` reads. The ring is this broker's (a broker behind a shared etcd keeps its
//! own); the log lines are the durable record. Refusals are not written to the store: a
//! client that is refused in a loop must not turn into a stream of writes.

use std::collections::VecDeque;
use std::sync::Mutex;

use clusterlink_api::proto;
use tracing::{info, warn};

use crate::pki::Identity;

/// How many events the ring keeps.
pub const KEPT: usize = 1_000;

#[derive(Default)]
pub struct Audit {
    ring: Mutex<VecDeque<proto::AuditEvent>>,
}

/// Who made a call, as the audit names it.
pub fn who(identity: Option<&Identity>) -> String {
    match identity {
        Some(Identity::Admin) => "admin".into(),
        Some(Identity::Cluster { id, .. }) => format!("cluster/{id}"),
        None => "anonymous".into(),
    }
}

impl Audit {
    /// Records an action that was done (`reason` empty) or refused.
    pub fn record(
        &self,
        at_unix_ms: i64,
        who: String,
        action: &str,
        target: String,
        refusal: Option<String>,
    ) {
        let refused = refusal.is_some();
        let reason = refusal.unwrap_or_default();
        if refused {
            warn!(target: "clusterlink::audit", %who, action, %target, %reason, "refused");
        } else {
            info!(target: "clusterlink::audit", %who, action, %target, "done");
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(proto::AuditEvent {
            at_unix_ms,
            who,
            action: action.to_owned(),
            target,
            refused,
            reason,
        });
    }

    /// The newest `limit` events (all, for 0), oldest first.
    pub fn recent(&self, limit: usize) -> Vec<proto::AuditEvent> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let skip = match limit {
            0 => 0,
            n => ring.len().saturating_sub(n),
        };
        ring.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest() {
        let a = Audit::default();
        for i in 0..(KEPT + 5) {
            a.record(i as i64, "admin".into(), "revoke", format!("c{i}"), None);
        }
        let all = a.recent(0);
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].at_unix_ms, 5);
        let last = a.recent(2);
        assert_eq!(last.len(), 2);
        assert_eq!(last[1].target, format!("c{}", KEPT + 4));
        a.record(
            1,
            "anonymous".into(),
            "join",
            "east".into(),
            Some("unknown token".into()),
        );
        let r = &a.recent(1)[0];
        assert!(r.refused && r.reason == "unknown token");
    }
}
