//! Large frames go in chunks, and other senders' small frames go between them
//! (`framing`, `send_queue`): a small frame never waits for all of a large one on its
//! connection; each sender's frames keep their order however the lanes interleave; a
//! receiver holds at most one partial body per connection, counted in its stats, in
//! the buffer it is delivered in. Over plain TCP here (tls.rs runs chunks over TLS).

use std::time::Duration;

use proptest::prelude::*;
use teleport_net::framing::{CHUNK_MAX, EXPRESS_MAX};
use teleport_net::ConnDirection;

mod nodes;
use nodes::{eventually, Node, TestHost, WAIT};

/// A body that names its sender and its place in the sender's sequence.
fn body(sender: u64, seq: u32, len: usize) -> Vec<u8> {
    let mut body = vec![(seq % 251) as u8; len.max(12)];
    body[..8].copy_from_slice(&sender.to_be_bytes());
    body[8..12].copy_from_slice(&seq.to_be_bytes());
    body
}

fn sender_and_seq(body: &[u8]) -> (u64, u32) {
    (
        u64::from_be_bytes(body[..8].try_into().expect("8 bytes")),
        u32::from_be_bytes(body[8..12].try_into().expect("4 bytes")),
    )
}

fn start(name: &str) -> Node {
    Node::start_hosted(name, TestHost::with_own_buffers(), |_| {})
}

/// The receiver is held up on a first frame (its handler sleeps), so the large frame
/// queued next cannot be written whole before the small one of another sender, queued
/// after it, is: the small one arrives first, the large one whole after it.
#[test]
fn a_small_frame_overtakes_another_senders_large_one_on_the_same_connection() {
    let (a, b) = (start("ia@127.0.0.1"), start("ib@127.0.0.1"));
    a.open(&b, 1).expect("a pool of one connection");
    b.host.set_delay(Duration::from_millis(300));
    a.send(b.name(), 7, body(7, 0, 16)).expect("first");
    assert!(eventually(WAIT, || !b.host.log().frames.is_empty()
        || b.stats_for(a.name()).messages_in > 0));
    let large = 32 << 20;
    a.send(b.name(), 1, body(1, 0, large)).expect("large");
    a.send(b.name(), 2, body(2, 0, 16)).expect("small");
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 3));
    b.host.set_delay(Duration::ZERO);
    let order: Vec<(u64, usize)> = b
        .host
        .log()
        .frames
        .iter()
        .map(|f| (sender_and_seq(&f.body).0, f.body.len()))
        .collect();
    assert_eq!(order, vec![(7, 16), (2, 16), (1, large)], "arrival order");
    assert_eq!(
        b.host.log().owned,
        1,
        "the large body went to a buffer of the handler's own"
    );
}

/// While a large body is partly in, the receiver counts what it holds for it, once per
/// connection; nothing when it is whole.
#[test]
fn a_partial_body_is_counted_while_it_arrives() {
    let (a, b) = (start("pa@127.0.0.1"), start("pb@127.0.0.1"));
    a.open(&b, 2).expect("a pool of two");
    b.host.set_delay(Duration::from_millis(400));
    a.send(b.name(), 0, body(0, 0, 16)).expect("first");
    // Key 2 goes on the same connection as key 0 (a pool of two): its chunks start, and
    // stop where the receiver's buffers are full.
    let large = 48 << 20;
    a.send(b.name(), 2, body(2, 0, large)).expect("large");
    let partial = || b.stats_for(a.name()).partial_bytes;
    assert!(
        eventually(WAIT, || partial() == large as u64),
        "partial {}",
        partial()
    );
    let per_connection: Vec<u64> = b
        .stats_for(a.name())
        .per_connection
        .iter()
        .filter_map(|c| match c.direction {
            ConnDirection::Inbound { partial_bytes, .. } => Some(partial_bytes),
            _ => None,
        })
        .collect();
    assert_eq!(
        per_connection.iter().sum::<u64>(),
        large as u64,
        "{per_connection:?}"
    );
    b.host.set_delay(Duration::ZERO);
    assert!(b.host.wait_for(WAIT, |log| log.frames.len() == 2));
    assert!(eventually(WAIT, || partial() == 0));
}

/// Frames of every size around the thresholds, from several senders sharing one
/// connection, arrive whole, and each sender's in the order it sent them.
fn check_order(sizes: &[(u64, usize)], pool_size: usize) -> Result<(), TestCaseError> {
    let (a, b) = (start("oa@127.0.0.1"), start("ob@127.0.0.1"));
    a.open(&b, pool_size).expect("pool");
    let mut seq = std::collections::HashMap::<u64, u32>::new();
    for &(sender, len) in sizes {
        let n = seq.entry(sender).or_default();
        a.send(b.name(), sender, body(sender, *n, len)).expect("queued");
        *n += 1;
    }
    prop_assert!(b.host.wait_for(WAIT, |log| log.frames.len() == sizes.len()));
    let mut next = std::collections::HashMap::<u64, u32>::new();
    for frame in &b.host.log().frames {
        let (sender, n) = sender_and_seq(&frame.body);
        let expected = next.entry(sender).or_default();
        prop_assert_eq!(n, *expected, "sender {}", sender);
        prop_assert!(
            frame.body[12..].iter().all(|&x| x == (n % 251) as u8),
            "body intact"
        );
        *expected += 1;
    }
    Ok(())
}

/// Sizes that straddle the express limit and the chunk size.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        12usize..200,
        (EXPRESS_MAX - 20)..(EXPRESS_MAX + 20),
        (CHUNK_MAX - 20)..(CHUNK_MAX + 20),
        (2 * CHUNK_MAX)..(5 * CHUNK_MAX),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn each_senders_order_holds_however_its_frames_interleave(
        sizes in proptest::collection::vec((0u64..4, size()), 1..40),
        pool_size in 1usize..3,
    ) {
        check_order(&sizes, pool_size)?;
    }
}
