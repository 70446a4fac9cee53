//! One engine thread: a mio `Poll` and the slab of connections it serves. Each turn:
//! wait for readiness (or spin briefly first, see `Config::reader_busy_wait`), advance
//! the connections that are ready, run the commands other threads sent, serve again the
//! connections that had more than one turn's share, and expire handshakes.
//!
//! The I/O threads serve established connections and this node's own dials. The
//! handshake thread, the same loop with the listener, accepts and runs every inbound
//! handshake, and hands each connection that authenticates to an I/O thread: however
//! many connections the network throws at the listener, the I/O threads never spend
//! a moment on one that has not authenticated.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::error::{CloseReason, FrameRefusal, OpenError};
use crate::faults::{self, Point};
use crate::handshake::{Handshake, HandshakeError};
use crate::host::Deferral;
use crate::io_slot::{IoSlot, Slot};
use crate::listener::{Acceptor, HandshakeSlot, OpenSocket, RESTART_PAUSE};
use crate::thread_priority::IoThreadPriority;

use super::conn::{self, Conn, End, Next, PoolMember, State};
use super::{panic_message, Command, Services, ThreadHandle, Threads};

pub(super) const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(usize::MAX - 1);

/// How often deadlines (connect, handshake) and the acceptor's pause are checked while
/// any is pending.
const TICK: Duration = Duration::from_millis(50);

/// Nice levels the handshake thread runs below the I/O threads (see `Worker::run`).
const HANDSHAKE_NICE: i32 = 10;

/// How long an I/O thread works without sleeping before it offers its core to any
/// thread waiting for it. Bulk keeps an I/O thread busy for milliseconds; on a kernel
/// without preemption of running threads (the common `PREEMPT_NONE` server build), a
/// woken scheduler on the same core otherwise waits for the next tick (4 ms at 250 Hz).
const YIELD_AFTER: Duration = Duration::from_micros(200);

pub(super) struct Worker {
    name: String,
    poll: Poll,
    commands: Receiver<Command>,
    handle: Arc<ThreadHandle>,
    services: Arc<Services>,
    threads: Arc<Threads>,
    conns: Slab<Conn>,
    next_id: u64,
    /// The handshake thread's; the I/O threads have none.
    acceptor: Option<Acceptor>,
    /// Connections to serve again next turn (more than a turn's share was waiting).
    again: VecDeque<Slot>,
    /// Whether a connection may hold a deadline (rechecked at each tick).
    timed: bool,
    next_tick: Instant,
    /// Whether the next wait spins first: the last wait was short and no bulk came since.
    spin_next: bool,
    bulk: bool,
    /// When the thread last slept or yielded (`offer_core`).
    working_since: Instant,
}

impl Worker {
    /// An I/O thread (`listener` none), or the handshake thread (with the listener).
    pub(super) fn new(
        name: String,
        poll: Poll,
        commands: Receiver<Command>,
        handle: Arc<ThreadHandle>,
        services: Arc<Services>,
        threads: Arc<Threads>,
        listener: Option<mio::net::TcpListener>,
    ) -> io::Result<Worker> {
        let acceptor = match listener {
            Some(mut listener) => {
                poll.registry()
                    .register(&mut listener, LISTENER, Interest::READABLE)?;
                Some(Acceptor::new(
                    listener,
                    services.listener.clone(),
                    &services.config.local_node,
                ))
            }
            None => None,
        };
        Ok(Worker {
            name,
            poll,
            commands,
            handle,
            services,
            threads,
            conns: Slab::new(),
            next_id: 0,
            acceptor,
            again: VecDeque::new(),
            timed: false,
            next_tick: Instant::now(),
            spin_next: false,
            bulk: false,
            working_since: Instant::now(),
        })
    }

    /// The thread's body. A panic outside any one connection (a bug in the loop
    /// itself) is reported and the loop resumes: the connections are still fine.
    pub(super) fn run(mut self) {
        let _ = crate::thread_priority::apply_to_current_thread(self.services.config.io_thread_priority);
        if self.is_handshake_thread() && self.services.config.io_thread_priority == IoThreadPriority::Normal {
            // Under a flood the handshake thread is busy while the I/O threads wait
            // for their next message: the kernel then gives them the core first.
            let _ = crate::thread_priority::lower_current_thread(HANDSHAKE_NICE);
        }
        let mut events = Events::with_capacity(1024);
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.turn(&mut events))) {
                Ok(true) => {}
                Ok(false) => break,
                Err(panic) => {
                    self.services.report_panic(&self.name, &*panic);
                    std::thread::sleep(RESTART_PAUSE);
                }
            }
        }
        self.shut_down();
    }

    /// One turn; false once told to stop.
    fn turn(&mut self, events: &mut Events) -> bool {
        self.wait(events);
        let mut accepted = false;
        for event in events.iter() {
            match event.token() {
                WAKER => {}
                LISTENER => {
                    self.accept();
                    accepted = true;
                }
                Token(index) => {
                    let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                    let writable = event.is_writable() || event.is_write_closed() || event.is_error();
                    self.serve(index, None, readable, writable);
                }
            }
        }
        while let Ok(command) = self.commands.try_recv() {
            if !self.run_command(command) {
                return false;
            }
        }
        let again = std::mem::take(&mut self.again);
        for slot in again {
            self.serve(slot.index, Some(slot.id), true, true);
        }
        if !accepted && self.acceptor.as_ref().is_some_and(|a| a.more) {
            self.accept();
        }
        if self.bulk {
            self.bulk = false;
            self.spin_next = false;
        }
        if Instant::now() >= self.next_tick {
            self.tick();
        }
        true
    }

    fn is_handshake_thread(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Waits for readiness. After a short wait, it polls without sleeping for up to
    /// `reader_busy_wait` first, yielding the core to any thread that wants it: a
    /// message that arrives meanwhile is served without this thread being woken. The
    /// handshake thread never polls: no message waits on it.
    fn wait(&mut self, events: &mut Events) {
        let busy_wait = if self.is_handshake_thread() {
            Duration::ZERO
        } else {
            self.services.config.reader_busy_wait
        };
        let timeout = if !self.again.is_empty() || self.acceptor.as_ref().is_some_and(|a| a.more) {
            Some(Duration::ZERO)
        } else if self.timed || self.acceptor.as_ref().is_some_and(|a| a.paused_until.is_some()) {
            Some(TICK)
        } else {
            None
        };
        if self.spin_next && timeout != Some(Duration::ZERO) && !busy_wait.is_zero() {
            // Polling yields at every turn: the work that follows starts afresh.
            self.working_since = Instant::now();
            let start = Instant::now();
            while start.elapsed() < busy_wait {
                if self.poll_events(events, Some(Duration::ZERO)) && !events.is_empty() {
                    return;
                }
                if !self.commands.is_empty() {
                    return;
                }
                std::thread::yield_now();
            }
        }
        let start = Instant::now();
        self.poll_events(events, timeout);
        // A poll that could not sleep says nothing about the traffic.
        if timeout != Some(Duration::ZERO) {
            self.spin_next = start.elapsed() < busy_wait;
            self.working_since = Instant::now();
        }
    }

    /// Yields the core once the thread has worked `YIELD_AFTER` without a break, so a
    /// woken thread waiting for this core (a scheduler with a call to run) gets it
    /// between two connections' turns instead of at the next tick. Cheap when nobody
    /// waits: the kernel returns at once.
    fn offer_core(&mut self) {
        if self.working_since.elapsed() >= YIELD_AFTER {
            std::thread::yield_now();
            self.working_since = Instant::now();
        }
    }

    fn poll_events(&mut self, events: &mut Events, timeout: Option<Duration>) -> bool {
        match self.poll.poll(events, timeout) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                events.clear();
                false
            }
            Err(e) => {
                events.clear();
                panic!("poll failed: {e}");
            }
        }
    }

    /// Advances one connection; `id` (when given) must still match the slot's.
    fn serve(&mut self, index: usize, id: Option<u64>, readable: bool, writable: bool) {
        self.offer_core();
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if id.is_some_and(|id| id != conn.id) {
            return;
        }
        let slot = Slot { index, id: conn.id };
        let (services, handle) = (&self.services, &self.handle);
        let mut bulk = false;
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            step(conn, services, handle, slot, readable, writable, &mut bulk)
        }));
        // A step may have set a deadline (a large body under way): ticks check it.
        self.timed |= conn.deadline.is_some();
        self.bulk |= bulk;
        match stepped {
            Ok(Ok(Next::Wait)) => {}
            Ok(Ok(Next::Again)) => self.again.push_back(slot),
            Ok(Ok(Next::HandOver)) => self.hand_over(slot),
            Ok(Err(end)) => self.close(slot, end),
            Err(panic) => {
                self.services.report_panic(&self.name, &*panic);
                let why = CloseReason::Internal(format!("panicked: {}", panic_message(&*panic)));
                self.close(slot, End::Close(why));
            }
        }
    }

    /// Removes a connection, hands it how it ended and drops it (its guards report).
    fn close(&mut self, slot: Slot, end: End) {
        if self.conns.get(slot.index).is_none_or(|c| c.id != slot.id) {
            return;
        }
        let mut conn = self.conns.remove(slot.index);
        let fd = conn.socket.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        let services = &self.services;
        let ended = catch_unwind(AssertUnwindSafe(move || {
            conn.end(end, services);
            drop(conn);
        }));
        if let Err(panic) = ended {
            self.services.report_panic(&self.name, &*panic);
        }
    }

    /// Hands an authenticated connection to an I/O thread (from the handshake thread).
    /// If that thread has exited (stopping), the connection is dropped: closed.
    fn hand_over(&mut self, slot: Slot) {
        if self.conns.get(slot.index).is_none_or(|c| c.id != slot.id) {
            return;
        }
        let conn = self.conns.remove(slot.index);
        let fd = conn.socket.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        self.threads.pick().send(Command::Authenticated(Box::new(conn)));
    }

    /// Adds a socket to the slab and to the poll.
    fn insert(
        &mut self,
        socket: TcpStream,
        state: impl FnOnce() -> State,
        tls: Option<Box<crate::tls::Session>>,
        deadline: Instant,
    ) -> io::Result<Slot> {
        // Registered first, so a failure drops `state` unmade.
        let socket = Arc::new(socket);
        let slot = self.register(&socket)?;
        self.conns.insert(Conn {
            id: slot.id,
            socket,
            state: state(),
            deadline: Some(deadline),
            tls,
        });
        self.timed = true;
        Ok(slot)
    }

    /// Adds to the poll a socket about to take the slab's next slot.
    fn register(&mut self, socket: &TcpStream) -> io::Result<Slot> {
        let index = self.conns.vacant_key();
        let fd = socket.as_raw_fd();
        self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.next_id += 1;
        Ok(Slot {
            index,
            id: self.next_id,
        })
    }

    /// Takes over a connection the handshake thread authenticated, and starts reading
    /// its frames (some may be waiting already: no readiness event would tell).
    fn adopt(&mut self, mut conn: Box<Conn>) {
        let Ok(slot) = self.register(&conn.socket) else {
            // Dropped: closed, its socket count given back.
            return;
        };
        conn.id = slot.id;
        self.conns.insert(*conn);
        self.serve(slot.index, Some(slot.id), true, true);
    }

    /// False for `Stop`.
    fn run_command(&mut self, command: Command) -> bool {
        match command {
            Command::Dial(member) => self.dial(member),
            Command::Authenticated(conn) => self.adopt(conn),
            Command::Flush(slot) | Command::Close(slot) => self.serve(slot.index, Some(slot.id), false, true),
            Command::Resume(slot, outcome) => self.resume(slot, outcome),
            Command::Stop => return false,
        }
        true
    }

    fn dial(&mut self, mut member: PoolMember) {
        let services = self.services.clone();
        let dialed = catch_unwind(AssertUnwindSafe(|| {
            faults::check(Point::Dial, &member.pool.peer);
            if services.is_stopping() {
                return Err(OpenError::Stopping);
            }
            TcpStream::connect(member.pool.addr).map_err(|e| OpenError::connect(&e))
        }));
        let stream = match dialed {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return member.fail(error),
            Err(panic) => {
                self.services.report_panic(&self.name, &*panic);
                return member.fail(OpenError::Internal(format!(
                    "the dial panicked: {}",
                    panic_message(&*panic)
                )));
            }
        };
        let deadline = Instant::now() + services.config.connect_timeout;
        let open = OpenSocket::new(&services.listener);
        // On failure the closure is dropped unrun: `member` fails the dial as it drops.
        let mut member = Some(member);
        let inserted = self.insert(
            stream,
            || State::Connecting {
                member: member.take().expect("taken once"),
                _open: open,
            },
            None,
            deadline,
        );
        if let (Err(e), Some(mut member)) = (inserted, member) {
            member.fail(OpenError::io(&e));
        }
    }

    fn accepted(&mut self, stream: TcpStream, remote: std::net::SocketAddr, slot: HandshakeSlot) {
        let services = self.services.clone();
        let config = &services.config;
        let checked = catch_unwind(AssertUnwindSafe(|| {
            faults::delay(Point::Handshake, &config.local_node)
        }));
        let delay = match checked {
            Ok(delay) => delay,
            Err(panic) => {
                // The socket and the slot drop here: closed, counted, given back.
                self.services.report_panic(&self.name, &*panic);
                services
                    .listener
                    .handshake_failed(&*services.host, remote, "internal", String::new());
                return;
            }
        };
        let tls = match services.tls.as_ref().map(|tls| tls.server()) {
            Some(Ok(session)) => Some(Box::new(session)),
            Some(Err(_)) => {
                services
                    .listener
                    .handshake_failed(&*services.host, remote, "tls_error", String::new());
                return;
            }
            None => None,
        };
        let now = Instant::now();
        let open = OpenSocket::new(&services.listener);
        let _ = self.insert(
            stream,
            || State::ServerHandshake {
                handshake: Handshake::server(&config.cookie, &config.local_node, config.capabilities),
                remote,
                _slot: slot,
                open,
                not_before: delay.map(|d| now + d),
            },
            tls,
            now + config.handshake_timeout + delay.unwrap_or_default(),
        );
    }

    fn resume(&mut self, slot: Slot, outcome: crate::host::Outcome) {
        let Some(conn) = self.conns.get_mut(slot.index).filter(|c| c.id == slot.id) else {
            return;
        };
        let State::Inbound { inbound, .. } = &mut conn.state else {
            return;
        };
        match inbound.resume(outcome) {
            Ok(()) => self.serve(slot.index, Some(slot.id), true, false),
            Err(reason) => self.close(slot, End::Close(reason)),
        }
    }

    fn accept(&mut self) {
        let Some(acceptor) = self.acceptor.as_mut() else {
            return;
        };
        let mut accepted = Vec::new();
        let host = self.services.host.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            acceptor.accept_batch(&*host, |stream, remote, slot| {
                accepted.push((stream, remote, slot))
            })
        }));
        if let Err(panic) = outcome {
            // The listening socket is still fine: a dead acceptor would leave the node
            // bound but deaf. Resume after a pause, so a bug that panics on every
            // connection makes a few reports a second, not a busy loop.
            self.services.report_panic(&self.name, &*panic);
            acceptor.paused_until = Some(Instant::now() + RESTART_PAUSE);
        }
        for (stream, remote, slot) in accepted {
            self.accepted(stream, remote, slot);
        }
    }

    /// Expires deadlines, ends injected handshake delays, resumes a paused acceptor.
    fn tick(&mut self) {
        let now = Instant::now();
        self.next_tick = now + TICK;
        let mut expired = Vec::new();
        let mut timed = false;
        for (index, conn) in self.conns.iter() {
            let slot = Slot { index, id: conn.id };
            if let State::ServerHandshake {
                not_before: Some(t), ..
            } = conn.state
            {
                if now >= t {
                    self.again.push_back(slot);
                }
            }
            match conn.deadline {
                Some(deadline) if now >= deadline => expired.push((slot, timeout_end(&conn.state))),
                Some(_) => timed = true,
                None => {}
            }
        }
        self.timed = timed;
        for (slot, end) in expired {
            self.close(slot, end);
        }
        if self
            .acceptor
            .as_ref()
            .and_then(|a| a.paused_until)
            .is_some_and(|t| now >= t)
        {
            self.accept();
        }
    }

    /// Closes every connection and the listener, and fails the dials still queued.
    fn shut_down(&mut self) {
        let slots: Vec<Slot> = self
            .conns
            .iter()
            .map(|(index, c)| Slot { index, id: c.id })
            .collect();
        for slot in slots {
            self.close(slot, End::Close(CloseReason::Stopping));
        }
        self.acceptor = None;
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Dial(mut member) = command {
                member.fail(OpenError::Stopping);
            }
        }
    }
}

/// How a connection whose deadline passed ends.
fn timeout_end(state: &State) -> End {
    match state {
        State::Connecting { .. } => End::Dial(OpenError::connect(&io::ErrorKind::TimedOut.into())),
        State::ClientHandshake { .. } => End::Dial(OpenError::handshake(&HandshakeError::Timeout)),
        State::Inbound { .. } => End::Close(CloseReason::BadFrame(FrameRefusal::FrameTimeout)),
        _ => End::Handshake("timeout", String::new()),
    }
}

/// One connection's step for the readiness it got.
fn step(
    conn: &mut Conn,
    services: &Services,
    handle: &Arc<ThreadHandle>,
    slot: Slot,
    readable: bool,
    writable: bool,
    bulk: &mut bool,
) -> Result<Next, End> {
    let io = || IoSlot {
        thread: handle.clone(),
        slot,
    };
    // What TLS could not write before (handshake records, alerts, frames) goes out
    // once the socket takes it; a broken socket shows on the next read or flush.
    if writable && !matches!(conn.state, State::Connecting { .. }) {
        if let Some(tls) = conn.tls.as_mut() {
            let _ = tls.push(&conn.socket);
        }
    }
    match &conn.state {
        State::Connecting { .. } => conn::connected(conn, services),
        State::ClientHandshake { .. } if readable => conn::client_handshake(conn, services, io()),
        State::ServerHandshake { .. } if readable => conn::server_handshake(conn, services),
        State::Authenticated { .. } => {
            let deferral = Deferral {
                target: handle.clone(),
                slot,
            };
            conn::start_inbound(conn, services, deferral)
        }
        State::Outbound { .. } => {
            if readable {
                conn::outbound_readable(conn)?;
            }
            if writable {
                conn::outbound_flush(conn, bulk)
            } else {
                Ok(Next::Wait)
            }
        }
        State::Inbound { .. } if readable => {
            let (next, was_bulk) = conn::inbound_read(conn)?;
            *bulk |= was_bulk;
            Ok(next)
        }
        _ => Ok(Next::Wait),
    }
}
