//! NIF entry points of teleport (module `teleport_nif`). Thin: each decodes its
//! arguments, calls into `teleport_net::Runtime`, and encodes the answer.
//! Every entry here returns quickly; `stop` joins threads and so runs dirty.

mod atoms;
mod decode;
mod deliver;
mod encode;
mod events;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crossbeam_channel::Sender;
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, Error, NifResult, Term};
use teleport_net::{Config, FrameKind, OpenStatus, OutFrame, Runtime, SendError, Sent};

use crate::encode::IoVecBody;
use crate::events::{node_atom, post, EventPump, Job, NifHost};

/// The running node: at most one per VM, between `start` and `stop`.
struct Node {
    runtime: Runtime,
    pump: Mutex<EventPump>,
    jobs: Sender<Job>,
}

static NODE: RwLock<Option<Arc<Node>>> = RwLock::new(None);

fn node() -> Option<Arc<Node>> {
    NODE.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn map_get<'a, T: rustler::Decoder<'a>>(map: Term<'a>, key: &str) -> NifResult<T> {
    let key = Atom::from_str(map.get_env(), key)?;
    map.map_get(key.encode(map.get_env()))?.decode()
}

fn decode_ip(term: Term) -> NifResult<IpAddr> {
    if let Ok((a, b, c, d)) = term.decode::<(u8, u8, u8, u8)>() {
        return Ok(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
    }
    let parts = rustler::types::tuple::get_tuple(term)?;
    if parts.len() != 8 {
        return Err(Error::BadArg);
    }
    let mut words = [0u16; 8];
    for (word, part) in words.iter_mut().zip(parts) {
        *word = part.decode()?;
    }
    Ok(IpAddr::V6(Ipv6Addr::from(words)))
}

fn encode_ip<'a>(env: Env<'a>, ip: IpAddr) -> Term<'a> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            (a, b, c, d).encode(env)
        }
        IpAddr::V6(v6) => {
            let w = v6.segments();
            let terms: Vec<Term> = w.iter().map(|s| s.encode(env)).collect();
            rustler::types::tuple::make_tuple(env, &terms)
        }
    }
}

fn atom_text(atom: Atom, env: Env) -> NifResult<String> {
    atom.to_term(env).atom_to_string()
}

/// Starts the listener. `Opts` is a map built and validated by teleport_config.
#[rustler::nif]
fn start<'a>(env: Env<'a>, opts: Term<'a>) -> NifResult<Term<'a>> {
    let mut slot = NODE.write().unwrap_or_else(|p| p.into_inner());
    if slot.is_some() {
        return Ok((atoms::error(), atoms::already_started()).encode(env));
    }
    let config = Config {
        listen: SocketAddr::new(
            decode_ip(map_get(opts, "listen_ip")?)?,
            map_get(opts, "listen_port")?,
        ),
        local_node: map_get::<String>(opts, "local_node")?,
        cookie: map_get::<rustler::Binary>(opts, "cookie")?.as_slice().to_vec(),
        max_frame_bytes: map_get(opts, "max_frame_bytes")?,
        send_queue_bytes: map_get(opts, "send_queue_bytes")?,
        connect_timeout: Duration::from_millis(map_get(opts, "connect_timeout")?),
        handshake_timeout: Duration::from_millis(map_get(opts, "handshake_timeout")?),
        max_pending_handshakes: map_get(opts, "max_pending_handshakes")?,
        max_pending_handshakes_per_ip: map_get(opts, "max_pending_handshakes_per_ip")?,
    };
    let event_pid: LocalPid = map_get(opts, "event_pid")?;
    let relays: Vec<Atom> = map_get(opts, "reply_relays")?;
    if relays.is_empty() {
        return Err(Error::BadArg);
    }
    let (mut pump, jobs) = match EventPump::start() {
        Ok(started) => started,
        Err(e) => return Ok((atoms::error(), e.to_string()).encode(env)),
    };
    let host = Arc::new(NifHost::new(jobs.clone(), event_pid, Arc::new(relays)));
    match Runtime::start(config, host) {
        Ok(runtime) => {
            let addr = runtime.local_addr();
            *slot = Some(Arc::new(Node {
                runtime,
                pump: Mutex::new(pump),
                jobs,
            }));
            Ok((atoms::ok(), (encode_ip(env, addr.ip()), addr.port())).encode(env))
        }
        Err(e) => {
            drop(jobs);
            pump.stop();
            Ok((atoms::error(), e.to_string()).encode(env))
        }
    }
}

/// Closes the listener and every connection, and joins every thread.
#[rustler::nif(schedule = "DirtyIo")]
fn stop() -> Atom {
    let taken = NODE.write().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(node) = taken {
        node.runtime.stop();
        // The pump ends when the last sender is gone: ours, and the host's inside the runtime.
        let Node { runtime, pump, jobs } = match Arc::try_unwrap(node) {
            Ok(node) => node,
            // A NIF call still holds it: it finishes quickly; the threads are already joined.
            Err(_) => return atoms::ok(),
        };
        drop(runtime);
        drop(jobs);
        pump.lock().unwrap_or_else(|p| p.into_inner()).stop();
    }
    atoms::ok()
}

#[rustler::nif]
fn listen_address(env: Env) -> Term {
    match node() {
        Some(node) => {
            let addr = node.runtime.local_addr();
            (atoms::ok(), (encode_ip(env, addr.ip()), addr.port())).encode(env)
        }
        None => (atoms::error(), atoms::not_started()).encode(env),
    }
}

/// Starts opening the pool to `peer`; `{teleport_pool, Peer, ok | {error, Reason}}`
/// goes to `notify` when it is up or has failed.
#[rustler::nif]
fn open_pool(env: Env, peer: Atom, ip: Term, port: u16, size: usize, notify: LocalPid) -> NifResult<Atom> {
    let Some(node) = node() else {
        return Ok(atoms::not_started());
    };
    let addr = SocketAddr::new(decode_ip(ip)?, port);
    let name = atom_text(peer, env)?;
    let jobs = node.jobs.clone();
    let done = Box::new(move |outcome: Result<(), String>| {
        post(&jobs, notify, move |env| {
            let status = match outcome {
                Ok(()) => atoms::ok().encode(env),
                Err(reason) => (atoms::error(), reason).encode(env),
            };
            (atoms::teleport_pool(), peer, status).encode(env)
        })
    });
    Ok(match node.runtime.open_pool(&name, addr, size, done) {
        OpenStatus::Opening => atoms::opening(),
        OpenStatus::AlreadyUp => atoms::ok(),
    })
}

/// Queues one message. `body` is the list of binaries from `erlang:term_to_iovec/1`;
/// `key` picks the connection (the sender's pid hash keeps one sender on one socket).
/// Returns ok | suspend (queued; wait for `{teleport_resume, Peer}`) | not_connected | too_large,
/// or busy (nothing queued) when `nosuspend` is true and the connection is over its limit.
#[rustler::nif]
fn send<'a>(
    env: Env<'a>,
    peer: Atom,
    kind: Atom,
    key: u64,
    nosuspend: bool,
    body: Term<'a>,
) -> NifResult<Atom> {
    let Some(node) = node() else {
        return Ok(atoms::not_connected());
    };
    let kind = if kind == atoms::send() {
        FrameKind::Send
    } else if kind == atoms::call() {
        FrameKind::Call
    } else {
        return Err(Error::BadArg);
    };
    let body = IoVecBody::from_term(env, body).ok_or(Error::BadArg)?;
    let Some(frame) = OutFrame::new(kind, Box::new(body)) else {
        return Ok(atoms::too_large());
    };
    let name = atom_text(peer, env)?;
    let sent = if nosuspend {
        node.runtime.send_nosuspend(&name, key, frame)
    } else {
        node.runtime.send(&name, key, frame)
    };
    match sent {
        Ok(Sent::Queued) => Ok(atoms::ok()),
        Ok(Sent::OverLimit(conn)) => {
            let (jobs, caller) = (node.jobs.clone(), env.pid());
            let wake = Box::new(move |()| {
                post(&jobs, caller, move |env| {
                    (atoms::teleport_resume(), peer).encode(env)
                })
            });
            Ok(if conn.wait_for_drain(wake) {
                atoms::suspend()
            } else {
                atoms::ok()
            })
        }
        Err(SendError::NotConnected) => Ok(atoms::not_connected()),
        Err(SendError::TooLarge) => Ok(atoms::too_large()),
        Err(SendError::Busy) => Ok(atoms::busy()),
    }
}

#[rustler::nif]
fn close_pool(env: Env, peer: Atom) -> NifResult<Atom> {
    let Some(node) = node() else {
        return Ok(atoms::ok());
    };
    node.runtime
        .close_pool(&atom_text(peer, env)?, "closed by request");
    Ok(atoms::ok())
}

/// Peers whose pool is up.
#[rustler::nif]
fn peers(env: Env) -> Vec<Term> {
    match node() {
        Some(node) => node.runtime.peers().iter().map(|p| node_atom(env, p)).collect(),
        None => Vec::new(),
    }
}

#[rustler::nif]
fn stats(env: Env) -> NifResult<Term> {
    let mut out = Term::map_new(env);
    let Some(node) = node() else { return Ok(out) };
    for (peer, s) in node.runtime.stats() {
        let keys = [
            atoms::messages_out(),
            atoms::bytes_out(),
            atoms::messages_in(),
            atoms::bytes_in(),
            atoms::connections(),
            atoms::queued_bytes(),
            atoms::dropped_out(),
            atoms::undeliverable_in(),
            atoms::connects(),
            atoms::disconnects(),
            atoms::handshake_failures(),
        ];
        let values = [
            s.messages_out,
            s.bytes_out,
            s.messages_in,
            s.bytes_in,
            s.connections,
            s.queued_bytes,
            s.dropped_out,
            s.undeliverable_in,
            s.connects,
            s.disconnects,
            s.handshake_failures,
        ];
        let keys: Vec<Term> = keys.iter().map(|k| k.encode(env)).collect();
        let values: Vec<Term> = values.iter().map(|v| v.encode(env)).collect();
        let peer_map = Term::map_from_arrays(env, &keys, &values)?;
        out = out.map_put(node_atom(env, &peer), peer_map)?;
    }
    Ok(out)
}

/// The listener's counters: `#{handshake_failures, pending_handshakes, inbound_connections}`.
#[rustler::nif]
fn listener_stats(env: Env) -> NifResult<Term> {
    let Some(node) = node() else {
        return Ok(Term::map_new(env));
    };
    let s = node.runtime.listener_stats();
    let keys = [
        atoms::handshake_failures(),
        atoms::pending_handshakes(),
        atoms::inbound_connections(),
    ];
    let keys: Vec<Term> = keys.iter().map(|k| k.encode(env)).collect();
    let values: Vec<Term> = [s.handshake_failures, s.pending_handshakes, s.inbound_connections]
        .iter()
        .map(|v| v.encode(env))
        .collect();
    Term::map_from_arrays(env, &keys, &values)
}

/// Decodes an external term with teleport's receive-side decoder, as the reader
/// threads do (large binaries become sub-binaries of `bin`). For tests and benchmarks
/// against `binary_to_term/1`; dirty, as its input can be any size.
#[rustler::nif(schedule = "DirtyCpu")]
fn decode<'a>(env: Env<'a>, bin: rustler::Binary<'a>) -> NifResult<Term<'a>> {
    let source = decode::Source {
        bytes: bin.as_slice(),
        binary: Some(bin.to_term(env).as_c_arg()),
    };
    match unsafe { decode::TermDecoder::default().decode(env.as_c_arg(), &source) } {
        Ok(term) => Ok(unsafe { Term::new(env, term) }),
        Err(reason) => Ok((atoms::error(), reason).encode(env)),
    }
}

rustler::init!("teleport_nif");
