//! One outbound connection as senders see it: two queues of frames bounded by bytes
//! together, drained with vectored writes by the connection's I/O thread (engine/), or
//! a small frame written directly by its sender when nothing is queued.
//!
//! The express lane takes small frames; the bulk lane takes frames over
//! `framing::EXPRESS_MAX`, which go out in chunks (`framing`), and the small frames of a
//! sender whose large frame is still queued (its frames keep their order). A large
//! frame's chunks go out several per write; an express frame queued meanwhile goes
//! out after the chunk being written, ahead of the others (`let_express_in`), so a
//! small message waits for at most one chunk of another sender's large one, however
//! large that is.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use mio::net::TcpStream;

use crate::config::Config;
use crate::framing::{
    self, Chunking, FrameBody, FrameError, FrameHeader, FrameKind, BULK_START_LEN, EXPRESS_MAX, HEADER_LEN,
};
use crate::handshake::Capabilities;
use crate::host::Callback;
use crate::io_slot::IoSlot;
use crate::socket::{self, SendNoSignal};
use crate::stats::{ConnStats, ConnStatsSnapshot, PeerStats};

pub struct OutFrame {
    kind: FrameKind,
    header: [u8; HEADER_LEN],
    /// The body holds the header in front of its own bytes.
    header_in_body: bool,
    body: Box<dyn FrameBody>,
}

impl OutFrame {
    /// A frame of `body`, refused over `max_body` (`framing::check_body_len`); made by
    /// `Runtime::frame`, with `max_frame_bytes`.
    pub(crate) fn new(
        kind: FrameKind,
        mut body: Box<dyn FrameBody>,
        max_body: u32,
    ) -> Result<OutFrame, FrameError> {
        let body_len = framing::check_body_len(body.len(), max_body)?;
        let header = FrameHeader { kind, body_len }.encode();
        let header_in_body = body.embed_header(&header);
        Ok(OutFrame {
            kind,
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
        let mut pieces = Vec::with_capacity(4);
        self.body.push_pieces(&mut pieces);
        out.extend(pieces.into_iter().map(IoSlice::new));
    }

    /// Body bytes `from..from + len`, as slices of the body's pieces (a chunk's).
    fn push_body_range<'a>(&'a self, from: usize, len: usize, out: &mut Vec<IoSlice<'a>>) {
        let mut pieces = Vec::with_capacity(4);
        self.body.push_pieces(&mut pieces);
        let mut skip = from + if self.header_in_body { HEADER_LEN } else { 0 };
        let mut left = len;
        for bytes in pieces {
            if left == 0 {
                break;
            }
            if skip >= bytes.len() {
                skip -= bytes.len();
                continue;
            }
            let take = (bytes.len() - skip).min(left);
            out.push(IoSlice::new(&bytes[skip..skip + take]));
            left -= take;
            skip = 0;
        }
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

/// Frames up to this size may be written by the sending thread itself (see `enqueue`).
const DIRECT_WRITE_MAX: usize = 64 * 1024;

/// A frame that follows the previous one on this connection within this many
/// nanoseconds is part of a stream: it is queued so the I/O thread can put many frames
/// in one write (one wake-up of the peer's reader for many messages). A frame after a
/// longer gap, like a ping-pong's, is written directly for latency. With 8 senders of
/// 100-byte messages, always writing directly made 0.6-0.9x disterl's messages/s, this
/// made 1.1-1.2x (BENCHMARKS.md); a 32-byte ping-pong's gaps are >= 40 us.
const STREAM_GAP_NS: u64 = 30_000;

/// While a small frame went to the peer this recently (on any connection of the
/// pool), bulk writes are cut into chunks (`framing::CHUNK_MAX`), so the next small
/// frame waits for at most one chunk; otherwise a write is one chunk, which costs less
/// (the ring ran about 6% slower with writes always cut: BENCHMARKS.md). Small frames
/// come in conversations (calls, casts, acknowledgements): the first after a quiet
/// spell may wait for a whole write, 0.5 ms at the connection's measured rate.
const SMALL_FRAMES_LATELY: Duration = Duration::from_millis(100);

/// When a pool last offered a small frame, shared by its connections.
pub(crate) struct SmallFrames {
    epoch: Instant,
    /// Nanoseconds since `epoch`, plus one (0: never).
    last: AtomicU64,
}

impl SmallFrames {
    pub(crate) fn new() -> SmallFrames {
        SmallFrames {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// Every small frame calls this: the shared word is written at most once a
    /// millisecond, so senders on several schedulers do not pass its cache line around.
    fn offered(&self) {
        let (now, last) = (self.now(), self.last.load(Relaxed));
        if last == 0 || now - last > 1_000_000 {
            self.last.store(now, Relaxed);
        }
    }

    fn lately(&self) -> bool {
        let last = self.last.load(Relaxed);
        last != 0 && self.now() - last < SMALL_FRAMES_LATELY.as_nanos() as u64
    }
}

/// Express frames taken at once hold at most this much, so a long queue is written in
/// turns with the I/O thread's other connections.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_FRAMES: usize = 256;

/// The two queues of a connection (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Express,
    Bulk,
}

/// A frame as queued, and whose (the sender's key, for its order).
struct Queued {
    frame: OutFrame,
    key: u64,
}

/// What goes on the wire, in order.
enum Unit {
    /// A whole frame. `key`: from the bulk lane, whose count it holds.
    Whole { frame: OutFrame, key: Option<u64> },
    /// The `BulkStart` of the bulk frame under way.
    Start([u8; HEADER_LEN + BULK_START_LEN]),
    /// Body bytes `from..from + len` of the bulk frame under way, with their header.
    Chunk {
        header: [u8; HEADER_LEN],
        from: usize,
        len: usize,
    },
}

impl Unit {
    fn wire_len(&self) -> usize {
        match self {
            Unit::Whole { frame, .. } => frame.wire_len(),
            Unit::Start(bytes) => bytes.len(),
            Unit::Chunk { len, .. } => HEADER_LEN + len,
        }
    }
}

/// The bulk frame whose chunks are going out.
struct BulkOut {
    frame: OutFrame,
    key: u64,
    /// Body bytes put into chunks so far.
    framed: usize,
    /// Bytes per chunk and per write, chosen as the frame started (`framing::chunking`).
    chunking: Chunking,
}

/// What is going on the wire: units taken from the lanes, the first with `offset`
/// bytes out, and the bulk frame they may be chunks of.
#[derive(Default)]
struct Batch {
    units: VecDeque<Unit>,
    offset: usize,
    bulk: Option<BulkOut>,
}

impl Batch {
    fn is_idle(&self) -> bool {
        self.units.is_empty() && self.bulk.is_none()
    }

    /// Whether a bulk unit is among those to write.
    fn holds_bulk_unit(&self) -> bool {
        self.units
            .iter()
            .any(|u| !matches!(u, Unit::Whole { key: None, .. }))
    }
}

/// One outbound connection as senders see it: a queue bounded by bytes, written by its
/// I/O thread, or directly by a sender when nothing is queued.
pub struct SendQueue {
    express: (Sender<Queued>, Receiver<Queued>),
    /// Drained by the I/O thread; frames left in either lane when the connection ends
    /// are counted dropped (also those slipped in after the final drain, when it is
    /// dropped).
    bulk: (Sender<Queued>, Receiver<Queued>),
    /// Senders (by key) with frames in the bulk lane, and how many each.
    bulk_senders: Mutex<HashMap<u64, usize>>,
    /// Frames in the bulk lane: a small frame looks its sender up only when some are.
    bulk_queued: AtomicUsize,
    stats: Arc<PeerStats>,
    counters: ConnStats,
    /// Shared with the I/O thread, which registered it: one descriptor.
    socket: Arc<TcpStream>,
    /// Whoever writes to the socket holds this: the I/O thread, or a sender writing
    /// directly. It holds the units under way, the rest of a direct write first.
    writing: Mutex<Batch>,
    /// Bytes accepted and not yet written (chunk headers aside), and of those, the
    /// express lane's: each lane holds at most `limit`, so other senders' bulk never
    /// makes a sender of small frames wait.
    queued_bytes: AtomicUsize,
    express_bytes: AtomicUsize,
    limit: usize,
    closed: AtomicBool,
    /// Set while the I/O thread has been asked to write, until it finds nothing left: a
    /// sender that sets it sends the one request.
    flush_requested: AtomicBool,
    io: IoSlot,
    /// Callers told to wait for their lane to drain; run once it falls to half the limit.
    waiters: Mutex<Vec<(Lane, Callback<()>)>>,
    has_waiters: AtomicBool,
    /// When the last frame was offered, in nanoseconds since `created` (see `STREAM_GAP_NS`).
    last_frame_ns: AtomicU64,
    created: Instant,
    /// The pool's (see `SMALL_FRAMES_LATELY`).
    small_frames: Arc<SmallFrames>,
    /// Whether senders may write to the socket themselves (not through TLS).
    direct: bool,
    /// What the peer told of itself in this connection's handshake.
    peer_capabilities: Capabilities,
    /// A fixed chunking instead of the one the connection's rate gives.
    #[cfg(test)]
    chunking_for_tests: Option<Chunking>,
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

/// What a flush by the I/O thread left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Nothing left to write.
    Idle,
    /// The socket's buffer is full: write again once it is writable.
    Blocked,
    /// This turn's share is written and more is queued: flush again after the thread's
    /// other connections had theirs.
    More,
}

impl SendQueue {
    /// A connection of a pool, sharing its `stats` and `small_frames`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        socket: Arc<TcpStream>,
        io: IoSlot,
        config: &Config,
        stats: Arc<PeerStats>,
        small_frames: Arc<SmallFrames>,
        counters: ConnStats,
        direct: bool,
        peer_capabilities: Capabilities,
    ) -> SendQueue {
        let limit = config.send_queue_bytes;
        SendQueue {
            express: crossbeam_channel::unbounded(),
            bulk: crossbeam_channel::unbounded(),
            bulk_senders: Mutex::new(HashMap::new()),
            bulk_queued: AtomicUsize::new(0),
            stats,
            counters,
            socket,
            writing: Mutex::new(Batch::default()),
            queued_bytes: AtomicUsize::new(0),
            express_bytes: AtomicUsize::new(0),
            limit,
            closed: AtomicBool::new(false),
            flush_requested: AtomicBool::new(false),
            io,
            waiters: Mutex::new(Vec::new()),
            has_waiters: AtomicBool::new(false),
            last_frame_ns: AtomicU64::new(0),
            created: Instant::now(),
            small_frames,
            direct,
            peer_capabilities,
            #[cfg(test)]
            chunking_for_tests: None,
        }
    }

    /// Queues a frame of the sender `key`. Memory stays bounded because callers that
    /// get `OverLimit` wait before sending more: each overshoots by at most one frame.
    pub fn enqueue(&self, frame: OutFrame, key: u64) -> Result<Enqueued, Closed> {
        if self.closed.load(SeqCst) {
            return Err(Closed);
        }
        let large = frame.body_len() > EXPRESS_MAX;
        let frame = if large {
            frame
        } else {
            self.small_frames.offered();
            match self.try_direct_write(frame) {
                None => return Ok(Enqueued::Ok),
                Some(frame) => frame,
            }
        };
        let wire_len = frame.wire_len();
        self.queued_bytes.fetch_add(wire_len, SeqCst);
        let lane = if large || self.has_bulk_queued(key) {
            let mut senders = self.bulk_senders.lock().unwrap_or_else(|p| p.into_inner());
            *senders.entry(key).or_default() += 1;
            self.bulk_queued.fetch_add(1, SeqCst);
            Lane::Bulk
        } else {
            self.express_bytes.fetch_add(wire_len, SeqCst);
            Lane::Express
        };
        let sent = match lane {
            Lane::Express => self.express.0.send(Queued { frame, key }),
            Lane::Bulk => self.bulk.0.send(Queued { frame, key }),
        };
        if sent.is_err() {
            self.queued_bytes.fetch_sub(wire_len, SeqCst);
            return Err(Closed);
        }
        self.request_flush();
        Ok(if self.lane_bytes(lane) > self.limit {
            Enqueued::OverLimit
        } else {
            Enqueued::Ok
        })
    }

    /// What a lane holds now.
    fn lane_bytes(&self, lane: Lane) -> usize {
        let express = self.express_bytes.load(SeqCst);
        match lane {
            Lane::Express => express,
            Lane::Bulk => self.queued_bytes.load(SeqCst).saturating_sub(express),
        }
    }

    /// The lane `key`'s next frame goes to, if small.
    fn lane_of(&self, key: u64) -> Lane {
        if self.has_bulk_queued(key) {
            Lane::Bulk
        } else {
            Lane::Express
        }
    }

    /// Whether `key` has a frame in the bulk lane, which a small frame of its must follow.
    fn has_bulk_queued(&self, key: u64) -> bool {
        self.bulk_queued.load(SeqCst) > 0
            && self
                .bulk_senders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&key)
    }

    /// A bulk-lane frame of `key` is on the wire whole.
    fn bulk_sent(&self, key: u64) {
        let mut senders = self.bulk_senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = senders.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                senders.remove(&key);
            }
        }
        self.bulk_queued.fetch_sub(1, SeqCst);
    }

    fn request_flush(&self) {
        if !self.flush_requested.swap(true, SeqCst) {
            self.io.flush();
        }
    }

    /// With nothing queued, nobody writing and no stream under way, a small frame goes
    /// straight to the socket from the caller's thread, without waking the I/O thread:
    /// that hand-off is most of a small message's latency. Never blocks: on a full
    /// socket buffer the rest of the frame is left to the I/O thread. Returns the frame
    /// if it must be queued instead.
    fn try_direct_write(&self, frame: OutFrame) -> Option<OutFrame> {
        if !self.direct {
            return Some(frame);
        }
        let now = self.created.elapsed().as_nanos() as u64;
        let previous = self.last_frame_ns.swap(now, Relaxed);
        let streaming = previous != 0 && now.saturating_sub(previous) < STREAM_GAP_NS;
        let too_large = frame.wire_len() > DIRECT_WRITE_MAX;
        if streaming || too_large || self.queued_bytes.load(SeqCst) != 0 {
            return Some(frame);
        }
        let Ok(mut batch) = self.writing.try_lock() else {
            return Some(frame);
        };
        // Re-checked under the lock: empty queues now mean none of this sender's
        // earlier frames is still waiting, so writing this one first keeps its order.
        if !batch.is_idle() || self.queued_bytes.load(SeqCst) != 0 || self.closed.load(SeqCst) {
            return Some(frame);
        }
        let mut socket = SendNoSignal(&self.socket);
        // An error (full buffer, or a failure the I/O thread will meet and report) sends nothing.
        let sent: usize = match frame.contiguous() {
            Some(bytes) => socket.write(bytes),
            None => {
                let mut slices = Vec::with_capacity(4);
                frame.push_slices(&mut slices);
                socket.write_vectored(&slices)
            }
        }
        .unwrap_or_default();
        if sent == 0 {
            return Some(frame);
        }
        let wire_len = frame.wire_len();
        if sent < wire_len {
            // The rest must follow before any other frame: the I/O thread finishes it.
            self.queued_bytes.fetch_add(wire_len, SeqCst);
            self.express_bytes.fetch_add(wire_len, SeqCst);
            batch.units.push_back(Unit::Whole { frame, key: None });
            batch.offset = sent;
            drop(batch);
            self.request_flush();
            return None;
        }
        self.stats.count_out(&self.counters, 1, frame.body_len() as u64);
        None
    }

    /// The I/O thread's part: writes what is queued until the socket is full, the queue
    /// is empty or `budget` bytes went out, and says how many did. An error is the
    /// connection's end.
    pub(crate) fn flush(&self, budget: usize) -> io::Result<(Flushed, usize)> {
        self.flush_to(budget, &mut SendNoSignal(&self.socket))
    }

    /// `flush`, through `out` (a TLS session) instead of the socket: `WouldBlock` from
    /// `out` is a full socket.
    pub(crate) fn flush_to(&self, budget: usize, out: &mut dyn Write) -> io::Result<(Flushed, usize)> {
        let mut batch = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut written = 0;
        loop {
            if batch.units.is_empty() && !self.refill(&mut batch) {
                // Asked again meanwhile (the sender saw the flag set and sent no
                // request): this thread goes on; otherwise the next sender asks.
                self.flush_requested.store(false, SeqCst);
                if self.nothing_queued() || self.flush_requested.swap(true, SeqCst) {
                    drop(batch);
                    self.wake_waiters(false);
                    return Ok((Flushed::Idle, written));
                }
                continue;
            }
            if written >= budget {
                drop(batch);
                self.wake_waiters(false);
                return Ok((Flushed::More, written));
            }
            if batch.units.len() > 1 && !self.express.1.is_empty() {
                let_express_in(&mut batch, &self.express.1);
            }
            match self.write_some_of(&mut batch, out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(batch);
                    self.wake_waiters(false);
                    return Ok((Flushed::Blocked, written));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How this connection cuts a bulk body now (see `framing::chunking`).
    fn chunking(&self) -> Chunking {
        #[cfg(test)]
        if let Some(chunking) = self.chunking_for_tests {
            return chunking;
        }
        framing::chunking(socket::delivery_rate(&self.socket))
    }

    fn nothing_queued(&self) -> bool {
        self.express.1.is_empty() && self.bulk.1.is_empty()
    }

    /// Takes what goes out next: every express frame queued (up to a batch), then the
    /// bulk lane's next frame if small, else the chunks of a write of the large frame
    /// under way. False if there was nothing to take.
    fn refill(&self, batch: &mut Batch) -> bool {
        let mut bytes = 0;
        while bytes < BATCH_BYTES && batch.units.len() < BATCH_FRAMES {
            match self.express.1.try_recv() {
                Ok(Queued { frame, .. }) => {
                    bytes += frame.wire_len();
                    batch.units.push_back(Unit::Whole { frame, key: None });
                }
                Err(_) => break,
            }
        }
        if !batch.holds_bulk_unit() {
            let cut = self.small_frames.lately();
            let mut chunked = self.next_bulk_unit(batch, cut);
            while let Some(bulk) = &batch.bulk {
                if chunked >= bulk.chunking.per_write || bulk.framed == bulk.frame.body_len() {
                    break;
                }
                chunked += self.next_bulk_unit(batch, cut);
            }
        }
        !batch.units.is_empty()
    }

    /// The next unit of the bulk lane: the next chunk of the frame under way, or the
    /// lane's next frame (whole if small, else its `BulkStart` and first chunk). The
    /// chunk is a write's worth, or `chunking.chunk` if `cut`. Returns the chunk's
    /// length (0 if none).
    fn next_bulk_unit(&self, batch: &mut Batch, cut: bool) -> usize {
        if batch.bulk.is_none() {
            let Ok(Queued { frame, key }) = self.bulk.1.try_recv() else {
                return 0;
            };
            if frame.body_len() <= EXPRESS_MAX {
                batch.units.push_back(Unit::Whole {
                    frame,
                    key: Some(key),
                });
                return 0;
            }
            batch.units.push_back(Unit::Start(framing::bulk_start(
                frame.kind,
                frame.body_len() as u32,
            )));
            batch.bulk = Some(BulkOut {
                frame,
                key,
                framed: 0,
                chunking: self.chunking(),
            });
        }
        let Some(bulk) = &mut batch.bulk else {
            return 0;
        };
        let chunk = match cut {
            true => bulk.chunking.chunk,
            false => bulk.chunking.per_write,
        };
        let len = (bulk.frame.body_len() - bulk.framed).min(chunk);
        let header = FrameHeader {
            kind: FrameKind::BulkChunk,
            body_len: len as u32,
        }
        .encode();
        batch.units.push_back(Unit::Chunk {
            header,
            from: bulk.framed,
            len,
        });
        bulk.framed += len;
        len
    }

    /// One write system call of the batch's units; units wholly out leave it (a frame
    /// that leaves releases its body, and the binaries it references).
    fn write_some_of(&self, batch: &mut Batch, out: &mut dyn Write) -> io::Result<usize> {
        let n = {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.units.len() * 3);
            for unit in &batch.units {
                match unit {
                    Unit::Whole { frame, .. } => frame.push_slices(&mut slices),
                    Unit::Start(bytes) => slices.push(IoSlice::new(bytes)),
                    Unit::Chunk { header, from, len } => {
                        slices.push(IoSlice::new(header));
                        if let Some(bulk) = &batch.bulk {
                            bulk.frame.push_body_range(*from, *len, &mut slices);
                        }
                    }
                }
            }
            let mut slices = &mut slices[..];
            IoSlice::advance_slices(&mut slices, batch.offset);
            out.write_vectored(slices)?
        };
        let mut left = batch.offset + n;
        let (mut frames, mut bodies, mut done_bytes, mut express_done) = (0u64, 0u64, 0usize, 0usize);
        while let Some(front) = batch.units.front() {
            if front.wire_len() > left {
                break;
            }
            left -= front.wire_len();
            match batch.units.pop_front() {
                Some(Unit::Whole { frame, key }) => {
                    done_bytes += frame.wire_len();
                    frames += 1;
                    bodies += frame.body_len() as u64;
                    match key {
                        Some(key) => self.bulk_sent(key),
                        None => express_done += frame.wire_len(),
                    }
                }
                Some(Unit::Start(_)) => done_bytes += HEADER_LEN,
                Some(Unit::Chunk { from, len, .. }) => {
                    done_bytes += len;
                    if let Some(bulk) = batch.bulk.take_if(|b| from + len == b.frame.body_len()) {
                        frames += 1;
                        bodies += bulk.frame.body_len() as u64;
                        self.bulk_sent(bulk.key);
                    }
                }
                None => {}
            }
        }
        batch.offset = left;
        self.express_bytes.fetch_sub(express_done, SeqCst);
        self.queued_bytes.fetch_sub(done_bytes, SeqCst);
        if frames > 0 {
            self.stats.count_out(&self.counters, frames, bodies);
        }
        Ok(n)
    }

    /// Ends the connection, from its I/O thread as it lets go of it: nothing more is
    /// accepted, every accepted frame not written is counted as dropped, waiting senders
    /// are woken. Returns how many frames were dropped.
    pub(crate) fn close(&self) -> u64 {
        self.closed.store(true, SeqCst);
        let _ = self.socket.shutdown(Shutdown::Both);
        let mut batch = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut unsent = batch
            .units
            .iter()
            .filter(|u| matches!(u, Unit::Whole { .. }))
            .count() as u64;
        if batch.bulk.is_some() {
            unsent += 1;
        }
        batch.units.clear();
        batch.bulk = None;
        batch.offset = 0;
        drop(batch);
        for _ in self.express.1.try_iter().chain(self.bulk.1.try_iter()) {
            unsent += 1;
        }
        self.queued_bytes.store(0, SeqCst);
        self.express_bytes.store(0, SeqCst);
        PeerStats::add(&self.stats.dropped_out, unsent);
        self.wake_waiters(true);
        unsent
    }

    /// Registers `wake` to run once the lane the sender `key` uses has drained to half
    /// its limit, or the connection closed. Returns false (and drops `wake`) if that is
    /// already so.
    pub fn wait_for_drain(&self, key: u64, wake: Callback<()>) -> bool {
        let lane = self.lane_of(key);
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Publish first, then re-check: the I/O thread reads `has_waiters` after it
        // lowers the byte counts, so one of the two sides always sees the other.
        self.has_waiters.store(true, SeqCst);
        if self.closed.load(SeqCst) || self.drained(lane) {
            if waiters.is_empty() {
                self.has_waiters.store(false, SeqCst);
            }
            return false;
        }
        waiters.push((lane, wake));
        true
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(SeqCst)
    }

    /// What the peer told of itself in this connection's handshake.
    pub fn peer_capabilities(&self) -> Capabilities {
        self.peer_capabilities
    }

    /// This connection's counters, as slot `index` of its pool.
    pub(crate) fn snapshot(&self, index: usize) -> ConnStatsSnapshot {
        self.counters.snapshot_outbound(index, self.queued_bytes())
    }

    /// Whether the lane the sender `key` uses is at its limit.
    pub fn is_over_limit(&self, key: u64) -> bool {
        self.lane_bytes(self.lane_of(key)) >= self.limit
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    fn drained(&self, lane: Lane) -> bool {
        self.lane_bytes(lane) <= self.limit / 2
    }

    fn wake_waiters(&self, force: bool) {
        if !self.has_waiters.load(SeqCst) {
            return;
        }
        let ready: Vec<Callback<()>> = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut *waiters)
                .into_iter()
                .partition(|(lane, _)| force || self.drained(*lane));
            if waiting.is_empty() {
                self.has_waiters.store(false, SeqCst);
            }
            *waiters = waiting;
            ready.into_iter().map(|(_, wake)| wake).collect()
        };
        for wake in ready {
            wake(());
        }
    }

    /// Stops the connection from any thread: nothing more is accepted, and its I/O
    /// thread is told to let go of it (counting what was not written).
    pub fn shutdown(&self) {
        self.closed.store(true, SeqCst);
        let _ = self.socket.shutdown(Shutdown::Both);
        self.io.close();
    }
}

impl Drop for SendQueue {
    fn drop(&mut self) {
        // Frames that slipped in after the I/O thread's final drain.
        let late = self.express.1.try_iter().chain(self.bulk.1.try_iter()).count();
        PeerStats::add(&self.stats.dropped_out, late as u64);
    }
}

/// `Write::write_all_vectored` is not stable yet (tests only: the I/O thread never
/// waits for a write to complete).
/// Express frames queued while a write of chunks is under way go out after the unit
/// being written (the first), ahead of the write's chunks not yet begun, which are put
/// back to be cut again (`framed` rewinds to the first of them). The express frames
/// already in the batch keep their place in front of the new ones. Express frames come
/// from senders with nothing in the bulk lane, so no sender's order changes.
fn let_express_in(batch: &mut Batch, express: &Receiver<Queued>) {
    while batch.units.len() > 1 {
        let Some(&Unit::Chunk { from, .. }) = batch.units.back() else {
            break;
        };
        batch.units.pop_back();
        if let Some(bulk) = &mut batch.bulk {
            bulk.framed = from;
        }
    }
    let mut at = 1;
    while at < batch.units.len() && matches!(batch.units[at], Unit::Whole { key: None, .. }) {
        at += 1;
    }
    let mut bytes = 0;
    while bytes < BATCH_BYTES && batch.units.len() < BATCH_FRAMES {
        let Ok(Queued { frame, .. }) = express.try_recv() else {
            break;
        };
        bytes += frame.wire_len();
        batch.units.insert(at, Unit::Whole { frame, key: None });
        at += 1;
    }
}

#[cfg(test)]
fn write_all_vectored(
    writer: &mut impl Write,
    mut slices: &mut [IoSlice<'_>],
) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match writer.write_vectored(slices) {
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Chunks(Vec<Vec<u8>>);
    impl FrameBody for Chunks {
        fn len(&self) -> usize {
            self.0.iter().map(Vec::len).sum()
        }
        fn push_pieces<'a>(&'a self, out: &mut Vec<&'a [u8]>) {
            out.extend(self.0.iter().map(Vec::as_slice));
        }
    }

    #[test]
    fn write_batch_puts_headers_and_scattered_bodies_in_order() {
        let frames = vec![
            OutFrame::new(
                FrameKind::Send,
                Box::new(Chunks(vec![b"ab".to_vec(), b"cd".to_vec()])),
                u32::MAX,
            )
            .unwrap(),
            OutFrame::new(FrameKind::Call, Box::new(b"xyz".to_vec()), u32::MAX).unwrap(),
        ];
        let mut out = Vec::new();
        let mut slices = Vec::new();
        for frame in &frames {
            frame.push_slices(&mut slices);
        }
        write_all_vectored(&mut out, &mut slices).unwrap();
        assert_eq!(out, b"\0\0\0\x04\x01abcd\0\0\0\x03\x02xyz");
    }

    #[test]
    fn a_body_with_the_header_in_front_is_one_slice() {
        use crate::etf::write::{self, Body};
        let mut body = Body::new(8, true);
        write::version(body.buf());
        write::atom(body.buf(), "ok");
        let frame = OutFrame::new(FrameKind::Send, Box::new(body), u32::MAX).unwrap();
        let expected = b"\0\0\0\x06\x01\x83d\0\x02ok";
        assert_eq!(frame.contiguous(), Some(&expected[..]));
        let mut slices = Vec::new();
        frame.push_slices(&mut slices);
        assert_eq!(slices.len(), 1);
        let mut out = Vec::new();
        write_all_vectored(&mut out, &mut slices).unwrap();
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

    struct NoThread;
    impl crate::io_slot::IoThread for NoThread {
        fn flush(&self, _slot: crate::io_slot::Slot) {}
        fn close(&self, _slot: crate::io_slot::Slot) {}
    }

    /// A queue on a connected loopback socket that the test writes for itself (through
    /// `flush_to`), with a fixed chunking.
    fn queue(chunking: Chunking) -> (SendQueue, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let socket = TcpStream::from_std(client);
        let counters = ConnStats::new(&socket).unwrap();
        let io = IoSlot {
            thread: Arc::new(NoThread),
            slot: crate::io_slot::Slot { index: 0, id: 0 },
        };
        let config = Config::for_tests("a@127.0.0.1", b"cookie");
        let mut queue = SendQueue::new(
            Arc::new(socket),
            io,
            &config,
            Arc::default(),
            Arc::new(SmallFrames::new()),
            counters,
            false,
            Capabilities::default(),
        );
        queue.chunking_for_tests = Some(chunking);
        (queue, server)
    }

    /// Takes `first` bytes, then says the socket is full.
    struct FillsUp {
        out: Vec<u8>,
        room: usize,
    }
    impl Write for FillsUp {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The frames on the wire: kind and body length.
    fn frames_of(mut wire: &[u8]) -> Vec<(FrameKind, usize)> {
        let mut frames = Vec::new();
        while !wire.is_empty() {
            let header: [u8; HEADER_LEN] = wire[..HEADER_LEN].try_into().unwrap();
            let header = FrameHeader::decode(&header, u32::MAX).unwrap();
            let len = header.body_len as usize;
            frames.push((header.kind, len));
            wire = &wire[HEADER_LEN + len..];
        }
        frames
    }

    fn frame(kind: FrameKind, len: usize) -> OutFrame {
        OutFrame::new(kind, Box::new(vec![7u8; len]), u32::MAX).unwrap()
    }

    /// A large frame's write of four chunks has begun when a small frame of another
    /// sender is queued: the small frame goes out after the chunk being written, and
    /// the large one's other chunks after it, in order, the body whole.
    #[test]
    fn a_small_frame_goes_ahead_of_the_chunks_of_a_write_not_yet_begun() {
        let chunk = EXPRESS_MAX / 2;
        let (queue, _peer) = queue(Chunking {
            chunk,
            per_write: 4 * chunk,
        });
        let large = 10 * chunk;
        queue.small_frames.offered();
        queue.enqueue(frame(FrameKind::Send, large), 1).unwrap();
        let mut out = FillsUp {
            out: Vec::new(),
            room: 100,
        };
        assert_eq!(queue.flush_to(usize::MAX, &mut out).unwrap().0, Flushed::Blocked);
        queue.enqueue(frame(FrameKind::Call, 16), 2).unwrap();
        out.room = usize::MAX;
        assert_eq!(queue.flush_to(usize::MAX, &mut out).unwrap().0, Flushed::Idle);
        let frames = frames_of(&out.out);
        let chunk_frame = (FrameKind::BulkChunk, chunk);
        let mut expected = vec![
            (FrameKind::BulkStart, BULK_START_LEN),
            chunk_frame,
            (FrameKind::Call, 16),
        ];
        expected.extend(std::iter::repeat_n(chunk_frame, 9));
        assert_eq!(frames, expected);
        let body: usize = frames
            .iter()
            .filter(|f| f.0 == FrameKind::BulkChunk)
            .map(|f| f.1)
            .sum();
        assert_eq!(body, large);
        assert_eq!(queue.queued_bytes(), 0);
    }

    /// The chunks of a write: `per_write` bytes of them, cut to `chunk` bytes each
    /// while the connection carries small frames, else one.
    fn chunks_of_a_write(small_frame_ago: Option<Duration>) -> Vec<usize> {
        let chunk = EXPRESS_MAX / 2;
        let (queue, _peer) = queue(Chunking {
            chunk,
            per_write: 4 * chunk,
        });
        if let Some(ago) = small_frame_ago {
            queue.small_frames.offered();
            std::thread::sleep(ago);
        }
        queue.enqueue(frame(FrameKind::Send, 10 * chunk), 1).unwrap();
        let mut batch = queue.writing.lock().unwrap();
        assert!(queue.refill(&mut batch));
        batch
            .units
            .iter()
            .filter_map(|u| match u {
                Unit::Chunk { len, .. } => Some(*len),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_write_is_cut_into_chunks_only_while_small_frames_go_by() {
        let chunk = EXPRESS_MAX / 2;
        assert_eq!(chunks_of_a_write(Some(Duration::ZERO)), vec![chunk; 4]);
        let long_ago = SMALL_FRAMES_LATELY + Duration::from_millis(10);
        assert_eq!(chunks_of_a_write(Some(long_ago)), vec![4 * chunk]);
        assert_eq!(chunks_of_a_write(None), vec![4 * chunk]);
    }

    #[test]
    fn partial_vectored_writes_resume_where_they_stopped() {
        let parts: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; (i as usize) % 7 + 1]).collect();
        let expected: Vec<u8> = parts.concat();
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut out = Dribble(Vec::new());
        write_all_vectored(&mut out, &mut slices).unwrap();
        assert_eq!(out.0, expected);
    }
}
