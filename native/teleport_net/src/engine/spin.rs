//! Whether an idle I/O thread polls its sockets before it sleeps
//! (`Config::reader_busy_wait`).
//!
//! Polling catches a message without a thread wake-up, but it pays only while a core is
//! free. When another thread wants this one's core, each yield hands the core over for
//! that thread's time slice: a message arriving meanwhile waits unseen for the slice to
//! end, where a sleeping thread would have been woken at once, and the yields' context
//! switches take CPU from the VM's schedulers (64 callers of small RPCs on 2 cores: the
//! polling I/O threads used about a fifth of the machine). A yield that comes back late
//! says another thread was waiting for the core: polling then stops for a while.

use std::time::{Duration, Instant};

/// A yield that took longer than this gave the core to another thread.
const CONTENDED_YIELD: Duration = Duration::from_micros(20);
/// How long polling stays off once a yield found the core wanted.
const CONTENDED_PAUSE: Duration = Duration::from_millis(10);

pub(super) struct Spin {
    busy_wait: Duration,
    /// Whether the next wait may poll: the last wait was short and no bulk came since.
    after_short_wait: bool,
    /// Polling is off until then: a yield found the core wanted.
    paused_until: Option<Instant>,
}

impl Spin {
    pub(super) fn new(busy_wait: Duration) -> Spin {
        Spin {
            busy_wait,
            after_short_wait: false,
            paused_until: None,
        }
    }

    /// How long the next wait polls before it sleeps (zero: it does not).
    pub(super) fn budget(&mut self, now: Instant) -> Duration {
        if !self.after_short_wait || self.busy_wait.is_zero() {
            return Duration::ZERO;
        }
        match self.paused_until {
            Some(until) if now < until => Duration::ZERO,
            Some(_) => {
                self.paused_until = None;
                self.busy_wait
            }
            None => self.busy_wait,
        }
    }

    /// A yield while polling took `took`; false if polling must stop (the core is wanted).
    pub(super) fn yielded(&mut self, took: Duration, now: Instant) -> bool {
        if took > CONTENDED_YIELD {
            self.paused_until = Some(now + CONTENDED_PAUSE);
            return false;
        }
        true
    }

    /// A wait that could sleep slept `slept`: request/response traffic (short waits)
    /// polls next time, sparse traffic does not.
    pub(super) fn slept(&mut self, slept: Duration) {
        self.after_short_wait = slept < self.busy_wait;
    }

    /// A bulk frame came: its reader is not waiting for a reply.
    pub(super) fn bulk_seen(&mut self) {
        self.after_short_wait = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn polls_only_after_a_short_wait_and_never_when_off() {
        let now = Instant::now();
        let mut spin = Spin::new(100 * US);
        assert_eq!(spin.budget(now), Duration::ZERO, "nothing seen yet");
        spin.slept(30 * US);
        assert_eq!(spin.budget(now), 100 * US);
        spin.slept(500 * US);
        assert_eq!(spin.budget(now), Duration::ZERO, "sparse traffic");
        spin.slept(30 * US);
        spin.bulk_seen();
        assert_eq!(spin.budget(now), Duration::ZERO, "bulk");
        let mut off = Spin::new(Duration::ZERO);
        off.slept(Duration::ZERO);
        assert_eq!(off.budget(now), Duration::ZERO);
    }

    #[test]
    fn a_late_yield_stops_polling_for_a_while() {
        let now = Instant::now();
        let mut spin = Spin::new(100 * US);
        spin.slept(10 * US);
        assert!(spin.yielded(2 * US, now), "a free core: keep polling");
        assert_eq!(spin.budget(now), 100 * US);
        assert!(!spin.yielded(CONTENDED_YIELD + US, now), "the core was wanted");
        assert_eq!(spin.budget(now), Duration::ZERO);
        assert_eq!(spin.budget(now + CONTENDED_PAUSE / 2), Duration::ZERO);
        assert_eq!(
            spin.budget(now + CONTENDED_PAUSE),
            100 * US,
            "polls again after the pause"
        );
    }
}
