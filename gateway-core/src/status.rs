//! Which tunnel status records go to the broker, and when (no I/O, no clock).
//!
//! The data plane reports every tunnel's status twice a second, and its byte counters and RTT
//! change with every report. Publishing each report would make every gateway write one
//! durable broker record per peer twice a second (a full mesh of 50 clusters: about 5,000
//! writes a second), and wake every watcher of connections (`show`, the DNS plugins) as
//! often. So a tunnel's record is published at once when what others act on changes (the
//! tunnel appears, its state changes, its first RTT or handshake arrives, its endpoint
//! moves), and otherwise refreshed every [`STATUS_REFRESH`] so RTT, handshake time and
//! byte counters stay current. A peer that is gone is withdrawn at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clusterlink_api::{ClusterId, ConnectionState, NodeName};

use crate::core::PeerStatus;

/// How often an unchanged tunnel's record is refreshed (RTT, handshake time, bytes).
pub const STATUS_REFRESH: Duration = Duration::from_secs(5);

/// A tunnel's record in the broker: (remote cluster, remote gateway node).
pub type TunnelKey = (ClusterId, NodeName);

/// What a watcher acts on; a change to it is published at once.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Salient {
    state: ConnectionState,
    has_rtt: bool,
    has_handshake: bool,
    endpoint: Option<SocketAddr>,
}

impl Salient {
    fn of(s: &PeerStatus) -> Self {
        Self {
            state: s.state,
            has_rtt: s.rtt.is_some(),
            has_handshake: s.since_handshake.is_some(),
            endpoint: s.endpoint,
        }
    }
}

/// What to send to the broker now.
#[derive(Debug, Default, PartialEq)]
pub struct StatusPlan {
    pub publish: Vec<PeerStatus>,
    pub withdraw: Vec<TunnelKey>,
}

impl StatusPlan {
    pub fn is_empty(&self) -> bool {
        self.publish.is_empty() && self.withdraw.is_empty()
    }
}

/// The records published over one broker connection (lease). A new connection starts with
/// a new schedule, so everything is published again under the new lease.
#[derive(Debug)]
pub struct StatusSchedule {
    refresh: Duration,
    sent: BTreeMap<TunnelKey, (Salient, Instant)>,
}

impl StatusSchedule {
    pub fn new(refresh: Duration) -> Self {
        Self {
            refresh,
            sent: BTreeMap::new(),
        }
    }

    /// What of `snapshot` (the data plane's latest report) is due at `now`. It is taken as
    /// sent: if sending fails, the connection is dropped and the next one starts afresh.
    pub fn plan(&mut self, snapshot: &[PeerStatus], now: Instant) -> StatusPlan {
        let mut plan = StatusPlan::default();
        let mut current: BTreeMap<TunnelKey, (Salient, Instant)> = BTreeMap::new();
        for s in snapshot {
            let key = (s.cluster.clone(), s.node.clone());
            let salient = Salient::of(s);
            let due = match self.sent.get(&key) {
                None => true,
                Some((was, at)) => {
                    *was != salient || now.saturating_duration_since(*at) >= self.refresh
                }
            };
            if due {
                plan.publish.push(s.clone());
                current.insert(key, (salient, now));
            } else if let Some(kept) = self.sent.get(&key) {
                current.insert(key, kept.clone());
            }
        }
        plan.withdraw = self
            .sent
            .keys()
            .filter(|k| !current.contains_key(*k))
            .cloned()
            .collect();
        self.sent = current;
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cluster: &str, state: ConnectionState, rtt_us: Option<u64>) -> PeerStatus {
        PeerStatus {
            cluster: cluster.parse().unwrap(),
            node: format!("{cluster}-gw0").parse().unwrap(),
            state,
            rtt: rtt_us.map(Duration::from_micros),
            since_handshake: Some(Duration::from_secs(1)),
            endpoint: Some("172.31.1.1:51820".parse().unwrap()),
            tx_bytes: 0,
            rx_bytes: 0,
        }
    }

    fn names(plan: &StatusPlan) -> Vec<String> {
        plan.publish.iter().map(|s| s.cluster.to_string()).collect()
    }

    const UP: ConnectionState = ConnectionState::Connected;
    const DOWN: ConnectionState = ConnectionState::Error;

    #[test]
    fn new_tunnels_are_published_at_once_and_unchanged_ones_only_on_refresh() {
        let t0 = Instant::now();
        let mut s = StatusSchedule::new(STATUS_REFRESH);
        let first = s.plan(&[status("b", UP, Some(200)), status("c", UP, None)], t0);
        assert_eq!(names(&first), ["b", "c"]);
        // Half a second later the counters and the RTT moved: nothing is due.
        let mut b = status("b", UP, Some(350));
        b.tx_bytes = 1_000_000;
        let later = t0 + Duration::from_millis(500);
        assert!(
            s.plan(&[b.clone(), status("c", UP, None)], later)
                .is_empty()
        );
        // Once the refresh interval has passed, both go again, with what they are now.
        let refresh = t0 + STATUS_REFRESH;
        let again = s.plan(&[b, status("c", UP, None)], refresh);
        assert_eq!(names(&again), ["b", "c"]);
        assert_eq!(again.publish[0].tx_bytes, 1_000_000);
        assert_eq!(again.publish[0].rtt, Some(Duration::from_micros(350)));
    }

    #[test]
    fn what_watchers_act_on_is_published_at_once() {
        let t0 = Instant::now();
        let soon = t0 + Duration::from_millis(500);
        let mut s = StatusSchedule::new(STATUS_REFRESH);
        s.plan(&[status("b", UP, None), status("c", UP, Some(100))], t0);
        // b's first RTT, c going down: both at once.
        let plan = s.plan(
            &[status("b", UP, Some(90)), status("c", DOWN, Some(100))],
            soon,
        );
        assert_eq!(names(&plan), ["b", "c"]);
        // An endpoint that moved (roaming, NAT rebinding).
        let mut moved = status("b", UP, Some(90));
        moved.endpoint = Some("100.64.3.1:40000".parse().unwrap());
        let plan = s.plan(&[moved, status("c", DOWN, Some(100))], soon);
        assert_eq!(names(&plan), ["b"]);
        // A first handshake.
        let mut fresh = status("d", DOWN, None);
        fresh.since_handshake = None;
        s.plan(&[fresh.clone()], soon);
        fresh.since_handshake = Some(Duration::ZERO);
        assert_eq!(names(&s.plan(&[fresh], soon)), ["d"]);
    }

    #[test]
    fn peers_gone_are_withdrawn_once() {
        let t0 = Instant::now();
        let mut s = StatusSchedule::new(STATUS_REFRESH);
        s.plan(&[status("b", UP, None), status("c", UP, None)], t0);
        let plan = s.plan(&[status("b", UP, None)], t0);
        assert!(plan.publish.is_empty());
        assert_eq!(
            plan.withdraw,
            [("c".parse().unwrap(), "c-gw0".parse().unwrap())]
        );
        assert!(s.plan(&[status("b", UP, None)], t0).is_empty());
        // It comes back: published at once.
        assert_eq!(
            names(&s.plan(&[status("b", UP, None), status("c", UP, None)], t0)),
            ["c"]
        );
    }
}
