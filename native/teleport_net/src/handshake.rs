//! The handshake that opens every teleport TCP connection.
//!
//! Both ends prove they know the shared Erlang cookie by HMAC-SHA256
//! challenge-response over fresh random nonces, without ever sending the cookie:
//!
//! 1. HELLO        client -> server  `[1][nonce_c][len][client_node][len][server_node]`
//! 2. CHALLENGE    server -> client  `[version][nonce_s][capabilities]`
//! 3. CLIENT_PROOF client -> server  `[HMAC(cookie, transcript("client"))][capabilities]`
//! 4. SERVER_PROOF server -> client  `[HMAC(cookie, transcript("server"))]`
//!
//! Every message is `[u16 big-endian length][u8 tag][body]`, the length counting
//! tag + body. The server faces the network, so a reader checks the length against
//! `MAX_HANDSHAKE_MESSAGE` before allocating, parses strictly, and the whole
//! handshake runs against one deadline, so a peer trickling bytes cannot hold a
//! socket open forever.
//!
//! Versions. HELLO keeps protocol 1's layout, version byte 1 included, so that a node
//! that speaks only protocol 1 (teleport before the wire had versions) answers it; the
//! client's highest protocol is marked in the first bytes of its nonce
//! (`VERSION_MARK`, then the version). The server answers with the version both
//! speak in CHALLENGE, or refuses; a client that gets protocol 1's CHALLENGE refuses.
//! Either way the refusal names both versions (`HandshakeError::Version`).
//!
//! What the proofs sign (`Transcript`): both roles' nonces, both node names, the
//! version, both sides' capabilities, and, over TLS, a value exported from the TLS
//! session (RFC 5705), which binds the proofs to that session: a relay that ends one
//! TLS session and opens another cannot pass the proofs on.
//!
//! The protocol lives in one place, `Handshake`: a state machine fed the peer's bytes,
//! without a socket or a clock, for the event loop. `client_handshake` and
//! `server_handshake` drive it over a blocking socket.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The protocol this code speaks (the framing after the handshake included).
pub const PROTOCOL_VERSION: u8 = 2;
/// The oldest protocol it still speaks.
pub const MIN_PROTOCOL_VERSION: u8 = 2;
/// HELLO's version byte, whatever the client speaks: protocol 1's (see the module doc).
const HELLO_VERSION: u8 = 1;
/// A client of protocol 2 or later starts its nonce with this, then its highest version.
pub(crate) const VERSION_MARK: [u8; 7] = *b"teleprt";
pub const NONCE_LEN: usize = 32;
/// Cap on one message's length field (tag + body). The largest message, HELLO
/// with two 255-byte names, is 546 bytes.
pub const MAX_HANDSHAKE_MESSAGE: usize = 600;
pub const MAX_NODE_NAME: usize = 255;
/// The value exported from a TLS session for the proofs to sign.
pub const CHANNEL_BINDING_LEN: usize = 32;
/// RFC 5705 label of that export.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-teleport-handshake";

pub(crate) const TAG_HELLO: u8 = 1;
pub(crate) const TAG_CHALLENGE: u8 = 2;
pub(crate) const TAG_CLIENT_PROOF: u8 = 3;
pub(crate) const TAG_SERVER_PROOF: u8 = 4;

const MAC_LEN: usize = 32;
const TRANSCRIPT_PREFIX: &[u8] = b"teleport-v2 ";
const ROLE_CLIENT: &str = "client";
const ROLE_SERVER: &str = "server";

type HmacSha256 = Hmac<Sha256>;
pub(crate) type Nonce = [u8; NONCE_LEN];
pub(crate) type MacBytes = [u8; MAC_LEN];
pub type ChannelBinding = [u8; CHANNEL_BINDING_LEN];
/// Whether the peer may claim this node name (over TLS: its certificate names the host).
pub type PeerNameCheck = Box<dyn Fn(&str) -> bool + Send>;

/// What a node tells its peer about itself in the handshake, and learns of the peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The Erlang/OTP release its VM runs (0 if unknown): a term of a type a peer's
    /// release is older than may not be readable there.
    pub otp_release: u16,
    /// `CAN_*` bits.
    pub flags: u32,
}

impl Capabilities {
    /// Its VM builds OTP 29's native records.
    pub const NATIVE_RECORDS: u32 = 1;
    const LEN: usize = 6;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.otp_release.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
    }

    fn parse(c: &mut Cursor) -> Result<Capabilities, HandshakeError> {
        let otp_release = u16::from_be_bytes(c.array()?);
        let flags = u32::from_be_bytes(c.array()?);
        Ok(Capabilities { otp_release, flags })
    }
}

/// Who the handshake authenticated, and what it agreed with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Server: the client's node name. Client: the server's (the one dialed).
    pub node: String,
    pub version: u8,
    pub capabilities: Capabilities,
}

pub struct HandshakeConfig<'a> {
    pub cookie: &'a [u8],
    /// This node's name, e.g. "a@127.0.0.1".
    pub local_node: &'a str,
    pub capabilities: Capabilities,
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
    /// The peer speaks no protocol version we do.
    Version {
        peer: u8,
        local: u8,
    },
    /// The hello named a server node that is not us.
    WrongNode,
    /// The peer claims our own node name (or we were asked to dial ourselves).
    OwnNodeName,
    BadNodeName,
    /// A proof did not verify.
    BadCookie,
    /// TLS failed (a certificate refused, a plain-text peer): our stable name for why,
    /// and rustls' words.
    Tls(&'static str, String),
}

impl HandshakeError {
    /// Snake_case, atom-like name of the error kind.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Io(_) => "io",
            HandshakeError::Timeout => "timeout",
            HandshakeError::Malformed(_) => "malformed",
            HandshakeError::Oversized(_) => "oversized",
            HandshakeError::Version { .. } => "version",
            HandshakeError::WrongNode => "wrong_node",
            HandshakeError::OwnNodeName => "own_node_name",
            HandshakeError::BadNodeName => "bad_node_name",
            HandshakeError::BadCookie => "bad_cookie",
            HandshakeError::Tls(reason, _) => reason,
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
            HandshakeError::Version { peer, local } => write!(
                f,
                "the peer speaks teleport protocol {peer}, this node {local} \
                 (versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})"
            ),
            HandshakeError::WrongNode => f.write_str("wrong node"),
            HandshakeError::OwnNodeName => f.write_str("peer claims our own node name"),
            HandshakeError::BadNodeName => f.write_str("bad node name"),
            HandshakeError::BadCookie => f.write_str("bad cookie"),
            HandshakeError::Tls(_, message) => write!(f, "TLS: {message}"),
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

// ---------------------------------------------------------------------------
// The protocol as a state machine, without a socket

/// How far a handshake got after `feed`.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Needs more bytes from the peer.
    Continue,
    /// Authenticated.
    Done(Peer),
}

/// One side of a handshake, without a socket: bytes in, bytes out. Time is the caller's
/// business (the event loop enforces `handshake_timeout`).
pub struct Handshake {
    cookie: Vec<u8>,
    local_node: String,
    capabilities: Capabilities,
    /// Over TLS, what the session exported (`bind_channel`); the proofs sign it.
    channel: Option<ChannelBinding>,
    /// Server: what the client's claimed name must pass (`check_peer_name`).
    peer_check: Option<PeerNameCheck>,
    state: State,
    incoming: Reassembly,
}

/// The message a side waits for, with what it must remember until then.
enum State {
    /// Client, HELLO sent.
    AwaitChallenge { server_node: String, nonce_c: Nonce },
    /// Client, proof sent: what the server's proof must sign.
    AwaitServerProof { transcript: Transcript },
    /// Server, nothing received yet.
    AwaitHello,
    /// Server, CHALLENGE sent.
    AwaitClientProof {
        hello: Hello,
        nonce_s: Nonce,
        version: u8,
    },
    /// Done or failed.
    Over,
}

impl Handshake {
    /// Client: validates both names (BadNodeName, OwnNodeName), draws the nonce; returns
    /// the machine and the HELLO message bytes to send first.
    pub fn client(
        cookie: &[u8],
        local_node: &str,
        server_node: &str,
        capabilities: Capabilities,
    ) -> Result<(Handshake, Vec<u8>), HandshakeError> {
        // Names go on the wire with a u8 length, so they must be checked before encoding.
        if !valid_node_name(local_node) || !valid_node_name(server_node) {
            return Err(HandshakeError::BadNodeName);
        }
        if server_node == local_node {
            return Err(HandshakeError::OwnNodeName);
        }
        let nonce_c = client_nonce(random_nonce()?);
        let hello = encode_message(TAG_HELLO, &encode_hello(&nonce_c, local_node, server_node));
        let state = State::AwaitChallenge {
            server_node: server_node.to_owned(),
            nonce_c,
        };
        Ok((Handshake::new(cookie, local_node, capabilities, state), hello))
    }

    /// Server: waits for a HELLO.
    pub fn server(cookie: &[u8], local_node: &str, capabilities: Capabilities) -> Handshake {
        Handshake::new(cookie, local_node, capabilities, State::AwaitHello)
    }

    fn new(cookie: &[u8], local_node: &str, capabilities: Capabilities, state: State) -> Handshake {
        Handshake {
            cookie: cookie.to_vec(),
            local_node: local_node.to_owned(),
            capabilities,
            channel: None,
            peer_check: None,
            state,
            incoming: Reassembly::default(),
        }
    }

    /// Server: a client whose claimed name fails `check` is refused at its HELLO
    /// (`HandshakeError::Tls("tls_node_name", ..)`), before the challenge.
    pub fn check_peer_name(&mut self, check: PeerNameCheck) {
        self.peer_check = Some(check);
    }

    /// Over TLS: the value exported from the session (`CHANNEL_BINDING_LABEL`), for the
    /// proofs to sign. Given before the first `feed`, on both sides.
    pub fn bind_channel(&mut self, binding: ChannelBinding) {
        self.channel = Some(binding);
    }

    /// Whether `bind_channel` was called.
    pub fn is_bound(&self) -> bool {
        self.channel.is_some()
    }

    /// Feeds bytes received from the peer. Consumes at most up to the end of the handshake's
    /// last message (bytes after it are the first frames of the connection and must be left to
    /// the caller), buffering a partial message internally (never allocating more than
    /// MAX_HANDSHAKE_MESSAGE + 2 bytes, checking the length field before buffering the body).
    /// Appends what must be sent to the peer to `out` (the caller writes it). Returns the bytes
    /// consumed and the progress. Once `Done` or after an error, further calls are an error
    /// (Malformed("handshake over")) and consume nothing.
    ///
    /// After an error nothing of this call is left in `out`: the caller just closes.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, Progress), HandshakeError> {
        if matches!(self.state, State::Over) {
            return Err(HandshakeError::Malformed("handshake over"));
        }
        let out_before = out.len();
        let result = self.feed_messages(input, out);
        if result.is_err() {
            // A peer pipelining a bad message behind a good one gets no answer to either.
            out.truncate(out_before);
            self.state = State::Over;
        }
        result
    }

    fn feed_messages(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, Progress), HandshakeError> {
        let mut consumed = 0;
        loop {
            consumed += self.incoming.take(&input[consumed..])?;
            let Some(msg) = self.incoming.message() else {
                return Ok((consumed, Progress::Continue));
            };
            let state = std::mem::replace(&mut self.state, State::Over);
            let local = Local {
                cookie: &self.cookie,
                node: &self.local_node,
                capabilities: self.capabilities,
                channel: self.channel,
                peer_check: self.peer_check.as_ref(),
            };
            let (next, progress) = state.step(&local, msg, out)?;
            self.state = next;
            self.incoming.clear();
            if let Progress::Done(_) = progress {
                // Whatever follows belongs to the connection, not to us.
                return Ok((consumed, progress));
            }
        }
    }

    /// The error to report when the peer closes the connection (end of stream) before `Done`:
    /// for a client that has sent its proof, `BadCookie` (a server that rejects the proof closes
    /// without a word, as `client_handshake` maps today); otherwise `Io(UnexpectedEof)`.
    pub fn closed_error(&self) -> HandshakeError {
        if self.proof_sent() {
            HandshakeError::BadCookie
        } else {
            HandshakeError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed during handshake",
            ))
        }
    }

    /// A client whose proof is out: from here on a server that closes has rejected it.
    fn proof_sent(&self) -> bool {
        matches!(self.state, State::AwaitServerProof { .. })
    }

    /// Bytes still missing from the message being read (1..=MAX_HANDSHAKE_MESSAGE): reading
    /// no more than this never reads past the handshake's end.
    fn wanted(&self) -> usize {
        self.incoming.wanted()
    }
}

/// By hand, as a derived Debug would print the cookie.
impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::AwaitChallenge { .. } => "await_challenge",
            State::AwaitServerProof { .. } => "await_server_proof",
            State::AwaitHello => "await_hello",
            State::AwaitClientProof { .. } => "await_client_proof",
            State::Over => "over",
        };
        f.debug_struct("Handshake")
            .field("local_node", &self.local_node)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// What a side brings to each step of its handshake.
struct Local<'a> {
    cookie: &'a [u8],
    node: &'a str,
    capabilities: Capabilities,
    channel: Option<ChannelBinding>,
    peer_check: Option<&'a PeerNameCheck>,
}

impl State {
    /// One received message (tag + body): what to send (appended to `out`), and the state
    /// that waits for the next one.
    fn step(self, local: &Local, msg: &[u8], out: &mut Vec<u8>) -> Result<(State, Progress), HandshakeError> {
        match self {
            State::AwaitHello => {
                let hello = accept_hello(msg, local.node)?;
                if local.peer_check.is_some_and(|check| !check(&hello.client_node)) {
                    return Err(HandshakeError::Tls(
                        "tls_node_name",
                        format!(
                            "the client's certificate does not name the host of {}",
                            hello.client_node
                        ),
                    ));
                }
                let version = hello.version;
                let nonce_s = random_nonce()?;
                out.extend(encode_message(
                    TAG_CHALLENGE,
                    &challenge_body(version, &nonce_s, local.capabilities),
                ));
                Ok((
                    State::AwaitClientProof {
                        hello,
                        nonce_s,
                        version,
                    },
                    Progress::Continue,
                ))
            }
            State::AwaitClientProof {
                hello,
                nonce_s,
                version,
            } => {
                // On a bad proof this returns before anything is sent: the client learns
                // no more than that it failed.
                let (proof, client) = check_client_proof(
                    local.cookie,
                    &hello,
                    &nonce_s,
                    local.capabilities,
                    local.channel.as_ref(),
                    msg,
                )?;
                out.extend(encode_message(TAG_SERVER_PROOF, &proof));
                let peer = Peer {
                    node: hello.client_node,
                    version,
                    capabilities: client,
                };
                Ok((State::Over, Progress::Done(peer)))
            }
            State::AwaitChallenge { server_node, nonce_c } => {
                let challenge = accept_challenge(msg, &nonce_c)?;
                let transcript = Transcript::client(
                    nonce_c,
                    &challenge,
                    local.node,
                    &server_node,
                    local.capabilities,
                    local.channel,
                );
                out.extend(encode_message(
                    TAG_CLIENT_PROOF,
                    &client_proof_body(local.cookie, &transcript),
                ));
                Ok((State::AwaitServerProof { transcript }, Progress::Continue))
            }
            State::AwaitServerProof { transcript } => {
                check_server_proof(local.cookie, &transcript, msg)?;
                let peer = Peer {
                    node: transcript.server_node,
                    version: transcript.version,
                    capabilities: transcript.server,
                };
                Ok((State::Over, Progress::Done(peer)))
            }
            State::Over => Err(HandshakeError::Malformed("handshake over")),
        }
    }
}

/// Gathers one `[u16 length][tag][body]` message from bytes however they arrive.
#[derive(Default)]
struct Reassembly {
    /// The length field, then tag + body; capacity never above `2 + MAX_HANDSHAKE_MESSAGE`.
    buf: Vec<u8>,
}

impl Reassembly {
    /// Bytes still missing: of the length field, then of the message it announces.
    fn wanted(&self) -> usize {
        match self.buf.first_chunk::<2>() {
            None => 2 - self.buf.len(),
            Some(len) => 2 + usize::from(u16::from_be_bytes(*len)) - self.buf.len(),
        }
    }

    /// Takes what it can of `input` towards the current message; returns how much.
    fn take(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
        let mut taken = 0;
        if self.buf.len() < 2 {
            taken = input.len().min(2 - self.buf.len());
            self.buf.extend_from_slice(&input[..taken]);
            let Some(&len_bytes) = self.buf.first_chunk::<2>() else {
                return Ok(taken);
            };
            // Checked before a byte of the body is kept, and reserved exactly, so a peer
            // cannot make us hold more than the cap.
            self.buf.reserve_exact(message_len(len_bytes)?);
        }
        let more = (input.len() - taken).min(self.wanted());
        self.buf.extend_from_slice(&input[taken..taken + more]);
        Ok(taken + more)
    }

    /// The whole message (tag + body), once it is in.
    fn message(&self) -> Option<&[u8]> {
        (self.buf.len() > 2 && self.wanted() == 0).then(|| &self.buf[2..])
    }

    fn clear(&mut self) {
        self.buf.clear();
    }
}

// ---------------------------------------------------------------------------
// Each step on received bytes, without the socket (the fuzz targets drive these too)

/// Server: a HELLO (tag + body) that names us, from a client that speaks a version we do.
pub(crate) fn accept_hello(msg: &[u8], local_node: &str) -> Result<Hello, HandshakeError> {
    let hello = parse_hello(msg)?;
    if hello.version < MIN_PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            peer: hello.version,
            local: PROTOCOL_VERSION,
        });
    }
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

pub(crate) fn challenge_body(version: u8, nonce_s: &Nonce, capabilities: Capabilities) -> Vec<u8> {
    let mut challenge = Vec::with_capacity(1 + NONCE_LEN + Capabilities::LEN);
    challenge.push(version);
    challenge.extend_from_slice(nonce_s);
    capabilities.encode(&mut challenge);
    challenge
}

/// Server: checks the CLIENT_PROOF (tag + body); returns the server's proof and the
/// client's capabilities.
pub(crate) fn check_client_proof(
    cookie: &[u8],
    hello: &Hello,
    nonce_s: &Nonce,
    server: Capabilities,
    channel: Option<&ChannelBinding>,
    msg: &[u8],
) -> Result<(MacBytes, Capabilities), HandshakeError> {
    let (client_mac, client) = parse_client_proof(msg)?;
    let transcript = Transcript {
        version: hello.version,
        nonce_c: hello.nonce_c,
        nonce_s: *nonce_s,
        client_node: hello.client_node.clone(),
        server_node: hello.server_node.clone(),
        client,
        server,
        channel: channel.copied(),
    };
    verify(cookie, &transcript.signed(ROLE_CLIENT), &client_mac)?;
    Ok((prove(cookie, &transcript.signed(ROLE_SERVER)), client))
}

/// What a CHALLENGE told the client.
pub(crate) struct Challenge {
    version: u8,
    nonce_s: Nonce,
    capabilities: Capabilities,
}

/// Client: the server's CHALLENGE (tag + body), in a version we speak.
pub(crate) fn accept_challenge(msg: &[u8], nonce_c: &Nonce) -> Result<Challenge, HandshakeError> {
    let challenge = parse_challenge(msg)?;
    // A server echoing our nonce back could be replaying our own messages at us.
    if challenge.nonce_s == *nonce_c {
        return Err(HandshakeError::Malformed("challenge reflects our nonce"));
    }
    Ok(challenge)
}

/// Client: the CLIENT_PROOF body for `transcript`: the proof, then our capabilities.
pub(crate) fn client_proof_body(cookie: &[u8], transcript: &Transcript) -> Vec<u8> {
    let mut body = prove(cookie, &transcript.signed(ROLE_CLIENT)).to_vec();
    transcript.client.encode(&mut body);
    body
}

/// Client: checks the SERVER_PROOF (tag + body).
pub(crate) fn check_server_proof(
    cookie: &[u8],
    transcript: &Transcript,
    msg: &[u8],
) -> Result<(), HandshakeError> {
    let server_mac = parse_server_proof(msg)?;
    verify(cookie, &transcript.signed(ROLE_SERVER), &server_mac)
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
    /// The client's highest protocol version (1 without `VERSION_MARK`), or ours if
    /// that is lower: what the server answers in.
    version: u8,
}

/// Appends `[u8 len][name]`; callers pass names that passed `valid_node_name`.
fn push_name(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

pub(crate) fn encode_hello(nonce_c: &Nonce, client_node: &str, server_node: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + NONCE_LEN + 2 + client_node.len() + server_node.len());
    body.push(HELLO_VERSION);
    body.extend_from_slice(nonce_c);
    push_name(&mut body, client_node);
    push_name(&mut body, server_node);
    body
}

/// A client's nonce: the version mark and our version, then random bytes.
pub(crate) fn client_nonce(random: Nonce) -> Nonce {
    let mut nonce = random;
    nonce[..VERSION_MARK.len()].copy_from_slice(&VERSION_MARK);
    nonce[VERSION_MARK.len()] = PROTOCOL_VERSION;
    nonce
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
    match c.byte()? {
        HELLO_VERSION => {}
        v => {
            return Err(HandshakeError::Version {
                peer: v,
                local: PROTOCOL_VERSION,
            })
        }
    }
    let nonce_c = c.array::<NONCE_LEN>()?;
    let client_len = usize::from(c.byte()?);
    let client_node = c.take(client_len)?;
    let server_len = usize::from(c.byte()?);
    let server_node = c.take(server_len)?;
    c.finish()?;
    let version = match nonce_c.split_at(VERSION_MARK.len()) {
        (mark, [version, ..]) if mark == VERSION_MARK => (*version).min(PROTOCOL_VERSION),
        _ => 1,
    };
    Ok(Hello {
        nonce_c,
        client_node: node_name(client_node)?,
        server_node: node_name(server_node)?,
        version,
    })
}

/// Parses a CHALLENGE message.
fn parse_challenge(msg: &[u8]) -> Result<Challenge, HandshakeError> {
    let mut c = Cursor(msg);
    c.tag(TAG_CHALLENGE, "expected challenge")?;
    // Checked before the rest, whose layout another version may change.
    let version = c.byte()?;
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(HandshakeError::Version {
            peer: version,
            local: PROTOCOL_VERSION,
        });
    }
    let nonce_s = c.array::<NONCE_LEN>()?;
    let capabilities = Capabilities::parse(&mut c)?;
    c.finish()?;
    Ok(Challenge {
        version,
        nonce_s,
        capabilities,
    })
}

/// Parses a CLIENT_PROOF message: the MAC and the client's capabilities.
fn parse_client_proof(msg: &[u8]) -> Result<(MacBytes, Capabilities), HandshakeError> {
    let mut c = Cursor(msg);
    c.tag(TAG_CLIENT_PROOF, "expected proof")?;
    let mac = c.array::<MAC_LEN>()?;
    let capabilities = Capabilities::parse(&mut c)?;
    c.finish()?;
    Ok((mac, capabilities))
}

/// Parses a SERVER_PROOF message and returns the MAC.
fn parse_server_proof(msg: &[u8]) -> Result<MacBytes, HandshakeError> {
    let mut c = Cursor(msg);
    c.tag(TAG_SERVER_PROOF, "expected proof")?;
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

/// What the proofs sign. The role keeps one side's proof from being replayed as the
/// other's; both nonces make it fresh; the names bind it to this pair of nodes; the
/// version and the capabilities to what the two agreed; the channel binding to the TLS
/// session it runs in.
pub(crate) struct Transcript {
    version: u8,
    nonce_c: Nonce,
    nonce_s: Nonce,
    client_node: String,
    server_node: String,
    client: Capabilities,
    server: Capabilities,
    channel: Option<ChannelBinding>,
}

impl Transcript {
    /// The client's, once the server's CHALLENGE is in.
    pub(crate) fn client(
        nonce_c: Nonce,
        challenge: &Challenge,
        client_node: &str,
        server_node: &str,
        client: Capabilities,
        channel: Option<ChannelBinding>,
    ) -> Transcript {
        Transcript {
            version: challenge.version,
            nonce_c,
            nonce_s: challenge.nonce_s,
            client_node: client_node.to_owned(),
            server_node: server_node.to_owned(),
            client,
            server: challenge.capabilities,
            channel,
        }
    }

    fn signed(&self, role: &str) -> Vec<u8> {
        let mut t = Vec::with_capacity(TRANSCRIPT_PREFIX.len() + 200);
        t.extend_from_slice(TRANSCRIPT_PREFIX);
        t.extend_from_slice(role.as_bytes());
        t.push(self.version);
        t.extend_from_slice(&self.nonce_c);
        t.extend_from_slice(&self.nonce_s);
        push_name(&mut t, &self.client_node);
        push_name(&mut t, &self.server_node);
        self.client.encode(&mut t);
        self.server.encode(&mut t);
        match &self.channel {
            Some(binding) => {
                t.push(CHANNEL_BINDING_LEN as u8);
                t.extend_from_slice(binding);
            }
            None => t.push(0),
        }
        t
    }
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

    const CAPS: Capabilities = Capabilities {
        otp_release: 29,
        flags: Capabilities::NATIVE_RECORDS,
    };

    fn cfg(cookie: &'static [u8], node: &'static str, timeout: Duration) -> HandshakeConfig<'static> {
        HandshakeConfig {
            cookie,
            local_node: node,
            capabilities: CAPS,
            timeout,
        }
    }

    /// What a side learns of a peer of this code.
    fn peer(node: &str) -> Peer {
        Peer {
            node: node.to_owned(),
            version: PROTOCOL_VERSION,
            capabilities: CAPS,
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
    ) -> thread::JoinHandle<Result<Peer, HandshakeError>> {
        thread::spawn(move || server_handshake(&server, &cfg(cookie, SERVER, timeout)))
    }

    /// A HELLO from a client of protocol `version` (1: no version mark in the nonce).
    fn hello_message(version: u8, client_node: &[u8], server_node: &[u8]) -> Vec<u8> {
        let mut nonce = [7u8; NONCE_LEN];
        if version >= 2 {
            nonce[..VERSION_MARK.len()].copy_from_slice(&VERSION_MARK);
            nonce[VERSION_MARK.len()] = version;
        }
        hello_with_byte(HELLO_VERSION, &nonce, client_node, server_node)
    }

    /// A HELLO whose version byte is `byte`.
    fn hello_with_byte(byte: u8, nonce: &Nonce, client_node: &[u8], server_node: &[u8]) -> Vec<u8> {
        let mut body = vec![byte];
        body.extend_from_slice(nonce);
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
        assert_eq!(server_result.unwrap(), peer(CLIENT));
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
        // HELLO's version byte is 1 whatever the protocol: another one is refused.
        let hello = hello_with_byte(2, &[7u8; NONCE_LEN], CLIENT.as_bytes(), SERVER.as_bytes());
        assert!(matches!(
            parse_hello(&hello[2..]),
            Err(HandshakeError::Version {
                peer: 2,
                local: PROTOCOL_VERSION
            })
        ));
        // A client of protocol 1 (no version mark): named with both versions.
        let v1 = hello_message(1, CLIENT.as_bytes(), SERVER.as_bytes());
        assert!(matches!(
            accept_hello(&v1[2..], SERVER),
            Err(HandshakeError::Version {
                peer: 1,
                local: PROTOCOL_VERSION
            })
        ));
        let said = accept_hello(&v1[2..], SERVER).unwrap_err().to_string();
        assert!(
            said.contains("protocol 1") && said.contains(&format!("node {PROTOCOL_VERSION}")),
            "{said}"
        );

        // Protocol 1's CHALLENGE (`[1][nonce]`), and one of a version too new.
        let mut challenge = vec![TAG_CHALLENGE, 1];
        challenge.extend_from_slice(&[1u8; NONCE_LEN]);
        assert!(matches!(
            parse_challenge(&challenge),
            Err(HandshakeError::Version {
                peer: 1,
                local: PROTOCOL_VERSION
            })
        ));
        let mut challenge = vec![TAG_CHALLENGE, 9];
        challenge.extend_from_slice(&[1u8; NONCE_LEN]);
        assert!(matches!(
            parse_challenge(&challenge),
            Err(HandshakeError::Version {
                peer: 9,
                local: PROTOCOL_VERSION
            })
        ));

        // And over a socket.
        let (mut client, server) = pair();
        let srv = spawn_server(server, COOKIE, Duration::from_secs(5));
        client.write_all(&v1).unwrap();
        let result = srv.join().unwrap();
        assert!(
            matches!(result, Err(HandshakeError::Version { peer: 1, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn a_client_of_a_newer_protocol_is_answered_in_ours() {
        let hello = hello_message(PROTOCOL_VERSION + 1, CLIENT.as_bytes(), SERVER.as_bytes());
        let mut server = Handshake::server(COOKIE, SERVER, CAPS);
        let mut challenge = Vec::new();
        server.feed(&hello, &mut challenge).unwrap();
        assert_eq!(challenge[3], PROTOCOL_VERSION, "the challenge's version");
    }

    /// A node of protocol 1 (teleport before versions): it answers any HELLO whose first
    /// byte is 1 with `[1][nonce_s]`. Our client refuses it, naming both versions.
    #[test]
    fn a_server_of_protocol_1_is_refused_by_name() {
        let (mut client, hello) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
        assert_eq!(hello[3], 1, "a HELLO protocol 1 parses");
        let mut v1_challenge = vec![1];
        v1_challenge.extend_from_slice(&[9u8; NONCE_LEN]);
        let result = client.feed(&encode_message(TAG_CHALLENGE, &v1_challenge), &mut Vec::new());
        assert!(
            matches!(
                result,
                Err(HandshakeError::Version {
                    peer: 1,
                    local: PROTOCOL_VERSION
                })
            ),
            "{result:?}"
        );
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
            capabilities: CAPS,
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
            capabilities: CAPS,
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
        assert_eq!(parsed.nonce_c, client_nonce([7u8; NONCE_LEN]));
        assert_eq!(parsed.version, PROTOCOL_VERSION);

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
        proof.extend_from_slice(&[0, 29, 0, 0, 0, 1]);
        assert_eq!(parse_client_proof(&proof).unwrap(), ([3u8; MAC_LEN], CAPS));
        assert!(matches!(
            parse_client_proof(&proof[..1 + MAC_LEN]),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            parse_client_proof(&[]),
            Err(HandshakeError::Malformed(_))
        ));
        let mut server_proof = vec![TAG_SERVER_PROOF];
        server_proof.extend_from_slice(&[3u8; MAC_LEN]);
        assert_eq!(parse_server_proof(&server_proof).unwrap(), [3u8; MAC_LEN]);
        assert!(matches!(
            parse_server_proof(&proof),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            parse_server_proof(&server_proof[..MAC_LEN]),
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
                buf[1] = HELLO_VERSION;
            }
            assert!(parse_hello(&buf).is_err(), "garbage #{i} parsed as hello");
            if i % 2 == 1 && buf.len() >= 2 {
                buf[0] = TAG_CHALLENGE;
                buf[1] = PROTOCOL_VERSION;
            }
            // Capabilities are any six bytes: only the shape decides.
            let challenge_ok = buf.len() == 2 + NONCE_LEN + Capabilities::LEN
                && buf[..2] == [TAG_CHALLENGE, PROTOCOL_VERSION];
            assert_eq!(parse_challenge(&buf).is_ok(), challenge_ok, "garbage #{i}");
            let proof_ok = buf.len() == 1 + MAC_LEN + Capabilities::LEN && buf[0] == TAG_CLIENT_PROOF;
            assert_eq!(parse_client_proof(&buf).is_ok(), proof_ok, "garbage #{i}");
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
            // A whole message of garbage is refused by the parser, before any proof is
            // asked for; raw garbage ends the handshake at the end of the stream at the
            // latest. Neither waits for the deadline.
            match (srv.join().unwrap(), i % 2 == 1) {
                (
                    Err(
                        HandshakeError::Malformed(_)
                        | HandshakeError::Oversized(_)
                        | HandshakeError::BadNodeName
                        | HandshakeError::Version { .. },
                    ),
                    true,
                ) => {}
                (Err(e), false) if !matches!(e, HandshakeError::Timeout) => {}
                (other, framed) => panic!("garbage #{i} (whole message: {framed}): {other:?}"),
            }
        }
    }

    /// One message's tag + body, with no checks at all.
    fn read_raw_message(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut msg)?;
        Ok(msg)
    }

    /// A hand-driven server: answers the hello with `challenge(nonce_c)`, then sends `proof`.
    fn fake_server(
        server: TcpStream,
        challenge: fn(&Nonce) -> Nonce,
        proof: MacBytes,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let mut server = server;
            server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let Ok(msg) = read_raw_message(&mut server) else {
                return;
            };
            let hello = parse_hello(&msg).unwrap();
            let body = challenge_body(PROTOCOL_VERSION, &challenge(&hello.nonce_c), CAPS);
            server.write_all(&encode_message(TAG_CHALLENGE, &body)).unwrap();
            if read_raw_message(&mut server).is_ok() {
                let _ = server.write_all(&encode_message(TAG_SERVER_PROOF, &proof));
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

    fn transcript(channel: Option<ChannelBinding>) -> Transcript {
        Transcript {
            version: PROTOCOL_VERSION,
            nonce_c: [1u8; NONCE_LEN],
            nonce_s: [2u8; NONCE_LEN],
            client_node: CLIENT.to_owned(),
            server_node: SERVER.to_owned(),
            client: CAPS,
            server: Capabilities::default(),
            channel,
        }
    }

    #[test]
    fn handshake_proofs_bind_role_names_nonces_versions_capabilities_and_channel() {
        let base = transcript(None);
        let client_t = base.signed(ROLE_CLIENT);
        let mac = prove(COOKIE, &client_t);
        assert!(verify(COOKIE, &client_t, &mac).is_ok());
        assert!(verify(b"other", &client_t, &mac).is_err());
        // A client proof is not a server proof, and does not carry over to anything else.
        assert!(verify(COOKIE, &base.signed(ROLE_SERVER), &mac).is_err());
        let changes: [fn(&mut Transcript); 8] = [
            |t| t.server_node = "c@h".to_owned(),
            |t| t.client_node = "c@h".to_owned(),
            |t| std::mem::swap(&mut t.nonce_c, &mut t.nonce_s),
            |t| t.version = 3,
            |t| t.client.flags = 0,
            |t| t.server.otp_release = 27,
            |t| t.channel = Some([0u8; CHANNEL_BINDING_LEN]),
            |t| t.nonce_s[31] ^= 1,
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut other = transcript(None);
            change(&mut other);
            assert!(
                verify(COOKIE, &other.signed(ROLE_CLIENT), &mac).is_err(),
                "change {i}"
            );
        }
        // Two TLS sessions export different values: a proof for one fails in the other.
        let in_one = transcript(Some([1u8; CHANNEL_BINDING_LEN])).signed(ROLE_CLIENT);
        let in_other = transcript(Some([2u8; CHANNEL_BINDING_LEN])).signed(ROLE_CLIENT);
        assert!(verify(COOKIE, &in_other, &prove(COOKIE, &in_one)).is_err());
        // Empty cookies are keys like any other.
        let empty = prove(b"", &client_t);
        assert!(verify(b"", &client_t, &empty).is_ok());
    }

    #[test]
    fn machines_exchange_capabilities_and_check_the_channel() {
        let server_caps = Capabilities {
            otp_release: 25,
            flags: 0,
        };
        let run = |client_channel: Option<ChannelBinding>, server_channel: Option<ChannelBinding>| {
            let (mut client, hello) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
            let mut server = Handshake::server(COOKIE, SERVER, server_caps);
            if let Some(b) = client_channel {
                client.bind_channel(b);
            }
            if let Some(b) = server_channel {
                server.bind_channel(b);
            }
            let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
            server.feed(&hello, &mut to_client)?;
            client.feed(&to_client, &mut to_server)?;
            to_client.clear();
            let at_server = server.feed(&to_server, &mut to_client)?.1;
            let at_client = client.feed(&to_client, &mut Vec::new())?.1;
            Ok::<_, HandshakeError>((at_server, at_client))
        };
        let (at_server, at_client) = run(None, None).unwrap();
        let Progress::Done(client_peer) = at_server else {
            panic!("{at_server:?}")
        };
        let Progress::Done(server_peer) = at_client else {
            panic!("{at_client:?}")
        };
        assert_eq!(client_peer.capabilities, CAPS);
        assert_eq!(server_peer.capabilities, server_caps);
        assert_eq!(
            (client_peer.version, server_peer.version),
            (PROTOCOL_VERSION, PROTOCOL_VERSION)
        );
        let same = [4u8; CHANNEL_BINDING_LEN];
        assert!(run(Some(same), Some(same)).is_ok());
        // A relay between two TLS sessions: each side signs its own session's value.
        for (c, s) in [
            (Some(same), Some([5u8; CHANNEL_BINDING_LEN])),
            (Some(same), None),
            (None, Some(same)),
        ] {
            let result = run(c, s);
            assert!(matches!(result, Err(HandshakeError::BadCookie)), "{result:?}");
        }
    }

    #[test]
    fn a_challenge_whose_capabilities_were_changed_on_the_way_fails() {
        let (mut client, hello) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
        let mut server = Handshake::server(COOKIE, SERVER, CAPS);
        let mut challenge = Vec::new();
        server.feed(&hello, &mut challenge).unwrap();
        // The last byte of the capabilities (flags): a peer in the middle lies about them.
        *challenge.last_mut().unwrap() ^= 1;
        let mut proof = Vec::new();
        client.feed(&challenge, &mut proof).unwrap();
        let result = server.feed(&proof, &mut Vec::new());
        assert!(matches!(result, Err(HandshakeError::BadCookie)), "{result:?}");
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
            (HandshakeError::Version { peer: 3, local: 2 }, "version"),
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

    // -----------------------------------------------------------------------
    // The machine, in memory

    /// Feeds `input` to `hs` in pieces of `chunk` bytes; every byte must be consumed.
    fn feed_in(
        hs: &mut Handshake,
        input: &[u8],
        chunk: usize,
        out: &mut Vec<u8>,
    ) -> Result<Progress, HandshakeError> {
        let mut progress = Progress::Continue;
        for piece in input.chunks(chunk) {
            let (consumed, p) = hs.feed(piece, out)?;
            assert_eq!(consumed, piece.len());
            progress = p;
        }
        Ok(progress)
    }

    /// A client and a server machine up to the client's proof: (client, server, the proof).
    fn up_to_client_proof(client_cookie: &[u8]) -> (Handshake, Handshake, Vec<u8>) {
        let (mut client, hello) = Handshake::client(client_cookie, CLIENT, SERVER, CAPS).unwrap();
        let mut server = Handshake::server(COOKIE, SERVER, CAPS);
        let mut challenge = Vec::new();
        assert_eq!(
            server.feed(&hello, &mut challenge).unwrap(),
            (hello.len(), Progress::Continue)
        );
        let mut proof = Vec::new();
        let fed = client.feed(&challenge, &mut proof).unwrap();
        assert_eq!(fed, (challenge.len(), Progress::Continue));
        (client, server, proof)
    }

    fn assert_eof(err: HandshakeError) {
        match err {
            HandshakeError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected unexpected EOF, got {other:?}"),
        }
    }

    #[test]
    fn machines_in_memory_succeed_whole_and_byte_by_byte() {
        for chunk in [usize::MAX, 1, 2, 3, 7] {
            let (mut client, hello) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
            let mut server = Handshake::server(COOKIE, SERVER, CAPS);
            let (mut to_client, mut to_server) = (Vec::new(), Vec::new());

            let p = feed_in(&mut server, &hello, chunk, &mut to_client).unwrap();
            assert_eq!(p, Progress::Continue);
            assert_eq!(
                to_client.len(),
                2 + 1 + 1 + NONCE_LEN + Capabilities::LEN,
                "the challenge"
            );
            let p = feed_in(&mut client, &to_client, chunk, &mut to_server).unwrap();
            assert_eq!(p, Progress::Continue);
            assert_eq!(
                to_server.len(),
                2 + 1 + MAC_LEN + Capabilities::LEN,
                "the client's proof"
            );
            to_client.clear();
            let p = feed_in(&mut server, &to_server, chunk, &mut to_client).unwrap();
            assert_eq!(p, Progress::Done(peer(CLIENT)), "chunk {chunk}");
            assert_eq!(to_client.len(), 2 + 1 + MAC_LEN, "the server's proof");
            to_server.clear();
            let p = feed_in(&mut client, &to_client, chunk, &mut to_server).unwrap();
            assert_eq!(p, Progress::Done(peer(SERVER)), "chunk {chunk}");
            assert!(to_server.is_empty());
        }
    }

    #[test]
    fn machines_leave_bytes_after_the_handshake_unconsumed() {
        let extra = b"first frame";

        // Server: the client's proof with the connection's first bytes right behind it,
        // in one piece and split inside the proof.
        for split in [0, 1, 20] {
            let (mut client, mut server, proof) = up_to_client_proof(COOKIE);
            let mut to_client = Vec::new();
            let (head, tail) = proof.split_at(split);
            let mut tail = tail.to_vec();
            tail.extend_from_slice(extra);
            assert_eq!(
                server.feed(head, &mut to_client).unwrap(),
                (split, Progress::Continue)
            );
            let (consumed, p) = server.feed(&tail, &mut to_client).unwrap();
            assert_eq!(p, Progress::Done(peer(CLIENT)));
            assert_eq!(consumed, tail.len() - extra.len(), "split {split}");

            // Client: the same behind the server's proof.
            to_client.extend_from_slice(extra);
            let (consumed, p) = client.feed(&to_client, &mut Vec::new()).unwrap();
            assert_eq!(p, Progress::Done(peer(SERVER)));
            assert_eq!(consumed, to_client.len() - extra.len());
        }
    }

    #[test]
    fn machine_wrong_cookie_server_says_nothing() {
        let (client, mut server, proof) = up_to_client_proof(b"other-cookie");
        let mut out = b"queued".to_vec();
        let result = server.feed(&proof, &mut out);
        assert!(matches!(result, Err(HandshakeError::BadCookie)), "{result:?}");
        assert_eq!(out, b"queued", "the server answered a bad proof");
        // The server now closes; that is how the client learns it.
        assert!(matches!(client.closed_error(), HandshakeError::BadCookie));
    }

    #[test]
    fn machine_closed_before_the_proof_is_eof() {
        let (client, hello) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
        assert_eof(client.closed_error());
        let mut server = Handshake::server(COOKIE, SERVER, CAPS);
        assert_eof(server.closed_error());
        server.feed(&hello, &mut Vec::new()).unwrap();
        assert_eof(server.closed_error());
    }

    #[test]
    fn machine_length_out_of_range_refused_before_the_body() {
        let too_long = (MAX_HANDSHAKE_MESSAGE + 1) as u16;
        for (len, expected) in [
            (0u16, 0),
            (too_long, MAX_HANDSHAKE_MESSAGE + 1),
            (u16::MAX, 65535),
        ] {
            let (client, _) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
            for mut hs in [Handshake::server(COOKIE, SERVER, CAPS), client] {
                let mut out = Vec::new();
                // The first byte alone cannot tell yet.
                let [hi, lo] = len.to_be_bytes();
                assert_eq!(hs.feed(&[hi], &mut out).unwrap(), (1, Progress::Continue));
                // A body right behind the length is not kept.
                let mut input = vec![lo];
                input.extend_from_slice(&[TAG_HELLO; 1000]);
                match hs.feed(&input, &mut out) {
                    Err(HandshakeError::Oversized(n)) => assert_eq!(n, expected),
                    other => panic!("length {len}: {other:?}"),
                }
                assert!(hs.incoming.buf.len() <= 2 && hs.incoming.buf.capacity() < MAX_HANDSHAKE_MESSAGE);
                assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn machine_buffers_at_most_the_largest_message() {
        let mut server = Handshake::server(COOKIE, SERVER, CAPS);
        let len = (MAX_HANDSHAKE_MESSAGE as u16).to_be_bytes();
        assert_eq!(
            server.feed(&len, &mut Vec::new()).unwrap(),
            (2, Progress::Continue)
        );
        assert_eq!(server.wanted(), MAX_HANDSHAKE_MESSAGE);
        // Garbage one byte short of the announced length: kept, in no more than the cap.
        let body = vec![TAG_HELLO; MAX_HANDSHAKE_MESSAGE - 1];
        assert_eq!(
            server.feed(&body, &mut Vec::new()).unwrap(),
            (body.len(), Progress::Continue)
        );
        assert_eq!(server.wanted(), 1);
        assert!(server.incoming.buf.capacity() <= MAX_HANDSHAKE_MESSAGE + 2);
        // Its last byte completes it, and the parser refuses it.
        let result = server.feed(&[TAG_HELLO; 100], &mut Vec::new());
        assert!(matches!(result, Err(HandshakeError::Malformed(_))), "{result:?}");
    }

    #[test]
    fn machine_wrong_server_node_and_own_node_name() {
        let (_, hello) = Handshake::client(COOKIE, CLIENT, "c@127.0.0.1", CAPS).unwrap();
        let result = Handshake::server(COOKIE, SERVER, CAPS).feed(&hello, &mut Vec::new());
        assert!(matches!(result, Err(HandshakeError::WrongNode)), "{result:?}");

        // A hello from "us" to us.
        let hello = hello_message(PROTOCOL_VERSION, SERVER.as_bytes(), SERVER.as_bytes());
        let result = Handshake::server(COOKIE, SERVER, CAPS).feed(&hello, &mut Vec::new());
        assert!(matches!(result, Err(HandshakeError::OwnNodeName)), "{result:?}");

        // Dialing ourselves, or bad names, is refused before there is anything to send.
        let result = Handshake::client(COOKIE, CLIENT, CLIENT, CAPS);
        assert!(matches!(result, Err(HandshakeError::OwnNodeName)), "{result:?}");
        let result = Handshake::client(COOKIE, "noat", SERVER, CAPS);
        assert!(matches!(result, Err(HandshakeError::BadNodeName)), "{result:?}");
        let result = Handshake::client(COOKIE, CLIENT, "a@b c", CAPS);
        assert!(matches!(result, Err(HandshakeError::BadNodeName)), "{result:?}");
    }

    #[test]
    fn machine_version_and_reflected_nonce_refused() {
        let hello = hello_message(1, CLIENT.as_bytes(), SERVER.as_bytes());
        let result = Handshake::server(COOKIE, SERVER, CAPS).feed(&hello, &mut Vec::new());
        assert!(
            matches!(result, Err(HandshakeError::Version { peer: 1, .. })),
            "{result:?}"
        );

        // A server echoing the client's nonce as its own.
        let (mut client, hello) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
        let nonce_c: Nonce = hello[2 + 2..2 + 2 + NONCE_LEN].try_into().unwrap();
        let body = challenge_body(PROTOCOL_VERSION, &nonce_c, CAPS);
        let result = client.feed(&encode_message(TAG_CHALLENGE, &body), &mut Vec::new());
        assert!(matches!(result, Err(HandshakeError::Malformed(_))), "{result:?}");
    }

    #[test]
    fn machine_feed_after_done_or_error_is_an_error() {
        let (mut client, mut server, proof) = up_to_client_proof(COOKIE);
        let mut server_proof = Vec::new();
        server.feed(&proof, &mut server_proof).unwrap();
        client.feed(&server_proof, &mut Vec::new()).unwrap();
        for hs in [&mut client, &mut server] {
            let mut out = Vec::new();
            let result = hs.feed(b"more", &mut out);
            assert!(
                matches!(result, Err(HandshakeError::Malformed("handshake over"))),
                "{result:?}"
            );
            assert!(out.is_empty());
            assert!(format!("{hs:?}").contains("over"));
        }

        let mut failed = Handshake::server(COOKIE, SERVER, CAPS);
        assert!(failed.feed(&[0, 0], &mut Vec::new()).is_err());
        let result = failed.feed(
            &hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), SERVER.as_bytes()),
            &mut Vec::new(),
        );
        assert!(
            matches!(result, Err(HandshakeError::Malformed("handshake over"))),
            "{result:?}"
        );
    }

    #[test]
    fn machine_a_pipelined_bad_proof_gets_no_challenge_either() {
        let mut input = hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), SERVER.as_bytes());
        input.extend(encode_message(
            TAG_CLIENT_PROOF,
            &[0u8; MAC_LEN + Capabilities::LEN],
        ));
        let mut out = Vec::new();
        let result = Handshake::server(COOKIE, SERVER, CAPS).feed(&input, &mut out);
        assert!(matches!(result, Err(HandshakeError::BadCookie)), "{result:?}");
        assert!(out.is_empty());
    }

    #[test]
    fn machine_debug_hides_the_cookie() {
        let hs = Handshake::server(COOKIE, SERVER, CAPS);
        let shown = format!("{hs:?}");
        assert!(shown.contains(SERVER) && !shown.contains("monster"), "{shown}");
    }

    /// Feeds `input` to `hs` in random splits until it errs, finishes or runs out.
    fn feed_randomly(
        hs: &mut Handshake,
        mut input: &[u8],
        rng: &mut XorShift,
    ) -> Result<Progress, HandshakeError> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let split = 1 + (rng.next() as usize) % input.len();
            let (consumed, progress) = hs.feed(&input[..split], &mut out)?;
            assert!(consumed <= split);
            if progress != Progress::Continue {
                return Ok(progress);
            }
            assert_eq!(consumed, split, "a piece left over before the end");
            input = &input[split..];
        }
        Ok(Progress::Continue)
    }

    #[test]
    fn machine_garbage_never_panics_or_succeeds() {
        let mut rng = XorShift(0x0BAD_5EED_1234_5678);
        let hello = hello_message(PROTOCOL_VERSION, CLIENT.as_bytes(), SERVER.as_bytes());
        for i in 0..3000 {
            let garbage = rng.bytes(2 * MAX_HANDSHAKE_MESSAGE);
            // Raw garbage, well-framed garbage, and garbage behind a valid hello, so every
            // layer (length, parser, proof) gets some.
            let input = match i % 3 {
                0 => garbage,
                1 if !garbage.is_empty() => encode_message(garbage[0], &garbage[1..garbage.len().min(500)]),
                _ => [hello.as_slice(), &garbage].concat(),
            };
            let mut server = Handshake::server(COOKIE, SERVER, CAPS);
            let result = feed_randomly(&mut server, &input, &mut rng);
            assert!(!matches!(result, Ok(Progress::Done(_))), "garbage #{i} got in");

            let (mut client, _) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
            let result = feed_randomly(&mut client, &input, &mut rng);
            assert!(!matches!(result, Ok(Progress::Done(_))), "garbage #{i} got in");
        }
    }

    // -----------------------------------------------------------------------
    // The blocking versions leave the connection's first bytes in the socket

    /// Feeds `hs` from `stream` a byte at a time until it has something to send or is done.
    fn pump(stream: &mut TcpStream, hs: &mut Handshake, out: &mut Vec<u8>) -> Progress {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        loop {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).unwrap();
            let (_, progress) = hs.feed(&byte, out).unwrap();
            if progress != Progress::Continue || !out.is_empty() {
                return progress;
            }
        }
    }

    const FIRST_FRAME: &[u8] = b"first frame";

    #[test]
    fn blocking_server_does_not_read_past_the_client_proof() {
        let (mut client, server) = pair();
        let srv = thread::spawn(move || {
            let result = server_handshake(&server, &cfg(COOKIE, SERVER, Duration::from_secs(5)));
            let mut rest = [0u8; FIRST_FRAME.len()];
            server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            (&server).read_exact(&mut rest).unwrap();
            (result.unwrap(), rest)
        });
        let (mut hs, hello) = Handshake::client(COOKIE, CLIENT, SERVER, CAPS).unwrap();
        client.write_all(&hello).unwrap();
        let mut out = Vec::new();
        assert_eq!(pump(&mut client, &mut hs, &mut out), Progress::Continue);
        out.extend_from_slice(FIRST_FRAME);
        client.write_all(&out).unwrap();
        out.clear();
        assert_eq!(pump(&mut client, &mut hs, &mut out), Progress::Done(peer(SERVER)));

        let (client_peer, rest) = srv.join().unwrap();
        assert_eq!(client_peer, peer(CLIENT));
        assert_eq!(rest, FIRST_FRAME);
    }

    #[test]
    fn blocking_client_does_not_read_past_the_server_proof() {
        let (client, mut server) = pair();
        let srv = thread::spawn(move || {
            let mut hs = Handshake::server(COOKIE, SERVER, CAPS);
            let mut out = Vec::new();
            assert_eq!(pump(&mut server, &mut hs, &mut out), Progress::Continue);
            server.write_all(&out).unwrap();
            out.clear();
            let progress = pump(&mut server, &mut hs, &mut out);
            out.extend_from_slice(FIRST_FRAME);
            server.write_all(&out).unwrap();
            progress
        });
        client_handshake(&client, &cfg(COOKIE, CLIENT, Duration::from_secs(5)), SERVER).unwrap();
        let mut rest = [0u8; FIRST_FRAME.len()];
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&client).read_exact(&mut rest).unwrap();
        assert_eq!(rest, FIRST_FRAME);
        assert_eq!(srv.join().unwrap(), Progress::Done(peer(CLIENT)));
    }
}
