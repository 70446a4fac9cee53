//! One inbound connection: the server side of the handshake, then a reader
//! that parses frames and hands them to the host for delivery.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::framing::{read_header, FrameHeader, FrameKind};
use crate::handshake::{server_handshake, HandshakeConfig, HandshakeError};
use crate::host::{Delivery, Event};
use crate::listener::HandshakeSlot;
use crate::runtime::Shared;
use crate::runtime::{PoolToken, POOL_TOKEN_LEN};
use crate::stats::{ConnStats, PeerStats};
use std::io::{self, BufReader, Read};

/// At most one Undeliverable event per connection per this interval; the counter has every one.
const UNDELIVERABLE_EVENT_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) fn run_inbound(shared: &Arc<Shared>, stream: TcpStream, remote: SocketAddr, slot: HandshakeSlot) {
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
            shared.host.event(Event::HandshakeFailed {
                remote: remote.to_string(),
                reason: e.reason(),
            });
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    crate::listener::keep_alive(&stream);
    shared.apply_io_thread_priority();
    let stats = shared.peer_stats(&peer);
    shared.host.event(Event::InboundUp { peer: peer.clone() });
    let reason = read_frames(shared, &stream, &peer, &stats);
    drop(tracked);
    shared.host.event(Event::InboundDown { peer, reason });
}

fn read_frames(shared: &Shared, stream: &TcpStream, peer: &str, stats: &PeerStats) -> String {
    let socket = Capped {
        inner: stream,
        chunk: shared.config.io_chunk(),
    };
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
    let mut handler = shared.host.frame_handler(peer);
    let mut scratch = Vec::new();
    let mut last_undeliverable_event: Option<Instant> = None;
    loop {
        if reader.buffer().is_empty() {
            crate::listener::delay_acks(stream);
        }
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
/// (`read_exact`): once the buffered bytes are used, `BufReader` passes reads at least as
/// large as its buffer straight to this, into the body's own memory, so the cap applies
/// without a second copy.
struct Capped<R> {
    inner: R,
    chunk: usize,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk);
        self.inner.read(&mut buf[..n])
    }
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

    /// A socket stand-in that records how many bytes each read asked for.
    struct Recording {
        data: Vec<u8>,
        at: usize,
        asked: Vec<usize>,
    }

    impl Read for Recording {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.asked.push(buf.len());
            let n = buf.len().min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn body_reads_use_the_buffered_bytes_then_the_socket_in_chunks() {
        let data: Vec<u8> = (0..200u8).collect();
        let socket = Recording {
            data: data.clone(),
            at: 0,
            asked: Vec::new(),
        };
        let mut reader = BufReader::with_capacity(
            16,
            Capped {
                inner: socket,
                chunk: 32,
            },
        );
        let mut header = [0u8; 5];
        reader.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; 100];
        reader.read_exact(&mut body).unwrap();
        assert_eq!(&body[..], &data[5..105]);
        // One buffer fill for the header (and the body's first 11 bytes), then straight
        // into `body`, never more than a chunk per read and never through the buffer.
        assert_eq!(reader.get_ref().inner.asked, vec![16, 32, 32, 25]);
        // What follows the body goes through the buffer again.
        let mut next = [0u8; 3];
        reader.read_exact(&mut next).unwrap();
        assert_eq!(&next[..], &data[105..108]);
        assert_eq!(reader.get_ref().inner.asked[4..], [16]);
    }
}
