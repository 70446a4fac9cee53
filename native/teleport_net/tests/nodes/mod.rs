//! Runtimes for the integration tests (`pool.rs`, `tls.rs`): a test host that records
//! frames and events, with knobs for slow, failing or deferring handlers, and a `Node`
//! (runtime and host) stopped on drop. Every wait is bounded by `WAIT`.
// Each test binary uses only some of it.
#![allow(dead_code)]

use std::any::Any;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use teleport_net::{
    BodyBuffer, Config, Deferral, Delivery, Event, FrameHandler, FrameKind, Host, Malformed, OpenError,
    OpenStatus, Outcome, PeerStatsSnapshot, Runtime, SendError, Sent, Undeliverable,
};

pub const COOKIE: &[u8] = b"integration-cookie";
/// Upper bound for anything that should happen "soon"; only reached when a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Frame {
    pub peer: String,
    pub kind: FrameKind,
    pub body: Vec<u8>,
}

#[derive(Default)]
pub struct Log {
    pub frames: Vec<Frame>,
    pub events: Vec<Event>,
    /// Frames whose body was `defer`: their handler deferred them (`Delivery::Deferred`).
    pub deferred: Vec<teleport_net::Resume>,
    /// Bodies read into a buffer of the handler's own (`TestHost::with_own_buffers`).
    pub owned: usize,
}

#[derive(Default)]
struct HostState {
    log: Mutex<Log>,
    changed: Condvar,
    /// Each handler sleeps this long per frame (0: not at all); may change mid-test.
    delay_ms: AtomicU64,
    /// Large bodies go to the handler's own buffers (`FrameHandler::body_buffer`).
    own_buffers: bool,
}

#[derive(Clone, Default)]
pub struct TestHost(Arc<HostState>);

impl TestHost {
    /// A host whose handlers read large bodies into buffers of their own, as the NIF's do.
    pub fn with_own_buffers() -> TestHost {
        TestHost(Arc::new(HostState {
            own_buffers: true,
            ..HostState::default()
        }))
    }

    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.0.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, update: impl FnOnce(&mut Log)) {
        update(&mut self.log());
        self.0.changed.notify_all();
    }

    pub fn set_delay(&self, delay: Duration) {
        self.0.delay_ms.store(delay.as_millis() as u64, SeqCst);
    }

    /// Waits until `done` holds for the log; false on timeout.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&Log) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut log = self.log();
        loop {
            if done(&log) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            log = self
                .0
                .changed
                .wait_timeout(log, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn count_events(&self, matches: impl Fn(&Event) -> bool) -> usize {
        self.log().events.iter().filter(|e| matches(e)).count()
    }

    pub fn wait_for_event(&self, matches: impl Fn(&Event) -> bool) -> bool {
        self.wait_for(WAIT, |log| log.events.iter().any(&matches))
    }

    pub fn frames_from(&self, peer: &str) -> usize {
        self.log().frames.iter().filter(|f| f.peer == peer).count()
    }

    pub fn events_debug(&self) -> String {
        format!("{:#?}", self.log().events)
    }
}

impl Host for TestHost {
    fn frame_handler(&self, peer: &str) -> Box<dyn FrameHandler> {
        Box::new(TestHandler {
            host: self.clone(),
            peer: peer.to_string(),
        })
    }

    fn event(&self, event: Event) {
        self.record(|log| log.events.push(event));
    }
}

struct TestHandler {
    host: TestHost,
    peer: String,
}

/// A body buffer of the handler's own.
struct Owned(Vec<u8>);

impl BodyBuffer for Owned {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl FrameHandler for TestHandler {
    fn handle(&mut self, kind: FrameKind, body: &[u8], deferral: &Deferral) -> Outcome {
        let delay = self.host.0.delay_ms.load(SeqCst);
        if delay > 0 {
            thread::sleep(Duration::from_millis(delay));
        }
        match body {
            b"poison" => return Err(Malformed("poisoned frame".to_string())),
            b"nobody" => return Ok(Delivery::Undeliverable(Undeliverable::Noproc)),
            b"panic!" => panic!("handler panicked on purpose"),
            _ => {}
        }
        let frame = Frame {
            peer: self.peer.clone(),
            kind,
            body: body.to_vec(),
        };
        if body == b"defer" {
            let resume = deferral.defer();
            self.host.record(|log| {
                log.frames.push(frame);
                log.deferred.push(resume);
            });
            return Ok(Delivery::Deferred);
        }
        self.host.record(|log| log.frames.push(frame));
        Ok(Delivery::Delivered)
    }

    fn body_buffer(&mut self, len: usize) -> Result<Option<Box<dyn BodyBuffer>>, Malformed> {
        Ok(self
            .host
            .0
            .own_buffers
            .then(|| Box::new(Owned(vec![0; len])) as Box<dyn BodyBuffer>))
    }

    fn handle_owned(&mut self, kind: FrameKind, body: Box<dyn BodyBuffer>, _deferral: &Deferral) -> Outcome {
        let body = body
            .into_any()
            .downcast::<Owned>()
            .map_err(|_| Malformed("not ours".to_string()))?
            .0;
        let frame = Frame {
            peer: self.peer.clone(),
            kind,
            body,
        };
        self.host.record(|log| {
            log.frames.push(frame);
            log.owned += 1;
        });
        Ok(Delivery::Delivered)
    }
}

// ---------------------------------------------------------------------------
// Nodes: a runtime and its host, stopped on drop.

pub struct Node {
    pub rt: Runtime,
    pub host: TestHost,
}

impl Node {
    pub fn start(name: &str) -> Node {
        Node::start_with(name, |_| {})
    }

    pub fn start_with(name: &str, configure: impl FnOnce(&mut Config)) -> Node {
        Node::start_hosted(name, TestHost::default(), configure)
    }

    pub fn start_hosted(name: &str, host: TestHost, configure: impl FnOnce(&mut Config)) -> Node {
        let mut config = Config::for_tests(name, COOKIE);
        configure(&mut config);
        let rt = Runtime::start(config, Arc::new(host.clone())).expect("runtime starts");
        Node { rt, host }
    }

    pub fn addr(&self) -> SocketAddr {
        self.rt.local_addr()
    }

    pub fn name(&self) -> &str {
        &self.rt.config().local_node
    }

    /// Opens a pool to `peer` under the name `as_name` and waits for the outcome.
    pub fn open_as(&self, as_name: &str, peer: &Node, size: usize) -> Result<(), OpenError> {
        open_to(&self.rt, as_name, peer.addr(), size)
    }

    pub fn open(&self, peer: &Node, size: usize) -> Result<(), OpenError> {
        self.open_as(peer.name(), peer, size)
    }

    pub fn send(&self, peer: &str, key: u64, body: Vec<u8>) -> Result<Sent, SendError> {
        send_bytes(&self.rt, peer, key, body)
    }

    pub fn stats_for(&self, peer: &str) -> PeerStatsSnapshot {
        stats_for(&self.rt, peer)
    }

    /// Inbound handshakes the listener refused.
    pub fn failures(&self) -> u64 {
        self.rt.listener_stats().handshake_failures
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.rt.stop();
    }
}

pub fn open_to(rt: &Runtime, peer: &str, addr: SocketAddr, size: usize) -> Result<(), OpenError> {
    let (tx, rx) = mpsc::channel();
    match rt.open_pool(peer, addr, size, Box::new(move |r| drop(tx.send(r)))) {
        OpenStatus::AlreadyUp => Ok(()),
        OpenStatus::Opening => rx.recv_timeout(WAIT).expect("open_pool callback runs"),
    }
}

pub fn send_bytes(rt: &Runtime, peer: &str, key: u64, body: Vec<u8>) -> Result<Sent, SendError> {
    let frame = rt.frame(FrameKind::Send, Box::new(body))?;
    rt.send(peer, key, frame)
}

pub fn stats_for(rt: &Runtime, peer: &str) -> PeerStatsSnapshot {
    rt.stats()
        .into_iter()
        .find(|(p, _)| p == peer)
        .map(|(_, s)| s)
        .unwrap_or_default()
}

/// Polls `done` every few milliseconds; false on timeout.
pub fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// True once the peer has closed `stream` (EOF or reset) within `timeout`.
pub fn closed_by_peer_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).expect("set timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// A TCP connection from the loopback address `source` (bound before connecting).
pub fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from = SocketAddr::from((source, 0));
    socket
        .bind(&from.into())
        .expect("bind to a loopback source address");
    socket.connect_timeout(&to.into(), WAIT).expect("connect");
    socket.into()
}
