//! Every peer's inbound pool: which inbound connections belong to the latest pool of
//! each peer (the twin of `pool`, which holds this node's outbound pools).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use mio::net::TcpStream;

use crate::framing::PoolToken;
use crate::stats::ConnStats;

/// The inbound connections of one peer, all from its latest pool.
struct InboundPool {
    token: PoolToken,
    /// By id (they grow in join order).
    members: HashMap<u64, Member>,
}

/// One connection of an inbound pool: the flag that marks it superseded, its socket
/// (to shut it down then), its counters.
struct Member {
    stale: Arc<AtomicBool>,
    socket: Arc<TcpStream>,
    counters: Arc<ConnStats>,
}

/// Every peer's latest inbound pool.
#[derive(Default)]
pub(crate) struct InboundPools {
    pools: Mutex<HashMap<String, InboundPool>>,
    next_id: AtomicU64,
}

impl InboundPools {
    /// Registers an inbound connection under its pool's token. A token other than the
    /// peer's current one is a newer pool (a sender opens a pool only once its previous
    /// one is closed): every connection of the older pool is marked stale and shut down,
    /// so bytes it still holds (a partition, a slow close) are never delivered after the
    /// new pool's. While the current pool has live connections, though, the new token
    /// must be `confirmed` first (`Join::Unconfirmed`): a connection that made its token
    /// up (a larger counter) would otherwise shut the real pool out.
    pub(crate) fn join(
        self: &Arc<Self>,
        peer: &str,
        token: PoolToken,
        socket: &Arc<TcpStream>,
        counters: Arc<ConnStats>,
        confirmed: bool,
    ) -> Join {
        let stale = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, SeqCst);
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools.entry(peer.to_string()).or_insert_with(|| InboundPool {
            token,
            members: HashMap::new(),
        });
        if pool.token != token {
            let newer = token > pool.token || token[..8] != pool.token[..8];
            if !pool.members.is_empty() && !confirmed {
                return Join::Unconfirmed { newer };
            }
            if !(pool.members.is_empty() || newer || confirmed) {
                return Join::Stale; // an older pool of the same runtime, arriving late
            }
            for old in pool.members.values() {
                old.stale.store(true, SeqCst);
                let _ = old.socket.shutdown(std::net::Shutdown::Both);
            }
            pool.members.clear();
            pool.token = token;
        }
        if pool.members.len() >= MAX_INBOUND_PER_PEER {
            return Join::TooMany;
        }
        let member = Member {
            stale: stale.clone(),
            socket: socket.clone(),
            counters,
        };
        pool.members.insert(id, member);
        Join::Member(Membership {
            pools: self.clone(),
            peer: peer.to_string(),
            id,
            stale,
        })
    }

    /// Whether `peer` has an inbound connection.
    pub fn has(&self, peer: &str) -> bool {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(peer).is_some_and(|pool| !pool.members.is_empty())
    }

    /// The live inbound connections' counters of every peer, in join order.
    pub fn snapshots(&self) -> HashMap<String, Vec<crate::stats::ConnStatsSnapshot>> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .iter()
            .map(|(peer, pool)| {
                let mut members: Vec<_> = pool.members.iter().collect();
                members.sort_unstable_by_key(|(id, _)| **id);
                let snapshots = members
                    .iter()
                    .map(|(_, member)| member.counters.snapshot_inbound())
                    .collect();
                (peer.clone(), snapshots)
            })
            .collect()
    }
}

/// Most connections one peer's pool may have into us: far above any `pool_size`, and
/// a bound on the partial bodies it can make us hold (one per connection).
pub(crate) const MAX_INBOUND_PER_PEER: usize = 64;

/// How joining the peer's inbound pool went.
pub(crate) enum Join {
    Member(Membership),
    /// This connection's own pool was superseded already.
    Stale,
    /// Another pool of the peer is live: the host must confirm this one (`newer` than it,
    /// or not).
    Unconfirmed {
        newer: bool,
    },
    /// The peer has `MAX_INBOUND_PER_PEER` connections already.
    TooMany,
}

/// An inbound connection's place in its peer's current pool; leaves it on drop.
pub(crate) struct Membership {
    pools: Arc<InboundPools>,
    peer: String,
    id: u64,
    stale: Arc<AtomicBool>,
}

impl Membership {
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(SeqCst)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut pools = self.pools.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get_mut(&self.peer) {
            pool.members.remove(&self.id);
        }
    }
}
