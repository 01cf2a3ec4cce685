//! JSON lines on the log ring.

use alloc::vec::Vec;

use hypercall::ring::{Notify, Producer, RingError, SharedMemory};
use serde::Serialize;

/// Writes findings as JSON lines on the log ring: one object per record, newline-terminated,
/// so the shim prints records verbatim. Logging never blocks the agent: when the ring is full
/// (the shim is not printing) the line is dropped and counted.
pub struct LogWriter<M> {
    ring: Producer<M>,
    buf: Vec<u8>,
    lines: u64,
    dropped: u64,
}

impl<M> core::fmt::Debug for LogWriter<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LogWriter")
            .field("lines", &self.lines)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl<M: SharedMemory> LogWriter<M> {
    /// A writer on the log ring's producer end.
    pub fn new(ring: Producer<M>) -> Self {
        LogWriter {
            ring,
            buf: Vec::new(),
            lines: 0,
            dropped: 0,
        }
    }

    /// Stages `value` as one JSON line (visible after [`flush`](Self::flush)). Returns
    /// whether it was staged (false: dropped because the ring is full or it is too large).
    pub fn emit<T: Serialize + ?Sized>(&mut self, value: &T) -> bool {
        match serde_json::to_vec(value) {
            Ok(json) => self.emit_json(&json),
            Err(_) => {
                self.dropped += 1;
                false
            }
        }
    }

    /// Stages one already-serialized JSON object (without newline) as a line.
    pub fn emit_json(&mut self, json: &[u8]) -> bool {
        self.buf.clear();
        self.buf.extend_from_slice(json);
        self.buf.push(b'\n');
        match self.ring.try_push(&self.buf) {
            Ok(()) => {
                self.lines += 1;
                true
            }
            Err(_) => {
                self.dropped += 1;
                false
            }
        }
    }

    /// Publishes staged lines, waking the shim if it sleeps on the log ring.
    pub fn flush(&mut self, notify: &impl Notify) -> Result<(), RingError> {
        self.ring.publish_and_notify(notify)
    }

    /// Lines staged so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}
