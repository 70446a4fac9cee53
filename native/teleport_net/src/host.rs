//! What the embedding side (the NIF, or a test) provides to the network core:
//! somewhere to deliver arriving frames and somewhere to report events.
//! Keeping the VM behind this trait lets `cargo test` run real pools on loopback.

use std::io::Read;

use crate::framing::FrameKind;

/// How one arriving frame ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// Well formed, but nobody to give it to (dead pid, unregistered name): counted, not fatal.
    Undeliverable(&'static str),
}

/// Delivers the frames of one inbound connection; owned by that connection's reader thread.
pub trait FrameHandler: Send {
    /// Delivers one body. `Err` means the peer sent something malformed: the connection is closed.
    fn handle(&mut self, kind: FrameKind, body: &[u8]) -> Result<Delivery, String>;

    /// Reads exactly `len` body bytes from `body`, then delivers them. The default reads
    /// into the reader's reused `scratch` buffer; a handler that wants the bytes in a
    /// buffer of its own (to reference large binaries in place) reads them itself.
    fn read_and_handle(
        &mut self,
        kind: FrameKind,
        len: usize,
        body: &mut dyn Read,
        scratch: &mut Vec<u8>,
    ) -> Result<Delivery, String> {
        read_body(body, len, scratch)?;
        self.handle(kind, scratch)
    }
}

/// Reads exactly `len` bytes of a body into `scratch` (reused between frames).
pub fn read_body(body: &mut dyn Read, len: usize, scratch: &mut Vec<u8>) -> Result<(), String> {
    scratch.clear();
    scratch.resize(len, 0);
    body.read_exact(scratch).map_err(|e| format!("read failed: {e}"))
}

/// Things worth telling the VM (for logging, or to wake a waiting caller).
#[derive(Debug)]
pub enum Event {
    PoolUp {
        peer: String,
        connections: usize,
    },
    PoolDown {
        peer: String,
        reason: String,
        dropped_messages: u64,
    },
    InboundUp {
        peer: String,
    },
    InboundDown {
        peer: String,
        reason: String,
    },
    /// At most one per source address per `failure_log::INTERVAL`; `unreported`
    /// failures from that source came before it without an event of their own.
    HandshakeFailed {
        remote: String,
        reason: &'static str,
        unreported: u64,
    },
    Undeliverable {
        peer: String,
        reason: &'static str,
        total: u64,
    },
    /// The listener's accepts fail (`reason`: e.g. `emfile`, out of descriptors): it
    /// pauses between attempts. Sent at most once a second, counting the failures since
    /// the previous one; accepting resumes by itself.
    AcceptFailed {
        reason: &'static str,
        count_since_last: u64,
    },
    /// A thread of ours panicked, or could not start (`message` says which); what it
    /// served is closed (a dial fails, a pool closes), nothing is left waiting on it.
    Panic {
        thread: String,
        message: String,
    },
}

pub trait Host: Send + Sync + 'static {
    /// Called once per authenticated inbound connection.
    fn frame_handler(&self, peer: &str) -> Box<dyn FrameHandler>;
    /// Never blocks for long; may be called from any thread.
    fn event(&self, event: Event);
}

/// One-shot callbacks, run on a core thread, or on the caller's own thread when the
/// outcome is known at once (a dial thread that could not start, a pool closed by
/// `close_pool`): they must not block.
pub type Callback<T> = Box<dyn FnOnce(T) + Send + Sync>;
