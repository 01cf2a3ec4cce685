//! The target-memory layer: reading the target's physical memory.
//!
//! [`PhysicalMemory`] is what the page-table walker and the OS layer read through. Two
//! implementations: [`BufferMemory`] (a plain byte buffer: tests, dumps) and
//! [`CachedMemory`] (the real thing: target pages mapped into the appliance's map window,
//! with an LRU cache of mapped pages so repeated reads cost no hypercall).

mod buffer;
mod cache;

pub use buffer::BufferMemory;
pub use cache::{CacheStats, CachedMemory, TokenSource};

use guest_driver::DriverError;

/// Size of a target page.
pub const PAGE_SIZE: u64 = 4096;

/// Why a physical read failed.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The address is outside the memory (or the read runs past its end).
    #[error("physical address {pa:#x} is outside target memory")]
    OutOfRange {
        /// First address that could not be read.
        pa: u64,
    },
    /// Mapping the page that holds `pa` failed.
    #[error("mapping physical page {pa:#x} failed: {source}")]
    Map {
        /// The page address.
        pa: u64,
        /// The driver's error.
        source: DriverError,
    },
    /// No map token could be obtained.
    #[error("no map token: {0}")]
    Token(alloc::string::String),
}

impl MemError {
    /// The physical address the error is about, when it names one.
    pub fn address(&self) -> Option<u64> {
        match self {
            MemError::OutOfRange { pa } | MemError::Map { pa, .. } => Some(*pa),
            MemError::Token(_) => None,
        }
    }
}

/// Reads of the target's physical memory.
pub trait PhysicalMemory {
    /// Copies `dst.len()` bytes from physical address `pa`. On error nothing useful is in
    /// `dst` past the failing page.
    fn read_phys(&mut self, pa: u64, dst: &mut [u8]) -> Result<(), MemError>;

    /// The little-endian `u64` at `pa`.
    fn read_u64(&mut self, pa: u64) -> Result<u64, MemError> {
        let mut bytes = [0u8; 8];
        self.read_phys(pa, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }
}

impl<T: PhysicalMemory + ?Sized> PhysicalMemory for &mut T {
    fn read_phys(&mut self, pa: u64, dst: &mut [u8]) -> Result<(), MemError> {
        (**self).read_phys(pa, dst)
    }
}
