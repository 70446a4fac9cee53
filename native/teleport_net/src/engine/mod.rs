//! The I/O engine: a fixed number of threads, each driving many non-blocking sockets
//! through the OS readiness API (mio: epoll on Linux, kqueue on macOS and BSD), and
//! one more, the handshake thread, for the listener and the inbound handshakes. A
//! connection lives on one thread at a time, in that thread's slab; the slab index is
//! its mio token, so "who owns this socket" is "the thread whose slab holds it". Other
//! threads reach a connection only by message (`Command`), except a sender's direct
//! write, which `SendQueue` serialises with the I/O thread.
//!
//! Files, in the order a connection lives: `mod.rs` (threads, commands, what they
//! share), `worker.rs` (one thread's loop), `conn.rs` (one connection's state machine:
//! connecting, handshaking, open; and how each ends).
//!
//! The life of an outbound connection: `Runtime::open_pool` registers the pool
//! (`Pools::open`) and `Engine::dial` sends `Command::Dial` for its first slots (at most
//! `DIAL_PARALLELISM` at once) to threads in turn. The thread connects without blocking
//! (`Connecting`, until `connect_timeout`), sends the HELLO once the socket is writable
//! (`ClientHandshake`, until `handshake_timeout`), and when the cookie proofs are done
//! announces the pool's token and becomes `Outbound`, with a `SendQueue` that senders
//! write to; `Pool::joined` then has the next slot dialed, or the pool published
//! (`PoolUp`). Senders write small frames directly when nothing is queued; otherwise
//! they queue and send `Command::Flush`, and the thread writes until the socket is full
//! and then waits for it to be writable. Any member's end closes its whole pool
//! (`Pools::close`: each connection is shut down and sent `Command::Close`); each
//! member's `PoolMember` guard counts the frames its connection never wrote, and the
//! last one reports `PoolDown`.
//!
//! The life of an inbound connection: the listener, on the handshake thread, accepts
//! it if its source has not failed too many handshakes lately
//! (`max_handshake_failures_per_ip`) and it gets a handshake slot
//! (`max_pending_handshakes`, per source too); `ServerHandshake` there until
//! `handshake_timeout`; once authenticated, `Command::Authenticated` hands it to an I/O
//! thread in turn, where it becomes `Inbound`, whose first frame names the sender's pool
//! (`InboundPools::join`) and whose later frames go to the host's `FrameHandler`. A
//! frame the handler defers pauses that connection alone until its `Resume` reports
//! (`Command::Resume`). So a flood of connections, however fast, costs the I/O threads
//! nothing: the handshake thread (at a lower priority) and the kernel take it.

mod conn;
mod worker;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpListener;
use mio::{Poll, Waker};

use crate::config::Config;
use crate::faults;
use crate::host::{Event, Host, Outcome, ResumeTarget};
use crate::inbound_pools::InboundPools;
use crate::io_slot::{IoThread, Slot};
use crate::listener::ListenerState;
use crate::pool::{Pool, PoolToken, Pools, DIAL_PARALLELISM, POOL_TOKEN_LEN};
use crate::stats::PeerStatsTable;
use crate::tls::TlsContext;

use conn::{Conn, PoolMember};
use worker::Worker;

/// What the engine's threads and the runtime share, each part owned by its module.
pub(crate) struct Services {
    pub config: Config,
    pub host: Arc<dyn Host>,
    pub stats: PeerStatsTable,
    pub pools: Pools,
    pub inbound: Arc<InboundPools>,
    pub listener: Arc<ListenerState>,
    /// TLS on every connection, if configured.
    pub tls: Option<TlsContext>,
    stopping: AtomicBool,
    /// Random per runtime, so a restarted node's pools are told from the old ones.
    incarnation: u64,
    next_pool_epoch: AtomicU64,
}

impl Services {
    pub fn new(config: Config, host: Arc<dyn Host>) -> io::Result<Services> {
        let mut incarnation = [0u8; 8];
        getrandom::getrandom(&mut incarnation).map_err(|e| io::Error::other(e.to_string()))?;
        let listener = Arc::new(ListenerState::new(
            config.max_pending_handshakes,
            config.max_pending_handshakes_per_ip,
            config.max_handshake_failures_per_ip,
        ));
        let tls = match &config.tls {
            Some(tls) => Some(
                TlsContext::load(tls)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("tls: {e}")))?,
            ),
            None => None,
        };
        Ok(Services {
            tls,
            config,
            host,
            stats: PeerStatsTable::default(),
            pools: Pools::default(),
            inbound: Arc::default(),
            listener,
            stopping: AtomicBool::new(false),
            incarnation: u64::from_ne_bytes(incarnation),
            next_pool_epoch: AtomicU64::new(1),
        })
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(SeqCst)
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, SeqCst);
    }

    /// The token every connection of a new pool announces first.
    pub fn new_pool_token(&self) -> PoolToken {
        let epoch = self.next_pool_epoch.fetch_add(1, SeqCst);
        let mut token = [0u8; POOL_TOKEN_LEN];
        token[..8].copy_from_slice(&self.incarnation.to_be_bytes());
        token[8..].copy_from_slice(&epoch.to_be_bytes());
        token
    }

    pub(crate) fn report_panic(&self, thread: &str, panic: &(dyn std::any::Any + Send)) {
        let message = panic_message(panic);
        self.host.event(Event::Panic {
            thread: thread.to_string(),
            message,
        });
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_string())
}

/// What other threads ask an I/O thread.
enum Command {
    /// Dial one connection of a pool being opened.
    Dial(PoolMember),
    /// An inbound connection the handshake thread authenticated, to serve.
    Authenticated(Box<Conn>),
    /// Frames were queued on an outbound connection.
    Flush(Slot),
    /// The connection's pool is closing.
    Close(Slot),
    /// A deferred frame's outcome.
    Resume(Slot, Outcome),
    /// Close everything and exit.
    Stop,
}

/// One I/O thread as others see it: its command queue and the waker of its poll.
pub(crate) struct ThreadHandle {
    commands: Sender<Command>,
    waker: Waker,
}

impl ThreadHandle {
    /// Queues `command` and wakes the thread. A thread that has exited drops it, which
    /// runs its cleanup (a dial's callers hear it failed) on the caller's thread.
    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

impl IoThread for ThreadHandle {
    fn flush(&self, slot: Slot) {
        self.send(Command::Flush(slot));
    }

    fn close(&self, slot: Slot) {
        self.send(Command::Close(slot));
    }
}

impl ResumeTarget for ThreadHandle {
    fn resume(&self, slot: Slot, outcome: Outcome) {
        self.send(Command::Resume(slot, outcome));
    }
}

/// Every I/O thread's handle; new work goes round-robin.
pub(crate) struct Threads {
    handles: Vec<Arc<ThreadHandle>>,
    next: AtomicUsize,
}

impl Threads {
    fn pick(&self) -> &Arc<ThreadHandle> {
        let next = self.next.fetch_add(1, SeqCst);
        &self.handles[next % self.handles.len()]
    }

    /// Starts dialing `pool`'s next `n` slots, each on the next thread.
    pub(crate) fn dial(&self, services: &Arc<Services>, self_arc: &Arc<Threads>, pool: &Arc<Pool>, n: usize) {
        for _ in 0..n {
            let Some(index) = pool.next_slot() else { return };
            let member = PoolMember::new(services, self_arc, pool, index);
            self.pick().send(Command::Dial(member));
        }
    }
}

pub(crate) struct Engine {
    threads: Arc<Threads>,
    handshakes: Arc<ThreadHandle>,
    joins: Mutex<Vec<JoinHandle<()>>>,
}

/// What an engine thread's loop waits on: its poll and its command queue.
type ThreadInbox = (Poll, Receiver<Command>);

/// A thread's inbox, and the handle others reach it by.
fn new_thread() -> io::Result<(ThreadInbox, Arc<ThreadHandle>)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), worker::WAKER)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    Ok(((poll, rx), Arc::new(ThreadHandle { commands: tx, waker })))
}

impl Engine {
    /// Starts `count` I/O threads and the handshake thread, which accepts on `listener`.
    pub fn start(services: &Arc<Services>, count: usize, listener: TcpListener) -> io::Result<Engine> {
        let count = count.max(1);
        let mut polls = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for _ in 0..count {
            let (poll, handle) = new_thread()?;
            handles.push(handle);
            polls.push(poll);
        }
        let threads = Arc::new(Threads {
            handles,
            next: AtomicUsize::new(0),
        });
        let (handshake_poll, handshakes) = new_thread()?;
        let engine = Engine {
            threads: threads.clone(),
            handshakes: handshakes.clone(),
            joins: Mutex::new(Vec::new()),
        };
        let node = &services.config.local_node;
        let io_threads = polls.into_iter().enumerate().map(|(index, poll)| {
            let handle = threads.handles[index].clone();
            (format!("teleport-io{index}-{node}"), poll, handle, None)
        });
        let handshake_thread = (
            format!("teleport-hs-{node}"),
            handshake_poll,
            handshakes,
            Some(listener),
        );
        for (name, (poll, rx), handle, listener) in io_threads.chain([handshake_thread]) {
            let worker = Worker::new(
                name.clone(),
                poll,
                rx,
                handle,
                services.clone(),
                threads.clone(),
                listener,
            )?;
            let spawned = if faults::spawn_fails(&name) {
                Err(io::Error::other("injected fault"))
            } else {
                std::thread::Builder::new()
                    .name(name.chars().take(15).collect())
                    .spawn(move || worker.run())
            };
            match spawned {
                Ok(join) => engine.joins.lock().unwrap_or_else(|p| p.into_inner()).push(join),
                Err(e) => {
                    engine.stop();
                    return Err(io::Error::other(format!(
                        "could not start I/O thread {name}: {e}"
                    )));
                }
            }
        }
        Ok(engine)
    }

    /// Starts dialing a new pool: a few connections at a time, each next one once one
    /// is up, so the peer's per-source handshake cap is never hit by one pool.
    pub fn dial(&self, services: &Arc<Services>, pool: &Arc<Pool>) {
        let parallel = pool
            .size()
            .min(DIAL_PARALLELISM)
            .min(services.config.max_pending_handshakes_per_ip.max(1));
        self.threads.dial(services, &self.threads, pool, parallel);
    }

    /// Tells every thread to close everything and exit, and waits for them.
    pub fn stop(&self) {
        // The handshake thread first: it hands connections to the others.
        self.handshakes.send(Command::Stop);
        for handle in &self.threads.handles {
            handle.send(Command::Stop);
        }
        let joins = std::mem::take(&mut *self.joins.lock().unwrap_or_else(|p| p.into_inner()));
        for join in joins {
            let _ = join.join();
        }
    }

    /// Threads running, the handshake thread's included (for tests that check nothing
    /// leaks).
    pub fn live_threads(&self) -> usize {
        let joins = self.joins.lock().unwrap_or_else(|p| p.into_inner());
        joins.iter().filter(|t| !t.is_finished()).count()
    }
}
