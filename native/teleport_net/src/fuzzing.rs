//! What the fuzz targets (`native/teleport_net/fuzz`) call, so that the corpus
//! replay test (`tests/fuzz_corpus.rs`) runs the very same code. Each entry takes
//! bytes as a peer would send them and runs the parsers the network side runs on
//! them, without sockets, clocks or randomness. Not an API.

use crate::etf::read::ReadError;
use crate::etf::value::{read_value, Value};
use crate::frame_reader::parse_stream;
use crate::framing::FrameKind;
use crate::handshake::{
    accept_challenge, accept_hello, challenge_body, check_client_proof, check_server_proof, client_nonce,
    client_proof_body, encode_hello, encode_message, message_len, Capabilities, HandshakeError, Nonce,
    Transcript, PROTOCOL_VERSION, TAG_CHALLENGE, TAG_CLIENT_PROOF, TAG_HELLO, TAG_SERVER_PROOF,
};
use crate::runtime::POOL_TOKEN_LEN;

/// The fixed parties of the handshake target (a real handshake draws its nonces at random).
pub const COOKIE: &[u8] = b"fuzz-cookie";
pub const CLIENT_NODE: &str = "a@127.0.0.1";
pub const SERVER_NODE: &str = "b@127.0.0.1";
/// The client's nonce starts with the version mark (`client_nonce`).
const NONCE_C_RANDOM: Nonce = [0x11; 32];
const NONCE_S: Nonce = [0x22; 32];
const CAPABILITIES: Capabilities = Capabilities {
    otp_release: 29,
    flags: Capabilities::NATIVE_RECORDS,
};

/// The frame target's `max_frame_bytes`.
pub const MAX_FRAME: u32 = 8 * 1024;

/// The targets, by the name of their directory under `fuzz/corpus` and `fuzz/seeds`.
pub const TARGETS: [&str; 3] = ["handshake", "frames", "etf_read"];

#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The server side authenticated this client node.
    Server(String),
    /// The client side accepted the server's proof.
    Client,
}

/// One side of a handshake fed the peer's messages: the first byte picks the side
/// (even: we are the server and the rest is what a client sends, HELLO then
/// CLIENT_PROOF; odd: we are the client, the rest is CHALLENGE then SERVER_PROOF).
/// Every message goes through the same length check and parser as on a socket.
pub fn handshake(data: &[u8]) -> Result<Accepted, HandshakeError> {
    let Some((&side, mut rest)) = data.split_first() else {
        return Err(HandshakeError::Malformed("empty input"));
    };
    if side % 2 == 0 {
        let hello = accept_hello(next_message(&mut rest)?, SERVER_NODE)?;
        check_client_proof(
            COOKIE,
            &hello,
            &NONCE_S,
            CAPABILITIES,
            None,
            next_message(&mut rest)?,
        )?;
        Ok(Accepted::Server(hello.client_node))
    } else {
        let nonce_c = client_nonce(NONCE_C_RANDOM);
        let challenge = accept_challenge(next_message(&mut rest)?, &nonce_c)?;
        let transcript =
            Transcript::client(nonce_c, &challenge, CLIENT_NODE, SERVER_NODE, CAPABILITIES, None);
        check_server_proof(COOKIE, &transcript, next_message(&mut rest)?)?;
        Ok(Accepted::Client)
    }
}

/// `[u16 length][tag][body]` off the front of `input`: tag + body.
fn next_message<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], HandshakeError> {
    let eof = || HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into());
    let (len_bytes, rest) = input.split_first_chunk::<2>().ok_or_else(eof)?;
    let len = message_len(*len_bytes)?;
    if rest.len() < len {
        return Err(eof());
    }
    let (msg, rest) = rest.split_at(len);
    *input = rest;
    Ok(msg)
}

/// What an inbound stream after authentication did.
#[derive(Debug, PartialEq)]
pub struct FramesOutcome {
    /// Frames whose body read as a term, in order.
    pub terms: Vec<Value>,
    /// `Ok` at a clean end between frames, else why the connection would close.
    pub end: Result<(), String>,
}

/// An authenticated inbound stream, as its I/O thread's frame reader sees it: the pool token
/// frame, then frames (header checks, `max_frame_bytes` = `MAX_FRAME`) whose
/// bodies are read as terms.
pub fn frames(data: &[u8]) -> FramesOutcome {
    let mut terms = Vec::new();
    let end = parse_stream(data, MAX_FRAME, &mut |_kind, body| {
        terms.push(read_value(body).map_err(|e| format!("malformed frame: {e}"))?);
        Ok(())
    });
    FramesOutcome { terms, end }
}

/// One frame body: a whole external term.
pub fn etf_read(data: &[u8]) -> Result<Value, ReadError> {
    read_value(data)
}

/// Valid inputs for each target, by name: the fuzzers start from these
/// (`fuzz/seeds/<target>/`), and the replay test checks they are accepted.
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "handshake" => handshake_seeds(),
        "frames" => frames_seeds(),
        "etf_read" => TERMS
            .iter()
            .map(|(name, bytes)| (*name, bytes.to_vec()))
            .collect(),
        _ => Vec::new(),
    }
}

fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let nonce_c = client_nonce(NONCE_C_RANDOM);
    let hello = encode_message(TAG_HELLO, &encode_hello(&nonce_c, CLIENT_NODE, SERVER_NODE));
    let challenge = encode_message(
        TAG_CHALLENGE,
        &challenge_body(PROTOCOL_VERSION, &NONCE_S, CAPABILITIES),
    );
    let accepted = accept_challenge(&challenge[2..], &nonce_c).expect("valid challenge");
    let transcript = Transcript::client(nonce_c, &accepted, CLIENT_NODE, SERVER_NODE, CAPABILITIES, None);
    let client_msg = encode_message(TAG_CLIENT_PROOF, &client_proof_body(COOKIE, &transcript));
    let mut server_side = vec![0];
    server_side.extend(&hello);
    server_side.extend(&client_msg);

    // The server's proof is what our server side answers that client with.
    let parsed = accept_hello(&hello[2..], SERVER_NODE).expect("valid hello");
    let (server_mac, _) = check_client_proof(COOKIE, &parsed, &NONCE_S, CAPABILITIES, None, &client_msg[2..])
        .expect("valid proof");
    let mut client_side = vec![1];
    client_side.extend(challenge);
    client_side.extend(encode_message(TAG_SERVER_PROOF, &server_mac));
    vec![("server-accepts", server_side), ("client-accepts", client_side)]
}

fn frames_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frame = crate::framing::encode_frame;
    let token = frame(FrameKind::PoolEpoch, &[7u8; POOL_TOKEN_LEN]);
    let send = |term: &[u8]| frame(FrameKind::Send, term);
    let mut one = token.clone();
    one.extend(send(SEND_TERM));
    let mut several = token.clone();
    several.extend(send(SEND_TERM));
    several.extend(frame(FrameKind::Call, CALL_TERM));
    for (_, term) in TERMS {
        several.extend(send(term));
    }
    // A bulk body in two chunks with a small frame between them.
    let mut bulk_body = SEND_TERM[..SEND_TERM.len() - 5].to_vec();
    bulk_body.extend_from_slice(b"hello");
    let mut bulk = token.clone();
    bulk.extend(crate::framing::bulk_start(
        FrameKind::Send,
        bulk_body.len() as u32,
    ));
    bulk.extend(frame(FrameKind::BulkChunk, &bulk_body[..6]));
    bulk.extend(send(SEND_TERM));
    bulk.extend(frame(FrameKind::BulkChunk, &bulk_body[6..]));
    vec![
        ("token-only", token),
        ("one-send", one),
        ("send-call-and-more", several),
        ("bulk-in-chunks", bulk),
    ]
}

/// `{a, hello}` as a Send body.
const SEND_TERM: &[u8] = &[131, 104, 2, 119, 1, b'a', 119, 5, b'h', b'e', b'l', b'l', b'o'];
/// `{srv, call, 1}` as a Call body (the relay checks its shape; this target does not).
const CALL_TERM: &[u8] = &[
    131, 104, 3, 119, 3, b's', b'r', b'v', 119, 4, b'c', b'a', b'l', b'l', 97, 1,
];

/// Terms with every tag the parser knows: `term_to_binary/1` on OTP 25 made most of
/// them (`[{minor_version, 2}]` for the UTF-8 atoms); pids, refs, ports and funs are
/// opaque to the parser but still length-checked.
const TERMS: &[(&str, &[u8])] = &[
    ("small-int", &[131, 97, 42]),
    ("negative-int", &[131, 98, 255, 255, 255, 214]),
    ("float", &[131, 70, 64, 9, 33, 249, 240, 27, 134, 110]),
    ("atom", &[131, 100, 0, 2, 111, 107]),
    ("atom-latin1", &[131, 100, 0, 3, 233, 116, 233]),
    ("nil", &[131, 106]),
    ("string", &[131, 107, 0, 3, 97, 98, 99]),
    ("binary", &[131, 109, 0, 0, 0, 3, 1, 2, 3]),
    ("empty-tuple", &[131, 104, 0]),
    ("improper-list", &[131, 108, 0, 0, 0, 1, 97, 1, 100, 0, 1, 98]),
    ("map", &[131, 116, 0, 0, 0, 2, 97, 1, 97, 2, 100, 0, 1, 107, 106]),
    ("small-big", &[131, 110, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
    ("negative-big", &[131, 110, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 64]),
    ("bitstring", &[131, 77, 0, 0, 0, 1, 3, 224]),
    (
        "pid",
        &[
            131, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0, 0, 0, 80,
            0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ),
    (
        "ref",
        &[
            131, 90, 0, 3, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0, 0,
            0, 0, 0, 1, 131, 85, 5, 200, 0, 1, 78, 144, 69, 69,
        ],
    ),
    (
        "port",
        &[
            131, 89, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0, 0, 0, 0,
            0, 0, 0, 0,
        ],
    ),
    (
        "export",
        &[
            131, 113, 100, 0, 5, 108, 105, 115, 116, 115, 100, 0, 3, 109, 97, 112, 97, 2,
        ],
    ),
    (
        "fun",
        &[
            131, 112, 0, 0, 0, 77, 1, 98, 161, 189, 110, 24, 192, 186, 11, 228, 205, 103, 111, 165, 79, 110,
            234, 0, 0, 0, 0, 0, 0, 0, 0, 100, 0, 9, 103, 101, 110, 95, 116, 101, 114, 109, 115, 97, 0, 98, 3,
            21, 13, 235, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0,
            0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ),
    (
        "send",
        &[
            131, 104, 2, 100, 0, 9, 115, 111, 109, 101, 95, 110, 97, 109, 101, 104, 4, 100, 0, 3, 109, 115,
            103, 109, 0, 0, 0, 7, 112, 97, 121, 108, 111, 97, 100, 108, 0, 0, 0, 3, 70, 63, 248, 0, 0, 0, 0,
            0, 0, 98, 255, 255, 255, 249, 107, 0, 3, 115, 116, 114, 106, 116, 0, 0, 0, 1, 100, 0, 1, 97, 104,
            0,
        ],
    ),
    (
        "call",
        &[
            131, 104, 3, 100, 0, 3, 115, 114, 118, 104, 2, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64,
            110, 111, 104, 111, 115, 116, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 108, 0, 0, 0, 1, 100, 0, 5, 97,
            108, 105, 97, 115, 90, 0, 3, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111,
            115, 116, 0, 0, 0, 0, 0, 1, 131, 87, 5, 200, 0, 1, 78, 144, 69, 69, 104, 2, 100, 0, 3, 103, 101,
            116, 100, 0, 3, 107, 101, 121,
        ],
    ),
    (
        "atoms-utf8",
        &[
            131, 104, 3, 119, 2, 111, 107, 119, 5, 195, 169, 116, 195, 169, 119, 6, 230, 151, 165, 230, 156,
            172,
        ],
    ),
    // Encodings term_to_binary does not choose, which binary_to_term still takes.
    ("large-tuple", &[131, 105, 0, 0, 0, 2, 97, 1, 97, 2]),
    ("atom-utf8-ext", &[131, 118, 0, 2, 104, 105]),
    ("small-atom-ext", &[131, 115, 2, 104, 105]),
    ("large-big", &[131, 111, 0, 0, 0, 1, 1, 5]),
    (
        "float-ext",
        &[
            131, 99, 49, 46, 53, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48,
            101, 43, 48, 48, 0, 0, 0, 0, 0,
        ],
    ),
];
