//! Receive side: read a frame body, decode it (decode.rs), and hand the message
//! to the local process from the reader thread (no Erlang process in the data path).

use std::io::Read;
use std::ptr;
use std::sync::Arc;

use rustler::env::OwnedEnv;
use rustler::sys::{enif_alloc_binary, enif_send, enif_whereis_pid, ErlNifBinary, ErlNifPid};
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, OwnedBinary, Term, TermType};
use teleport_net::host::read_body;
use teleport_net::{Delivery, FrameHandler, FrameKind};

use crate::atoms;
use crate::decode::{Source, TermDecoder};

/// Bodies at least this large are read into a binary of their own, which their
/// large binaries then reference; smaller ones go through a reused buffer.
const OWN_BUFFER_MIN: usize = 64 * 1024;

pub struct Deliverer {
    env: OwnedEnv,
    decoder: TermDecoder,
    /// Registered names of the processes that make calls arriving over teleport.
    relays: Arc<Vec<Atom>>,
}

impl Deliverer {
    pub fn new(relays: Arc<Vec<Atom>>) -> Deliverer {
        Deliverer {
            env: OwnedEnv::new(),
            decoder: TermDecoder::default(),
            relays,
        }
    }

    fn deliver(
        &mut self,
        kind: FrameKind,
        bytes: &[u8],
        binary: Option<OwnedBinary>,
    ) -> Result<Delivery, String> {
        let Deliverer { env, decoder, relays } = self;
        let outcome = env.run(|env| match binary {
            Some(owned) => {
                let binary = owned.release(env);
                let source = Source {
                    bytes: binary.as_slice(),
                    binary: Some(binary.to_term(env).as_c_arg()),
                };
                decode_and_deliver(env, kind, decoder, &source, relays)
            }
            None => decode_and_deliver(env, kind, decoder, &Source { bytes, binary: None }, relays),
        });
        // enif_send invalidated the env's terms; clear it for the next frame either way.
        env.clear();
        outcome
    }
}

impl FrameHandler for Deliverer {
    fn handle(&mut self, kind: FrameKind, body: &[u8]) -> Result<Delivery, String> {
        self.deliver(kind, body, None)
    }

    fn read_and_handle(
        &mut self,
        kind: FrameKind,
        len: usize,
        body: &mut dyn Read,
        scratch: &mut Vec<u8>,
    ) -> Result<Delivery, String> {
        if len < OWN_BUFFER_MIN {
            read_body(body, len, scratch)?;
            return self.deliver(kind, scratch, None);
        }
        // Uninitialised memory the socket fills directly: no zeroing, no second copy.
        let mut owned = try_alloc_binary(len).ok_or("cannot allocate the frame buffer")?;
        body.read_exact(owned.as_mut_slice())
            .map_err(|e| format!("read failed: {e}"))?;
        self.deliver(kind, &[], Some(owned))
    }
}

fn decode_and_deliver(
    env: Env,
    kind: FrameKind,
    decoder: &mut TermDecoder,
    source: &Source,
    relays: &[Atom],
) -> Result<Delivery, String> {
    // Creates atoms as needed: only authenticated peers get here.
    let raw = unsafe { decoder.decode(env.as_c_arg(), source)? };
    let term = unsafe { Term::new(env, raw) };
    match kind {
        // The reader consumes it; one reaching delivery is a protocol error.
        FrameKind::PoolEpoch => Err("unexpected pool epoch frame".to_string()),
        FrameKind::Send => {
            let (dest, msg): (Term, Term) = term.decode().map_err(|_| "send frame is not {Dest, Msg}")?;
            deliver(env, dest, msg)
        }
        FrameKind::Call => {
            let (dest, call, request): (Term, Term, Term) = term
                .decode()
                .map_err(|_| "call frame is not {Dest, Call, Request}")?;
            // A relay makes the call: it monitors the server before the request reaches it,
            // so the caller learns the server's exit reason, not a racing `noproc`.
            let relay_name = relays[call.hash_phash2() as usize % relays.len().max(1)];
            let Some(relay) = whereis(relay_name.to_term(env)) else {
                return Ok(Delivery::Undeliverable("no_reply_relay"));
            };
            let msg = (atoms::dollar_teleport_call(), dest, call, request).encode(env);
            Ok(send_to(env, relay, msg))
        }
    }
}

fn deliver(env: Env, dest: Term, msg: Term) -> Result<Delivery, String> {
    let pid = match dest.get_type() {
        TermType::Pid => match dest.decode::<LocalPid>() {
            Ok(pid) => pid,
            Err(_) => return Ok(Delivery::Undeliverable("not_a_local_pid")),
        },
        TermType::Atom => match whereis(dest) {
            Some(pid) => pid,
            None => return Ok(Delivery::Undeliverable("noproc")),
        },
        _ => return Err("destination is neither a pid nor an atom".to_string()),
    };
    Ok(send_to(env, pid, msg))
}

fn send_to(env: Env, pid: LocalPid, msg: Term) -> Delivery {
    // NULL caller env: we are on one of our own threads, not a scheduler.
    let sent = unsafe { enif_send(ptr::null_mut(), pid.as_c_arg(), env.as_c_arg(), msg.as_c_arg()) };
    if sent == 0 {
        Delivery::Undeliverable("dead_process")
    } else {
        Delivery::Delivered
    }
}

/// `OwnedBinary::new` aborts the VM when allocation fails; a frame that does not fit
/// should only close its connection.
fn try_alloc_binary(len: usize) -> Option<OwnedBinary> {
    let mut binary = std::mem::MaybeUninit::<ErlNifBinary>::uninit();
    unsafe {
        if enif_alloc_binary(len, binary.as_mut_ptr()) == 0 {
            return None;
        }
        Some(OwnedBinary::from_raw(binary.assume_init()))
    }
}

/// `enif_whereis_pid` with a NULL env, as erl_nif asks of non-scheduler threads.
fn whereis(name: Term) -> Option<LocalPid> {
    let mut pid = std::mem::MaybeUninit::<ErlNifPid>::uninit();
    let found = unsafe { enif_whereis_pid(ptr::null_mut(), name.as_c_arg(), pid.as_mut_ptr()) };
    (found != 0).then(|| LocalPid::from_c_arg(unsafe { pid.assume_init() }))
}
