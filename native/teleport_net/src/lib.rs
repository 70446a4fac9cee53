//! teleport's network core, independent of the Erlang VM: the listener, pools of
//! authenticated outbound connections per peer, the I/O engine that drives every
//! socket from a fixed set of threads, handshake and framing. The NIF crate plugs the
//! VM in through `host::Host`.
//!
//! Data path, in the order a message travels: `Runtime::send` -> `SendQueue::enqueue`
//! (a direct write, or the queue) -> the connection's I/O thread (`engine/`,
//! `SendQueue::flush`) -> socket -> the peer's I/O thread -> `frame_reader.rs` -> `inbound.rs` ->
//! `host::FrameHandler::handle` (decode and deliver, in the NIF). Drawn whole, file
//! by file: docs/architecture.md.

pub mod config;
mod engine;
pub mod error;
pub mod etf;
pub mod failure_log;
#[doc(hidden)]
pub mod faults;
mod frame_reader;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod host;
mod inbound;
mod inbound_pools;
mod io_slot;
mod listener;
pub mod pool;
pub mod runtime;
pub mod send_buffer;
pub mod send_queue;
mod socket;
pub mod stats;
pub mod thread_priority;
mod throttle;
#[cfg(any(target_os = "linux", target_os = "freebsd"))]
pub mod tls;
#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
#[path = "tls_unsupported.rs"]
pub mod tls;

pub use config::{Config, TlsConfig};
pub use error::{CloseReason, Detail, FrameRefusal, OpenError};
pub use framing::FrameBody;
pub use framing::FrameKind;
pub use host::{
    BodyBuffer, Callback, Deferral, Delivery, Event, FrameHandler, Host, Malformed, Outcome, Resume,
    Undeliverable,
};
pub use io_slot::Slot;
pub use runtime::{ListenerStats, OpenStatus, Runtime, SendError, Sent};
pub use send_buffer::SendBuffer;
pub use send_queue::OutFrame;
pub use stats::{ConnDirection, ConnStatsSnapshot, PeerStatsSnapshot};
pub use thread_priority::IoThreadPriority;
