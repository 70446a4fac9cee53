//! Real runtimes talking over loopback: pools, handshakes, ordering, back-pressure,
//! failures and shutdown. Every wait is bounded and every runtime is stopped (on drop).

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use teleport_net::faults::{self, Point};
use teleport_net::handshake::{client_handshake, server_handshake, HandshakeConfig};
use teleport_net::{
    CloseReason, Config, ConnDirection, ConnStatsSnapshot, Delivery, Detail, Event, FrameKind, FrameRefusal,
    OpenError, OpenStatus, PeerStatsSnapshot, Runtime, SendBuffer, SendError, Sent,
};

mod nodes;
use nodes::{closed_by_peer_within, connect_from, eventually, open_to, Node, TestHost, COOKIE, WAIT};

const A: &str = "a@127.0.0.1";
const B: &str = "b@127.0.0.1";
/// `Config::for_tests`'s I/O threads: with the handshake thread, all a runtime ever
/// runs, whatever its peers.
const IO_THREADS: usize = 2;
const HANDSHAKE_THREAD: usize = 1;

fn is_pool_down(event: &Event, of: &str) -> bool {
    matches!(event, Event::PoolDown { peer, .. } if peer == of)
}

fn is_handshake_failed(event: &Event, why: &str) -> bool {
    matches!(event, Event::HandshakeFailed { reason, .. } if *reason == why)
}

fn is_inbound_up(event: &Event, of: &str) -> bool {
    matches!(event, Event::InboundUp { peer } if peer == of)
}

fn is_inbound_down(event: &Event, of: &str) -> bool {
    matches!(event, Event::InboundDown { peer, .. } if peer == of)
}

/// Waits until `count` has not changed for `quiet`, and returns it.
fn settled_count(quiet: Duration, mut count: impl FnMut() -> usize) -> usize {
    let deadline = Instant::now() + WAIT;
    let mut last = count();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        let now = count();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// An authenticated connection made by hand, as node `local_node`.
fn raw_authenticated(addr: SocketAddr, local_node: &str, server_node: &str) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    let config = HandshakeConfig {
        capabilities: Default::default(),
        cookie: COOKIE,
        local_node,
        timeout: WAIT,
    };
    client_handshake(&stream, &config, server_node).expect("handshake by hand");
    stream
}

fn keyed_body(key: u64, seq: u64) -> Vec<u8> {
    let mut body = key.to_be_bytes().to_vec();
    body.extend_from_slice(&seq.to_be_bytes());
    body
}

/// Sends to B as a well-behaved sender does: past the queue limit, waits for it to drain.
fn send_or_wait(a: &Node, key: u64, body: Vec<u8>) {
    match a.send(B, key, body) {
        Ok(Sent::Queued) => {}
        Ok(Sent::OverLimit(conn)) => {
            let (tx, rx) = mpsc::channel();
            if conn.wait_for_drain(
                key,
                Box::new(move |()| {
                    let _ = tx.send(());
                }),
            ) {
                rx.recv_timeout(WAIT).expect("queue drains");
            }
        }
        Err(e) => panic!("send with key {key} failed: {e:?}"),
    }
}

fn decode_keyed(body: &[u8]) -> (u64, u64) {
    let key = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
    let seq = u64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
    (key, seq)
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn frames_arrive_in_order_per_key() {
    const KEYS: u64 = 4;
    const PER_KEY: u64 = 2_000;
    let (a, b) = (Node::start(A), Node::start(B));
    a.open(&b, 4).expect("pool opens");

    thread::scope(|s| {
        for key in 0..KEYS {
            let a = &a;
            s.spawn(move || {
                for seq in 0..PER_KEY {
                    send_or_wait(a, key, keyed_body(key, seq));
                }
            });
        }
    });

    let total = (KEYS * PER_KEY) as usize;
    assert!(
        b.host.wait_for(WAIT, |log| log.frames.len() >= total),
        "B received {} of {total}",
        b.host.log().frames.len()
    );
    let mut seqs: Vec<Vec<u64>> = vec![Vec::new(); KEYS as usize];
    for frame in &b.host.log().frames {
        assert_eq!(frame.peer, A);
        assert_eq!(frame.kind, FrameKind::Send);
        let (key, seq) = decode_keyed(&frame.body);
        seqs[key as usize].push(seq);
    }
    for (key, got) in seqs.iter().enumerate() {
        let expected: Vec<u64> = (0..PER_KEY).collect();
        assert!(
            got == &expected,
            "key {key}: {} frames, out of order or incomplete",
            got.len()
        );
    }

    assert!(eventually(WAIT, || a.stats_for(B).messages_out == total as u64));
    let out = a.stats_for(B);
    assert_eq!(out.messages_out, total as u64);
    assert_eq!(out.bytes_out, total as u64 * 16);
    assert_eq!(out.connections, 4);
    assert_eq!(out.connects, 1);
    assert_eq!(out.dropped_out, 0);
    // Counted right after delivery, on the I/O thread: may trail the host's log briefly.
    assert!(eventually(WAIT, || {
        let inbound = b.stats_for(A);
        inbound.messages_in == total as u64 && inbound.bytes_in == total as u64 * 16
    }));
}

#[test]
fn concurrent_opens_make_one_pool() {
    const CALLERS: usize = 32;
    const SIZE: usize = 3;
    let (a, b) = (Node::start(A), Node::start(B));
    let oks: Arc<Vec<AtomicUsize>> = Arc::new((0..CALLERS).map(|_| AtomicUsize::new(0)).collect());
    let errors = Arc::new(AtomicUsize::new(0));
    let already_up = AtomicUsize::new(0);
    let barrier = Barrier::new(CALLERS);

    thread::scope(|s| {
        for caller in 0..CALLERS {
            let (a, b, barrier, already_up) = (&a, &b, &barrier, &already_up);
            let (oks, errors) = (oks.clone(), errors.clone());
            s.spawn(move || {
                barrier.wait();
                let done = Box::new(move |result: Result<(), OpenError>| match result {
                    Ok(()) => drop(oks[caller].fetch_add(1, SeqCst)),
                    Err(_) => drop(errors.fetch_add(1, SeqCst)),
                });
                if a.rt.open_pool(B, b.addr(), SIZE, done) == OpenStatus::AlreadyUp {
                    already_up.fetch_add(1, SeqCst);
                }
            });
        }
    });

    let waited_for = CALLERS - already_up.load(SeqCst);
    assert!(eventually(WAIT, || oks
        .iter()
        .map(|n| n.load(SeqCst))
        .sum::<usize>()
        >= waited_for));
    thread::sleep(Duration::from_millis(100));
    assert_eq!(errors.load(SeqCst), 0);
    let ran_once = oks.iter().filter(|n| n.load(SeqCst) == 1).count();
    assert!(oks.iter().all(|n| n.load(SeqCst) <= 1), "a callback ran twice");
    assert_eq!(ran_once, waited_for, "every caller told Opening hears Ok once");

    let stats = a.stats_for(B);
    assert_eq!(stats.connects, 1);
    assert_eq!(stats.connections, SIZE as u64);
    assert_eq!(a.rt.peers(), vec![B.to_string()]);
    assert!(b.host.wait_for(WAIT, |log| log
        .events
        .iter()
        .filter(|e| is_inbound_up(e, A))
        .count()
        >= SIZE));
    thread::sleep(Duration::from_millis(100));
    assert_eq!(b.host.count_events(|e| is_inbound_up(e, A)), SIZE);
}

#[test]
fn wrong_cookie_fails_open() {
    let a = Node::start(A);
    let b = Node::start_with(B, |c| c.cookie = b"another cookie".to_vec());

    let err = a.open(&b, 2).expect_err("open must fail");
    assert_eq!(
        (err.class(), err.detail()),
        ("handshake", Detail::Name("bad_cookie")),
        "{err}"
    );
    assert!(a.rt.peers().is_empty());
    assert_eq!(a.send(B, 0, b"x".to_vec()).err(), Some(SendError::NotConnected));
    assert!(
        b.host.wait_for_event(|e| is_handshake_failed(e, "bad_cookie")),
        "{}",
        b.host.events_debug()
    );
    assert_eq!(a.stats_for(B).handshake_failures, 1);
    assert!(eventually(WAIT, || b.rt.listener_stats().handshake_failures >= 1));
}

#[test]
fn wrong_node_name_fails_open() {
    let (a, b) = (Node::start(A), Node::start(B));

    let err = a.open_as("c@127.0.0.1", &b, 1).expect_err("open must fail");
    // The peer closes without a word before its challenge: the client cannot tell why.
    assert_eq!(
        (err.class(), err.detail()),
        ("handshake", Detail::Name("closed")),
        "{err}"
    );
    assert!(a.rt.peers().is_empty());
    assert!(
        b.host.wait_for_event(|e| is_handshake_failed(e, "wrong_node")),
        "{}",
        b.host.events_debug()
    );
}

#[test]
fn unreachable_peer_fails_open() {
    let a = Node::start(A);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let started = Instant::now();
    let err = open_to(&a.rt, B, addr, 2).expect_err("nobody listens there");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        (err.class(), err.detail()),
        ("connect", Detail::Name("econnrefused")),
        "{err}"
    );
    assert!(a.rt.peers().is_empty());
}

#[test]
fn peer_stop_closes_pool() {
    let (a, b) = (Node::start(A), Node::start(B));
    assert_eq!(a.rt.live_threads(), IO_THREADS + HANDSHAKE_THREAD);
    a.open(&b, 3).expect("pool opens");
    assert_eq!(
        a.rt.live_threads(),
        IO_THREADS + HANDSHAKE_THREAD,
        "connections cost no threads"
    );
    assert!(matches!(a.send(B, 1, b"hi".to_vec()), Ok(Sent::Queued)));
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 1));

    b.rt.stop();
    assert!(eventually(Duration::from_secs(5), || a.rt.peers().is_empty()));
    assert!(
        a.host.wait_for(Duration::from_secs(5), |log| log
            .events
            .iter()
            .any(|e| is_pool_down(e, B))),
        "{}",
        a.host.events_debug()
    );
    assert_eq!(
        a.send(B, 1, b"late".to_vec()).err(),
        Some(SendError::NotConnected)
    );
    assert_eq!(a.rt.live_threads(), IO_THREADS + HANDSHAKE_THREAD);
}

#[test]
fn close_pool_counts_dropped() {
    const FRAMES: u64 = 200;
    let (a, b) = (Node::start(A), Node::start(B));
    b.host.set_delay(Duration::from_millis(50));
    a.open(&b, 1).expect("pool opens");

    for seq in 0..FRAMES {
        let mut body = vec![0u8; 64 << 10];
        body[..8].copy_from_slice(&seq.to_be_bytes());
        // Over the limit or not, the frame is accepted; this sender just does not wait.
        assert!(a.send(B, 0, body).is_ok(), "frame {seq} refused");
    }
    assert!(a.rt.close_pool(B));
    b.host.set_delay(Duration::ZERO);

    assert!(
        a.host.wait_for_event(|e| is_pool_down(e, B)),
        "{}",
        a.host.events_debug()
    );
    assert!(
        b.host.wait_for_event(|e| is_inbound_down(e, A)),
        "{}",
        b.host.events_debug()
    );
    let received = settled_count(Duration::from_millis(300), || b.host.frames_from(A)) as u64;
    let stats = a.stats_for(B);
    let reported = a
        .host
        .log()
        .events
        .iter()
        .find_map(|e| match e {
            Event::PoolDown { dropped_messages, .. } => Some(*dropped_messages),
            _ => None,
        })
        .expect("PoolDown seen");
    println!(
        "close_pool_counts_dropped: received={received} messages_out={} dropped_out={} PoolDown.dropped={reported}",
        stats.messages_out, stats.dropped_out
    );

    // What B received arrived in order, without gaps.
    let seqs: Vec<u64> = b
        .host
        .log()
        .frames
        .iter()
        .map(|f| decode_keyed(&f.body).0)
        .collect();
    assert!(
        seqs.iter().enumerate().all(|(i, s)| *s == i as u64),
        "gap or reordering"
    );

    // Check every part of the accounting, then report all that fail together.
    let mut wrong = Vec::new();
    if stats.messages_out + stats.dropped_out != FRAMES {
        wrong.push(format!(
            "messages_out {} + dropped_out {} != {FRAMES}",
            stats.messages_out, stats.dropped_out
        ));
    }
    if stats.dropped_out == 0 {
        wrong.push("closing with a full queue dropped nothing".to_string());
    }
    if reported != stats.dropped_out {
        wrong.push(format!(
            "PoolDown.dropped_messages {reported} != stats dropped_out {}",
            stats.dropped_out
        ));
    }
    if received + stats.dropped_out != FRAMES {
        wrong.push(format!(
            "received by B {received} + dropped_out {} != {FRAMES} (frames counted as dropped were delivered)",
            stats.dropped_out
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("; "));
}

#[test]
fn over_limit_then_drain_wakes() {
    const LIMIT: usize = 1 << 20;
    const FRAME: usize = 256 << 10;
    let a = Node::start_with(A, |c| c.send_queue_bytes = LIMIT);
    let b = Node::start(B);
    b.host.set_delay(Duration::from_millis(20));
    a.open(&b, 1).expect("pool opens");

    let sampling = AtomicBool::new(true);
    let max_queued = AtomicU64::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            while sampling.load(SeqCst) {
                max_queued.fetch_max(a.stats_for(B).queued_bytes, SeqCst);
                thread::sleep(Duration::from_millis(1));
            }
        });

        let started = Instant::now();
        let conn = loop {
            assert!(started.elapsed() < WAIT, "never went over the limit");
            match a.send(B, 7, vec![1u8; FRAME]) {
                Ok(Sent::Queued) => {}
                Ok(Sent::OverLimit(conn)) => break conn,
                Err(e) => panic!("send failed: {e:?}"),
            }
        };
        let (tx, rx) = mpsc::channel();
        let watched = conn.clone();
        let waiting = conn.wait_for_drain(
            7,
            Box::new(move |()| {
                let _ = tx.send(watched.queued_bytes());
            }),
        );
        assert!(waiting, "queue was already drained");
        let queued_at_wake = rx.recv_timeout(WAIT).expect("woken once drained");
        assert!(
            queued_at_wake <= LIMIT / 2,
            "woken with {queued_at_wake} bytes queued"
        );
        sampling.store(false, SeqCst);
    });
    b.host.set_delay(Duration::ZERO);

    let max = max_queued.load(SeqCst) as usize;
    // (The kernel's socket buffers may absorb the queue before the sampler looks,
    // so only the bound is asserted, not that a sample caught a full queue.)
    assert!(max <= LIMIT + FRAME + 5, "queued {max} bytes");
}

#[test]
fn oversized_frame_rejected_by_sender() {
    let a = Node::start_with(A, |c| c.max_frame_bytes = 1024);
    let b = Node::start(B);
    a.open(&b, 1).expect("pool opens");

    assert_eq!(a.send(B, 0, vec![0u8; 2048]).err(), Some(SendError::TooLarge));
    assert!(matches!(a.send(B, 0, vec![9u8; 1024]), Ok(Sent::Queued)));
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 1));
    assert_eq!(b.host.log().frames[0].body, vec![9u8; 1024]);
    assert_eq!(a.stats_for(B).dropped_out, 0);
}

#[test]
fn garbage_and_oversized_frames_close_only_that_connection() {
    let (a, b) = (Node::start(A), Node::start(B));
    a.open(&b, 2).expect("pool opens");
    assert!(matches!(a.send(B, 0, b"before".to_vec()), Ok(Sent::Queued)));
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 1));

    let raw_name = "raw@127.0.0.1";
    let mut raw = raw_authenticated(b.addr(), raw_name, B);
    raw.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, FrameKind::Send as u8])
        .unwrap();
    assert!(
        b.host.wait_for_event(|e| is_inbound_down(e, raw_name)),
        "{}",
        b.host.events_debug()
    );
    let reason = b
        .host
        .log()
        .events
        .iter()
        .find_map(|e| match e {
            Event::InboundDown { peer, reason } if peer == raw_name => Some(reason.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(reason, CloseReason::BadFrame(FrameRefusal::FrameTooLarge));
    assert!(
        closed_by_peer_within(&mut raw, WAIT),
        "B kept the bad connection open"
    );

    // Garbage instead of a handshake, from a source of its own (failures are logged at
    // most once per source per interval).
    let mut junk = connect_from([127, 0, 0, 94], b.addr());
    let junk_addr = junk.local_addr().unwrap().to_string();
    let garbage: Vec<u8> = (0u32..64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    junk.write_all(&garbage).unwrap();
    junk.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        b.host
            .wait_for_event(|e| matches!(e, Event::HandshakeFailed { remote, .. } if *remote == junk_addr)),
        "{}",
        b.host.events_debug()
    );

    assert!(matches!(a.send(B, 1, b"after".to_vec()), Ok(Sent::Queued)));
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 2));
    let bodies: Vec<Vec<u8>> = b.host.log().frames.iter().map(|f| f.body.clone()).collect();
    assert_eq!(bodies, vec![b"before".to_vec(), b"after".to_vec()]);
    assert_eq!(a.rt.peers(), vec![B.to_string()]);
    assert_eq!(
        a.host.count_events(|e| is_pool_down(e, B)),
        0,
        "{}",
        a.host.events_debug()
    );
}

#[test]
fn handler_error_closes_connection() {
    let (a, b) = (Node::start(A), Node::start(B));
    a.open(&b, 2).expect("pool opens");
    assert!(matches!(a.send(B, 0, b"fine".to_vec()), Ok(Sent::Queued)));
    assert!(matches!(a.send(B, 0, b"poison".to_vec()), Ok(Sent::Queued)));

    assert!(
        a.host.wait_for_event(|e| is_pool_down(e, B)),
        "{}",
        a.host.events_debug()
    );
    assert!(eventually(WAIT, || a.rt.peers().is_empty()));
    let reason = b.host.log().events.iter().find_map(|e| match e {
        Event::InboundDown { peer, reason } if peer == A && matches!(reason, CloseReason::Malformed(_)) => {
            Some(reason.clone())
        }
        _ => None,
    });
    assert!(reason.is_some(), "{}", b.host.events_debug());
    assert_eq!(
        a.send(B, 0, b"gone".to_vec()).err(),
        Some(SendError::NotConnected)
    );

    a.open(&b, 2).expect("a fresh pool opens");
    assert!(matches!(a.send(B, 0, b"again".to_vec()), Ok(Sent::Queued)));
    assert!(b
        .host
        .wait_for(WAIT, |log| log.frames.iter().any(|f| f.body == b"again")));
    let bodies: Vec<Vec<u8>> = b.host.log().frames.iter().map(|f| f.body.clone()).collect();
    assert_eq!(bodies, vec![b"fine".to_vec(), b"again".to_vec()]);
    assert_eq!(a.stats_for(B).connects, 2);
}

#[test]
fn undeliverable_frames_are_counted_not_fatal() {
    let (a, b) = (Node::start(A), Node::start(B));
    a.open(&b, 1).expect("pool opens");
    for _ in 0..3 {
        assert!(matches!(a.send(B, 0, b"nobody".to_vec()), Ok(Sent::Queued)));
    }
    assert!(matches!(a.send(B, 0, b"somebody".to_vec()), Ok(Sent::Queued)));

    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 1));
    assert_eq!(b.stats_for(A).undeliverable_in, 3);
    // Counted right after delivery, on the I/O thread: may trail the host's log briefly.
    assert!(eventually(WAIT, || b.stats_for(A).messages_in == 4));
    // Rate limited: one event for the burst.
    let events = b
        .host
        .count_events(|e| matches!(e, Event::Undeliverable { peer, .. } if peer == A));
    assert_eq!(events, 1, "{}", b.host.events_debug());
    assert_eq!(a.rt.peers(), vec![B.to_string()]);
}

/// The outbound entries of a peer's `per_connection`, by slot, and its inbound ones.
fn split_connections(stats: &PeerStatsSnapshot) -> (Vec<&ConnStatsSnapshot>, Vec<&ConnStatsSnapshot>) {
    stats
        .per_connection
        .iter()
        .partition(|c| matches!(c.direction, ConnDirection::Outbound { .. }))
}

fn sums(conns: &[&ConnStatsSnapshot]) -> (u64, u64) {
    conns
        .iter()
        .fold((0, 0), |(m, b), c| (m + c.messages, b + c.bytes))
}

/// Keyed sends, sends spread over the pool (a new key each) and undeliverable frames, small
/// (direct writes) and large (the writer): each connection counts what went over it, and
/// the connections add up to the peer's totals on both ends. After a reconnect the peer's
/// totals go on while the new connections start from zero.
#[test]
fn per_connection_counters_add_up_to_the_peer() {
    const SIZE: usize = 4;
    let (a, b) = (Node::start(A), Node::start(B));
    a.open(&b, SIZE).expect("pool opens");

    let mut expected = [(0u64, 0u64); SIZE];
    let mut expected_undeliverable = [0u64; SIZE];
    let mut send = |key: u64, body: Vec<u8>| {
        let slot = (key % SIZE as u64) as usize;
        expected[slot].0 += 1;
        expected[slot].1 += body.len() as u64;
        if body == b"nobody" {
            expected_undeliverable[slot] += 1;
        }
        send_or_wait(&a, key, body);
    };
    for seq in 0..600u64 {
        let key = seq % 7; // keyed: order kept per key
        let len = if seq % 50 == 0 {
            200 * 1024
        } else {
            16 + (seq as usize % 300)
        };
        let mut body = keyed_body(key, seq);
        body.resize(len, 1);
        send(key, body);
    }
    for seq in 0..400u64 {
        let key = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15); // a fresh key each: unordered
        send(key, keyed_body(key, seq));
    }
    for key in [1u64, 2, 2, 6] {
        send(key, b"nobody".to_vec());
    }
    let frames: u64 = expected.iter().map(|e| e.0).sum();
    let undeliverable: u64 = expected_undeliverable.iter().sum();
    assert!(eventually(WAIT, || a.stats_for(B).messages_out == frames));
    assert!(eventually(WAIT, || b.stats_for(A).messages_in == frames));

    let out = a.stats_for(B);
    let (outbound, none_in) = split_connections(&out);
    assert!(none_in.is_empty(), "B never opened a pool to A: {none_in:?}");
    assert_eq!(outbound.len(), SIZE);
    for (slot, conn) in outbound.iter().enumerate() {
        let ConnDirection::Outbound {
            index,
            queued_bytes,
            send_buffer,
        } = conn.direction
        else {
            panic!("not outbound: {conn:?}");
        };
        assert_eq!((index, queued_bytes), (slot, 0));
        // `sndbuf` auto on loopback: 512 KiB, which Linux reports doubled.
        if cfg!(target_os = "linux") {
            assert_eq!(send_buffer, Some(2 * teleport_net::send_buffer::AUTO_BYTES));
        }
        assert_eq!((conn.messages, conn.bytes), expected[slot], "slot {slot}");
        assert_eq!(conn.remote, b.addr());
        assert_eq!(conn.local.ip(), b.addr().ip());
    }
    assert_eq!(sums(&outbound), (out.messages_out, out.bytes_out));

    let inc = b.stats_for(A);
    let (none_out, inbound) = split_connections(&inc);
    assert!(none_out.is_empty(), "B has no pool to A: {none_out:?}");
    assert_eq!(inbound.len(), SIZE);
    assert_eq!(sums(&inbound), (inc.messages_in, inc.bytes_in));
    assert_eq!(inc.undeliverable_in, undeliverable);
    // Each inbound connection is one of A's, seen from the other end: same counts.
    for conn in &inbound {
        let slot = outbound
            .iter()
            .position(|o| o.local == conn.remote && o.remote == conn.local)
            .unwrap_or_else(|| panic!("inbound {conn:?} matches no outbound connection"));
        assert_eq!(
            (conn.messages, conn.bytes),
            expected[slot],
            "inbound of slot {slot}"
        );
        assert_eq!(
            conn.direction,
            ConnDirection::Inbound {
                undeliverable: expected_undeliverable[slot],
                partial_bytes: 0,
            }
        );
    }

    // A new pool: the peer's totals go on, its connections start afresh.
    assert!(a.rt.close_pool(B));
    assert!(a.host.wait_for_event(|e| is_pool_down(e, B)));
    assert!(a.stats_for(B).per_connection.is_empty());
    a.open(&b, SIZE).expect("pool reopens");
    send_or_wait(&a, 3, b"after".to_vec());
    assert!(eventually(WAIT, || b.stats_for(A).messages_in == frames + 1));
    let out = a.stats_for(B);
    assert_eq!(
        (out.messages_out, out.connects, out.disconnects),
        (frames + 1, 2, 1)
    );
    let (outbound, _) = split_connections(&out);
    let fresh: Vec<(u64, u64)> = outbound.iter().map(|c| (c.messages, c.bytes)).collect();
    assert_eq!(fresh, vec![(0, 0), (0, 0), (0, 0), (1, 5)]);
    // B drops the old pool's connections once the new one announces itself.
    assert!(eventually(WAIT, || split_connections(&b.stats_for(A)).1.len() == SIZE));
    assert!(eventually(WAIT, || {
        let inc = b.stats_for(A);
        sums(&split_connections(&inc).1) == (1, 5) && inc.messages_in == frames + 1
    }));
}

#[test]
fn stop_joins_every_thread() {
    let (a, b) = (Node::start(A), Node::start(B));
    a.open(&b, 2).expect("pool A->B opens");
    b.open(&a, 2).expect("pool B->A opens");
    for i in 0..200u64 {
        assert!(a.send(B, i, keyed_body(i, 0)).is_ok());
        assert!(b.send(A, i, keyed_body(i, 1)).is_ok());
    }
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 200));
    assert!(a.host.wait_for(WAIT, |log| log.frames.len() == 200));

    for node in [&a, &b] {
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        thread::scope(|s| {
            s.spawn(|| {
                node.rt.stop();
                let _ = tx.send(());
            });
            let stopped = rx.recv_timeout(Duration::from_secs(5));
            // If stop hangs, the scope waits for it anyway; fail with a message first.
            assert!(stopped.is_ok(), "{} stop took over 5 s", node.name());
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(node.rt.live_threads(), 0, "{} left threads behind", node.name());
    }
    assert!(a.rt.peers().is_empty() && b.rt.peers().is_empty());
}

#[test]
fn silent_connection_times_out() {
    let b = Node::start_with(B, |c| c.handshake_timeout = Duration::from_millis(200));
    let mut silent = TcpStream::connect(b.addr()).unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();

    let started = Instant::now();
    assert!(
        closed_by_peer_within(&mut silent, Duration::from_secs(2)),
        "B never closed it"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "closed too early: {:?}",
        started.elapsed()
    );
    assert!(
        b.host.wait_for(Duration::from_secs(2), |log| {
            log.events.iter().any(
            |e| matches!(e, Event::HandshakeFailed { remote, reason: "timeout", .. } if *remote == silent_addr)
        )
        }),
        "{}",
        b.host.events_debug()
    );
}

#[test]
fn max_pending_handshakes_bounds_pending_handshakes() {
    const SILENT: usize = 20;
    const PENDING: usize = 4;
    let b = Node::start_with(B, |c| {
        c.max_pending_handshakes = PENDING;
        c.handshake_timeout = Duration::from_secs(2);
    });
    let a = Node::start(A);

    let mut silent: Vec<TcpStream> = (0..SILENT)
        .map(|_| TcpStream::connect(b.addr()).unwrap())
        .collect();
    let mut max_pending = 0;
    let sample_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < sample_until {
        max_pending = max_pending.max(b.rt.listener_stats().pending_handshakes);
        assert_eq!(
            b.rt.live_threads(),
            IO_THREADS + HANDSHAKE_THREAD,
            "handshakes cost no threads"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        max_pending, PENDING as u64,
        "B should be holding {PENDING} handshakes"
    );

    for stream in &mut silent {
        assert!(
            closed_by_peer_within(stream, Duration::from_secs(5)),
            "a silent socket stayed open"
        );
    }
    // Every one counted (those over the cap at accept, the rest at their timeout);
    // one log event for them all, as they share a source address.
    assert!(eventually(WAIT, || b.rt.listener_stats().handshake_failures == SILENT as u64));
    assert!(b.host.wait_for(WAIT, |log| {
        log.events
            .iter()
            .filter(|e| is_handshake_failed(e, "timeout"))
            .count()
            == 1
    }));
    assert_eq!(b.rt.listener_stats().pending_handshakes, 0);

    a.open(&b, 2).expect("B still accepts a pool");
    assert!(matches!(a.send(B, 0, b"ok".to_vec()), Ok(Sent::Queued)));
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 1));
}

#[test]
fn handshake_failures_are_reported_once_per_source_per_interval() {
    let b = Node::start("ratelimit_b@127.0.0.1");
    let garbage = [0u8; 2]; // a zero length: refused at once
    let fail_from = |source: [u8; 4]| {
        let mut conn = connect_from(source, b.addr());
        conn.write_all(&garbage).unwrap();
        assert!(closed_by_peer_within(&mut conn, WAIT), "B kept it open");
    };
    for _ in 0..20 {
        fail_from([127, 0, 0, 95]);
    }
    fail_from([127, 0, 0, 96]);
    assert!(eventually(WAIT, || b.rt.listener_stats().handshake_failures == 21));
    let reported = |ip: &str| {
        let prefix = format!("{ip}:");
        settled_count(Duration::from_millis(300), || {
            b.host.count_events(
                |e| matches!(e, Event::HandshakeFailed { remote, .. } if remote.starts_with(&prefix)),
            )
        })
    };
    // Every failure counted; one event per source within the interval.
    assert_eq!(reported("127.0.0.95"), 1, "{}", b.host.events_debug());
    assert_eq!(reported("127.0.0.96"), 1, "{}", b.host.events_debug());
}

/// Silent connections from one address hold only that address's share of the pending
/// handshakes: another address still authenticates, the address's next connection is
/// closed at accept (and counted), and a slot given back is taken again.
#[test]
fn one_source_cannot_take_every_handshake_slot() {
    const PER_IP: u64 = 3;
    let b = Node::start_with(B, |c| {
        c.max_pending_handshakes = 2 * PER_IP as usize;
        c.max_pending_handshakes_per_ip = PER_IP as usize;
        // Far longer than any wait below: a slot held here is held by the silent socket.
        c.handshake_timeout = Duration::from_secs(120);
    });
    let pending = || b.rt.listener_stats().pending_handshakes;
    let failures_before = b.rt.listener_stats().handshake_failures;
    let failures = || b.rt.listener_stats().handshake_failures - failures_before;
    let mut silent: Vec<TcpStream> = (0..PER_IP)
        .map(|_| connect_from([127, 0, 0, 2], b.addr()))
        .collect();
    assert!(
        eventually(WAIT, || pending() == PER_IP),
        "{:?}",
        b.rt.listener_stats()
    );

    // One more from the same address: closed at once, long before its handshake could time out.
    let mut extra = connect_from([127, 0, 0, 2], b.addr());
    assert!(
        closed_by_peer_within(&mut extra, WAIT),
        "over the per-address cap, yet kept open"
    );
    assert!(eventually(WAIT, || failures() == 1));
    assert_eq!(pending(), PER_IP);

    // Other addresses are not locked out: a handshake by hand from 127.0.0.3, and a pool from A.
    let other = connect_from([127, 0, 0, 3], b.addr());
    let config = HandshakeConfig {
        capabilities: Default::default(),
        cookie: COOKIE,
        local_node: "c@127.0.0.3",
        timeout: WAIT,
    };
    client_handshake(&other, &config, B).expect("a handshake from another address");
    let a = Node::start(A);
    a.open(&b, 2).expect("a pool from 127.0.0.1");
    assert!(matches!(a.send(B, 0, b"through".to_vec()), Ok(Sent::Queued)));
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 1));

    // A silent socket leaves (its handshake fails: end of stream): its address may start
    // one handshake again, and only one.
    drop(silent.pop());
    assert!(eventually(WAIT, || pending() == PER_IP - 1 && failures() == 2));
    let again = connect_from([127, 0, 0, 2], b.addr());
    let config = HandshakeConfig {
        capabilities: Default::default(),
        local_node: "d@127.0.0.2",
        ..config
    };
    client_handshake(&again, &config, B).expect("the address's slot was given back");
    // The server gives the slot back just after its last handshake message: wait for it,
    // or the next connection could be refused while that slot is still counted.
    assert!(eventually(WAIT, || pending() == PER_IP - 1));
    silent.push(connect_from([127, 0, 0, 2], b.addr()));
    assert!(eventually(WAIT, || pending() == PER_IP));
    let mut over = connect_from([127, 0, 0, 2], b.addr());
    assert!(
        closed_by_peer_within(&mut over, WAIT),
        "over the cap again, yet kept open"
    );
    assert!(eventually(WAIT, || failures() == 3));
    assert_eq!(b.host.count_events(|e| is_handshake_failed(e, "timeout")), 0);
}

/// A peer that accepts one connection and answers its handshake only after `delay`,
/// holding the socket open until the returned sender is dropped or sent to.
fn slow_handshake_peer(name: &'static str, delay: Duration) -> (SocketAddr, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = mpsc::channel::<()>();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        thread::sleep(delay);
        let config = HandshakeConfig {
            capabilities: Default::default(),
            cookie: COOKIE,
            local_node: name,
            timeout: WAIT,
        };
        let _ = server_handshake(&stream, &config);
        let _ = released.recv_timeout(Duration::from_secs(30));
    });
    (addr, release)
}

/// `stop` promises to close every connection and join every thread, so a dial that
/// completes while it runs must not leave a pool whose writers nobody stops.
#[test]
fn stop_while_dialing_returns() {
    let a = Node::start(A);
    let (peer_addr, release_peer) = slow_handshake_peer("slow@127.0.0.1", Duration::from_millis(300));
    let (opened, open_result) = mpsc::channel();
    let status = a.rt.open_pool(
        "slow@127.0.0.1",
        peer_addr,
        1,
        Box::new(move |r| drop(opened.send(r))),
    );
    assert_eq!(status, OpenStatus::Opening);
    thread::sleep(Duration::from_millis(50));

    let (stopped, stop_done) = mpsc::channel();
    let started = Instant::now();
    let returned_in_time = thread::scope(|s| {
        s.spawn(|| {
            a.rt.stop();
            let _ = stopped.send(());
        });
        let in_time = stop_done.recv_timeout(Duration::from_secs(3)).is_ok();
        // Unblock a hung stop: the peer closing the socket ends the stray pool.
        drop(release_peer);
        in_time
    });
    let elapsed = started.elapsed();
    let outcome = open_result.recv_timeout(Duration::from_secs(1));
    assert!(
        returned_in_time,
        "stop hung for {elapsed:?} (until the peer hung up); open outcome: {outcome:?}; peers after stop: {:?}",
        a.rt.peers()
    );
    assert!(
        a.rt.peers().is_empty(),
        "a pool is up after stop: {:?}",
        a.rt.peers()
    );
    assert_eq!(a.rt.live_threads(), 0);
}

/// `stop` promises to close every connection, including one still in its handshake:
/// it must not wait for the handshake to time out.
#[test]
fn stop_closes_pending_handshakes() {
    let b = Node::start_with(B, |c| c.handshake_timeout = Duration::from_secs(3));
    let mut silent = TcpStream::connect(b.addr()).unwrap();
    assert!(
        eventually(WAIT, || b.rt.listener_stats().pending_handshakes == 1),
        "the handshake never started"
    );

    let started = Instant::now();
    b.rt.stop();
    let elapsed = started.elapsed();
    assert!(closed_by_peer_within(&mut silent, Duration::from_secs(1)));
    assert_eq!(b.rt.live_threads(), 0);
    assert!(
        elapsed < Duration::from_secs(1),
        "stop waited {elapsed:?} for a pending handshake"
    );
}

/// Frames just under the direct-write size, several senders on one connection and a
/// slow reader: the socket buffer fills, so direct writes are cut short and the writer
/// must finish each one before anything else. Every frame must arrive whole, in order,
/// whatever the send buffer: the smallest `sndbuf` the Erlang side accepts, `auto`'s, or
/// the kernel's.
#[test]
fn direct_writes_cut_short_keep_frames_whole_and_ordered() {
    for sndbuf in [SendBuffer::Bytes(64 * 1024), SendBuffer::Auto, SendBuffer::Kernel] {
        direct_writes_cut_short(sndbuf);
    }
}

fn direct_writes_cut_short(sndbuf: SendBuffer) {
    const KEYS: u64 = 3;
    const PER_KEY: u64 = 150;
    const FRAME: usize = 60 * 1024;
    let (a, b) = (Node::start_with(A, |c| c.sndbuf = sndbuf), Node::start(B));
    b.host.set_delay(Duration::from_millis(1));
    a.open(&b, 1).expect("pool opens");

    thread::scope(|s| {
        for key in 0..KEYS {
            let a = &a;
            s.spawn(move || {
                for seq in 0..PER_KEY {
                    let mut body = keyed_body(key, seq);
                    body.resize(FRAME, (key * 31 + seq) as u8);
                    send_or_wait(a, key, body);
                }
            });
        }
    });
    b.host.set_delay(Duration::ZERO);

    let total = (KEYS * PER_KEY) as usize;
    assert!(
        b.host.wait_for(WAIT, |log| log.frames.len() >= total),
        "not all frames arrived ({sndbuf:?})"
    );
    let mut next = [0u64; KEYS as usize];
    for frame in &b.host.log().frames {
        assert_eq!(frame.body.len(), FRAME, "a frame arrived cut or merged");
        let (key, seq) = decode_keyed(&frame.body);
        assert_eq!(seq, next[key as usize], "key {key} out of order");
        next[key as usize] += 1;
        let fill = (key * 31 + seq) as u8;
        assert!(
            frame.body[16..].iter().all(|&byte| byte == fill),
            "frame {key}/{seq} corrupted"
        );
    }
    assert!(eventually(WAIT, || a.stats_for(B).messages_out == total as u64));
    assert_eq!(a.stats_for(B).queued_bytes, 0);
}

/// Writes a connection's pool announcement (kind 3, 16-byte token) then one send frame.
fn announce_and_send(stream: &mut TcpStream, incarnation: u64, epoch: u64, body: &[u8]) {
    let mut wire = vec![0, 0, 0, 16, 3];
    wire.extend_from_slice(&incarnation.to_be_bytes());
    wire.extend_from_slice(&epoch.to_be_bytes());
    wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
    wire.push(1);
    wire.extend_from_slice(body);
    stream.write_all(&wire).expect("write");
}

/// A newer pool from the same node supersedes the older one: the older connections are
/// closed and what they still carry is not delivered after the newer pool's frames (a
/// partition can hold bytes back and release them later). A connection of an older pool
/// arriving late is refused.
#[test]
fn newer_pool_supersedes_older_connections() {
    let b = Node::start(B);
    let mut old = raw_authenticated(b.addr(), A, B);
    announce_and_send(&mut old, 7, 1, b"from-old");
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 1));

    let mut new = raw_authenticated(b.addr(), A, B);
    announce_and_send(&mut new, 7, 2, b"from-new");
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 2));
    assert!(
        closed_by_peer_within(&mut old, WAIT),
        "the older pool's connection stays open"
    );
    // Bytes the old connection still had in flight are not delivered.
    let _ = old.write_all(&[0, 0, 0, 5, 1, b'l', b'a', b't', b'e', b'!']);

    let mut late = raw_authenticated(b.addr(), A, B);
    announce_and_send(&mut late, 7, 1, b"late-old");
    assert!(
        closed_by_peer_within(&mut late, WAIT),
        "a late connection of the older pool is kept"
    );

    let mut after = raw_authenticated(b.addr(), A, B);
    announce_and_send(&mut after, 7, 2, b"new-again");
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 3));
    let bodies: Vec<Vec<u8>> = b.host.log().frames.iter().map(|f| f.body.clone()).collect();
    assert_eq!(
        bodies,
        vec![b"from-old".to_vec(), b"from-new".to_vec(), b"new-again".to_vec()]
    );
    // A restarted node (another incarnation) supersedes too, whatever its epoch.
    let mut restarted = raw_authenticated(b.addr(), A, B);
    announce_and_send(&mut restarted, 8, 1, b"restarted");
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 4));
    assert!(closed_by_peer_within(&mut new, WAIT));
    // Every connection a newer pool closed says so; none closed for another reason.
    assert!(b.host.wait_for(WAIT, |log| {
        log.events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::InboundDown {
                        reason: CloseReason::Superseded,
                        ..
                    }
                )
            })
            .count()
            == 4
    }));
}

/// A panic on an I/O thread while it reads is caught: reported as an event, that connection closes
/// (so the sender's pool goes down), the process survives and a new pool works.
#[test]
fn panic_in_a_thread_closes_only_its_connection() {
    let (a, b) = (Node::start(A), Node::start(B));
    a.open(&b, 1).expect("pool opens");
    assert!(matches!(a.send(B, 0, b"panic!".to_vec()), Ok(Sent::Queued)));
    assert!(b
        .host
        .wait_for_event(|e| matches!(e, Event::Panic { message, .. } if message.contains("on purpose"))));
    assert!(a.host.wait_for_event(|e| is_pool_down(e, B)));
    a.open(&b, 1).expect("a new pool opens");
    let after = a.send(B, 0, b"after".to_vec());
    assert!(
        matches!(after, Ok(Sent::Queued)),
        "send after reopening: {:?}, peers {:?}, A: {}, B: {}",
        after.as_ref().err(),
        a.rt.peers(),
        a.host.events_debug(),
        b.host.events_debug()
    );
    assert!(b
        .host
        .wait_for(WAIT, |log| log.frames.iter().any(|f| f.body == b"after")));
}

// ---------------------------------------------------------------------------
// Injected faults: a thread that panics or cannot start leaves nothing stuck. Faults are
// process-wide, so each test's nodes have names no other test uses, and its faults
// name them.

/// This test's own node name.
fn fault_node(test: &str, side: &str) -> String {
    format!("{test}-{side}@127.0.0.1")
}

/// Two nodes only this test uses: (the dialing side, the dialed side).
fn fault_pair(test: &str) -> (Node, Node) {
    (
        Node::start(&fault_node(test, "a")),
        Node::start(&fault_node(test, "b")),
    )
}

/// Like `fault_pair`, with one handshake slot on the dialed side: a slot a fault kept
/// would lock the next dial out.
fn one_slot_pair(test: &str) -> (Node, Node) {
    let b = Node::start_with(&fault_node(test, "b"), |c| {
        c.max_pending_handshakes = 1;
        c.max_pending_handshakes_per_ip = 1;
    });
    (Node::start(&fault_node(test, "a")), b)
}

fn is_panic(event: &Event, thread_prefix: &str, says: &str) -> bool {
    matches!(event, Event::Panic { thread, message } if thread.starts_with(thread_prefix) && message.contains(says))
}

fn assert_event(node: &Node, what: &str, matches: impl Fn(&Event) -> bool) {
    assert!(
        node.host.wait_for_event(matches),
        "{} never reported {what}: {}",
        node.name(),
        node.host.events_debug()
    );
}

/// `a`'s open of a pool to `b` (2 connections) fails because a thread named `thread...`
/// `ended` ("panicked" or "could not start"), and `a` reports that thread's panic.
fn assert_open_fails(a: &Node, b: &Node, thread: &str, ended: &str) {
    let err = a.open(b, 2).expect_err("the open fails");
    assert!(err.to_string().contains(ended), "{err}");
    let says = if ended == "panicked" {
        "injected fault"
    } else {
        ended
    };
    assert_event(a, "the panic", |e| is_panic(e, thread, says));
}

/// Once a fault broke `a`'s pool to `b`: it reports `PoolDown` once, holds no pool and
/// no thread but its acceptor; then a new pool opens and carries frames, and stopping
/// both leaves no thread behind.
fn assert_recovers(a: &Node, b: &Node) {
    assert_event(a, "PoolDown", |e| is_pool_down(e, b.name()));
    assert_eq!(
        settled_count(Duration::from_millis(200), || a
            .host
            .count_events(|e| is_pool_down(e, b.name()))),
        1,
        "{}",
        a.host.events_debug()
    );
    assert!(eventually(WAIT, || a.rt.peers().is_empty()));
    assert_eq!(
        a.send(b.name(), 0, b"lost".to_vec()).err(),
        Some(SendError::NotConnected)
    );
    assert_eq!(
        a.rt.live_threads(),
        IO_THREADS + HANDSHAKE_THREAD,
        "the I/O threads serve on"
    );
    recovers(a, b);
}

/// A new pool from `a` to `b` opens and carries frames; stopping both leaves no thread.
/// (One connection: a test may leave `b` a single handshake slot.)
fn recovers(a: &Node, b: &Node) {
    a.open(b, 1).expect("a new pool opens");
    assert!(matches!(a.send(b.name(), 0, b"after".to_vec()), Ok(Sent::Queued)));
    assert!(b
        .host
        .wait_for(WAIT, |log| log.frames.iter().any(|f| f.body == b"after")));
    for node in [a, b] {
        node.rt.stop();
        assert_eq!(node.rt.live_threads(), 0, "{} left threads behind", node.name());
    }
}

/// A dial that panics fails its callers, instead of leaving the peer "opening" with
/// every later `open_pool` joining a dial that never ends.
#[test]
fn dial_panic_fails_the_open() {
    let (a, b) = fault_pair("fault-dial-panic");
    faults::panic_next(Point::Dial, b.name(), 1);
    assert_open_fails(&a, &b, "teleport-io", "panicked");
    assert!(a.rt.peers().is_empty());
    assert_eq!(a.rt.live_threads(), IO_THREADS + HANDSHAKE_THREAD);
    recovers(&a, &b);
}

/// A connection that panics as its handshake completes closes its pool, whether or not
/// the pool was announced by then.
#[test]
fn watcher_panic_closes_the_pool() {
    let (a, b) = fault_pair("fault-watcher-panic");
    faults::panic_next(Point::Watcher, b.name(), 1);
    if let Err(err) = a.open(&b, 1) {
        assert!(err.to_string().contains("panicked"), "{err}");
    }
    assert_event(&a, "the panic", |e| is_panic(e, "teleport-io", "injected fault"));
    assert!(eventually(WAIT, || a.rt.peers().is_empty()));
    recovers(&a, &b);
}

/// A writer that panics with a sender waiting for its queue to drain: the sender is
/// woken, the frames it never wrote are counted as dropped, the pool goes down.
#[test]
fn writer_panic_wakes_waiting_senders_and_counts_dropped() {
    const LIMIT: usize = 1 << 20;
    let test = "fault-writer-panic";
    let a = Node::start_with(&fault_node(test, "a"), |c| c.send_queue_bytes = LIMIT);
    let b = Node::start(&fault_node(test, "b"));
    let peer = b.name().to_string();
    a.open(&b, 1).expect("pool opens");

    // B sits in the first frame's handler while the writer writes the second, larger
    // than all the socket buffers can hold and than one batch: the writer is stuck in
    // that write when the third frame is queued, the sender waits and the panic is armed.
    b.host.set_delay(Duration::from_millis(500));
    assert!(a.send(&peer, 0, b"first".to_vec()).is_ok());
    assert!(a.send(&peer, 0, vec![2u8; 48 << 20]).is_ok());
    let Ok(Sent::OverLimit(conn)) = a.send(&peer, 0, vec![3u8; 2 << 20]) else {
        panic!("the third frame is over the limit");
    };
    let (tx, rx) = mpsc::channel();
    assert!(
        conn.wait_for_drain(
            0,
            Box::new(move |()| {
                let _ = tx.send(());
            })
        ),
        "queue already drained"
    );
    faults::panic_next(Point::Writer, &peer, 1);
    // Once the second frame is out, the third still holds the queue over half the
    // limit: only the writer's end can wake the sender.
    rx.recv_timeout(WAIT).expect("the waiting sender is woken");
    b.host.set_delay(Duration::ZERO);
    assert_event(&a, "the panic", |e| is_panic(e, "teleport-io", "injected fault"));
    assert_event(&a, "PoolDown", |e| is_pool_down(e, &peer));

    let stats = a.stats_for(&peer);
    assert!(stats.dropped_out >= 1, "the third frame was never written");
    assert_eq!(stats.messages_out + stats.dropped_out, 3);
    let reported = a.host.log().events.iter().find_map(|e| match e {
        Event::PoolDown { dropped_messages, .. } => Some(*dropped_messages),
        _ => None,
    });
    assert_eq!(reported, Some(stats.dropped_out));
    let written = stats.messages_out as usize;
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == written));
    assert_recovers(&a, &b);
}

/// An inbound handshake that panics gives its slot back: with one slot, the next
/// connection still authenticates.
#[test]
fn handshake_panic_frees_its_slot() {
    let (a, b) = one_slot_pair("fault-handshake-panic");
    faults::panic_next(Point::Handshake, b.name(), 1);
    assert!(a.open(&b, 1).is_err(), "the handshake died");
    assert_event(&b, "the panic", |e| is_panic(e, "teleport-hs", "injected fault"));
    let listener = b.rt.listener_stats();
    assert_eq!(
        (listener.pending_handshakes, listener.inbound_connections),
        (0, 0)
    );
    recovers(&a, &b);
}

/// A reader that panics leaves its peer's inbound pool and the sockets `stop` tracks,
/// reports `InboundDown`, and its socket closes, so the sender's pool goes down.
#[test]
fn reader_panic_leaves_the_inbound_pool() {
    let (a, b) = fault_pair("fault-reader-panic");
    faults::panic_next(Point::Reader, a.name(), 1);
    // The handshake passed; the open may still fail (the socket closed under it) or
    // succeed with the pool closing right after.
    let _ = a.open(&b, 1);
    assert_event(&b, "the panic", |e| is_panic(e, "teleport-io", "injected fault"));
    assert_event(
        &b,
        "InboundDown",
        |e| matches!(e, Event::InboundDown { peer, reason } if peer == a.name() && reason.to_string().contains("panicked")),
    );
    assert_eq!(b.rt.listener_stats().inbound_connections, 0);
    assert!(split_connections(&b.stats_for(a.name())).1.is_empty());
    assert!(eventually(WAIT, || a.rt.peers().is_empty()));
    recovers(&a, &b);
}

/// The acceptor survives a panic: reported, and the next connection is accepted.
#[test]
fn acceptor_panic_is_reported_and_accepting_resumes() {
    let (a, b) = fault_pair("fault-acceptor-panic");
    faults::panic_next(Point::Acceptor, b.name(), 1);
    assert!(a.open(&b, 1).is_err(), "the connection was dropped at accept");
    let acceptor = format!("teleport-hs-{}", b.name());
    assert_event(&b, "the panic", |e| is_panic(e, &acceptor, "injected fault"));
    assert_eq!(b.rt.live_threads(), IO_THREADS + HANDSHAKE_THREAD);
    recovers(&a, &b);
}

/// An I/O thread that cannot start fails the start, and the threads that did start stop.
#[test]
fn io_thread_spawn_failure_fails_start() {
    let name = fault_node("fault-io-spawn", "b");
    faults::fail_next_spawns(&format!("teleport-io1-{name}"), 1);
    let start = || Runtime::start(Config::for_tests(&name, COOKIE), Arc::new(TestHost::default()));
    let err = start().err().expect("an I/O thread short, no runtime");
    assert!(err.to_string().contains("I/O thread"), "{err}");
    let rt = start().expect("the next start works");
    assert_eq!(rt.live_threads(), IO_THREADS + HANDSHAKE_THREAD);
    rt.stop();
    assert_eq!(rt.live_threads(), 0);
}

/// Accepts failing with EMFILE (injected before `accept`, so the dial waits in the
/// backlog as it would): the acceptor pauses 100, 200, 400, 800 ms, counts each failure,
/// reports them at most once a second without losing any, then accepts again.
#[test]
fn accept_failures_back_off_are_counted_and_reported_then_accepting_resumes() {
    const FAILURES: u64 = 4;
    let name = fault_node("accept-emfile", "b");
    faults::fail_next_accepts(&name, FAILURES as usize);
    let started = Instant::now();
    let b = Node::start(&name);
    let a = Node::start(&fault_node("accept-emfile", "a"));

    a.open(&b, 2).expect("the pool opens once accepting resumes");
    let waited = started.elapsed();
    assert_eq!(b.rt.listener_stats().accept_errors, FAILURES);
    // A lower bound only: the pauses happened, however slow the machine.
    assert!(
        waited >= Duration::from_millis(100 + 200 + 400 + 800),
        "{waited:?}"
    );
    let reports: Vec<u64> = b
        .host
        .log()
        .events
        .iter()
        .filter_map(|e| match e {
            Event::AcceptFailed {
                reason: "emfile",
                count_since_last,
            } => Some(*count_since_last),
            _ => None,
        })
        .collect();
    assert_eq!(reports.iter().sum::<u64>(), FAILURES, "{}", b.host.events_debug());
    assert!(
        reports.len() as u64 <= 1 + waited.as_secs(),
        "{reports:?} in {waited:?}"
    );
    assert!(matches!(a.send(b.name(), 0, b"after".to_vec()), Ok(Sent::Queued)));
    assert!(b
        .host
        .wait_for(WAIT, |log| log.frames.iter().any(|f| f.body == b"after")));
}

/// How long opening a pool of 8 over loopback takes, on a plain peer and on one whose
/// every inbound handshake starts 50 ms late. Prints the figures (`--nocapture`);
/// asserts only that the pools open.
#[test]
fn dial_time_pool_of_8() {
    const SIZE: usize = 8;
    let (a, b) = fault_pair("dial-time");
    let timed = |name: &str| {
        let started = Instant::now();
        a.open(&b, SIZE).expect("the pool opens");
        let took = started.elapsed();
        a.rt.close_pool(b.name());
        assert!(eventually(WAIT, || a.rt.peers().is_empty()));
        println!("dial_time_pool_of_8: {name}: {took:?}");
        took
    };
    let plain: Vec<Duration> = (0..5).map(|_| timed("plain loopback")).collect();
    faults::delay_next(Point::Handshake, b.name(), SIZE, Duration::from_millis(50));
    let slow = timed("50 ms per handshake");
    println!(
        "dial_time_pool_of_8: plain min {:?}, 50 ms handshakes {slow:?}",
        plain.iter().min().expect("five runs")
    );
}

/// Connections are dialed in parallel, all or nothing: one handshake the peer drops
/// fails the whole open, every connection already made is closed on both sides, and the
/// next open works.
#[test]
fn parallel_dial_is_all_or_nothing() {
    let (a, b) = fault_pair("parallel-dial-one-fails");
    faults::panic_next(Point::Handshake, b.name(), 1);
    let err = a.open(&b, 4).expect_err("one connection failed");
    assert_eq!(err.class(), "handshake", "{err}");
    assert!(a.rt.peers().is_empty());
    assert_eq!(a.stats_for(b.name()).handshake_failures, 1);
    assert!(eventually(WAIT, || b.rt.listener_stats().inbound_connections == 0));
    assert!(eventually(WAIT, || a.rt.listener_stats().inbound_connections == 0));
    a.open(&b, 4).expect("the next open works");
    assert_eq!(a.stats_for(b.name()).connections, 4);
}

/// `stop` interrupts every connection of a parallel dial, whose callers hear `Stopping`.
#[test]
fn stop_interrupts_a_parallel_dial() {
    let (a, b) = fault_pair("parallel-dial-stop");
    faults::delay_next(Point::Handshake, b.name(), 4, Duration::from_secs(2));
    let (opened, open_result) = mpsc::channel();
    let status =
        a.rt.open_pool(b.name(), b.addr(), 4, Box::new(move |r| drop(opened.send(r))));
    assert_eq!(status, OpenStatus::Opening);
    assert!(eventually(WAIT, || a.rt.listener_stats().inbound_connections == 4));

    let (stopped, stop_done) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            a.rt.stop();
            let _ = stopped.send(());
        });
        // Well before the peer's handshakes would even start.
        assert!(
            stop_done.recv_timeout(Duration::from_millis(1500)).is_ok(),
            "stop hung"
        );
    });
    assert_eq!(open_result.recv_timeout(WAIT), Ok(Err(OpenError::Stopping)));
    assert_eq!(a.rt.live_threads(), 0);
}

/// A body in many pieces, as an encoded term with many large binaries is.
struct Pieces(Vec<Vec<u8>>);

impl teleport_net::FrameBody for Pieces {
    fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }
    fn push_pieces<'a>(&'a self, out: &mut Vec<&'a [u8]>) {
        out.extend(self.0.iter().map(Vec::as_slice));
    }
}

/// A frame of more pieces than one system call takes (IOV_MAX, 1024) arrives whole,
/// queued (over the direct-write size) or written directly (small pieces).
#[test]
fn frames_of_more_pieces_than_iov_max_arrive_whole() {
    let (a, b) = (Node::start("iov-a@127.0.0.1"), Node::start("iov-b@127.0.0.1"));
    a.open(&b, 1).expect("pool opens");
    let mut expected = Vec::new();
    for (pieces, size) in [(3000usize, 100usize), (2500, 7), (1025, 1)] {
        let body: Vec<Vec<u8>> = (0..pieces).map(|i| vec![(i % 251) as u8; size]).collect();
        expected.push(body.concat());
        let frame =
            a.rt.frame(FrameKind::Send, Box::new(Pieces(body)))
                .expect("fits a frame");
        assert!(a.rt.send(b.name(), 0, frame).is_ok());
    }
    assert!(
        b.host.wait_for(WAIT, |log| log.frames.len() == 3),
        "{}",
        b.host.events_debug()
    );
    let got: Vec<Vec<u8>> = b.host.log().frames.iter().map(|f| f.body.clone()).collect();
    assert!(got == expected, "bodies differ");
    assert_eq!(a.rt.peers(), vec![b.name().to_string()]);
}

/// A frame its handler defers pauses its own connection only: on a node with one I/O
/// thread, another peer's frames go on meanwhile; once the outcome is reported the
/// paused connection's later frames follow, in order. A `Resume` dropped unreported
/// counts the frame undeliverable and reads on too.
#[test]
fn a_deferred_frame_pauses_only_its_connection() {
    let b = Node::start_with("defer-b@127.0.0.1", |c| c.io_threads = 1);
    let (a, c) = (Node::start("defer-a@127.0.0.1"), Node::start("defer-c@127.0.0.1"));
    a.open(&b, 1).expect("pool a -> b");
    c.open(&b, 1).expect("pool c -> b");
    for body in [&b"defer"[..], b"a1", b"a2"] {
        assert!(a.send(b.name(), 0, body.to_vec()).is_ok());
    }
    assert!(b.host.wait_for(WAIT, |log| log.deferred.len() == 1));
    assert!(c.send(b.name(), 0, b"c1".to_vec()).is_ok());
    assert!(b
        .host
        .wait_for(WAIT, |log| log.frames.iter().any(|f| f.body == b"c1")));
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        b.host.frames_from(a.name()),
        1,
        "a's connection waits for the deferred frame"
    );

    let resume = b.host.log().deferred.pop().expect("one deferred");
    resume.finish(Ok(Delivery::Delivered));
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 4));
    let from_a: Vec<Vec<u8>> = b
        .host
        .log()
        .frames
        .iter()
        .filter(|f| f.peer == a.name())
        .map(|f| f.body.clone())
        .collect();
    assert_eq!(from_a, vec![b"defer".to_vec(), b"a1".to_vec(), b"a2".to_vec()]);

    // Dropped unreported: counted undeliverable, and the connection reads on.
    assert!(a.send(b.name(), 0, b"defer".to_vec()).is_ok());
    assert!(a.send(b.name(), 0, b"a3".to_vec()).is_ok());
    assert!(b.host.wait_for(WAIT, |log| log.deferred.len() == 1));
    drop(b.host.log().deferred.pop());
    assert!(b
        .host
        .wait_for(WAIT, |log| log.frames.iter().any(|f| f.body == b"a3")));
    assert!(eventually(WAIT, || b.stats_for(a.name()).undeliverable_in == 1));
    assert_eq!(b.rt.live_threads(), 1 + HANDSHAKE_THREAD);
}

/// Twelve nodes of one I/O thread each, every one with a pool of 2 to every other:
/// every frame arrives, and no node runs more than its one thread, however many
/// connections it holds (22 out, 22 in).
#[test]
fn one_io_thread_serves_many_pools_both_ways() {
    const NODES: usize = 12;
    let nodes: Vec<Node> = (0..NODES)
        .map(|i| Node::start_with(&format!("mesh{i}@127.0.0.1"), |c| c.io_threads = 1))
        .collect();
    for from in &nodes {
        for to in &nodes {
            if from.name() != to.name() {
                from.open(to, 2).expect("pool opens");
            }
        }
    }
    for from in &nodes {
        for to in &nodes {
            if from.name() != to.name() {
                for key in 0..2 {
                    let body = vec![key as u8; 70_000];
                    assert!(from.send(to.name(), key, body).is_ok());
                    assert!(from.send(to.name(), key, b"small".to_vec()).is_ok());
                }
            }
        }
    }
    for node in &nodes {
        assert!(
            node.host
                .wait_for(WAIT, |log| log.frames.len() == 4 * (NODES - 1)),
            "{} got {} frames",
            node.name(),
            node.host.log().frames.len()
        );
        assert_eq!(node.rt.live_threads(), 1 + HANDSHAKE_THREAD);
        let connections: usize = node.rt.stats().iter().map(|(_, s)| s.per_connection.len()).sum();
        assert_eq!(
            connections,
            4 * (NODES - 1),
            "{}: 2 out and 2 in per peer",
            node.name()
        );
    }
}
