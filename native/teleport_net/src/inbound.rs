//! An inbound connection once authenticated: its frame reader (`frame_reader`), fed
//! by the connection's I/O thread whenever the socket is readable, and delivery of
//! what it reads through the host's `FrameHandler`, counted on the way.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::error::{CloseReason, FrameRefusal};
use crate::faults::{self, Point};
use crate::frame_reader::{Body, Flow, FrameReader, FrameSink, ReadTurn, TlsReceive};
use crate::framing::{FrameKind, PoolToken};
use crate::host::{BodyBuffer, Deferral, Delivery, Event, FrameHandler, Host, Malformed, Outcome};
use crate::inbound_pools::{InboundPools, Join, Membership};
use crate::stats::{ConnStats, PeerStats};
use crate::tls::Session;

/// At most one Undeliverable event per connection per this interval; the counter has every one.
const UNDELIVERABLE_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// An authenticated inbound connection: reads frames and delivers them.
pub(crate) struct Inbound {
    reader: FrameReader,
    to: Recipient,
    /// A deferred frame is being delivered elsewhere.
    paused: bool,
    /// Set when the connection ends; reported as it is dropped.
    pub reason: Option<CloseReason>,
}

/// Where an inbound connection's frames go, and what is counted on the way.
struct Recipient {
    peer: String,
    handler: Box<dyn FrameHandler>,
    deferral: Deferral,
    host: Arc<dyn Host>,
    stats: Arc<PeerStats>,
    counters: Arc<ConnStats>,
    pools: Arc<InboundPools>,
    socket: Arc<TcpStream>,
    membership: Option<Membership>,
    /// The pool token the host is asked to confirm (`Host::confirm_pool`), and whether
    /// it is later than the live pool's.
    unconfirmed: Option<(PoolToken, bool)>,
    last_undeliverable_event: Option<Instant>,
    /// A large body was read since this was last cleared.
    bulk: bool,
}

pub(crate) struct InboundSetup {
    pub peer: String,
    pub socket: Arc<TcpStream>,
    pub deferral: Deferral,
    pub host: Arc<dyn Host>,
    pub stats: Arc<PeerStats>,
    pub pools: Arc<InboundPools>,
    pub max_frame_bytes: u32,
    /// A large body under way must be whole this long after it starts, plus a second
    /// per MiB.
    pub partial_grace: Duration,
    /// Bytes that came with the handshake's last message.
    pub early: Vec<u8>,
}

impl Inbound {
    pub fn new(setup: InboundSetup) -> io::Result<Inbound> {
        let counters = Arc::new(ConnStats::new(&setup.socket)?);
        let handler = setup.host.frame_handler(&setup.peer);
        setup.host.event(Event::InboundUp {
            peer: setup.peer.clone(),
        });
        Ok(Inbound {
            reader: FrameReader::new(setup.max_frame_bytes, setup.partial_grace, setup.early),
            to: Recipient {
                peer: setup.peer,
                handler,
                deferral: setup.deferral,
                host: setup.host,
                stats: setup.stats,
                counters,
                pools: setup.pools,
                socket: setup.socket,
                membership: None,
                unconfirmed: None,
                last_undeliverable_event: None,
                bulk: false,
            },
            paused: false,
            reason: None,
        })
    }

    /// Reads and delivers what the socket holds, up to `budget` bytes.
    /// With TLS, through `tls`.
    pub fn read(&mut self, budget: usize, tls: Option<&mut Session>) -> Result<ReadTurn, CloseReason> {
        if self.paused {
            return Ok(ReadTurn::Paused);
        }
        let socket = self.to.socket.clone();
        let turn = match tls {
            Some(tls) => {
                self.reader
                    .read_turn(&mut self.to, &mut TlsReceive { tls, socket: &socket }, budget)
            }
            None => self.reader.read_turn(&mut self.to, &mut &*socket, budget),
        };
        match turn {
            Ok(ReadTurn::Paused) => self.paused = true,
            // A newer pool shut this connection down: that is why it ended.
            Err(_) if self.to.membership.as_ref().is_some_and(Membership::is_stale) => {
                return Err(CloseReason::Superseded)
            }
            _ => {}
        }
        turn
    }

    /// A deferred frame's outcome; the caller reads on unless it is an error.
    pub fn resume(&mut self, outcome: Outcome) -> Result<(), CloseReason> {
        self.paused = false;
        if let Some((token, newer)) = self.to.unconfirmed.take() {
            return self
                .to
                .confirmed(token, newer, outcome == Ok(Delivery::Delivered));
        }
        self.to.delivered(outcome).map(|_| ())
    }

    /// When the large body under way must be whole (see `partial_deadline`), if one is.
    pub fn partial_deadline(&self) -> Option<Instant> {
        self.reader.partial_deadline()
    }

    /// Whether a large body was read since the last call, or one is coming in chunks.
    pub fn take_bulk(&mut self) -> bool {
        std::mem::take(&mut self.to.bulk) || self.reader.bulk_under_way()
    }
}

impl Recipient {
    /// The host's answer about the pool token `token`: confirmed, it replaces the
    /// peer's live pool; else the connection closes.
    fn confirmed(&mut self, token: PoolToken, newer: bool, confirmed: bool) -> Result<(), CloseReason> {
        match (confirmed, newer) {
            (true, _) => {}
            // A late connection of an earlier pool.
            (false, false) => return Err(CloseReason::Superseded),
            (false, true) => return Err(CloseReason::BadFrame(FrameRefusal::PoolNotConfirmed)),
        }
        match self
            .pools
            .join(&self.peer, token, &self.socket, self.counters.clone(), true)
        {
            Join::Member(membership) => {
                self.membership = Some(membership);
                Ok(())
            }
            Join::TooMany => Err(CloseReason::BadFrame(FrameRefusal::TooManyConnections)),
            _ => Err(CloseReason::Superseded),
        }
    }

    /// Counts a delivery's outcome; `Pause` for a deferred frame.
    fn delivered(&mut self, outcome: Outcome) -> Result<Flow, CloseReason> {
        match outcome {
            Ok(Delivery::Delivered) => Ok(Flow::Go),
            Ok(Delivery::Deferred) => Ok(Flow::Pause),
            Ok(Delivery::Undeliverable(reason)) => {
                let total = self.stats.count_undeliverable(&self.counters);
                let due = self
                    .last_undeliverable_event
                    .is_none_or(|t| t.elapsed() >= UNDELIVERABLE_EVENT_INTERVAL);
                if due {
                    self.last_undeliverable_event = Some(Instant::now());
                    self.host.event(Event::Undeliverable {
                        peer: self.peer.clone(),
                        reason,
                        total,
                    });
                }
                Ok(Flow::Go)
            }
            Err(Malformed(why)) => Err(CloseReason::Malformed(why)),
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        // No longer counted by the time the event is out.
        drop(self.to.membership.take());
        let reason = self
            .reason
            .take()
            .unwrap_or_else(|| CloseReason::Internal(crate::error::ended_early("reader")));
        self.to.host.event(Event::InboundDown {
            peer: std::mem::take(&mut self.to.peer),
            reason,
        });
    }
}

impl FrameSink for Recipient {
    fn pool_token(&mut self, token: PoolToken) -> Result<Flow, CloseReason> {
        match self
            .pools
            .join(&self.peer, token, &self.socket, self.counters.clone(), false)
        {
            Join::Member(membership) => self.membership = Some(membership),
            Join::Stale => return Err(CloseReason::Superseded),
            Join::TooMany => return Err(CloseReason::BadFrame(FrameRefusal::TooManyConnections)),
            Join::Unconfirmed { newer } => {
                // Another pool of this node is live: only the node itself may replace it
                // (a made-up token would lock the real one out). Asked, and read on
                // once it answers.
                self.unconfirmed = Some((token, newer));
                self.host
                    .confirm_pool(&self.peer, token, newer, self.deferral.defer());
                return Ok(Flow::Pause);
            }
        }
        faults::check(Point::Reader, &self.peer);
        Ok(Flow::Go)
    }

    fn body_buffer(&mut self, len: usize) -> Result<Option<Box<dyn BodyBuffer>>, CloseReason> {
        self.handler
            .body_buffer(len)
            .map_err(|Malformed(why)| CloseReason::Malformed(why))
    }

    fn partial(&mut self, len: usize, started: bool) {
        self.counters.partial(len, started);
    }

    fn frame(&mut self, kind: FrameKind, body: Body<'_>) -> Result<Flow, CloseReason> {
        // A newer pool from this node exists: anything still arriving here was sent
        // before it (bytes a partition held back) and must not overtake its frames.
        if self.membership.as_ref().is_none_or(Membership::is_stale) {
            return Err(CloseReason::Superseded);
        }
        let outcome = match body {
            Body::Slice(bytes) => {
                self.stats.count_in(&self.counters, bytes.len() as u64);
                self.handler.handle(kind, bytes, &self.deferral)
            }
            Body::Owned(mut buffer) => {
                self.stats
                    .count_in(&self.counters, buffer.as_mut_slice().len() as u64);
                self.bulk = true;
                self.handler.handle_owned(kind, buffer, &self.deferral)
            }
        };
        self.delivered(outcome)
    }
}
