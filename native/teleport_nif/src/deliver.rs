//! Receive side: read a frame body, decode it (decode.rs), and hand the message
//! to the local process from the connection's I/O thread (no Erlang process in the data
//! path).
//!
//! The exception: a frame this VM cannot decode off a scheduler (decode.rs) is
//! handed whole to a decoder process (teleport_decoder), which decodes and delivers
//! it on a dirty scheduler (`deliver_frame`). The connection reads nothing more until
//! that is done (the frame is `Deferred`), so its frames keep their order, and its
//! I/O thread serves its other connections meanwhile. The wait always ends: the
//! ticket holds the connection's `Resume`, which reports when the ticket is dropped,
//! whatever happens to the message or the process that holds it.

use std::any::Any;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use rustler::env::OwnedEnv;
use rustler::sys::{enif_alloc_binary, enif_send, enif_whereis_pid, ErlNifBinary, ErlNifEnv, ErlNifPid};
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, OwnedBinary, Resource, ResourceArc, Term};
use teleport_net::etf::read::ReadError;
use teleport_net::{
    BodyBuffer, Deferral, Delivery, FrameHandler, FrameKind, Malformed, Outcome, Resume, Undeliverable,
};

use crate::atoms;
use crate::decode::{Source, TermDecoder};

/// Bodies at least this large are read into a binary of their own, which their
/// large binaries then reference; smaller ones are decoded from the connection's buffer.
const OWN_BUFFER_MIN: usize = 64 * 1024;

/// A frame's own binary, lent to the connection to read the body into.
struct FrameBinary(OwnedBinary);

impl BodyBuffer for FrameBinary {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The local processes frames go to, beside their destinations.
pub struct Helpers {
    /// Registered names of the processes that make calls arriving over teleport.
    pub relays: Vec<Atom>,
    /// Registered names of the processes that decode frames on a dirty scheduler.
    pub decoders: Vec<Atom>,
    /// Whether I/O threads must leave hash maps and funs to a scheduler (decode.rs).
    pub defer_hash_maps: bool,
    /// teleport_runtime: receives the core's events, and calls no relay could take
    /// (so their callers hear of it).
    pub runtime: LocalPid,
}

pub struct Deliverer {
    env: OwnedEnv,
    decoder: TermDecoder,
    helpers: Arc<Helpers>,
    /// Where a frame handed to a decoder process is built.
    handoff_env: OwnedEnv,
}

impl Deliverer {
    pub fn new(helpers: Arc<Helpers>) -> Deliverer {
        Deliverer {
            env: OwnedEnv::new(),
            decoder: TermDecoder::off_scheduler(helpers.defer_hash_maps),
            helpers,
            handoff_env: OwnedEnv::new(),
        }
    }

    fn deliver(
        &mut self,
        kind: FrameKind,
        bytes: &[u8],
        binary: Option<OwnedBinary>,
        deferral: &Deferral,
    ) -> Outcome {
        let Deliverer {
            env,
            decoder,
            helpers,
            handoff_env,
        } = self;
        let outcome = env.run(|env| {
            let (source, frame) = match binary {
                Some(owned) => {
                    let binary = owned.release(env);
                    let term = binary.to_term(env);
                    let source = Source {
                        bytes: binary.as_slice(),
                        binary: Some(term.as_c_arg()),
                    };
                    (source, Some(term))
                }
                None => (Source { bytes, binary: None }, None),
            };
            match decode_and_deliver(env, ptr::null_mut(), kind, decoder, &source, helpers) {
                Err(ReadError::NeedsScheduler) => {
                    hand_off(handoff_env, kind, &source, frame, helpers, deferral)
                }
                other => other.map_err(|e| Malformed(e.to_string())),
            }
        });
        // enif_send invalidated the env's terms; clear it for the next frame either way.
        env.clear();
        outcome
    }
}

impl FrameHandler for Deliverer {
    fn handle(&mut self, kind: FrameKind, body: &[u8], deferral: &Deferral) -> Outcome {
        self.deliver(kind, body, None, deferral)
    }

    fn body_buffer(&mut self, len: usize) -> Result<Option<Box<dyn BodyBuffer>>, Malformed> {
        if len < OWN_BUFFER_MIN {
            return Ok(None);
        }
        // Uninitialised memory the socket fills directly: no zeroing, no second copy.
        let owned =
            try_alloc_binary(len).ok_or_else(|| Malformed("cannot allocate the frame buffer".to_string()))?;
        Ok(Some(Box::new(FrameBinary(owned))))
    }

    fn handle_owned(&mut self, kind: FrameKind, body: Box<dyn BodyBuffer>, deferral: &Deferral) -> Outcome {
        let FrameBinary(owned) = *body
            .into_any()
            .downcast::<FrameBinary>()
            .map_err(|_| Malformed("a body buffer of another kind".to_string()))?;
        self.deliver(kind, &[], Some(owned), deferral)
    }
}

/// A frame on its way to a decoder process, and the way back to the connection
/// waiting for it. Dropping it (the message lost, the process dead) reports the frame
/// undeliverable, so the connection reads on.
pub struct DecodeTicket {
    kind: FrameKind,
    helpers: Arc<Helpers>,
    outcome: Mutex<Option<Resume>>,
}

#[rustler::resource_impl]
impl Resource for DecodeTicket {}

impl DecodeTicket {
    /// Decodes `frame` and delivers it; runs on a dirty scheduler, where every term
    /// can be built. `env` is the calling process's.
    pub fn run(&self, env: Env, frame: rustler::Binary) {
        let mut decoder = TermDecoder::default();
        let message_env = OwnedEnv::new();
        let outcome = message_env.run(|menv| {
            let term = frame.to_term(env).in_env(menv);
            let binary = rustler::Binary::from_term(term)
                .map_err(|_| Malformed("frame is not a binary".to_string()))?;
            let source = Source {
                bytes: binary.as_slice(),
                binary: Some(term.as_c_arg()),
            };
            decode_and_deliver(
                menv,
                env.as_c_arg(),
                self.kind,
                &mut decoder,
                &source,
                &self.helpers,
            )
            .map_err(|e| Malformed(e.to_string()))
        });
        if let Some(resume) = self.outcome.lock().unwrap_or_else(|p| p.into_inner()).take() {
            resume.finish(outcome);
        }
    }
}

/// Spreads frames over the decoder processes.
static NEXT_DECODER: AtomicUsize = AtomicUsize::new(0);

/// Sends the frame to a decoder process; the connection waits (`Deferred`) until it
/// has been delivered there.
fn hand_off(
    handoff_env: &mut OwnedEnv,
    kind: FrameKind,
    source: &Source,
    frame: Option<Term>,
    helpers: &Arc<Helpers>,
    deferral: &Deferral,
) -> Outcome {
    let decoders = &helpers.decoders;
    let Some(name) = decoders.get(NEXT_DECODER.fetch_add(1, Relaxed) % decoders.len().max(1)) else {
        return Ok(Delivery::Undeliverable(Undeliverable::NoDecoder));
    };
    let ticket = ResourceArc::new(DecodeTicket {
        kind,
        helpers: helpers.clone(),
        // Armed before the message is out: the decoder may finish before this returns.
        outcome: Mutex::new(Some(deferral.defer())),
    });
    let sent = handoff_env.run(|env| {
        let Some(pid) = whereis(ptr::null_mut(), name.to_term(env)) else {
            return false;
        };
        let frame = match frame {
            // A reference to the same buffer: no copy.
            Some(term) => term.in_env(env),
            None => {
                let Some(mut copy) = try_alloc_binary(source.bytes.len()) else {
                    return false;
                };
                copy.as_mut_slice().copy_from_slice(source.bytes);
                copy.release(env).to_term(env)
            }
        };
        let msg = (atoms::dollar_teleport_decode(), ticket.clone(), frame).encode(env);
        send_to(env, ptr::null_mut(), pid, msg) == Delivery::Delivered
    });
    handoff_env.clear();
    if !sent {
        if let Some(resume) = ticket.outcome.lock().unwrap_or_else(|p| p.into_inner()).take() {
            resume.finish(Ok(Delivery::Undeliverable(Undeliverable::NoDecoder)));
        }
    }
    // The connection reads on once the ticket's end (delivered, malformed, or dropped
    // with the message) is reported.
    Ok(Delivery::Deferred)
}

/// `caller_env`: NULL on our own threads, the calling process's env on a scheduler.
fn decode_and_deliver(
    env: Env,
    caller_env: *mut ErlNifEnv,
    kind: FrameKind,
    decoder: &mut TermDecoder,
    source: &Source,
    helpers: &Helpers,
) -> Result<Delivery, ReadError> {
    // Creates atoms as needed: only authenticated peers get here.
    // SAFETY: `env` is the delivery's own env, valid on this thread for this call; `source`
    // holds the frame's bytes (and its binary term, made in `env`, if it has one).
    let raw = unsafe { decoder.decode(env.as_c_arg(), source)? };
    // SAFETY: `raw` was just made in `env`.
    let term = unsafe { Term::new(env, raw) };
    match kind {
        // The reader consumes these; one reaching delivery is a protocol error.
        FrameKind::PoolEpoch | FrameKind::BulkStart | FrameKind::BulkChunk => {
            Err(ReadError::Malformed("a frame of the reader's own kind"))
        }
        FrameKind::Send => {
            let (dest, msg): (Term, Term) = term
                .decode()
                .map_err(|_| ReadError::Malformed("send frame is not {Dest, Msg}"))?;
            deliver(env, caller_env, dest, msg)
        }
        FrameKind::Call => {
            let (dest, call, request): (Term, Term, Term) = term
                .decode()
                .map_err(|_| ReadError::Malformed("call frame is not {Dest, Call, Request}"))?;
            // A relay makes the call on the caller's behalf (teleport_call_relay): the
            // one the call tuple hashes to, or the next that takes it (one being
            // restarted has no name, or died since its name was looked up). With none,
            // the runtime tells the caller.
            let relays = &helpers.relays;
            let first = call.hash_phash2() as usize;
            let msg = (atoms::dollar_teleport_call(), dest, call, request).encode(env);
            for i in 0..relays.len() {
                let name = relays[(first + i) % relays.len()];
                if let Some(relay) = whereis(caller_env, name.to_term(env)) {
                    if send_to(env, caller_env, relay, msg) == Delivery::Delivered {
                        return Ok(Delivery::Delivered);
                    }
                }
            }
            let msg = (atoms::teleport_call_undeliverable(), dest, call).encode(env);
            send_to(env, caller_env, helpers.runtime, msg);
            Ok(Delivery::Undeliverable(Undeliverable::NoCallRelay))
        }
    }
}

fn deliver(env: Env, caller_env: *mut ErlNifEnv, dest: Term, msg: Term) -> Result<Delivery, ReadError> {
    // Type tests, not `get_type`: that aborts the VM on a type newer than the NIF API
    // (a peer may send any term, an OTP 29 native record among them).
    let pid = if dest.is_pid() {
        match dest.decode::<LocalPid>() {
            Ok(pid) => pid,
            Err(_) => return Ok(Delivery::Undeliverable(Undeliverable::NotALocalPid)),
        }
    } else if dest.is_atom() {
        match whereis(caller_env, dest) {
            Some(pid) => pid,
            None => return Ok(Delivery::Undeliverable(Undeliverable::Noproc)),
        }
    } else {
        return Err(ReadError::Malformed("destination is neither a pid nor an atom"));
    };
    Ok(send_to(env, caller_env, pid, msg))
}

fn send_to(env: Env, caller_env: *mut ErlNifEnv, pid: LocalPid, msg: Term) -> Delivery {
    // SAFETY: `caller_env` is the calling process's env on a scheduler, or null off one
    // (as `enif_send` allows); `msg` is a term of `env`, a process-independent env
    // that `enif_send` then clears.
    let sent = unsafe { enif_send(caller_env, pid.as_c_arg(), env.as_c_arg(), msg.as_c_arg()) };
    if sent == 0 {
        Delivery::Undeliverable(Undeliverable::DeadProcess)
    } else {
        Delivery::Delivered
    }
}

/// `OwnedBinary::new` aborts the VM when allocation fails; a frame that does not fit
/// should only close its connection.
fn try_alloc_binary(len: usize) -> Option<OwnedBinary> {
    let mut binary = std::mem::MaybeUninit::<ErlNifBinary>::uninit();
    // SAFETY: `enif_alloc_binary` initialises `binary` when it returns true; only then is
    // it read, and `OwnedBinary` takes over releasing it.
    unsafe {
        if enif_alloc_binary(len, binary.as_mut_ptr()) == 0 {
            return None;
        }
        Some(OwnedBinary::from_raw(binary.assume_init()))
    }
}

/// `enif_whereis_pid`; `caller_env` as for `send_to`.
fn whereis(caller_env: *mut ErlNifEnv, name: Term) -> Option<LocalPid> {
    let mut pid = std::mem::MaybeUninit::<ErlNifPid>::uninit();
    // SAFETY: `caller_env` as for `send_to`; `name` is an atom term of the delivery's env,
    // and `pid` is written when the name is found.
    let found = unsafe { enif_whereis_pid(caller_env, name.as_c_arg(), pid.as_mut_ptr()) };
    // SAFETY: `enif_whereis_pid` wrote `pid` when it returned non-zero.
    (found != 0).then(|| LocalPid::from_c_arg(unsafe { pid.assume_init() }))
}
