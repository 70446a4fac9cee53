//! The listening socket and what faces the network before anyone is authenticated:
//! accepting (with a back-off when out of descriptors), the caps on handshakes in
//! progress (overall and per source), the refusal of sources that keep failing
//! (`throttle`), and the counters of failures and refusals.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};

use crate::error::io_reason;
use crate::failure_log::FailureLog;
use crate::faults::{self, Point};
use crate::host::{Event, Host};
use crate::throttle::FailureBudget;

/// What the listener counts, and the handshakes in progress at it.
pub(crate) struct ListenerState {
    max_pending: usize,
    max_pending_per_source: usize,
    /// Inbound handshakes that failed, and connections refused at accept (over the caps
    /// on handshakes in progress, or throttled).
    pub handshake_failures: AtomicU64,
    /// Connections refused at accept because their source failed too many handshakes.
    pub throttled_handshakes: AtomicU64,
    /// Which failures become events (log lines).
    pub failure_log: FailureLog,
    /// Which refusals at accept become events, apart from the failures: a source's
    /// first refusal is reported even just after one of its failures was.
    refusal_log: FailureLog,
    /// What each source may still fail before it is refused at accept.
    failures_allowed: FailureBudget,
    pub accept_errors: AtomicU64,
    pending: AtomicUsize,
    pending_by_source: Mutex<HashMap<IpAddr, usize>>,
    /// Sockets accepted and not closed, plus our own dials while their handshake runs.
    pub open_sockets: AtomicU64,
}

impl ListenerState {
    pub fn new(
        max_pending: usize,
        max_pending_per_source: usize,
        max_failures_per_source: usize,
    ) -> ListenerState {
        ListenerState {
            max_pending,
            max_pending_per_source,
            handshake_failures: AtomicU64::new(0),
            throttled_handshakes: AtomicU64::new(0),
            failure_log: FailureLog::default(),
            refusal_log: FailureLog::default(),
            failures_allowed: FailureBudget::new(max_failures_per_source),
            accept_errors: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            pending_by_source: Mutex::new(HashMap::new()),
            open_sockets: AtomicU64::new(0),
        }
    }

    pub fn pending_handshakes(&self) -> usize {
        self.pending.load(SeqCst)
    }

    /// A failed inbound handshake (its source's allowance was charged as it was
    /// admitted): counted, and an event at most once per source per
    /// `failure_log::INTERVAL`.
    pub fn handshake_failed(
        &self,
        host: &dyn Host,
        remote: SocketAddr,
        reason: &'static str,
        detail: String,
    ) {
        self.handshake_failures.fetch_add(1, SeqCst);
        if let Some(unreported) = self.failure_log.note(remote.ip(), Instant::now()) {
            host.event(Event::HandshakeFailed {
                remote: remote.to_string(),
                reason,
                detail,
                unreported,
            });
        }
    }

    /// An inbound handshake from `remote` succeeded: its source gets its token back,
    /// and one more.
    pub fn handshake_succeeded(&self, remote: SocketAddr) {
        self.failures_allowed
            .succeeded(source_of(remote.ip()), Instant::now());
    }

    /// A handshake slot for a connection just accepted from `remote`, or `None` if it
    /// must be closed at once: its source failed too many handshakes lately, counting
    /// those in progress (`throttled`), or the listener or this source has its share
    /// of handshakes in progress (`too_many_handshakes`, so a few silent hosts cannot
    /// lock real peers out). A refusal is counted as a handshake failure (not against
    /// the source's allowance: it cost next to nothing) and reported like one, apart
    /// from them.
    pub fn admit(self: &Arc<Self>, host: &dyn Host, remote: SocketAddr) -> Option<HandshakeSlot> {
        let source = source_of(remote.ip());
        let now = Instant::now();
        let reason = if !self.failures_allowed.take(source, now) {
            self.throttled_handshakes.fetch_add(1, SeqCst);
            "throttled"
        } else {
            match HandshakeSlot::take(self, source) {
                Some(slot) => return Some(slot),
                None => {
                    self.failures_allowed.unused(source, now);
                    "too_many_handshakes"
                }
            }
        };
        self.handshake_failures.fetch_add(1, SeqCst);
        if let Some(unreported) = self.refusal_log.note(remote.ip(), now) {
            let detail = match reason {
                "throttled" => format!(
                    "refused at accept: its source failed more handshakes lately than \
                     max_handshake_failures_per_ip ({}) allows",
                    self.failures_allowed.burst()
                ),
                _ => format!(
                    "refused at accept: max_pending_handshakes ({}) or max_pending_handshakes_per_ip \
                     ({}) in progress",
                    self.max_pending, self.max_pending_per_source
                ),
            };
            host.event(Event::HandshakeFailed {
                remote: remote.to_string(),
                reason,
                detail,
                unreported,
            });
        }
        None
    }
}

/// A socket counted in `ListenerState::open_sockets` until dropped.
pub(crate) struct OpenSocket(Arc<ListenerState>);

impl OpenSocket {
    pub fn new(state: &Arc<ListenerState>) -> OpenSocket {
        state.open_sockets.fetch_add(1, SeqCst);
        OpenSocket(state.clone())
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, SeqCst);
    }
}

/// After a panic, the acceptor waits this long before it accepts again: a bug that
/// panics on every connection makes a few reports a second, not a busy loop.
pub(crate) const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// Connections accepted (or refused) in one go: under a flood the listener is never
/// empty, and the handshakes in progress on the same thread must get their turn.
const ACCEPTS_PER_TURN: usize = 64;

/// The listening socket, on the handshake thread.
pub(crate) struct Acceptor {
    pub listener: TcpListener,
    state: Arc<ListenerState>,
    node: String,
    backoff: AcceptBackoff,
    /// Named in the report sent once accepting works again.
    last_reason: &'static str,
    /// Accepting waits until then (out of descriptors, or after a panic).
    pub paused_until: Option<Instant>,
    /// Connections may be waiting: the last `accept_batch` stopped at `ACCEPTS_PER_TURN`
    /// (no readiness event will tell: call it again).
    pub more: bool,
}

impl Acceptor {
    pub fn new(listener: TcpListener, state: Arc<ListenerState>, node: &str) -> Acceptor {
        Acceptor {
            listener,
            state,
            node: node.to_string(),
            backoff: AcceptBackoff::default(),
            last_reason: "",
            paused_until: None,
            more: false,
        }
    }

    /// Accepts the connections waiting (until `WouldBlock`, or `ACCEPTS_PER_TURN` of
    /// them: see `more`), handing each one that gets a handshake slot to `serve`. On a
    /// failure it pauses (see `paused_until`).
    pub fn accept_batch(
        &mut self,
        host: &dyn Host,
        mut serve: impl FnMut(TcpStream, SocketAddr, HandshakeSlot),
    ) {
        self.more = false;
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.paused_until = None;
        for _ in 0..ACCEPTS_PER_TURN {
            let accepted = match faults::accept_error(&self.node) {
                Some(injected) => Err(injected),
                None => self.listener.accept(),
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A connection reset before we took it, or a signal: nothing to wait out.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: accepting harder will
                    // not help, and the connections wait in the backlog. Pause, longer
                    // while it lasts.
                    self.state.accept_errors.fetch_add(1, SeqCst);
                    self.last_reason = io_reason(&e);
                    let (pause, report) = self.backoff.failed(Instant::now());
                    if let Some(count_since_last) = report {
                        host.event(Event::AcceptFailed {
                            reason: self.last_reason,
                            count_since_last,
                        });
                    }
                    self.paused_until = Some(Instant::now() + pause);
                    return;
                }
            };
            if let Some(count_since_last) = self.backoff.succeeded(Instant::now()) {
                host.event(Event::AcceptFailed {
                    reason: self.last_reason,
                    count_since_last,
                });
            }
            faults::check(Point::Acceptor, &self.node);
            // Dropped (closed) when refused.
            if let Some(slot) = self.state.admit(host, remote) {
                serve(stream, remote, slot);
            }
        }
        self.more = true;
    }
}

/// The first pause after a failed accept, doubled while accepts keep failing, up to
/// `ACCEPT_PAUSE_MAX` (as ranch pauses on EMFILE).
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one `AcceptFailed` event per this interval, so a listener failing for
/// minutes sends the VM a line a second, not one per attempt.
const ACCEPT_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The acceptor's state while accepts fail: the next pause, and the failures not yet
/// reported. Times are passed in, so the policy is tested without sleeping.
#[derive(Default)]
pub(crate) struct AcceptBackoff {
    pause: Option<Duration>,
    unreported: u64,
    last_report: Option<Instant>,
}

impl AcceptBackoff {
    /// A failed accept: how long to pause, and the failure count to report now, if any.
    pub(crate) fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = self
            .pause
            .map_or(ACCEPT_PAUSE_MIN, |p| (p * 2).min(ACCEPT_PAUSE_MAX));
        self.pause = Some(pause);
        self.unreported += 1;
        (pause, self.report(now))
    }

    /// A successful accept: the pause starts over; failures left unreported by the rate
    /// limit are reported once the interval allows.
    pub(crate) fn succeeded(&mut self, now: Instant) -> Option<u64> {
        self.pause = None;
        if self.unreported == 0 {
            return None;
        }
        self.report(now)
    }

    fn report(&mut self, now: Instant) -> Option<u64> {
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < ACCEPT_REPORT_INTERVAL)
        {
            return None;
        }
        self.last_report = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// One handshake in progress at the listener, counted against `max_pending_handshakes`
/// and against its source's `max_pending_handshakes_per_ip`; given back on drop.
pub(crate) struct HandshakeSlot {
    state: Arc<ListenerState>,
    source: IpAddr,
}

impl HandshakeSlot {
    /// `None` when the listener or this source already has its share in progress.
    fn take(state: &Arc<ListenerState>, source: IpAddr) -> Option<HandshakeSlot> {
        let mut by_source = state.pending_by_source.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = by_source.get(&source).copied().unwrap_or(0);
        if state.pending.load(SeqCst) >= state.max_pending || from_source >= state.max_pending_per_source {
            return None;
        }
        by_source.insert(source, from_source + 1);
        state.pending.fetch_add(1, SeqCst);
        Some(HandshakeSlot {
            state: state.clone(),
            source,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut by_source = self
            .state
            .pending_by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
        self.state.pending.fetch_sub(1, SeqCst);
    }
}

/// Who a connection comes from, for the per-source cap: the IPv4 address (also when
/// it reaches a dual-stack listener as `::ffff:a.b.c.d`), or the IPv6 /64, which a
/// single host usually has whole.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host for the acceptor alone: no connection gets as far as frames.
    struct NoHost;

    impl Host for NoHost {
        fn frame_handler(&self, _peer: &str) -> Box<dyn crate::host::FrameHandler> {
            unreachable!("nothing is authenticated here")
        }

        fn event(&self, _event: Event) {}
    }

    #[test]
    fn accepting_stops_after_a_turns_share_and_says_more_wait() {
        let listener = crate::socket::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(ListenerState::new(1000, 1000, 0));
        let mut acceptor = Acceptor::new(listener, state, "accept-share@127.0.0.1");
        // The kernel completes them into the backlog without us.
        let _clients: Vec<std::net::TcpStream> = (0..ACCEPTS_PER_TURN + 10)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut taken = Vec::new();
        acceptor.accept_batch(&NoHost, |stream, _, slot| taken.push((stream, slot)));
        assert_eq!(taken.len(), ACCEPTS_PER_TURN);
        assert!(acceptor.more);
        acceptor.accept_batch(&NoHost, |stream, _, slot| taken.push((stream, slot)));
        assert_eq!(taken.len(), ACCEPTS_PER_TURN + 10);
        assert!(!acceptor.more);
    }

    #[test]
    fn accept_pauses_double_up_to_the_cap_and_start_over_after_a_success() {
        let mut backoff = AcceptBackoff::default();
        let now = Instant::now();
        let pauses: Vec<Duration> = (0..6).map(|_| backoff.failed(now).0).collect();
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(pauses[5], ACCEPT_PAUSE_MAX);
        backoff.succeeded(now);
        assert_eq!(backoff.failed(now).0, ACCEPT_PAUSE_MIN);
    }

    #[test]
    fn accept_failures_are_reported_at_most_once_per_interval_and_none_is_lost() {
        let mut backoff = AcceptBackoff::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The first failure is reported at once; the next ones wait for the interval.
        assert_eq!(backoff.failed(at(0)).1, Some(1));
        assert_eq!(backoff.failed(at(100)).1, None);
        assert_eq!(backoff.failed(at(300)).1, None);
        assert_eq!(backoff.succeeded(at(500)), None, "too soon after the last report");
        assert_eq!(backoff.succeeded(at(600)), None);
        let interval = ACCEPT_REPORT_INTERVAL.as_millis() as u64;
        assert_eq!(backoff.succeeded(at(interval)), Some(2));
        // Nothing left: successes stay silent.
        assert_eq!(backoff.succeeded(at(5 * interval)), None);
        assert_eq!(backoff.failed(at(5 * interval)).1, Some(1));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address literal")
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_prefixes() {
        assert_eq!(source_of(ip("127.0.0.2")), ip("127.0.0.2"));
        assert_eq!(source_of(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2::ffff")),
            source_of(ip("2001:db8:1:2:1::"))
        );
        assert_ne!(source_of(ip("2001:db8:1:2::1")), source_of(ip("2001:db8:1:3::1")));
        assert_eq!(source_of(ip("::1")), ip("::"));
    }
}
