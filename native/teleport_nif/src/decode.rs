//! Receive side: a Rust decoder from the external term format (version 131)
//! to terms in an env.
//!
//! Why not `enif_binary_to_term`: it copies every large binary out of its
//! input. Here a large binary that is a good part of the frame (over a quarter,
//! the rule disterl uses for its own buffers) becomes a sub-binary of the frame
//! buffer the socket was read into, so its bytes are copied once, by the kernel.
//! Smaller ones are copied, so a small binary cannot pin a large frame.
//!
//! The walk is iterative (containers wait on an explicit stack): a list nested
//! a million deep costs heap, not stack. Every length is checked against the
//! bytes left before anything is allocated. Types with no constructor in
//! erl_nif (pids, ports, refs, funs, bignums, bitstrings, non-ASCII UTF-8
//! atoms) are sliced out and handed to `enif_binary_to_term` one by one.

use std::collections::HashMap;
use std::os::raw::{c_char, c_uint};
use std::ptr;

use rustler::sys::{
    enif_binary_to_term, enif_get_map_size, enif_make_atom_len, enif_make_double, enif_make_int64,
    enif_make_list_cell, enif_make_list_from_array, enif_make_map_from_arrays, enif_make_new_binary,
    enif_make_sub_binary, enif_make_tuple_from_array, ErlNifEnv, ErlNifTerm as ERL_NIF_TERM,
};

const VERSION: u8 = 131;
const NEW_FLOAT_EXT: u8 = 70;
const BIT_BINARY_EXT: u8 = 77;
const NEW_PID_EXT: u8 = 88;
const NEW_PORT_EXT: u8 = 89;
const NEWER_REFERENCE_EXT: u8 = 90;
const SMALL_INTEGER_EXT: u8 = 97;
const INTEGER_EXT: u8 = 98;
const FLOAT_EXT: u8 = 99;
const ATOM_EXT: u8 = 100;
const REFERENCE_EXT: u8 = 101;
const PORT_EXT: u8 = 102;
const PID_EXT: u8 = 103;
const SMALL_TUPLE_EXT: u8 = 104;
const LARGE_TUPLE_EXT: u8 = 105;
const NIL_EXT: u8 = 106;
const STRING_EXT: u8 = 107;
const LIST_EXT: u8 = 108;
const BINARY_EXT: u8 = 109;
const SMALL_BIG_EXT: u8 = 110;
const LARGE_BIG_EXT: u8 = 111;
const NEW_FUN_EXT: u8 = 112;
const EXPORT_EXT: u8 = 113;
const NEW_REFERENCE_EXT: u8 = 114;
const SMALL_ATOM_EXT: u8 = 115;
const MAP_EXT: u8 = 116;
const ATOM_UTF8_EXT: u8 = 118;
const SMALL_ATOM_UTF8_EXT: u8 = 119;
const V4_PORT_EXT: u8 = 120;

/// Binaries up to this size live on the process heap anyway: always copied.
const HEAP_BINARY_MAX: usize = 64;
/// Atoms seen on one connection, kept across frames (atoms are never freed, so
/// their terms stay valid in any env). Bounded so a peer cannot grow it forever.
const ATOM_CACHE_MAX: usize = 4096;

pub type DecodeError = String;

/// A container waiting for its elements, which collect on the value stack from `start`.
struct Pending {
    shape: Shape,
    start: usize,
    /// Values it needs: a tuple's arity, a list's length plus its tail, a map's 2 x pairs.
    needed: usize,
}

#[derive(Clone, Copy)]
enum Shape {
    Tuple,
    List,
    Map,
}

/// Per-connection decoding state.
#[derive(Default)]
pub struct TermDecoder {
    /// Name -> atom term, for ATOM_EXT (Latin-1) and ATOM_UTF8_EXT names.
    latin1_atoms: HashMap<Box<[u8]>, ERL_NIF_TERM>,
    utf8_atoms: HashMap<Box<[u8]>, ERL_NIF_TERM>,
    /// `131` + a slice, for the types decoded by `enif_binary_to_term`.
    scratch: Vec<u8>,
    /// Finished terms not yet in their container, and the open containers; kept between
    /// frames so a decode allocates nothing per container.
    values: Vec<ERL_NIF_TERM>,
    open: Vec<Pending>,
}

// Atom terms are immediates, valid from any thread and in any env.
unsafe impl Send for TermDecoder {}

struct Input<'b> {
    bytes: &'b [u8],
    pos: usize,
}

impl<'b> Input<'b> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'b [u8], DecodeError> {
        if n > self.left() {
            return Err(format!("truncated term at byte {}", self.pos));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn u32(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    /// A count of things each at least `min_size` bytes long: refuse counts the
    /// remaining input cannot hold, before any allocation sized by them.
    fn count(&self, n: usize, min_size: usize) -> Result<usize, DecodeError> {
        if n.saturating_mul(min_size) > self.left() {
            return Err(format!("count {n} larger than the input at byte {}", self.pos));
        }
        Ok(n)
    }
}

/// Where the frame's bytes live, so large binaries can reference them.
pub struct Source<'b> {
    pub bytes: &'b [u8],
    /// The frame as a binary term, if it is one (else every binary is copied).
    pub binary: Option<ERL_NIF_TERM>,
}

impl TermDecoder {
    /// Decodes one whole external term (with its version byte) into `env`.
    ///
    /// # Safety
    /// `env` must be a valid env for this thread; `source.binary`, if given, a binary
    /// term in `env` whose bytes are `source.bytes`.
    pub unsafe fn decode(
        &mut self,
        env: *mut ErlNifEnv,
        source: &Source,
    ) -> Result<ERL_NIF_TERM, DecodeError> {
        let mut input = Input {
            bytes: source.bytes,
            pos: 0,
        };
        if input.u8()? != VERSION {
            return Err("not an external term (no version byte 131)".into());
        }
        self.values.clear();
        self.open.clear();
        loop {
            match self.next(env, source, &mut input)? {
                Some(value) => self.values.push(value),
                None => continue, // opened a container: read its first element
            }
            // Close every container that value completed.
            while let Some(top) = self.open.last() {
                if self.values.len() - top.start < top.needed {
                    break;
                }
                let built = build(env, top.shape, &self.values[top.start..])?;
                self.values.truncate(top.start);
                self.values.push(built);
                self.open.pop();
            }
            if self.open.is_empty() {
                if input.left() != 0 {
                    return Err("trailing bytes after the term".into());
                }
                return self.values.pop().ok_or_else(|| "no term".into());
            }
        }
    }

    /// Reads one term's head. Returns the term if it is complete, or `None`
    /// after pushing a container that now waits for its elements.
    unsafe fn next(
        &mut self,
        env: *mut ErlNifEnv,
        source: &Source,
        input: &mut Input,
    ) -> Result<Option<ERL_NIF_TERM>, DecodeError> {
        let start = input.pos;
        let tag = input.u8()?;
        let term = match tag {
            SMALL_INTEGER_EXT => enif_make_int64(env, input.u8()? as i64),
            INTEGER_EXT => {
                let b = input.take(4)?;
                enif_make_int64(env, i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64)
            }
            NEW_FLOAT_EXT => {
                let b = input.take(8)?;
                let f = f64::from_be_bytes(b.try_into().map_err(|_| "float")?);
                if !f.is_finite() {
                    return Err("non-finite float".into());
                }
                enif_make_double(env, f)
            }
            ATOM_EXT | ATOM_UTF8_EXT => {
                let len = input.u16()?;
                self.atom(env, tag == ATOM_UTF8_EXT, input.take(len)?)?
            }
            SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => {
                let len = input.u8()? as usize;
                self.atom(env, tag == SMALL_ATOM_UTF8_EXT, input.take(len)?)?
            }
            NIL_EXT => enif_make_list_from_array(env, ptr::null(), 0),
            STRING_EXT => {
                let len = input.u16()?;
                let bytes = input.take(len)?;
                let chars: Vec<ERL_NIF_TERM> =
                    bytes.iter().map(|&c| enif_make_int64(env, c as i64)).collect();
                enif_make_list_from_array(env, chars.as_ptr(), chars.len() as c_uint)
            }
            BINARY_EXT => {
                let len = input.u32()?;
                let offset = input.pos;
                let bytes = input.take(len)?;
                make_binary(env, source, offset, bytes)
            }
            SMALL_TUPLE_EXT | LARGE_TUPLE_EXT => {
                let arity = if tag == SMALL_TUPLE_EXT {
                    input.u8()? as usize
                } else {
                    input.u32()?
                };
                let arity = input.count(arity, 1)?;
                if arity == 0 {
                    enif_make_tuple_from_array(env, ptr::null(), 0)
                } else {
                    self.open_container(Shape::Tuple, arity);
                    return Ok(None);
                }
            }
            LIST_EXT => {
                let len = input.u32()?;
                let len = input.count(len, 1)?;
                // The elements, then the tail (NIL for a proper list).
                self.open_container(Shape::List, len + 1);
                return Ok(None);
            }
            MAP_EXT => {
                let pairs = input.u32()?;
                let pairs = input.count(pairs, 2)?;
                if pairs == 0 {
                    make_map(env, &[])?
                } else {
                    self.open_container(Shape::Map, 2 * pairs);
                    return Ok(None);
                }
            }
            // No erl_nif constructor for these: slice them out, let the VM decode each.
            _ => {
                skip_opaque(tag, input)?;
                self.decode_opaque(env, &source.bytes[start..input.pos])?
            }
        };
        Ok(Some(term))
    }

    fn open_container(&mut self, shape: Shape, needed: usize) {
        self.open.push(Pending {
            shape,
            start: self.values.len(),
            needed,
        });
    }

    unsafe fn atom(
        &mut self,
        env: *mut ErlNifEnv,
        utf8: bool,
        name: &[u8],
    ) -> Result<ERL_NIF_TERM, DecodeError> {
        let cache = if utf8 {
            &self.utf8_atoms
        } else {
            &self.latin1_atoms
        };
        if let Some(&atom) = cache.get(name) {
            return Ok(atom);
        }
        // enif_make_atom_len takes Latin-1, which agrees with UTF-8 on ASCII.
        let atom = if !utf8 || name.is_ascii() {
            if name.len() > 255 {
                return Err("atom longer than 255 characters".into());
            }
            enif_make_atom_len(env, name.as_ptr() as *const c_char, name.len())
        } else {
            let mut encoded = Vec::with_capacity(name.len() + 3);
            encoded.push(ATOM_UTF8_EXT);
            encoded.extend_from_slice(&(name.len() as u16).to_be_bytes());
            encoded.extend_from_slice(name);
            self.decode_opaque(env, &encoded)?
        };
        let cache = if utf8 {
            &mut self.utf8_atoms
        } else {
            &mut self.latin1_atoms
        };
        if cache.len() < ATOM_CACHE_MAX {
            cache.insert(name.into(), atom);
        }
        Ok(atom)
    }

    /// `bytes` is one complete term without the version byte.
    unsafe fn decode_opaque(
        &mut self,
        env: *mut ErlNifEnv,
        bytes: &[u8],
    ) -> Result<ERL_NIF_TERM, DecodeError> {
        self.scratch.clear();
        self.scratch.push(VERSION);
        self.scratch.extend_from_slice(bytes);
        let mut term: ERL_NIF_TERM = ERL_NIF_TERM::default();
        // Trusted (atoms may be created): only authenticated peers get here.
        let used = enif_binary_to_term(env, self.scratch.as_ptr(), self.scratch.len(), &mut term, 0);
        if used != self.scratch.len() {
            return Err(format!(
                "bad term with tag {}",
                bytes.first().copied().unwrap_or(0)
            ));
        }
        Ok(term)
    }
}

/// Advances past one term of a type decoded by the VM, checking only lengths.
fn skip_opaque(tag: u8, input: &mut Input) -> Result<(), DecodeError> {
    match tag {
        PID_EXT => skip_node_then(input, 4 + 4 + 1),
        NEW_PID_EXT => skip_node_then(input, 4 + 4 + 4),
        PORT_EXT => skip_node_then(input, 4 + 1),
        NEW_PORT_EXT => skip_node_then(input, 4 + 4),
        V4_PORT_EXT => skip_node_then(input, 8 + 4),
        REFERENCE_EXT => skip_node_then(input, 4 + 1),
        NEW_REFERENCE_EXT | NEWER_REFERENCE_EXT => {
            let words = input.u16()?;
            if words > 5 {
                return Err("reference with too many words".into());
            }
            let creation = if tag == NEW_REFERENCE_EXT { 1 } else { 4 };
            skip_node_then(input, creation + 4 * words)
        }
        SMALL_BIG_EXT => {
            let n = input.u8()? as usize;
            input.take(1 + n).map(drop)
        }
        LARGE_BIG_EXT => {
            let n = input.u32()?;
            input.take(1usize.saturating_add(n)).map(drop)
        }
        BIT_BINARY_EXT => {
            let len = input.u32()?;
            input.take(1usize.saturating_add(len)).map(drop)
        }
        FLOAT_EXT => input.take(31).map(drop),
        NEW_FUN_EXT => {
            // Size counts itself and everything after it.
            let size = input.u32()?;
            if size < 4 {
                return Err("fun too short".into());
            }
            input.take(size - 4).map(drop)
        }
        EXPORT_EXT => {
            skip_atom(input)?;
            skip_atom(input)?;
            match input.u8()? {
                SMALL_INTEGER_EXT => input.take(1).map(drop),
                _ => Err("bad export arity".into()),
            }
        }
        other => Err(format!("unsupported term tag {other}")),
    }
}

fn skip_node_then(input: &mut Input, rest: usize) -> Result<(), DecodeError> {
    skip_atom(input)?;
    input.take(rest).map(drop)
}

fn skip_atom(input: &mut Input) -> Result<(), DecodeError> {
    let len = match input.u8()? {
        ATOM_EXT | ATOM_UTF8_EXT => input.u16()?,
        SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => input.u8()? as usize,
        _ => return Err("expected an atom".into()),
    };
    input.take(len).map(drop)
}

unsafe fn make_binary(env: *mut ErlNifEnv, source: &Source, offset: usize, bytes: &[u8]) -> ERL_NIF_TERM {
    if let Some(frame) = source.binary {
        if bytes.len() > HEAP_BINARY_MAX && bytes.len() > source.bytes.len() / 4 {
            return enif_make_sub_binary(env, frame, offset, bytes.len());
        }
    }
    let mut term: ERL_NIF_TERM = ERL_NIF_TERM::default();
    let data = enif_make_new_binary(env, bytes.len(), &mut term);
    if !bytes.is_empty() {
        ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
    }
    term
}

/// A finished container from its values (for a list: the elements, then the tail).
unsafe fn build(
    env: *mut ErlNifEnv,
    shape: Shape,
    values: &[ERL_NIF_TERM],
) -> Result<ERL_NIF_TERM, DecodeError> {
    Ok(match shape {
        Shape::Tuple => enif_make_tuple_from_array(env, values.as_ptr(), values.len() as c_uint),
        Shape::List => {
            let (tail, items) = values.split_last().ok_or("list without a tail")?;
            make_list(env, items, *tail)
        }
        Shape::Map => make_map(env, values)?,
    })
}

unsafe fn make_list(env: *mut ErlNifEnv, items: &[ERL_NIF_TERM], tail: ERL_NIF_TERM) -> ERL_NIF_TERM {
    let nil = enif_make_list_from_array(env, ptr::null(), 0);
    if tail == nil {
        return enif_make_list_from_array(env, items.as_ptr(), items.len() as c_uint);
    }
    items
        .iter()
        .rev()
        .fold(tail, |acc, &item| enif_make_list_cell(env, item, acc))
}

unsafe fn make_map(env: *mut ErlNifEnv, flat: &[ERL_NIF_TERM]) -> Result<ERL_NIF_TERM, DecodeError> {
    let pairs = flat.len() / 2;
    let (keys, values): (Vec<ERL_NIF_TERM>, Vec<ERL_NIF_TERM>) =
        flat.chunks_exact(2).map(|kv| (kv[0], kv[1])).unzip();
    let mut map: ERL_NIF_TERM = ERL_NIF_TERM::default();
    if enif_make_map_from_arrays(env, keys.as_ptr(), values.as_ptr(), pairs, &mut map) == 0 {
        return Err("map with duplicate keys".into());
    }
    // OTP 25 refuses duplicate keys only in flat maps (up to 32 pairs); a larger one comes
    // out short (and malformed). It is never delivered: the env is cleared on error.
    let mut size = 0usize;
    if enif_get_map_size(env, map, &mut size) == 0 || size != pairs {
        return Err("map with duplicate keys".into());
    }
    Ok(map)
}
