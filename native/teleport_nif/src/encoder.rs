//! The send side's term encoder: walks a VM term and writes the standard external
//! term format (version 131), byte-identical to the running VM's `term_to_binary/1`
//! (maps included: the order of a map over 32 keys is not specified, but it is the
//! VM's, see `map`). Atoms take the form that VM writes, found once by asking it
//! (`atom_form`): OTP 25 writes Latin-1 atoms as ATOM_EXT, OTP 26 and later every atom
//! as SMALL_ATOM_UTF8_EXT / ATOM_UTF8_EXT. Peers of any release read either.
//!
//! - The walk is iterative (an explicit stack on the heap): a list nested a million
//!   deep does not touch the small stack of a dirty scheduler.
//! - Binaries over 2 KiB (`COPY_MAX`) (refc binaries and sub-binaries of them) are not copied:
//!   the body references their bytes in place. Each is copied (`enif_make_copy`) into
//!   one process-independent env per message, which bumps a reference count and makes
//!   a writable binary read-only, so the bytes cannot move or be freed until that env
//!   goes, with the body, after the frame is on the wire.
//! - Work is counted (`Limit::Inline`): on a normal scheduler the encoder gives up past
//!   a budget and the caller starts over on a dirty scheduler (see schedule.rs).
//! - What the NIF API cannot take apart (pids, ports, refs, funs, integers over 64
//!   bits, bitstrings, atoms outside Latin-1) is encoded by `enif_term_to_binary` and
//!   spliced in without its version byte.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::os::raw::{c_char, c_int, c_uint};
use std::ptr;
use std::sync::OnceLock;

use rustler::sys::{
    enif_alloc_env, enif_binary_to_term, enif_free_env, enif_get_atom, enif_get_double, enif_get_int64,
    enif_get_list_cell, enif_get_map_size, enif_get_tuple, enif_get_uint64, enif_inspect_binary,
    enif_is_atom, enif_is_binary, enif_is_list, enif_is_map, enif_is_number, enif_is_pid, enif_is_port,
    enif_is_ref, enif_is_tuple, enif_make_atom_len, enif_make_copy, enif_make_list_from_array,
    enif_map_iterator_create, enif_map_iterator_destroy, enif_map_iterator_get_pair, enif_map_iterator_next,
    enif_map_iterator_prev, enif_release_binary, enif_system_info, enif_term_to_binary, ErlNifBinary,
    ErlNifCharEncoding, ErlNifEnv, ErlNifMapIterator, ErlNifMapIteratorEntry, ErlNifSysInfo, ErlNifTerm,
};
use rustler::{Atom, Encoder, Env, NifResult, Term};
use teleport_net::etf::write::{self as w, Body};
use teleport_net::handshake::Capabilities;

/// Binaries over this size are referenced, not copied. Referencing pins the binary in
/// an env of its own per message (allocated, copied into, freed once the frame is
/// written), which costs more than copying a few hundred bytes: at the VM's heap-binary limit (64) the
/// 100-byte-message benchmark ran at 0.6-0.8x disterl, at 2 KiB 1.3-1.6x (BENCHMARKS.md).
pub const COPY_MAX: usize = 2048;

/// The work an inline encode may do, in units of about one term visited. Measured on
/// this project's 2-core machine (see BENCHMARKS.md, "inline budget"): the costliest
/// units take ~25 ns, so a full budget is ~0.5 ms, under the 1 ms a NIF may hold a
/// normal scheduler.
pub const INLINE_BUDGET: u64 = 25_000;

/// Maps of up to this many keys are flatmaps (MAP_SMALL_MAP_LIMIT in the VM).
const FLATMAP_MAX: usize = 32;

/// Extra units for a term encoded through `enif_term_to_binary` (an allocation and a
/// copy), for a binary referenced through the keep-alive env, and for an atom's text
/// fetched from the VM (not in the cache).
const PIECE_COST: u64 = 16;
const REFERENCE_COST: u64 = 12;
const ATOM_MISS_COST: u64 = 1;

/// Bytes written into the buffer (copied binaries, strings, pieces) count as one unit
/// per this many.
const BYTES_PER_UNIT: usize = 16;
/// A string scan charges its cells in steps of this many (see `Walker::string`).
const STRING_CHARGE_STEP: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Limit {
    /// On a normal scheduler: stop at `INLINE_BUDGET`.
    Inline,
    /// On a dirty scheduler: no limit.
    Unbounded,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The inline budget ran out, or the term holds something of unknown cost
    /// (a fun, a bitstring, a bignum): start again with `Limit::Unbounded`.
    OverBudget,
    /// A length the format cannot express (a binary or list of 2^32 or more).
    TooLarge,
}

/// An encoded term.
pub struct Encoded {
    pub body: Body,
    /// The referenced binaries (terms in the body's keep-alive env), in the order of
    /// the body's external pieces.
    pub referenced: Vec<ErlNifTerm>,
    /// Work units spent, for `enif_consume_timeslice`.
    pub work: u64,
    /// The oldest Erlang/OTP release that can read every term in it
    /// (`etf::release_reading`): 0 unless the VM encoded a newer type (a native record).
    pub needs_release: u16,
}

/// A process-independent env holding the copies of the referenced binaries.
struct KeepEnv(*mut ErlNifEnv);

// SAFETY: a process-independent env may be used and freed from any thread, by one at a time;
// this one is only freed (with the body that owns it).
unsafe impl Send for KeepEnv {}

impl Drop for KeepEnv {
    fn drop(&mut self) {
        // SAFETY: allocated by enif_alloc_env, freed once.
        unsafe { enif_free_env(self.0) }
    }
}

/// What is left to do, innermost last.
#[derive(Clone, Copy)]
enum Frame {
    /// `left` more tuple elements from `next` on.
    Elems { next: *const ErlNifTerm, left: usize },
    /// The list cells from `tail` on, after `count` elements; the count goes at `len_at`.
    ListRest {
        tail: ErlNifTerm,
        len_at: usize,
        count: u32,
    },
    /// The pairs left in the map whose iterator is the last in `Scratch::iters`, and a
    /// value to write first if `pending` (its key has just been written). `forward`:
    /// the iterator goes from head to tail.
    MapPairs {
        value: ErlNifTerm,
        pending: bool,
        forward: bool,
    },
}

/// The explicit stacks, kept per scheduler thread between encodes so a small message
/// allocates nothing for them, and the atom cache.
struct Scratch {
    frames: Vec<Frame>,
    /// One iterator per `Frame::MapPairs`, in the same order. An iterator may move: it
    /// points to nothing inside itself.
    iters: Vec<ErlNifMapIterator>,
    atoms: [AtomSlot; ATOM_SLOTS],
}

const ATOM_SLOTS: usize = 256;

/// One atom's encoding (for encodings of up to 32 bytes).
#[derive(Clone, Copy, Default)]
struct AtomSlot {
    term: ErlNifTerm,
    /// 0: empty.
    len: u8,
    bytes: [u8; 32],
}

impl AtomSlot {
    fn index(term: ErlNifTerm) -> usize {
        // SAFETY: ErlNifTerm is a transparent wrapper of a machine word.
        let word: usize = unsafe { std::mem::transmute(term) };
        (word as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) as usize >> (usize::BITS - 8)
    }
}

/// Beyond this many entries a stack is not kept for the next encode.
const SCRATCH_KEEP: usize = 1 << 14;

thread_local! {
    static SCRATCH: Cell<Option<Box<Scratch>>> = const { Cell::new(None) };
}

/// Encodes `term` (a term of `env`). `header_room` leaves space for the frame header in
/// front of the body (see `FrameBody::embed_header`).
///
/// # Safety
/// `env` must be the env `term` lives in, valid for the whole call.
pub unsafe fn encode(
    env: *mut ErlNifEnv,
    term: ErlNifTerm,
    limit: Limit,
    header_room: bool,
) -> Result<Encoded, Stop> {
    let scratch = SCRATCH.with(|s| s.take()).unwrap_or_else(|| {
        Box::new(Scratch {
            frames: Vec::new(),
            iters: Vec::new(),
            atoms: [AtomSlot::default(); ATOM_SLOTS],
        })
    });
    let mut enc = Walker {
        env,
        nil: enif_make_list_from_array(env, ptr::null(), 0),
        body: Body::new(256, header_room),
        keep: ptr::null_mut(),
        referenced: Vec::new(),
        scratch,
        work: 0,
        limit: match limit {
            Limit::Inline => INLINE_BUDGET,
            Limit::Unbounded => u64::MAX,
        },
        tagged: tags::usable(),
        atom_form: atom_form(),
        needs_release: 0,
    };
    w::version(enc.body.buf());
    let outcome = enc.run(term);
    let work = enc.total_work();
    let Walker {
        body,
        referenced,
        mut scratch,
        needs_release,
        ..
    } = enc;
    scratch.frames.clear();
    // Left by an encode that stopped early.
    for iter in scratch.iters.iter_mut() {
        enif_map_iterator_destroy(env, iter);
    }
    scratch.iters.clear();
    if scratch.frames.capacity() <= SCRATCH_KEEP && scratch.iters.capacity() <= SCRATCH_KEEP {
        SCRATCH.with(|s| s.set(Some(scratch)));
    }
    outcome.map(|()| Encoded {
        body,
        referenced,
        work,
        needs_release,
    })
}

struct Walker {
    env: *mut ErlNifEnv,
    nil: ErlNifTerm,
    body: Body,
    /// The keep-alive env, once a binary has been referenced (owned by `body`).
    keep: *mut ErlNifEnv,
    referenced: Vec<ErlNifTerm>,
    scratch: Box<Scratch>,
    work: u64,
    limit: u64,
    /// `tags::usable()`: small integers and atoms are recognised without a call.
    tagged: bool,
    /// See `Encoded::needs_release`.
    needs_release: u16,
    /// How this VM's `term_to_binary/1` writes an atom (`atom_form()`).
    atom_form: AtomForm,
}

/// What `scalar` did with a term.
enum Visit {
    Written,
    /// A non-empty list, a tuple or a map, of this type: `open` it.
    Compound(Compound),
}

#[derive(Clone, Copy)]
enum Compound {
    Tuple,
    /// Non-empty.
    List,
    Map,
}

impl Walker {
    /// Scalars are written where they are met. A compound child is opened where it is
    /// met too (its header and leading scalars written), and gets a frame only if it
    /// has a compound child of its own: a list of small tuples is one frame, and no
    /// function here calls itself, directly or not.
    unsafe fn run(&mut self, root: ErlNifTerm) -> Result<(), Stop> {
        self.child(root)?;
        while !self.scratch.frames.is_empty() {
            self.step()?;
        }
        Ok(())
    }

    /// Counts `units` of work, and every `BYTES_PER_UNIT` bytes written so far as one
    /// more; fails past the limit.
    #[inline]
    fn charge(&mut self, units: u64) -> Result<(), Stop> {
        self.work += units;
        if self.total_work() > self.limit {
            return Err(Stop::OverBudget);
        }
        Ok(())
    }

    #[inline]
    fn total_work(&self) -> u64 {
        self.work + (self.body.position() / BYTES_PER_UNIT) as u64
    }

    fn inline(&self) -> bool {
        self.limit != u64::MAX
    }

    /// Works through the innermost frame until it is done (and dropped), or until a
    /// child needs a frame of its own (pushed above it; this one is updated).
    unsafe fn step(&mut self) -> Result<(), Stop> {
        let top = self.scratch.frames.len() - 1;
        match self.scratch.frames[top] {
            Frame::Elems { next, left } => {
                for i in 0..left {
                    if !self.child(*next.add(i))? {
                        self.scratch.frames[top] = Frame::Elems {
                            next: next.wrapping_add(i + 1),
                            left: left - i - 1,
                        };
                        return Ok(());
                    }
                }
                self.scratch.frames.pop();
            }
            Frame::MapPairs {
                value,
                pending,
                forward,
            } => {
                let resume = |value, pending| Frame::MapPairs {
                    value,
                    pending,
                    forward,
                };
                if pending && !self.child(value)? {
                    self.scratch.frames[top] = resume(value, false);
                    return Ok(());
                }
                let (mut key, mut value) = (ErlNifTerm::default(), ErlNifTerm::default());
                // A child map's iterator comes and goes above this one: ours is the last
                // whenever this frame is the innermost, so it is looked up each time.
                while let Some(iter) = self.scratch.iters.last_mut() {
                    if enif_map_iterator_get_pair(self.env, iter, &mut key, &mut value) == 0 {
                        break;
                    }
                    if forward {
                        enif_map_iterator_next(self.env, iter);
                    } else {
                        enif_map_iterator_prev(self.env, iter);
                    }
                    if !self.child(key)? {
                        self.scratch.frames[top] = resume(value, true);
                        return Ok(());
                    }
                    if !self.child(value)? {
                        self.scratch.frames[top] = resume(value, false);
                        return Ok(());
                    }
                }
                if let Some(mut iter) = self.scratch.iters.pop() {
                    enif_map_iterator_destroy(self.env, &mut iter);
                }
                self.scratch.frames.pop();
            }
            Frame::ListRest {
                mut tail,
                len_at,
                mut count,
            } => {
                let (mut head, mut rest) = (ErlNifTerm::default(), ErlNifTerm::default());
                while enif_get_list_cell(self.env, tail, &mut head, &mut rest) != 0 {
                    count = count.checked_add(1).ok_or(Stop::TooLarge)?;
                    tail = rest;
                    if !self.child(head)? {
                        self.scratch.frames[top] = Frame::ListRest { tail, len_at, count };
                        return Ok(());
                    }
                }
                self.scratch.frames.pop();
                w::patch_u32(self.body.buf(), len_at, count);
                // The tail: [] for a proper list, any other term for an improper one.
                self.child(tail)?;
            }
        }
        Ok(())
    }

    /// Writes `term`, or opens it; false if that pushed a frame for the rest of it.
    #[inline(always)]
    unsafe fn child(&mut self, term: ErlNifTerm) -> Result<bool, Stop> {
        match self.scalar(term)? {
            Visit::Written => Ok(true),
            Visit::Compound(ty) => self.open(term, ty),
        }
    }

    /// Writes `term` if it is not a non-empty list, a tuple or a map.
    #[inline(always)]
    unsafe fn scalar(&mut self, term: ErlNifTerm) -> Result<Visit, Stop> {
        self.charge(1)?;
        if let Some(i) = self.small(term) {
            w::int(self.body.buf(), i);
            return Ok(Visit::Written);
        }
        if self.tagged {
            if tags::is_atom(term) {
                self.atom(term)?;
                return Ok(Visit::Written);
            }
            if tags::is_list_cell(term) {
                return Ok(Visit::Compound(Compound::List));
            }
        }
        self.other(term)
    }

    /// `term` if it is a small integer (60 bits, no bignum).
    #[inline(always)]
    unsafe fn small(&self, term: ErlNifTerm) -> Option<i64> {
        if self.tagged {
            return tags::small(term);
        }
        let mut i = 0i64;
        (enif_get_int64(self.env, term, &mut i) != 0).then_some(i)
    }

    /// Everything but small integers (and, with the tags, atoms and list cells).
    ///
    /// Never `enif_term_type`: asked about a term of a type newer than the NIF API it
    /// was built for (OTP 29's native records, for one), it aborts the VM. The type
    /// tests below each answer for one type and are false for any other, so a term
    /// that none of them claims, whatever its type, goes to the VM's own encoder.
    #[inline(never)]
    unsafe fn other(&mut self, term: ErlNifTerm) -> Result<Visit, Stop> {
        let env = self.env;
        if enif_is_tuple(env, term) != 0 {
            return Ok(Visit::Compound(Compound::Tuple));
        }
        if enif_is_binary(env, term) != 0 {
            self.binary(term)?;
        } else if enif_is_list(env, term) != 0 {
            if term == self.nil {
                w::nil(self.body.buf());
            } else {
                return Ok(Visit::Compound(Compound::List));
            }
        } else if enif_is_map(env, term) != 0 {
            return Ok(Visit::Compound(Compound::Map));
        } else if enif_is_atom(env, term) != 0 {
            self.atom(term)?;
        } else if enif_is_number(env, term) != 0 {
            let (mut f, mut i, mut u) = (0.0, 0i64, 0u64);
            if enif_get_double(env, term, &mut f) != 0 {
                w::float(self.body.buf(), f);
            } else if enif_get_int64(env, term, &mut i) != 0 {
                w::int(self.body.buf(), i);
            } else if enif_get_uint64(env, term, &mut u) != 0 {
                w::uint(self.body.buf(), u);
            } else {
                // A bignum: its size is not known before it is encoded.
                self.piece(term, true)?;
            }
        } else if enif_is_pid(env, term) != 0 || enif_is_port(env, term) != 0 || enif_is_ref(env, term) != 0 {
            // Small.
            self.piece(term, false)?;
        } else {
            // A fun (its size is that of what it captured), a bitstring, or a type
            // this NIF API does not know: all of unknown size.
            self.piece(term, true)?;
        }
        Ok(Visit::Written)
    }

    /// Writes a compound term's header and its leading scalar children. At its first
    /// compound child it pushes a frame for the rest, from that child on, and returns
    /// false; true if it wrote all of it.
    unsafe fn open(&mut self, term: ErlNifTerm, ty: Compound) -> Result<bool, Stop> {
        match ty {
            Compound::Tuple => {
                let (mut arity, mut elems): (c_int, *const ErlNifTerm) = (0, ptr::null());
                enif_get_tuple(self.env, term, &mut arity, &mut elems);
                let arity = arity.max(0) as usize;
                w::tuple_header(self.body.buf(), arity as u32);
                for at in 0..arity {
                    if let Visit::Compound(_) = self.scalar(*elems.add(at))? {
                        self.scratch.frames.push(Frame::Elems {
                            next: elems.add(at),
                            left: arity - at,
                        });
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Compound::List => self.list(term),
            Compound::Map => self.map(term),
        }
    }

    /// A non-empty list: STRING_EXT if `term_to_binary/1` would write one, else LIST_EXT,
    /// its length patched in at the last cell.
    unsafe fn list(&mut self, list: ErlNifTerm) -> Result<bool, Stop> {
        let (mut head, mut rest) = (ErlNifTerm::default(), ErlNifTerm::default());
        enif_get_list_cell(self.env, list, &mut head, &mut rest);
        if matches!(self.small(head), Some(0..=255)) && self.string(list)? {
            return Ok(true);
        }
        let len_at = w::list_header(self.body.buf(), 0);
        let (mut cell, mut count, mut at_compound) = (list, 0u32, false);
        while enif_get_list_cell(self.env, cell, &mut head, &mut rest) != 0 {
            if let Visit::Compound(_) = self.scalar(head)? {
                at_compound = true;
                break;
            }
            count = count.checked_add(1).ok_or(Stop::TooLarge)?;
            cell = rest;
        }
        if !at_compound {
            // `cell` is the tail: [] or, for an improper list, any other term.
            w::patch_u32(self.body.buf(), len_at, count);
            if let Visit::Written = self.scalar(cell)? {
                return Ok(true);
            }
        }
        // From the cell whose head is compound, or from a compound tail.
        self.scratch.frames.push(Frame::ListRest {
            tail: cell,
            len_at,
            count,
        });
        Ok(false)
    }

    /// Writes `list` as STRING_EXT if it is a proper list of fewer than 65536 integers
    /// 0..=255 (scanning at most that many cells); else writes nothing and returns false.
    unsafe fn string(&mut self, list: ErlNifTerm) -> Result<bool, Stop> {
        let start = self.body.position();
        self.body
            .buf()
            .extend_from_slice(&[teleport_net::etf::STRING_EXT, 0, 0]);
        let (mut cell, mut n) = (list, 0usize);
        let (mut head, mut tail) = (ErlNifTerm::default(), ErlNifTerm::default());
        while enif_get_list_cell(self.env, cell, &mut head, &mut tail) != 0 {
            let Some(b) = self.small(head).and_then(|i| u8::try_from(i).ok()) else {
                break;
            };
            n += 1;
            if n > w::STRING_MAX {
                break;
            }
            self.body.buf().push(b);
            cell = tail;
            // Charged as it goes: a whole scan is up to 65,536 cells, too long to run
            // past the budget on a normal scheduler.
            if n % STRING_CHARGE_STEP == 0 {
                self.charge(STRING_CHARGE_STEP as u64)?;
            }
        }
        self.charge((n % STRING_CHARGE_STEP) as u64)?;
        if cell == self.nil && n <= w::STRING_MAX {
            let len = (n as u16).to_be_bytes();
            self.body.buf()[start + 1..start + 3].copy_from_slice(&len);
            return Ok(true);
        }
        self.body.truncate(start);
        Ok(false)
    }

    /// Writes a map's header and pushes a frame for its pairs, which come in
    /// `term_to_binary/1`'s order: for a map of up to 32 keys (a flatmap) the
    /// iterator's, which is key order; for a larger one (a hash trie, which the VM
    /// walks depth-first from its last branch) the iterator's reversed.
    unsafe fn map(&mut self, term: ErlNifTerm) -> Result<bool, Stop> {
        let mut size = 0usize;
        enif_get_map_size(self.env, term, &mut size);
        w::map_header(self.body.buf(), u32::try_from(size).map_err(|_| Stop::TooLarge)?);
        if size == 0 {
            return Ok(true);
        }
        // Iterating costs about as much again as the keys and values.
        self.charge(size as u64)?;
        let forward = size <= FLATMAP_MAX;
        let start = if forward {
            ErlNifMapIteratorEntry::ERL_NIF_MAP_ITERATOR_HEAD
        } else {
            ErlNifMapIteratorEntry::ERL_NIF_MAP_ITERATOR_TAIL
        };
        let mut iter = MaybeUninit::<ErlNifMapIterator>::uninit();
        if enif_map_iterator_create(self.env, term, iter.as_mut_ptr(), start) == 0 {
            // Not reachable for a term whose type is map; refuse rather than guess.
            return Err(Stop::TooLarge);
        }
        self.scratch.iters.push(iter.assume_init());
        self.scratch.frames.push(Frame::MapPairs {
            value: self.nil,
            pending: false,
            forward,
        });
        Ok(false)
    }

    /// Atoms are immediates that never change meaning while the VM runs: the same term
    /// is the same atom, so its encoding is cached per scheduler thread.
    unsafe fn atom(&mut self, term: ErlNifTerm) -> Result<(), Stop> {
        let index = AtomSlot::index(term);
        let slot = &mut self.scratch.atoms[index];
        if slot.term == term && slot.len > 0 {
            self.body
                .buf()
                .extend_from_slice(&slot.bytes[..slot.len as usize]);
            return Ok(());
        }
        let at = self.body.position();
        match self.atom_form {
            AtomForm::Vm => self.piece(term, false)?,
            form => {
                let mut name = MaybeUninit::<[u8; 256]>::uninit();
                let n = enif_get_atom(
                    self.env,
                    term,
                    name.as_mut_ptr() as *mut c_char,
                    256 as c_uint,
                    ErlNifCharEncoding::ERL_NIF_LATIN1,
                );
                if n <= 0 {
                    // A character over 255: the NIF API of OTP 25 (2.16) gives no UTF-8
                    // text, the VM does.
                    return self.piece(term, false);
                }
                self.charge(ATOM_MISS_COST)?;
                // SAFETY: the VM wrote n bytes, the last the terminating NUL.
                let name = std::slice::from_raw_parts(name.as_ptr() as *const u8, n as usize - 1);
                if form == AtomForm::Latin1 {
                    w::atom_latin1(self.body.buf(), name);
                } else {
                    w::atom_latin1_as_utf8(self.body.buf(), name);
                }
            }
        }
        let encoded = &self.body.buf()[at..];
        let slot = &mut self.scratch.atoms[index];
        if encoded.len() <= slot.bytes.len() {
            slot.bytes[..encoded.len()].copy_from_slice(encoded);
            slot.len = encoded.len() as u8;
            slot.term = term;
        }
        Ok(())
    }

    #[inline(never)]
    unsafe fn binary(&mut self, term: ErlNifTerm) -> Result<(), Stop> {
        let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
        if enif_inspect_binary(self.env, term, bin.as_mut_ptr()) == 0 {
            // A bitstring (not a whole number of bytes): rare, and of unknown size.
            return self.piece(term, true);
        }
        let bin = bin.assume_init();
        let len = u32::try_from(bin.size).map_err(|_| Stop::TooLarge)?;
        w::binary_header(self.body.buf(), len);
        if bin.size <= COPY_MAX {
            self.body.buf().extend_from_slice(slice(&bin));
            return Ok(());
        }
        self.charge(REFERENCE_COST)?;
        if self.keep.is_null() {
            let keep = enif_alloc_env();
            self.body.keep_alive(Box::new(KeepEnv(keep)));
            self.keep = keep;
        }
        let copy = enif_make_copy(self.keep, term);
        let mut kept = MaybeUninit::<ErlNifBinary>::uninit();
        if enif_inspect_binary(self.keep, copy, kept.as_mut_ptr()) == 0 {
            return Err(Stop::TooLarge);
        }
        let kept = kept.assume_init();
        // SAFETY: `copy` lives in the keep env, which the body owns and drops last;
        // the copy made the binary read-only, so its bytes do not move.
        self.body.push_external(slice(&kept));
        self.referenced.push(copy);
        Ok(())
    }

    /// Splices in the VM's own encoding of `term`. `unknown_size`: on a normal
    /// scheduler, leave it to a dirty one, as it may be large.
    #[inline(never)]
    unsafe fn piece(&mut self, term: ErlNifTerm, unknown_size: bool) -> Result<(), Stop> {
        if unknown_size && self.inline() {
            return Err(Stop::OverBudget);
        }
        self.charge(PIECE_COST)?;
        let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
        if enif_term_to_binary(self.env, term, bin.as_mut_ptr()) == 0 {
            return Err(Stop::TooLarge);
        }
        let mut bin = bin.assume_init();
        // Without the version byte.
        let piece = slice(&bin).get(1..).unwrap_or_default();
        if let Some(&tag) = piece.first() {
            self.needs_release = self.needs_release.max(teleport_net::etf::release_reading(tag));
        }
        self.body.buf().extend_from_slice(piece);
        enif_release_binary(&mut bin);
        Ok(())
    }
}

/// How the running VM's `term_to_binary/1` writes an atom whose characters are all
/// Latin-1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AtomForm {
    /// ATOM_EXT with the Latin-1 bytes (OTP 25 and earlier).
    Latin1,
    /// SMALL_ATOM_UTF8_EXT (ATOM_UTF8_EXT over 255 bytes) with the UTF-8 bytes (OTP 26
    /// and later).
    Utf8,
    /// Something else: every atom is spliced in from `enif_term_to_binary`, whatever
    /// the VM writes (slower, still correct).
    Vm,
}

impl AtomForm {
    pub fn name(self) -> &'static str {
        match self {
            AtomForm::Latin1 => "latin1",
            AtomForm::Utf8 => "utf8",
            AtomForm::Vm => "vm",
        }
    }
}

/// The VM's atom form, asked once: `enif_term_to_binary` of an atom with a character
/// over 127 (whose bytes differ between the forms).
pub fn atom_form() -> AtomForm {
    static FORM: OnceLock<AtomForm> = OnceLock::new();
    // SAFETY: an env of our own, freed before the closure returns; `bin` is read only
    // after `enif_term_to_binary` filled it, and released.
    *FORM.get_or_init(|| unsafe {
        let env = enif_alloc_env();
        // 'caf\xe9' (café) in Latin-1.
        let atom = enif_make_atom_len(env, b"caf\xe9".as_ptr() as *const c_char, 4);
        let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
        let form = if enif_term_to_binary(env, atom, bin.as_mut_ptr()) == 0 {
            AtomForm::Vm
        } else {
            let mut bin = bin.assume_init();
            let form = match slice(&bin) {
                [131, teleport_net::etf::ATOM_EXT, 0, 4, b'c', b'a', b'f', 0xe9] => AtomForm::Latin1,
                [131, teleport_net::etf::SMALL_ATOM_UTF8_EXT, 5, b'c', b'a', b'f', 0xc3, 0xa9] => {
                    AtomForm::Utf8
                }
                _ => AtomForm::Vm,
            };
            enif_release_binary(&mut bin);
            form
        };
        enif_free_env(env);
        form
    })
}

/// What this node tells its peers of itself in every handshake: its Erlang/OTP release,
/// and whether its VM builds native records (asked by decoding one).
pub fn capabilities() -> Capabilities {
    static CAPABILITIES: OnceLock<Capabilities> = OnceLock::new();
    *CAPABILITIES.get_or_init(|| {
        let mut info = MaybeUninit::<ErlNifSysInfo>::zeroed();
        // SAFETY: the VM fills at most `size` bytes of the struct; the strings it points
        // to are static.
        let otp_release = unsafe {
            enif_system_info(info.as_mut_ptr(), std::mem::size_of::<ErlNifSysInfo>());
            let info = info.assume_init();
            if info.otp_release.is_null() {
                0
            } else {
                std::ffi::CStr::from_ptr(info.otp_release)
                    .to_str()
                    .ok()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0)
            }
        };
        // `#m:r{}` (no fields), as OTP 29 writes it.
        const EMPTY_RECORD: [u8; 12] = [131, 67, 0, 0, 0, 0, 0, 119, 1, b'm', 119, 1];
        let record = [&EMPTY_RECORD[..], b"r"].concat();
        // SAFETY: a fresh env, freed below; the bytes outlive the call.
        let records = unsafe {
            let env = enif_alloc_env();
            let mut term = ErlNifTerm::default();
            let used = enif_binary_to_term(env, record.as_ptr(), record.len(), &mut term, 0);
            enif_free_env(env);
            used == record.len()
        };
        Capabilities {
            otp_release,
            flags: if records { Capabilities::NATIVE_RECORDS } else { 0 },
        }
    })
}

/// Whether this VM crashes building a map of over 128 keys on a thread that is not a
/// scheduler (`enif_make_map_from_arrays`, `enif_binary_to_term`: its sort picks a
/// random pivot from the scheduler's state; erlang/otp GH-8208, OTP-19495). Affected:
/// erts 13.1 to 13.2.2.13 (OTP 25.1 to 25.3.2.17, Debian bookworm's 25.2.3 among them),
/// 14.0 to 14.2.5.7 (OTP 26 before 26.2.5.9), 15.0 to 15.2.2 (OTP 27 before 27.3). The
/// I/O threads then leave maps over 32 keys (and funs) to a dirty scheduler
/// (deliver.rs, `decode_on_scheduler`).
pub fn large_map_bug() -> bool {
    static AFFECTED: OnceLock<bool> = OnceLock::new();
    *AFFECTED.get_or_init(|| {
        let mut info = MaybeUninit::<ErlNifSysInfo>::zeroed();
        // SAFETY: the VM fills at most `size` bytes of the struct.
        let version = unsafe {
            enif_system_info(info.as_mut_ptr(), std::mem::size_of::<ErlNifSysInfo>());
            let info = info.assume_init();
            if info.erts_version.is_null() {
                return true;
            }
            std::ffi::CStr::from_ptr(info.erts_version)
                .to_string_lossy()
                .into_owned()
        };
        teleport_net::etf::erts_has_large_map_bug(&version)
    })
}

/// The term types `Walker::other` tells apart by the NIF API's type tests: those of
/// `ErlNifTermType` (as erl_nif.h names them, lower case). A term of any other type is
/// encoded by the VM. encoder_SUITE checks this list against the running release's
/// erl_nif.h, so a release that names a new type shows up there.
const KNOWN_TYPES: [&str; 11] = [
    "atom",
    "bitstring",
    "float",
    "fun",
    "integer",
    "list",
    "map",
    "pid",
    "port",
    "reference",
    "tuple",
];

/// What the encoder found out about this VM, for tests and logs:
/// `#{tags => on | off | probe_failed, atoms => latin1 | utf8 | vm, word_bits => 64,
/// large_maps => reader | scheduler, term_types => [atom()]}` (`large_maps`: where
/// arriving maps over 32 keys are built with `decode_on_scheduler` auto, see
/// `large_map_bug`; `term_types`: `KNOWN_TYPES`).
#[rustler::nif]
fn encoder_info(env: Env<'_>) -> NifResult<Term<'_>> {
    let pairs = [
        ("tags", Atom::from_str(env, tags::status().name())?.encode(env)),
        ("atoms", Atom::from_str(env, atom_form().name())?.encode(env)),
        ("word_bits", usize::BITS.encode(env)),
        (
            "large_maps",
            Atom::from_str(env, if large_map_bug() { "scheduler" } else { "reader" })?.encode(env),
        ),
        (
            "term_types",
            KNOWN_TYPES
                .iter()
                .map(|name| Atom::from_str(env, name))
                .collect::<NifResult<Vec<_>>>()?
                .encode(env),
        ),
    ];
    let mut map = rustler::types::map::map_new(env);
    for (key, value) in pairs {
        map = map.map_put(Atom::from_str(env, key)?.encode(env), value)?;
    }
    Ok(map)
}

unsafe fn slice(bin: &ErlNifBinary) -> &[u8] {
    if bin.size == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(bin.data, bin.size)
    }
}

/// The VM's tagging of immediate terms on 64-bit machines (erl_term.h): a small integer
/// is `value << 4 | 0xF`, an atom `index << 6 | 0x0B`, a list cell pointer has `01` in
/// its low bits. Reading the tags saves a call into the VM per integer and atom, about a
/// third of the encoder's time on structure-heavy terms. Not part of the NIF API, so
/// used only once `usable` has checked them against what the API itself makes.
mod tags {
    use std::sync::OnceLock;

    use rustler::sys::{
        enif_alloc_env, enif_free_env, enif_make_atom, enif_make_double, enif_make_int64,
        enif_make_list_cell, enif_make_list_from_array, enif_make_ref, enif_make_tuple_from_array,
        ErlNifTerm,
    };

    #[inline(always)]
    fn word(term: ErlNifTerm) -> usize {
        // SAFETY: ErlNifTerm is a transparent wrapper of a machine word.
        unsafe { std::mem::transmute(term) }
    }

    #[inline(always)]
    pub fn small(term: ErlNifTerm) -> Option<i64> {
        let w = word(term);
        (w & 0xF == 0xF).then_some((w as i64) >> 4)
    }

    #[inline(always)]
    pub fn is_atom(term: ErlNifTerm) -> bool {
        word(term) & 0x3F == 0x0B
    }

    #[inline(always)]
    pub fn is_list_cell(term: ErlNifTerm) -> bool {
        word(term) & 0x3 == 0x1
    }

    /// Whether the tag reading is on, and if not why.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Status {
        On,
        /// `TELEPORT_ENCODER_TAGS=off` (test builds).
        Off,
        /// The probe found the VM's tags other than these functions read them.
        ProbeFailed,
    }

    impl Status {
        pub fn name(self) -> &'static str {
            match self {
                Status::On => "on",
                Status::Off => "off",
                Status::ProbeFailed => "probe_failed",
            }
        }
    }

    /// Whether the tags above hold in this VM, probed once with terms the API makes.
    pub fn usable() -> bool {
        status() == Status::On
    }

    /// Probed once. In a test build (`test-hooks`), `TELEPORT_ENCODER_TAGS` in the VM's
    /// environment can turn the tag reading `off` (tests use it to run the API-only
    /// path), or `simulate_changed_layout`: probe as if the VM had moved its atom tag,
    /// which the probe must catch (tests use it to show the fallback taking over where
    /// a future release changes the layout).
    pub fn status() -> Status {
        static STATUS: OnceLock<Status> = OnceLock::new();
        *STATUS.get_or_init(|| {
            #[cfg(feature = "test-hooks")]
            let setting = std::env::var_os("TELEPORT_ENCODER_TAGS");
            #[cfg(not(feature = "test-hooks"))]
            let setting: Option<std::ffi::OsString> = None;
            if setting.as_deref().is_some_and(|v| v == "off") {
                return Status::Off;
            }
            let distort = match setting.as_deref() {
                Some(v) if v == "simulate_changed_layout" => 0x30,
                _ => 0,
            };
            // SAFETY: `probe` needs a 64-bit VM, checked first; it reads only terms it made.
            if usize::BITS == 64 && unsafe { probe(distort) } {
                Status::On
            } else {
                Status::ProbeFailed
            }
        })
    }

    /// `distort` is xored into every word the probe looks at: a VM whose tags differ.
    unsafe fn probe(distort: usize) -> bool {
        let env = enif_alloc_env();
        let seen = |t: ErlNifTerm| -> ErlNifTerm {
            // SAFETY: ErlNifTerm is a transparent wrapper of a machine word.
            std::mem::transmute::<usize, ErlNifTerm>(word(t) ^ distort)
        };
        let smalls = [0, 1, -1, 255, 256, -256, 123_456_789, (1 << 59) - 1, -(1 << 59)];
        let bigs = [1 << 59, -(1 << 59) - 1, i64::MAX, i64::MIN];
        let nil = enif_make_list_from_array(env, std::ptr::null(), 0);
        let atoms = [c"ok", c"", c"teleport_tag_probe"].map(|name| seen(enif_make_atom(env, name.as_ptr())));
        let one = enif_make_int64(env, 1);
        let cell = enif_make_list_cell(env, one, nil);
        let others = [
            nil,
            cell,
            enif_make_tuple_from_array(env, [one].as_ptr(), 1),
            enif_make_double(env, 1.5),
            enif_make_ref(env),
        ]
        .map(seen);
        let cell = seen(cell);
        let ok = smalls
            .iter()
            .all(|&v| small(seen(enif_make_int64(env, v))) == Some(v))
            && bigs
                .iter()
                .all(|&v| small(seen(enif_make_int64(env, v))).is_none())
            && atoms
                .iter()
                .all(|&a| is_atom(a) && small(a).is_none() && !is_list_cell(a))
            && word(atoms[0]) != word(atoms[2])
            && is_list_cell(cell)
            && others.iter().all(|&t| small(t).is_none() && !is_atom(t))
            && others[..1].iter().chain(&others[2..]).all(|&t| !is_list_cell(t));
        enif_free_env(env);
        ok
    }
}
