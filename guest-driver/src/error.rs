//! The driver's error type.

use hypercall::HcError;
use hypercall::ring::{RegionError, RingError};

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The host refused the hypercall (the code it returned in RAX).
    #[error("hypercall failed: {0}")]
    Hypercall(#[from] HcError),
    /// The boot-info record is unusable (the field named is wrong).
    #[error("bad boot info: {0}")]
    BadBootInfo(&'static str),
    /// The ring region could not be opened or a ring failed.
    #[error("ring region: {0}")]
    Ring(#[from] RingError),
    /// A pointer and length cannot be viewed as shared memory.
    #[error("shared memory: {0}")]
    Region(#[from] RegionError),
    /// No run of `pages` free slots is left in the map window.
    #[error("map window has no {pages} free contiguous slots")]
    WindowFull {
        /// Slots asked for.
        pages: u64,
    },
    /// A page count of zero or above the per-call maximum.
    #[error("bad page count {0}")]
    BadPageCount(u64),
    /// A read outside the mapped pages.
    #[error("read of {len} bytes at offset {offset} leaves the mapping")]
    OutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
    },
    /// The host answered with a success value the ABI does not allow for this call.
    #[error("unexpected hypercall result {got} (expected {expected})")]
    UnexpectedResult {
        /// What the ABI says the call returns.
        expected: u64,
        /// What came back.
        got: u64,
    },
    /// The host backend's socket or memory mapping failed.
    #[cfg(feature = "std")]
    #[error("host backend I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The host backend's peer broke the handshake protocol.
    #[cfg(feature = "std")]
    #[error("host backend handshake: {0}")]
    Handshake(&'static str),
}
