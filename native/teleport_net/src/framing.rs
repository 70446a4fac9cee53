//! Frames on an authenticated connection: a 5-byte header (body length, kind)
//! followed by the body. Every length is checked by `check_body_len`: a sender's
//! before the frame is made, the reader's before it allocates anything.
//!
//! A body over `EXPRESS_MAX` bytes does not go whole: a `BulkStart` frame announces
//! it (its kind and length), and `BulkChunk` frames carry it, with other frames (of
//! other senders) between them. So a small message never waits behind more than one
//! chunk of someone else's large one (`CHUNK_MAX` at most, see `chunking`). One bulk body is
//! under way per connection at a time: the receiver holds at most one partial body
//! per connection, in the buffer it will be delivered in.

use crate::error::FrameRefusal;
use std::fmt;
use std::time::Duration;

/// `[u32 big-endian body length][u8 kind]`.
pub const HEADER_LEN: usize = 5;

/// Bodies up to this size go in one frame; larger ones in chunks.
pub const EXPRESS_MAX: usize = 64 * 1024;

/// A bulk body goes out in writes of several chunks, each write sized as the body
/// starts to take about `BULK_WRITE_TIME` at the delivery rate TCP measures on the
/// connection (`chunking`). Large writes keep a fast path fast: on loopback each
/// `sendmsg` costs the sender's kernel about as much as the bytes it copies, and one
/// chunk per write of 256 KiB ran bulk streams at 0.6x of 2 MiB writes (the ring 1.9x
/// disterl against 2.6x). Small chunks keep a small frame's wait short: one queued
/// while a write is under way goes out after the chunk being written, ahead of the
/// write's other chunks (`SendQueue`), so it waits for at most `CHUNK_MAX` bytes of
/// another sender's body, not a whole write's. A write is cut so only while small
/// frames go to the peer (`send_queue::SMALL_FRAMES_LATELY`); otherwise it is one chunk.
pub const BULK_WRITE_TIME: Duration = Duration::from_micros(500);
/// Writes never smaller than this (a slow link: 64 KiB take 0.5 ms at 1 Gbit/s)...
pub const BULK_WRITE_MIN: usize = 64 * 1024;
/// ...nor larger than this.
pub const BULK_WRITE_MAX: usize = 2 * 1024 * 1024;
/// Where TCP reports no rate (not Linux, or nothing delivered yet).
pub const BULK_WRITE_DEFAULT: usize = 1024 * 1024;
/// The largest chunk: about 0.1 ms of the 2.5 GB/s one of two loopback connections
/// gets when a single receiving thread reads both.
pub const CHUNK_MAX: usize = 256 * 1024;

/// How a bulk body is cut for a connection: chunks of `chunk` bytes, written
/// `per_write` bytes of them at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    pub chunk: usize,
    pub per_write: usize,
}

/// The chunking for a connection delivering `rate` bytes a second, if known.
pub fn chunking(rate: Option<u64>) -> Chunking {
    let per_write = match rate {
        Some(rate) if rate > 0 => {
            let len = rate.saturating_mul(BULK_WRITE_TIME.as_micros() as u64) / 1_000_000;
            usize::try_from(len)
                .unwrap_or(BULK_WRITE_MAX)
                .clamp(BULK_WRITE_MIN, BULK_WRITE_MAX)
        }
        _ => BULK_WRITE_DEFAULT,
    };
    Chunking {
        chunk: per_write.min(CHUNK_MAX),
        per_write,
    }
}

/// A `PoolEpoch` body: which pool of which runtime a connection belongs to, the
/// runtime's random incarnation and a per-runtime pool counter.
pub type PoolToken = [u8; POOL_TOKEN_LEN];
pub const POOL_TOKEN_LEN: usize = 16;

/// A `BulkStart` body: `[u8 kind][u32 big-endian body length]`.
pub const BULK_START_LEN: usize = 5;

/// What a frame's body holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// `{Dest, Msg}`: deliver Msg to Dest.
    Send = 1,
    /// `{Dest, Call, Request}`: a gen_server call, made on the caller's behalf by a local relay
    /// whose reply (or the server's exit reason) goes back over teleport.
    Call = 2,
    /// `[u64 incarnation][u64 epoch]`, the first frame on every connection: which pool
    /// of the sending runtime it belongs to. Handled by the reader, never delivered.
    PoolEpoch = 3,
    /// `[u8 kind][u32 length]`: a body of that kind and length follows in chunks.
    /// Handled by the reader, never delivered.
    BulkStart = 4,
    /// The next bytes of the bulk body under way. Handled by the reader.
    BulkChunk = 5,
}

impl FrameKind {
    pub(crate) fn from_byte(byte: u8) -> Option<FrameKind> {
        match byte {
            1 => Some(FrameKind::Send),
            2 => Some(FrameKind::Call),
            3 => Some(FrameKind::PoolEpoch),
            4 => Some(FrameKind::BulkStart),
            5 => Some(FrameKind::BulkChunk),
            _ => None,
        }
    }

    /// A kind whose body is delivered (a bulk body is one of these).
    pub fn is_message(self) -> bool {
        matches!(self, FrameKind::Send | FrameKind::Call)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub body_len: u32,
}

#[derive(Debug)]
pub enum FrameError {
    TooLarge { len: usize, max: u32 },
    Empty,
    UnknownKind(u8),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => write!(f, "frame of {len} bytes over the cap of {max}"),
            FrameError::Empty => write!(f, "empty frame"),
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameError {
    pub fn refusal(&self) -> FrameRefusal {
        match self {
            FrameError::TooLarge { .. } => FrameRefusal::FrameTooLarge,
            FrameError::Empty => FrameRefusal::EmptyFrame,
            FrameError::UnknownKind(_) => FrameRefusal::UnknownFrameKind,
        }
    }
}

/// The one rule for a frame body's size, for frames made (`OutFrame::new`) and read
/// (headers, bulk bodies): at most `max` bytes (`max_frame_bytes`, or a smaller cap the
/// reader expects). `max` is a u32, so a body within it fits the header's length.
pub fn check_body_len(len: usize, max: u32) -> Result<u32, FrameError> {
    match u32::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(FrameError::TooLarge { len, max }),
    }
}

/// A whole frame in one buffer: its header, then `body` (at most `u32::MAX` bytes).
pub fn encode_frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        kind,
        body_len: body.len() as u32,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
    out
}

/// The `BulkStart` frame (header and body) of a bulk body of `kind` and `len` bytes.
pub fn bulk_start(kind: FrameKind, len: u32) -> [u8; HEADER_LEN + BULK_START_LEN] {
    let header = FrameHeader {
        kind: FrameKind::BulkStart,
        body_len: BULK_START_LEN as u32,
    }
    .encode();
    let len = len.to_be_bytes();
    [
        header[0], header[1], header[2], header[3], header[4], kind as u8, len[0], len[1], len[2], len[3],
    ]
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let len = self.body_len.to_be_bytes();
        [len[0], len[1], len[2], len[3], self.kind as u8]
    }

    pub fn decode(bytes: &[u8; HEADER_LEN], max_body: u32) -> Result<FrameHeader, FrameError> {
        let body_len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if body_len == 0 {
            return Err(FrameError::Empty);
        }
        let body_len = check_body_len(body_len as usize, max_body)?;
        let kind = FrameKind::from_byte(bytes[4]).ok_or(FrameError::UnknownKind(bytes[4]))?;
        Ok(FrameHeader { kind, body_len })
    }
}

/// The bytes of one frame body, possibly scattered (e.g. an encoded term whose
/// large binaries are referenced in place). They must stay valid while `self` lives;
/// dropping `self` is what releases them, after they are on the wire.
pub trait FrameBody: Send {
    fn len(&self) -> usize;
    /// The body's pieces in order; after `embed_header` returned true, the header first.
    fn push_pieces<'a>(&'a self, out: &mut Vec<&'a [u8]>);
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A body with `HEADER_LEN` spare bytes in front of its first piece can take the
    /// frame header there, so a small frame is one slice (one `send`, no vector to
    /// build). Returns false if it cannot.
    fn embed_header(&mut self, _header: &[u8; HEADER_LEN]) -> bool {
        false
    }
    /// All of it (with the header, once embedded) if it is one slice.
    fn contiguous(&self) -> Option<&[u8]> {
        None
    }
}

impl FrameBody for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn push_pieces<'a>(&'a self, out: &mut Vec<&'a [u8]>) {
        out.push(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_take_about_half_a_millisecond_in_chunks_of_at_most_256_kib() {
        let whole = |len| Chunking {
            chunk: len,
            per_write: len,
        };
        let cut = |per_write| Chunking {
            chunk: CHUNK_MAX,
            per_write,
        };
        assert_eq!(chunking(None), cut(BULK_WRITE_DEFAULT));
        assert_eq!(chunking(Some(0)), cut(BULK_WRITE_DEFAULT));
        // 1 Gbit/s: 62,500 bytes in 0.5 ms, so the floor, one chunk per write.
        assert_eq!(chunking(Some(125_000_000)), whole(BULK_WRITE_MIN));
        // 2 Gbit/s: 125,000 bytes.
        assert_eq!(chunking(Some(250_000_000)), whole(125_000));
        // 10 Gbit/s: 625,000 bytes, in chunks of 256 KiB.
        assert_eq!(chunking(Some(1_250_000_000)), cut(625_000));
        // Loopback, 3.5 GB/s and beyond: the ceiling.
        assert_eq!(chunking(Some(3_500_000_000)), cut(1_750_000));
        assert_eq!(chunking(Some(u64::MAX)), cut(BULK_WRITE_MAX));
    }
    use std::io::{self, Read};

    #[derive(Debug)]
    enum ReadError {
        Io(#[allow(dead_code)] io::Error),
        Frame(FrameError),
    }

    /// Reads the next header. `Ok(None)` is a clean end of stream between frames.
    fn read_header<R: Read>(reader: &mut R, max_body: u32) -> Result<Option<FrameHeader>, ReadError> {
        let mut bytes = [0u8; HEADER_LEN];
        let mut filled = 0;
        while filled < HEADER_LEN {
            match reader.read(&mut bytes[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        FrameHeader::decode(&bytes, max_body)
            .map(Some)
            .map_err(ReadError::Frame)
    }

    /// Reads a header and its body into `body` (reused between frames).
    fn read_frame<R: Read>(
        reader: &mut R,
        max_body: u32,
        body: &mut Vec<u8>,
    ) -> Result<Option<FrameKind>, ReadError> {
        let Some(header) = read_header(reader, max_body)? else {
            return Ok(None);
        };
        body.clear();
        body.resize(header.body_len as usize, 0);
        reader.read_exact(body).map_err(ReadError::Io)?;
        Ok(Some(header.kind))
    }

    use std::io::Cursor;

    fn frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
        encode_frame(kind, body)
    }

    #[test]
    fn header_roundtrip() {
        let h = FrameHeader {
            kind: FrameKind::Call,
            body_len: 0x01020304,
        };
        assert_eq!(h.encode(), [1, 2, 3, 4, 2]);
        assert_eq!(FrameHeader::decode(&h.encode(), u32::MAX).unwrap(), h);
    }

    #[test]
    fn reads_consecutive_frames_then_clean_eof() {
        let mut wire = frame(FrameKind::Send, b"hello");
        wire.extend(frame(FrameKind::Call, b"x"));
        let mut cursor = Cursor::new(wire);
        let mut body = Vec::new();
        assert_eq!(
            read_frame(&mut cursor, 100, &mut body).unwrap(),
            Some(FrameKind::Send)
        );
        assert_eq!(body, b"hello");
        assert_eq!(
            read_frame(&mut cursor, 100, &mut body).unwrap(),
            Some(FrameKind::Call)
        );
        assert_eq!(body, b"x");
        assert_eq!(read_frame(&mut cursor, 100, &mut body).unwrap(), None);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let wire = vec![0xff, 0xff, 0xff, 0xff, 1];
        let mut body = Vec::new();
        match read_frame(&mut Cursor::new(wire), 1 << 20, &mut body) {
            Err(ReadError::Frame(FrameError::TooLarge { len, max })) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 1 << 20);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(body.capacity(), 0);
    }

    #[test]
    fn a_body_is_checked_against_the_cap_and_the_headers_u32() {
        assert_eq!(check_body_len(1024, 1024).unwrap(), 1024);
        assert!(matches!(
            check_body_len(1025, 1024),
            Err(FrameError::TooLarge { len: 1025, max: 1024 })
        ));
        let past_u32 = u32::MAX as usize + 1;
        assert!(matches!(
            check_body_len(past_u32, u32::MAX),
            Err(FrameError::TooLarge { len, .. }) if len == past_u32
        ));
    }

    #[test]
    fn truncated_header_and_body_are_errors() {
        let mut body = Vec::new();
        let r = read_frame(&mut Cursor::new(vec![0, 0]), 100, &mut body);
        assert!(matches!(r, Err(ReadError::Io(_))));
        let mut wire = frame(FrameKind::Send, b"hello");
        wire.truncate(7);
        let r = read_frame(&mut Cursor::new(wire), 100, &mut body);
        assert!(matches!(r, Err(ReadError::Io(_))));
    }

    #[test]
    fn empty_and_unknown_kind_are_errors() {
        let mut body = Vec::new();
        let r = read_frame(&mut Cursor::new(vec![0, 0, 0, 0, 1]), 100, &mut body);
        assert!(matches!(r, Err(ReadError::Frame(FrameError::Empty))));
        let r = read_frame(&mut Cursor::new(vec![0, 0, 0, 1, 9, 0]), 100, &mut body);
        assert!(matches!(r, Err(ReadError::Frame(FrameError::UnknownKind(9)))));
    }

    #[test]
    fn garbage_never_panics() {
        let mut state: u64 = 0x9e3779b97f4a7c15;
        let mut body = Vec::new();
        for _ in 0..2000 {
            let mut wire = Vec::new();
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                wire.push(state as u8);
            }
            let mut cursor = Cursor::new(wire);
            while let Ok(Some(_)) = read_frame(&mut cursor, 64, &mut body) {
                assert!(body.len() <= 64);
            }
        }
    }
}
