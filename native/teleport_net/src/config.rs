//! Settings the runtime is started with. They are defined, with their types, defaults
//! and meaning, in `erlang_src/teleport_config.erl`, which reads them from the
//! application environment and validates them; the NIF (`teleport_nif`'s `start`)
//! hands them here. The comments below say only how a field holds its setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::handshake::Capabilities;
use crate::send_buffer::SendBuffer;
use crate::thread_priority::IoThreadPriority;

#[derive(Clone, Debug)]
pub struct Config {
    /// `listen_ip` and `listen_port`.
    pub listen: SocketAddr,
    /// `io_threads`, resolved (`auto` is a count by now).
    pub io_threads: usize,
    pub local_node: String,
    pub cookie: Vec<u8>,
    /// What this node tells its peers about itself in every handshake.
    pub capabilities: Capabilities,
    /// `max_frame_bytes`: checked by the frame reader before it allocates, and by senders.
    pub max_frame_bytes: u32,
    /// `send_queue_bytes`, per connection.
    pub send_queue_bytes: usize,
    /// `sndbuf` (see `send_buffer`).
    pub sndbuf: SendBuffer,
    /// `connect_timeout`.
    pub connect_timeout: Duration,
    /// `handshake_timeout`; also the grace a large body has to arrive whole.
    pub handshake_timeout: Duration,
    /// `max_pending_handshakes`.
    pub max_pending_handshakes: usize,
    /// `max_pending_handshakes_per_ip`.
    pub max_pending_handshakes_per_ip: usize,
    /// `max_handshake_failures_per_ip`, 0 for `infinity` (see `throttle`).
    pub max_handshake_failures_per_ip: usize,
    /// `io_thread_priority` (see `thread_priority`).
    pub io_thread_priority: IoThreadPriority,
    /// `reader_busy_wait_us`: how long an I/O thread with nothing to do polls its
    /// sockets before it sleeps (see `engine/worker.rs`); zero never polls.
    pub reader_busy_wait: Duration,
    /// `tls` (see `tls.rs`); `None` for `disabled`.
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
            io_thread_priority: IoThreadPriority::Normal,
            reader_busy_wait: Duration::from_micros(100),
            tls: None,
        }
    }
}
