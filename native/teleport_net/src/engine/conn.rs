//! One connection's state machine, advanced by readiness events on its I/O thread:
//!
//! ```text
//! dialed:   Connecting -> ClientHandshake -> Outbound (writes frames; watches for the peer leaving)
//! accepted: ServerHandshake -> Authenticated (handed from the handshake thread to an
//!           I/O thread) -> Inbound (reads frames, delivers them)
//! ```
//!
//! Each state owns the guards of what it holds (a handshake slot, a place in a pool,
//! a socket counted open), so however a connection ends (closed, timed out, a panic
//! while it was served), dropping it releases them and tells whoever waits.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use crate::error::{CloseReason, FrameRefusal, OpenError};
use crate::frame_reader::ReadTurn;
use crate::framing::{encode_frame, FrameKind};
use crate::handshake::{Handshake, HandshakeError, Peer, Progress};
use crate::host::Event;
use crate::inbound::Inbound;
use crate::listener::{HandshakeSlot, OpenSocket};
use crate::pool::{Joined, Pool};
use crate::send_queue::{Flushed, SendQueue};
use crate::stats::{ConnStats, PeerStats};
use crate::tls::Session;

use super::{Services, Threads};
use crate::error::{ended_early, NamedFailure};

/// Bytes a connection may read or write per turn before its thread serves the others.
pub(super) const TURN_BYTES: usize = 1 << 20;

/// A turn that wrote more than this carried bulk: its thread does not busy-wait next
/// (see `Config::reader_busy_wait`), as a reader that read a large body does not.
const BULK_BYTES: usize = 64 * 1024;

/// One slot of a pool being dialed or up. However it ends, dropping it counts the
/// frames its connection never wrote, closes the pool (a pool is whole or gone), fails
/// the dial's callers if the pool was not up yet, and lets the pool's last member
/// report `PoolDown`.
pub(crate) struct PoolMember {
    services: Arc<Services>,
    pub(super) threads: Arc<Threads>,
    pub(super) pool: Arc<Pool>,
    index: usize,
    conn: Option<Arc<SendQueue>>,
    end: Option<MemberEnd>,
}

enum MemberEnd {
    DialFailed(OpenError),
    Closed(CloseReason),
}

impl PoolMember {
    pub(super) fn new(
        services: &Arc<Services>,
        threads: &Arc<Threads>,
        pool: &Arc<Pool>,
        index: usize,
    ) -> Self {
        PoolMember {
            services: services.clone(),
            threads: threads.clone(),
            pool: pool.clone(),
            index,
            conn: None,
            end: None,
        }
    }

    pub(super) fn fail(&mut self, error: OpenError) {
        self.end.get_or_insert(MemberEnd::DialFailed(error));
    }

    fn closed(&mut self, reason: CloseReason) {
        self.end.get_or_insert(MemberEnd::Closed(reason));
    }
}

impl Drop for PoolMember {
    fn drop(&mut self) {
        let services = &self.services;
        let pool = &self.pool;
        let joined = self.conn.is_some();
        let dropped = self.conn.take().map_or(0, |conn| conn.close());
        let end = self
            .end
            .take()
            .unwrap_or_else(|| MemberEnd::Closed(CloseReason::Internal(ended_early("I/O"))));
        let end = match end {
            // Ended before its connection was up: the dial failed.
            MemberEnd::Closed(reason) if !joined => {
                MemberEnd::DialFailed(OpenError::Closed(reason.to_string()))
            }
            end => end,
        };
        match end {
            MemberEnd::DialFailed(error) => {
                // `stop` closes the dial's sockets: whatever that broke, the cause is the stop.
                let error = if services.is_stopping() {
                    OpenError::Stopping
                } else {
                    error
                };
                if matches!(error, OpenError::Handshake { .. }) && pool.first_handshake_failure() {
                    PeerStats::add(&pool.stats.handshake_failures, 1);
                }
                let reason = match &error {
                    OpenError::Stopping => CloseReason::Stopping,
                    other => CloseReason::Internal(other.to_string()),
                };
                services.pools.close(pool, reason, Some(error));
            }
            MemberEnd::Closed(reason) => services.pools.close(pool, reason, None),
        }
        if let Some((reason, dropped)) = pool.member_ended(dropped) {
            if pool.is_published() {
                services.host.event(Event::PoolDown {
                    peer: pool.peer.clone(),
                    reason,
                    dropped_messages: dropped,
                });
            }
        }
    }
}

/// How a connection ends, as the thread that closes it knows it.
pub(super) enum End {
    /// Dialing failed (only meaningful while dialing; otherwise a close).
    Dial(OpenError),
    /// An inbound handshake failed: counted and reported (rate-limited) as this, with
    /// what the error says (the two versions of a version mismatch, say).
    Handshake(&'static str, String),
    Close(CloseReason),
}

pub(super) enum State {
    // In each state, `_open` is declared first, so dropped first: a socket is no longer
    // counted by the time what the state held reports its end.
    Connecting {
        _open: OpenSocket,
        member: PoolMember,
    },
    ClientHandshake {
        _open: OpenSocket,
        member: PoolMember,
        handshake: Handshake,
    },
    ServerHandshake {
        handshake: Handshake,
        remote: SocketAddr,
        _slot: HandshakeSlot,
        open: OpenSocket,
        /// Reading waits until then (a fault injected by tests: a slow peer).
        not_before: Option<Instant>,
    },
    Outbound {
        member: PoolMember,
        conn: Arc<SendQueue>,
    },
    /// An inbound connection whose handshake is done, on its way from the handshake
    /// thread to the I/O thread that will read its frames.
    Authenticated {
        open: OpenSocket,
        client: Peer,
        /// Bytes read past the handshake's end (the first frames).
        early: Vec<u8>,
    },
    Inbound {
        _open: OpenSocket,
        inbound: Inbound,
    },
    /// Between two states, and while being dropped.
    Gone,
}

pub(super) struct Conn {
    pub id: u64,
    pub socket: Arc<TcpStream>,
    pub state: State,
    /// When the state times out (connecting, handshaking).
    pub deadline: Option<Instant>,
    /// With TLS: the connection's bytes go through this (made once connected).
    pub tls: Option<Box<Session>>,
}

impl Conn {
    /// Hands `end` to whatever the state owns, before the connection is dropped.
    pub fn end(&mut self, end: End, services: &Services) {
        match (&mut self.state, end) {
            (State::Connecting { member, .. } | State::ClientHandshake { member, .. }, end) => {
                member.fail(match end {
                    End::Dial(error) => error,
                    End::Handshake(reason, _) => OpenError::Closed(reason.to_string()),
                    End::Close(CloseReason::Stopping) => OpenError::Stopping,
                    End::Close(reason) => OpenError::Closed(reason.to_string()),
                });
            }
            (State::ServerHandshake { remote, .. }, end) => {
                let remote = *remote;
                // Its slot and socket count go back before the failure is reported.
                self.state = State::Gone;
                let (reason, detail) = match end {
                    End::Handshake(reason, detail) => (reason, detail),
                    // Stopping: not the peer's failure.
                    End::Close(CloseReason::Stopping) => return,
                    End::Close(_) | End::Dial(_) => ("internal", String::new()),
                };
                services
                    .listener
                    .handshake_failed(&*services.host, remote, reason, detail);
            }
            (State::Outbound { member, .. }, end) => member.closed(close_reason(end)),
            (State::Inbound { inbound, .. }, end) => {
                inbound.reason.get_or_insert(close_reason(end));
            }
            (State::Authenticated { .. } | State::Gone, _) => {}
        }
    }
}

fn close_reason(end: End) -> CloseReason {
    match end {
        End::Close(reason) => reason,
        End::Dial(error) => CloseReason::Malformed(error.to_string()),
        End::Handshake(reason, _) => CloseReason::Malformed(reason.to_string()),
    }
}

/// Writes a handshake message or the pool announcement, all of it now: they are small
/// and go first into an empty socket buffer, so a short write means a broken socket.
pub(super) fn write_now(socket: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match (&*socket).write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_now`, through TLS if the connection has it (rustls keeps what the socket does
/// not take yet, and the next writable event sends it).
fn send_all(socket: &TcpStream, tls: &mut Option<Box<Session>>, bytes: &[u8]) -> io::Result<()> {
    match tls {
        Some(tls) => tls.write_all_plain(socket, bytes),
        None => write_now(socket, bytes),
    }
}

/// Reads the socket, or what TLS decrypted from it.
fn receive(socket: &TcpStream, tls: &mut Option<Box<Session>>, buf: &mut [u8]) -> io::Result<usize> {
    match tls {
        Some(tls) => tls.read_plain(socket, buf),
        None => (&*socket).read(buf),
    }
}

/// A TLS failure keeps its name; anything else is the socket's.
fn io_or_tls(e: io::Error) -> HandshakeError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<NamedFailure>()) {
        Some(named) => HandshakeError::Tls(named.reason, e.to_string()),
        None => HandshakeError::Io(e),
    }
}

/// What a step asks of the thread besides going on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Wait,
    /// Come back this turn (more to read or write than one turn's share, or a new
    /// state that must read what is already there).
    Again,
    /// Authenticated on the handshake thread: hand it to an I/O thread.
    HandOver,
}

/// Connecting: the socket became writable (or failed).
pub(super) fn connected(conn: &mut Conn, services: &Services) -> Result<Next, End> {
    let socket = &conn.socket;
    if let Ok(Some(e)) | Err(e) = socket.take_error() {
        return Err(End::Dial(OpenError::connect(&e)));
    }
    match socket.peer_addr() {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(Next::Wait),
        Err(e) => return Err(End::Dial(OpenError::connect(&e))),
    }
    crate::socket::set_connection_options(socket);
    let State::Connecting { member, _open } = std::mem::replace(&mut conn.state, State::Gone) else {
        unreachable!("connected() is only called while connecting");
    };
    let config = &services.config;
    let started = Handshake::client(
        &config.cookie,
        &config.local_node,
        &member.pool.peer,
        config.capabilities,
    );
    let (handshake, hello) = match started {
        Ok(started) => started,
        Err(e) => {
            conn.state = State::Connecting { member, _open };
            return Err(End::Dial(OpenError::handshake(&e)));
        }
    };
    let tls = match services.tls.as_ref().map(|tls| tls.client(&member.pool.peer)) {
        Some(Ok(session)) => Some(Box::new(session)),
        Some(Err(e)) => {
            conn.state = State::Connecting { member, _open };
            return Err(End::Dial(OpenError::handshake(&io_or_tls(e))));
        }
        None => None,
    };
    conn.tls = tls;
    conn.state = State::ClientHandshake {
        member,
        handshake,
        _open,
    };
    conn.deadline = Some(Instant::now() + config.handshake_timeout);
    // With TLS, the hello waits in rustls until its handshake is done.
    send_all(&conn.socket, &mut conn.tls, &hello)
        .map_err(|e| End::Dial(OpenError::handshake(&io_or_tls(e))))?;
    Ok(Next::Wait)
}

/// Reads handshake bytes: at most what the handshake still needs is consumed, so
/// bytes after it (the first frames) stay for the next state. Returns the peer and
/// the bytes read past the handshake's end, once done.
fn read_handshake(
    socket: &TcpStream,
    tls: &mut Option<Box<Session>>,
    handshake: &mut Handshake,
    check_client_name: bool,
) -> Result<Option<(Peer, Vec<u8>)>, HandshakeError> {
    let mut buf = [0u8; 2048];
    loop {
        let n = match receive(socket, tls, &mut buf) {
            Ok(0) => return Err(handshake.closed_error()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_or_tls(e)),
        };
        // Plain text comes out of TLS only once its handshake is done: the session's
        // exported value is there for the proofs to sign.
        if let (Some(tls), false) = (tls.as_deref(), handshake.is_bound()) {
            handshake.bind_channel(tls.channel_binding().map_err(io_or_tls)?);
            if check_client_name {
                let cert = tls.peer_certificate().unwrap_or_default();
                handshake.check_peer_name(Box::new(move |node| crate::tls::certifies_host(&cert, node)));
            }
        }
        let mut out = Vec::new();
        let (used, progress) = handshake.feed(&buf[..n], &mut out)?;
        if !out.is_empty() {
            send_all(socket, tls, &out).map_err(io_or_tls)?;
        }
        if let Progress::Done(peer) = progress {
            return Ok(Some((peer, buf[used..n].to_vec())));
        }
    }
}

/// Client handshake: readable. Once done, announces the pool and becomes a member.
pub(super) fn client_handshake(
    conn: &mut Conn,
    services: &Services,
    io: crate::io_slot::IoSlot,
) -> Result<Next, End> {
    let State::ClientHandshake { handshake, .. } = &mut conn.state else {
        return Ok(Next::Wait);
    };
    let done = read_handshake(&conn.socket, &mut conn.tls, handshake, false)
        .map_err(|e| End::Dial(OpenError::handshake(&e)))?;
    let Some((server, extra)) = done else {
        return Ok(Next::Wait);
    };
    // The server writes nothing after its proof on a connection only we write on.
    if !extra.is_empty() {
        return Err(End::Dial(OpenError::handshake(&HandshakeError::Malformed(
            "data after the handshake",
        ))));
    }
    let State::ClientHandshake { member, .. } = std::mem::replace(&mut conn.state, State::Gone) else {
        unreachable!("checked above");
    };
    conn.deadline = None;
    let mut member = member;
    let pool = member.pool.clone();
    let announce = encode_frame(FrameKind::PoolEpoch, &pool.token);
    let send_buffer = crate::send_buffer::apply(&conn.socket, services.config.sndbuf);
    let counters = send_all(&conn.socket, &mut conn.tls, &announce)
        .and_then(|()| ConnStats::new(&conn.socket))
        .map(|counters| counters.with_send_buffer(send_buffer));
    let counters = match counters {
        Ok(counters) => counters,
        Err(e) => {
            member.fail(OpenError::io(&e));
            return Err(End::Dial(OpenError::io(&e)));
        }
    };
    let config = &services.config;
    let connection = Arc::new(SendQueue::new(
        conn.socket.clone(),
        io,
        config,
        pool.stats.clone(),
        pool.small_frames.clone(),
        counters,
        conn.tls.is_none(),
        server.capabilities,
    ));
    member.conn = Some(connection.clone());
    crate::faults::check(crate::faults::Point::Watcher, &pool.peer);
    let joined = pool.joined(member.index, connection.clone());
    match joined {
        Joined::DialNext => member.threads.dial(&member.services, &member.threads, &pool, 1),
        Joined::Complete => {
            if services.pools.publish(&pool) {
                services.host.event(Event::PoolUp {
                    peer: pool.peer.clone(),
                    connections: pool.size(),
                });
            }
        }
        Joined::Closing => {}
    }
    conn.state = State::Outbound {
        member,
        conn: connection,
    };
    if joined == Joined::Closing {
        return Err(End::Close(pool.close_reason()));
    }
    Ok(Next::Wait)
}

/// Server handshake (on the handshake thread): readable. Once done, the connection goes
/// to an I/O thread.
pub(super) fn server_handshake(conn: &mut Conn, services: &Services) -> Result<Next, End> {
    let State::ServerHandshake {
        handshake,
        not_before,
        ..
    } = &mut conn.state
    else {
        return Ok(Next::Wait);
    };
    if not_before.is_some_and(|t| Instant::now() < t) {
        return Ok(Next::Wait);
    }
    *not_before = None;
    let check_client_name = services
        .config
        .tls
        .as_ref()
        .is_some_and(|tls| tls.verify_peer && tls.client_name_check);
    let done = read_handshake(&conn.socket, &mut conn.tls, handshake, check_client_name)
        .map_err(|e| End::Handshake(e.reason(), e.to_string()))?;
    let Some((client, early)) = done else {
        return Ok(Next::Wait);
    };
    // The handshake slot goes back to the listener here.
    let State::ServerHandshake { open, remote, .. } = std::mem::replace(&mut conn.state, State::Gone) else {
        unreachable!("checked above");
    };
    services.listener.handshake_succeeded(remote);
    conn.deadline = None;
    crate::socket::set_connection_options(&conn.socket);
    conn.state = State::Authenticated { open, client, early };
    Ok(Next::HandOver)
}

/// Authenticated, on the I/O thread that adopted it: the connection reads frames.
pub(super) fn start_inbound(
    conn: &mut Conn,
    services: &Services,
    deferral: crate::host::Deferral,
) -> Result<Next, End> {
    let State::Authenticated { open, client, early } = std::mem::replace(&mut conn.state, State::Gone) else {
        return Ok(Next::Wait);
    };
    let config = &services.config;
    let admitted = services.stats.admit(&client.node, |peer| {
        services.pools.token(peer).is_none() && !services.inbound.has(peer)
    });
    let Some(stats) = admitted else {
        return Err(End::Close(CloseReason::BadFrame(FrameRefusal::TooManyPeers)));
    };
    let inbound = Inbound::new(crate::inbound::InboundSetup {
        stats,
        peer: client.node,
        socket: conn.socket.clone(),
        deferral,
        host: services.host.clone(),
        pools: services.inbound.clone(),
        max_frame_bytes: config.max_frame_bytes,
        partial_grace: config.handshake_timeout,
        early,
    })
    .map_err(|e| End::Close(CloseReason::io(&e)))?;
    conn.state = State::Inbound { _open: open, inbound };
    // Frames may have come with the handshake, or be in the socket already: no new
    // readiness event would say so.
    Ok(Next::Again)
}

/// Outbound: readable. The peer never writes after the handshake, so anything it
/// sends, or its end of stream, means the connection is gone (or the peer misbehaves).
/// With TLS, records still come (alerts, key updates): only application data is
/// unexpected.
pub(super) fn outbound_readable(conn: &mut Conn) -> Result<Next, End> {
    let mut buf = [0u8; 64];
    loop {
        return match receive(&conn.socket, &mut conn.tls, &mut buf) {
            Ok(0) => Err(End::Close(CloseReason::PeerClosed)),
            Ok(_) => Err(End::Close(CloseReason::UnexpectedData)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Next::Wait),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(End::Close(CloseReason::io(&e))),
        };
    }
}

/// Outbound: writable, or frames were queued. `bulk` is set when a large write went out.
pub(super) fn outbound_flush(conn: &mut Conn, bulk: &mut bool) -> Result<Next, End> {
    let State::Outbound {
        member,
        conn: connection,
    } = &conn.state
    else {
        return Ok(Next::Wait);
    };
    crate::faults::check(crate::faults::Point::Writer, &member.pool.peer);
    if connection.is_closed() {
        return Err(End::Close(member.pool.close_reason()));
    }
    let flushed = match &mut conn.tls {
        // Encrypted by this thread: what rustls holds goes out first, then frames while
        // its output stays small.
        Some(tls) => tls
            .push(&conn.socket)
            .and_then(|_| connection.flush_to(TURN_BYTES, &mut tls.writer(&conn.socket))),
        None => connection.flush(TURN_BYTES),
    };
    let (flushed, written) = flushed.map_err(|e| End::Close(CloseReason::io(&e)))?;
    *bulk |= written > BULK_BYTES;
    Ok(match flushed {
        Flushed::More => Next::Again,
        Flushed::Idle | Flushed::Blocked => Next::Wait,
    })
}

/// Inbound: readable (or resumed, or a turn left more to read).
pub(super) fn inbound_read(conn: &mut Conn) -> Result<(Next, bool), End> {
    let State::Inbound { inbound, .. } = &mut conn.state else {
        return Ok((Next::Wait, false));
    };
    let turn = inbound
        .read(TURN_BYTES, conn.tls.as_deref_mut())
        .map_err(End::Close)?;
    // A large body under way must be whole by then, or the connection ends: a peer
    // cannot make the node hold its buffer forever.
    conn.deadline = inbound.partial_deadline();
    let bulk = inbound.take_bulk();
    Ok((
        if turn == ReadTurn::More {
            Next::Again
        } else {
            Next::Wait
        },
        bulk,
    ))
}
