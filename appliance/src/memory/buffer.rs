//! Physical memory held in a byte buffer.

use alloc::vec;
use alloc::vec::Vec;

use super::{MemError, PhysicalMemory};

/// Physical memory `base..base + len` held in a `Vec` (tests and offline dumps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BufferMemory {
    base: u64,
    bytes: Vec<u8>,
}

impl BufferMemory {
    /// `len` zero bytes at physical address 0.
    pub fn zeroed(len: usize) -> Self {
        BufferMemory {
            base: 0,
            bytes: vec![0; len],
        }
    }

    /// The bytes `bytes` at physical address `base`.
    pub fn from_bytes(base: u64, bytes: Vec<u8>) -> Self {
        BufferMemory { base, bytes }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Physical address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn range(&self, pa: u64, len: usize) -> Result<core::ops::Range<usize>, MemError> {
        let start = pa
            .checked_sub(self.base)
            .and_then(|off| usize::try_from(off).ok())
            .filter(|&off| off <= self.bytes.len())
            .ok_or(MemError::OutOfRange { pa })?;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(MemError::OutOfRange {
                pa: self.base.saturating_add(self.bytes.len() as u64),
            })?;
        Ok(start..end)
    }

    /// Writes `src` at `pa` (building test memories).
    pub fn write(&mut self, pa: u64, src: &[u8]) -> Result<(), MemError> {
        let range = self.range(pa, src.len())?;
        self.bytes[range].copy_from_slice(src);
        Ok(())
    }

    /// Writes a little-endian `u64` at `pa`.
    pub fn write_u64(&mut self, pa: u64, value: u64) -> Result<(), MemError> {
        self.write(pa, &value.to_le_bytes())
    }
}

impl PhysicalMemory for BufferMemory {
    fn read_phys(&mut self, pa: u64, dst: &mut [u8]) -> Result<(), MemError> {
        let range = self.range(pa, dst.len())?;
        dst.copy_from_slice(&self.bytes[range]);
        Ok(())
    }
}
