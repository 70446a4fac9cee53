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

/// Opens `size` connections to `addr` and authenticates each. Blocking: run on a core thread.
pub(crate) fn dial(shared: &Shared, peer: &str, addr: SocketAddr, size: usize) -> Result<Dialed, OpenError> {
    let config = &shared.config;
    let handshake = HandshakeConfig {
        cookie: &config.cookie,
        local_node: &config.local_node,
        timeout: config.handshake_timeout,
    };
    let token = shared.new_pool_token();
    let announce = encode_frame(FrameKind::PoolEpoch, &token);
    let mut streams = Vec::with_capacity(size);
    for _ in 0..size {
        let stream =
            TcpStream::connect_timeout(&addr, config.connect_timeout).map_err(|e| OpenError::connect(&e))?;
        // Small frames (calls, acks) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        crate::listener::keep_alive(&stream);
        // Reachable by `stop` while the handshake runs.
        let _tracked = shared.track_socket(&stream).ok_or(OpenError::Stopping)?;
        if let Err(e) = client_handshake(&stream, &handshake, peer) {
            PeerStats::add(&shared.peer_stats(peer).handshake_failures, 1);
            return Err(OpenError::handshake(&e));
        }
        (&stream).write_all(&announce).map_err(|e| OpenError::io(&e))?;
        streams.push(stream);
    }
    Ok(Dialed { streams })
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
