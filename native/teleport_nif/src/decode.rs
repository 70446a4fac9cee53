//! Receive side: terms in an env from the external term format (version 131).
//! teleport_net's `etf::read` parses (every length checked, iteratively); this
//! file is its builder, making each piece with the enif call for it.
//!
//! Why not `enif_binary_to_term`: it copies every large binary out of its
//! input. Here a large binary that is a good part of the frame (over a quarter,
//! the rule disterl uses for its own buffers) becomes a sub-binary of the frame
//! buffer the socket was read into, so its bytes are copied once, by the kernel.
//! Smaller ones are copied, so a small binary cannot pin a large frame. Types
//! with no constructor in erl_nif (pids, ports, refs, funs, bignums,
//! bitstrings, non-ASCII UTF-8 atoms) go to `enif_binary_to_term` one by one.
//!
//! Where it runs: I/O threads, which are not VM schedulers. Some releases
//! cannot build a hash map (over 32 keys) off a scheduler: OTP 25 before
//! 25.3.2.18, 26 before 26.2.5.9 and 27 before 27.3 segfault sorting it (GH-8208).
//! A decoder made `off_scheduler_safe_only` refuses those terms (and funs, whose
//! environment may hold such a map) with `ReadError::NeedsScheduler`; the connection
//! then hands the whole frame to a dirty scheduler (deliver.rs). So does any decoder
//! made for an I/O thread once a term has more than `OFF_SCHEDULER_STEPS` terms in it:
//! one I/O thread serves many connections, which must not wait the milliseconds a
//! term of a million elements takes to build.

use std::collections::HashMap;
use std::os::raw::{c_char, c_uint};
use std::ptr;

use rustler::sys::{
    enif_binary_to_term, enif_get_map_size, enif_make_atom_len, enif_make_double, enif_make_int64,
    enif_make_list_cell, enif_make_list_from_array, enif_make_map_from_arrays, enif_make_new_binary,
    enif_make_sub_binary, enif_make_tuple_from_array, ErlNifEnv, ErlNifTerm as ERL_NIF_TERM,
};
use teleport_net::etf::read::{ReadError, Reader, TermBuilder};
use teleport_net::etf::{ATOM_UTF8_EXT, NEW_FUN_EXT, VERSION};

/// Binaries up to this size live on the process heap anyway: always copied.
const HEAP_BINARY_MAX: usize = 64;
/// Atoms seen on one connection, kept across frames (atoms are never freed, so
/// their terms stay valid in any env). Bounded so a peer cannot grow it forever.
const ATOM_CACHE_MAX: usize = 4096;

/// Terms (containers included) an I/O thread builds for one message before it leaves
/// the message to a dirty scheduler: about 1-2 ms of work (a million small tuples,
/// 3 million terms, took 73 ms), wasted when it gives up.
const OFF_SCHEDULER_STEPS: usize = 50_000;

/// Maps up to this many pairs are flat maps, which every release builds anywhere.
const FLAT_MAP_MAX: usize = 32;

/// Per-connection decoding state.
#[derive(Default)]
pub struct TermDecoder {
    /// The parser's stacks, kept between frames.
    reader: Reader<ERL_NIF_TERM>,
    state: BuilderState,
    /// Refuse the terms this VM cannot build off a scheduler (see the module doc).
    off_scheduler_safe_only: bool,
    /// Made for a thread that is not a scheduler: what needs one is refused with
    /// `NeedsScheduler`.
    off_scheduler: bool,
}

/// `BuilderState::terms` kept between frames up to this many entries (512 KiB).
const TERMS_KEEP: usize = 1 << 16;

#[derive(Default)]
struct BuilderState {
    /// Name -> atom term, for ATOM_EXT (Latin-1) and ATOM_UTF8_EXT names. Atom terms are
    /// immediates, valid from any thread and in any env, so they outlive the env they
    /// were made in.
    latin1_atoms: HashMap<Box<[u8]>, ERL_NIF_TERM>,
    utf8_atoms: HashMap<Box<[u8]>, ERL_NIF_TERM>,
    /// `131` + a slice, for the types decoded by `enif_binary_to_term`.
    scratch: Vec<u8>,
    /// Term arrays the NIF API takes whole (a string's characters; a map's keys, then
    /// its values), reused between frames.
    terms: Vec<ERL_NIF_TERM>,
}

/// Where the frame's bytes live, so large binaries can reference them.
pub struct Source<'b> {
    pub bytes: &'b [u8],
    /// The frame as a binary term, if it is one (else every binary is copied).
    pub binary: Option<ERL_NIF_TERM>,
}

impl TermDecoder {
    /// A decoder for a thread that is not a scheduler: terms of more than
    /// `OFF_SCHEDULER_STEPS` terms fail with `ReadError::NeedsScheduler`, and with
    /// `defer_hash_maps`, so do maps over 32 keys and funs.
    pub fn off_scheduler(defer_hash_maps: bool) -> TermDecoder {
        TermDecoder {
            reader: Reader::with_step_limit(OFF_SCHEDULER_STEPS),
            off_scheduler_safe_only: defer_hash_maps,
            off_scheduler: true,
            ..TermDecoder::default()
        }
    }

    /// Decodes one whole external term (with its version byte) into `env`.
    ///
    /// # Safety
    /// `env` must be a valid env for this thread; `source.binary`, if given, a binary
    /// term in `env` whose bytes are `source.bytes`.
    pub unsafe fn decode(&mut self, env: *mut ErlNifEnv, source: &Source) -> Result<ERL_NIF_TERM, ReadError> {
        let mut builder = EnvBuilder {
            env,
            source,
            state: &mut self.state,
            off_scheduler_safe_only: self.off_scheduler_safe_only,
        };
        let decoded = match self.reader.read(&mut builder, source.bytes) {
            // A tag the parser does not know (a term type newer than this code): the
            // VM may, so the whole frame goes to its own decoder, on a scheduler.
            Err(ReadError::UnsupportedTag(_)) if self.off_scheduler => Err(ReadError::NeedsScheduler),
            Err(ReadError::UnsupportedTag(tag)) => builder.whole(tag),
            other => other,
        };
        // One huge map must not pin its arrays for the connection's life.
        if self.state.terms.capacity() > TERMS_KEEP {
            self.state.terms = Vec::new();
        }
        decoded
    }
}

/// Makes terms in `env`; exists for the length of one decode.
struct EnvBuilder<'a, 'b> {
    env: *mut ErlNifEnv,
    source: &'a Source<'b>,
    state: &'a mut BuilderState,
    off_scheduler_safe_only: bool,
}

// Safety of every enif call below: `TermDecoder::decode`'s contract (a valid env
// for this thread) holds for the builder's whole life, and every term passed in
// was made in that env by this builder.
impl TermBuilder for EnvBuilder<'_, '_> {
    type Term = ERL_NIF_TERM;

    fn int(&mut self, value: i32) -> ERL_NIF_TERM {
        // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract).
        unsafe { enif_make_int64(self.env, i64::from(value)) }
    }

    fn float(&mut self, value: f64) -> ERL_NIF_TERM {
        // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); any f64 makes a float term.
        unsafe { enif_make_double(self.env, value) }
    }

    fn atom(&mut self, utf8: bool, name: &[u8]) -> Result<ERL_NIF_TERM, ReadError> {
        let state = &mut *self.state;
        let cache = if utf8 {
            &state.utf8_atoms
        } else {
            &state.latin1_atoms
        };
        if let Some(&atom) = cache.get(name) {
            return Ok(atom);
        }
        // enif_make_atom_len takes Latin-1, which agrees with UTF-8 on ASCII; the
        // parser has checked the length (255 characters).
        let atom = if !utf8 || name.is_ascii() {
            // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract);
            // `name` is valid for `name.len()` bytes, at most 255 (the parser's check).
            unsafe { enif_make_atom_len(self.env, name.as_ptr() as *const c_char, name.len()) }
        } else {
            let mut encoded = Vec::with_capacity(name.len() + 3);
            encoded.push(ATOM_UTF8_EXT);
            encoded.extend_from_slice(&(name.len() as u16).to_be_bytes());
            encoded.extend_from_slice(name);
            self.opaque(&encoded)?
        };
        let state = &mut *self.state;
        let cache = if utf8 {
            &mut state.utf8_atoms
        } else {
            &mut state.latin1_atoms
        };
        if cache.len() < ATOM_CACHE_MAX {
            cache.insert(name.into(), atom);
        }
        Ok(atom)
    }

    fn nil(&mut self) -> ERL_NIF_TERM {
        // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); no element is read
        // for a length of 0.
        unsafe { enif_make_list_from_array(self.env, ptr::null(), 0) }
    }

    fn string(&mut self, bytes: &[u8]) -> ERL_NIF_TERM {
        let env = self.env;
        let chars = &mut self.state.terms;
        chars.clear();
        chars.extend(
            bytes
                .iter()
                // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract).
                .map(|&c| unsafe { enif_make_int64(env, i64::from(c)) }),
        );
        // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); `chars`
        // holds terms made in it, and its length fits (a string's is at most 65535).
        unsafe { enif_make_list_from_array(env, chars.as_ptr(), chars.len() as c_uint) }
    }

    fn binary(&mut self, offset: usize, bytes: &[u8]) -> ERL_NIF_TERM {
        let (env, source) = (self.env, self.source);
        // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); `frame` is a binary
        // term in that env holding `source.bytes`, of which `bytes` is the part at `offset`;
        // `enif_make_new_binary` returns `bytes.len()` writable bytes.
        unsafe {
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
    }

    fn tuple(&mut self, elements: &[ERL_NIF_TERM]) -> ERL_NIF_TERM {
        // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract);
        // `elements` are terms made in it (the parser caps a tuple's arity).
        unsafe { enif_make_tuple_from_array(self.env, elements.as_ptr(), elements.len() as c_uint) }
    }

    fn list(&mut self, items: &[ERL_NIF_TERM], tail: ERL_NIF_TERM) -> ERL_NIF_TERM {
        let env = self.env;
        if tail == self.nil() {
            // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); `items` are
            // terms made in it (the parser caps a list's length).
            return unsafe { enif_make_list_from_array(env, items.as_ptr(), items.len() as c_uint) };
        }
        items
            .iter()
            .rev()
            // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); `item` and
            // `acc` are terms made in it.
            .fold(tail, |acc, &item| unsafe { enif_make_list_cell(env, item, acc) })
    }

    fn map(&mut self, flat: &[ERL_NIF_TERM]) -> Result<ERL_NIF_TERM, ReadError> {
        let pairs = flat.len() / 2;
        if pairs > FLAT_MAP_MAX && self.off_scheduler_safe_only {
            return Err(ReadError::NeedsScheduler);
        }
        let arrays = &mut self.state.terms;
        arrays.clear();
        arrays.extend(flat.iter().step_by(2));
        arrays.extend(flat.iter().skip(1).step_by(2));
        let (keys, values) = arrays.split_at(pairs);
        let mut map: ERL_NIF_TERM = ERL_NIF_TERM::default();
        let made =
            // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); `keys` and
            // `values` hold `pairs` terms made in it each, and `map` is written only on success.
            unsafe { enif_make_map_from_arrays(self.env, keys.as_ptr(), values.as_ptr(), pairs, &mut map) };
        if made == 0 {
            return Err(ReadError::DuplicateKeys);
        }
        // OTP 25 refuses duplicate keys only in flat maps (up to 32 pairs); a larger one comes
        // out short (and malformed). It is never delivered: the env is cleared on error.
        let mut size = 0usize;
        // SAFETY: the builder's env (valid for this thread while it lives, by `decode`'s contract); `map` was just made in it.
        if unsafe { enif_get_map_size(self.env, map, &mut size) } == 0 || size != pairs {
            return Err(ReadError::DuplicateKeys);
        }
        Ok(map)
    }

    fn opaque(&mut self, bytes: &[u8]) -> Result<ERL_NIF_TERM, ReadError> {
        // A fun's environment is decoded by the VM, maps and all.
        if bytes.first() == Some(&NEW_FUN_EXT) && self.off_scheduler_safe_only {
            return Err(ReadError::NeedsScheduler);
        }
        let scratch = &mut self.state.scratch;
        scratch.clear();
        scratch.push(VERSION);
        scratch.extend_from_slice(bytes);
        let tag = bytes.first().copied().unwrap_or(0);
        // SAFETY: the scratch buffer is this builder's own; `env` as for the builder.
        unsafe { vm_decode(self.env, scratch, tag) }
    }
}

impl EnvBuilder<'_, '_> {
    /// The whole input decoded by the VM (`tag`: the first one the parser did not
    /// know). Copies every binary: for terms only the VM knows.
    fn whole(&mut self, tag: u8) -> Result<ERL_NIF_TERM, ReadError> {
        // SAFETY: `env` as for the builder; the source's bytes outlive the call.
        unsafe { vm_decode(self.env, self.source.bytes, tag) }
    }
}

/// `enif_binary_to_term` of one whole external term (version byte first); what it
/// cannot build is `Refused(tag)`. Trusted (atoms may be created): only authenticated
/// peers get here.
///
/// # Safety
/// `env` must be a valid env for this thread.
unsafe fn vm_decode(env: *mut ErlNifEnv, bytes: &[u8], tag: u8) -> Result<ERL_NIF_TERM, ReadError> {
    let mut term: ERL_NIF_TERM = ERL_NIF_TERM::default();
    let used = enif_binary_to_term(env, bytes.as_ptr(), bytes.len(), &mut term, 0);
    if used != bytes.len() {
        return Err(ReadError::Refused(tag));
    }
    Ok(term)
}
