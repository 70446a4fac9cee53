//! Where an encode runs (schedule.rs), between the NIF entries (lib.rs) and the encoder
//! (encoder.rs). A NIF first encodes inline, on the calling normal scheduler, within
//! `encoder::INLINE_BUDGET`; almost every message fits. When the budget runs out it
//! starts over on a dirty CPU scheduler (`enif_schedule_nif`). Starting over wastes at
//! most one budget (~0.5 ms) of work, against a term that takes longer than that to
//! encode anyway; keeping the walk's state to yield and resume on a normal scheduler
//! would save it, but at the cost of one reschedule per timeslice (a 1,000,000-element
//! list: dozens) and of state pointing into a heap the caller's process owns.
//!
//! Also turns an encoded body into an iolist, for `teleport_nif:encode/1`.

use std::ffi::CStr;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rustler::sys::{
    enif_make_atom, enif_make_badarg, enif_make_copy, enif_raise_exception, enif_schedule_nif, ErlNifEnv,
    ErlNifTerm, ERL_NIF_DIRTY_JOB_CPU_BOUND,
};
use rustler::types::binary::{Binary, NewBinary};
use rustler::{Encoder, Env, Error, NifResult, Term};
use teleport_net::etf::write::Piece;

use crate::encoder::{Encoded, Limit, INLINE_BUDGET};

/// A NIF body that can run inline (`Limit::Inline`, may reschedule itself) or dirty.
pub type Nif = for<'a> fn(Env<'a>, &[Term<'a>], Limit) -> NifResult<Term<'a>>;

/// The C entry of a dirty continuation: `dirty_entry` with the matching `Nif`.
pub type Continuation = unsafe extern "C" fn(*mut ErlNifEnv, c_int, *const ErlNifTerm) -> ErlNifTerm;

/// Continues the calling NIF as `dirty` on a dirty CPU scheduler, with the same arguments.
pub fn reschedule<'a>(env: Env<'a>, name: &'static CStr, dirty: Continuation, args: &[Term<'a>]) -> Term<'a> {
    let argv: Vec<ErlNifTerm> = args.iter().map(Term::as_c_arg).collect();
    // SAFETY: the VM copies `argv`; the terms belong to the caller's env, which the
    // continuation gets.
    unsafe {
        let scheduled = enif_schedule_nif(
            env.as_c_arg(),
            name.as_ptr(),
            ERL_NIF_DIRTY_JOB_CPU_BOUND as c_int,
            dirty,
            argv.len() as c_int,
            argv.as_ptr(),
        );
        Term::new(env, scheduled)
    }
}

/// Defines `$name`, the C entry of a dirty continuation that runs `$nif` unbounded
/// (through `dirty_entry`), for `reschedule`.
macro_rules! continuation {
    ($name:ident, $nif:path) => {
        unsafe extern "C" fn $name(
            env: *mut rustler::sys::ErlNifEnv,
            argc: std::os::raw::c_int,
            argv: *const rustler::sys::ErlNifTerm,
        ) -> rustler::sys::ErlNifTerm {
            $crate::schedule::dirty_entry(env, argc, argv, $nif)
        }
    };
}
pub(crate) use continuation;

/// The body of a dirty continuation: runs `nif` unbounded. rustler guards only the
/// NIF entries it generates, so a panic here is caught and raised as
/// `error:nif_panicked` rather than unwinding into the VM.
///
/// # Safety
/// The arguments are those the VM passes to a NIF.
pub unsafe fn dirty_entry(env: *mut ErlNifEnv, argc: c_int, argv: *const ErlNifTerm, nif: Nif) -> ErlNifTerm {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let marker = ();
        let env = Env::new(&marker, env);
        let args: Vec<Term> = (0..argc.max(0) as usize)
            .map(|i| Term::new(env, *argv.add(i)))
            .collect();
        nif(env, &args, Limit::Unbounded).map(|term| term.as_c_arg())
    }));
    match outcome {
        Ok(Ok(term)) => term,
        Ok(Err(Error::RaiseAtom(reason))) => raise(env, reason),
        Ok(Err(_)) => enif_make_badarg(env),
        Err(_) => raise(env, "nif_panicked"),
    }
}

unsafe fn raise(env: *mut ErlNifEnv, reason: &str) -> ErlNifTerm {
    let mut name = reason.as_bytes().to_vec();
    name.push(0);
    let atom = enif_make_atom(env, name.as_ptr() as *const _);
    enif_raise_exception(env, atom)
}

/// Tells the scheduler how much of its timeslice an inline encode used (a full budget
/// is about half of one), so a process sending many messages is scheduled out in time.
pub fn account(env: Env, encoded: &Encoded, limit: Limit) {
    if limit == Limit::Inline {
        let percent = (encoded.work * 50 / INLINE_BUDGET).clamp(1, 100) as i32;
        rustler::schedule::consume_timeslice(env, percent);
    }
}

/// The encoding as an iolist: a binary per copied part, and for each referenced binary
/// the original term (a refc binary or sub-binary sharing its bytes).
pub fn iolist<'a>(env: Env<'a>, encoded: &Encoded) -> Term<'a> {
    let mut referenced = encoded.referenced.iter();
    let mut parts: Vec<Term<'a>> = Vec::new();
    for piece in encoded.body.pieces() {
        parts.push(match piece {
            Piece::Own(bytes) => copied(env, bytes),
            Piece::External(bytes) => match referenced.next() {
                // SAFETY: the copy lives in the body's keep env, alive while `encoded` is.
                Some(&copy) => unsafe { Term::new(env, enif_make_copy(env.as_c_arg(), copy)) },
                None => copied(env, bytes),
            },
        });
    }
    parts.encode(env)
}

fn copied<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut bin = NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    Binary::from(bin).to_term(env)
}
