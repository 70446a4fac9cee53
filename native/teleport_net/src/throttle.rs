//! How many more inbound handshakes each source may fail before the listener refuses
//! it at accept (`Config::max_handshake_failures_per_ip`): a token bucket per source
//! that holds `burst` failures and gets them back over `REFILL` (a tenth of `burst` a
//! second). Each handshake takes a token as it is admitted, so a source holding several
//! in progress at once cannot run past its allowance before the first of them fails;
//! one that succeeds gives its token back and one more. A handshake that fails costs
//! the listener's thread its work (a TLS key exchange and signature, or a nonce and a
//! reply) and brings its source nothing, so a source that keeps failing is refused
//! before any of that work. One whose handshakes mostly succeed is never refused,
//! however many it makes: nodes restarting together on one host, whose pools abort a
//! few handshakes each when one of their connections is refused at the caps on
//! handshakes in progress, authenticate many more.
//!
//! Sources are as the per-source cap on handshakes in progress counts them (an IPv4
//! address, an IPv6 /64). The table is bounded: a source whose bucket is full again
//! is dropped from it (it is as if never seen), and past `SOURCES_MAX` sources with
//! recent failures a new source is not tracked: it is not refused. Many sources at
//! once are the handshake thread's to absorb (see `engine`), not a reason to refuse
//! every newcomer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A source that stopped failing has its whole burst back after this long.
pub const REFILL: Duration = Duration::from_secs(10);
/// Sources with recent failures (or handshakes in progress) tracked at once.
const SOURCES_MAX: usize = 4096;
/// How often a full table is swept for sources whose bucket is full again.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct FailureBudget {
    /// Failures a source may have in a burst; 0 for no limit.
    burst: u32,
    sources: Mutex<Sources>,
}

#[derive(Default)]
struct Sources {
    left: HashMap<IpAddr, Allowance>,
    last_sweep: Option<Instant>,
}

/// What a source has left, as of `at`.
#[derive(Clone, Copy, Debug)]
struct Allowance {
    left: f64,
    at: Instant,
}

impl FailureBudget {
    pub fn new(burst: usize) -> FailureBudget {
        FailureBudget {
            burst: u32::try_from(burst).unwrap_or(u32::MAX),
            sources: Mutex::default(),
        }
    }

    /// The limit (0: none).
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes a token for a handshake from `source` at `now`; false if it has none
    /// left (refuse it). The token stays taken if the handshake fails.
    pub fn take(&self, source: IpAddr, now: Instant) -> bool {
        if self.burst == 0 {
            return true;
        }
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(allowance) = sources.left.get_mut(&source) {
            if self.refill(allowance, now) < 1.0 {
                return false;
            }
            allowance.left -= 1.0;
            return true;
        }
        if sources.left.len() >= SOURCES_MAX
            && sources
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL)
        {
            sources.last_sweep = Some(now);
            sources
                .left
                .retain(|_, a| self.refill(a, now) < f64::from(self.burst));
        }
        // Past the bound, a new source is not tracked, and not refused.
        if sources.left.len() < SOURCES_MAX {
            let left = f64::from(self.burst) - 1.0;
            sources.left.insert(source, Allowance { left, at: now });
        }
        true
    }

    /// A handshake from `source` that took a token succeeded: the token back, and one
    /// failure forgiven.
    pub fn succeeded(&self, source: IpAddr, now: Instant) {
        self.give_back(source, now, 2.0);
    }

    /// A token taken for a handshake that never ran (refused at the caps on handshakes
    /// in progress), given back.
    pub fn unused(&self, source: IpAddr, now: Instant) {
        self.give_back(source, now, 1.0);
    }

    fn give_back(&self, source: IpAddr, now: Instant, tokens: f64) {
        if self.burst == 0 {
            return;
        }
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let Some(allowance) = sources.left.get_mut(&source) else {
            return;
        };
        allowance.left = (self.refill(allowance, now) + tokens).min(f64::from(self.burst));
        if allowance.left >= f64::from(self.burst) {
            sources.left.remove(&source);
        }
    }

    /// Brings `allowance` up to `now`; returns what is left.
    fn refill(&self, allowance: &mut Allowance, now: Instant) -> f64 {
        let burst = f64::from(self.burst);
        let elapsed = now.saturating_duration_since(allowance.at).as_secs_f64();
        allowance.left = (allowance.left + elapsed * burst / REFILL.as_secs_f64()).min(burst);
        allowance.at = allowance.at.max(now);
        allowance.left
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.lock().unwrap().left.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    /// `n` handshakes from `source` admitted at `at` (and failed): how many were.
    fn admitted(budget: &FailureBudget, source: IpAddr, at: Instant, n: usize) -> usize {
        (0..n).filter(|_| budget.take(source, at)).count()
    }

    #[test]
    fn a_source_is_refused_after_its_burst_and_gets_one_back_per_tenth() {
        let budget = FailureBudget::new(10);
        let t0 = Instant::now();
        assert_eq!(admitted(&budget, ip(1), t0, 15), 10, "ten, then refused");
        // Others are not.
        assert!(budget.take(ip(2), t0));
        // One back per REFILL / burst (a second here).
        assert!(!budget.take(ip(1), t0 + Duration::from_millis(900)));
        assert!(budget.take(ip(1), t0 + Duration::from_millis(1000)));
        assert!(!budget.take(ip(1), t0 + Duration::from_millis(1500)));
        // Refusals do not dig a deeper hole.
        assert_eq!(admitted(&budget, ip(1), t0 + Duration::from_millis(1500), 100), 0);
        assert!(budget.take(ip(1), t0 + Duration::from_millis(2500)));
    }

    #[test]
    fn handshakes_in_progress_count_before_they_fail() {
        // Ten admitted at once and still running: the eleventh is refused, whatever
        // they turn out to be.
        let budget = FailureBudget::new(10);
        let t0 = Instant::now();
        assert_eq!(admitted(&budget, ip(1), t0, 11), 10);
        // Two succeed: each gives its token back and one more.
        budget.succeeded(ip(1), t0);
        budget.succeeded(ip(1), t0);
        assert_eq!(admitted(&budget, ip(1), t0, 10), 4);
    }

    #[test]
    fn a_source_whose_handshakes_succeed_is_never_refused() {
        let budget = FailureBudget::new(3);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(budget.take(ip(1), t0));
            budget.succeeded(ip(1), t0);
        }
        // Nothing kept about it, and no successes saved up.
        assert_eq!(budget.tracked(), 0);
        assert_eq!(admitted(&budget, ip(1), t0, 5), 3);
        // A success from a source never seen changes nothing.
        budget.succeeded(ip(2), t0);
        assert_eq!(budget.tracked(), 1);
    }

    #[test]
    fn an_unused_token_is_given_back() {
        let budget = FailureBudget::new(2);
        let t0 = Instant::now();
        assert_eq!(admitted(&budget, ip(1), t0, 2), 2);
        budget.unused(ip(1), t0);
        assert_eq!(admitted(&budget, ip(1), t0, 2), 1);
    }

    #[test]
    fn a_source_whose_bucket_is_full_again_is_forgotten() {
        let budget = FailureBudget::new(10);
        let t0 = Instant::now();
        assert!(budget.take(ip(1), t0));
        assert_eq!(budget.tracked(), 1);
        // One back per second: all 10 after one, and the next sweep drops it.
        assert!(budget.take(ip(1), t0 + Duration::from_secs(1)));
        budget.unused(ip(1), t0 + Duration::from_secs(1));
        assert_eq!(budget.tracked(), 0);
    }

    #[test]
    fn no_limit_tracks_nothing() {
        let budget = FailureBudget::new(0);
        let t0 = Instant::now();
        assert_eq!(admitted(&budget, ip(1), t0, 1000), 1000);
        assert_eq!(budget.tracked(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_sources_past_it_are_not_refused() {
        let budget = FailureBudget::new(2);
        let t0 = Instant::now();
        for n in 0..SOURCES_MAX as u32 {
            assert_eq!(admitted(&budget, ip(n), t0, 2), 2);
        }
        assert_eq!(budget.tracked(), SOURCES_MAX);
        assert!(!budget.take(ip(0), t0));
        // A newcomer with the table full of recent failures: not tracked, not refused.
        let newcomer = ip(1 << 20);
        assert_eq!(admitted(&budget, newcomer, t0, 5), 5);
        assert_eq!(budget.tracked(), SOURCES_MAX);
        // Once the old ones have their burst back, a sweep makes room.
        let later = t0 + REFILL;
        assert_eq!(admitted(&budget, newcomer, later, 5), 2);
        assert_eq!(budget.tracked(), 1);
    }
}
