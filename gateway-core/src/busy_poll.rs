//! How long the data plane polls before it sleeps: an adaptive window, without I/O or clock.
//!
//! A packet that arrives while the plane's thread sleeps in `epoll_wait` has to wake it,
//! and in a VM a wake-up of a thread whose vCPU has halted is an inter-processor interrupt
//! through the hypervisor: tens of µs here (BENCHMARKS.md, "Where the RTT goes"). When the
//! next packet comes soon after the last (the reply to a packet just sent through the
//! tunnel, on a low-latency underlay), polling for it a little while, yielding the CPU to
//! anything else runnable, catches it without that wake-up.
//!
//! The window follows what polling would have caught, as the kernel's `cpuidle-haltpoll`
//! governor does for a guest's idle vCPU:
//! - the next event came within the window: polling paid, the window stays;
//! - it came later, but within the maximum: the window grows to twice that idle time, so
//!   that the next such gap is caught;
//! - it came after the maximum: the poll was wasted, and the window gives up an eighth.
//!
//! Growth is fast and shrinking slow because a request and its reply make one short gap
//! and then one long one (until the next request): the window must survive the long gaps
//! between the short ones it pays for. Where replies take longer than the maximum (a WAN
//! between the clusters) or nothing comes back (one-way traffic), every poll is wasted and
//! the window decays to nothing: the plane then sleeps at once, as it would without it.
//! A poll costs at most the window, once per idle period.

use std::time::Duration;

/// Below this the window is not worth a poll and counts as none.
const SMALLEST: Duration = Duration::from_micros(2);

/// The adaptive poll window of one data plane.
#[derive(Debug, Clone)]
pub struct BusyPoll {
    max: Duration,
    window: Duration,
}

impl BusyPoll {
    /// A window that grows up to `max`; a zero `max` turns polling off.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            window: Duration::ZERO,
        }
    }

    /// How long to poll after the plane has done its work, before it sleeps.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The plane was idle for `idle` (polling, then maybe asleep) before its next event.
    pub fn idle_ended(&mut self, idle: Duration) {
        if idle <= self.window {
            return;
        }
        if idle <= self.max {
            self.window = (idle * 2).min(self.max);
        } else {
            self.window -= self.window / 8;
            if self.window < SMALLEST {
                self.window = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn starts_without_polling_and_grows_to_twice_a_short_gap() {
        let mut p = BusyPoll::new(us(100));
        assert_eq!(p.window(), Duration::ZERO);
        p.idle_ended(us(30));
        assert_eq!(p.window(), us(60));
        // Caught by the window: no change.
        p.idle_ended(us(45));
        assert_eq!(p.window(), us(60));
        // Longer, still under the maximum: grows, up to the maximum.
        p.idle_ended(us(70));
        assert_eq!(p.window(), us(100));
    }

    #[test]
    fn zero_maximum_never_polls() {
        let mut p = BusyPoll::new(Duration::ZERO);
        for idle in [us(0), us(1), us(50), Duration::from_millis(10)] {
            p.idle_ended(idle);
            assert_eq!(p.window(), Duration::ZERO);
        }
    }

    #[test]
    fn request_and_reply_keep_the_window_open() {
        // A ping every 10 ms whose reply comes 50 µs after the request went out: one
        // short gap and one long one per ping. The window must cover the reply in most.
        let mut p = BusyPoll::new(us(100));
        let mut caught = 0;
        for _ in 0..100 {
            if p.window() >= us(50) {
                caught += 1;
            }
            p.idle_ended(us(50));
            p.idle_ended(Duration::from_millis(10));
        }
        assert!(
            caught >= 80,
            "the reply was polled for in {caught} of 100 pings"
        );
    }

    #[test]
    fn gaps_longer_than_the_maximum_decay_the_window_to_nothing() {
        // Replies over a WAN (2 ms) never come within the maximum: every poll is wasted.
        let mut p = BusyPoll::new(us(100));
        p.idle_ended(us(40));
        assert_eq!(p.window(), us(80));
        let mut polled = Duration::ZERO;
        for _ in 0..200 {
            polled += p.window();
            p.idle_ended(Duration::from_millis(2));
        }
        assert_eq!(p.window(), Duration::ZERO);
        // Each wasted poll costs the window; together less than ten windows.
        assert!(polled < us(800), "{polled:?} spent polling");
    }
}
