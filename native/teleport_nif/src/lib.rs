//! NIF entry points of teleport (module `teleport_nif`). Thin: each decodes its
//! arguments, calls into `teleport_net::Runtime`, and encodes the answer.
//! Every entry here returns quickly: `stop` joins threads and so runs dirty, and
//! `send` and `encode` continue on a dirty scheduler when the term is too large to
//! encode within the inline budget (schedule.rs).

mod atoms;
mod decode;
mod deliver;
mod encoder;
mod events;
mod schedule;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::raw::c_char;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crossbeam_channel::Sender;
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, Error, NifResult, ResourceArc, Term};
use teleport_net::{
    Config, ConnDirection, ConnStatsSnapshot, Detail, FrameKind, IoThreadPriority, OpenError, OpenStatus,
    PeerStatsSnapshot, Runtime, SendError, Sent,
};

use crate::deliver::{DecodeTicket, Helpers};
use crate::encoder::{Limit, Stop};
use crate::events::{node_atom, post, EventPump, Job, NifHost};

/// The running node: at most one per VM, between `start` and `stop`.
struct Node {
    runtime: Runtime,
    pump: Mutex<EventPump>,
    jobs: Sender<Job>,
    /// The process that started it, and the monitor that stops it if that one dies.
    owner: LocalPid,
    _watch: ResourceArc<Owner>,
    /// Tells this runtime from earlier ones (`pool_generation`).
    generation: u64,
}

static GENERATIONS: AtomicU64 = AtomicU64::new(0);

static NODE: RwLock<Option<Arc<Node>>> = RwLock::new(None);
/// Held while a runtime starts or stops, so two never overlap (a new listener on
/// a fixed port would otherwise race the old one's close).
static LIFECYCLE: Mutex<()> = Mutex::new(());

fn node() -> Option<Arc<Node>> {
    NODE.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn map_get<'a, T: rustler::Decoder<'a>>(map: Term<'a>, key: &str) -> NifResult<T> {
    let key = Atom::from_str(map.get_env(), key)?;
    map.map_get(key.encode(map.get_env()))?.decode()
}

/// `disabled`, or the map teleport_runtime makes of the `tls` setting.
fn decode_tls(term: Term) -> NifResult<Option<teleport_net::TlsConfig>> {
    if term.is_atom() {
        return Ok(None);
    }
    let path = |key: &str| map_get::<String>(term, key).map(std::path::PathBuf::from);
    Ok(Some(teleport_net::TlsConfig {
        certfile: path("certfile")?,
        keyfile: path("keyfile")?,
        cacertfile: path("cacertfile")?,
        verify_peer: map_get(term, "verify_peer")?,
        server_name_check: map_get(term, "server_name_check")?,
        client_name_check: map_get(term, "client_name_check")?,
        ciphers: map_get(term, "ciphers")?,
    }))
}

/// The `sndbuf` setting: `auto`, `kernel` or a size in bytes.
fn decode_sndbuf(term: Term) -> NifResult<teleport_net::SendBuffer> {
    use teleport_net::SendBuffer;
    match term.decode::<Atom>() {
        Ok(a) if a == atoms::auto() => Ok(SendBuffer::Auto),
        Ok(a) if a == atoms::kernel() => Ok(SendBuffer::Kernel),
        Ok(_) => Err(Error::BadArg),
        Err(_) => term.decode().map(SendBuffer::Bytes),
    }
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

/// Calls `f` with an atom's text; without allocating when it is ASCII, as node names are.
fn with_atom_text<R>(atom: Term, f: impl FnOnce(&str) -> R) -> NifResult<R> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer holds the longest atom (255 characters) and its NUL.
    let n = unsafe {
        rustler::sys::enif_get_atom(
            atom.get_env().as_c_arg(),
            atom.as_c_arg(),
            buf.as_mut_ptr() as *mut c_char,
            buf.len() as _,
            rustler::sys::ErlNifCharEncoding::ERL_NIF_LATIN1,
        )
    };
    match n {
        n if n > 0 && buf[..n as usize - 1].is_ascii() => Ok(f(
            std::str::from_utf8(&buf[..n as usize - 1]).map_err(|_| Error::BadArg)?
        )),
        _ => Ok(f(&atom.atom_to_string()?)),
    }
}

/// Starts the listener. `Opts` is a map built and validated by teleport_config.
/// The calling process owns the runtime: if it dies without calling `stop`
/// (killed), the runtime stops by itself (`Owner::down`), and a `start` that
/// finds a runtime whose owner is gone stops that one first. Dirty: it may join
/// the threads of such a runtime.
#[rustler::nif(schedule = "DirtyIo")]
fn start<'a>(env: Env<'a>, opts: Term<'a>) -> NifResult<Term<'a>> {
    let _lifecycle = LIFECYCLE.lock().unwrap_or_else(|p| p.into_inner());
    if !take_and_stop(|node| !is_alive(env, node.owner)) && node().is_some() {
        return Ok((atoms::error(), atoms::already_started()).encode(env));
    }
    let config = Config {
        listen: SocketAddr::new(
            decode_ip(map_get(opts, "listen_ip")?)?,
            map_get(opts, "listen_port")?,
        ),
        io_threads: map_get(opts, "io_threads")?,
        local_node: map_get::<String>(opts, "local_node")?,
        cookie: map_get::<rustler::Binary>(opts, "cookie")?.as_slice().to_vec(),
        capabilities: encoder::capabilities(),
        max_frame_bytes: map_get(opts, "max_frame_bytes")?,
        send_queue_bytes: map_get(opts, "send_queue_bytes")?,
        sndbuf: decode_sndbuf(map_get(opts, "sndbuf")?)?,
        connect_timeout: Duration::from_millis(map_get(opts, "connect_timeout")?),
        handshake_timeout: Duration::from_millis(map_get(opts, "handshake_timeout")?),
        max_pending_handshakes: map_get(opts, "max_pending_handshakes")?,
        max_pending_handshakes_per_ip: map_get(opts, "max_pending_handshakes_per_ip")?,
        max_handshake_failures_per_ip: map_get(opts, "max_handshake_failures_per_ip")?,
        io_thread_priority: match map_get::<Atom>(opts, "io_thread_priority")? {
            p if p == atoms::normal() => IoThreadPriority::Normal,
            p if p == atoms::idle() => IoThreadPriority::Idle,
            _ => return Err(Error::BadArg),
        },
        reader_busy_wait: Duration::from_micros(map_get(opts, "reader_busy_wait_us")?),
        tls: decode_tls(map_get(opts, "tls")?)?,
    };
    let event_pid: LocalPid = map_get(opts, "event_pid")?;
    let helpers = Helpers {
        relays: map_get(opts, "call_relays")?,
        decoders: map_get(opts, "decoders")?,
        defer_hash_maps: defer_hash_maps(map_get(opts, "decode_on_scheduler")?)?,
        runtime: event_pid,
    };
    if helpers.relays.is_empty() || helpers.decoders.is_empty() {
        return Err(Error::BadArg);
    }
    let owner = env.pid();
    let watch = ResourceArc::new(Owner { pid: owner });
    if env.monitor(&watch, &owner).is_none() {
        return Ok((atoms::error(), atoms::noproc()).encode(env));
    }
    let (mut pump, jobs) = match EventPump::start() {
        Ok(started) => started,
        Err(e) => return Ok((atoms::error(), e.to_string()).encode(env)),
    };
    let host = Arc::new(NifHost::new(jobs.clone(), Arc::new(helpers)));
    match Runtime::start(config, host) {
        Ok(runtime) => {
            let addr = runtime.local_addr();
            *NODE.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Node {
                runtime,
                pump: Mutex::new(pump),
                jobs,
                owner,
                _watch: watch,
                generation: GENERATIONS.fetch_add(1, SeqCst) + 1,
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

/// `decode_on_scheduler`: `auto` defers where this VM cannot build such terms off a
/// scheduler; `always` everywhere, so tests run that path on every release. Whether a
/// build takes `always` is teleport_config's to say (it asks `test_hooks/0`).
fn defer_hash_maps(value: Atom) -> NifResult<bool> {
    match value {
        v if v == atoms::auto() => Ok(encoder::large_map_bug()),
        v if v == atoms::always() => Ok(true),
        _ => Err(Error::BadArg),
    }
}

/// Whether this NIF was built with the cargo feature `test-hooks` (teleport's own tests).
#[rustler::nif]
fn test_hooks() -> bool {
    cfg!(feature = "test-hooks")
}

/// Closes the listener and every connection, and joins every thread.
#[rustler::nif(schedule = "DirtyIo")]
fn stop() -> Atom {
    let _lifecycle = LIFECYCLE.lock().unwrap_or_else(|p| p.into_inner());
    take_and_stop(|_| true);
    atoms::ok()
}

/// Takes the running node out of `NODE` if `which` says so, and stops it; true if it
/// did. Call with `LIFECYCLE` held.
fn take_and_stop(which: impl FnOnce(&Node) -> bool) -> bool {
    let taken = {
        let mut slot = NODE.write().unwrap_or_else(|p| p.into_inner());
        match slot.as_deref() {
            Some(node) if which(node) => slot.take(),
            _ => None,
        }
    };
    match taken {
        Some(node) => {
            stop_node(node);
            true
        }
        None => false,
    }
}

/// Stops a runtime already taken out of `NODE`.
fn stop_node(node: Arc<Node>) {
    node.runtime.stop();
    // The pump ends when the last sender is gone: ours, and the host's inside the runtime.
    let Node {
        runtime, pump, jobs, ..
    } = match Arc::try_unwrap(node) {
        Ok(node) => node,
        // A NIF call still holds it: it finishes quickly; the threads are already joined.
        Err(_) => return,
    };
    drop(runtime);
    drop(jobs);
    pump.lock().unwrap_or_else(|p| p.into_inner()).stop();
}

fn is_alive(env: Env, pid: LocalPid) -> bool {
    // SAFETY: a NIF's env, on the scheduler that runs the NIF.
    unsafe { rustler::sys::enif_is_process_alive(env.as_c_arg(), pid.as_c_arg()) != 0 }
}

/// Watches the process that started the runtime (teleport_runtime).
struct Owner {
    pid: LocalPid,
}

#[rustler::resource_impl]
impl rustler::Resource for Owner {
    const IMPLEMENTS_DOWN: bool = true;

    /// The owner died without `stop` (killed): stop its runtime, so no listener or
    /// connection outlives it. Off the scheduler, as stopping joins threads.
    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: rustler::Monitor) {
        let owner = self.pid;
        let _ = std::thread::Builder::new()
            .name("teleport-orphan".into())
            .spawn(move || {
                let _ = std::panic::catch_unwind(|| {
                    let _lifecycle = LIFECYCLE.lock().unwrap_or_else(|p| p.into_inner());
                    take_and_stop(|node| node.owner == owner)
                });
            });
    }
}

/// Decodes and delivers a frame an I/O thread could not (deliver.rs), on a
/// dirty scheduler; called by teleport_decoder with what a connection's I/O thread handed it.
#[rustler::nif(schedule = "DirtyCpu")]
fn deliver_frame<'a>(env: Env<'a>, ticket: ResourceArc<DecodeTicket>, frame: rustler::Binary<'a>) -> Atom {
    ticket.run(env, frame);
    atoms::ok()
}

/// This node's pool to `peer`, as its connections announce it (dialing or up), or
/// `none`: a peer asks before it lets a new pool of ours replace a live one.
#[rustler::nif]
fn pool_token<'a>(env: Env<'a>, peer: Atom) -> NifResult<Term<'a>> {
    let Some(node) = node() else {
        return Ok(atoms::none().encode(env));
    };
    let token = with_atom_text(peer.to_term(env), |name| node.runtime.pool_token(name))?;
    Ok(match token {
        Some(token) => {
            let mut bin = rustler::OwnedBinary::new(token.len());
            bin.as_mut_slice().copy_from_slice(&token);
            bin.release(env).encode(env)
        }
        None => atoms::none().encode(env),
    })
}

/// teleport_runtime's answer to `{teleport_confirm_pool, Peer, Token, Ticket}`.
#[rustler::nif]
fn confirm_pool(ticket: ResourceArc<events::PoolTicket>, confirmed: bool) -> Atom {
    ticket.answer(confirmed);
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
/// goes to `notify` when it is up or has failed, Reason as `open_error_term` makes it.
#[rustler::nif]
fn open_pool(env: Env, peer: Atom, ip: Term, port: u16, size: usize, notify: LocalPid) -> NifResult<Atom> {
    let Some(node) = node() else {
        return Ok(atoms::not_started());
    };
    let addr = SocketAddr::new(decode_ip(ip)?, port);
    let jobs = node.jobs.clone();
    let done = Box::new(move |outcome: Result<(), OpenError>| {
        post(&jobs, notify, move |env| {
            let status = match outcome {
                Ok(()) => atoms::ok().encode(env),
                Err(e) => (atoms::error(), open_error_term(env, &e)).encode(env),
            };
            (atoms::teleport_pool(), peer, status).encode(env)
        })
    });
    let status = with_atom_text(peer.to_term(env), |name| {
        node.runtime.open_pool(name, addr, size, done)
    })?;
    Ok(match status {
        OpenStatus::Opening => atoms::opening(),
        OpenStatus::AlreadyUp => atoms::ok(),
    })
}

/// A failed open as a term to match: `stopping`, `{connect | handshake | io, Name}`
/// (e.g. `{connect, econnrefused}`, `{handshake, bad_cookie}`), `{handshake, {version,
/// Peer, Local}}` (protocol versions), or `{closed | internal, Text}` where the causes
/// have no fixed names.
fn open_error_term<'a>(env: Env<'a>, e: &OpenError) -> Term<'a> {
    reason_term(env, e.class(), e.detail())
}

/// A reason as a term: `Class`, `{Class, Name}` or `{Class, Text}`.
pub(crate) fn reason_term<'a>(env: Env<'a>, class: &str, detail: Detail) -> Term<'a> {
    let class = atoms::name_term(env, class);
    match detail {
        Detail::None => class,
        Detail::Name(name) => (class, atoms::name_term(env, name)).encode(env),
        Detail::Text(text) => (class, text).encode(env),
        Detail::Versions(peer, local) => (class, (atoms::version(), peer, local)).encode(env),
    }
}

/// Queues one message: encodes `msg` (the envelope teleport.erl builds) into a frame.
/// `key` picks the connection (the sender's pid hash keeps one sender on one socket).
/// Returns ok | suspend (queued; wait for `{teleport_resume, Peer}`) | not_connected | too_large,
/// or busy (nothing queued) when `nosuspend` is true and the connection is over its limit.
/// Encodes inline, or continues on a dirty scheduler when the message is large (schedule.rs).
#[rustler::nif]
fn send<'a>(
    env: Env<'a>,
    peer: Term<'a>,
    kind: Term<'a>,
    key: Term<'a>,
    nosuspend: Term<'a>,
    msg: Term<'a>,
) -> NifResult<Term<'a>> {
    send_with(env, &[peer, kind, key, nosuspend, msg], Limit::Inline)
}

schedule::continuation!(send_dirty, send_with);

fn send_with<'a>(env: Env<'a>, args: &[Term<'a>], limit: Limit) -> NifResult<Term<'a>> {
    let &[peer, kind, key, nosuspend, msg] = args else {
        return Err(Error::BadArg);
    };
    let kind = if kind == atoms::send().to_term(env) {
        FrameKind::Send
    } else if kind == atoms::call().to_term(env) {
        FrameKind::Call
    } else {
        return Err(Error::BadArg);
    };
    let (key, nosuspend): (u64, bool) = (key.decode()?, nosuspend.decode()?);
    let Some(node) = node() else {
        return Ok(atoms::not_connected().encode(env));
    };
    // Before encoding: a message for a node not connected yet comes back after the
    // connector has opened the pool, and is encoded once.
    let Some(conn) = with_atom_text(peer, |name| node.runtime.connection(name, key))? else {
        return Ok(atoms::not_connected().encode(env));
    };
    // SAFETY: the NIF's env, on its scheduler, and `msg` a term of it, as `encode` needs.
    let encoded = match unsafe { encoder::encode(env.as_c_arg(), msg.as_c_arg(), limit, true) } {
        Ok(encoded) => encoded,
        Err(Stop::OverBudget) => return Ok(schedule::reschedule(env, c"send", send_dirty, args)),
        Err(Stop::TooLarge) => return Ok(atoms::too_large().encode(env)),
    };
    schedule::account(env, &encoded, limit);
    // A term of a type the peer's release cannot build (a native record for a release
    // before 29) would only make it close the connection: refused here instead.
    if encoded.needs_release > conn.peer_capabilities().otp_release {
        return Ok(atoms::unsupported_by_peer().encode(env));
    }
    let frame = match node.runtime.frame(kind, Box::new(encoded.body)) {
        Ok(frame) => frame,
        Err(_) => return Ok(atoms::too_large().encode(env)),
    };
    let outcome = match node.runtime.send_on(conn, key, frame, nosuspend) {
        Ok(Sent::Queued) => atoms::ok(),
        Ok(Sent::OverLimit(conn)) => {
            let (jobs, caller) = (node.jobs.clone(), env.pid());
            let peer = Atom::from_term(peer)?;
            let wake = Box::new(move |()| {
                post(&jobs, caller, move |env| {
                    (atoms::teleport_resume(), peer).encode(env)
                })
            });
            if conn.wait_for_drain(key, wake) {
                atoms::suspend()
            } else {
                atoms::ok()
            }
        }
        Err(SendError::NotConnected) => atoms::not_connected(),
        Err(SendError::TooLarge) => atoms::too_large(),
        Err(SendError::Busy) => atoms::busy(),
    };
    Ok(outcome.encode(env))
}

/// `{Runtime, Opened, Closed}`: which runtime this is (a new one after every start) and
/// how often `peer`'s pool opened and closed in it; `none` if teleport is not running.
/// A caller compares two of these to learn whether a frame it queued may be lost.
#[rustler::nif]
fn pool_generation(env: Env, peer: Atom) -> NifResult<Term> {
    let Some(node) = node() else {
        return Ok(atoms::none().encode(env));
    };
    let (opened, closed) = with_atom_text(peer.to_term(env), |name| node.runtime.pool_changes(name))?;
    Ok((node.generation, opened, closed).encode(env))
}

/// Whether the connection `key` picks towards `peer` is over its queue limit now
/// (false if there is none): a sender suspended on it rechecks with this.
#[rustler::nif]
fn over_limit(env: Env, peer: Atom, key: u64) -> NifResult<bool> {
    let Some(node) = node() else { return Ok(false) };
    let conn = with_atom_text(peer.to_term(env), |name| node.runtime.connection(name, key))?;
    Ok(conn.is_some_and(|conn| conn.is_over_limit(key)))
}

/// Test-only: the next `count` messages the event pump would send are dropped.
#[cfg(feature = "test-hooks")]
#[rustler::nif]
fn debug_drop_events(count: u64) -> Atom {
    events::dropping::drop_next(count);
    atoms::ok()
}

#[rustler::nif]
fn close_pool(env: Env, peer: Atom) -> NifResult<Atom> {
    let Some(node) = node() else {
        return Ok(atoms::ok());
    };
    with_atom_text(peer.to_term(env), |name| node.runtime.close_pool(name))?;
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

/// Every peer's counters in one call: `#{Node => #{Counter => N, per_connection => [Conn]}}`
/// (the keys are documented in teleport.erl). Dirty: about a microsecond per connection,
/// so a large cluster could pass the 1 ms a normal scheduler allows.
#[rustler::nif(schedule = "DirtyCpu")]
fn stats(env: Env) -> NifResult<Term> {
    let mut out = Term::map_new(env);
    let Some(node) = node() else { return Ok(out) };
    for (peer, s) in node.runtime.stats() {
        out = out.map_put(node_atom(env, &peer), peer_stats_term(env, &s)?)?;
    }
    Ok(out)
}

fn peer_stats_term<'a>(env: Env<'a>, s: &PeerStatsSnapshot) -> NifResult<Term<'a>> {
    let connections = s
        .per_connection
        .iter()
        .map(|conn| conn_stats_term(env, conn))
        .collect::<NifResult<Vec<Term>>>()?;
    let mut pairs = counter_pairs(
        env,
        &[
            (atoms::messages_out(), s.messages_out),
            (atoms::bytes_out(), s.bytes_out),
            (atoms::messages_in(), s.messages_in),
            (atoms::bytes_in(), s.bytes_in),
            (atoms::connections(), s.connections),
            (atoms::queued_bytes(), s.queued_bytes),
            (atoms::partial_bytes(), s.partial_bytes),
            (atoms::dropped_out(), s.dropped_out),
            (atoms::undeliverable_in(), s.undeliverable_in),
            (atoms::connects(), s.connects),
            (atoms::disconnects(), s.disconnects),
            (atoms::handshake_failures(), s.handshake_failures),
        ],
    );
    pairs.push((atoms::per_connection().encode(env), connections.encode(env)));
    map_from_pairs(env, &pairs)
}

fn conn_stats_term<'a>(env: Env<'a>, c: &ConnStatsSnapshot) -> NifResult<Term<'a>> {
    let connected_ms = u64::try_from(c.age.as_millis()).unwrap_or(u64::MAX);
    let (direction, counters, index, send_buffer) = match c.direction {
        ConnDirection::Outbound {
            index,
            queued_bytes,
            send_buffer,
        } => (
            atoms::outbound(),
            vec![
                (atoms::messages_out(), c.messages),
                (atoms::bytes_out(), c.bytes),
                (atoms::queued_bytes(), queued_bytes),
            ],
            Some(index),
            send_buffer,
        ),
        ConnDirection::Inbound {
            undeliverable,
            partial_bytes,
        } => (
            atoms::inbound(),
            vec![
                (atoms::messages_in(), c.messages),
                (atoms::bytes_in(), c.bytes),
                (atoms::undeliverable_in(), undeliverable),
                (atoms::partial_bytes(), partial_bytes),
            ],
            None,
            None,
        ),
    };
    let mut pairs = counter_pairs(env, &counters);
    pairs.push((atoms::direction().encode(env), direction.encode(env)));
    if let Some(index) = index {
        pairs.push((atoms::index().encode(env), index.encode(env)));
    }
    if let Some(bytes) = send_buffer {
        pairs.push((atoms::send_buffer().encode(env), bytes.encode(env)));
    }
    pairs.extend([
        (atoms::local().encode(env), encode_addr(env, c.local)),
        (atoms::remote().encode(env), encode_addr(env, c.remote)),
        (atoms::connected_ms().encode(env), connected_ms.encode(env)),
    ]);
    map_from_pairs(env, &pairs)
}

fn counter_pairs<'a>(env: Env<'a>, counters: &[(Atom, u64)]) -> Vec<(Term<'a>, Term<'a>)> {
    counters
        .iter()
        .map(|(key, value)| (key.encode(env), value.encode(env)))
        .collect()
}

fn map_from_pairs<'a>(env: Env<'a>, pairs: &[(Term<'a>, Term<'a>)]) -> NifResult<Term<'a>> {
    let (keys, values): (Vec<Term>, Vec<Term>) = pairs.iter().copied().unzip();
    Term::map_from_arrays(env, &keys, &values)
}

fn encode_addr(env: Env, addr: SocketAddr) -> Term {
    (encode_ip(env, addr.ip()), addr.port()).encode(env)
}

/// The listener's counters: `#{handshake_failures, throttled_handshakes, pending_handshakes,
/// inbound_connections, accept_errors}`.
#[rustler::nif]
fn listener_stats(env: Env) -> NifResult<Term> {
    let Some(node) = node() else {
        return Ok(Term::map_new(env));
    };
    let s = node.runtime.listener_stats();
    let counters = [
        (atoms::handshake_failures(), s.handshake_failures),
        (atoms::throttled_handshakes(), s.throttled_handshakes),
        (atoms::pending_handshakes(), s.pending_handshakes),
        (atoms::inbound_connections(), s.inbound_connections),
        (atoms::accept_errors(), s.accept_errors),
    ];
    map_from_pairs(env, &counter_pairs(env, &counters))
}

/// Decodes an external term with teleport's receive-side decoder, as the I/O
/// threads do (large binaries become sub-binaries of `bin`). For tests and benchmarks
/// against `binary_to_term/1`; dirty, as its input can be any size.
#[rustler::nif(schedule = "DirtyCpu")]
fn decode<'a>(env: Env<'a>, bin: rustler::Binary<'a>) -> NifResult<Term<'a>> {
    let source = decode::Source {
        bytes: bin.as_slice(),
        binary: Some(bin.to_term(env).as_c_arg()),
    };
    // SAFETY: the NIF's env on its (dirty) scheduler; `source.binary` is `bin`'s term in
    // it, and `source.bytes` its bytes.
    match unsafe { decode::TermDecoder::default().decode(env.as_c_arg(), &source) } {
        // SAFETY: `term` was made in `env`.
        Ok(term) => Ok(unsafe { Term::new(env, term) }),
        Err(reason) => Ok((atoms::error(), reason.to_string()).encode(env)),
    }
}

/// Encodes a term as teleport sends it: an iolist whose `iolist_to_binary/1` is the
/// external term (binaries over 2 KiB appear as the original binaries, not copies).
/// For tests and benchmarks against `term_to_binary/1`; inline or dirty, like `send`.
#[rustler::nif]
fn encode<'a>(env: Env<'a>, term: Term<'a>) -> NifResult<Term<'a>> {
    encode_to_iolist::<false>(env, &[term], Limit::Inline)
}

/// `encode/1`, and how: `{Iolist, Work, inline | dirty}` (tests and the budget's calibration).
#[cfg(feature = "test-hooks")]
#[rustler::nif]
fn encode_measured<'a>(env: Env<'a>, term: Term<'a>) -> NifResult<Term<'a>> {
    encode_to_iolist::<true>(env, &[term], Limit::Inline)
}

schedule::continuation!(encode_dirty, encode_to_iolist::<false>);

#[cfg(feature = "test-hooks")]
schedule::continuation!(encode_measured_dirty, encode_to_iolist::<true>);

/// Goes on with `encode_to_iolist::<MEASURED>` on a dirty scheduler.
fn encode_on_dirty<'a, const MEASURED: bool>(env: Env<'a>, args: &[Term<'a>]) -> Term<'a> {
    #[cfg(feature = "test-hooks")]
    if MEASURED {
        return schedule::reschedule(env, c"encode_measured", encode_measured_dirty, args);
    }
    schedule::reschedule(env, c"encode", encode_dirty, args)
}

/// `MEASURED`: `encode_measured/1`'s result, else `encode/1`'s.
fn encode_to_iolist<'a, const MEASURED: bool>(
    env: Env<'a>,
    args: &[Term<'a>],
    limit: Limit,
) -> NifResult<Term<'a>> {
    let &[term] = args else {
        return Err(Error::BadArg);
    };
    // SAFETY: the NIF's env, on its scheduler, and `term` a term of it.
    match unsafe { encoder::encode(env.as_c_arg(), term.as_c_arg(), limit, false) } {
        Ok(encoded) => {
            schedule::account(env, &encoded, limit);
            let iolist = schedule::iolist(env, &encoded);
            if !MEASURED {
                return Ok(iolist);
            }
            let how = Atom::from_str(env, if limit == Limit::Inline { "inline" } else { "dirty" })?;
            Ok((iolist, encoded.work, how).encode(env))
        }
        Err(Stop::OverBudget) => Ok(encode_on_dirty::<MEASURED>(env, args)),
        Err(Stop::TooLarge) => Err(Error::RaiseAtom("system_limit")),
    }
}

rustler::init!("teleport_nif");
