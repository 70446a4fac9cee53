//! The outbound pool to one peer node: N authenticated connections, each with
//! its own writer. A sender's key picks the connection, so one sender's frames
//! always share one queue and one socket and arrive in order.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use crate::connection::{Connection, WriterEnd};
use crate::error::OpenError;
use crate::framing::{encode_frame, FrameKind};
use crate::handshake::{client_handshake, HandshakeConfig};
use crate::runtime::Shared;
use crate::stats::{ConnStats, ConnStatsSnapshot, PeerStats};
use std::io::Write;

pub struct Pool {
    pub peer: String,
    connections: Vec<Arc<Connection>>,
    pub(crate) stats: Arc<PeerStats>,
    closing: AtomicBool,
    /// First reason given for closing; reported once every writer has stopped.
    close_reason: Mutex<Option<String>>,
    live_writers: AtomicUsize,
    dropped: AtomicU64,
}

/// Sockets that passed the handshake, not yet running.
pub(crate) struct Dialed {
    pub streams: Vec<TcpStream>,
}

/// At most this many connections of one pool connect and handshake at once. The peer
/// closes at accept what goes over its cap of handshakes per source
/// (`max_pending_handshakes_per_ip`, 8 by default), and other nodes on this host may be
/// dialing it too: half the default leaves them room. Never more than our own cap
/// either, which is usually the peer's (one configuration for the cluster).
const DIAL_PARALLELISM: usize = 4;

/// Opens `size` connections to `addr` and authenticates each, up to `DIAL_PARALLELISM`
/// at a time. All or nothing: after a failure no further connection is started, and
/// those made are closed. Blocking: run on a core thread.
pub(crate) fn dial(shared: &Shared, peer: &str, addr: SocketAddr, size: usize) -> Result<Dialed, OpenError> {
    let config = &shared.config;
    let handshake = HandshakeConfig {
        cookie: &config.cookie,
        local_node: &config.local_node,
        timeout: config.handshake_timeout,
    };
    let token = shared.new_pool_token();
    let announce = encode_frame(FrameKind::PoolEpoch, &token);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Mutex<Vec<Option<Result<TcpStream, OpenError>>>> =
        Mutex::new((0..size).map(|_| None).collect());
    // Each worker takes the next slot until none is left or one failed.
    let work = || loop {
        let index = next.fetch_add(1, SeqCst);
        if index >= size || failed.load(SeqCst) {
            return;
        }
        let result = dial_one(shared, peer, addr, &handshake, &announce);
        failed.fetch_or(result.is_err(), SeqCst);
        slots.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(result);
    };
    std::thread::scope(|scope| {
        let parallel = size
            .min(DIAL_PARALLELISM)
            .min(config.max_pending_handshakes_per_ip);
        for helper in 1..parallel {
            // A helper that cannot start leaves its share to the others; this thread is one.
            let _ = std::thread::Builder::new()
                .name(format!("teleport-dial{helper}"))
                .spawn_scoped(scope, work);
        }
        work();
    });
    let mut streams = Vec::with_capacity(size);
    for slot in slots.into_inner().unwrap_or_else(|p| p.into_inner()) {
        match slot {
            Some(Ok(stream)) => streams.push(stream),
            Some(Err(e)) => {
                // Once per dial, however many of its connections the peer refused.
                if let OpenError::Handshake { .. } = e {
                    PeerStats::add(&shared.peer_stats(peer).handshake_failures, 1);
                }
                return Err(e);
            }
            // Not dialed: another slot failed, and its error comes in its turn.
            None => {}
        }
    }
    Ok(Dialed { streams })
}

/// One connection of a pool: connected, authenticated, and its pool announced.
fn dial_one(
    shared: &Shared,
    peer: &str,
    addr: SocketAddr,
    handshake: &HandshakeConfig,
    announce: &[u8],
) -> Result<TcpStream, OpenError> {
    let stream = TcpStream::connect_timeout(&addr, shared.config.connect_timeout)
        .map_err(|e| OpenError::connect(&e))?;
    // Small frames (calls, acks) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    crate::listener::keep_alive(&stream);
    // Reachable by `stop` while the handshake runs.
    let _tracked = shared.track_socket(&stream).ok_or(OpenError::Stopping)?;
    client_handshake(&stream, handshake, peer).map_err(|e| OpenError::handshake(&e))?;
    (&stream).write_all(announce).map_err(|e| OpenError::io(&e))?;
    Ok(stream)
}

/// Per connection: its writing end, and the watcher's stream.
pub(crate) type Started = Vec<(WriterEnd, TcpStream)>;

impl Pool {
    pub(crate) fn new(
        peer: &str,
        dialed: Dialed,
        limit: usize,
        io_chunk: usize,
        stats: Arc<PeerStats>,
    ) -> std::io::Result<(Arc<Pool>, Started)> {
        let mut connections = Vec::new();
        let mut started = Vec::new();
        for stream in dialed.streams {
            let counters = ConnStats::new(&stream)?;
            let watcher = stream.try_clone()?;
            let (conn, writer) = Connection::new(
                stream.try_clone()?,
                stream,
                limit,
                io_chunk,
                stats.clone(),
                counters,
            );
            connections.push(conn);
            started.push((writer, watcher));
        }
        let pool = Arc::new(Pool {
            peer: peer.to_string(),
            live_writers: AtomicUsize::new(connections.len()),
            connections,
            stats,
            closing: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            dropped: AtomicU64::new(0),
        });
        Ok((pool, started))
    }

    /// The connection for a sender's key (e.g. a hash of its pid).
    pub fn connection(&self, key: u64) -> &Arc<Connection> {
        &self.connections[(key % self.connections.len() as u64) as usize]
    }

    pub fn size(&self) -> usize {
        self.connections.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.connections.iter().map(|c| c.queued_bytes()).sum()
    }

    /// Every connection's counters, in slot order.
    pub fn connection_stats(&self) -> Vec<ConnStatsSnapshot> {
        self.connections
            .iter()
            .enumerate()
            .map(|(index, conn)| conn.snapshot(index))
            .collect()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(SeqCst)
    }

    /// Starts closing; true for the first caller only. Losing one connection closes the
    /// whole pool, so a sender never sees its frames reordered over a replacement socket.
    pub(crate) fn begin_close(&self, reason: &str) -> bool {
        if self.closing.swap(true, SeqCst) {
            return false;
        }
        *self.close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        for conn in &self.connections {
            conn.shutdown();
        }
        true
    }

    /// The first reason given for closing.
    pub(crate) fn close_reason(&self) -> String {
        let reason = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
        reason.clone().unwrap_or_else(|| "closed".to_string())
    }

    /// Called once per connection as its writer exits (or fails to start); the last one
    /// gets the pool's final tally.
    pub(crate) fn writer_exited(&self, dropped: u64) -> Option<(String, u64)> {
        let total = self.dropped.fetch_add(dropped, SeqCst) + dropped;
        if self.live_writers.fetch_sub(1, SeqCst) != 1 {
            return None;
        }
        Some((self.close_reason(), total))
    }
}
