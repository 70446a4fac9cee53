//! The handshake over a blocking socket, for tests: the I/O engine drives the same
//! state machine (`Handshake`) without blocking. Built only with `cfg(test)` or the
//! `test-hooks` feature.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{Capabilities, Handshake, HandshakeError, Peer, Progress, MAX_HANDSHAKE_MESSAGE};

pub struct HandshakeConfig<'a> {
    pub cookie: &'a [u8],
    /// This node's name, e.g. "a@127.0.0.1".
    pub local_node: &'a str,
    pub capabilities: Capabilities,
    /// Deadline for the whole handshake, not for each read.
    pub timeout: Duration,
}

/// Client side, run right after connect. `server_node` is the node name we expect to reach.
pub fn client_handshake(
    stream: &TcpStream,
    cfg: &HandshakeConfig,
    server_node: &str,
) -> Result<(), HandshakeError> {
    let deadline = Deadline::after(cfg.timeout);
    let (mut handshake, hello) =
        Handshake::client(cfg.cookie, cfg.local_node, server_node, cfg.capabilities)?;
    run(stream, &deadline, &mut handshake, hello).map(|_server| ())
}

/// Server side, run on an accepted socket. Returns the authenticated client.
pub fn server_handshake(stream: &TcpStream, cfg: &HandshakeConfig) -> Result<Peer, HandshakeError> {
    let deadline = Deadline::after(cfg.timeout);
    let mut handshake = Handshake::server(cfg.cookie, cfg.local_node, cfg.capabilities);
    run(stream, &deadline, &mut handshake, Vec::new())
}

/// One deadline for the whole handshake; every read and write gets only the time left.
struct Deadline(Instant);

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        let now = Instant::now();
        // Instant + a huge Duration would panic; a day is "forever" for a handshake.
        Deadline(
            now.checked_add(timeout)
                .unwrap_or(now + Duration::from_secs(86_400)),
        )
    }

    /// Time left, or `Timeout` once it is gone (a zero socket timeout is an error).
    fn remaining(&self) -> Result<Duration, HandshakeError> {
        match self.0.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(HandshakeError::Timeout),
        }
    }
}

/// Drives `handshake` over a blocking socket, `first` being what to send before reading.
/// Each read asks for no more than the message being read still lacks, so the
/// connection's first frames stay in the socket for its owner.
fn run(
    stream: &TcpStream,
    deadline: &Deadline,
    handshake: &mut Handshake,
    first: Vec<u8>,
) -> Result<Peer, HandshakeError> {
    let mut out = first;
    let mut buf = [0u8; MAX_HANDSHAKE_MESSAGE];
    loop {
        send(stream, deadline, &mut out)?;
        let n = match read_some(stream, deadline, &mut buf[..handshake.wanted()]) {
            Ok(0) => return Err(handshake.closed_error()),
            Ok(n) => n,
            // A peer closing with our bytes unread resets instead: the same silent rejection.
            Err(HandshakeError::Io(e))
                if e.kind() == io::ErrorKind::ConnectionReset && handshake.proof_sent() =>
            {
                return Err(HandshakeError::BadCookie)
            }
            Err(e) => return Err(e),
        };
        let (consumed, progress) = handshake.feed(&buf[..n], &mut out)?;
        debug_assert_eq!(consumed, n, "read past the message");
        if let Progress::Done(peer) = progress {
            send(stream, deadline, &mut out)?;
            clear_timeouts(stream)?;
            return Ok(peer);
        }
    }
}

/// Socket timeouts surface as WouldBlock (Unix) or TimedOut (Windows).
fn io_error(e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout,
        _ => HandshakeError::Io(e),
    }
}

/// One `read` (0 at end of stream), with the read timeout re-armed to the time left so
/// that a peer sending one byte at a time still runs into the overall deadline.
fn read_some(stream: &TcpStream, deadline: &Deadline, buf: &mut [u8]) -> Result<usize, HandshakeError> {
    let mut reader = stream;
    loop {
        stream
            .set_read_timeout(Some(deadline.remaining()?))
            .map_err(io_error)?;
        match reader.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
}

/// Writes and empties `out`, if there is anything in it.
fn send(stream: &TcpStream, deadline: &Deadline, out: &mut Vec<u8>) -> Result<(), HandshakeError> {
    if out.is_empty() {
        return Ok(());
    }
    let mut writer = stream;
    stream
        .set_write_timeout(Some(deadline.remaining()?))
        .map_err(io_error)?;
    writer.write_all(out).map_err(io_error)?;
    out.clear();
    Ok(())
}

/// After the handshake the connection's owner does blocking I/O of its own.
fn clear_timeouts(stream: &TcpStream) -> Result<(), HandshakeError> {
    stream.set_read_timeout(None).map_err(HandshakeError::Io)?;
    stream.set_write_timeout(None).map_err(HandshakeError::Io)
}
