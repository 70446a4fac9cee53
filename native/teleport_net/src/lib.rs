//! teleport's network core, independent of the Erlang VM: the listener, pools of
//! authenticated outbound connections per peer, their writer threads, the inbound
//! readers, handshake and framing. The NIF crate plugs the VM in through `host::Host`.
//!
//! Data path, in the order a message travels: `Runtime::send` -> `Connection::enqueue`
//! -> writer thread (`connection.rs`) -> socket -> reader thread (`inbound.rs`) ->
//! `framing::read_header` -> `host::FrameHandler::handle` (decode and deliver, in the NIF).

pub mod config;
pub mod connection;
pub mod error;
pub mod etf;
pub mod failure_log;
#[doc(hidden)]
pub mod faults;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod host;
mod inbound;
mod listener;
pub mod pool;
pub mod runtime;
pub mod stats;
pub mod thread_priority;

pub use config::Config;
pub use connection::{FrameBody, OutFrame};
pub use error::{Detail, OpenError};
pub use framing::FrameKind;
pub use host::{Callback, Delivery, Event, FrameHandler, Host};
pub use runtime::{ListenerStats, OpenStatus, Runtime, SendError, Sent};
pub use stats::{ConnDirection, ConnStatsSnapshot, PeerStatsSnapshot};
pub use thread_priority::IoThreadPriority;
