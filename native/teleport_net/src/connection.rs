//! One outbound connection: a bounded-by-bytes queue of frames, the writer
//! thread that drains it with vectored writes, and the watcher thread that
//! notices the peer going away while we have nothing to write.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::faults::Point;
use crate::framing::{FrameHeader, FrameKind, HEADER_LEN};
use crate::host::Callback;
use crate::stats::{ConnStats, ConnStatsSnapshot, PeerStats};

/// The bytes of one frame body, possibly scattered (e.g. an encoded term whose
/// large binaries are referenced in place). They must stay valid while `self` lives;
/// dropping `self` is what releases them, after they are on the wire.
pub trait FrameBody: Send {
    fn len(&self) -> usize;
    /// The body's pieces in order; after `embed_header` returned true, the header first.
    fn push_chunks<'a>(&'a self, out: &mut Vec<IoSlice<'a>>);
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A body with `HEADER_LEN` spare bytes in front of its first piece can take the
    /// frame header there, so a small frame is one slice (one `send`, no vector to
    /// build). Returns false if it cannot.
    fn embed_header(&mut self, _header: &[u8; HEADER_LEN]) -> bool {
        false
    }
    /// All of it (with the header, once embedded) if it is one slice.
    fn contiguous(&self) -> Option<&[u8]> {
        None
    }
}

impl FrameBody for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn push_chunks<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        out.push(IoSlice::new(self));
    }
}

pub struct OutFrame {
    header: [u8; HEADER_LEN],
    /// The body holds the header in front of its own bytes.
    header_in_body: bool,
    body: Box<dyn FrameBody>,
}

impl OutFrame {
    /// `None` when the body does not fit a frame's 32-bit length.
    pub fn new(kind: FrameKind, mut body: Box<dyn FrameBody>) -> Option<OutFrame> {
        let body_len = u32::try_from(body.len()).ok()?;
        let header = FrameHeader { kind, body_len }.encode();
        let header_in_body = body.embed_header(&header);
        Some(OutFrame {
            header,
            header_in_body,
            body,
        })
    }

    /// The header and the body's pieces, in order.
    fn push_slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        if !self.header_in_body {
            out.push(IoSlice::new(&self.header));
        }
        self.body.push_chunks(out);
    }

    /// The whole frame, if it is one slice.
    fn contiguous(&self) -> Option<&[u8]> {
        if self.header_in_body {
            self.body.contiguous()
        } else {
            None
        }
    }

    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

enum Item {
    Frame(OutFrame),
    /// A direct write left a remainder in `Connection::socket`: the writer must finish it.
    Wake,
    Close,
}

/// Frames up to this size may be written by the sending thread itself (see `enqueue`).
const DIRECT_WRITE_MAX: usize = 64 * 1024;

/// A frame that follows the previous one on this connection within this many
/// nanoseconds is part of a stream: it is queued so the writer can put many frames in
/// one write (one wake-up of the peer's reader for many messages). A frame after a
/// longer gap, like a ping-pong's, is written directly for latency. With 8 senders of
/// 100-byte messages, always writing directly made 0.6-0.9x disterl's messages/s, this
/// made 1.1-1.2x (BENCHMARKS.md); a 32-byte ping-pong's gaps are >= 40 us.
const STREAM_GAP_NS: u64 = 30_000;

/// A batch is flushed with one writev once it holds this much, or the queue is empty.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_FRAMES: usize = 256;

pub struct Connection {
    tx: Sender<Item>,
    /// A frame can slip into the queue after the writer's final drain (its sender
    /// passed the `closed` check just before); such frames are counted when the
    /// connection is dropped.
    leftovers: Receiver<Item>,
    stats: Arc<PeerStats>,
    counters: ConnStats,
    /// Kept to shut the socket down from any thread (wakes the writer and the watcher).
    socket: TcpStream,
    /// Whoever writes to the socket holds this: the writer thread for each batch, or a
    /// sender writing directly. It holds the rest of a frame a direct write left
    /// half-sent, which the writer must put on the wire before anything else.
    writing: Mutex<Option<(OutFrame, usize)>>,
    queued_bytes: AtomicUsize,
    limit: usize,
    closed: AtomicBool,
    /// Callers told to wait for the queue to drain; run once it falls to half the limit.
    waiters: Mutex<Vec<Callback<()>>>,
    has_waiters: AtomicBool,
    /// Most bytes per write system call (`Config::io_chunk_bytes`).
    io_chunk: usize,
    /// When the last frame was offered, in nanoseconds since `created` (see `STREAM_GAP_NS`).
    last_frame_ns: AtomicU64,
    created: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    Ok,
    /// Accepted, but the queue is over its limit: the caller should wait (see `wait_for_drain`).
    OverLimit,
}

/// The connection is closed; the frame was not accepted.
#[derive(Debug)]
pub struct Closed;

impl Connection {
    /// Returns the connection and its writing end, for its writer thread.
    pub(crate) fn new(
        socket: TcpStream,
        writer_stream: TcpStream,
        limit: usize,
        io_chunk: usize,
        stats: Arc<PeerStats>,
        counters: ConnStats,
    ) -> (Arc<Connection>, WriterEnd) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let conn = Arc::new(Connection {
            tx,
            leftovers: rx.clone(),
            stats,
            counters,
            socket,
            writing: Mutex::new(None),
            queued_bytes: AtomicUsize::new(0),
            limit,
            io_chunk,
            closed: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
            has_waiters: AtomicBool::new(false),
            last_frame_ns: AtomicU64::new(0),
            created: Instant::now(),
        });
        let end = WriterEnd {
            conn: conn.clone(),
            rx,
            stream: writer_stream,
            batch: Vec::new(),
        };
        (conn, end)
    }

    /// Queues a frame. Memory stays bounded because callers that get `OverLimit`
    /// wait before sending more: each overshoots by at most one frame.
    pub fn enqueue(&self, frame: OutFrame) -> Result<Enqueued, Closed> {
        if self.closed.load(SeqCst) {
            return Err(Closed);
        }
        let frame = match self.try_direct_write(frame) {
            None => return Ok(Enqueued::Ok),
            Some(frame) => frame,
        };
        let wire_len = frame.wire_len();
        let queued = self.queued_bytes.fetch_add(wire_len, SeqCst) + wire_len;
        if self.tx.send(Item::Frame(frame)).is_err() {
            self.queued_bytes.fetch_sub(wire_len, SeqCst);
            return Err(Closed);
        }
        Ok(if queued > self.limit {
            Enqueued::OverLimit
        } else {
            Enqueued::Ok
        })
    }

    /// With nothing queued, nobody writing and no stream under way, a small frame goes straight to the socket
    /// from the caller's thread, without waking the writer: that hand-off is most of a
    /// small message's latency. Never blocks: on a full socket buffer the rest of the frame
    /// is left to the writer. Returns the frame if it must be queued instead.
    fn try_direct_write(&self, frame: OutFrame) -> Option<OutFrame> {
        let now = self.created.elapsed().as_nanos() as u64;
        let previous = self.last_frame_ns.swap(now, Relaxed);
        let streaming = previous != 0 && now.saturating_sub(previous) < STREAM_GAP_NS;
        let too_large = frame.wire_len() > DIRECT_WRITE_MAX.min(self.io_chunk);
        if streaming || too_large || self.queued_bytes.load(SeqCst) != 0 {
            return Some(frame);
        }
        let Ok(mut writing) = self.writing.try_lock() else {
            return Some(frame);
        };
        // Re-checked under the lock: an empty queue now means none of this sender's
        // earlier frames is still waiting, so writing this one first keeps its order.
        if writing.is_some() || self.queued_bytes.load(SeqCst) != 0 || self.closed.load(SeqCst) {
            return Some(frame);
        }
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        let socket = socket2::SockRef::from(&self.socket);
        // An error (full buffer, or a failure the writer will meet and report) sends nothing.
        let sent: usize = match frame.contiguous() {
            Some(bytes) => socket.send_with_flags(bytes, flags),
            None => {
                let mut slices = Vec::with_capacity(4);
                frame.push_slices(&mut slices);
                socket.send_vectored_with_flags(&slices, flags)
            }
        }
        .unwrap_or_default();
        if sent == 0 {
            return Some(frame);
        }
        let wire_len = frame.wire_len();
        if sent < wire_len {
            // The rest must follow before any other frame: the writer finishes it.
            self.queued_bytes.fetch_add(wire_len - sent, SeqCst);
            *writing = Some((frame, sent));
            drop(writing);
            let _ = self.tx.send(Item::Wake);
            return None;
        }
        self.stats.count_out(&self.counters, 1, frame.body_len() as u64);
        None
    }

    /// Registers `wake` to run once the queue has drained to half its limit or the
    /// connection closed. Returns false (and drops `wake`) if that is already so.
    pub fn wait_for_drain(&self, wake: Callback<()>) -> bool {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Publish first, then re-check: the writer reads `has_waiters` after it
        // lowers `queued_bytes`, so one of the two sides always sees the other.
        self.has_waiters.store(true, SeqCst);
        if self.closed.load(SeqCst) || self.drained() {
            if waiters.is_empty() {
                self.has_waiters.store(false, SeqCst);
            }
            return false;
        }
        waiters.push(wake);
        true
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(SeqCst)
    }

    /// This connection's counters, as slot `index` of its pool.
    pub(crate) fn snapshot(&self, index: usize) -> ConnStatsSnapshot {
        self.counters.snapshot_outbound(index, self.queued_bytes())
    }

    pub fn is_over_limit(&self) -> bool {
        self.queued_bytes.load(SeqCst) >= self.limit
    }

    fn drained(&self) -> bool {
        self.queued_bytes.load(SeqCst) <= self.limit / 2
    }

    fn wake_waiters(&self, force: bool) {
        if !self.has_waiters.load(SeqCst) {
            return;
        }
        let ready = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if !(force || self.drained()) {
                return;
            }
            self.has_waiters.store(false, SeqCst);
            std::mem::take(&mut *waiters)
        };
        for wake in ready {
            wake(());
        }
    }

    /// Stops the connection from any thread: nothing more is accepted, the
    /// writer stops after its current write, the watcher's read returns.
    pub fn shutdown(&self) {
        self.closed.store(true, SeqCst);
        let _ = self.tx.send(Item::Close);
        let _ = self.socket.shutdown(Shutdown::Both);
        self.wake_waiters(true);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let late = self
            .leftovers
            .try_iter()
            .filter(|item| matches!(item, Item::Frame(_)))
            .count();
        PeerStats::add(&self.stats.dropped_out, late as u64);
    }
}

/// A connection's writing side: its queue, its socket and the batch being written,
/// owned by its writer thread.
pub(crate) struct WriterEnd {
    conn: Arc<Connection>,
    rx: Receiver<Item>,
    stream: TcpStream,
    /// Frames taken from the queue and not yet written. Kept here rather than on the
    /// writer's stack so that `close` counts them even after a panic.
    batch: Vec<OutFrame>,
}

impl WriterEnd {
    /// The writer thread's loop: runs until the connection is shut down or a write fails,
    /// and says why. Frames it could not write are left for `close` to count.
    pub(crate) fn write_until_closed(&mut self, peer: &str) -> String {
        let (conn, stream, batch) = (&*self.conn, &mut self.stream, &mut self.batch);
        loop {
            crate::faults::check(Point::Writer, peer);
            let mut close_after = false;
            match self.rx.recv() {
                Ok(Item::Frame(frame)) => batch.push(frame),
                Ok(Item::Wake) => {}
                Ok(Item::Close) | Err(_) => return "closed".to_string(),
            }
            let mut writing = conn.writing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((frame, offset)) = &*writing {
                let (rest, body_len) = (frame.wire_len() - offset, frame.body_len());
                if let Err((_, e)) = write_frame_from(stream, frame, *offset, conn.io_chunk) {
                    return format!("write failed: {e}");
                }
                conn.stats.count_out(&conn.counters, 1, body_len as u64);
                *writing = None;
                conn.queued_bytes.fetch_sub(rest, SeqCst);
            }
            if batch.is_empty() {
                drop(writing);
                conn.wake_waiters(false);
                continue;
            }
            // Take whatever else is already queued: many small frames become one write.
            let mut batch_bytes = batch[0].wire_len();
            while batch_bytes < BATCH_BYTES && batch.len() < BATCH_FRAMES {
                match self.rx.try_recv() {
                    Ok(Item::Frame(frame)) => {
                        batch_bytes += frame.wire_len();
                        batch.push(frame);
                    }
                    Ok(Item::Wake) => {}
                    Ok(Item::Close) => {
                        close_after = true;
                        break;
                    }
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                }
            }
            let outcome = write_batch(stream, batch, conn.io_chunk);
            let written = match &outcome {
                Ok(()) => batch.len(),
                Err((bytes, _)) => frames_within(batch, *bytes),
            };
            let bodies: usize = batch[..written].iter().map(OutFrame::body_len).sum();
            let wire: usize = batch[..written].iter().map(OutFrame::wire_len).sum();
            conn.stats
                .count_out(&conn.counters, written as u64, bodies as u64);
            // Dropping the frames releases their bodies (and the binaries they reference).
            batch.drain(..written);
            conn.queued_bytes.fetch_sub(wire, SeqCst);
            drop(writing);
            if let Err((_, e)) = outcome {
                return format!("write failed: {e}");
            }
            conn.wake_waiters(false);
            if close_after {
                return "closed".to_string();
            }
        }
    }

    /// Ends the writing side, however the writer ended (returned, panicked, never
    /// started): nothing more is accepted, every accepted frame not written is counted
    /// as dropped, waiting senders are woken. Returns how many frames were dropped.
    pub(crate) fn close(&mut self) -> u64 {
        let conn = &*self.conn;
        conn.closed.store(true, SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        let mut unsent = 0;
        let mut forget = |bytes: usize| {
            conn.queued_bytes.fetch_sub(bytes, SeqCst);
            unsent += 1;
        };
        // The rest of a frame a direct write left half-sent.
        let half_sent = conn.writing.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((frame, offset)) = half_sent {
            forget(frame.wire_len() - offset);
        }
        for frame in self.batch.drain(..) {
            forget(frame.wire_len());
        }
        while let Ok(item) = self.rx.try_recv() {
            if let Item::Frame(frame) = item {
                forget(frame.wire_len());
            }
        }
        PeerStats::add(&conn.stats.dropped_out, unsent);
        conn.wake_waiters(true);
        unsent
    }
}

/// How many whole frames of `batch` fit in its first `bytes` bytes on the wire.
fn frames_within(batch: &[OutFrame], bytes: usize) -> usize {
    let mut end = 0;
    batch
        .iter()
        .take_while(|frame| {
            end += frame.wire_len();
            end <= bytes
        })
        .count()
}

/// The part of one frame from `offset` on (the rest of a direct write).
fn write_frame_from(
    stream: &mut TcpStream,
    frame: &OutFrame,
    offset: usize,
    chunk: usize,
) -> Result<(), (usize, io::Error)> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(4);
    frame.push_slices(&mut slices);
    let mut slices = &mut slices[..];
    IoSlice::advance_slices(&mut slices, offset);
    write_all_vectored(stream, slices, chunk)
}

/// On failure, also says how many bytes did go out.
fn write_batch(stream: &mut TcpStream, batch: &[OutFrame], chunk: usize) -> Result<(), (usize, io::Error)> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 3);
    for frame in batch {
        frame.push_slices(&mut slices);
    }
    write_all_vectored(stream, &mut slices, chunk)
}

/// `Write::write_all_vectored` is not stable yet.
fn write_all_vectored(
    writer: &mut impl Write,
    mut slices: &mut [IoSlice<'_>],
    chunk: usize,
) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match write_some(writer, slices, chunk) {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

/// At most `chunk` bytes per system call (see `Config::io_chunk_bytes`).
fn write_some(writer: &mut impl Write, slices: &[IoSlice<'_>], chunk: usize) -> io::Result<usize> {
    if slices[0].len() >= chunk {
        return writer.write(&slices[0][..chunk]);
    }
    let mut total = 0;
    let count = slices
        .iter()
        .take_while(|slice| {
            total += slice.len();
            total <= chunk
        })
        .count();
    writer.write_vectored(&slices[..count.max(1)])
}

/// The watcher thread's body: the peer never writes after the handshake, so any
/// return from `read` means the connection is gone (or the peer misbehaves).
pub(crate) fn run_watcher(mut stream: &TcpStream) -> String {
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return "peer closed the connection".to_string(),
            Ok(_) => return "peer sent unexpected data".to_string(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return format!("read failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Chunks(Vec<Vec<u8>>);
    impl FrameBody for Chunks {
        fn len(&self) -> usize {
            self.0.iter().map(Vec::len).sum()
        }
        fn push_chunks<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
            out.extend(self.0.iter().map(|c| IoSlice::new(c)));
        }
    }

    #[test]
    fn write_batch_puts_headers_and_scattered_bodies_in_order() {
        let frames = vec![
            OutFrame::new(
                FrameKind::Send,
                Box::new(Chunks(vec![b"ab".to_vec(), b"cd".to_vec()])),
            )
            .unwrap(),
            OutFrame::new(FrameKind::Call, Box::new(b"xyz".to_vec())).unwrap(),
        ];
        let mut out = Vec::new();
        let mut slices = Vec::new();
        for frame in &frames {
            frame.push_slices(&mut slices);
        }
        write_all_vectored(&mut out, &mut slices, usize::MAX).unwrap();
        assert_eq!(out, b"\0\0\0\x04\x01abcd\0\0\0\x03\x02xyz");
    }

    #[test]
    fn a_body_with_the_header_in_front_is_one_slice() {
        use crate::etf::write::{self, Body};
        let mut body = Body::new(8, true);
        write::version(body.buf());
        write::atom(body.buf(), "ok");
        let frame = OutFrame::new(FrameKind::Send, Box::new(body)).unwrap();
        let expected = b"\0\0\0\x06\x01\x83d\0\x02ok";
        assert_eq!(frame.contiguous(), Some(&expected[..]));
        let mut slices = Vec::new();
        frame.push_slices(&mut slices);
        assert_eq!(slices.len(), 1);
        let mut out = Vec::new();
        write_all_vectored(&mut out, &mut slices, usize::MAX).unwrap();
        assert_eq!(out, expected);
    }

    /// A writer that takes at most 3 bytes per call, to exercise partial writes.
    struct Dribble(Vec<u8>);
    impl Write for Dribble {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_vectored_writes_resume_where_they_stopped() {
        let parts: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; (i as usize) % 7 + 1]).collect();
        let expected: Vec<u8> = parts.concat();
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut out = Dribble(Vec::new());
        write_all_vectored(&mut out, &mut slices, usize::MAX).unwrap();
        assert_eq!(out.0, expected);
    }

    /// Records the size of every write call.
    struct Calls(Vec<u8>, Vec<usize>);
    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.push(buf.len());
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.write(&all)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_write_call_moves_more_than_the_chunk() {
        let parts: Vec<Vec<u8>> = vec![
            vec![1; 10],
            vec![2; 2500],
            vec![3; 7],
            vec![4; 999],
            vec![5; 1000],
        ];
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut out = Calls(Vec::new(), Vec::new());
        write_all_vectored(&mut out, &mut slices, 1000).unwrap();
        assert_eq!(out.0, parts.concat());
        assert!(out.1.iter().all(|&n| n <= 1000), "{:?}", out.1);
        // The big slice is split, small neighbours are still gathered into one call.
        assert_eq!(out.1, vec![10, 1000, 1000, 500 + 7, 999, 1000]);
    }
}
