//! What the embedding side (the NIF, or a test) provides to the network core:
//! somewhere to deliver arriving frames and somewhere to report events.
//! Keeping the VM behind this trait lets `cargo test` run real pools on loopback.

use std::any::Any;
use std::sync::Arc;

use crate::error::CloseReason;
use crate::framing::FrameKind;
use crate::io_slot::Slot;

/// How one arriving frame ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// Well formed, but nobody to give it to (dead pid, unregistered name): counted, not fatal.
    Undeliverable(Undeliverable),
    /// The handler passed the frame on (to be decoded on a scheduler) and holds the
    /// `Resume` it took from `Deferral::defer`: the connection reads nothing more until
    /// that reports the outcome (or is dropped), so its frames keep their order.
    Deferred,
}

/// Why a well-formed frame had nobody to take it; its name is the `reason` of the
/// `undeliverable` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undeliverable {
    /// A frame to decode on a scheduler, and no decoder process to do it.
    NoDecoder,
    /// The decoder took the frame and went before it said how it ended.
    DecoderDown,
    /// A call, and no relay process to take it.
    NoCallRelay,
    /// The destination pid is not one of this node's.
    NotALocalPid,
    /// Nothing is registered under the destination name.
    Noproc,
    /// The destination process is dead.
    DeadProcess,
}

impl Undeliverable {
    pub const ALL: [Undeliverable; 6] = [
        Undeliverable::NoDecoder,
        Undeliverable::DecoderDown,
        Undeliverable::NoCallRelay,
        Undeliverable::NotALocalPid,
        Undeliverable::Noproc,
        Undeliverable::DeadProcess,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Undeliverable::NoDecoder => "no_decoder",
            Undeliverable::DecoderDown => "decoder_down",
            Undeliverable::NoCallRelay => "no_call_relay",
            Undeliverable::NotALocalPid => "not_a_local_pid",
            Undeliverable::Noproc => "noproc",
            Undeliverable::DeadProcess => "dead_process",
        }
    }
}

/// What a handler says of a frame body it cannot take (malformed, or no memory for
/// it), in words for the log: the connection that carried it is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// How a handler ended one frame.
pub type Outcome = Result<Delivery, Malformed>;

/// A frame body in a buffer of the handler's own (see `FrameHandler::body_buffer`),
/// filled by the I/O thread straight from the socket.
pub trait BodyBuffer: Send {
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// Back to the handler's own type in `handle_owned`.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// Delivers the frames of one inbound connection; owned by that connection, called on
/// its I/O thread. It must not block: a frame it cannot deliver at once it defers.
pub trait FrameHandler: Send {
    /// Delivers one body. `Err` means the peer sent something malformed: the connection is closed.
    fn handle(&mut self, kind: FrameKind, body: &[u8], deferral: &Deferral) -> Outcome;

    /// For a body of `len` bytes: a buffer of the handler's own to read it into (to
    /// reference large binaries in place), or `None` to have it read into the
    /// connection's buffer and passed to `handle`. `Err`: it cannot be had (out of memory).
    fn body_buffer(&mut self, _len: usize) -> Result<Option<Box<dyn BodyBuffer>>, Malformed> {
        Ok(None)
    }

    /// Delivers a body read into a buffer from `body_buffer`.
    fn handle_owned(
        &mut self,
        _kind: FrameKind,
        _body: Box<dyn BodyBuffer>,
        _deferral: &Deferral,
    ) -> Outcome {
        Err(Malformed("no buffer was lent".to_string()))
    }
}

/// Where a deferred frame's outcome goes: the I/O thread of its connection, which
/// reads on once it arrives (queued and woken; never blocks).
pub(crate) trait ResumeTarget: Send + Sync {
    fn resume(&self, slot: Slot, outcome: Outcome);
}

/// Lets a handler defer the frame it is handling (see `Delivery::Deferred`).
pub struct Deferral {
    pub(crate) target: Arc<dyn ResumeTarget>,
    pub(crate) slot: Slot,
}

impl Deferral {
    /// The handle to report the deferred frame's outcome with. Taken once per
    /// `Delivery::Deferred`.
    pub fn defer(&self) -> Resume {
        Resume {
            to: Some((self.target.clone(), self.slot)),
        }
    }
}

/// Reports how a deferred frame ended, from any thread; dropping it unreported counts
/// the frame undeliverable (`decoder_down`), so the connection always reads on.
pub struct Resume {
    to: Option<(Arc<dyn ResumeTarget>, Slot)>,
}

impl Resume {
    pub fn finish(mut self, outcome: Outcome) {
        if let Some((target, slot)) = self.to.take() {
            target.resume(slot, outcome);
        }
    }
}

impl Drop for Resume {
    fn drop(&mut self) {
        if let Some((target, slot)) = self.to.take() {
            target.resume(slot, Ok(Delivery::Undeliverable(Undeliverable::DecoderDown)));
        }
    }
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
        reason: CloseReason,
        dropped_messages: u64,
    },
    InboundUp {
        peer: String,
    },
    InboundDown {
        peer: String,
        reason: CloseReason,
    },
    /// At most one per source address per `failure_log::INTERVAL`; `unreported`
    /// failures from that source came before it without an event of their own.
    HandshakeFailed {
        remote: String,
        reason: &'static str,
        /// The error in words (empty if the reason says it all).
        detail: String,
        unreported: u64,
    },
    Undeliverable {
        peer: String,
        reason: Undeliverable,
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
    /// An inbound connection of `peer` announces a pool (`token`) other than its live
    /// one: whether `peer` itself opened it (it holds that token now). `newer`: the token
    /// is later than the live pool's, as a node's own pools follow each other (a made-up
    /// token can be too). `resume` reports the answer: `Ok(Delivery::Delivered)` for yes;
    /// anything else, or dropping it, is no (the connection closes). Must not block. By
    /// default (a host that cannot ask the peer), `newer`.
    fn confirm_pool(&self, _peer: &str, _token: crate::framing::PoolToken, newer: bool, resume: Resume) {
        resume.finish(if newer {
            Ok(Delivery::Delivered)
        } else {
            Err(Malformed("an older pool".to_string()))
        });
    }
}

/// One-shot callbacks, run on an I/O thread, or on the caller's own thread when the
/// outcome is known at once (a pool closed by `close_pool`): they must not block.
pub type Callback<T> = Box<dyn FnOnce(T) + Send + Sync>;
