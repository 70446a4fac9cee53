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
use std::io::Read;

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
    let stats = shared.peer_stats(&peer);
    shared.host.event(Event::InboundUp { peer: peer.clone() });
    let reason = read_frames(shared, &stream, &peer, &stats);
    drop(tracked);
    shared.host.event(Event::InboundDown { peer, reason });
}

fn read_frames(shared: &Shared, stream: &TcpStream, peer: &str, stats: &PeerStats) -> String {
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
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
