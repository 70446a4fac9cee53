//! The runtime: one per node. Owns the listener, the pools by peer name, the
//! inbound connections, the per-peer counters and every thread it started.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::connection::{run_watcher, Connection, Enqueued, OutFrame, WriterEnd};
use crate::error::OpenError;
use crate::failure_log::FailureLog;
use crate::faults::{self, Point};
use crate::host::{Callback, Event, Host};
use crate::listener::{bind, keep_accepting};
use crate::pool::{dial, Pool};
use crate::stats::{ConnStats, PeerStats, PeerStatsSnapshot};
use crate::thread_priority::IoThreadPriority;

enum PoolSlot {
    /// Dialing; these callers hear how it ends.
    Opening(Vec<Callback<Result<(), OpenError>>>),
    Up(Arc<Pool>),
}

impl PoolSlot {
    /// The pool, if it is up and not closing: a closing pool's connections are shut down
    /// (its threads finishing), so it is as good as gone.
    fn live(&self) -> Option<&Arc<Pool>> {
        match self {
            PoolSlot::Up(pool) if !pool.is_closing() => Some(pool),
            _ => None,
        }
    }
}

/// Which pool of which runtime a connection belongs to: the runtime's random
/// incarnation and a per-runtime pool counter.
pub type PoolToken = [u8; POOL_TOKEN_LEN];
pub const POOL_TOKEN_LEN: usize = 16;

/// The inbound connections of one peer, all from its latest pool.
struct InboundPool {
    token: PoolToken,
    /// By id (they grow in join order): the stale flag, a handle to shut the socket down,
    /// the counters.
    members: HashMap<u64, (Arc<AtomicBool>, TcpStream, Arc<ConnStats>)>,
}

/// The listener's side: what arrives before anyone is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStats {
    /// Inbound handshakes that failed (bad cookie, garbage, timeout, ...), and connections
    /// closed at accept because the pending-handshake caps were reached.
    pub handshake_failures: u64,
    /// Handshakes in progress now.
    pub pending_handshakes: u64,
    /// Sockets accepted and not closed (in a handshake or authenticated), plus our own
    /// dials while their handshake runs.
    pub inbound_connections: u64,
    /// Accepts that failed (out of descriptors or memory); each is followed by a pause.
    pub accept_errors: u64,
}

pub(crate) struct Shared {
    pub handshake_failures_in: AtomicU64,
    /// Which of those become events (log lines).
    pub handshake_failure_log: FailureLog,
    pub accept_errors: AtomicU64,
    /// Random per runtime, so a restarted node's pools are told from the old ones.
    incarnation: u64,
    next_pool_epoch: AtomicU64,
    inbound_pools: Mutex<HashMap<String, InboundPool>>,
    pub config: Config,
    pub host: Arc<dyn Host>,
    pools: RwLock<HashMap<String, PoolSlot>>,
    stats: Mutex<HashMap<String, Arc<PeerStats>>>,
    /// Sockets not yet owned by a pool (inbound ones, dials in progress), so
    /// `stop` can shut them down instead of waiting out a handshake.
    open_sockets: Mutex<HashMap<u64, TcpStream>>,
    next_socket_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
    pub pending_handshakes: AtomicUsize,
    /// Handshakes in progress by source (see `listener::HandshakeSlot`).
    pub pending_by_source: Mutex<HashMap<IpAddr, usize>>,
}

pub struct Runtime {
    shared: Arc<Shared>,
    listener: TcpListener,
    local_addr: SocketAddr,
}

#[derive(Debug, PartialEq, Eq)]
pub enum OpenStatus {
    /// Dialing started (or joined a dial already under way); the callback will run
    /// (already has, with an error, if the dial thread could not start).
    Opening,
    /// Already up; the callback was dropped without running.
    AlreadyUp,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// No pool is up for that peer: open one first.
    NotConnected,
    /// Larger than `max_frame_bytes`.
    TooLarge,
    /// The connection's queue is over its limit (only from `send_on` with `nosuspend`).
    Busy,
}

/// A frame was queued; `OverLimit` carries the connection to wait on.
pub enum Sent {
    Queued,
    OverLimit(Arc<Connection>),
}

impl Runtime {
    pub fn start(config: Config, host: Arc<dyn Host>) -> io::Result<Runtime> {
        if config.io_thread_priority != IoThreadPriority::Normal && !cfg!(target_os = "linux") {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_thread_priority other than normal needs Linux",
            ));
        }
        let listener = bind(config.listen)?;
        let local_addr = listener.local_addr()?;
        let mut incarnation = [0u8; 8];
        getrandom::getrandom(&mut incarnation).map_err(|e| io::Error::other(e.to_string()))?;
        let shared = Arc::new(Shared {
            incarnation: u64::from_ne_bytes(incarnation),
            handshake_failures_in: AtomicU64::new(0),
            handshake_failure_log: FailureLog::default(),
            accept_errors: AtomicU64::new(0),
            next_pool_epoch: AtomicU64::new(1),
            inbound_pools: Mutex::new(HashMap::new()),
            config,
            host,
            pools: RwLock::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            open_sockets: Mutex::new(HashMap::new()),
            next_socket_id: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            pending_handshakes: AtomicUsize::new(0),
            pending_by_source: Mutex::new(HashMap::new()),
        });
        let acceptor_shared = shared.clone();
        let acceptor_listener = listener.try_clone()?;
        let acceptor = format!("teleport-acceptor-{}", shared.config.local_node);
        let thread = acceptor.clone();
        let started = shared.spawn(acceptor, move || {
            keep_accepting(&acceptor_shared, &acceptor_listener, &thread)
        });
        if !started {
            return Err(io::Error::other("could not start the acceptor thread"));
        }
        Ok(Runtime {
            shared,
            listener,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Opens the pool to `peer` in the background unless it is up; exactly one dial
    /// happens however many callers ask at once, and every caller hears its outcome.
    pub fn open_pool(
        &self,
        peer: &str,
        addr: SocketAddr,
        size: usize,
        done: Callback<Result<(), OpenError>>,
    ) -> OpenStatus {
        let shared = &self.shared;
        {
            let mut pools = shared.pools.write().unwrap_or_else(|p| p.into_inner());
            match pools.get_mut(peer) {
                Some(slot) if slot.live().is_some() => return OpenStatus::AlreadyUp,
                // Closing: replace it.
                Some(PoolSlot::Up(_)) => {
                    pools.insert(peer.to_string(), PoolSlot::Opening(vec![done]));
                }
                Some(PoolSlot::Opening(waiting)) => {
                    waiting.push(done);
                    return OpenStatus::Opening;
                }
                None => {
                    pools.insert(peer.to_string(), PoolSlot::Opening(vec![done]));
                }
            }
        }
        let open = PendingOpen {
            shared: shared.clone(),
            peer: peer.to_string(),
            outcome: None,
        };
        // If the thread cannot start, dropping `open` fails the callers now.
        let _ = shared.spawn(format!("teleport-dial-{peer}"), move || {
            open.run(addr, size.max(1))
        });
        OpenStatus::Opening
    }

    /// Queues a frame on the connection `key` picks in `peer`'s pool.
    pub fn send(&self, peer: &str, key: u64, frame: OutFrame) -> Result<Sent, SendError> {
        let conn = self.connection(peer, key).ok_or(SendError::NotConnected)?;
        self.send_on(conn, frame, false)
    }

    /// The connection `key` picks in `peer`'s pool, if it is up: looked up before a
    /// message is encoded, so a message for a node not connected yet is not encoded twice.
    /// A closing pool is not up: a frame queued on it would only be counted as dropped,
    /// while `NotConnected` tells the sender, which can open a new pool.
    pub fn connection(&self, peer: &str, key: u64) -> Option<Arc<Connection>> {
        let pools = self.shared.pools.read().unwrap_or_else(|p| p.into_inner());
        let pool = pools.get(peer)?.live()?;
        Some(pool.connection(key).clone())
    }

    /// Queues a frame on `conn` (from `connection`); with `nosuspend`, refuses
    /// (`SendError::Busy`) instead of queueing past the limit.
    pub fn send_on(
        &self,
        conn: Arc<Connection>,
        frame: OutFrame,
        nosuspend: bool,
    ) -> Result<Sent, SendError> {
        if frame.body_len() > self.shared.config.max_frame_bytes as usize {
            return Err(SendError::TooLarge);
        }
        if nosuspend && conn.is_over_limit() {
            return Err(SendError::Busy);
        }
        match conn.enqueue(frame) {
            Ok(Enqueued::Ok) => Ok(Sent::Queued),
            Ok(Enqueued::OverLimit) if nosuspend => Ok(Sent::Queued),
            Ok(Enqueued::OverLimit) => Ok(Sent::OverLimit(conn)),
            Err(_) => Err(SendError::NotConnected),
        }
    }

    /// Closes the pool to `peer`, if any. Frames still queued are counted as dropped.
    pub fn close_pool(&self, peer: &str, reason: &str) -> bool {
        let pool = {
            let pools = self.shared.pools.read().unwrap_or_else(|p| p.into_inner());
            match pools.get(peer) {
                Some(PoolSlot::Up(pool)) => pool.clone(),
                _ => return false,
            }
        };
        self.shared.close_pool(&pool, reason);
        true
    }

    /// Peers whose pool is up.
    pub fn peers(&self) -> Vec<String> {
        let pools = self.shared.pools.read().unwrap_or_else(|p| p.into_inner());
        pools
            .iter()
            .filter(|(_, slot)| slot.live().is_some())
            .map(|(peer, _)| peer.clone())
            .collect()
    }

    /// Every peer we ever exchanged with, with its counters, its pool's gauges and
    /// every live connection's counters. Takes each lock once, whatever the number of peers.
    pub fn stats(&self) -> Vec<(String, PeerStatsSnapshot)> {
        let shared = &self.shared;
        let pools = shared.pools.read().unwrap_or_else(|p| p.into_inner());
        let stats = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        let inbound = shared.inbound_pools.lock().unwrap_or_else(|p| p.into_inner());
        stats
            .iter()
            .map(|(peer, counters)| {
                let mut snapshot = counters.snapshot();
                if let Some(pool) = pools.get(peer).and_then(PoolSlot::live) {
                    snapshot.connections = pool.size() as u64;
                    snapshot.queued_bytes = pool.queued_bytes() as u64;
                    snapshot.per_connection = pool.connection_stats();
                }
                if let Some(pool) = inbound.get(peer) {
                    let mut members: Vec<_> = pool.members.iter().collect();
                    members.sort_unstable_by_key(|(id, _)| **id);
                    snapshot
                        .per_connection
                        .extend(members.iter().map(|(_, (_, _, conn))| conn.snapshot_inbound()));
                }
                (peer.clone(), snapshot)
            })
            .collect()
    }

    /// How often `peer`'s pool has opened, and how often it has closed: a frame queued
    /// on it is lost with its connection only if the second number changes.
    pub fn pool_changes(&self, peer: &str) -> (u64, u64) {
        let stats = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats
            .get(peer)
            .map_or((0, 0), |s| (s.connects.load(SeqCst), s.disconnects.load(SeqCst)))
    }

    pub fn listener_stats(&self) -> ListenerStats {
        let shared = &self.shared;
        ListenerStats {
            handshake_failures: shared.handshake_failures_in.load(SeqCst),
            pending_handshakes: shared.pending_handshakes.load(SeqCst) as u64,
            inbound_connections: shared
                .open_sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len() as u64,
            accept_errors: shared.accept_errors.load(SeqCst),
        }
    }

    /// Closes the listener and every connection and joins every thread.
    pub fn stop(&self) {
        let shared = &self.shared;
        shared.stopping.store(true, SeqCst);
        let _ = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Both);
        // Threads may start more threads and pools (a dial finishing): repeat until none are left.
        loop {
            for pool in shared.up_pools() {
                shared.close_pool(&pool, "teleport stopping");
            }
            for stream in shared
                .open_sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
            {
                let _ = stream.shutdown(Shutdown::Both);
            }
            let threads: Vec<JoinHandle<()>> =
                std::mem::take(&mut *shared.threads.lock().unwrap_or_else(|p| p.into_inner()));
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }

    /// Threads started and not yet joined (for tests that check nothing leaks).
    pub fn live_threads(&self) -> usize {
        let threads = self.shared.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads.iter().filter(|t| !t.is_finished()).count()
    }
}

impl Shared {
    fn up_pools(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools
            .values()
            .filter_map(|slot| match slot {
                PoolSlot::Up(pool) => Some(pool.clone()),
                PoolSlot::Opening(_) => None,
            })
            .collect()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(SeqCst)
    }

    /// Sleeps `pause`, in short steps so that `stop` never waits long for the sleeper.
    pub(crate) fn sleep_unless_stopping(&self, pause: Duration) {
        const STEP: Duration = Duration::from_millis(20);
        let deadline = Instant::now() + pause;
        while !self.is_stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(STEP));
        }
    }

    /// For the threads that copy frames (writers, inbound readers). Lowering one's own
    /// priority is always allowed; where it is not supported the setting was refused
    /// at start (`Runtime::start`), so a failure here leaves the thread as it was.
    pub(crate) fn apply_io_thread_priority(&self) {
        let _ = crate::thread_priority::apply_to_current_thread(self.config.io_thread_priority);
    }

    /// Starts a thread whose panics are caught and reported, never reaching the VM.
    /// Returns false (reported as a panic) if the thread could not start; `body` has then
    /// been dropped, so whatever it owns that cleans up on drop has cleaned up.
    pub fn spawn(self: &Arc<Self>, name: String, body: impl FnOnce() + Send + 'static) -> bool {
        let shared = self.clone();
        let thread_name = name.clone();
        let run = move || {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(body)) {
                shared.report_panic(&thread_name, &*panic);
            }
        };
        let spawned = if faults::spawn_fails(&name) {
            drop(run);
            Err(io::Error::other("injected fault"))
        } else {
            std::thread::Builder::new()
                .name(name.chars().take(15).collect())
                .spawn(run)
        };
        match spawned {
            Ok(handle) => {
                let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
                true
            }
            Err(e) => {
                self.host.event(Event::Panic {
                    thread: name,
                    message: format!("could not start the thread: {e}"),
                });
                false
            }
        }
    }

    pub(crate) fn report_panic(&self, thread: &str, panic: &(dyn Any + Send)) {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".to_string());
        self.host.event(Event::Panic {
            thread: thread.to_string(),
            message,
        });
    }

    pub fn peer_stats(&self, peer: &str) -> Arc<PeerStats> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.entry(peer.to_string()).or_default().clone()
    }

    /// The token every connection of a new pool announces first.
    pub fn new_pool_token(&self) -> PoolToken {
        let epoch = self.next_pool_epoch.fetch_add(1, SeqCst);
        let mut token = [0u8; POOL_TOKEN_LEN];
        token[..8].copy_from_slice(&self.incarnation.to_be_bytes());
        token[8..].copy_from_slice(&epoch.to_be_bytes());
        token
    }

    /// Registers an inbound connection under its pool's token. A token other than the
    /// peer's current one is a newer pool (a sender opens a pool only once its previous
    /// one is closed): every connection of the older pool is marked stale and shut down,
    /// so bytes it still holds (a partition, a slow close) are never delivered after the
    /// new pool's. `None` if this connection's own pool was already superseded.
    pub fn join_inbound_pool(
        &self,
        peer: &str,
        token: PoolToken,
        stream: &TcpStream,
        counters: Arc<ConnStats>,
    ) -> Option<InboundMembership<'_>> {
        let clone = stream.try_clone().ok()?;
        let stale = Arc::new(AtomicBool::new(false));
        let id = self.next_socket_id.fetch_add(1, SeqCst);
        let mut pools = self.inbound_pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools.entry(peer.to_string()).or_insert_with(|| InboundPool {
            token,
            members: HashMap::new(),
        });
        if pool.token != token {
            if pool.members.is_empty() || token > pool.token || token[..8] != pool.token[..8] {
                for (old, socket, _) in pool.members.values() {
                    old.store(true, SeqCst);
                    let _ = socket.shutdown(Shutdown::Both);
                }
                pool.members.clear();
                pool.token = token;
            } else {
                return None; // an older pool of the same runtime, arriving late
            }
        }
        pool.members.insert(id, (stale.clone(), clone, counters));
        Some(InboundMembership {
            shared: self,
            peer: peer.to_string(),
            id,
            stale,
        })
    }

    /// Keeps a clone of `stream` where `stop` will shut it down, until the guard drops.
    /// `None` when stopping: the caller should give up on the socket.
    pub fn track_socket(&self, stream: &TcpStream) -> Option<TrackedSocket<'_>> {
        let clone = stream.try_clone().ok()?;
        let id = self.next_socket_id.fetch_add(1, SeqCst);
        let mut sockets = self.open_sockets.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `stop` takes, so no socket slips past it.
        if self.is_stopping() {
            return None;
        }
        sockets.insert(id, clone);
        Some(TrackedSocket { shared: self, id })
    }

    /// Turns dialed sockets into a running pool: starts its threads, then makes it the
    /// peer's pool. A pool whose threads could not all start, or that closed while they
    /// started, is never announced: the dial fails instead.
    fn start_pool(self: &Arc<Self>, peer: &str, dialed: crate::pool::Dialed) -> Result<(), OpenError> {
        let stats = self.peer_stats(peer);
        let (pool, started) = Pool::new(
            peer,
            dialed,
            self.config.send_queue_bytes,
            self.config.io_chunk(),
            stats.clone(),
        )
        .map_err(|e| OpenError::io(&e))?;
        PeerStats::add(&stats.connects, 1);
        // Every connection's guards exist before any thread starts, so each one's writer
        // is counted out of the pool however far this gets.
        let threads: Vec<(Writer, Watcher)> = started
            .into_iter()
            .map(|(end, stream)| (Writer::new(self, &pool, end), Watcher::new(self, &pool, stream)))
            .collect();
        // Once a thread could not start, the pool is closing: the rest are not started,
        // and dropping their guards is their exit.
        for (index, (writer, watcher)) in threads.into_iter().enumerate() {
            if !pool.is_closing() {
                let _ = self.spawn(format!("teleport-w{index}-{peer}"), move || writer.run());
            }
            if !pool.is_closing() {
                let _ = self.spawn(format!("teleport-r{index}-{peer}"), move || watcher.run());
            }
        }
        {
            let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
            // Checked under the lock `close_pool` takes to remove a pool, so a pool closing
            // from now on finds itself in the map.
            if pool.is_closing() || self.is_stopping() {
                drop(pools);
                self.close_pool(&pool, "teleport stopping");
                return Err(OpenError::Closed(pool.close_reason()));
            }
            let waiting = match pools.insert(peer.to_string(), PoolSlot::Up(pool.clone())) {
                Some(PoolSlot::Opening(waiting)) => waiting,
                _ => Vec::new(),
            };
            drop(pools);
            for done in waiting {
                done(Ok(()));
            }
        }
        self.host.event(Event::PoolUp {
            peer: peer.to_string(),
            connections: pool.size(),
        });
        Ok(())
    }

    /// Runs the callers' callbacks for a dial that failed (success ran them in `start_pool`).
    fn finish_open(&self, peer: &str, outcome: Result<(), OpenError>) {
        let Err(reason) = outcome else { return };
        let waiting = {
            let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
            match pools.remove(peer) {
                Some(PoolSlot::Opening(waiting)) => waiting,
                Some(up) => {
                    pools.insert(peer.to_string(), up);
                    Vec::new()
                }
                None => Vec::new(),
            }
        };
        for done in waiting {
            done(Err(reason.clone()));
        }
    }

    pub(crate) fn close_pool(&self, pool: &Arc<Pool>, reason: &str) {
        if !pool.begin_close(reason) {
            return;
        }
        PeerStats::add(&pool.stats.disconnects, 1);
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        if matches!(pools.get(&pool.peer), Some(PoolSlot::Up(current)) if Arc::ptr_eq(current, pool)) {
            pools.remove(&pool.peer);
        }
    }
}

/// Why a thread that owns some cleanup ended without saying: it panicked (the guard
/// drops while unwinding) or it never started (its body was dropped unrun).
pub(crate) fn ended_early(thread: &str) -> String {
    if std::thread::panicking() {
        format!("the {thread} thread panicked")
    } else {
        format!("the {thread} thread could not start")
    }
}

/// A dial's callers hear how it ended however its thread ends: dropping this fails the
/// `Opening` slot unless the dial finished.
struct PendingOpen {
    shared: Arc<Shared>,
    peer: String,
    outcome: Option<Result<(), OpenError>>,
}

impl PendingOpen {
    fn run(mut self, addr: SocketAddr, size: usize) {
        faults::check(Point::Dial, &self.peer);
        let shared = &self.shared;
        let outcome = if shared.is_stopping() {
            Err(OpenError::Stopping)
        } else {
            dial(shared, &self.peer, addr, size).and_then(|dialed| shared.start_pool(&self.peer, dialed))
        };
        // `stop` shuts the dial's sockets down: whatever that broke, the cause is the stop.
        self.outcome = Some(match outcome {
            Err(_) if shared.is_stopping() => Err(OpenError::Stopping),
            outcome => outcome,
        });
    }
}

impl Drop for PendingOpen {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Err(OpenError::Internal(ended_early("dial"))));
        self.shared.finish_open(&self.peer, outcome);
    }
}

/// A writer thread's charge. However the writer ends (returns, panics, never starts),
/// dropping this closes its connection and the pool, counts the frames it never wrote,
/// wakes the senders waiting on it, and lets the pool's last writer report `PoolDown`.
struct Writer {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    end: WriterEnd,
    reason: Option<String>,
}

impl Writer {
    fn new(shared: &Arc<Shared>, pool: &Arc<Pool>, end: WriterEnd) -> Writer {
        Writer {
            shared: shared.clone(),
            pool: pool.clone(),
            end,
            reason: None,
        }
    }

    fn run(mut self) {
        self.shared.apply_io_thread_priority();
        self.reason = Some(self.end.write_until_closed(&self.pool.peer));
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or_else(|| ended_early("writer"));
        let dropped = self.end.close();
        self.shared.close_pool(&self.pool, &reason);
        if let Some((reason, dropped)) = self.pool.writer_exited(dropped) {
            self.shared.host.event(Event::PoolDown {
                peer: self.pool.peer.clone(),
                reason,
                dropped_messages: dropped,
            });
        }
    }
}

/// A watcher thread's charge: however it ends, dropping this closes the pool.
struct Watcher {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    stream: TcpStream,
    reason: Option<String>,
}

impl Watcher {
    fn new(shared: &Arc<Shared>, pool: &Arc<Pool>, stream: TcpStream) -> Watcher {
        Watcher {
            shared: shared.clone(),
            pool: pool.clone(),
            stream,
            reason: None,
        }
    }

    fn run(mut self) {
        faults::check(Point::Watcher, &self.pool.peer);
        self.reason = Some(run_watcher(&self.stream));
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or_else(|| ended_early("watcher"));
        self.shared.close_pool(&self.pool, &reason);
    }
}

/// A socket `stop` can reach; unregistered on drop.
pub(crate) struct TrackedSocket<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for TrackedSocket<'_> {
    fn drop(&mut self) {
        let mut sockets = self.shared.open_sockets.lock().unwrap_or_else(|p| p.into_inner());
        sockets.remove(&self.id);
    }
}

/// An inbound connection's place in its peer's current pool; leaves it on drop.
pub(crate) struct InboundMembership<'a> {
    shared: &'a Shared,
    peer: String,
    id: u64,
    stale: Arc<AtomicBool>,
}

impl InboundMembership<'_> {
    pub fn is_stale(&self) -> bool {
        self.stale.load(SeqCst)
    }
}

impl Drop for InboundMembership<'_> {
    fn drop(&mut self) {
        let mut pools = self
            .shared
            .inbound_pools
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get_mut(&self.peer) {
            pool.members.remove(&self.id);
        }
    }
}
