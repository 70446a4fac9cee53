//! One inbound connection: the server side of the handshake, then a reader
//! that parses frames and hands them to the host for delivery.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::faults::{self, Point};
use crate::framing::{read_header, FrameHeader, FrameKind};
use crate::handshake::{server_handshake, HandshakeConfig, HandshakeError};
use crate::host::{Delivery, Event};
use crate::listener::HandshakeSlot;
use crate::runtime::{ended_early, PoolToken, Shared, TrackedSocket, POOL_TOKEN_LEN};
use crate::stats::{ConnStats, PeerStats};
use std::io::{self, BufReader, Read};

/// At most one Undeliverable event per connection per this interval; the counter has every one.
const UNDELIVERABLE_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// An inbound connection's thread. Whatever it holds (its handshake slot, its place
/// in `stop`'s sockets and in its peer's inbound pool, the socket) is released on drop,
/// so a panic anywhere in it leaves nothing counted.
pub(crate) fn run_inbound(shared: &Arc<Shared>, stream: TcpStream, remote: SocketAddr, slot: HandshakeSlot) {
    faults::check(Point::Handshake, &shared.config.local_node);
    let handshake = HandshakeConfig {
        cookie: &shared.config.cookie,
        local_node: &shared.config.local_node,
        timeout: shared.config.handshake_timeout,
    };
    let tracked = shared.track_socket(&stream);
    let outcome = match &tracked {
        Some(_) => server_handshake(&stream, &handshake),
        None => Err(HandshakeError::Io(std::io::ErrorKind::Interrupted.into())),
    };
    drop(slot);
    let peer = match outcome {
        Ok(peer) => peer,
        Err(_) if tracked.is_none() => return, // stopping
        Err(e) => {
            shared.handshake_failures_in.fetch_add(1, SeqCst);
            if let Some(unreported) = shared.handshake_failure_log.note(remote.ip(), Instant::now()) {
                shared.host.event(Event::HandshakeFailed {
                    remote: remote.to_string(),
                    reason: e.reason(),
                    unreported,
                });
            }
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    crate::listener::keep_alive(&stream);
    shared.apply_io_thread_priority();
    let stats = shared.peer_stats(&peer);
    shared.host.event(Event::InboundUp { peer: peer.clone() });
    let mut reading = Reading {
        shared,
        peer,
        tracked,
        reason: None,
    };
    reading.reason = Some(read_frames(shared, &stream, &reading.peer, &stats));
}

/// Reports `InboundDown` once the reader ends, also when it panics.
struct Reading<'a> {
    shared: &'a Shared,
    peer: String,
    tracked: Option<TrackedSocket<'a>>,
    reason: Option<String>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        // No longer counted by the time the event is out.
        drop(self.tracked.take());
        let reason = self.reason.take().unwrap_or_else(|| ended_early("reader"));
        self.shared.host.event(Event::InboundDown {
            peer: std::mem::take(&mut self.peer),
            reason,
        });
    }
}

fn read_frames(shared: &Shared, stream: &TcpStream, peer: &str, stats: &PeerStats) -> String {
    let socket = SocketReader::new(stream, shared.config.io_chunk(), READ_BUFFER_BYTES)
        .busy_wait(shared.config.reader_busy_wait);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, socket);
    let token = match read_pool_token(&mut reader) {
        Ok(token) => token,
        Err(reason) => return reason,
    };
    let counters = match ConnStats::new(stream) {
        Ok(counters) => Arc::new(counters),
        Err(e) => return format!("socket address unavailable: {e}"),
    };
    let Some(membership) = shared.join_inbound_pool(peer, token, stream, counters.clone()) else {
        return "superseded by a newer pool from the same node".to_string();
    };
    faults::check(Point::Reader, peer);
    let mut handler = shared.host.frame_handler(peer);
    let mut scratch = Vec::new();
    let mut last_undeliverable_event: Option<Instant> = None;
    loop {
        let header = match next_data_header(&mut reader, shared.config.max_frame_bytes) {
            Ok(Some(header)) => header,
            Ok(None) => return "peer closed the connection".to_string(),
            Err(reason) => return reason,
        };
        // A newer pool from this node exists: anything still arriving here was sent
        // before it (bytes a partition held back) and must not overtake its frames.
        if membership.is_stale() {
            return "superseded by a newer pool from the same node".to_string();
        }
        let len = header.body_len as usize;
        let outcome = handler.read_and_handle(header.kind, len, &mut reader, &mut scratch);
        // Counted once the body is in: a peer announcing a huge frame and hanging up adds nothing.
        if outcome.is_ok() {
            stats.count_in(&counters, len as u64);
        }
        match outcome {
            Ok(Delivery::Delivered) => {}
            Ok(Delivery::Undeliverable(reason)) => {
                let total = stats.count_undeliverable(&counters);
                let due =
                    last_undeliverable_event.is_none_or(|t| t.elapsed() >= UNDELIVERABLE_EVENT_INTERVAL);
                if due {
                    last_undeliverable_event = Some(Instant::now());
                    shared.host.event(Event::Undeliverable {
                        peer: peer.to_string(),
                        reason,
                        total,
                    });
                }
            }
            Err(e) => return format!("malformed frame: {e}"),
        }
        // A large body's buffer is not kept between frames.
        if scratch.capacity() > 1 << 20 {
            scratch = Vec::new();
        }
    }
}

/// The reader's buffer: many small frames per system call.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The socket as the reader's `BufReader` sees it: at most `chunk` bytes per read system
/// call (`Config::io_chunk_bytes`), buffer refills included. A large body is read whole
/// (`read_exact`): once the buffered bytes are used, `BufReader` passes reads larger than
/// its buffer straight to this, into the body's own memory, so the cap applies without a
/// second copy.
///
/// A teleport connection carries data one way only, so its ACKs never ride on replies: in
/// quick-ACK mode the kernel sends a pure ACK from inside the read that consumes a lone
/// message, with the peer's side of loopback processed on this thread, before the message
/// reaches its process. Two things take that off the path (see BENCHMARKS.md, "Latency"):
/// buffer refills wait in delayed-ACK mode (one ACK per two pushes, or when the timer
/// fires; the kernel falls back to quick ACKs when its timer fires, so it is set before
/// each refill), and they peek instead of reading: the peeked bytes are discarded at the
/// start of the next read, after their frames are delivered, and any ACK goes out then.
/// Large body reads read: their ACKs and window updates should not wait.
///
/// A refill that finds the socket empty may busy-wait before it sleeps (see
/// `Config::reader_busy_wait`): a message that arrives while it polls reaches its process
/// without first waking this thread.
struct SocketReader<S> {
    socket: S,
    chunk: usize,
    /// Reads up to this size (the `BufReader`'s refills) peek.
    peek_up_to: usize,
    /// Bytes handed out by the last peek and still queued in the socket.
    peeked: usize,
    /// How long a refill polls before it sleeps; zero never polls.
    busy_wait: Duration,
    /// Whether the next refill polls: traffic has been small frames close together, the
    /// last wait for data was shorter than `busy_wait`. A connection whose messages come
    /// further apart, or that carries bulk, sleeps at once.
    poll_next: bool,
}

impl<S: Receive> SocketReader<S> {
    fn new(socket: S, chunk: usize, buffer_bytes: usize) -> Self {
        SocketReader {
            socket,
            chunk,
            peek_up_to: if S::CAN_PEEK { buffer_bytes } else { 0 },
            peeked: 0,
            busy_wait: Duration::ZERO,
            poll_next: false,
        }
    }

    fn busy_wait(mut self, busy_wait: Duration) -> Self {
        self.busy_wait = busy_wait;
        self
    }

    /// A buffer refill: peeks, polling first if the traffic so far suggests data is close.
    fn refill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.delay_acks();
        if self.busy_wait.is_zero() {
            return Ok(self.socket.peek(buf, Wait::Block)?.unwrap_or(0));
        }
        let start = Instant::now();
        if self.poll_next {
            loop {
                if let Some(n) = self.socket.peek(buf, Wait::No)? {
                    return Ok(n);
                }
                if start.elapsed() >= self.busy_wait {
                    break;
                }
                // Offers the core to any thread that wants it (a scheduler this wait may
                // be for), so polling mostly uses CPU nothing else wanted.
                std::thread::yield_now();
            }
        }
        let n = self.socket.peek(buf, Wait::Block)?.unwrap_or(0);
        self.poll_next = start.elapsed() < self.busy_wait;
        Ok(n)
    }
}

impl<S: Receive> Read for SocketReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.peeked > 0 {
            let n = self.peeked.min(buf.len());
            match self.socket.discard(&mut buf[..n])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                discarded => self.peeked -= discarded,
            }
        }
        let n = buf.len().min(self.chunk);
        if buf.len() <= self.peek_up_to {
            let peeked = self.refill(&mut buf[..n])?;
            self.peeked = peeked;
            Ok(peeked)
        } else {
            // A large body: bulk, whose next frame polling would seldom catch.
            self.poll_next = false;
            self.socket.read(&mut buf[..n])
        }
    }
}

/// Whether a peek may sleep until data comes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Wait {
    Block,
    No,
}

/// What [`SocketReader`] needs from a socket.
trait Receive {
    /// Whether `peek` and `discard` work; without them every read is a plain read.
    const CAN_PEEK: bool;
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Puts the socket in delayed-ACK mode for the bytes the next peeks wait for.
    fn delay_acks(&mut self);
    /// Copies queued bytes into `buf` and leaves them queued. `None`: nothing queued and
    /// `Wait::No`.
    fn peek(&mut self, buf: &mut [u8], wait: Wait) -> io::Result<Option<usize>>;
    /// Drops up to `buf.len()` queued bytes; `buf` only gives the length.
    fn discard(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

impl Receive for &TcpStream {
    // Discarding with MSG_TRUNC (no copy) is Linux's; elsewhere TCP may ignore the flag.
    const CAN_PEEK: bool = cfg!(target_os = "linux");

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buf)
    }

    fn delay_acks(&mut self) {
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(*self).set_quickack(false);
    }

    #[cfg(target_os = "linux")]
    fn peek(&mut self, buf: &mut [u8], wait: Wait) -> io::Result<Option<usize>> {
        let flags = match wait {
            Wait::Block => libc::MSG_PEEK,
            Wait::No => libc::MSG_PEEK | libc::MSG_DONTWAIT,
        };
        match socket2::SockRef::from(*self).recv_with_flags(as_uninit(buf), flags) {
            Ok(n) => Ok(Some(n)),
            Err(e) if wait == Wait::No && e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    // Unused: without CAN_PEEK, refills read.
    #[cfg(not(target_os = "linux"))]
    fn peek(&mut self, buf: &mut [u8], _wait: Wait) -> io::Result<Option<usize>> {
        TcpStream::peek(self, buf).map(Some)
    }

    #[cfg(target_os = "linux")]
    fn discard(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // With MSG_TRUNC the kernel copies nothing.
        socket2::SockRef::from(*self).recv_with_flags(as_uninit(buf), libc::MSG_TRUNC)
    }

    #[cfg(not(target_os = "linux"))]
    fn discard(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buf)
    }
}

#[cfg(target_os = "linux")]
fn as_uninit(buf: &mut [u8]) -> &mut [std::mem::MaybeUninit<u8>] {
    // SAFETY: initialised bytes are valid `MaybeUninit<u8>`s, and `recv` writes nothing
    // but bytes into them.
    unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) }
}

/// The header of the next frame to deliver; `Ok(None)` at a clean end of stream.
pub(crate) fn next_data_header(reader: &mut impl Read, max_body: u32) -> Result<Option<FrameHeader>, String> {
    match read_header(reader, max_body) {
        Ok(Some(header)) if header.kind == FrameKind::PoolEpoch => {
            Err("a second pool epoch frame".to_string())
        }
        Ok(header) => Ok(header),
        Err(e) => Err(format!("bad frame: {e}")),
    }
}

/// The first frame of a connection names the sender's pool.
pub(crate) fn read_pool_token(reader: &mut impl Read) -> Result<PoolToken, String> {
    match read_header(reader, POOL_TOKEN_LEN as u32) {
        Ok(Some(header))
            if header.kind == FrameKind::PoolEpoch && header.body_len as usize == POOL_TOKEN_LEN => {}
        Ok(Some(_)) => return Err("first frame is not the pool epoch".to_string()),
        Ok(None) => return Err("peer closed the connection".to_string()),
        Err(e) => return Err(format!("bad frame: {e}")),
    }
    let mut token = [0u8; POOL_TOKEN_LEN];
    reader
        .read_exact(&mut token)
        .map_err(|e| format!("read failed: {e}"))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Op {
        Read(usize),
        DelayAcks,
        /// A peek that may sleep.
        Peek(usize),
        /// A peek that may not.
        Poll(usize),
        Discard(usize),
    }

    /// A socket stand-in that records what each call asked for.
    struct Recording {
        data: Vec<u8>,
        at: usize,
        ops: Vec<Op>,
        /// Polls that find nothing before the data is there.
        empty_polls: usize,
        /// How long a peek that may sleep takes.
        wait: Duration,
    }

    impl Recording {
        fn new(data: Vec<u8>) -> Self {
            Recording {
                data,
                at: 0,
                ops: Vec::new(),
                empty_polls: 0,
                wait: Duration::ZERO,
            }
        }

        fn copy_out(&self, buf: &mut [u8]) -> usize {
            let n = buf.len().min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            n
        }
    }

    impl Receive for Recording {
        const CAN_PEEK: bool = true;

        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.ops.push(Op::Read(buf.len()));
            let n = self.copy_out(buf);
            self.at += n;
            Ok(n)
        }

        fn delay_acks(&mut self) {
            self.ops.push(Op::DelayAcks);
        }

        fn peek(&mut self, buf: &mut [u8], wait: Wait) -> io::Result<Option<usize>> {
            match wait {
                Wait::Block => {
                    self.ops.push(Op::Peek(buf.len()));
                    std::thread::sleep(self.wait);
                }
                Wait::No => {
                    self.ops.push(Op::Poll(buf.len()));
                    if self.empty_polls > 0 {
                        self.empty_polls -= 1;
                        return Ok(None);
                    }
                }
            }
            Ok(Some(self.copy_out(buf)))
        }

        fn discard(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.ops.push(Op::Discard(buf.len()));
            let n = buf.len().min(self.data.len() - self.at);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn refills_peek_and_body_reads_go_to_the_socket_in_chunks() {
        let data: Vec<u8> = (0..200u8).collect();
        let socket = Recording::new(data.clone());
        let mut reader = BufReader::with_capacity(16, SocketReader::new(socket, 32, 16));
        let mut header = [0u8; 5];
        reader.read_exact(&mut header).unwrap();
        assert_eq!(&header[..], &data[..5]);
        let mut body = vec![0u8; 100];
        reader.read_exact(&mut body).unwrap();
        assert_eq!(&body[..], &data[5..105]);
        // One peeked buffer fill for the header (and the body's first 11 bytes), dropped
        // from the socket before the rest of the body is read straight into `body`, never
        // more than a chunk per read and never through the buffer.
        use Op::*;
        assert_eq!(
            reader.get_ref().socket.ops,
            vec![DelayAcks, Peek(16), Discard(16), Read(32), Read(32), Read(25)]
        );
        // What follows the body goes through the buffer again.
        let mut next = [0u8; 3];
        reader.read_exact(&mut next).unwrap();
        assert_eq!(&next[..], &data[105..108]);
        assert_eq!(reader.get_ref().socket.ops[6..], [DelayAcks, Peek(16)]);
    }

    /// Reads `n` bytes as one refill (straight from the `SocketReader`, no `BufReader`).
    fn refill(reader: &mut SocketReader<Recording>, n: usize) -> Vec<Op> {
        let mut buf = vec![0u8; n];
        assert_eq!(reader.read(&mut buf).unwrap(), n);
        std::mem::take(&mut reader.socket.ops)
    }

    #[test]
    fn refills_poll_only_after_a_short_wait_and_no_bulk() {
        use Op::*;
        let socket = Recording::new((0..=255u8).cycle().take(4096).collect());
        let mut reader = SocketReader::new(socket, usize::MAX, 16).busy_wait(Duration::from_secs(5));
        // Nothing known yet: sleeps. The data came at once, so the next refill polls.
        assert_eq!(refill(&mut reader, 8), [DelayAcks, Peek(8)]);
        reader.socket.empty_polls = 2;
        assert_eq!(
            refill(&mut reader, 8),
            [Discard(8), DelayAcks, Poll(8), Poll(8), Poll(8)]
        );
        // A large body is read, not peeked; after it, refills sleep at once.
        assert_eq!(refill(&mut reader, 100), [Discard(8), Read(100)]);
        assert_eq!(refill(&mut reader, 8), [DelayAcks, Peek(8)]);
        assert_eq!(refill(&mut reader, 8), [Discard(8), DelayAcks, Poll(8)]);
    }

    #[test]
    fn polling_gives_up_after_the_busy_wait_and_a_long_wait_stops_it() {
        use Op::*;
        let busy_wait = Duration::from_millis(20);
        let socket = Recording::new(vec![7; 4096]);
        let mut reader = SocketReader::new(socket, usize::MAX, 16).busy_wait(busy_wait);
        refill(&mut reader, 8);
        // The data is never there while it polls: it polls for the busy wait, then sleeps.
        reader.socket.empty_polls = usize::MAX;
        reader.socket.wait = busy_wait * 2;
        let start = Instant::now();
        let ops = refill(&mut reader, 8);
        assert!(start.elapsed() >= busy_wait);
        assert_eq!(ops[..3], [Discard(8), DelayAcks, Poll(8)]);
        assert_eq!(ops.last(), Some(&Peek(8)));
        assert!(ops[2..ops.len() - 1].iter().all(|op| *op == Poll(8)));
        // That wait was longer than the busy wait: the next refill sleeps at once, and
        // a quick one brings polling back.
        reader.socket.wait = Duration::ZERO;
        assert_eq!(refill(&mut reader, 8), [Discard(8), DelayAcks, Peek(8)]);
        reader.socket.empty_polls = 0;
        assert_eq!(refill(&mut reader, 8), [Discard(8), DelayAcks, Poll(8)]);
    }

    #[test]
    fn no_busy_wait_never_polls() {
        use Op::*;
        let mut reader = SocketReader::new(Recording::new(vec![1; 64]), usize::MAX, 16);
        assert_eq!(refill(&mut reader, 8), [DelayAcks, Peek(8)]);
        assert_eq!(refill(&mut reader, 8), [Discard(8), DelayAcks, Peek(8)]);
    }

    /// Bytes the socket holds that nobody has read (SIOCINQ).
    #[cfg(target_os = "linux")]
    fn queued(stream: &TcpStream) -> usize {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0);
        n as usize
    }

    /// A connected loopback pair: (the writing end, the reading end).
    #[cfg(target_os = "linux")]
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peeking_leaves_quick_ack_mode() {
        let (mut client, server) = tcp_pair();
        let sock = socket2::SockRef::from(&server);
        sock.set_quickack(true).unwrap();
        assert!(sock.quickack().unwrap());
        std::io::Write::write_all(&mut client, b"x").unwrap();
        Receive::delay_acks(&mut &server);
        assert!(!sock.quickack().unwrap());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_poll_finds_queued_bytes_and_leaves_them() {
        let (mut client, server) = tcp_pair();
        let mut buf = [0u8; 8];
        assert_eq!(Receive::peek(&mut &server, &mut buf, Wait::No).unwrap(), None);
        std::io::Write::write_all(&mut client, b"ping").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let n = loop {
            if let Some(n) = Receive::peek(&mut &server, &mut buf, Wait::No).unwrap() {
                break n;
            }
            assert!(Instant::now() < deadline, "the bytes never showed");
        };
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(queued(&server), 4);
        assert_eq!(
            Receive::peek(&mut &server, &mut buf, Wait::Block).unwrap(),
            Some(4)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peeked_bytes_leave_the_socket_at_the_next_read() {
        use std::io::Write;
        let (mut writer, server) = tcp_pair();
        let wait_queued = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while queued(&server) != n {
                assert!(Instant::now() < deadline, "queued {} != {n}", queued(&server));
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let mut reader = BufReader::with_capacity(64, SocketReader::new(&server, usize::MAX, 64));

        writer.write_all(b"first").unwrap();
        wait_queued(5);
        let mut five = [0u8; 5];
        reader.read_exact(&mut five).unwrap();
        assert_eq!(&five, b"first");
        assert_eq!(queued(&server), 5, "delivered, still queued until the next read");

        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        writer.write_all(b"second").unwrap();
        writer.write_all(&big).unwrap();
        let mut six = [0u8; 6];
        reader.read_exact(&mut six).unwrap();
        assert_eq!(&six, b"second");
        let mut body = vec![0u8; big.len()];
        reader.read_exact(&mut body).unwrap();
        assert!(body == big, "a large body read past peeked bytes arrives intact");
        drop(writer);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(queued(&server), 0);
    }
}
