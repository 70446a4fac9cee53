//! Per-peer counters, shared by the outbound pool and the inbound readers of one peer.
//! They outlive any one pool so `stats()` keeps its totals across reconnects.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
}

impl PeerStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
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
        }
    }
}
