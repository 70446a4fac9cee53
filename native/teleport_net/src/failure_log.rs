//! Which handshake failures are worth a log line: at most one per source address per
//! `INTERVAL`, carrying how many from there went unreported since. Every failure is
//! still counted (`ListenerStats::handshake_failures`); this only bounds what reaches
//! the VM's logger, so a peer hammering the port with garbage cannot flood the log
//! or the event queue.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const INTERVAL: Duration = Duration::from_secs(10);
/// Sources remembered at once; past it, failures from new sources share one entry.
const SOURCES_MAX: usize = 1024;
/// The shared entry's key, for the sources that did not fit.
const OTHER_SOURCES: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[derive(Default)]
pub struct FailureLog {
    /// Source -> when it was last reported, and failures since then not reported.
    sources: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

impl FailureLog {
    /// Records one failure from `source`; `Some(unreported)` when it should be
    /// reported now, with how many before it were not.
    pub fn note(&self, source: IpAddr, now: Instant) -> Option<u64> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.contains_key(&source) && sources.len() >= SOURCES_MAX {
            sources.retain(|_, (last, _)| now.duration_since(*last) < INTERVAL);
        }
        let key = if sources.contains_key(&source) || sources.len() < SOURCES_MAX {
            source
        } else {
            OTHER_SOURCES
        };
        match sources.get_mut(&key) {
            Some((last, unreported)) if now.duration_since(*last) < INTERVAL => {
                *unreported += 1;
                None
            }
            Some((last, unreported)) => {
                let before = std::mem::take(unreported);
                *last = now;
                Some(before)
            }
            None => {
                sources.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn one_report_per_source_per_interval_with_the_count_missed() {
        let log = FailureLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(ip(1), t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.note(ip(1), t0 + Duration::from_millis(i)), None);
        }
        // Another source has its own budget.
        assert_eq!(log.note(ip(2), t0), Some(0));
        assert_eq!(log.note(ip(1), t0 + INTERVAL), Some(5));
        assert_eq!(log.note(ip(1), t0 + INTERVAL), None);
    }

    #[test]
    fn many_sources_share_one_entry_past_the_cap() {
        let log = FailureLog::default();
        let t0 = Instant::now();
        for n in 0..SOURCES_MAX as u32 {
            assert_eq!(log.note(ip(n), t0), Some(0));
        }
        // The table is full of recent sources: newcomers share one report.
        assert_eq!(log.note(ip(100_000), t0), Some(0));
        assert_eq!(log.note(ip(100_001), t0), None);
        assert_eq!(log.sources.lock().unwrap().len(), SOURCES_MAX + 1);
        // Once the old entries expire, a newcomer gets its own again.
        assert_eq!(log.note(ip(100_002), t0 + INTERVAL), Some(0));
        assert!(log.sources.lock().unwrap().len() <= 2);
    }
}
