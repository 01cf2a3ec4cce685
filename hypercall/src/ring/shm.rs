//! The raw shared region: the crate's only `unsafe` code.
//!
//! A [`SharedRegion`] turns a pointer to shared memory (a `memfd` mapping in the shim, the
//! identity-mapped ring region in a guest, any `mmap(MAP_SHARED)` in tests) into the
//! `[AtomicU64]` view the ring works on. Everything above this module is safe code that can
//! only reach the region through bounds-checked atomic word accesses.
//!
//! # Why atomics make hostile peers harmless
//! The memory is written concurrently by a party we do not trust. Plain (non-atomic) reads of
//! bytes another thread writes are a data race; atomic accesses are not. So the region is only
//! ever accessed through [`AtomicU64`] operations: a peer can change any word at any time, and
//! the worst we observe is a surprising value, which the ring validates.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use super::memory::SharedMemory;

/// Alignment a region base must have (one cache line).
pub const REGION_ALIGN: usize = 64;

/// Why a pointer and length cannot form a [`SharedRegion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The pointer is null.
    #[error("region pointer is null")]
    Null,
    /// The pointer is not aligned to [`REGION_ALIGN`].
    #[error("region pointer {0:#x} not 64-byte aligned")]
    Misaligned(usize),
    /// The length is zero or not a multiple of [`REGION_ALIGN`].
    #[error("region length {0} is not a non-zero multiple of 64")]
    BadLength(usize),
}

/// Shared memory given by a raw pointer, viewed as atomic words, plus an owner that keeps the
/// mapping alive (a `memmap2::MmapRaw`, an `Arc` of one, or `()` for static guest memory).
pub struct SharedRegion<O = ()> {
    base: NonNull<AtomicU64>,
    words: usize,
    owner: O,
}

// SAFETY: a `SharedRegion` is a pointer to memory that (by `new`'s contract) stays valid while
// the owner lives and is only accessed through `AtomicU64`, which is `Send + Sync`; moving or
// sharing the region across threads is as safe as moving or sharing `&[AtomicU64]`, provided
// the owner itself may move or be shared, which the bounds require.
unsafe impl<O: Send> Send for SharedRegion<O> {}
// SAFETY: see `Send` above: shared access only ever goes through atomic operations.
unsafe impl<O: Sync> Sync for SharedRegion<O> {}

impl<O> SharedRegion<O> {
    /// Wraps `len` bytes of shared memory at `ptr`.
    ///
    /// # Safety
    /// - `ptr..ptr + len` must be readable and writable memory that stays mapped for as long as
    ///   the returned region (and thus `owner`) lives — typically `owner` is the mapping.
    /// - This process must not access that memory other than through this region (or other
    ///   regions built on it), atomically. Other processes, VMs and devices may do anything.
    pub unsafe fn new(owner: O, ptr: *mut u8, len: usize) -> Result<Self, RegionError> {
        let base = NonNull::new(ptr.cast::<AtomicU64>()).ok_or(RegionError::Null)?;
        if !(ptr as usize).is_multiple_of(REGION_ALIGN) {
            return Err(RegionError::Misaligned(ptr as usize));
        }
        if len == 0 || !len.is_multiple_of(REGION_ALIGN) {
            return Err(RegionError::BadLength(len));
        }
        Ok(SharedRegion {
            base,
            words: len / 8,
            owner,
        })
    }

    /// The region as atomic words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: `new` checked that the pointer is non-null and 64-byte aligned (so aligned
        // for `AtomicU64`, which has the size and alignment of `u64`), and its caller promised
        // `words * 8` bytes stay valid and are only accessed atomically while `self` (which
        // owns the mapping) lives; the returned slice borrows `self`, so it cannot outlive it.
        unsafe { core::slice::from_raw_parts(self.base.as_ptr(), self.words) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.words * 8
    }

    /// Always false: a region has at least one cache line.
    pub fn is_empty(&self) -> bool {
        self.words == 0
    }

    /// The base address (for diagnostics and address arithmetic, never dereferenced here).
    pub fn base_addr(&self) -> usize {
        self.base.as_ptr() as usize
    }

    /// The owner (the mapping).
    pub fn owner(&self) -> &O {
        &self.owner
    }
}

impl<O> core::fmt::Debug for SharedRegion<O> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("base", &format_args!("{:#x}", self.base_addr()))
            .field("len", &self.len())
            .finish()
    }
}

impl<O> SharedMemory for SharedRegion<O> {
    fn word_count(&self) -> usize {
        self.words
    }
    fn load(&self, index: usize, order: Ordering) -> Option<u64> {
        self.words().load(index, order)
    }
    fn store(&self, index: usize, value: u64, order: Ordering) -> Option<()> {
        self.words().store(index, value, order)
    }
    fn read_bytes(&self, index: usize, dst: &mut [u8]) -> Option<()> {
        self.words().read_bytes(index, dst)
    }
    fn write_bytes(&self, index: usize, src: &[u8]) -> Option<()> {
        self.words().write_bytes(index, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct Lines([u64; 16]);

    #[test]
    fn rejects_bad_pointers_and_lengths() {
        let mut lines = Lines([0; 16]);
        let ptr = lines.0.as_mut_ptr().cast::<u8>();
        // SAFETY: the pointer is null; `new` rejects it before anything is accessed.
        let null = unsafe { SharedRegion::new((), core::ptr::null_mut(), 64) };
        assert_eq!(null.err(), Some(RegionError::Null));
        // SAFETY: `new` rejects the misaligned pointer; nothing is accessed.
        let misaligned = unsafe { SharedRegion::new((), ptr.wrapping_add(8), 64) };
        assert!(matches!(misaligned, Err(RegionError::Misaligned(_))));
        // SAFETY: `new` rejects the length; nothing is accessed.
        let short = unsafe { SharedRegion::new((), ptr, 100) };
        assert_eq!(short.err(), Some(RegionError::BadLength(100)));
        {
            // SAFETY: `lines` is 128 writable bytes, outlives `region` (this block), and is
            // not touched directly while `region` lives.
            let region = unsafe { SharedRegion::new((), ptr, 128) }.unwrap();
            assert_eq!(region.word_count(), 16);
            region.store(15, 7, Ordering::Relaxed).unwrap();
            assert_eq!(region.store(16, 7, Ordering::Relaxed), None);
        }
        assert_eq!(lines.0[15], 7);
    }
}
