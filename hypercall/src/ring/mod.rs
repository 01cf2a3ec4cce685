//! The lock-free single-producer single-consumer ring of variable-size records, over shared
//! memory.
//!
//! One [`Region`] (the shim's `memfd`, mapped in the shim and in the appliance VM) holds a
//! discovery header and several rings (see [`crate::discovery`] for the layout). Each ring has
//! exactly one [`Producer`] and one [`Consumer`], which may live in different threads,
//! processes or VMs. Nothing but atomic word accesses is shared (see [`memory`]).
//!
//! # Ring protocol
//! - Positions are monotonic byte counts (`u64`, multiples of 8); the data offset of position
//!   `p` is `p & (size - 1)`, `size` a power of two. `producer_pos - consumer_pos` bytes are in
//!   flight, never more than `size`.
//! - A record is an 8-byte header word — payload length in bits 0..32, [`TAG_RECORD`] in bits
//!   32..64 — followed by the payload padded to 8 bytes. A record never straddles the end of
//!   the data area: when it does not fit before the end, the producer writes a header with
//!   [`TAG_WRAP`] (length 0) and continues at offset 0. A payload is at most
//!   `size / 2 - 8` bytes ([`Producer::max_payload`]), which guarantees that a record always
//!   fits once the consumer has drained the ring.
//! - The producer stages records ([`Producer::try_push`]) and makes a batch visible with one
//!   release store of its position ([`Producer::publish`]). The consumer reads with one acquire
//!   load of that position per batch, copies records out ([`Consumer::try_pop`]) and frees a
//!   batch with one release store of its position ([`Consumer::release`]).
//!
//! # Validation: the peer is hostile
//! Every word read from the peer is checked before use, and a bad one yields a typed
//! [`RingError`], never a panic or an access outside the region:
//! - the producer position must be 8-aligned, never move backwards, and stay within `size` of
//!   the consumer's position; the consumer position must be 8-aligned, never move backwards and
//!   never pass what the producer published;
//! - a record header must carry a known tag, a length within the payload limit, end before the
//!   end of the data area and before the published position.
//!
//! Each side keeps its own position locally and never reads it back from the region, so a
//! peer that overwrites it only confuses itself.
//!
//! Errors are sticky: the consumer does not advance past a bad record, so every later call
//! reports it again; the owner of the ring decides to drop the channel.
//!
//! # TOCTOU rule
//! The peer can rewrite any byte at any moment, including a record we are reading. So a record
//! header is loaded **once** into a local and validated there, and a payload is **copied out**
//! of the region before anyone looks at its contents: decode and validate the copy, never the
//! shared bytes. The ring hands out copies only ([`Consumer::try_pop`], [`Consumer::drain`]).
//!
//! # Notification suppression
//! Each side owns a wake word in its control line (as virtio's event index). A consumer that
//! is about to sleep stores `WAKE_ARMED | pos` (the position it has read to), issues a
//! sequentially consistent fence and checks the producer's position once more; only when it
//! is still empty does it sleep. A producer that publishes from `old` to `new` issues the same
//! fence, then loads the wake word, and notifies only when it is armed with a position in
//! `old..new` — exactly once per sleep, and never while the consumer is awake. The same
//! protocol runs in the other direction for a producer waiting for space. The notification and
//! the sleep are the user's ([`Notify`], [`Waiter`]): a `NOTIFY` hypercall from a guest, an
//! eventfd, a futex or a thread unpark on the host. See [`wait`] for the spin-then-sleep
//! strategy.
//!
//! # Example
//! ```
//! use core::sync::atomic::AtomicU64;
//! use hypercall::discovery::{Features, RingKind};
//! use hypercall::ring::{LayoutParams, Region, RingSizes};
//!
//! // The shim lays out a region: here on the heap, in the shim a memfd mapping (below).
//! let params = LayoutParams {
//!     vcpu_count: 2,
//!     sizes: RingSizes::default(),
//!     features: Features::NOTIFY,
//!     map_window_gpa: 0x1_0000_0000,
//!     map_window_size: 64 << 20,
//! };
//! let memory: Vec<AtomicU64> = (0..params.region_size() / 8).map(|_| AtomicU64::new(0)).collect();
//! let shim = Region::create(&memory[..], &params)?;
//! let mut events = shim.producer_for(RingKind::Event, 1)?;
//!
//! // The appliance opens the same bytes and validates them.
//! let appliance = Region::open(&memory[..])?;
//! let mut inbox = appliance.consumer_for(RingKind::Event, 1)?;
//!
//! events.try_push(b"a KVMI event")?;
//! assert!(!events.publish()?, "the consumer is awake: no notification needed");
//! let mut buf = vec![0u8; inbox.max_payload()];
//! let n = inbox.try_pop(&mut buf)?.expect("one record");
//! assert_eq!(&buf[..n], b"a KVMI event");
//! let _ = inbox.release()?;
//! # Ok::<(), hypercall::ring::RingError>(())
//! ```
//!
//! In the shim the memory is a `memfd` mapped `MAP_SHARED` (e.g. a `memmap2::MmapRaw` of
//! length [`LayoutParams::region_size`]), wrapped once in a [`SharedRegion`] that owns the
//! mapping, and shared between threads through an `Arc` (feature `alloc`):
//! ```text
//! let ptr = map.as_mut_ptr();
//! let shared = Arc::new(unsafe { SharedRegion::new(map, ptr, len) }?);
//! let region = Region::create(shared, &params)?;          // M = Arc<SharedRegion<MmapRaw>>
//! let events = region.producer_for(RingKind::Event, vcpu)?; // move into the vCPU thread
//! ```
//! A guest wraps the identity-mapped region from `BootInfo` (`ring_region_gpa`,
//! `ring_region_size`) the same way with owner `()`, keeps it in a `static`, and calls
//! [`Region::open`] on a `&'static SharedRegion`.

mod consumer;
mod layout;
pub mod memory;
mod producer;
pub mod shm;
pub mod wait;

#[cfg(feature = "std")]
pub mod park;

pub use consumer::Consumer;
pub use layout::{LayoutParams, Region, RingGeometry, RingSizes};
pub use memory::SharedMemory;
pub use producer::Producer;
pub use shm::{RegionError, SharedRegion};
pub use wait::{NoNotify, Notify, WaitStrategy, Waiter};

use crate::discovery::DiscoveryError;

/// Tag of a record header: "REC1".
pub const TAG_RECORD: u32 = u32::from_le_bytes(*b"REC1");
/// Tag of a wrap marker: "WRAP" (the rest of the data area is skipped).
pub const TAG_WRAP: u32 = u32::from_le_bytes(*b"WRAP");
/// Size of a record header.
pub const RECORD_HEADER: u64 = 8;

/// Positions above this are refused as corrupt (2^62 bytes: centuries of traffic), which
/// keeps every position computation far from overflow.
pub const POS_LIMIT: u64 = 1 << 62;

/// Bytes a record with `len` payload bytes occupies in the data area.
pub const fn record_size(len: u64) -> u64 {
    RECORD_HEADER + len.next_multiple_of(8)
}

/// The header word of a record.
const fn header_word(tag: u32, len: u32) -> u64 {
    ((tag as u64) << 32) | len as u64
}

/// What went wrong on a ring. `Full`, `TooLarge` and `BufferTooSmall` are the caller's
/// business; the `Bad*` variants mean the peer (or the region) is corrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Not enough free space for the record now; retry after the consumer frees some.
    #[error("ring full")]
    Full,
    /// The payload exceeds the ring's maximum.
    #[error("record of {len} bytes exceeds the ring maximum of {max}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// [`Producer::max_payload`].
        max: usize,
    },
    /// The destination buffer cannot hold the next record (which stays in the ring).
    #[error("buffer too small: the next record has {need} bytes")]
    BufferTooSmall {
        /// Payload length of the next record.
        need: usize,
    },
    /// The producer's position is misaligned, moved backwards, or is more than the ring size
    /// ahead of the consumer.
    #[error("corrupt producer position {pos:#x}")]
    BadProducerPosition {
        /// The value read.
        pos: u64,
    },
    /// The consumer's position is misaligned, moved backwards, or passed the producer.
    #[error("corrupt consumer position {pos:#x}")]
    BadConsumerPosition {
        /// The value read.
        pos: u64,
    },
    /// A record header at `pos` has an unknown tag (or a wrap marker with a length).
    #[error("corrupt record header {header:#x} at position {pos:#x}")]
    BadRecordTag {
        /// Position of the header.
        pos: u64,
        /// The header word read.
        header: u64,
    },
    /// A record at `pos` claims a length beyond the maximum, the end of the data area, or
    /// what was published.
    #[error("corrupt record length {len} at position {pos:#x}")]
    BadRecordLength {
        /// Position of the header.
        pos: u64,
        /// The length read.
        len: u64,
    },
    /// An access would have left the region (a layout bug; never reached with a validated
    /// layout, kept as an error rather than a panic).
    #[error("access outside the shared region")]
    OutOfBounds,
    /// The layout parameters are invalid (vCPU count or ring sizes).
    #[error("invalid layout parameters")]
    BadParams,
    /// No ring has this index.
    #[error("no ring {0}")]
    NoSuchRing(u32),
    /// The region's discovery header or ring table is invalid.
    #[error("invalid region: {0}")]
    Discovery(#[from] DiscoveryError),
}

impl RingError {
    /// Whether the error means the peer or the region is corrupt (as opposed to a full ring
    /// or a caller mistake).
    pub const fn is_corruption(&self) -> bool {
        matches!(
            self,
            RingError::BadProducerPosition { .. }
                | RingError::BadConsumerPosition { .. }
                | RingError::BadRecordTag { .. }
                | RingError::BadRecordLength { .. }
                | RingError::OutOfBounds
                | RingError::Discovery(_)
        )
    }
}

#[cfg(test)]
mod tests;
