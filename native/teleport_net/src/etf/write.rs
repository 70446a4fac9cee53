//! Byte-level writer of the external term format, byte for byte as `term_to_binary/1`
//! writes each piece (atoms in either release's form: `atom_latin1` as OTP 25 and
//! earlier, `atom_latin1_as_utf8` and `atom_utf8` as OTP 26 and later), and `Body`: the output of one encode, a
//! buffer for the small parts plus large binaries referenced in place, ready to be
//! written with one `writev` as a frame body.
//!
//! The writers append to a `Vec<u8>`; the NIF's encoder walks VM terms and calls
//! them, so everything here is testable without a VM.

use std::any::Any;

use super::*;
use crate::framing::{FrameBody, HEADER_LEN};

/// Proper lists of bytes shorter than this are written as STRING_EXT (as OTP 25 does,
/// which takes lists of up to 65535 bytes).
pub const STRING_MAX: usize = 65535;

pub fn version(out: &mut Vec<u8>) {
    out.push(VERSION);
}

pub fn nil(out: &mut Vec<u8>) {
    out.push(NIL_EXT);
}

/// An integer: SMALL_INTEGER_EXT for 0..=255, INTEGER_EXT within i32, else SMALL_BIG_EXT.
#[inline]
pub fn int(out: &mut Vec<u8>, v: i64) {
    if (0..=255).contains(&v) {
        out.extend_from_slice(&[SMALL_INTEGER_EXT, v as u8]);
    } else if let Ok(v) = i32::try_from(v) {
        let b = v.to_be_bytes();
        out.extend_from_slice(&[INTEGER_EXT, b[0], b[1], b[2], b[3]]);
    } else {
        small_big(out, v < 0, v.unsigned_abs());
    }
}

#[inline]
pub fn uint(out: &mut Vec<u8>, v: u64) {
    match i64::try_from(v) {
        Ok(v) => int(out, v),
        Err(_) => small_big(out, false, v),
    }
}

/// SMALL_BIG_EXT with the fewest magnitude bytes (little-endian), as the VM writes it.
fn small_big(out: &mut Vec<u8>, negative: bool, magnitude: u64) {
    let n = (8 - magnitude.leading_zeros() / 8) as usize;
    out.extend_from_slice(&[SMALL_BIG_EXT, n as u8, negative as u8]);
    out.extend_from_slice(&magnitude.to_le_bytes()[..n]);
}

#[inline]
pub fn float(out: &mut Vec<u8>, f: f64) {
    out.push(NEW_FLOAT_EXT);
    out.extend_from_slice(&f.to_bits().to_be_bytes());
}

/// An atom whose every character is Latin-1, given as Latin-1 bytes: OTP 25's
/// `term_to_binary/1` writes ATOM_EXT (never SMALL_ATOM_EXT) for these.
#[inline]
pub fn atom_latin1(out: &mut Vec<u8>, name: &[u8]) {
    debug_assert!(name.len() <= 255);
    out.push(ATOM_EXT);
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name);
}

/// An atom whose every character is Latin-1, given as Latin-1 bytes, written as OTP 26
/// and later write every atom: SMALL_ATOM_UTF8_EXT with its UTF-8 bytes (ATOM_UTF8_EXT
/// past 255 bytes: a name of over 127 characters 128..=255).
#[inline]
pub fn atom_latin1_as_utf8(out: &mut Vec<u8>, name: &[u8]) {
    debug_assert!(name.len() <= 255);
    if name.is_ascii() {
        out.extend_from_slice(&[SMALL_ATOM_UTF8_EXT, name.len() as u8]);
        out.extend_from_slice(name);
        return;
    }
    let len = name.len() + name.iter().filter(|&&c| c >= 0x80).count();
    if len <= 255 {
        out.extend_from_slice(&[SMALL_ATOM_UTF8_EXT, len as u8]);
    } else {
        out.push(ATOM_UTF8_EXT);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    for &c in name {
        if c < 0x80 {
            out.push(c);
        } else {
            out.extend_from_slice(&[0xC0 | (c >> 6), 0x80 | (c & 0x3F)]);
        }
    }
}

/// An atom with a character over 255, given as UTF-8 bytes (every release writes
/// these alike).
pub fn atom_utf8(out: &mut Vec<u8>, name: &[u8]) {
    debug_assert!(name.len() <= u16::MAX as usize);
    if name.len() <= 255 {
        out.extend_from_slice(&[SMALL_ATOM_UTF8_EXT, name.len() as u8]);
    } else {
        out.push(ATOM_UTF8_EXT);
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(name);
}

/// An atom from its text, in the form OTP 25's `term_to_binary/1` picks.
pub fn atom(out: &mut Vec<u8>, name: &str) {
    if name.chars().all(|c| (c as u32) <= 255) {
        let latin1: Vec<u8> = name.chars().map(|c| c as u8).collect();
        atom_latin1(out, &latin1);
    } else {
        atom_utf8(out, name.as_bytes());
    }
}

#[inline]
pub fn tuple_header(out: &mut Vec<u8>, arity: u32) {
    if arity <= 255 {
        out.extend_from_slice(&[SMALL_TUPLE_EXT, arity as u8]);
    } else {
        tagged_u32(out, LARGE_TUPLE_EXT, arity);
    }
}

/// LIST_EXT and its element count; returns where the count is, for `patch_u32` when
/// the list is walked without knowing its length up front.
#[inline]
pub fn list_header(out: &mut Vec<u8>, len: u32) -> usize {
    tagged_u32(out, LIST_EXT, len);
    out.len() - 4
}

#[inline]
pub fn patch_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn map_header(out: &mut Vec<u8>, pairs: u32) {
    tagged_u32(out, MAP_EXT, pairs);
}

/// BINARY_EXT's tag and length; the bytes follow (or are referenced).
#[inline]
pub fn binary_header(out: &mut Vec<u8>, len: u32) {
    tagged_u32(out, BINARY_EXT, len);
}

/// STRING_EXT: a proper list of at most `STRING_MAX` integers 0..=255.
pub fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!(bytes.len() <= STRING_MAX);
    out.push(STRING_EXT);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[inline]
fn tagged_u32(out: &mut Vec<u8>, tag: u8, v: u32) {
    let b = v.to_be_bytes();
    out.extend_from_slice(&[tag, b[0], b[1], b[2], b[3]]);
}

/// One piece of a body, in order.
#[derive(Clone, Copy)]
enum Chunk {
    /// `buf[start..end]`.
    Own(usize, usize),
    /// Bytes outside the body, kept alive by `Body::keep`.
    External(*const u8, usize),
}

/// One encoded term: small parts in `buf`, large binaries referenced where they are.
/// Optionally keeps `HEADER_LEN` spare bytes in front, where a frame header can go so
/// that a small frame is one contiguous slice.
pub struct Body {
    buf: Vec<u8>,
    /// Spare bytes in front of the body proper (0 or `HEADER_LEN`).
    front: usize,
    /// The frame header has been written into the spare bytes.
    header_in_front: bool,
    /// Every piece up to `tail_start`; `buf[tail_start..]` is the last one. Empty
    /// (no allocation) while nothing is referenced.
    chunks: Vec<Chunk>,
    tail_start: usize,
    external_len: usize,
    /// Whatever owns the referenced bytes; dropped after them, with the body.
    keep: Option<Box<dyn Any + Send>>,
}

// SAFETY: the only non-Send parts are the `External` pointers, to bytes that nothing
// mutates and that `keep` (itself Send) owns until the body is dropped.
unsafe impl Send for Body {}

/// A piece of a body as `Body::pieces` gives it.
pub enum Piece<'a> {
    Own(&'a [u8]),
    External(&'a [u8]),
}

impl Body {
    /// An empty body whose buffer has room for `capacity` bytes; with `header_room`,
    /// `HEADER_LEN` spare bytes go in front for `FrameBody::embed_header`.
    pub fn new(capacity: usize, header_room: bool) -> Body {
        let front = if header_room { HEADER_LEN } else { 0 };
        let mut buf = Vec::with_capacity(front + capacity);
        buf.resize(front, 0);
        Body {
            buf,
            front,
            header_in_front: false,
            chunks: Vec::new(),
            tail_start: front,
            external_len: 0,
            keep: None,
        }
    }

    /// The buffer to append the small parts to. Callers only append, or `truncate`
    /// back what they appended since the last `push_external`.
    #[inline]
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Drops bytes appended since the last external piece (never before it).
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(len.max(self.tail_start));
    }

    /// Where the next byte appended to `buf` will be, counted in `buf`.
    #[inline]
    pub fn position(&self) -> usize {
        self.buf.len()
    }

    /// Adds `bytes` as the next piece without copying them.
    ///
    /// # Safety
    /// `bytes` must stay valid and unchanged until this body is dropped; give whatever
    /// guarantees that to `keep_alive`.
    pub unsafe fn push_external(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.buf.len() > self.tail_start {
            self.chunks.push(Chunk::Own(self.tail_start, self.buf.len()));
        }
        self.chunks.push(Chunk::External(bytes.as_ptr(), bytes.len()));
        self.tail_start = self.buf.len();
        self.external_len += bytes.len();
    }

    /// Keeps `owner` until the body is dropped: the referenced bytes' owner.
    pub fn keep_alive(&mut self, owner: Box<dyn Any + Send>) {
        self.keep = Some(owner);
    }

    /// The body's length in bytes (without any header in front).
    pub fn len(&self) -> usize {
        self.buf.len() - self.front + self.external_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many pieces are referenced rather than copied.
    #[cfg(test)]
    pub fn external_count(&self) -> usize {
        self.chunks
            .iter()
            .filter(|c| matches!(c, Chunk::External(..)))
            .count()
    }

    /// The body's pieces in order (never the header).
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'_>> {
        let tail = (self.buf.len() > self.tail_start || self.chunks.is_empty())
            .then_some(Chunk::Own(self.tail_start, self.buf.len()));
        self.chunks
            .iter()
            .copied()
            .chain(tail)
            .map(move |chunk| match chunk {
                Chunk::Own(start, end) => Piece::Own(&self.buf[start..end]),
                // SAFETY: see `push_external`: valid while `self` lives.
                Chunk::External(ptr, len) => Piece::External(unsafe { std::slice::from_raw_parts(ptr, len) }),
            })
    }

    /// The body as one vector.
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for piece in self.pieces() {
            match piece {
                Piece::Own(b) | Piece::External(b) => out.extend_from_slice(b),
            }
        }
        out
    }

    /// Where the first piece starts in `buf`: before the spare bytes once they hold
    /// the header.
    fn first_start(&self) -> usize {
        if self.header_in_front {
            0
        } else {
            self.front
        }
    }
}

impl FrameBody for Body {
    fn len(&self) -> usize {
        Body::len(self)
    }

    fn push_pieces<'a>(&'a self, out: &mut Vec<&'a [u8]>) {
        let first = self.first_start();
        let own = |start: usize, end: usize| {
            // Only the first piece can start at `front`: the buffer begins with the version byte.
            let start = if start == self.front { first } else { start };
            &self.buf[start..end]
        };
        for chunk in &self.chunks {
            out.push(match *chunk {
                Chunk::Own(start, end) => own(start, end),
                // SAFETY: see `push_external`: valid while `self` lives.
                Chunk::External(ptr, len) => unsafe { std::slice::from_raw_parts(ptr, len) },
            });
        }
        if self.buf.len() > self.tail_start || self.chunks.is_empty() {
            out.push(own(self.tail_start, self.buf.len()));
        }
    }

    fn embed_header(&mut self, header: &[u8; HEADER_LEN]) -> bool {
        if self.front != HEADER_LEN {
            return false;
        }
        self.buf[..HEADER_LEN].copy_from_slice(header);
        self.header_in_front = true;
        true
    }

    fn contiguous(&self) -> Option<&[u8]> {
        self.chunks.is_empty().then(|| &self.buf[self.first_start()..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the reference reader makes of one piece.
    #[derive(Debug, PartialEq)]
    enum Val {
        Int(i128),
        Float(u64),
        Atom(String),
        Tuple(u32),
        List(u32),
        Map(u32),
        Binary(Vec<u8>),
        Str(Vec<u8>),
        Nil,
    }

    /// A tiny reader of the pieces above, written from the format's description, not
    /// from the writer: returns the piece and the bytes after it.
    fn read_piece(b: &[u8]) -> Option<(Val, &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let u16_at =
            |b: &[u8]| -> Option<usize> { Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?) as usize) };
        let u32_at = |b: &[u8]| -> Option<u32> { Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)) };
        Some(match tag {
            SMALL_INTEGER_EXT => (Val::Int(*rest.first()? as i128), &rest[1..]),
            INTEGER_EXT => (Val::Int(u32_at(rest)? as i32 as i128), &rest[4..]),
            SMALL_BIG_EXT => {
                let n = *rest.first()? as usize;
                let sign = *rest.get(1)?;
                let digits = rest.get(2..2 + n)?;
                let mut v: i128 = 0;
                for &d in digits.iter().rev() {
                    v = v * 256 + d as i128;
                }
                (Val::Int(if sign == 1 { -v } else { v }), &rest[2 + n..])
            }
            NEW_FLOAT_EXT => (
                Val::Float(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)),
                &rest[8..],
            ),
            ATOM_EXT => {
                let n = u16_at(rest)?;
                let text = rest.get(2..2 + n)?.iter().map(|&c| c as char).collect();
                (Val::Atom(text), &rest[2 + n..])
            }
            SMALL_ATOM_UTF8_EXT | ATOM_UTF8_EXT => {
                let (n, skip) = if tag == SMALL_ATOM_UTF8_EXT {
                    (*rest.first()? as usize, 1)
                } else {
                    (u16_at(rest)?, 2)
                };
                let text = String::from_utf8(rest.get(skip..skip + n)?.to_vec()).ok()?;
                (Val::Atom(text), &rest[skip + n..])
            }
            SMALL_TUPLE_EXT => (Val::Tuple(*rest.first()? as u32), &rest[1..]),
            LARGE_TUPLE_EXT => (Val::Tuple(u32_at(rest)?), &rest[4..]),
            LIST_EXT => (Val::List(u32_at(rest)?), &rest[4..]),
            MAP_EXT => (Val::Map(u32_at(rest)?), &rest[4..]),
            BINARY_EXT => {
                let n = u32_at(rest)? as usize;
                (Val::Binary(rest.get(4..4 + n)?.to_vec()), &rest[4 + n..])
            }
            STRING_EXT => {
                let n = u16_at(rest)?;
                (Val::Str(rest.get(2..2 + n)?.to_vec()), &rest[2 + n..])
            }
            NIL_EXT => (Val::Nil, rest),
            _ => return None,
        })
    }

    fn read_one(b: &[u8]) -> Val {
        let (v, rest) = read_piece(b).expect("readable");
        assert!(rest.is_empty(), "trailing bytes {rest:?}");
        v
    }

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    /// The encoding of an integer as the format describes it, derived by division
    /// rather than by the writer's byte tricks.
    fn expected_int(v: i128) -> Vec<u8> {
        if (0..=255).contains(&v) {
            return vec![SMALL_INTEGER_EXT, v as u8];
        }
        if (i32::MIN as i128..=i32::MAX as i128).contains(&v) {
            let mut out = vec![INTEGER_EXT];
            let u = (v as i32) as u32;
            for shift in [24, 16, 8, 0] {
                out.push((u >> shift) as u8);
            }
            return out;
        }
        let mut magnitude = v.unsigned_abs();
        let mut digits = Vec::new();
        while magnitude > 0 {
            digits.push((magnitude % 256) as u8);
            magnitude /= 256;
        }
        let mut out = vec![SMALL_BIG_EXT, digits.len() as u8, (v < 0) as u8];
        out.extend(digits);
        out
    }

    #[test]
    fn integers_match_term_to_binary() {
        // From OTP 25's term_to_binary/1.
        assert_eq!(written(|o| int(o, 0)), [97, 0]);
        assert_eq!(written(|o| int(o, 255)), [97, 255]);
        assert_eq!(written(|o| int(o, 256)), [98, 0, 0, 1, 0]);
        assert_eq!(written(|o| int(o, -1)), [98, 255, 255, 255, 255]);
        assert_eq!(written(|o| int(o, i32::MIN as i64)), [98, 128, 0, 0, 0]);
        assert_eq!(
            written(|o| int(o, i32::MAX as i64 + 1)),
            [110, 4, 0, 0, 0, 0, 128]
        );
        assert_eq!(
            written(|o| int(o, i64::MIN)),
            [110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 128]
        );
        assert_eq!(
            written(|o| uint(o, 1 << 63)),
            [110, 8, 0, 0, 0, 0, 0, 0, 0, 0, 128]
        );
        assert_eq!(
            written(|o| uint(o, u64::MAX)),
            [110, 8, 0, 255, 255, 255, 255, 255, 255, 255, 255]
        );
    }

    #[test]
    fn latin1_atoms_as_utf8_match_otp26_term_to_binary() {
        // As OTP 26's term_to_binary/1 writes them ('abc', 'é', '', 200 x 'é').
        assert_eq!(
            written(|o| atom_latin1_as_utf8(o, b"abc")),
            [119, 3, b'a', b'b', b'c']
        );
        assert_eq!(written(|o| atom_latin1_as_utf8(o, &[233])), [119, 2, 0xC3, 0xA9]);
        assert_eq!(written(|o| atom_latin1_as_utf8(o, b"")), [119, 0]);
        let long = written(|o| atom_latin1_as_utf8(o, &[233; 200]));
        assert_eq!(long[..3], [118, 1, 144]);
        assert_eq!(long.len(), 3 + 400);
        // Every Latin-1 name: the same atom as its text written in UTF-8.
        for c in 0..=255u8 {
            for n in [1, 127, 128, 255] {
                let name = vec![c; n];
                let text: String = name.iter().map(|&c| c as char).collect();
                let mut expected = Vec::new();
                atom_utf8(&mut expected, text.as_bytes());
                assert_eq!(written(|o| atom_latin1_as_utf8(o, &name)), expected, "{c} x {n}");
            }
        }
    }

    #[test]
    fn atoms_match_term_to_binary() {
        assert_eq!(written(|o| atom(o, "abc")), [100, 0, 3, b'a', b'b', b'c']);
        assert_eq!(written(|o| atom(o, "é")), [100, 0, 1, 233]);
        assert_eq!(written(|o| atom(o, "日")), [119, 3, 230, 151, 165]);
        assert_eq!(written(|o| atom(o, "")), [100, 0, 0]);
        let long = "日".repeat(255);
        let bytes = written(|o| atom(o, &long));
        assert_eq!(
            &bytes[..3],
            [118, 765u16.to_be_bytes()[0], 765u16.to_be_bytes()[1]]
        );
        assert_eq!(&bytes[3..], long.as_bytes());
    }

    #[test]
    fn headers() {
        assert_eq!(written(|o| tuple_header(o, 2)), [104, 2]);
        assert_eq!(written(|o| tuple_header(o, 256)), [105, 0, 0, 1, 0]);
        assert_eq!(written(|o| map_header(o, 3)), [116, 0, 0, 0, 3]);
        assert_eq!(written(|o| binary_header(o, 70000)), [109, 0, 1, 17, 112]);
        assert_eq!(written(|o| string(o, b"hi")), [107, 0, 2, b'h', b'i']);
        assert_eq!(written(nil), [106]);
        let mut out = Vec::new();
        let at = list_header(&mut out, 0);
        patch_u32(&mut out, at, 65536);
        assert_eq!(out, [108, 0, 1, 0, 0]);
        assert_eq!(written(|o| float(o, -0.0)), [70, 128, 0, 0, 0, 0, 0, 0, 0]);
    }

    /// One step of building a body: a piece written into the buffer, or bytes referenced.
    #[derive(Debug, Clone)]
    enum Step {
        Int(i64),
        Atom(String),
        Small(Vec<u8>),
        Large(Vec<u8>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            any::<i64>().prop_map(Step::Int),
            "\\PC{0,20}".prop_map(Step::Atom),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Step::Small),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Step::Large),
        ]
    }

    /// Builds the same steps flat and as a body; the referenced vectors are owned by the body.
    fn build(steps: &[Step], header_room: bool) -> (Vec<u8>, Body) {
        let mut flat = Vec::new();
        let mut body = Body::new(16, header_room);
        let mut owned: Vec<Vec<u8>> = Vec::new();
        for s in steps {
            match s {
                Step::Int(v) => {
                    int(&mut flat, *v);
                    int(body.buf(), *v);
                }
                Step::Atom(a) => {
                    atom(&mut flat, a);
                    atom(body.buf(), a);
                }
                Step::Small(b) => {
                    binary_header(&mut flat, b.len() as u32);
                    flat.extend_from_slice(b);
                    binary_header(body.buf(), b.len() as u32);
                    body.buf().extend_from_slice(b);
                }
                Step::Large(b) => {
                    binary_header(&mut flat, b.len() as u32);
                    flat.extend_from_slice(b);
                    binary_header(body.buf(), b.len() as u32);
                    let copy = b.clone();
                    // SAFETY: the vector's heap bytes do not move when the vector is
                    // moved into `owned`, which the body keeps until it is dropped.
                    unsafe { body.push_external(&copy) };
                    owned.push(copy);
                }
            }
        }
        body.keep_alive(Box::new(owned));
        (flat, body)
    }

    fn written_chunks(body: &Body) -> Vec<u8> {
        let mut slices = Vec::new();
        body.push_pieces(&mut slices);
        slices.iter().flat_map(|s| s.iter().copied()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_i64(v in any::<i64>()) {
            let bytes = written(|o| int(o, v));
            prop_assert_eq!(&bytes, &expected_int(v as i128));
            prop_assert_eq!(read_one(&bytes), Val::Int(v as i128));
        }

        #[test]
        fn random_u64(v in any::<u64>()) {
            let bytes = written(|o| uint(o, v));
            prop_assert_eq!(&bytes, &expected_int(v as i128));
            prop_assert_eq!(read_one(&bytes), Val::Int(v as i128));
        }

        #[test]
        fn random_f64(f in any::<f64>()) {
            let bytes = written(|o| float(o, f));
            prop_assert_eq!(bytes.len(), 9);
            prop_assert_eq!(bytes[0], NEW_FLOAT_EXT);
            prop_assert_eq!(read_one(&bytes), Val::Float(f.to_bits()));
        }

        #[test]
        fn random_atoms(name in "\\PC{0,255}") {
            let bytes = written(|o| atom(o, &name));
            let latin1 = name.chars().all(|c| (c as u32) < 256);
            let expected_tag = match (latin1, name.len()) {
                (true, _) => ATOM_EXT,
                (false, n) if n <= 255 => SMALL_ATOM_UTF8_EXT,
                (false, _) => ATOM_UTF8_EXT,
            };
            prop_assert_eq!(bytes[0], expected_tag);
            prop_assert_eq!(read_one(&bytes), Val::Atom(name));
        }

        #[test]
        fn random_lengths(n in any::<u32>(), small in 0u32..256) {
            prop_assert_eq!(read_one(&written(|o| map_header(o, n))), Val::Map(n));
            prop_assert_eq!(read_one(&written(|o| tuple_header(o, n))), Val::Tuple(n));
            prop_assert_eq!(written(|o| tuple_header(o, small)), vec![SMALL_TUPLE_EXT, small as u8]);
            let mut list = Vec::new();
            let at = list_header(&mut list, 0);
            patch_u32(&mut list, at, n);
            prop_assert_eq!(read_one(&list), Val::List(n));
        }

        #[test]
        fn random_binaries_and_strings(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut out = Vec::new();
            binary_header(&mut out, bytes.len() as u32);
            out.extend_from_slice(&bytes);
            prop_assert_eq!(read_one(&out), Val::Binary(bytes.clone()));
            prop_assert_eq!(read_one(&written(|o| string(o, &bytes))), Val::Str(bytes));
        }

        #[test]
        fn chunks_concatenate_to_the_flat_encoding(steps in proptest::collection::vec(step(), 0..40)) {
            let (flat, body) = build(&steps, false);
            prop_assert_eq!(body.len(), flat.len());
            prop_assert_eq!(&written_chunks(&body), &flat);
            prop_assert_eq!(&body.to_vec(), &flat);
            prop_assert_eq!(body.contiguous().is_some(), body.external_count() == 0);

            // With the header embedded in front: the same bytes after it.
            let (flat, mut body) = build(&steps, true);
            let header = [1, 2, 3, 4, 5];
            prop_assert!(body.embed_header(&header));
            let bytes = written_chunks(&body);
            prop_assert_eq!(&bytes[..HEADER_LEN], &header);
            prop_assert_eq!(&bytes[HEADER_LEN..], &flat[..]);
            prop_assert_eq!(body.len(), flat.len());
            if let Some(all) = body.contiguous() {
                prop_assert_eq!(all, &bytes[..]);
            }
        }
    }

    #[test]
    fn a_body_without_room_takes_no_header() {
        let mut body = Body::new(0, false);
        version(body.buf());
        assert!(!body.embed_header(&[0; HEADER_LEN]));
        assert_eq!(written_chunks(&body), [VERSION]);
    }

    #[test]
    fn truncate_never_reaches_before_a_reference() {
        let mut body = Body::new(0, true);
        version(body.buf());
        let big = vec![7u8; 100];
        // SAFETY: `big` moves into the body right after, so it lives as long as the body.
        unsafe { body.push_external(&big) };
        body.keep_alive(Box::new(big));
        nil(body.buf());
        body.truncate(0);
        let mut expected = vec![VERSION];
        expected.extend([7u8; 100]);
        assert_eq!(body.to_vec(), expected);
    }
}
