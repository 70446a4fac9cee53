//! The NIF's side of `teleport_net::Host`: frame handlers for the I/O threads, and one
//! event-pump thread that turns core events into messages to Erlang processes.
//! A single sending thread means nothing is ever sent from a scheduler thread
//! with the wrong kind of env, whoever raised the event.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use rustler::env::OwnedEnv;
use rustler::sys::enif_send;
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, ResourceArc, Term};
use teleport_net::pool::PoolToken;
use teleport_net::{Delivery, Event, FrameHandler, Host, Malformed, Resume};

use crate::atoms;
use crate::deliver::{Deliverer, Helpers};

/// Builds a message in the pump's env and names its recipient.
pub type Job = Box<dyn for<'a> FnOnce(Env<'a>) -> Option<(LocalPid, Term<'a>)> + Send>;

pub struct NifHost {
    jobs: Sender<Job>,
    /// `helpers.runtime` receives every core event as `{teleport_event, Event}`.
    helpers: Arc<Helpers>,
}

pub struct EventPump {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl EventPump {
    pub fn start() -> std::io::Result<(EventPump, Sender<Job>)> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name("teleport-events".into())
            .spawn(move || pump(rx))?;
        Ok((
            EventPump {
                jobs: Some(tx.clone()),
                thread: Some(thread),
            },
            tx,
        ))
    }

    /// Ends once every sender is gone and the queue is drained.
    pub fn stop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn pump(rx: Receiver<Job>) {
    let mut env = OwnedEnv::new();
    for job in rx {
        // A failing job loses one message, never the pump or the VM.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            env.run(|env| {
                if let Some((pid, msg)) = job(env) {
                    // NULL caller env: this is our own thread.
                    // SAFETY: a null caller env, as `enif_send` requires off a scheduler; `msg` is a
                    // term of `env`, this thread's own process-independent env.
                    unsafe { enif_send(ptr::null_mut(), pid.as_c_arg(), env.as_c_arg(), msg.as_c_arg()) };
                }
            })
        }));
        env.clear();
    }
}

/// Queues a message `msg` for `pid`, built on the pump thread.
pub fn post(
    jobs: &Sender<Job>,
    pid: LocalPid,
    msg: impl for<'a> FnOnce(Env<'a>) -> Term<'a> + Send + 'static,
) {
    #[cfg(feature = "test-hooks")]
    if dropping::take_one() {
        return;
    }
    let _ = jobs.send(Box::new(move |env| Some((pid, msg(env)))));
}

/// Test-only fault injection: how many of the next posted messages to lose, as a
/// pump that failed would (whoever waits for one must not wait forever).
#[cfg(feature = "test-hooks")]
pub mod dropping {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    static DROP_NEXT: AtomicU64 = AtomicU64::new(0);

    pub fn drop_next(count: u64) {
        DROP_NEXT.store(count, Relaxed);
    }

    /// Whether to lose this message. Never below zero: a decrement racing
    /// `drop_next(0)` must not wrap to u64::MAX (which would drop every event from
    /// then on).
    pub(super) fn take_one() -> bool {
        DROP_NEXT.load(Relaxed) > 0
            && DROP_NEXT
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }
}

impl NifHost {
    pub fn new(jobs: Sender<Job>, helpers: Arc<Helpers>) -> NifHost {
        NifHost { jobs, helpers }
    }
}

/// Node names arrive as text; as atoms they are what Erlang code matches on.
/// Only names that passed the handshake (or that Erlang gave us) get here.
/// A peer's node name as the atom it is, if that atom exists (a node distributed
/// Erlang knows), else as a binary: names a peer claims create no atoms.
pub fn node_atom<'a>(env: Env<'a>, name: &str) -> Term<'a> {
    match Atom::existing_from_bytes(env, name.as_bytes()) {
        Ok(atom) => atom.encode(env),
        Err(_) => name.encode(env),
    }
}

/// A pool confirmation under way (`Host::confirm_pool`): answered once, by
/// `teleport_nif:confirm_pool/2`; dropped unanswered (the runtime gone), it is a no.
pub struct PoolTicket(Mutex<Option<Resume>>);

#[rustler::resource_impl]
impl rustler::Resource for PoolTicket {}

impl PoolTicket {
    pub fn answer(&self, confirmed: bool) {
        if let Some(resume) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            resume.finish(if confirmed {
                Ok(Delivery::Delivered)
            } else {
                Err(Malformed("not confirmed".to_string()))
            });
        }
    }
}

impl Host for NifHost {
    fn frame_handler(&self, _peer: &str) -> Box<dyn FrameHandler> {
        Box::new(Deliverer::new(self.helpers.clone()))
    }

    /// teleport_runtime asks the peer over disterl for its pool token
    /// (`teleport_nif:pool_token/1`) and answers with `confirm_pool/2`.
    fn confirm_pool(&self, peer: &str, token: PoolToken, _newer: bool, resume: Resume) {
        let ticket = ResourceArc::new(PoolTicket(Mutex::new(Some(resume))));
        let peer = peer.to_string();
        post(&self.jobs, self.helpers.runtime, move |env| {
            let mut bin = rustler::OwnedBinary::new(token.len());
            bin.as_mut_slice().copy_from_slice(&token);
            (
                atoms::teleport_confirm_pool(),
                node_atom(env, &peer),
                bin.release(env),
                ticket,
            )
                .encode(env)
        });
    }

    fn event(&self, event: Event) {
        post(&self.jobs, self.helpers.runtime, move |env| {
            let body = match event {
                Event::PoolUp { peer, connections } => {
                    (atoms::pool_up(), node_atom(env, &peer), connections).encode(env)
                }
                Event::PoolDown {
                    peer,
                    reason,
                    dropped_messages,
                } => (
                    atoms::pool_down(),
                    node_atom(env, &peer),
                    crate::reason_term(env, reason.class(), reason.detail()),
                    dropped_messages,
                )
                    .encode(env),
                Event::InboundUp { peer } => (atoms::inbound_up(), node_atom(env, &peer)).encode(env),
                Event::InboundDown { peer, reason } => {
                    let reason = crate::reason_term(env, reason.class(), reason.detail());
                    (atoms::inbound_down(), node_atom(env, &peer), reason).encode(env)
                }
                Event::HandshakeFailed {
                    remote,
                    reason,
                    detail,
                    unreported,
                } => (
                    atoms::handshake_failed(),
                    remote,
                    atoms::name_term(env, reason),
                    detail,
                    unreported,
                )
                    .encode(env),
                Event::Undeliverable { peer, reason, total } => (
                    atoms::undeliverable(),
                    node_atom(env, &peer),
                    atoms::name_term(env, reason.name()),
                    total,
                )
                    .encode(env),
                Event::AcceptFailed {
                    reason,
                    count_since_last,
                } => (
                    atoms::accept_failed(),
                    atoms::name_term(env, reason),
                    count_since_last,
                )
                    .encode(env),
                Event::Panic { thread, message } => (atoms::panic(), thread, message).encode(env),
            };
            (atoms::teleport_event(), body).encode(env)
        });
    }
}
