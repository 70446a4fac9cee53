//! The handshake that opens every teleport TCP connection.
//!
//! Both ends prove they know the shared Erlang cookie by HMAC-SHA256
//! challenge-response over fresh random nonces, without ever sending the cookie:
//!
//! 1. HELLO        client -> server  `[version][nonce_c][len][client_node][len][server_node]`
//! 2. CHALLENGE    server -> client  `[version][nonce_s]`
//! 3. CLIENT_PROOF client -> server  `[HMAC(cookie, transcript("client"))]`
//! 4. SERVER_PROOF server -> client  `[HMAC(cookie, transcript("server"))]`
//!
//! Every message is `[u16 big-endian length][u8 tag][body]`, the length counting
//! tag + body. The server faces the network, so a reader checks the length against
//! `MAX_HANDSHAKE_MESSAGE` before allocating, parses strictly, and the whole
//! handshake runs against one deadline, so a peer trickling bytes cannot hold a
//! socket open forever.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const PROTOCOL_VERSION: u8 = 1;
pub const NONCE_LEN: usize = 32;
/// Cap on one message's length field (tag + body). The largest message, HELLO
/// with two 255-byte names, is 546 bytes.
pub const MAX_HANDSHAKE_MESSAGE: usize = 600;
pub const MAX_NODE_NAME: usize = 255;

pub(crate) const TAG_HELLO: u8 = 1;
pub(crate) const TAG_CHALLENGE: u8 = 2;
pub(crate) const TAG_CLIENT_PROOF: u8 = 3;
pub(crate) const TAG_SERVER_PROOF: u8 = 4;

const MAC_LEN: usize = 32;
const TRANSCRIPT_PREFIX: &[u8] = b"teleport-v1 ";
const ROLE_CLIENT: &str = "client";
const ROLE_SERVER: &str = "server";

type HmacSha256 = Hmac<Sha256>;
pub(crate) type Nonce = [u8; NONCE_LEN];
pub(crate) type MacBytes = [u8; MAC_LEN];

pub struct HandshakeConfig<'a> {
    pub cookie: &'a [u8],
    /// This node's name, e.g. "a@127.0.0.1".
    pub local_node: &'a str,
    /// Deadline for the whole handshake, not for each read.
    pub timeout: Duration,
}

#[derive(Debug)]
pub enum HandshakeError {
    /// Socket error, including unexpected EOF.
    Io(io::Error),
    /// The handshake deadline passed.
    Timeout,
    Malformed(&'static str),
    /// A length field of 0 or above `MAX_HANDSHAKE_MESSAGE`.
    Oversized(usize),
    Version(u8),
    /// The hello named a server node that is not us.
    WrongNode,
    /// The peer claims our own node name (or we were asked to dial ourselves).
    OwnNodeName,
    BadNodeName,
    /// A proof did not verify.
    BadCookie,
}

impl HandshakeError {
    /// Snake_case, atom-like name of the error kind.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Io(_) => "io",
            HandshakeError::Timeout => "timeout",
            HandshakeError::Malformed(_) => "malformed",
            HandshakeError::Oversized(_) => "oversized",
            HandshakeError::Version(_) => "version",
            HandshakeError::WrongNode => "wrong_node",
            HandshakeError::OwnNodeName => "own_node_name",
            HandshakeError::BadNodeName => "bad_node_name",
            HandshakeError::BadCookie => "bad_cookie",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "i/o error: {e}"),
            HandshakeError::Timeout => f.write_str("timed out"),
            HandshakeError::Malformed(what) => write!(f, "malformed message: {what}"),
            HandshakeError::Oversized(len) => write!(f, "message length {len} out of range"),
            HandshakeError::Version(v) => write!(f, "unsupported protocol version {v}"),
            HandshakeError::WrongNode => f.write_str("wrong node"),
            HandshakeError::OwnNodeName => f.write_str("peer claims our own node name"),
            HandshakeError::BadNodeName => f.write_str("bad node name"),
            HandshakeError::BadCookie => f.write_str("bad cookie"),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandshakeError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// True for `name@host` with non-empty name and host, exactly one '@',
/// 1..=MAX_NODE_NAME bytes, ASCII letters, digits and `_ - . @` only.
pub fn valid_node_name(name: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@');
    if name.is_empty() || name.len() > MAX_NODE_NAME || !name.bytes().all(allowed) {
        return false;
    }
    match name.split_once('@') {
        Some((local, host)) => !local.is_empty() && !host.is_empty() && !host.contains('@'),
        None => false,
    }
}

/// Client side, run right after connect. `server_node` is the node name we expect to reach.
pub fn client_handshake(
    stream: &TcpStream,
    cfg: &HandshakeConfig,
    server_node: &str,
) -> Result<(), HandshakeError> {
    // Names go on the wire with a u8 length, so they must be checked before encoding.
    if !valid_node_name(cfg.local_node) || !valid_node_name(server_node) {
        return Err(HandshakeError::BadNodeName);
    }
    if server_node == cfg.local_node {
        return Err(HandshakeError::OwnNodeName);
    }
    let deadline = Deadline::after(cfg.timeout);
    let nonce_c = random_nonce()?;

    let hello = encode_hello(&nonce_c, cfg.local_node, server_node);
    write_message(stream, &deadline, TAG_HELLO, &hello)?;

    let nonce_s = accept_challenge(&read_message(stream, &deadline)?, &nonce_c)?;
    let proof = client_proof(cfg.cookie, &nonce_c, &nonce_s, cfg.local_node, server_node);
    write_message(stream, &deadline, TAG_CLIENT_PROOF, &proof)?;

    // A server that rejects our proof closes without a word: the cookies differ.
    let server_proof = read_message(stream, &deadline).map_err(|e| match e {
        HandshakeError::Io(ref io) if closed_by_peer(io) => HandshakeError::BadCookie,
        other => other,
    })?;
    check_server_proof(
        cfg.cookie,
        &nonce_c,
        &nonce_s,
        cfg.local_node,
        server_node,
        &server_proof,
    )?;

    clear_timeouts(stream)
}

/// Server side, run on an accepted socket. Returns the authenticated client's node name.
pub fn server_handshake(stream: &TcpStream, cfg: &HandshakeConfig) -> Result<String, HandshakeError> {
    let deadline = Deadline::after(cfg.timeout);

    let hello = accept_hello(&read_message(stream, &deadline)?, cfg.local_node)?;

    let nonce_s = random_nonce()?;
    write_message(stream, &deadline, TAG_CHALLENGE, &challenge_body(&nonce_s))?;

    // On a bad proof send nothing: the caller closes the socket, and the client
    // learns no more than that it failed.
    let proof = check_client_proof(cfg.cookie, &hello, &nonce_s, &read_message(stream, &deadline)?)?;
    write_message(stream, &deadline, TAG_SERVER_PROOF, &proof)?;

    clear_timeouts(stream)?;
    Ok(hello.client_node)
}

// ---------------------------------------------------------------------------
// Each step on received bytes, without the socket (the fuzz targets drive these too)

/// Server: a HELLO (tag + body) that names us.
pub(crate) fn accept_hello(msg: &[u8], local_node: &str) -> Result<Hello, HandshakeError> {
    let hello = parse_hello(msg)?;
    if hello.server_node != local_node {
        return Err(HandshakeError::WrongNode);
    }
    // Only a node that shares our cookie could prove it; refused all the same, as two
    // nodes under one name would have their pools and calls mixed up.
    if hello.client_node == local_node {
        return Err(HandshakeError::OwnNodeName);
    }
    Ok(hello)
}

pub(crate) fn challenge_body(nonce_s: &Nonce) -> Vec<u8> {
    let mut challenge = Vec::with_capacity(1 + NONCE_LEN);
    challenge.push(PROTOCOL_VERSION);
    challenge.extend_from_slice(nonce_s);
    challenge
}

/// Server: checks the CLIENT_PROOF (tag + body) and returns the server's proof.
pub(crate) fn check_client_proof(
    cookie: &[u8],
    hello: &Hello,
    nonce_s: &Nonce,
    msg: &[u8],
) -> Result<MacBytes, HandshakeError> {
    let client_mac = parse_proof(msg, TAG_CLIENT_PROOF)?;
    let (nonce_c, client, server) = (&hello.nonce_c, &hello.client_node, &hello.server_node);
    verify(
        cookie,
        &transcript(ROLE_CLIENT, nonce_c, nonce_s, client, server),
        &client_mac,
    )?;
    Ok(prove(
        cookie,
        &transcript(ROLE_SERVER, nonce_c, nonce_s, client, server),
    ))
}

/// Client: the server's nonce from a CHALLENGE (tag + body).
pub(crate) fn accept_challenge(msg: &[u8], nonce_c: &Nonce) -> Result<Nonce, HandshakeError> {
    let nonce_s = parse_challenge(msg)?;
    // A server echoing our nonce back could be replaying our own messages at us.
    if nonce_s == *nonce_c {
        return Err(HandshakeError::Malformed("challenge reflects our nonce"));
    }
    Ok(nonce_s)
}

pub(crate) fn client_proof(
    cookie: &[u8],
    nonce_c: &Nonce,
    nonce_s: &Nonce,
    client_node: &str,
    server_node: &str,
) -> MacBytes {
    prove(
        cookie,
        &transcript(ROLE_CLIENT, nonce_c, nonce_s, client_node, server_node),
    )
}

/// Client: checks the SERVER_PROOF (tag + body).
pub(crate) fn check_server_proof(
    cookie: &[u8],
    nonce_c: &Nonce,
    nonce_s: &Nonce,
    client_node: &str,
    server_node: &str,
    msg: &[u8],
) -> Result<(), HandshakeError> {
    let server_mac = parse_proof(msg, TAG_SERVER_PROOF)?;
    let server_transcript = transcript(ROLE_SERVER, nonce_c, nonce_s, client_node, server_node);
    verify(cookie, &server_transcript, &server_mac)
}

// ---------------------------------------------------------------------------
// Deadline-bounded socket I/O

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

fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    )
}

/// Socket timeouts surface as WouldBlock (Unix) or TimedOut (Windows).
fn io_error(e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout,
        _ => HandshakeError::Io(e),
    }
}

/// Like `read_exact`, but re-arms the read timeout before every `read` so that
/// a peer sending one byte at a time still runs into the overall deadline.
fn read_full(stream: &TcpStream, deadline: &Deadline, buf: &mut [u8]) -> Result<(), HandshakeError> {
    let mut reader = stream;
    let mut filled = 0;
    while filled < buf.len() {
        stream
            .set_read_timeout(Some(deadline.remaining()?))
            .map_err(io_error)?;
        match reader.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(HandshakeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during handshake",
                )))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(())
}

/// Reads one message and returns tag + body. The length is checked before
/// anything is allocated, so the allocation never exceeds `MAX_HANDSHAKE_MESSAGE`.
fn read_message(stream: &TcpStream, deadline: &Deadline) -> Result<Vec<u8>, HandshakeError> {
    let mut len_bytes = [0u8; 2];
    read_full(stream, deadline, &mut len_bytes)?;
    let mut msg = vec![0u8; message_len(len_bytes)?];
    read_full(stream, deadline, &mut msg)?;
    Ok(msg)
}

/// A message's length field, refused when 0 or over `MAX_HANDSHAKE_MESSAGE`.
pub(crate) fn message_len(len_bytes: [u8; 2]) -> Result<usize, HandshakeError> {
    let len = usize::from(u16::from_be_bytes(len_bytes));
    if len == 0 || len > MAX_HANDSHAKE_MESSAGE {
        return Err(HandshakeError::Oversized(len));
    }
    Ok(len)
}

/// `[u16 length][tag][body]` in one buffer, so it goes out in a single write.
pub(crate) fn encode_message(tag: u8, body: &[u8]) -> Vec<u8> {
    // Bodies are built here from validated parts and stay far below u16::MAX.
    let len = (1 + body.len()) as u16;
    let mut out = Vec::with_capacity(2 + 1 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(tag);
    out.extend_from_slice(body);
    out
}

fn write_message(
    stream: &TcpStream,
    deadline: &Deadline,
    tag: u8,
    body: &[u8],
) -> Result<(), HandshakeError> {
    let mut writer = stream;
    stream
        .set_write_timeout(Some(deadline.remaining()?))
        .map_err(io_error)?;
    writer.write_all(&encode_message(tag, body)).map_err(io_error)
}

/// After the handshake the connection's owner does blocking I/O of its own.
fn clear_timeouts(stream: &TcpStream) -> Result<(), HandshakeError> {
    stream.set_read_timeout(None).map_err(HandshakeError::Io)?;
    stream.set_write_timeout(None).map_err(HandshakeError::Io)
}

// ---------------------------------------------------------------------------
// Message encoding and strict parsing

/// Walks a received message; running short is `Malformed`, never a panic.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandshakeError> {
        if self.0.len() < n {
            return Err(HandshakeError::Malformed("message too short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, HandshakeError> {
        let b = self.take(1)?;
        Ok(b[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], HandshakeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Checks the tag, the first byte of every message.
    fn tag(&mut self, expected: u8, what: &'static str) -> Result<(), HandshakeError> {
        if self.byte()? == expected {
            Ok(())
        } else {
            Err(HandshakeError::Malformed(what))
        }
    }

    /// Checks the version; done before the rest of the body, whose layout a
    /// different version may change.
    fn version(&mut self) -> Result<(), HandshakeError> {
        match self.byte()? {
            PROTOCOL_VERSION => Ok(()),
            v => Err(HandshakeError::Version(v)),
        }
    }

    /// Bodies have an exact length; anything left over is an error.
    fn finish(self) -> Result<(), HandshakeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(HandshakeError::Malformed("trailing bytes"))
        }
    }
}

#[derive(Debug)]
pub(crate) struct Hello {
    nonce_c: Nonce,
    pub client_node: String,
    server_node: String,
}

/// Appends `[u8 len][name]`; callers pass names that passed `valid_node_name`.
fn push_name(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

pub(crate) fn encode_hello(nonce_c: &Nonce, client_node: &str, server_node: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + NONCE_LEN + 2 + client_node.len() + server_node.len());
    body.push(PROTOCOL_VERSION);
    body.extend_from_slice(nonce_c);
    push_name(&mut body, client_node);
    push_name(&mut body, server_node);
    body
}

fn node_name(bytes: &[u8]) -> Result<String, HandshakeError> {
    match std::str::from_utf8(bytes) {
        Ok(name) if valid_node_name(name) => Ok(name.to_owned()),
        _ => Err(HandshakeError::BadNodeName),
    }
}

/// Parses a HELLO message (tag + body).
fn parse_hello(msg: &[u8]) -> Result<Hello, HandshakeError> {
    let mut c = Cursor(msg);
    c.tag(TAG_HELLO, "expected hello")?;
    c.version()?;
    let nonce_c = c.array::<NONCE_LEN>()?;
    let client_len = usize::from(c.byte()?);
    let client_node = c.take(client_len)?;
    let server_len = usize::from(c.byte()?);
    let server_node = c.take(server_len)?;
    c.finish()?;
    Ok(Hello {
        nonce_c,
        client_node: node_name(client_node)?,
        server_node: node_name(server_node)?,
    })
}

/// Parses a CHALLENGE message and returns the server's nonce.
fn parse_challenge(msg: &[u8]) -> Result<Nonce, HandshakeError> {
    let mut c = Cursor(msg);
    c.tag(TAG_CHALLENGE, "expected challenge")?;
    c.version()?;
    let nonce_s = c.array::<NONCE_LEN>()?;
    c.finish()?;
    Ok(nonce_s)
}

/// Parses a CLIENT_PROOF or SERVER_PROOF message and returns the MAC.
fn parse_proof(msg: &[u8], tag: u8) -> Result<MacBytes, HandshakeError> {
    let mut c = Cursor(msg);
    c.tag(tag, "expected proof")?;
    let mac = c.array::<MAC_LEN>()?;
    c.finish()?;
    Ok(mac)
}

// ---------------------------------------------------------------------------
// Proofs

fn random_nonce() -> Result<Nonce, HandshakeError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut nonce)
        .map_err(|e| HandshakeError::Io(io::Error::other(format!("random source: {e}"))))?;
    Ok(nonce)
}

/// What a proof signs. The role keeps one side's proof from being replayed as the
/// other's; both nonces make it fresh; the names bind it to this pair of nodes.
fn transcript(role: &str, nonce_c: &Nonce, nonce_s: &Nonce, client_node: &str, server_node: &str) -> Vec<u8> {
    let mut t = Vec::with_capacity(
        TRANSCRIPT_PREFIX.len() + role.len() + 2 * NONCE_LEN + 2 + client_node.len() + server_node.len(),
    );
    t.extend_from_slice(TRANSCRIPT_PREFIX);
    t.extend_from_slice(role.as_bytes());
    t.extend_from_slice(nonce_c);
    t.extend_from_slice(nonce_s);
    push_name(&mut t, client_node);
    push_name(&mut t, server_node);
    t
}

fn keyed_mac(cookie: &[u8]) -> HmacSha256 {
    // HMAC hashes or pads keys of any length, so this cannot fail.
    HmacSha256::new_from_slice(cookie).expect("HMAC accepts keys of any length")
}

fn prove(cookie: &[u8], transcript: &[u8]) -> MacBytes {
    let mut mac = keyed_mac(cookie);
    mac.update(transcript);
    mac.finalize().into_bytes().into()
}

/// Constant-time comparison (`verify_slice`), so timing leaks nothing about the MAC.
fn verify(cookie: &[u8], transcript: &[u8], received: &MacBytes) -> Result<(), HandshakeError> {
    let mut mac = keyed_mac(cookie);
    mac.update(transcript);
    mac.verify_slice(received).map_err(|_| HandshakeError::BadCookie)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;

    const COOKIE: &[u8] = b"monster-cookie";
    const CLIENT: &str = "a@127.0.0.1";
    const SERVER: &str = "b@127.0.0.1";

    fn cfg(cookie: &'static [u8], node: &'static str, timeout: Duration) -> HandshakeConfig<'static> {
        HandshakeConfig {
            cookie,
            local_node: node,
            timeout,
        }
    }

    /// A connected loopback pair: (client end, server end).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Runs the server handshake on its own thread; the socket is closed when it ends.
    fn spawn_server(
        server: TcpStream,
        cookie: &'static [u8],
        timeout: Duration,
    ) -> thread::JoinHandle<Result<String, HandshakeError>> {
        thread::spawn(move || server_handshake(&server, &cfg(cookie, SERVER, timeout)))
    }

    fn hello_message(version: u8, client_node: &[u8], server_node: &[u8]) -> Vec<u8> {
        let mut body = vec![version];
        body.extend_from_slice(&[7u8; NONCE_LEN]);
        body.push(client_node.len() as u8);
        body.extend_from_slice(client_node);
        body.push(server_node.len() as u8);
        body.extend_from_slice(server_node);
        encode_message(TAG_HELLO, &body)
    }

    /// Deterministic xorshift64, so garbage tests are reproducible without extra crates.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, max_len: usize) -> Vec<u8> {
            let len = (self.next() % (max_len as u64 + 1)) as usize;
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn handshake_right_cookie_succeeds_both_sides() {
        let (client, server) = pair();
        let srv = thread::spawn(move || {
            let result = server_handshake(&server, &cfg(COOKIE, SERVER, Duration::from_secs(5)));
            (result, server.read_timeout().unwrap())
        });
        let client_result = client_handshake(&client, &cfg(COOKIE, CLIENT, Duration::from_secs(5)), SERVER);
        let (server_result, server_timeout) = srv.join().unwrap();

        assert!(client_result.is_ok(), "client: {client_result:?}");
        assert_eq!(server_result.unwrap(), CLIENT);
        // Timeouts are restored so the connection's owner can block freely.
        assert_eq!(client.read_timeout().unwrap(), None);
        assert_eq!(client.write_timeout().unwrap(), None);
        assert_eq!(server_timeout, None);
    }

    #[test]
    fn handshake_wrong_cookie_fails_both_sides() {
        let (client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(5));
        let client_result = client_handshake(
            &client,
            &cfg(b"other-cookie", CLIENT, Duration::from_secs(5)),
            SERVER,
        );
        let server_result = srv.join().unwrap();

        assert!(
            matches!(server_result, Err(HandshakeError::BadCookie)),
            "{server_result:?}"
        );
        // The server closes without a word; the client names why.
        assert!(
            matches!(client_result, Err(HandshakeError::BadCookie)),
            "{client_result:?}"
        );
    }

    #[test]
    fn handshake_wrong_server_node_rejected() {
        let (client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(5));
        let client_result = client_handshake(
            &client,
            &cfg(COOKIE, CLIENT, Duration::from_secs(5)),
            "c@127.0.0.1",
        );
        let server_result = srv.join().unwrap();

        assert!(
            matches!(server_result, Err(HandshakeError::WrongNode)),
            "{server_result:?}"
        );
        assert!(client_result.is_err());
    }

    #[test]
    fn handshake_truncated_hello_is_unexpected_eof() {
        let (mut client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(5));
        let hello = hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), SERVER.as_bytes());
        client.write_all(&hello[..hello.len() / 2]).unwrap();
        drop(client);

        match srv.join().unwrap() {
            Err(HandshakeError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected unexpected EOF, got {other:?}"),
        }
    }

    #[test]
    fn handshake_oversized_length_rejected_promptly() {
        let (mut client, server) = pair();
        let started = Instant::now();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(10));
        // Only the length goes out and the socket stays open: the server must not wait for a body.
        client.write_all(&[0xFF, 0xFF]).unwrap();
        let result = srv.join().unwrap();

        assert!(
            matches!(result, Err(HandshakeError::Oversized(65535))),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(client);
    }

    #[test]
    fn handshake_length_just_over_cap_rejected() {
        let (mut client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(10));
        let len = (MAX_HANDSHAKE_MESSAGE + 1) as u16;
        client.write_all(&len.to_be_bytes()).unwrap();
        let result = srv.join().unwrap();

        assert!(
            matches!(result, Err(HandshakeError::Oversized(n)) if n == MAX_HANDSHAKE_MESSAGE + 1),
            "{result:?}"
        );
    }

    #[test]
    fn handshake_zero_length_rejected() {
        let (mut client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(10));
        client.write_all(&[0, 0]).unwrap();
        let result = srv.join().unwrap();

        assert!(matches!(result, Err(HandshakeError::Oversized(0))), "{result:?}");
    }

    #[test]
    fn handshake_silent_client_times_out() {
        let (client, server) = pair();
        let started = Instant::now();
        let result = server_handshake(&server, &cfg(COOKIE, SERVER, Duration::from_millis(200)));
        let elapsed = started.elapsed();

        assert!(matches!(result, Err(HandshakeError::Timeout)), "{result:?}");
        assert!(
            elapsed >= Duration::from_millis(150),
            "gave up too early: {elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
        drop(client);
    }

    #[test]
    fn handshake_trickling_client_hits_overall_deadline() {
        let (mut client, server) = pair();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_trickle = Arc::clone(&stop);
        // A valid hello, one byte every 50 ms: each read succeeds, only the overall deadline stops it.
        let trickle = thread::spawn(move || {
            let hello = hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), SERVER.as_bytes());
            for byte in hello {
                if stop_trickle.load(Ordering::Relaxed) || client.write_all(&[byte]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });

        let started = Instant::now();
        let result = server_handshake(&server, &cfg(COOKIE, SERVER, Duration::from_millis(300)));
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        trickle.join().unwrap();

        assert!(matches!(result, Err(HandshakeError::Timeout)), "{result:?}");
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    }

    #[test]
    fn handshake_version_mismatch_rejected() {
        let hello = hello_message(2, CLIENT.as_bytes(), SERVER.as_bytes());
        assert!(matches!(
            parse_hello(&hello[2..]),
            Err(HandshakeError::Version(2))
        ));

        let mut challenge = vec![TAG_CHALLENGE, 9];
        challenge.extend_from_slice(&[1u8; NONCE_LEN]);
        assert!(matches!(
            parse_challenge(&challenge),
            Err(HandshakeError::Version(9))
        ));

        // And over a socket.
        let (mut client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(5));
        client.write_all(&hello).unwrap();
        let result = srv.join().unwrap();
        assert!(matches!(result, Err(HandshakeError::Version(2))), "{result:?}");
    }

    #[test]
    fn a_peer_claiming_our_own_name_is_refused() {
        // As the server: a hello from "us" to us.
        let hello = hello_message(PROTOCOL_VERSION, SERVER.as_bytes(), SERVER.as_bytes());
        assert!(matches!(
            accept_hello(&hello[2..], SERVER),
            Err(HandshakeError::OwnNodeName)
        ));
        assert!(accept_hello(
            &hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), SERVER.as_bytes())[2..],
            SERVER
        )
        .is_ok());
        // As the client: dialing ourselves is refused before anything is sent.
        let (client, _server) = pair();
        let c = HandshakeConfig {
            cookie: COOKIE,
            local_node: CLIENT,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            client_handshake(&client, &c, CLIENT),
            Err(HandshakeError::OwnNodeName)
        ));
    }

    #[test]
    fn handshake_bad_node_names_rejected() {
        for bad in ["noat", "a@b@c", "", "a@b c"] {
            let as_client = hello_message(PROTOCOL_VERSION, bad.as_bytes(), SERVER.as_bytes());
            let as_server = hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), bad.as_bytes());
            for hello in [as_client, as_server] {
                let result = parse_hello(&hello[2..]);
                assert!(
                    matches!(result, Err(HandshakeError::BadNodeName)),
                    "{bad:?}: {result:?}"
                );
            }
        }
        // Not UTF-8 at all.
        let hello = hello_message(PROTOCOL_VERSION, b"a@\xff", SERVER.as_bytes());
        assert!(matches!(
            parse_hello(&hello[2..]),
            Err(HandshakeError::BadNodeName)
        ));

        // A 300-byte name cannot even be encoded; the client refuses it before sending.
        let long = format!("{}@h", "n".repeat(298));
        assert_eq!(long.len(), 300);
        let (client, _server) = pair();
        let c = HandshakeConfig {
            cookie: COOKIE,
            local_node: &long,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            client_handshake(&client, &c, SERVER),
            Err(HandshakeError::BadNodeName)
        ));
        let c = cfg(COOKIE, CLIENT, Duration::from_secs(1));
        assert!(matches!(
            client_handshake(&client, &c, &long),
            Err(HandshakeError::BadNodeName)
        ));
        assert!(matches!(
            client_handshake(&client, &c, "a@b c"),
            Err(HandshakeError::BadNodeName)
        ));
    }

    #[test]
    fn handshake_bad_node_name_over_socket() {
        let (mut client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(5));
        client
            .write_all(&hello_message(PROTOCOL_VERSION, b"a@b@c", SERVER.as_bytes()))
            .unwrap();
        let result = srv.join().unwrap();
        assert!(matches!(result, Err(HandshakeError::BadNodeName)), "{result:?}");
    }

    #[test]
    fn handshake_strict_parsing() {
        let hello = hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), SERVER.as_bytes());
        let parsed = parse_hello(&hello[2..]).unwrap();
        assert_eq!(parsed.client_node, CLIENT);
        assert_eq!(parsed.server_node, SERVER);
        assert_eq!(parsed.nonce_c, [7u8; NONCE_LEN]);

        // Trailing byte, missing byte, wrong tag.
        let mut long = hello[2..].to_vec();
        long.push(0);
        assert!(matches!(parse_hello(&long), Err(HandshakeError::Malformed(_))));
        assert!(matches!(
            parse_hello(&hello[2..hello.len() - 1]),
            Err(HandshakeError::Malformed(_))
        ));
        let mut wrong_tag = hello[2..].to_vec();
        wrong_tag[0] = TAG_CHALLENGE;
        assert!(matches!(
            parse_hello(&wrong_tag),
            Err(HandshakeError::Malformed(_))
        ));

        let mut proof = vec![TAG_CLIENT_PROOF];
        proof.extend_from_slice(&[3u8; MAC_LEN]);
        assert_eq!(parse_proof(&proof, TAG_CLIENT_PROOF).unwrap(), [3u8; MAC_LEN]);
        assert!(matches!(
            parse_proof(&proof, TAG_SERVER_PROOF),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            parse_proof(&proof[..MAC_LEN], TAG_CLIENT_PROOF),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            parse_proof(&[], TAG_CLIENT_PROOF),
            Err(HandshakeError::Malformed(_))
        ));
    }

    #[test]
    fn handshake_garbage_never_parses() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for i in 0..1000 {
            let mut buf = rng.bytes(MAX_HANDSHAKE_MESSAGE);
            // Give half of them a plausible tag and version so parsing gets past the first bytes.
            if i % 2 == 0 && buf.len() >= 2 {
                buf[0] = TAG_HELLO;
                buf[1] = PROTOCOL_VERSION;
            }
            assert!(parse_hello(&buf).is_err(), "garbage #{i} parsed as hello");
            if i % 2 == 1 && buf.len() >= 2 {
                buf[0] = TAG_CHALLENGE;
                buf[1] = PROTOCOL_VERSION;
            }
            let challenge_ok = buf.len() == 2 + NONCE_LEN && buf[..2] == [TAG_CHALLENGE, PROTOCOL_VERSION];
            assert_eq!(parse_challenge(&buf).is_ok(), challenge_ok, "garbage #{i}");
            let proof_ok = buf.len() == 1 + MAC_LEN && buf[0] == TAG_CLIENT_PROOF;
            assert_eq!(
                parse_proof(&buf, TAG_CLIENT_PROOF).is_ok(),
                proof_ok,
                "garbage #{i}"
            );
        }
    }

    #[test]
    fn handshake_garbage_over_socket_never_succeeds() {
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        for i in 0..100 {
            // Half raw garbage, half well-framed garbage so the parser, not the length check, sees it.
            let garbage = rng.bytes(64);
            let wire = if i % 2 == 0 || garbage.is_empty() {
                garbage
            } else {
                encode_message(garbage[0], &garbage[1..])
            };
            let (mut client, server) = pair();
            let srv = spawn_server(server, COOKIE, Duration::from_secs(5));
            client.write_all(&wire).unwrap();
            drop(client);
            let result = srv.join().unwrap();
            assert!(result.is_err(), "garbage #{i} was accepted: {result:?}");
        }
    }

    /// A hand-driven server: answers the hello with `challenge(nonce_c)`, then sends `proof`.
    fn fake_server(
        server: TcpStream,
        challenge: fn(&Nonce) -> Nonce,
        proof: MacBytes,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let deadline = Deadline::after(Duration::from_secs(5));
            let Ok(msg) = read_message(&server, &deadline) else {
                return;
            };
            let hello = parse_hello(&msg).unwrap();
            let mut body = vec![PROTOCOL_VERSION];
            body.extend_from_slice(&challenge(&hello.nonce_c));
            write_message(&server, &deadline, TAG_CHALLENGE, &body).unwrap();
            if read_message(&server, &deadline).is_ok() {
                let _ = write_message(&server, &deadline, TAG_SERVER_PROOF, &proof);
            }
        })
    }

    #[test]
    fn handshake_client_rejects_reflected_nonce() {
        let (client, server) = pair();
        let srv = fake_server(server, |nonce_c| *nonce_c, [0u8; MAC_LEN]);
        let result = client_handshake(&client, &cfg(COOKIE, CLIENT, Duration::from_secs(5)), SERVER);
        drop(client);
        srv.join().unwrap();
        assert!(matches!(result, Err(HandshakeError::Malformed(_))), "{result:?}");
    }

    #[test]
    fn handshake_client_rejects_bad_server_proof() {
        let (client, server) = pair();
        let srv = fake_server(server, |_| [5u8; NONCE_LEN], [0u8; MAC_LEN]);
        let result = client_handshake(&client, &cfg(COOKIE, CLIENT, Duration::from_secs(5)), SERVER);
        srv.join().unwrap();
        assert!(matches!(result, Err(HandshakeError::BadCookie)), "{result:?}");
    }

    #[test]
    fn handshake_proofs_bind_role_and_names() {
        let (nc, ns) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let client_t = transcript(ROLE_CLIENT, &nc, &ns, CLIENT, SERVER);
        let mac = prove(COOKIE, &client_t);
        assert!(verify(COOKIE, &client_t, &mac).is_ok());
        assert!(verify(b"other", &client_t, &mac).is_err());
        // A client proof is not a server proof, and does not carry over to other nodes or nonces.
        assert!(verify(COOKIE, &transcript(ROLE_SERVER, &nc, &ns, CLIENT, SERVER), &mac).is_err());
        assert!(verify(COOKIE, &transcript(ROLE_CLIENT, &nc, &ns, CLIENT, "c@h"), &mac).is_err());
        assert!(verify(COOKIE, &transcript(ROLE_CLIENT, &ns, &nc, CLIENT, SERVER), &mac).is_err());
        // Empty cookies are keys like any other.
        let empty = prove(b"", &client_t);
        assert!(verify(b"", &client_t, &empty).is_ok());
    }

    #[test]
    fn handshake_valid_node_name_cases() {
        for good in ["a@b", "a@127.0.0.1", "node_1-x.y@host-2.example", "A9@Z"] {
            assert!(valid_node_name(good), "{good:?}");
        }
        let max = format!("{}@h", "n".repeat(MAX_NODE_NAME - 2));
        assert!(valid_node_name(&max));
        let too_long = format!("{}@h", "n".repeat(MAX_NODE_NAME - 1));
        assert!(!valid_node_name(&too_long));
        for bad in [
            "", "noat", "a@b@c", "@host", "name@", "@", "a@b c", "a@b\n", "é@b", "a@b/c", "a:b@c",
        ] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn handshake_error_reasons_and_display() {
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        let cases = [
            (HandshakeError::Io(eof), "io"),
            (HandshakeError::Timeout, "timeout"),
            (HandshakeError::Malformed("x"), "malformed"),
            (HandshakeError::Oversized(9), "oversized"),
            (HandshakeError::Version(3), "version"),
            (HandshakeError::WrongNode, "wrong_node"),
            (HandshakeError::OwnNodeName, "own_node_name"),
            (HandshakeError::BadNodeName, "bad_node_name"),
            (HandshakeError::BadCookie, "bad_cookie"),
        ];
        for (err, reason) in cases {
            assert_eq!(err.reason(), reason);
            assert!(!err.to_string().is_empty());
        }
        assert_eq!(HandshakeError::BadCookie.to_string(), "bad cookie");
    }

    #[test]
    fn handshake_zero_timeout_is_timeout() {
        let (client, server) = pair();
        let result = server_handshake(&server, &cfg(COOKIE, SERVER, Duration::ZERO));
        assert!(matches!(result, Err(HandshakeError::Timeout)), "{result:?}");
        drop(client);
    }
}
