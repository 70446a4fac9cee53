//! Receive side: turn a frame body back into terms and hand the message to the
//! local process, from the reader thread (no Erlang process in the data path).

use std::ptr;

use rustler::env::OwnedEnv;
use rustler::sys::{enif_send, enif_whereis_pid, ErlNifPid};
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, Term, TermType};
use teleport_net::{Delivery, FrameHandler, FrameKind};

use crate::atoms;

pub struct Deliverer {
    env: OwnedEnv,
    /// Registered names of the processes that carry gs_call replies back.
    relays: std::sync::Arc<Vec<Atom>>,
}

impl Deliverer {
    pub fn new(relays: std::sync::Arc<Vec<Atom>>) -> Deliverer {
        Deliverer {
            env: OwnedEnv::new(),
            relays,
        }
    }
}

impl FrameHandler for Deliverer {
    fn handle(&mut self, kind: FrameKind, body: &[u8]) -> Result<Delivery, String> {
        let relays = &self.relays;
        let outcome = self.env.run(|env| decode_and_deliver(env, kind, body, relays));
        // enif_send invalidated the env's terms; clear it for the next frame either way.
        self.env.clear();
        outcome
    }
}

fn decode_and_deliver(env: Env, kind: FrameKind, body: &[u8], relays: &[Atom]) -> Result<Delivery, String> {
    // Trusted decoding creates atoms: only authenticated peers get here.
    let (term, used) =
        unsafe { env.binary_to_term_trusted(body) }.ok_or_else(|| "not an external term".to_string())?;
    if used != body.len() {
        return Err("trailing bytes after the term".to_string());
    }
    match kind {
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

/// `enif_whereis_pid` with a NULL env, as erl_nif asks of non-scheduler threads.
fn whereis(name: Term) -> Option<LocalPid> {
    let mut pid = std::mem::MaybeUninit::<ErlNifPid>::uninit();
    let found = unsafe { enif_whereis_pid(ptr::null_mut(), name.as_c_arg(), pid.as_mut_ptr()) };
    (found != 0).then(|| LocalPid::from_c_arg(unsafe { pid.assume_init() }))
}
