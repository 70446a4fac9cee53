//! Counters. Per peer: shared by the outbound pool and the inbound readers of one peer,
//! they outlive any one pool so `stats()` keeps its totals across reconnects. Per
//! connection: live only as long as their connection, bumped beside the peer's totals.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mio::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Default, Debug)]
pub struct PeerStats {
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Accepted by `send` but never written: the pool closed first.
    pub dropped_out: AtomicU64,
    /// Arrived intact but had no live destination.
    pub undeliverable_in: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// Our pools' handshakes with this peer that failed (wrong cookie, wrong node, timeout).
    pub handshake_failures: AtomicU64,
}

/// A plain copy of the counters plus the live pool's gauges.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct PeerStatsSnapshot {
    pub messages_out: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub dropped_out: u64,
    pub undeliverable_in: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub handshake_failures: u64,
    pub connections: u64,
    pub queued_bytes: u64,
    /// Held now for bulk bodies the peer has sent part of (one at most per connection).
    pub partial_bytes: u64,
    /// Every live connection with the peer: our pool's (by slot), then the peer's into us.
    pub per_connection: Vec<ConnStatsSnapshot>,
}

impl PeerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Frames written to the peer on `conn`.
    pub fn count_out(&self, conn: &ConnStats, messages: u64, bytes: u64) {
        Self::add(&self.messages_out, messages);
        Self::add(&self.bytes_out, bytes);
        Self::add(&conn.messages, messages);
        Self::add(&conn.bytes, bytes);
    }

    /// One frame read whole from the peer on `conn`.
    pub fn count_in(&self, conn: &ConnStats, bytes: u64) {
        Self::add(&self.messages_in, 1);
        Self::add(&self.bytes_in, bytes);
        Self::add(&conn.messages, 1);
        Self::add(&conn.bytes, bytes);
    }

    /// One arrival on `conn` with no live destination; returns the peer's new total.
    pub fn count_undeliverable(&self, conn: &ConnStats) -> u64 {
        Self::add(&conn.undeliverable, 1);
        self.undeliverable_in.fetch_add(1, Relaxed) + 1
    }

    pub fn snapshot(&self) -> PeerStatsSnapshot {
        PeerStatsSnapshot {
            messages_out: self.messages_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            dropped_out: self.dropped_out.load(Relaxed),
            undeliverable_in: self.undeliverable_in.load(Relaxed),
            connects: self.connects.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            handshake_failures: self.handshake_failures.load(Relaxed),
            connections: 0,
            queued_bytes: 0,
            partial_bytes: 0,
            per_connection: Vec::new(),
        }
    }
}

/// Every peer's counters, by node name; entries are never removed, so totals survive
/// reconnects.
#[derive(Default)]
pub(crate) struct PeerStatsTable {
    peers: Mutex<HashMap<String, Arc<PeerStats>>>,
}

/// Most peers (by name) whose counters are kept: a peer that makes up names (it knows
/// the cookie) cannot grow the table, or `stats()`, without bound.
pub const MAX_PEERS: usize = 4096;

impl PeerStatsTable {
    pub fn of(&self, peer: &str) -> Arc<PeerStats> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.entry(peer.to_string()).or_default().clone()
    }

    /// `peer`'s counters for a connection it opened to us, unless `MAX_PEERS` names are
    /// kept already: then the counters of peers `is_gone` says have nothing open make
    /// room, and if none does, `None` (the connection is refused).
    pub fn admit(&self, peer: &str, is_gone: impl Fn(&str) -> bool) -> Option<Arc<PeerStats>> {
        self.admit_within(MAX_PEERS, peer, is_gone)
    }

    fn admit_within(&self, max: usize, peer: &str, is_gone: impl Fn(&str) -> bool) -> Option<Arc<PeerStats>> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if !peers.contains_key(peer) && peers.len() >= max {
            peers.retain(|name, _| !is_gone(name));
            if peers.len() >= max {
                return None;
            }
        }
        Some(peers.entry(peer.to_string()).or_default().clone())
    }

    /// Every peer's counters, under the table's lock once.
    pub fn all(&self) -> Vec<(String, Arc<PeerStats>)> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.iter().map(|(peer, s)| (peer.clone(), s.clone())).collect()
    }

    pub fn get(&self, peer: &str) -> Option<Arc<PeerStats>> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(peer).cloned()
    }
}

/// One connection's own counters. Which way they count (out or in) is the connection's
/// direction; the peer's `PeerStats` has the totals.
#[derive(Debug)]
pub struct ConnStats {
    local: SocketAddr,
    remote: SocketAddr,
    since: Instant,
    messages: AtomicU64,
    /// Frame bodies, as in `PeerStats`.
    bytes: AtomicU64,
    /// Inbound only.
    undeliverable: AtomicU64,
    /// Inbound only: the length of the bulk body under way (reserved for it), or 0.
    partial_bytes: AtomicU64,
    /// Outbound only: the kernel's send buffer once sized (`send_buffer::apply`).
    send_buffer: Option<usize>,
}

/// Which side opened a connection, and what only that side has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnDirection {
    /// Ours, in slot `index` of our pool to the peer.
    Outbound {
        index: usize,
        queued_bytes: u64,
        send_buffer: Option<usize>,
    },
    /// The peer's pool into us.
    Inbound {
        undeliverable: u64,
        /// Held for a bulk body under way (its whole length), or 0.
        partial_bytes: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnStatsSnapshot {
    pub direction: ConnDirection,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Since the connection was authenticated.
    pub age: Duration,
    /// Written (outbound) or read (inbound).
    pub messages: u64,
    pub bytes: u64,
}

impl ConnStats {
    /// Counters for a connected stream, starting now.
    pub fn new(stream: &TcpStream) -> io::Result<ConnStats> {
        Ok(ConnStats {
            local: stream.local_addr()?,
            remote: stream.peer_addr()?,
            since: Instant::now(),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            undeliverable: AtomicU64::new(0),
            partial_bytes: AtomicU64::new(0),
            send_buffer: None,
        })
    }

    /// A bulk body of `len` bytes started (held from now) or ended.
    pub fn partial(&self, len: usize, started: bool) {
        self.partial_bytes
            .store(if started { len as u64 } else { 0 }, Relaxed);
    }

    pub fn with_send_buffer(self, send_buffer: Option<usize>) -> ConnStats {
        ConnStats { send_buffer, ..self }
    }

    pub fn snapshot_outbound(&self, index: usize, queued_bytes: usize) -> ConnStatsSnapshot {
        self.snapshot(ConnDirection::Outbound {
            index,
            queued_bytes: queued_bytes as u64,
            send_buffer: self.send_buffer,
        })
    }

    pub fn snapshot_inbound(&self) -> ConnStatsSnapshot {
        self.snapshot(ConnDirection::Inbound {
            undeliverable: self.undeliverable.load(Relaxed),
            partial_bytes: self.partial_bytes.load(Relaxed),
        })
    }

    fn snapshot(&self, direction: ConnDirection) -> ConnStatsSnapshot {
        ConnStatsSnapshot {
            direction,
            local: self.local,
            remote: self.remote,
            age: self.since.elapsed(),
            messages: self.messages.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_past_the_cap_are_refused_unless_gone_ones_make_room() {
        let table = PeerStatsTable::default();
        for i in 0..3 {
            assert!(table.admit_within(3, &format!("p{i}@h"), |_| false).is_some());
        }
        // A name already kept always gets in; a new one does not while all are live.
        assert!(table.admit_within(3, "p1@h", |_| false).is_some());
        assert!(table.admit_within(3, "new@h", |_| false).is_none());
        // Once one has nothing open, it makes room (and its counters go).
        table.of("p0@h").messages_in.fetch_add(5, Relaxed);
        assert!(table.admit_within(3, "new@h", |name| name == "p0@h").is_some());
        let names: Vec<String> = table.all().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names.len(), 3);
        assert!(!names.contains(&"p0@h".to_string()));
    }
}
