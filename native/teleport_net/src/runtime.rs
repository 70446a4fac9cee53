//! The runtime: one per node, the face the NIF (or a test) talks to. It starts the
//! listener and the I/O engine, opens and closes pools, queues frames on them, and
//! reads the counters. What it holds, each part is owned by its module: the engine
//! (engine/), the outbound pools (pool.rs), the inbound pools (inbound.rs), the
//! listener's state (listener.rs), the counters (stats.rs).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use crate::config::Config;
use crate::engine::{Engine, Services};
use crate::error::{CloseReason, OpenError};
use crate::framing::{FrameBody, FrameKind};
use crate::host::{Callback, Host};
use crate::pool::{Opened, Pool};
use crate::send_queue::{Enqueued, OutFrame, SendQueue};
use crate::socket::bind;
use crate::stats::PeerStatsSnapshot;
use crate::thread_priority::IoThreadPriority;

pub use crate::pool::{PoolToken, POOL_TOKEN_LEN};

/// The listener's side: what arrives before anyone is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStats {
    /// Inbound handshakes that failed (bad cookie, garbage, timeout, ...), and connections
    /// closed at accept: over the pending-handshake caps, or throttled.
    pub handshake_failures: u64,
    /// Connections closed at accept because their source had failed more handshakes
    /// than `max_handshake_failures_per_ip` allows (also in `handshake_failures`).
    pub throttled_handshakes: u64,
    /// Handshakes in progress now.
    pub pending_handshakes: u64,
    /// Sockets accepted and not closed (in a handshake or authenticated), plus our own
    /// dials while their handshake runs.
    pub inbound_connections: u64,
    /// Accepts that failed (out of descriptors or memory); each is followed by a pause.
    pub accept_errors: u64,
}

pub struct Runtime {
    services: Arc<Services>,
    engine: Engine,
    local_addr: SocketAddr,
}

#[derive(Debug, PartialEq, Eq)]
pub enum OpenStatus {
    /// Dialing started (or joined a dial already under way); the callback will run.
    Opening,
    /// Already up; the callback was dropped without running.
    AlreadyUp,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// No pool is up for that peer: open one first.
    NotConnected,
    /// Larger than `max_frame_bytes` (from `Runtime::frame`).
    TooLarge,
    /// The connection's queue is over its limit (only from `send_on` with `nosuspend`).
    Busy,
}

/// A frame was queued; `OverLimit` carries the connection to wait on.
pub enum Sent {
    Queued,
    OverLimit(Arc<SendQueue>),
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
        let io_threads = config.io_threads;
        let services = Arc::new(Services::new(config, host)?);
        let engine = Engine::start(&services, io_threads, listener)?;
        Ok(Runtime {
            services,
            engine,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn config(&self) -> &Config {
        &self.services.config
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
        let services = &self.services;
        let new_pool = || {
            let token = services.new_pool_token();
            Pool::new(peer, addr, size.max(1), token, services.stats.of(peer))
        };
        match services.pools.open(peer, new_pool, done) {
            Opened::AlreadyUp => OpenStatus::AlreadyUp,
            Opened::Joined => OpenStatus::Opening,
            Opened::Dial(pool) => {
                if services.is_stopping() {
                    services
                        .pools
                        .close(&pool, CloseReason::Stopping, Some(OpenError::Stopping));
                } else {
                    self.engine.dial(services, &pool);
                }
                OpenStatus::Opening
            }
        }
    }

    /// Queues a frame on the connection `key` picks in `peer`'s pool.
    pub fn send(&self, peer: &str, key: u64, frame: OutFrame) -> Result<Sent, SendError> {
        let conn = self.connection(peer, key).ok_or(SendError::NotConnected)?;
        self.send_on(conn, key, frame, false)
    }

    /// The connection `key` picks in `peer`'s pool, if it is up: looked up before a
    /// message is encoded, so a message for a node not connected yet is not encoded twice.
    /// A closing pool is not up: a frame queued on it would only be counted as dropped,
    /// while `NotConnected` tells the sender, which can open a new pool.
    pub fn connection(&self, peer: &str, key: u64) -> Option<Arc<SendQueue>> {
        self.services.pools.connection(peer, key)
    }

    /// A frame of `body` for `send` or `send_on`; `TooLarge` over `max_frame_bytes`
    /// (the size check frames get: `framing::check_body_len`).
    pub fn frame(&self, kind: FrameKind, body: Box<dyn FrameBody>) -> Result<OutFrame, SendError> {
        OutFrame::new(kind, body, self.services.config.max_frame_bytes).map_err(|_| SendError::TooLarge)
    }

    /// Queues a frame (from `frame`) of the sender `key` on `conn` (from `connection`);
    /// with `nosuspend`, refuses (`SendError::Busy`) instead of queueing past the limit.
    pub fn send_on(
        &self,
        conn: Arc<SendQueue>,
        key: u64,
        frame: OutFrame,
        nosuspend: bool,
    ) -> Result<Sent, SendError> {
        if nosuspend && conn.is_over_limit(key) {
            return Err(SendError::Busy);
        }
        match conn.enqueue(frame, key) {
            Ok(Enqueued::Ok) => Ok(Sent::Queued),
            Ok(Enqueued::OverLimit) if nosuspend => Ok(Sent::Queued),
            Ok(Enqueued::OverLimit) => Ok(Sent::OverLimit(conn)),
            Err(_) => Err(SendError::NotConnected),
        }
    }

    /// The token of our pool to `peer` (dialing or up), which its connections announce.
    pub fn pool_token(&self, peer: &str) -> Option<PoolToken> {
        self.services.pools.token(peer)
    }

    /// Closes the pool to `peer`, if any. Frames still queued are counted as dropped.
    pub fn close_pool(&self, peer: &str) -> bool {
        let Some(pool) = self.services.pools.live(peer) else {
            return false;
        };
        self.services.pools.close(&pool, CloseReason::Closed, None);
        true
    }

    /// Peers whose pool is up.
    pub fn peers(&self) -> Vec<String> {
        self.services.pools.peers()
    }

    /// Every peer we ever exchanged with, with its counters, its pool's gauges and
    /// every live connection's counters.
    pub fn stats(&self) -> Vec<(String, PeerStatsSnapshot)> {
        let services = &self.services;
        let mut inbound = services.inbound.snapshots();
        services
            .stats
            .all()
            .into_iter()
            .map(|(peer, counters)| {
                let mut snapshot = counters.snapshot();
                if let Some(pool) = services.pools.live(&peer) {
                    snapshot.connections = pool.size() as u64;
                    snapshot.queued_bytes = pool.queued_bytes() as u64;
                    snapshot.per_connection = pool.connection_stats();
                }
                if let Some(conns) = inbound.remove(&peer) {
                    snapshot.partial_bytes = conns
                        .iter()
                        .map(|c| match c.direction {
                            crate::stats::ConnDirection::Inbound { partial_bytes, .. } => partial_bytes,
                            _ => 0,
                        })
                        .sum();
                    snapshot.per_connection.extend(conns);
                }
                (peer, snapshot)
            })
            .collect()
    }

    /// How often `peer`'s pool has opened, and how often it has closed: a frame queued
    /// on it is lost with its connection only if the second number changes.
    pub fn pool_changes(&self, peer: &str) -> (u64, u64) {
        self.services
            .stats
            .get(peer)
            .map_or((0, 0), |s| (s.connects.load(SeqCst), s.disconnects.load(SeqCst)))
    }

    pub fn listener_stats(&self) -> ListenerStats {
        let listener = &self.services.listener;
        ListenerStats {
            handshake_failures: listener.handshake_failures.load(SeqCst),
            throttled_handshakes: listener.throttled_handshakes.load(SeqCst),
            pending_handshakes: listener.pending_handshakes() as u64,
            inbound_connections: listener.open_sockets.load(SeqCst),
            accept_errors: listener.accept_errors.load(SeqCst),
        }
    }

    /// Closes the listener and every connection and joins every thread.
    pub fn stop(&self) {
        let services = &self.services;
        services.set_stopping();
        for pool in services.pools.all() {
            services
                .pools
                .close(&pool, CloseReason::Stopping, Some(OpenError::Stopping));
        }
        self.engine.stop();
    }

    /// I/O threads running (for tests that check nothing leaks).
    pub fn live_threads(&self) -> usize {
        self.engine.live_threads()
    }
}
