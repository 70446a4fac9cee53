//! Settings the runtime is started with (the Erlang side reads them from the
//! application environment and validates them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::handshake::Capabilities;
use crate::send_buffer::SendBuffer;
use crate::thread_priority::IoThreadPriority;

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// The I/O engine's threads; every connection, to every peer, is served by one.
    pub io_threads: usize,
    pub local_node: String,
    pub cookie: Vec<u8>,
    /// What this node tells its peers about itself in every handshake.
    pub capabilities: Capabilities,
    /// Cap on one frame body, checked by readers before allocating and by senders.
    pub max_frame_bytes: u32,
    /// Per connection: past this many queued bytes, senders are told to wait.
    pub send_queue_bytes: usize,
    /// The kernel send buffer of each outbound connection (see `send_buffer`).
    pub sndbuf: SendBuffer,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further connections are closed at accept.
    pub max_pending_handshakes: usize,
    /// Of those, how many one source (IPv4 address, IPv6 /64) may hold.
    pub max_pending_handshakes_per_ip: usize,
    /// Inbound handshakes one source may fail in a burst, counting those in progress,
    /// before the listener refuses it at accept; it gets a tenth of them back a second,
    /// and one back per handshake that succeeds. 0 for no limit. See `throttle`.
    pub max_handshake_failures_per_ip: usize,
    /// At most this many bytes per read or write system call on a connection, 0 for no
    /// limit. A kernel that does not preempt inside a system call (Linux `preempt=none`)
    /// copies a 10 MiB write in one go while woken scheduler threads wait for the core:
    /// small chunks help other traffic's latency and cost bulk throughput (ring ~15%
    /// slower at 256 KiB), see BENCHMARKS.md.
    pub io_chunk_bytes: usize,
    /// Of the I/O threads (see `thread_priority`).
    pub io_thread_priority: IoThreadPriority,
    /// How long an inbound reader that finds its socket empty polls it (yielding the core
    /// to any thread that wants it) before sleeping in the kernel; zero never polls. Only
    /// after a wait shorter than this and no bulk frame since, so request/response traffic
    /// polls and bulk or sparse traffic does not. A message caught while polling reaches
    /// its process without a thread wake-up first (ping-pong p50 ~20% lower on 2 cores;
    /// BENCHMARKS.md, "Latency"), for up to this much CPU per message.
    pub reader_busy_wait: Duration,
    /// TLS 1.3 with mutual certificates on every connection, or none (`tls.rs`).
    pub tls: Option<TlsConfig>,
}

/// Where the certificates are and how the peer's is checked (see `tls.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// This node's certificate chain (PEM), presented as server and as client.
    pub certfile: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub keyfile: PathBuf,
    /// The CAs a peer's chain must lead to (PEM).
    pub cacertfile: PathBuf,
    /// Whether the peer's certificate is checked (and a client's required). Without,
    /// the connection is still encrypted, but anyone can be in the middle: tests only.
    pub verify_peer: bool,
    /// Whether a client checks the server's certificate names the host it dialed (the
    /// host part of the peer's node name).
    pub server_name_check: bool,
    /// Whether a listener checks the client's certificate names the host of the node
    /// name the client claims: a holder of another node's certificate cannot speak as
    /// a node of another host.
    pub client_name_check: bool,
    /// TLS 1.3 suites by their IANA names; empty for all.
    pub ciphers: Vec<String>,
}

impl TlsConfig {
    /// Verifying, name-checking, all suites.
    pub fn new(
        certfile: impl Into<PathBuf>,
        keyfile: impl Into<PathBuf>,
        cacertfile: impl Into<PathBuf>,
    ) -> TlsConfig {
        TlsConfig {
            certfile: certfile.into(),
            keyfile: keyfile.into(),
            cacertfile: cacertfile.into(),
            verify_peer: true,
            server_name_check: true,
            client_name_check: true,
            ciphers: Vec::new(),
        }
    }
}

impl Config {
    /// `io_chunk_bytes` as a size: 0 (the default) is no limit.
    pub fn io_chunk(&self) -> usize {
        if self.io_chunk_bytes == 0 {
            usize::MAX
        } else {
            self.io_chunk_bytes
        }
    }

    pub fn for_tests(local_node: &str, cookie: &[u8]) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            io_threads: 2,
            local_node: local_node.to_string(),
            cookie: cookie.to_vec(),
            capabilities: Capabilities::default(),
            max_frame_bytes: 64 << 20,
            send_queue_bytes: 8 << 20,
            sndbuf: SendBuffer::Auto,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 64,
            max_pending_handshakes_per_ip: 8,
            max_handshake_failures_per_ip: 100,
            io_chunk_bytes: 0,
            io_thread_priority: IoThreadPriority::Normal,
            reader_busy_wait: Duration::from_micros(100),
            tls: None,
        }
    }
}
