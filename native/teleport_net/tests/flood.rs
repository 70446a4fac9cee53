//! A listener flooded with connections from one source: once the source has failed its
//! allowance of handshakes (`max_handshake_failures_per_ip`) it is refused at accept,
//! counted and reported once, and gets its allowance back when it stops; established
//! connections keep carrying frames meanwhile, and a node from another source still
//! connects. Handshakes run on a thread of their own: an acceptor that stalls does not
//! stall established connections, and it runs at a lower priority than they do. Every
//! wait is bounded.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

use teleport_net::faults::{self, Point};
use teleport_net::handshake::{client_handshake, HandshakeConfig};
use teleport_net::{Event, Sent};

mod nodes;
use nodes::{closed_by_peer_within, connect_from, eventually, Node, COOKIE, WAIT};

/// Where the flood comes from; the nodes dial from 127.0.0.1.
const FLOOD_SOURCE: [u8; 4] = [127, 0, 0, 2];

fn is_throttled_from(event: &Event, source: &str) -> bool {
    matches!(event, Event::HandshakeFailed { remote, reason: "throttled", .. }
             if remote.starts_with(&format!("{source}:")))
}

/// A handshake with `to` from the flood's source, as a node that knows the cookie.
fn authenticates_from_flood_source(to: &Node) -> bool {
    let stream = connect_from(FLOOD_SOURCE, to.addr());
    let config = HandshakeConfig {
        capabilities: Default::default(),
        cookie: COOKIE,
        local_node: "returning@127.0.0.2",
        timeout: WAIT,
    };
    client_handshake(&stream, &config, to.name()).is_ok()
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

#[test]
fn a_source_that_keeps_failing_is_refused_at_accept_and_nobody_else_is() {
    const ALLOWED: usize = 5;
    let b = Node::start_with("flood_b@127.0.0.1", |c| c.max_handshake_failures_per_ip = ALLOWED);
    let a = Node::start("flood_a@127.0.0.1");
    a.open(&b, 2).expect("A's pool is up before the flood");

    let stop = AtomicBool::new(false);
    let made = AtomicU64::new(0);
    let started = Instant::now();
    thread::scope(|s| {
        // The flood stops however this scope ends (a failed assertion too: the scope
        // waits for its threads).
        let _stop_flood = StopOnDrop(&stop);
        // The flood: connections from one source, each sending a zero length (garbage,
        // refused at once) unless it is closed at accept first.
        s.spawn(|| {
            while !stop.load(SeqCst) {
                let mut conn = connect_from(FLOOD_SOURCE, b.addr());
                let _ = conn.write_all(&[0, 0]);
                assert!(
                    closed_by_peer_within(&mut conn, WAIT),
                    "B kept a flood connection open"
                );
                made.fetch_add(1, SeqCst);
            }
        });
        assert!(
            eventually(WAIT, || b.rt.listener_stats().throttled_handshakes > 0),
            "the flood was never throttled: {:?}",
            b.rt.listener_stats()
        );
        // A's messages still arrive.
        for seq in 0..100u64 {
            let sent = a.send(b.name(), seq % 2, seq.to_be_bytes().to_vec());
            assert!(matches!(sent, Ok(Sent::Queued)), "A's pool is gone");
        }
        assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 100));
        // A node from another source connects, and the flood is still refused after.
        let c = Node::start("flood_c@127.0.0.1");
        c.open(&b, 2).expect("C connects during the flood");
        assert!(matches!(
            c.send(b.name(), 0, b"from c".to_vec()),
            Ok(Sent::Queued)
        ));
        assert!(b
            .host
            .wait_for(WAIT, |log| log.frames.iter().any(|f| f.body == b"from c")));
        let throttled = b.rt.listener_stats().throttled_handshakes;
        assert!(eventually(WAIT, || b.rt.listener_stats().throttled_handshakes > throttled));
    });
    let elapsed = started.elapsed();

    // Every flood connection counted; the handshakes that ran at all are the allowance,
    // and what came back of it meanwhile (a tenth a second).
    let made = made.load(SeqCst);
    assert!(eventually(WAIT, || b.rt.listener_stats().handshake_failures == made));
    let stats = b.rt.listener_stats();
    let ran = stats.handshake_failures - stats.throttled_handshakes;
    let refilled = (elapsed.as_secs_f64() * ALLOWED as f64 / 10.0).ceil() as u64;
    assert!(
        ran <= ALLOWED as u64 + refilled,
        "{ran} handshakes ran of {made} in {elapsed:?}: {stats:?}"
    );
    // Reported once per source per 10 s (once, unless the machine made the flood
    // last longer), apart from the failures.
    let reported = b.host.count_events(|e| is_throttled_from(e, "127.0.0.2"));
    assert!(
        reported >= 1 && reported as u64 <= 1 + elapsed.as_secs() / 10,
        "{reported} in {elapsed:?}: {}",
        b.host.events_debug()
    );
    // Nobody else was refused.
    assert_eq!(b.host.count_events(|e| is_throttled_from(e, "127.0.0.1")), 0);
    // The source gets its allowance back once it stops failing.
    assert!(eventually(WAIT, || authenticates_from_flood_source(&b)));
}

/// The acceptor, on the handshake thread, sleeps (an injected fault) as it takes a
/// connection: frames on an established connection still arrive meanwhile, with a
/// single I/O thread (which also accepted, before the handshake thread).
#[test]
fn a_stalled_acceptor_does_not_stall_established_connections() {
    const STALL: Duration = Duration::from_secs(5);
    let b = Node::start_with("stall_b@127.0.0.1", |c| c.io_threads = 1);
    let a = Node::start("stall_a@127.0.0.1");
    a.open(&b, 1).expect("A's pool is up before the stall");
    faults::delay_next(Point::Acceptor, b.name(), 1, STALL);
    // Silent: once accepted, it holds a handshake slot until the handshake times out.
    let _silent = connect_from(FLOOD_SOURCE, b.addr());
    // The acceptor is asleep before the frames are sent (were it on their thread, it
    // would have to wake before reading them, and would take the slot first).
    thread::sleep(Duration::from_millis(500));
    for seq in 0..100u64 {
        assert!(a.send(b.name(), 0, seq.to_be_bytes().to_vec()).is_ok());
    }
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 100));
    // Still asleep in the acceptor: the silent connection has no slot yet.
    assert_eq!(
        b.rt.listener_stats().pending_handshakes,
        0,
        "the frames waited for the acceptor"
    );
    // And the acceptor goes on afterwards.
    assert!(eventually(WAIT, || b.rt.listener_stats().pending_handshakes == 1));
}

/// The handshake thread runs 10 nice levels below the I/O threads (Linux: per thread).
#[cfg(target_os = "linux")]
#[test]
fn the_handshake_thread_runs_at_a_lower_priority() {
    let _b = Node::start("nice_b@127.0.0.1");
    // (name, nice) of every thread of this process: /proc/self/task/*/stat, the name in
    // parentheses, nice the 19th field (the 17th after it).
    let threads: Vec<(String, i64)> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            let (head, tail) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            let nice = tail.split_whitespace().nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .collect();
    let nice_of = |prefix: &str| -> Vec<i64> {
        let mut nices: Vec<i64> = threads
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, nice)| *nice)
            .collect();
        nices.sort_unstable();
        nices.dedup();
        nices
    };
    let io = nice_of("teleport-io");
    assert_eq!(io.len(), 1, "{threads:?}");
    assert_eq!(nice_of("teleport-hs"), vec![(io[0] + 10).min(19)], "{threads:?}");
}
