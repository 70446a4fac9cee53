//! Frames on an authenticated connection: a 5-byte header (body length, kind)
//! followed by the body. The reader checks the length against its own cap
//! before it allocates anything.

use std::fmt;
use std::io::{self, Read};

/// `[u32 big-endian body length][u8 kind]`.
pub const HEADER_LEN: usize = 5;

/// What a frame's body holds. Both bodies are one external-format term.
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
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        match byte {
            1 => Some(FrameKind::Send),
            2 => Some(FrameKind::Call),
            3 => Some(FrameKind::PoolEpoch),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub body_len: u32,
}

#[derive(Debug)]
pub enum FrameError {
    Io(io::Error),
    TooLarge { len: u32, max: u32 },
    Empty,
    UnknownKind(u8),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "io: {e}"),
            FrameError::TooLarge { len, max } => write!(f, "frame of {len} bytes over the cap of {max}"),
            FrameError::Empty => write!(f, "empty frame"),
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameError {
    /// Short name for logs and events.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Io(_) => "io",
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::Empty => "empty_frame",
            FrameError::UnknownKind(_) => "unknown_frame_kind",
        }
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
        if body_len > max_body {
            return Err(FrameError::TooLarge {
                len: body_len,
                max: max_body,
            });
        }
        let kind = FrameKind::from_byte(bytes[4]).ok_or(FrameError::UnknownKind(bytes[4]))?;
        Ok(FrameHeader { kind, body_len })
    }
}

/// Reads the next header. `Ok(None)` is a clean end of stream between frames.
pub fn read_header<R: Read>(reader: &mut R, max_body: u32) -> Result<Option<FrameHeader>, FrameError> {
    let mut bytes = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut bytes[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    FrameHeader::decode(&bytes, max_body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a header and its body into `body` (reused between frames).
    fn read_frame<R: Read>(
        reader: &mut R,
        max_body: u32,
        body: &mut Vec<u8>,
    ) -> Result<Option<FrameKind>, FrameError> {
        let Some(header) = read_header(reader, max_body)? else {
            return Ok(None);
        };
        body.clear();
        body.resize(header.body_len as usize, 0);
        reader.read_exact(body).map_err(FrameError::Io)?;
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
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX);
                assert_eq!(max, 1 << 20);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(body.capacity(), 0);
    }

    #[test]
    fn truncated_header_and_body_are_errors() {
        let mut body = Vec::new();
        let r = read_frame(&mut Cursor::new(vec![0, 0]), 100, &mut body);
        assert!(matches!(r, Err(FrameError::Io(_))));
        let mut wire = frame(FrameKind::Send, b"hello");
        wire.truncate(7);
        let r = read_frame(&mut Cursor::new(wire), 100, &mut body);
        assert!(matches!(r, Err(FrameError::Io(_))));
    }

    #[test]
    fn empty_and_unknown_kind_are_errors() {
        let mut body = Vec::new();
        let r = read_frame(&mut Cursor::new(vec![0, 0, 0, 0, 1]), 100, &mut body);
        assert!(matches!(r, Err(FrameError::Empty)));
        let r = read_frame(&mut Cursor::new(vec![0, 0, 0, 1, 9, 0]), 100, &mut body);
        assert!(matches!(r, Err(FrameError::UnknownKind(9))));
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
