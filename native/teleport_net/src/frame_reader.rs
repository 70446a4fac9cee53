//! The frame reader of an inbound connection: what the I/O thread calls whenever the
//! socket is readable. It reads the socket (or what TLS decrypted from it) and parses
//! frames (`framing`), small ones from its buffer and large bodies straight into the
//! buffer they are delivered in, and hands each to a `FrameSink`.

use std::io::{self, IoSliceMut, Read};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::error::{CloseReason, FrameRefusal};
use crate::framing::{self, FrameHeader, FrameKind, PoolToken, BULK_START_LEN, HEADER_LEN, POOL_TOKEN_LEN};
use crate::host::BodyBuffer;
use crate::socket;
use crate::tls::Session;

/// The reader's buffer: many small frames per system call.
pub(crate) const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How a read turn ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadTurn {
    /// The socket is empty: wait for it to be readable.
    Drained,
    /// A frame was deferred: read nothing more until it is resumed.
    Paused,
    /// This turn's share is read; more may be waiting: read again after the thread's
    /// other connections had theirs.
    More,
}

/// Whether the reader goes on after a frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Go,
    Pause,
}

/// What the frame reader hands complete frames to.
pub(crate) trait FrameSink {
    /// The connection's pool; `Pause` while the host confirms it.
    fn pool_token(&mut self, token: PoolToken) -> Result<Flow, CloseReason>;
    /// A buffer of the handler's own for a body of `len` bytes, if it wants one.
    fn body_buffer(&mut self, len: usize) -> Result<Option<Box<dyn BodyBuffer>>, CloseReason>;
    fn frame(&mut self, kind: FrameKind, body: Body<'_>) -> Result<Flow, CloseReason>;
    /// Bytes held for a bulk body under way: `len` from its start to its end.
    fn partial(&mut self, _len: usize, _started: bool) {}
}

pub(crate) enum Body<'a> {
    Slice(&'a [u8]),
    Owned(Box<dyn BodyBuffer>),
}

/// What the reader needs from a socket (a trait, so the reader is tested without one).
pub(crate) trait Receive {
    /// Whether `peek` and `discard` work; without them every read is a plain read.
    const CAN_PEEK: bool;
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Reads into `bufs` in order, each filled before the next (one `readv` on a
    /// socket); without vectored reads, into the first only.
    fn read_into(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match bufs.first_mut() {
            Some(first) => self.read(first),
            None => Ok(0),
        }
    }
    /// Puts the socket in delayed-ACK mode for the bytes the next peek finds.
    fn delay_acks(&mut self) {}
    /// Copies queued bytes into `buf` and leaves them queued; `WouldBlock` when empty.
    fn peek(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Drops `n` queued bytes (already peeked).
    fn discard(&mut self, _n: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether received bytes are parsed where they already are (`fill`, `consume`:
    /// decrypted TLS records), not copied into the reader's buffer first.
    const BUFFERED: bool = false;
    /// The next bytes received, in a buffer of the receiver's; `WouldBlock` when none,
    /// empty at the end of the stream.
    fn fill(&mut self) -> io::Result<&[u8]> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// `n` bytes of what `fill` returned were used.
    fn consume(&mut self, _n: usize) {}
}

/// Decrypted bytes (no peeking: bytes after a deferred frame are kept by the reader).
pub(crate) struct TlsReceive<'a> {
    pub tls: &'a mut Session,
    pub socket: &'a TcpStream,
}

impl Receive for TlsReceive<'_> {
    const CAN_PEEK: bool = false;
    const BUFFERED: bool = true;
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tls.read_plain(self.socket, buf)
    }
    fn fill(&mut self) -> io::Result<&[u8]> {
        self.tls.fill_plain(self.socket)
    }
    fn consume(&mut self, n: usize) {
        self.tls.consume_plain(n)
    }
}

/// The frame reader: a 64 KiB buffer, and how far the frame under way got.
///
/// Refills peek rather than read, and in delayed-ACK mode (Linux): the peeked bytes
/// leave the socket once their frames are delivered. A teleport connection carries
/// data one way only, so its ACKs never ride on replies: in quick-ACK mode the kernel
/// sends a pure ACK from inside the read that consumes a lone message, with the peer's
/// side of loopback processed on this thread, before the message reaches its process
/// (BENCHMARKS.md, "Latency"). A deferred frame leaves the bytes after it in the socket,
/// so nothing needs keeping while the connection waits. A large body is read with
/// plain reads straight into its own buffer, with no second copy.
pub(crate) struct FrameReader {
    buf: Box<[u8]>,
    /// Bytes received but not yet parsed: those that came with the handshake, or
    /// (where sockets cannot peek) those after a deferred frame.
    early: Vec<u8>,
    parser: Parser,
    /// Bytes read past a wrong guess and taken back out of a body (`read_direct`).
    #[cfg(test)]
    spilled: usize,
}

impl FrameReader {
    pub(crate) fn new(max_frame_bytes: u32, partial_grace: Duration, early: Vec<u8>) -> FrameReader {
        let mut parser = Parser::new(max_frame_bytes);
        parser.partial_grace = partial_grace;
        FrameReader {
            buf: vec![0u8; READ_BUFFER_BYTES].into_boxed_slice(),
            early,
            parser,
            #[cfg(test)]
            spilled: 0,
        }
    }

    /// One turn: reads and parses until the socket is empty, a frame is deferred, or
    /// `budget` bytes were read.
    /// When the large body under way must be whole, if one is.
    pub(crate) fn partial_deadline(&self) -> Option<Instant> {
        self.parser.bulk.as_ref().map(|bulk| bulk.deadline)
    }

    /// Whether a large body is coming in chunks.
    pub(crate) fn bulk_under_way(&self) -> bool {
        self.parser.bulk.is_some()
    }

    pub(crate) fn read_turn<R: Receive>(
        &mut self,
        sink: &mut dyn FrameSink,
        socket: &mut R,
        budget: usize,
    ) -> Result<ReadTurn, CloseReason> {
        if !self.early.is_empty() {
            let early = std::mem::take(&mut self.early);
            let (used, flow) = self.parser.consume(&early, sink)?;
            self.early = early[used..].to_vec();
            if flow == Flow::Pause {
                return Ok(ReadTurn::Paused);
            }
        }
        let mut read = 0;
        loop {
            if read >= budget {
                return Ok(ReadTurn::More);
            }
            // A large body, or a chunk of one: straight into its buffer.
            match self.read_direct(sink, socket)? {
                Direct::NoBody => {}
                Direct::Read(n, Flow::Go) => {
                    read += n;
                    continue;
                }
                Direct::Read(_, Flow::Pause) => return Ok(ReadTurn::Paused),
                Direct::Ended(turn) => return Ok(turn),
            }
            if R::BUFFERED {
                // Parsed in the receiver's buffer; what a deferred frame leaves stays there.
                let bytes = match socket.fill() {
                    Ok([]) if self.parser.between_frames() => return Err(CloseReason::PeerClosed),
                    Ok([]) => return Err(CloseReason::Io("closed")),
                    Ok(bytes) => bytes,
                    Err(e) => return would_block(e),
                };
                let (used, flow) = self.parser.consume(bytes, sink)?;
                read += used;
                socket.consume(used);
                if flow == Flow::Pause {
                    return Ok(ReadTurn::Paused);
                }
                continue;
            }
            // While a bulk body is under way, no further than the frame being read:
            // the next chunk's bytes then go straight into the body, not through here.
            let n = self.parser.read_limit(self.buf.len());
            // Reads that stop at the end of the header or body being read leave nothing
            // behind to keep in the socket: a plain read saves the peek's two calls per
            // chunk (its delayed-ACK mode and the discard).
            let peek = R::CAN_PEEK && !self.parser.reads_exactly();
            let got = if peek {
                socket.delay_acks();
                socket.peek(&mut self.buf[..n])
            } else {
                socket.read(&mut self.buf[..n])
            };
            let n = match got {
                Ok(0) if self.parser.between_frames() => return Err(CloseReason::PeerClosed),
                Ok(0) => return Err(CloseReason::Io("closed")),
                Ok(n) => n,
                Err(e) => return would_block(e),
            };
            let (used, flow) = self.parser.consume(&self.buf[..n], sink)?;
            read += used;
            if peek {
                socket.discard(used).map_err(|e| CloseReason::io(&e))?;
            } else {
                self.early.extend_from_slice(&self.buf[used..n]);
            }
            if flow == Flow::Pause {
                return Ok(ReadTurn::Paused);
            }
        }
    }
}

impl FrameReader {
    /// While a large body or a chunk of one is under way: one read of its rest straight
    /// into its buffer, the next frame's header, and, when a chunk is under way, the
    /// next chunk straight after it in the buffer, on the guess that the header is that
    /// chunk's (a sender cuts a body into chunks of one size). A bulk body then costs
    /// one call per chunk or fewer, not two. When the header is something else (a
    /// small frame between two chunks), the bytes read past it are taken out of the
    /// body's buffer and parsed as usual. `Direct::NoBody` when no body is under way.
    fn read_direct<R: Receive>(
        &mut self,
        sink: &mut dyn FrameSink,
        socket: &mut R,
    ) -> Result<Direct, CloseReason> {
        let Some((rest, next)) = self.parser.direct_rest(self.buf.len()) else {
            return Ok(Direct::NoBody);
        };
        let (rest_len, next_len) = (rest.len(), next.len());
        let (header, after) = self.buf[..2 * HEADER_LEN].split_at_mut(HEADER_LEN);
        // The second header only after a next chunk's place (a read skips empty buffers).
        let after = if next_len > 0 { after } else { &mut [] };
        let mut bufs = [
            IoSliceMut::new(rest),
            IoSliceMut::new(header),
            IoSliceMut::new(next),
            IoSliceMut::new(after),
        ];
        let n = match socket.read_into(&mut bufs) {
            Ok(0) => return Err(CloseReason::Io("closed")),
            Ok(n) => n,
            Err(e) => return would_block(e).map(Direct::Ended),
        };
        let rest_got = n.min(rest_len);
        let header_got = (n - rest_got).min(HEADER_LEN);
        let past = (n - rest_got - header_got).min(next_len);
        let after_got = n - rest_got - header_got - past;
        let guessed = past > 0 && is_chunk_header(&self.buf[..HEADER_LEN], next_len);
        let mut flow = self.parser.direct_filled(rest_got, sink)?;
        // Bytes past a header that is not the guessed chunk's: out of the body's buffer
        // before anything else is written there.
        let spilled = if past > 0 && !guessed {
            let mut spilled = self.parser.bulk_bytes_ahead(past)?;
            spilled.extend_from_slice(&self.buf[HEADER_LEN..HEADER_LEN + after_got]);
            #[cfg(test)]
            {
                self.spilled += spilled.len();
            }
            spilled
        } else {
            Vec::new()
        };
        let (parser, early) = (&mut self.parser, &mut self.early);
        flow = feed(parser, early, &self.buf[..header_got], flow, sink)?;
        if guessed {
            // The header was the chunk's: its bytes are in place.
            match flow {
                Flow::Go => flow = self.parser.direct_filled(past, sink)?,
                Flow::Pause => {
                    let ahead = self.parser.bulk_bytes_ahead(past)?;
                    self.early.extend_from_slice(&ahead);
                }
            }
            let after = &self.buf[HEADER_LEN..HEADER_LEN + after_got];
            flow = feed(&mut self.parser, &mut self.early, after, flow, sink)?;
            return Ok(Direct::Read(n, flow));
        }
        flow = feed(&mut self.parser, &mut self.early, &spilled, flow, sink)?;
        Ok(Direct::Read(n, flow))
    }
}

/// What `read_direct` did.
enum Direct {
    /// No large body is under way.
    NoBody,
    /// Read this many bytes.
    Read(usize, Flow),
    /// Nothing to read (or the read failed): the turn ends so.
    Ended(ReadTurn),
}

/// Whether `header` is a chunk's of `len` bytes.
fn is_chunk_header(header: &[u8], len: usize) -> bool {
    header
        .try_into()
        .ok()
        .and_then(|header| FrameHeader::decode(header, u32::MAX).ok())
        .is_some_and(|h| h.kind == FrameKind::BulkChunk && h.body_len as usize == len)
}

/// Parses `bytes` while the flow goes on; what is not parsed (all of it once paused)
/// waits in `early`, in order, for the next turn.
fn feed(
    parser: &mut Parser,
    early: &mut Vec<u8>,
    bytes: &[u8],
    flow: Flow,
    sink: &mut dyn FrameSink,
) -> Result<Flow, CloseReason> {
    if flow == Flow::Pause || bytes.is_empty() {
        early.extend_from_slice(bytes);
        return Ok(flow);
    }
    let (used, flow) = parser.consume(bytes, sink)?;
    early.extend_from_slice(&bytes[used..]);
    Ok(flow)
}

fn would_block(e: io::Error) -> Result<ReadTurn, CloseReason> {
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(ReadTurn::Drained),
        // Read again at the next turn.
        io::ErrorKind::Interrupted => Ok(ReadTurn::More),
        _ => Err(CloseReason::io(&e)),
    }
}

/// Bodies at least this large go to a buffer of the handler's own if it wants one.
/// Smaller ones are delivered from the read buffer when they are in it whole.
enum PartialBody {
    /// Gathered in `Parser::scratch`.
    Small { kind: FrameKind, len: usize },
    Owned {
        kind: FrameKind,
        buffer: Box<dyn BodyBuffer>,
        filled: usize,
    },
    /// The next `left` bytes of the stream are a chunk of the bulk body.
    Chunk { left: usize },
}

/// A bulk body under way (`framing`: a `BulkStart`, then chunks): at most one per
/// connection, so a peer makes the node hold at most one partial body per connection.
struct Bulk {
    kind: FrameKind,
    len: usize,
    filled: usize,
    buffer: BulkBuffer,
    /// The length of the last chunk begun: the guess for the next one's.
    chunk: usize,
    /// It must be whole by then (`partial_deadline`).
    deadline: Instant,
}

/// A large body must be whole `handshake_timeout` after it starts, plus a second per
/// `PARTIAL_MIN_RATE` bytes: a peer that starts one and stalls (or trickles) cannot
/// make the node hold its buffer for ever. 512 MiB may take 9 minutes.
const PARTIAL_MIN_RATE: u64 = 1 << 20;

/// When a large body of `len` bytes started now must be whole.
fn partial_deadline(grace: Duration, len: usize) -> Instant {
    Instant::now() + grace + Duration::from_secs(len as u64 / PARTIAL_MIN_RATE)
}

enum BulkBuffer {
    /// The handler's own, which the body is delivered in.
    Owned(Box<dyn BodyBuffer>),
    /// The handler lends none (tests, fuzzing): gathered here, growing with the chunks.
    Gathered(Vec<u8>),
}

/// Frames from bytes: the header (5 bytes, checked before any allocation) and the body,
/// however the bytes are split.
struct Parser {
    header: [u8; HEADER_LEN],
    header_len: usize,
    body: Option<PartialBody>,
    bulk: Option<Bulk>,
    /// Bodies split over reads are gathered here (reused between frames).
    scratch: Vec<u8>,
    epoch_seen: bool,
    max_frame_bytes: u32,
    /// See `partial_deadline`.
    partial_grace: Duration,
}

impl Parser {
    fn new(max_frame_bytes: u32) -> Parser {
        Parser {
            partial_grace: Duration::from_secs(5),
            header: [0; HEADER_LEN],
            header_len: 0,
            body: None,
            bulk: None,
            scratch: Vec::new(),
            epoch_seen: false,
            max_frame_bytes,
        }
    }

    fn between_frames(&self) -> bool {
        self.header_len == 0 && self.body.is_none() && self.bulk.is_none()
    }

    /// Whether `read_limit` stops reads at the end of the header or body being read.
    fn reads_exactly(&self) -> bool {
        self.bulk.is_some()
    }

    /// How many bytes a read should take at most, `max` at most: while a bulk body is
    /// under way, only up to the end of the header or small body being read.
    fn read_limit(&mut self, max: usize) -> usize {
        if self.bulk.is_none() {
            return max;
        }
        let left = match &mut self.body {
            None => HEADER_LEN - self.header_len,
            Some(PartialBody::Small { len, .. }) => *len - self.scratch.len(),
            Some(PartialBody::Owned { buffer, filled, .. }) => buffer.as_mut_slice().len() - *filled,
            Some(PartialBody::Chunk { left }) => *left,
        };
        left.clamp(1, max)
    }

    /// Parses `bytes`, delivering every frame completed; returns how many bytes were
    /// used (all of them, unless a frame was deferred: then those up to its end).
    fn consume(&mut self, bytes: &[u8], sink: &mut dyn FrameSink) -> Result<(usize, Flow), CloseReason> {
        let mut at = 0;
        while at < bytes.len() {
            let flow = match &mut self.body {
                None => {
                    let take = (HEADER_LEN - self.header_len).min(bytes.len() - at);
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&bytes[at..at + take]);
                    self.header_len += take;
                    at += take;
                    if self.header_len < HEADER_LEN {
                        break;
                    }
                    self.header_len = 0;
                    let (kind, len) = self.start_frame()?;
                    if kind == FrameKind::BulkChunk {
                        self.body = Some(PartialBody::Chunk { left: len });
                        if let Some(bulk) = &mut self.bulk {
                            bulk.chunk = len;
                        }
                        continue;
                    }
                    if kind.is_message() && len >= OWN_BUFFER_MIN {
                        if let Some(buffer) = sink.body_buffer(len)? {
                            self.body = Some(PartialBody::Owned {
                                kind,
                                buffer,
                                filled: 0,
                            });
                            continue;
                        }
                    }
                    if bytes.len() - at >= len {
                        // Whole in the buffer: delivered from there, no copy.
                        let body = &bytes[at..at + len];
                        at += len;
                        self.complete(kind, Body::Slice(body), sink)?
                    } else {
                        self.scratch.clear();
                        self.body = Some(PartialBody::Small { kind, len });
                        continue;
                    }
                }
                Some(PartialBody::Small { kind, len }) => {
                    let (kind, len) = (*kind, *len);
                    let take = (len - self.scratch.len()).min(bytes.len() - at);
                    self.scratch.extend_from_slice(&bytes[at..at + take]);
                    at += take;
                    if self.scratch.len() < len {
                        break;
                    }
                    self.body = None;
                    let scratch = std::mem::take(&mut self.scratch);
                    let flow = self.complete(kind, Body::Slice(&scratch), sink);
                    // A large body's buffer is not kept between frames.
                    if scratch.capacity() <= 1 << 20 {
                        self.scratch = scratch;
                    }
                    flow?
                }
                Some(PartialBody::Owned { buffer, filled, .. }) => {
                    let dest = &mut buffer.as_mut_slice()[*filled..];
                    let take = dest.len().min(bytes.len() - at);
                    dest[..take].copy_from_slice(&bytes[at..at + take]);
                    at += take;
                    match self.direct_filled(take, sink)? {
                        Flow::Go => continue,
                        Flow::Pause => Flow::Pause,
                    }
                }
                Some(PartialBody::Chunk { left }) => {
                    let take = (*left).min(bytes.len() - at);
                    let chunk = &bytes[at..at + take];
                    at += take;
                    let Some(bulk) = &mut self.bulk else {
                        return Err(CloseReason::Internal("a chunk without its bulk body".to_string()));
                    };
                    match &mut bulk.buffer {
                        BulkBuffer::Owned(buffer) => {
                            buffer.as_mut_slice()[bulk.filled..bulk.filled + take].copy_from_slice(chunk)
                        }
                        BulkBuffer::Gathered(gathered) => gathered.extend_from_slice(chunk),
                    }
                    match self.chunk_filled(take, sink)? {
                        Flow::Go => continue,
                        Flow::Pause => Flow::Pause,
                    }
                }
            };
            if flow == Flow::Pause {
                return Ok((at, Flow::Pause));
            }
        }
        Ok((at, Flow::Go))
    }

    /// Checks a complete header: the first frame names the sender's pool, no other does;
    /// a chunk belongs to a bulk body under way and does not go past its end.
    fn start_frame(&mut self) -> Result<(FrameKind, usize), CloseReason> {
        let max = if self.epoch_seen {
            self.max_frame_bytes
        } else {
            POOL_TOKEN_LEN as u32
        };
        let header =
            FrameHeader::decode(&self.header, max).map_err(|e| CloseReason::BadFrame(e.refusal()))?;
        let (kind, len) = (header.kind, header.body_len as usize);
        let is_epoch = kind == FrameKind::PoolEpoch;
        if is_epoch == self.epoch_seen || (is_epoch && len != POOL_TOKEN_LEN) {
            return Err(CloseReason::BadFrame(FrameRefusal::PoolEpoch));
        }
        match kind {
            FrameKind::BulkStart if len != BULK_START_LEN || self.bulk.is_some() => {
                Err(CloseReason::BadFrame(FrameRefusal::BulkStart))
            }
            FrameKind::BulkChunk => match &self.bulk {
                Some(bulk) if len <= bulk.len - bulk.filled => Ok((kind, len)),
                _ => Err(CloseReason::BadFrame(FrameRefusal::BulkChunk)),
            },
            _ => Ok((kind, len)),
        }
    }

    fn complete(
        &mut self,
        kind: FrameKind,
        body: Body<'_>,
        sink: &mut dyn FrameSink,
    ) -> Result<Flow, CloseReason> {
        let Body::Slice(bytes) = body else {
            return sink.frame(kind, body);
        };
        match kind {
            FrameKind::PoolEpoch => {
                let mut token = [0u8; POOL_TOKEN_LEN];
                token.copy_from_slice(bytes);
                self.epoch_seen = true;
                sink.pool_token(token)
            }
            FrameKind::BulkStart => {
                self.start_bulk(bytes, sink)?;
                Ok(Flow::Go)
            }
            _ => sink.frame(kind, body),
        }
    }

    /// A `BulkStart`: the body's kind and length, checked; its buffer, taken now, is
    /// what the chunks are read into.
    fn start_bulk(&mut self, start: &[u8], sink: &mut dyn FrameSink) -> Result<(), CloseReason> {
        let bad = CloseReason::BadFrame(FrameRefusal::BulkStart);
        let (&kind, len) = start.split_first().ok_or(bad.clone())?;
        let kind = FrameKind::from_byte(kind)
            .filter(|k| k.is_message())
            .ok_or(bad.clone())?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| bad.clone())?) as usize;
        if len == 0 {
            return Err(bad);
        }
        framing::check_body_len(len, self.max_frame_bytes).map_err(|e| CloseReason::BadFrame(e.refusal()))?;
        let buffer = match sink.body_buffer(len)? {
            Some(buffer) => BulkBuffer::Owned(buffer),
            None => BulkBuffer::Gathered(Vec::new()),
        };
        sink.partial(len, true);
        self.bulk = Some(Bulk {
            kind,
            len,
            filled: 0,
            buffer,
            chunk: 0,
            deadline: partial_deadline(self.partial_grace, len),
        });
        Ok(())
    }

    /// Where the bytes being read can go straight, if more than `min` of them are left
    /// (a large body's rest), or any (a chunk of a bulk body the handler lent a buffer
    /// for); and, for a chunk, where the next chunk's would go if it is as long as this
    /// one (or the body's rest, if shorter), empty if the body ends with this chunk.
    fn direct_rest(&mut self, min: usize) -> Option<(&mut [u8], &mut [u8])> {
        match (&mut self.body, &mut self.bulk) {
            (Some(PartialBody::Owned { buffer, filled, .. }), _) => {
                let rest = &mut buffer.as_mut_slice()[*filled..];
                (rest.len() > min).then_some((rest, &mut []))
            }
            (
                Some(PartialBody::Chunk { left }),
                Some(Bulk {
                    buffer: BulkBuffer::Owned(buffer),
                    filled,
                    len,
                    chunk,
                    ..
                }),
            ) if *left > 0 => {
                let end = *filled + *left;
                let next = (*len - end).min(*chunk);
                Some(buffer.as_mut_slice()[*filled..end + next].split_at_mut(*left))
            }
            _ => None,
        }
    }

    /// A copy of the `n` bytes after the part of the bulk body filled so far (read
    /// there on a wrong guess, see `FrameReader::read_direct`).
    fn bulk_bytes_ahead(&mut self, n: usize) -> Result<Vec<u8>, CloseReason> {
        match &mut self.bulk {
            Some(Bulk {
                buffer: BulkBuffer::Owned(buffer),
                filled,
                ..
            }) => buffer
                .as_mut_slice()
                .get(*filled..*filled + n)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| CloseReason::Internal("bytes read past a bulk body's end".to_string())),
            _ => Err(CloseReason::Internal(
                "bytes read past a chunk without its body".to_string(),
            )),
        }
    }

    /// `n` bytes went to where `direct_rest` said.
    fn direct_filled(&mut self, n: usize, sink: &mut dyn FrameSink) -> Result<Flow, CloseReason> {
        match &mut self.body {
            Some(PartialBody::Chunk { .. }) => self.chunk_filled(n, sink),
            Some(PartialBody::Owned { buffer, filled, .. }) => {
                *filled += n;
                if *filled < buffer.as_mut_slice().len() {
                    return Ok(Flow::Go);
                }
                let Some(PartialBody::Owned { kind, buffer, .. }) = self.body.take() else {
                    return Ok(Flow::Go);
                };
                self.complete(kind, Body::Owned(buffer), sink)
            }
            _ => Ok(Flow::Go),
        }
    }

    /// `n` more bytes of the chunk under way are in the bulk body; delivers it once whole.
    fn chunk_filled(&mut self, n: usize, sink: &mut dyn FrameSink) -> Result<Flow, CloseReason> {
        let (Some(PartialBody::Chunk { left }), Some(bulk)) = (&mut self.body, &mut self.bulk) else {
            return Ok(Flow::Go);
        };
        *left -= n;
        bulk.filled += n;
        if *left == 0 {
            self.body = None;
        }
        if bulk.filled < bulk.len {
            return Ok(Flow::Go);
        }
        let Some(Bulk {
            kind, len, buffer, ..
        }) = self.bulk.take()
        else {
            return Ok(Flow::Go);
        };
        sink.partial(len, false);
        match buffer {
            BulkBuffer::Owned(buffer) => sink.frame(kind, Body::Owned(buffer)),
            BulkBuffer::Gathered(gathered) => sink.frame(kind, Body::Slice(&gathered)),
        }
    }
}

/// What `parse_stream` hands each data frame to.
pub(crate) type OnFrame<'a> = dyn FnMut(FrameKind, &[u8]) -> Result<(), String> + 'a;

/// Parses a whole inbound stream (what follows the handshake) as a connection's
/// reader would, handing each data frame's body to `on_frame`: `Ok` at a clean end
/// between frames, else why the connection would close (fuzzing and tests).
pub(crate) fn parse_stream(
    data: &[u8],
    max_frame_bytes: u32,
    on_frame: &mut OnFrame<'_>,
) -> Result<(), String> {
    struct Collect<'a, 'b>(&'a mut OnFrame<'b>);
    impl FrameSink for Collect<'_, '_> {
        fn pool_token(&mut self, _token: PoolToken) -> Result<Flow, CloseReason> {
            Ok(Flow::Go)
        }
        fn body_buffer(&mut self, _len: usize) -> Result<Option<Box<dyn BodyBuffer>>, CloseReason> {
            Ok(None)
        }
        fn frame(&mut self, kind: FrameKind, body: Body<'_>) -> Result<Flow, CloseReason> {
            let Body::Slice(bytes) = body else {
                return Err(CloseReason::Internal("no buffer was lent".to_string()));
            };
            (self.0)(kind, bytes).map_err(CloseReason::Malformed)?;
            Ok(Flow::Go)
        }
    }
    let mut parser = Parser::new(max_frame_bytes);
    parser
        .consume(data, &mut Collect(on_frame))
        .map_err(|e| e.to_string())?;
    if parser.between_frames() {
        Ok(())
    } else {
        Err("closed mid-frame".to_string())
    }
}

/// Bodies at least this large are offered a buffer of the handler's own.
const OWN_BUFFER_MIN: usize = 64 * 1024;

impl Receive for &TcpStream {
    const CAN_PEEK: bool = socket::CAN_PEEK;

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buf)
    }

    fn read_into(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        Read::read_vectored(self, bufs)
    }

    fn delay_acks(&mut self) {
        socket::delay_acks(self)
    }

    fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        socket::peek(self, buf)
    }

    fn discard(&mut self, n: usize) -> io::Result<()> {
        socket::discard(self, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::encode_frame;

    /// Records frames; lends buffers for bodies of `lend_from` bytes or more; defers
    /// the frames whose body is `b"defer"`.
    #[derive(Default)]
    struct Recorder {
        tokens: Vec<PoolToken>,
        frames: Vec<(FrameKind, Vec<u8>, bool)>,
        lend_from: Option<usize>,
    }

    struct Lent(Vec<u8>);
    impl BodyBuffer for Lent {
        fn as_mut_slice(&mut self) -> &mut [u8] {
            &mut self.0
        }
        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
            self
        }
    }

    impl FrameSink for Recorder {
        fn pool_token(&mut self, token: PoolToken) -> Result<Flow, CloseReason> {
            self.tokens.push(token);
            Ok(Flow::Go)
        }
        fn body_buffer(&mut self, len: usize) -> Result<Option<Box<dyn BodyBuffer>>, CloseReason> {
            Ok(self
                .lend_from
                .filter(|&from| len >= from)
                .map(|_| Box::new(Lent(vec![0; len])) as Box<dyn BodyBuffer>))
        }
        fn frame(&mut self, kind: FrameKind, body: Body<'_>) -> Result<Flow, CloseReason> {
            let (bytes, lent) = match body {
                Body::Slice(bytes) => (bytes.to_vec(), false),
                Body::Owned(buffer) => (buffer.into_any().downcast::<Lent>().unwrap().0, true),
            };
            let defer = bytes == b"defer";
            self.frames.push((kind, bytes, lent));
            Ok(if defer { Flow::Pause } else { Flow::Go })
        }
    }

    const TOKEN: PoolToken = [7; POOL_TOKEN_LEN];

    fn stream(bodies: &[&[u8]]) -> Vec<u8> {
        let mut wire = encode_frame(FrameKind::PoolEpoch, &TOKEN);
        for body in bodies {
            wire.extend(encode_frame(FrameKind::Send, body));
        }
        wire
    }

    /// `wire` given to a parser `step` bytes at a time, with buffers lent for bodies of
    /// `lend` bytes and more; every piece taken, and the parser between frames at the end.
    fn feed_in_steps(wire: &[u8], step: usize, lend: Option<usize>) -> Recorder {
        let mut parser = Parser::new(1 << 20);
        let mut sink = Recorder {
            lend_from: lend,
            ..Recorder::default()
        };
        for chunk in wire.chunks(step) {
            assert_eq!(parser.consume(chunk, &mut sink).unwrap(), (chunk.len(), Flow::Go));
        }
        assert!(parser.between_frames());
        sink
    }

    #[test]
    fn frames_split_anywhere_arrive_whole_and_in_order() {
        let big = vec![9u8; 100_000];
        let bodies: Vec<&[u8]> = vec![b"a", b"hello", &big, b"z"];
        let wire = stream(&bodies);
        for step in [1, 2, 3, 4, 5, 6, 7, 4096, wire.len()] {
            for lend in [None, Some(OWN_BUFFER_MIN)] {
                let sink = feed_in_steps(&wire, step, lend);
                assert_eq!(sink.tokens, vec![TOKEN]);
                let got: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
                assert_eq!(got, bodies, "step {step}");
                // Only the large body went to a lent buffer, and only when one was offered.
                let lent: Vec<bool> = sink.frames.iter().map(|f| f.2).collect();
                assert_eq!(lent, vec![false, false, lend.is_some(), false]);
            }
        }
    }

    /// `body` as a bulk body of `chunks` chunks, with `between` (a Send) after each.
    fn bulk(body: &[u8], chunks: usize, between: &[u8]) -> Vec<u8> {
        let mut wire = crate::framing::bulk_start(FrameKind::Send, body.len() as u32).to_vec();
        for chunk in body.chunks(body.len().div_ceil(chunks)) {
            wire.extend(encode_frame(FrameKind::BulkChunk, chunk));
            wire.extend(encode_frame(FrameKind::Send, between));
        }
        wire
    }

    #[test]
    fn a_bulk_body_arrives_whole_after_the_frames_between_its_chunks() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = stream(&[b"first"]);
        wire.extend(bulk(&big, 3, b"between"));
        wire.extend(encode_frame(FrameKind::Send, b"last"));
        for step in [1, 7, 4096, 70_000, wire.len()] {
            for lend in [None, Some(OWN_BUFFER_MIN)] {
                let sink = feed_in_steps(&wire, step, lend);
                let got: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
                // The body is delivered as its last chunk completes it.
                let expected: Vec<&[u8]> = vec![b"first", b"between", b"between", &big, b"between", b"last"];
                assert!(got == expected, "step {step}, lend {lend:?}");
                assert_eq!(
                    sink.frames[3].2,
                    lend.is_some(),
                    "the bulk body in the lent buffer"
                );
            }
        }
    }

    #[test]
    fn bulk_frames_out_of_place_close_the_connection() {
        let refused = |tail: Vec<u8>, max: u32| {
            let mut wire = stream(&[]);
            wire.extend(tail);
            Parser::new(max)
                .consume(&wire, &mut Recorder::default())
                .unwrap_err()
        };
        let start = |len: u32| crate::framing::bulk_start(FrameKind::Send, len).to_vec();
        let chunk = |bytes: &[u8]| encode_frame(FrameKind::BulkChunk, bytes);
        // A chunk with no bulk body under way, and one past the body's end.
        assert_eq!(
            refused(chunk(b"x"), 1024),
            CloseReason::BadFrame(FrameRefusal::BulkChunk)
        );
        assert_eq!(
            refused([start(3), chunk(b"four")].concat(), 1024),
            CloseReason::BadFrame(FrameRefusal::BulkChunk)
        );
        // A second body before the first is whole.
        assert_eq!(
            refused([start(8), chunk(b"ab"), start(4)].concat(), 1024),
            CloseReason::BadFrame(FrameRefusal::BulkStart)
        );
        // A body over the cap is refused at its start, before any buffer is taken.
        assert_eq!(
            refused(start(2048), 1024),
            CloseReason::BadFrame(FrameRefusal::FrameTooLarge)
        );
        // An empty body, a kind that is not a message, a start of the wrong size.
        assert_eq!(
            refused(start(0), 1024),
            CloseReason::BadFrame(FrameRefusal::BulkStart)
        );
        let mut pool = start(4);
        pool[5] = FrameKind::PoolEpoch as u8;
        assert_eq!(
            refused(pool, 1024),
            CloseReason::BadFrame(FrameRefusal::BulkStart)
        );
        assert_eq!(
            refused(encode_frame(FrameKind::BulkStart, &[1, 0, 0, 0, 4, 0]), 1024),
            CloseReason::BadFrame(FrameRefusal::BulkStart)
        );
        // The stream ending inside a bulk body is not a clean end.
        let mut parser = Parser::new(1024);
        let mut wire = stream(&[]);
        wire.extend([start(8), chunk(b"abcd")].concat());
        parser.consume(&wire, &mut Recorder::default()).unwrap();
        assert!(!parser.between_frames());
    }

    /// `wire` read in one turn, buffers lent for large bodies: what arrived, the calls
    /// made on the socket, and how many bytes were read past a wrong guess.
    fn read_all_lending(wire: Vec<u8>) -> (Recorder, Script, usize) {
        let mut socket = Script::new(wire);
        let mut sink = Recorder {
            lend_from: Some(OWN_BUFFER_MIN),
            ..Recorder::default()
        };
        let mut reader = reader();
        let turn = reader.read_turn(&mut sink, &mut socket, usize::MAX);
        assert_eq!(turn, Ok(ReadTurn::Drained));
        (sink, socket, reader.spilled)
    }

    #[test]
    fn a_bulk_chunk_is_read_straight_into_the_bodys_buffer() {
        let big = vec![3u8; 4 * READ_BUFFER_BYTES];
        let mut wire = stream(&[]);
        wire.extend(bulk(&big, 2, b"between"));
        let (sink, socket, _) = read_all_lending(wire);
        assert_eq!(sink.frames.len(), 3);
        assert!(sink.frames[1].1 == big && sink.frames[1].2);
        // Once the body is under way every call is a read that stops at the end of a
        // header, a small frame or a chunk: no peek, no discard, and chunk bytes go
        // straight into the body (two chunks, two headers, the frame between: a few reads).
        let first_discard = socket
            .ops
            .iter()
            .position(|op| matches!(op, Op::Discard(_)))
            .unwrap();
        let after = &socket.ops[first_discard + 1..];
        let last_read = after.iter().rposition(|op| matches!(op, Op::Read(_))).unwrap();
        assert!(
            after[..=last_read].iter().all(|op| matches!(op, Op::Read(_))),
            "{after:?}"
        );
        assert!(last_read < 8, "{after:?}");
        let read: usize = after
            .iter()
            .map(|op| if let Op::Read(n) = op { *n } else { 0 })
            .sum();
        assert!(read > big.len() / 2, "{after:?}");
    }

    /// A bulk body's wire: `BulkStart`, then chunks of the given lengths, each followed
    /// by the frame given with it, if any; then `b"last"`.
    fn chunked(body: &[u8], pieces: &[(usize, Option<&[u8]>)]) -> Vec<u8> {
        let mut wire = stream(&[]);
        wire.extend(crate::framing::bulk_start(FrameKind::Send, body.len() as u32));
        let mut at = 0;
        for &(len, between) in pieces {
            wire.extend(encode_frame(FrameKind::BulkChunk, &body[at..at + len]));
            at += len;
            if let Some(between) = between {
                wire.extend(encode_frame(FrameKind::Send, between));
            }
        }
        assert_eq!(at, body.len());
        wire.extend(encode_frame(FrameKind::Send, b"last"));
        wire
    }

    fn patterned(len: usize) -> Vec<u8> {
        (0..len as u32).map(|i| (i % 251) as u8).collect()
    }

    /// Chunks of one size back to back: each read takes a chunk's rest, the next
    /// header and the next chunk, so a body costs one call per two chunks.
    #[test]
    fn a_read_takes_the_next_chunk_of_the_same_size_too() {
        let (chunks, len) = (16, 2 * READ_BUFFER_BYTES);
        let big = patterned(chunks * len);
        let (sink, socket, spilled) = read_all_lending(chunked(&big, &vec![(len, None); chunks]));
        let got: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
        assert!(got == vec![&big[..], b"last"]);
        assert_eq!(spilled, 0, "every guess right, nothing copied twice");
        let reads = socket.ops.iter().filter(|op| matches!(op, Op::Read(_))).count();
        assert!(reads <= chunks / 2 + 3, "{reads} reads: {:?}", socket.ops);
    }

    /// A wrong guess (a small frame, or a chunk of another size, after a chunk): the
    /// bytes read past the header are parsed as usual, and the body is intact.
    #[test]
    fn bytes_read_past_a_header_that_is_not_the_guessed_chunk_are_parsed_as_usual() {
        let small: &[u8] = b"between";
        let medium = patterned(5000);
        let pieces: Vec<(usize, Option<&[u8]>)> = vec![
            (100_000, None),
            (100_000, Some(small)),
            (100_000, Some(&medium)),
            (70_000, None),
            (130_000, Some(b"x")),
            (130_000, None),
            (1, Some(small)),
            (99_999, None),
        ];
        let big = patterned(pieces.iter().map(|p| p.0).sum());
        let wire = chunked(&big, &pieces);
        let (sink, _, spilled) = read_all_lending(wire.clone());
        assert!(spilled > 0, "some guesses wrong");
        let got: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
        let expected: Vec<&[u8]> = vec![small, &medium, b"x", small, &big, b"last"];
        assert!(
            got == expected,
            "{:?}",
            sink.frames.iter().map(|f| f.1.len()).collect::<Vec<_>>()
        );
        // Fed in every split a socket could make, the same.
        for step in [1, 5, 6, 4096, 99_999, 100_005] {
            let sink = feed_in_steps(&wire, step, Some(OWN_BUFFER_MIN));
            let got: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
            assert!(got == expected, "step {step}");
        }
    }

    /// A body's last chunk, then straight away another body: nothing is guessed past
    /// the last chunk, and what follows it is parsed as usual.
    #[test]
    fn bulk_bodies_back_to_back_arrive_whole() {
        let (first, second) = (patterned(65_537), patterned(262_125));
        let mut wire = chunked(&first, &[(first.len(), None)]);
        wire.truncate(wire.len() - HEADER_LEN - 4);
        wire.extend(crate::framing::bulk_start(FrameKind::Send, second.len() as u32));
        wire.extend(encode_frame(FrameKind::BulkChunk, &second[..200_000]));
        wire.extend(encode_frame(FrameKind::BulkChunk, &second[200_000..]));
        wire.extend(encode_frame(FrameKind::Send, b"last"));
        let (sink, _, _) = read_all_lending(wire);
        let got: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
        assert!(got == vec![&first[..], &second[..], b"last"]);
    }

    #[test]
    fn the_first_frame_names_the_pool_and_no_other_does() {
        let mut sink = Recorder::default();
        let data = encode_frame(FrameKind::Send, b"x");
        let refused = Parser::new(1024).consume(&data, &mut sink);
        assert_eq!(
            refused.unwrap_err(),
            CloseReason::BadFrame(FrameRefusal::PoolEpoch)
        );
        assert!(sink.tokens.is_empty());
        let mut twice = stream(&[]);
        twice.extend(encode_frame(FrameKind::PoolEpoch, &TOKEN));
        let refused = Parser::new(1024).consume(&twice, &mut sink);
        assert_eq!(
            refused.unwrap_err(),
            CloseReason::BadFrame(FrameRefusal::PoolEpoch)
        );
        // A token of the wrong size is refused by its header, before its body.
        let short = encode_frame(FrameKind::PoolEpoch, &[1; 4]);
        assert!(Parser::new(1024).consume(&short, &mut sink).is_err());
        // Only the first, well-formed announcement got through.
        assert_eq!(sink.tokens, vec![TOKEN]);
        assert!(sink.frames.is_empty());
    }

    #[test]
    fn an_oversized_length_is_refused_from_its_header() {
        let mut wire = stream(&[]);
        wire.extend([0xff, 0xff, 0xff, 0xff, FrameKind::Send as u8]);
        let mut sink = Recorder::default();
        let refused = Parser::new(1 << 20).consume(&wire, &mut sink);
        assert_eq!(
            refused.unwrap_err(),
            CloseReason::BadFrame(FrameRefusal::FrameTooLarge)
        );
    }

    #[test]
    fn a_deferred_frame_stops_the_parser_right_after_it() {
        let wire = stream(&[b"one", b"defer", b"three"]);
        let mut parser = Parser::new(1024);
        let mut sink = Recorder::default();
        let (used, flow) = parser.consume(&wire, &mut sink).unwrap();
        assert_eq!(flow, Flow::Pause);
        let end_of_deferred = stream(&[b"one", b"defer"]).len();
        assert_eq!(used, end_of_deferred);
        assert_eq!(sink.frames.len(), 2);
        assert_eq!(
            parser.consume(&wire[used..], &mut sink).unwrap(),
            (wire.len() - used, Flow::Go)
        );
        assert_eq!(sink.frames[2].1, b"three");
    }

    #[derive(Debug, PartialEq)]
    enum Op {
        Read(usize),
        DelayAcks,
        Peek(usize),
        Discard(usize),
    }

    /// A socket stand-in holding `data` (then `WouldBlock`), recording each call.
    struct Script {
        data: Vec<u8>,
        at: usize,
        ops: Vec<Op>,
    }

    impl Script {
        fn new(data: Vec<u8>) -> Script {
            Script {
                data,
                at: 0,
                ops: Vec::new(),
            }
        }
        fn copy_out(&self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.data.len() - self.at);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            Ok(n)
        }
    }

    impl Receive for Script {
        const CAN_PEEK: bool = true;
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.copy_out(buf)?;
            self.ops.push(Op::Read(n));
            self.at += n;
            Ok(n)
        }
        fn read_into(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            let mut n = 0;
            // As readv: empty buffers are skipped.
            for buf in bufs.iter_mut().filter(|buf| !buf.is_empty()) {
                let got = match self.copy_out(buf) {
                    Ok(got) => got,
                    Err(e) if n == 0 => return Err(e),
                    Err(_) => break,
                };
                self.at += got;
                n += got;
                if got < buf.len() {
                    break;
                }
            }
            self.ops.push(Op::Read(n));
            Ok(n)
        }
        fn delay_acks(&mut self) {
            self.ops.push(Op::DelayAcks);
        }
        fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.copy_out(buf)?;
            self.ops.push(Op::Peek(n));
            Ok(n)
        }
        fn discard(&mut self, n: usize) -> io::Result<()> {
            self.ops.push(Op::Discard(n));
            self.at += n;
            Ok(())
        }
    }

    fn reader() -> FrameReader {
        FrameReader::new(64 << 20, Duration::from_secs(5), Vec::new())
    }

    #[test]
    fn peeked_bytes_leave_the_socket_only_once_delivered() {
        let wire = stream(&[b"ping", b"pong"]);
        let mut socket = Script::new(wire.clone());
        let mut sink = Recorder::default();
        let turn = reader().read_turn(&mut sink, &mut socket, usize::MAX);
        assert_eq!(turn, Ok(ReadTurn::Drained));
        use Op::*;
        assert_eq!(
            socket.ops,
            [DelayAcks, Peek(wire.len()), Discard(wire.len()), DelayAcks]
        );
        assert_eq!(sink.frames.len(), 2);
    }

    #[test]
    fn a_deferred_frame_leaves_what_follows_in_the_socket() {
        let wire = stream(&[b"defer", b"after"]);
        let mut socket = Script::new(wire.clone());
        let mut sink = Recorder::default();
        let mut reader = reader();
        assert_eq!(
            reader.read_turn(&mut sink, &mut socket, usize::MAX),
            Ok(ReadTurn::Paused)
        );
        let deferred_end = stream(&[b"defer"]).len();
        assert_eq!(
            socket.at, deferred_end,
            "only the bytes up to the deferred frame's end left"
        );
        assert_eq!(
            reader.read_turn(&mut sink, &mut socket, usize::MAX),
            Ok(ReadTurn::Drained)
        );
        let bodies: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
        assert_eq!(bodies, vec![&b"defer"[..], b"after"]);
    }

    #[test]
    fn a_large_body_is_read_straight_into_its_own_buffer() {
        let big = vec![5u8; 3 * READ_BUFFER_BYTES + 17];
        let wire = stream(&[&big, b"next"]);
        let (sink, socket, _) = read_all_lending(wire);
        assert_eq!(sink.frames.len(), 2);
        assert!(sink.frames[0].1 == big && sink.frames[0].2);
        // After the first peek, the body's bulk comes by plain reads, not peeks.
        assert!(socket
            .ops
            .iter()
            .any(|op| matches!(op, Op::Read(n) if *n > READ_BUFFER_BYTES)));
    }

    #[test]
    fn a_turn_stops_at_its_budget() {
        // A budget of several reads: every turn but the last reads at least the budget
        // (it does not stop early) and at most one read past it.
        let bodies: Vec<Vec<u8>> = (0..1000u16).map(|i| vec![i as u8; 1000]).collect();
        let refs: Vec<&[u8]> = bodies.iter().map(|b| &b[..]).collect();
        let wire = stream(&refs);
        let frame_len = 1000 + HEADER_LEN;
        let budget = 200_000;
        let mut socket = Script::new(wire);
        let mut sink = Recorder::default();
        let mut reader = FrameReader::new(64 << 20, Duration::from_secs(5), Vec::new());
        let mut turns = 0;
        loop {
            let before = sink.frames.len();
            let turn = reader.read_turn(&mut sink, &mut socket, budget);
            let frames = sink.frames.len() - before;
            turns += 1;
            assert!(
                frames <= (budget + READ_BUFFER_BYTES) / frame_len + 1,
                "turn {turns}: {frames} frames"
            );
            if turn != Ok(ReadTurn::More) {
                break;
            }
            assert!(
                frames >= budget / frame_len,
                "turn {turns} stopped early: {frames} frames"
            );
        }
        assert_eq!(sink.frames.len(), 1000);
        assert!(
            turns >= 1000 * frame_len / (budget + READ_BUFFER_BYTES),
            "{turns} turns"
        );
    }

    #[test]
    fn bytes_that_came_with_the_handshake_are_parsed_first() {
        let wire = stream(&[b"early", b"late"]);
        let split = stream(&[b"early"]).len() + 2;
        let mut socket = Script::new(wire[split..].to_vec());
        let mut sink = Recorder::default();
        let mut reader = FrameReader::new(1024, Duration::from_secs(5), wire[..split].to_vec());
        assert_eq!(
            reader.read_turn(&mut sink, &mut socket, usize::MAX),
            Ok(ReadTurn::Drained)
        );
        let bodies: Vec<&[u8]> = sink.frames.iter().map(|(_, b, _)| &b[..]).collect();
        assert_eq!(bodies, vec![&b"early"[..], b"late"]);
    }

    #[test]
    fn end_of_stream_between_frames_is_the_peer_closing_and_within_one_an_error() {
        let mut sink = Recorder::default();
        let closed = |wire: Vec<u8>, sink: &mut Recorder| {
            struct Eof(Script);
            impl Receive for Eof {
                const CAN_PEEK: bool = false;
                fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                    self.0.read(buf).or(Ok(0))
                }
                fn delay_acks(&mut self) {}
                fn peek(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
                    unreachable!()
                }
                fn discard(&mut self, _n: usize) -> io::Result<()> {
                    unreachable!()
                }
            }
            reader().read_turn(sink, &mut Eof(Script::new(wire)), usize::MAX)
        };
        assert_eq!(closed(stream(&[b"x"]), &mut sink), Err(CloseReason::PeerClosed));
        let mut cut = stream(&[b"xyz"]);
        cut.pop();
        assert_eq!(closed(cut, &mut sink), Err(CloseReason::Io("closed")));
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

    #[cfg(target_os = "linux")]
    #[test]
    fn on_a_real_socket_peeks_leave_quick_ack_mode_and_discards_empty_it() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = TcpStream::from_std(server);
        let sock = socket2::SockRef::from(&server);
        sock.set_quickack(true).unwrap();
        let wire = stream(&[b"ping"]);
        client.write_all(&wire).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while queued(&server) < wire.len() {
            assert!(Instant::now() < deadline, "the bytes never came");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut sink = Recorder::default();
        let turn = reader().read_turn(&mut sink, &mut &server, usize::MAX);
        assert_eq!(turn, Ok(ReadTurn::Drained));
        assert!(!sock.quickack().unwrap());
        assert_eq!(sink.frames.len(), 1);
        assert_eq!(queued(&server), 0);
    }
}
