//! The outbound pools: per peer node, N authenticated connections. A sender's key
//! picks the connection, so one sender's frames always share one queue and one
//! socket and arrive in order. A pool is dialed as a whole, published only once every
//! connection is up, and closed as a whole when any of them ends, so a sender never
//! sees its frames reordered over a replacement socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::error::{CloseReason, OpenError};
use crate::host::Callback;
use crate::send_queue::SendQueue;
use crate::send_queue::SmallFrames;
use crate::stats::{ConnStatsSnapshot, PeerStats};

pub use crate::framing::{PoolToken, POOL_TOKEN_LEN};

/// At most this many connections of one pool connect and handshake at once. The peer
/// closes at accept what goes over its cap of handshakes per source
/// (`max_pending_handshakes_per_ip`, 8 by default), and other nodes on this host may be
/// dialing it too: half the default leaves them room.
pub(crate) const DIAL_PARALLELISM: usize = 4;

pub struct Pool {
    pub peer: String,
    pub(crate) addr: SocketAddr,
    /// Announced first on each of its connections.
    pub(crate) token: PoolToken,
    size: usize,
    pub(crate) stats: Arc<PeerStats>,
    /// When a small frame was last offered on any of its connections.
    pub(crate) small_frames: Arc<SmallFrames>,
    /// Set once every connection is up: the pool is published.
    connections: OnceLock<Vec<Arc<SendQueue>>>,
    /// While dialing: the connections up so far by slot, and the next slot to dial.
    dialing: Mutex<(Vec<Option<Arc<SendQueue>>>, usize)>,
    closing: AtomicBool,
    /// First reason given for closing; reported once every connection has ended.
    close_reason: Mutex<Option<CloseReason>>,
    /// Connections dialing or up, not yet ended.
    live: AtomicUsize,
    dropped: AtomicU64,
    handshake_failure_counted: AtomicBool,
}

/// What a connection coming up means for its pool.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Joined {
    /// Dial the next slot, if any is left.
    DialNext,
    /// It was the last: the pool is complete, publish it.
    Complete,
    /// The pool is closing: let the connection go.
    Closing,
}

impl Pool {
    pub(crate) fn new(
        peer: &str,
        addr: SocketAddr,
        size: usize,
        token: PoolToken,
        stats: Arc<PeerStats>,
    ) -> Pool {
        Pool {
            peer: peer.to_string(),
            addr,
            token,
            size,
            stats,
            small_frames: Arc::new(SmallFrames::new()),
            connections: OnceLock::new(),
            dialing: Mutex::new(((0..size).map(|_| None).collect(), 0)),
            closing: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            live: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            handshake_failure_counted: AtomicBool::new(false),
        }
    }

    /// The next slot to dial, counted live from now on; `None` when every slot has
    /// been started or the pool is closing.
    pub(crate) fn next_slot(&self) -> Option<usize> {
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        if dialing.1 >= self.size || self.is_closing() {
            return None;
        }
        dialing.1 += 1;
        self.live.fetch_add(1, SeqCst);
        Some(dialing.1 - 1)
    }

    /// Slot `index`'s connection is authenticated and running.
    pub(crate) fn joined(&self, index: usize, conn: Arc<SendQueue>) -> Joined {
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `begin_close` takes to shut connections down.
        if self.is_closing() {
            return Joined::Closing;
        }
        dialing.0[index] = Some(conn);
        if dialing.0.iter().any(Option::is_none) {
            return Joined::DialNext;
        }
        let all = dialing.0.iter().flatten().cloned().collect();
        let _ = self.connections.set(all);
        Joined::Complete
    }

    pub(crate) fn is_published(&self) -> bool {
        self.connections.get().is_some()
    }

    /// The connection for a sender's key (e.g. a hash of its pid); `None` before the
    /// pool is complete.
    pub fn connection(&self, key: u64) -> Option<&Arc<SendQueue>> {
        let connections = self.connections.get()?;
        connections.get((key % connections.len() as u64) as usize)
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn queued_bytes(&self) -> usize {
        self.connections
            .get()
            .map_or(0, |c| c.iter().map(|c| c.queued_bytes()).sum())
    }

    /// Every connection's counters, in slot order.
    pub fn connection_stats(&self) -> Vec<ConnStatsSnapshot> {
        let Some(connections) = self.connections.get() else {
            return Vec::new();
        };
        connections
            .iter()
            .enumerate()
            .map(|(index, conn)| conn.snapshot(index))
            .collect()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(SeqCst)
    }

    /// Starts closing; true for the first caller only. Every connection up is shut down
    /// (its I/O thread lets go of it); those still dialing end as they come up.
    pub(crate) fn begin_close(&self, reason: CloseReason) -> bool {
        let dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        if self.closing.swap(true, SeqCst) {
            return false;
        }
        *self.close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        for conn in dialing.0.iter().flatten() {
            conn.shutdown();
        }
        true
    }

    pub(crate) fn close_reason(&self) -> CloseReason {
        let reason = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
        reason.clone().unwrap_or(CloseReason::Closed)
    }

    /// Called once per connection slot started, as its connection ends (or its dial
    /// fails); the last one gets the pool's final tally of frames never written.
    pub(crate) fn member_ended(&self, dropped: u64) -> Option<(CloseReason, u64)> {
        let total = self.dropped.fetch_add(dropped, SeqCst) + dropped;
        if self.live.fetch_sub(1, SeqCst) != 1 {
            return None;
        }
        Some((self.close_reason(), total))
    }

    /// True the first time only: a dial's refusals count once, however many of its
    /// connections the peer refused.
    pub(crate) fn first_handshake_failure(&self) -> bool {
        !self.handshake_failure_counted.swap(true, SeqCst)
    }
}

enum PoolSlot {
    /// Dialing; these callers hear how it ends.
    Opening(Arc<Pool>, Vec<Callback<Result<(), OpenError>>>),
    Up(Arc<Pool>),
}

impl PoolSlot {
    /// The pool, if it is up and not closing: a closing pool's connections are shut
    /// down, so it is as good as gone.
    fn live(&self) -> Option<&Arc<Pool>> {
        match self {
            PoolSlot::Up(pool) if !pool.is_closing() => Some(pool),
            _ => None,
        }
    }
}

/// How `Pools::open` went.
pub(crate) enum Opened {
    /// A new pool to dial.
    Dial(Arc<Pool>),
    /// Joined a dial already under way.
    Joined,
    /// Up already; the callback was dropped.
    AlreadyUp,
}

/// Every outbound pool, by peer node name.
#[derive(Default)]
pub(crate) struct Pools {
    pools: RwLock<HashMap<String, PoolSlot>>,
}

impl Pools {
    /// Registers a dial to `peer` unless its pool is up or being dialed; exactly one dial
    /// happens however many callers ask at once, and every caller hears its outcome.
    pub fn open(
        &self,
        peer: &str,
        new_pool: impl FnOnce() -> Pool,
        done: Callback<Result<(), OpenError>>,
    ) -> Opened {
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        match pools.get_mut(peer) {
            Some(slot) if slot.live().is_some() => Opened::AlreadyUp,
            Some(PoolSlot::Opening(_, waiting)) => {
                waiting.push(done);
                Opened::Joined
            }
            // Absent, or closing (its replacement starts now).
            _ => {
                let pool = Arc::new(new_pool());
                pools.insert(peer.to_string(), PoolSlot::Opening(pool.clone(), vec![done]));
                Opened::Dial(pool)
            }
        }
    }

    /// Makes a complete pool its peer's; false (and the pool must close) if it was
    /// closed meanwhile. The callers waiting on the dial hear of it.
    pub fn publish(&self, pool: &Arc<Pool>) -> bool {
        let waiting = {
            let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
            // Checked under the lock `close` takes to remove a pool, so a pool closing
            // from now on finds itself in the map.
            if pool.is_closing() {
                return false;
            }
            match pools.insert(pool.peer.clone(), PoolSlot::Up(pool.clone())) {
                Some(PoolSlot::Opening(_, waiting)) => waiting,
                _ => Vec::new(),
            }
        };
        PeerStats::add(&pool.stats.connects, 1);
        for done in waiting {
            done(Ok(()));
        }
        true
    }

    /// Closes `pool`: its connections are shut down, and it stops being its peer's. A
    /// pool still dialing fails its callers with `error` (or why it closed).
    pub fn close(&self, pool: &Arc<Pool>, reason: CloseReason, error: Option<OpenError>) {
        if !pool.begin_close(reason.clone()) {
            return;
        }
        let waiting = {
            let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
            let current = match pools.get(&pool.peer) {
                Some(PoolSlot::Up(current)) | Some(PoolSlot::Opening(current, _)) => {
                    Arc::ptr_eq(current, pool)
                }
                None => false,
            };
            if !current {
                Vec::new()
            } else {
                match pools.remove(&pool.peer) {
                    Some(PoolSlot::Opening(_, waiting)) => waiting,
                    _ => Vec::new(),
                }
            }
        };
        if pool.is_published() {
            PeerStats::add(&pool.stats.disconnects, 1);
        }
        let error = error.unwrap_or_else(|| match reason {
            CloseReason::Stopping => OpenError::Stopping,
            other => OpenError::Closed(other.to_string()),
        });
        for done in waiting {
            done(Err(error.clone()));
        }
    }

    /// The peer's pool, if it is up.
    pub fn live(&self, peer: &str) -> Option<Arc<Pool>> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.get(peer)?.live().cloned()
    }

    /// The connection `key` picks in `peer`'s pool, if it is up.
    pub fn connection(&self, peer: &str, key: u64) -> Option<Arc<SendQueue>> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.get(peer)?.live()?.connection(key).cloned()
    }

    /// The token of `peer`'s pool, dialing or up, unless it is closing.
    pub fn token(&self, peer: &str) -> Option<PoolToken> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        match pools.get(peer)? {
            PoolSlot::Up(pool) | PoolSlot::Opening(pool, _) if !pool.is_closing() => Some(pool.token),
            _ => None,
        }
    }

    /// Peers whose pool is up.
    pub fn peers(&self) -> Vec<String> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools
            .iter()
            .filter(|(_, slot)| slot.live().is_some())
            .map(|(peer, _)| peer.clone())
            .collect()
    }

    /// Every pool, dialing or up (for `stop`).
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools
            .values()
            .map(|slot| match slot {
                PoolSlot::Up(pool) | PoolSlot::Opening(pool, _) => pool.clone(),
            })
            .collect()
    }
}
