//! How other threads (senders on schedulers, the pool closing) reach a connection
//! that lives on an I/O thread: by message. Nothing
//! outside the engine touches a connection's socket state directly, except the
//! sender's direct write, which `SendQueue` serialises with the I/O thread.

use std::sync::Arc;

/// A connection's place on its I/O thread: the slab slot and the connection's own
/// number, so a message for a connection that is gone never reaches the one that
/// took its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub index: usize,
    pub id: u64,
}

/// What an I/O thread can be asked from another thread about an outbound connection.
/// Each call queues a message and wakes the thread; none blocks. (Resuming an inbound
/// connection is `host::ResumeTarget`.)
pub(crate) trait IoThread: Send + Sync {
    /// Frames were queued on an outbound connection: write them.
    fn flush(&self, slot: Slot);
    /// Close the connection (its pool is closing).
    fn close(&self, slot: Slot);
}

#[derive(Clone)]
pub(crate) struct IoSlot {
    pub thread: Arc<dyn IoThread>,
    pub slot: Slot,
}

impl IoSlot {
    pub fn flush(&self) {
        self.thread.flush(self.slot);
    }

    pub fn close(&self) {
        self.thread.close(self.slot);
    }
}
