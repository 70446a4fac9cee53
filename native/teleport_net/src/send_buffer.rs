//! The kernel send buffer of an outbound connection (`Config::sndbuf`).
//!
//! A peer that reads later than the data arrives gets no ACKs from its kernel until it
//! reads (the ACK would not open the window), so what our socket holds unacknowledged
//! is what the peer has not read yet, up to the send buffer. Linux grows that buffer to
//! `tcp_wmem`'s maximum (4 MiB) per connection; with many busy connections the unread
//! bytes outgrow the CPU caches and the reader copies them from memory. A buffer of
//! 512 KiB (the kernel counts it double) keeps them in cache: on the 2-core loopback
//! ring the mean trip fell from 0.44-0.46 s to 0.31-0.36 s (BENCHMARKS.md,
//! "Ring"). A fixed buffer also caps one connection at about its size per round trip,
//! so `auto` fixes it only on paths of under a millisecond (loopback, one LAN), where
//! that cap is above what the link carries, and leaves long paths to the kernel.

use std::time::Duration;

use mio::net::TcpStream;

use crate::socket;

/// How an outbound connection's send buffer is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendBuffer {
    /// `AUTO_BYTES` on a path whose round trip is under `AUTO_MAX_RTT`, else as `Kernel`.
    Auto,
    /// The kernel's own sizing (Linux: autotuned up to `net.ipv4.tcp_wmem`).
    Kernel,
    /// `SO_SNDBUF` of this many bytes (the kernel may double or cap it).
    Bytes(usize),
}

/// `SO_SNDBUF` that `Auto` sets on a short path.
pub const AUTO_BYTES: usize = 512 * 1024;
/// Longest round trip (the least TCP measured while the handshake ran) that `Auto` treats
/// as short: 1 MiB per millisecond is 1 GB/s per connection at worst.
pub const AUTO_MAX_RTT: Duration = Duration::from_millis(1);

/// Bytes not yet sent that the kernel takes on an outbound connection before a write
/// fails with `WouldBlock` (Linux `TCP_NOTSENT_LOWAT`; the socket is writable again
/// below half of it). A frame written now waits behind what the kernel holds not yet
/// sent, so this bounds how long an express frame waits behind bulk already handed to
/// the kernel: about 1 ms at 1 Gbit/s, where the kernel's own buffer (up to 4 MiB)
/// would hold 30 ms. Bytes in flight (sent, not yet acknowledged) are not counted, so
/// a long path still gets its window.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// A send buffer fixed at most this large bounds what is not yet sent by itself (on a
/// short path, 1 MiB is ~0.3 ms at loopback speeds): `NOTSENT_LOWAT` is not set there,
/// as its wake-ups every 64 KiB cost the streams throughput on loopback (hol_SUITE, two
/// runs each in one sitting: 3.0-3.3 GB/s with it, 3.5-3.7 GB/s without).
pub const BOUNDED_BY_BUFFER: usize = 1 << 20;

/// Sizes `socket`'s send buffer as `policy` says (once authenticated: the handshake's
/// exchanges gave TCP its round-trip estimate), and bounds what it holds not yet sent
/// (`NOTSENT_LOWAT`) unless the buffer itself does. Returns the buffer as the kernel
/// now reports it, for the connection's stats.
pub fn apply(socket: &TcpStream, policy: SendBuffer) -> Option<usize> {
    let fixed = choose(policy, || socket::round_trip(socket));
    if let Some(bytes) = fixed {
        socket::set_send_buffer(socket, bytes);
    }
    if needs_not_sent_bound(fixed) {
        socket::set_not_sent_bound(socket, NOTSENT_LOWAT);
    }
    socket::send_buffer(socket)
}

/// Whether the kernel may hold more not yet sent than an express frame should wait
/// behind: unless the buffer was fixed at `BOUNDED_BY_BUFFER` or less.
fn needs_not_sent_bound(fixed: Option<usize>) -> bool {
    fixed.is_none_or(|bytes| bytes > BOUNDED_BY_BUFFER)
}

/// The size to set, if any; `rtt` is asked only for `Auto`.
fn choose(policy: SendBuffer, rtt: impl FnOnce() -> Option<Duration>) -> Option<usize> {
    match policy {
        SendBuffer::Kernel => None,
        SendBuffer::Bytes(bytes) => Some(bytes),
        SendBuffer::Auto => rtt().filter(|rtt| *rtt < AUTO_MAX_RTT).map(|_| AUTO_BYTES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_fixes_the_buffer_only_on_short_paths() {
        let us = |n| move || Some(Duration::from_micros(n));
        assert_eq!(choose(SendBuffer::Auto, us(40)), Some(AUTO_BYTES));
        assert_eq!(choose(SendBuffer::Auto, us(999)), Some(AUTO_BYTES));
        assert_eq!(choose(SendBuffer::Auto, us(1000)), None);
        assert_eq!(choose(SendBuffer::Auto, us(30_000)), None);
        assert_eq!(choose(SendBuffer::Auto, || None), None);
    }

    #[test]
    fn kernel_and_bytes_do_not_look_at_the_path() {
        let never = || -> Option<Duration> { panic!("round trip read") };
        assert_eq!(choose(SendBuffer::Kernel, never), None);
        assert_eq!(choose(SendBuffer::Bytes(65536), never), Some(65536));
    }

    #[test]
    fn only_a_large_or_kernel_sized_buffer_gets_the_not_sent_bound() {
        assert!(needs_not_sent_bound(None));
        assert!(needs_not_sent_bound(Some(4 << 20)));
        assert!(!needs_not_sent_bound(Some(AUTO_BYTES)));
        assert!(!needs_not_sent_bound(Some(BOUNDED_BY_BUFFER)));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_loopback_connection_gets_the_auto_buffer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // A round trip for TCP to measure.
        use std::io::{Read, Write};
        (&client).write_all(b"x").unwrap();
        server.read_exact(&mut [0u8; 1]).unwrap();
        server.write_all(b"y").unwrap();
        (&client).read_exact(&mut [0u8; 1]).unwrap();
        let client = TcpStream::from_std(client);
        let before = socket2::SockRef::from(&client).send_buffer_size().unwrap();
        let after = apply(&client, SendBuffer::Auto).unwrap();
        // Linux doubles SO_SNDBUF for its bookkeeping.
        assert_eq!(after, 2 * AUTO_BYTES, "was {before}");
        assert_eq!(socket::not_sent_bound(&client), 0, "set on a short path");
        assert_eq!(apply(&client, SendBuffer::Bytes(64 * 1024)), Some(2 * 64 * 1024));
        apply(&client, SendBuffer::Kernel);
        assert_eq!(socket::not_sent_bound(&client), NOTSENT_LOWAT);
    }
}
