//! Fault injection, for tests only: make the next spawns of some threads fail, the
//! next runs of some thread bodies panic or pause, or the next accepts fail, to check
//! that no pool, dial or counter is left stuck.
//!
//! Built with the `test-hooks` feature (the crate's own tests turn it on); without it
//! every check is an empty inline function and nothing can be armed.
//!
//! The state is process-global and tests run in parallel, so every fault names its
//! target (a peer, a node, a thread-name prefix) and only touches that one. With nothing
//! armed, a check is one relaxed atomic load.

use std::io;
use std::time::Duration;

/// Where the engine checks for an injected panic, and what `subject` it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// A connection's dial, as its I/O thread takes it; subject: the peer dialed.
    Dial,
    /// Each flush of an outbound connection; subject: the peer written to.
    Writer,
    /// An outbound connection as its handshake completes; subject: the peer.
    Watcher,
    /// An inbound connection, once it joined its peer's inbound pool; subject: the peer.
    Reader,
    /// An accepted connection, before its handshake (a delay postpones the handshake
    /// without holding the thread); subject: this node's name.
    Handshake,
    /// The acceptor, for each connection it accepts; subject: this node's name.
    Acceptor,
}

#[cfg(feature = "test-hooks")]
mod armed {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::Mutex;

    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Spawn,
        Panic(Point),
        Delay(Point, Duration),
        Accept,
    }

    struct Fault {
        kind: Kind,
        target: String,
        left: usize,
    }

    /// How many faults are armed: lets the checks skip the lock.
    static ARMED: AtomicUsize = AtomicUsize::new(0);
    static FAULTS: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

    /// The next `n` threads whose name starts with `name_prefix` fail to start (names:
    /// `teleport-io<i>-<node>`, the engine's I/O threads).
    pub fn fail_next_spawns(name_prefix: &str, n: usize) {
        arm(Kind::Spawn, name_prefix, n);
    }

    /// The next `n` times a thread reaches `point` for `subject`, it panics.
    pub fn panic_next(point: Point, subject: &str, n: usize) {
        arm(Kind::Panic(point), subject, n);
    }

    /// The next `n` times a thread reaches `point` for `subject`, it sleeps `delay` first
    /// (a slow peer: at `Point::Handshake`, each inbound handshake starts that much later).
    pub fn delay_next(point: Point, subject: &str, n: usize, delay: Duration) {
        arm(Kind::Delay(point, delay), subject, n);
    }

    /// The next `n` accepts of node `node`'s listener fail with EMFILE (out of descriptors)
    /// before calling `accept`, so the connections wait in the backlog as they would.
    pub fn fail_next_accepts(node: &str, n: usize) {
        arm(Kind::Accept, node, n);
    }

    fn arm(kind: Kind, target: &str, n: usize) {
        if n == 0 {
            return;
        }
        let mut faults = FAULTS.lock().unwrap_or_else(|p| p.into_inner());
        faults.push(Fault {
            kind,
            target: target.to_string(),
            left: n,
        });
        ARMED.store(faults.len(), Relaxed);
    }

    /// Uses up one armed fault that `matches`, if any, and gives its kind.
    fn take(matches: impl Fn(&Fault) -> bool) -> Option<Kind> {
        if ARMED.load(Relaxed) == 0 {
            return None;
        }
        let mut faults = FAULTS.lock().unwrap_or_else(|p| p.into_inner());
        let index = faults.iter().position(matches)?;
        let kind = faults[index].kind;
        faults[index].left -= 1;
        if faults[index].left == 0 {
            faults.remove(index);
        }
        ARMED.store(faults.len(), Relaxed);
        Some(kind)
    }

    /// Whether the thread about to be started as `name` must fail to start.
    pub(crate) fn spawn_fails(name: &str) -> bool {
        take(|f| f.kind == Kind::Spawn && name.starts_with(&f.target)).is_some()
    }

    /// Panics if a panic is armed at `point` for `subject`; sleeps if a delay is.
    pub(crate) fn check(point: Point, subject: &str) {
        let at_point = |f: &Fault| match f.kind {
            Kind::Panic(p) | Kind::Delay(p, _) => p == point && f.target == subject,
            _ => false,
        };
        match take(at_point) {
            Some(Kind::Panic(_)) => panic!("injected fault: {point:?} for {subject}"),
            Some(Kind::Delay(_, delay)) => std::thread::sleep(delay),
            _ => {}
        }
    }

    /// Like `check`, but an armed delay is returned for the caller to wait out without
    /// blocking its thread (an I/O thread serves other connections meanwhile).
    pub(crate) fn delay(point: Point, subject: &str) -> Option<Duration> {
        let at_point = |f: &Fault| match f.kind {
            Kind::Panic(p) | Kind::Delay(p, _) => p == point && f.target == subject,
            _ => false,
        };
        match take(at_point) {
            Some(Kind::Panic(_)) => panic!("injected fault: {point:?} for {subject}"),
            Some(Kind::Delay(_, delay)) => Some(delay),
            _ => None,
        }
    }

    /// The error an injected accept failure gives, if one is armed for `node`.
    pub(crate) fn accept_error(node: &str) -> Option<io::Error> {
        take(|f| f.kind == Kind::Accept && f.target == node)
            .map(|_| io::Error::from_raw_os_error(libc::EMFILE))
    }
}
#[cfg(feature = "test-hooks")]
pub(crate) use armed::{accept_error, check, delay, spawn_fails};
#[cfg(feature = "test-hooks")]
pub use armed::{delay_next, fail_next_accepts, fail_next_spawns, panic_next};

/// Without `test-hooks`: nothing is ever armed.
#[cfg(not(feature = "test-hooks"))]
mod unarmed {
    use super::*;

    #[inline(always)]
    pub(crate) fn spawn_fails(_name: &str) -> bool {
        false
    }

    #[inline(always)]
    pub(crate) fn check(_point: Point, _subject: &str) {}

    #[inline(always)]
    pub(crate) fn delay(_point: Point, _subject: &str) -> Option<Duration> {
        None
    }

    #[inline(always)]
    pub(crate) fn accept_error(_node: &str) -> Option<io::Error> {
        None
    }
}
#[cfg(not(feature = "test-hooks"))]
pub(crate) use unarmed::{accept_error, check, delay, spawn_fails};

#[cfg(all(test, feature = "test-hooks"))]
mod tests {
    use super::*;

    #[test]
    fn faults_fire_for_their_target_only_and_as_many_times_as_armed() {
        fail_next_spawns("teleport-w0-faults-unit@", 2);
        assert!(!spawn_fails("teleport-w0-other@host"));
        assert!(spawn_fails("teleport-w0-faults-unit@host"));
        assert!(spawn_fails("teleport-w0-faults-unit@host"));
        assert!(!spawn_fails("teleport-w0-faults-unit@host"));

        panic_next(Point::Watcher, "faults-unit@host", 1);
        check(Point::Writer, "faults-unit@host");
        check(Point::Watcher, "faults-unit@other");
        let fired = std::panic::catch_unwind(|| check(Point::Watcher, "faults-unit@host"));
        assert!(fired.is_err());
        check(Point::Watcher, "faults-unit@host");

        fail_next_accepts("faults-unit@host", 1);
        assert!(accept_error("faults-unit@other").is_none());
        let error = accept_error("faults-unit@host").expect("armed");
        assert_eq!(error.raw_os_error(), Some(libc::EMFILE));
        assert!(accept_error("faults-unit@host").is_none());

        delay_next(Point::Reader, "faults-unit@host", 1, Duration::from_millis(20));
        let started = std::time::Instant::now();
        check(Point::Reader, "faults-unit@host");
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
