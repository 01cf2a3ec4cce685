//! The view of shared memory the ring works on: an array of 64-bit words, every access atomic.
//!
//! The ring never forms a Rust reference to shared bytes. Every read and write of the region
//! — indices, wake words, record headers, payload — is an atomic 64-bit access (relaxed for
//! payload, acquire/release for positions), so a peer that writes concurrently, whether a
//! thread, another process or a VM, can only make us read unexpected *values*, never cause
//! undefined behaviour. On x86-64 a relaxed atomic load or store is a plain `mov`.
//!
//! Accesses take word indices and return `None` when they would leave the region, so even
//! a wrong index computed from hostile input is caught here and never touches memory outside.

use core::sync::atomic::{AtomicU64, Ordering};

/// Word-addressed shared memory. Implemented for `[AtomicU64]` (the real thing: see
/// [`SharedRegion`](super::shm::SharedRegion)), for references and `Arc`s of an implementor,
/// and by model checkers in tests.
pub trait SharedMemory {
    /// Number of 64-bit words.
    fn word_count(&self) -> usize;

    /// Atomically loads word `index`, or `None` when it is outside the region.
    fn load(&self, index: usize, order: Ordering) -> Option<u64>;

    /// Atomically stores word `index`, or `None` (and no store) when it is outside the region.
    fn store(&self, index: usize, value: u64, order: Ordering) -> Option<()>;

    /// A sequentially consistent fence (the store-load barrier of the wake-up protocol).
    fn fence(&self) {
        core::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Copies `dst.len()` bytes from the words starting at `index` (relaxed loads, little-endian
    /// bytes). `None`, with `dst` partly written, when the words leave the region.
    fn read_bytes(&self, index: usize, dst: &mut [u8]) -> Option<()> {
        let words = dst.len().div_ceil(8);
        let end = index.checked_add(words)?;
        if end > self.word_count() {
            return None;
        }
        for (i, chunk) in dst.chunks_mut(8).enumerate() {
            let bytes = self.load(index + i, Ordering::Relaxed)?.to_le_bytes();
            chunk.copy_from_slice(bytes.get(..chunk.len())?);
        }
        Some(())
    }

    /// Copies `src` into the words starting at `index` (relaxed stores; the last word is
    /// zero-padded). `None`, with nothing written, when the words would leave the region.
    fn write_bytes(&self, index: usize, src: &[u8]) -> Option<()> {
        let words = src.len().div_ceil(8);
        let end = index.checked_add(words)?;
        if end > self.word_count() {
            return None;
        }
        for (i, chunk) in src.chunks(8).enumerate() {
            self.store(index + i, word_from_chunk(chunk), Ordering::Relaxed)?;
        }
        Some(())
    }
}

/// A little-endian word from up to 8 bytes, zero-padded.
fn word_from_chunk(chunk: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = chunk.len().min(8);
    bytes[..n].copy_from_slice(&chunk[..n]);
    u64::from_le_bytes(bytes)
}

impl SharedMemory for [AtomicU64] {
    fn word_count(&self) -> usize {
        self.len()
    }

    fn load(&self, index: usize, order: Ordering) -> Option<u64> {
        Some(self.get(index)?.load(order))
    }

    fn store(&self, index: usize, value: u64, order: Ordering) -> Option<()> {
        self.get(index)?.store(value, order);
        Some(())
    }

    fn read_bytes(&self, index: usize, dst: &mut [u8]) -> Option<()> {
        let words = self.get(index..index.checked_add(dst.len().div_ceil(8))?)?;
        // Whole 8-byte chunks as arrays: the loop compiles to one load and one store per
        // word, close to `memcpy` speed.
        let (chunks, tail) = dst.as_chunks_mut::<8>();
        for (chunk, word) in chunks.iter_mut().zip(words) {
            *chunk = word.load(Ordering::Relaxed).to_le_bytes();
        }
        if !tail.is_empty() {
            let bytes = words.last()?.load(Ordering::Relaxed).to_le_bytes();
            tail.copy_from_slice(bytes.get(..tail.len())?);
        }
        Some(())
    }

    fn write_bytes(&self, index: usize, src: &[u8]) -> Option<()> {
        let words = self.get(index..index.checked_add(src.len().div_ceil(8))?)?;
        let (chunks, tail) = src.as_chunks::<8>();
        for (chunk, word) in chunks.iter().zip(words) {
            word.store(u64::from_le_bytes(*chunk), Ordering::Relaxed);
        }
        if !tail.is_empty() {
            words
                .last()?
                .store(word_from_chunk(tail), Ordering::Relaxed);
        }
        Some(())
    }
}

impl<T: SharedMemory + ?Sized> SharedMemory for &T {
    fn word_count(&self) -> usize {
        (**self).word_count()
    }
    fn load(&self, index: usize, order: Ordering) -> Option<u64> {
        (**self).load(index, order)
    }
    fn store(&self, index: usize, value: u64, order: Ordering) -> Option<()> {
        (**self).store(index, value, order)
    }
    fn fence(&self) {
        (**self).fence();
    }
    fn read_bytes(&self, index: usize, dst: &mut [u8]) -> Option<()> {
        (**self).read_bytes(index, dst)
    }
    fn write_bytes(&self, index: usize, src: &[u8]) -> Option<()> {
        (**self).write_bytes(index, src)
    }
}

#[cfg(feature = "alloc")]
impl<T: SharedMemory + ?Sized> SharedMemory for alloc::sync::Arc<T> {
    fn word_count(&self) -> usize {
        (**self).word_count()
    }
    fn load(&self, index: usize, order: Ordering) -> Option<u64> {
        (**self).load(index, order)
    }
    fn store(&self, index: usize, value: u64, order: Ordering) -> Option<()> {
        (**self).store(index, value, order)
    }
    fn fence(&self) {
        (**self).fence();
    }
    fn read_bytes(&self, index: usize, dst: &mut [u8]) -> Option<()> {
        (**self).read_bytes(index, dst)
    }
    fn write_bytes(&self, index: usize, src: &[u8]) -> Option<()> {
        (**self).write_bytes(index, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_copies_stay_inside_and_round_trip() {
        let words: [AtomicU64; 4] = Default::default();
        let mem: &[AtomicU64] = &words;
        mem.write_bytes(1, b"hello, world").unwrap();
        let mut out = [0u8; 12];
        mem.read_bytes(1, &mut out).unwrap();
        assert_eq!(&out, b"hello, world");
        assert_eq!(
            mem.load(2, Ordering::Relaxed),
            Some(u64::from(u32::from_le_bytes(*b"orld")))
        );
        assert_eq!(mem.write_bytes(3, &[1; 9]), None);
        assert_eq!(
            mem.load(3, Ordering::Relaxed),
            Some(0),
            "nothing written on failure"
        );
        assert_eq!(mem.read_bytes(usize::MAX, &mut out), None);
        assert_eq!(mem.load(4, Ordering::Relaxed), None);
        assert_eq!(mem.store(4, 1, Ordering::Relaxed), None);
    }

    /// The default (per-word) copies behave as the slice's specialised ones.
    #[test]
    fn default_copies_match_specialised_ones() {
        struct PerWord<'a>(&'a [AtomicU64]);
        impl SharedMemory for PerWord<'_> {
            fn word_count(&self) -> usize {
                self.0.len()
            }
            fn load(&self, index: usize, order: Ordering) -> Option<u64> {
                self.0.load(index, order)
            }
            fn store(&self, index: usize, value: u64, order: Ordering) -> Option<()> {
                self.0.store(index, value, order)
            }
        }
        let words: [AtomicU64; 4] = Default::default();
        let mem = PerWord(&words);
        mem.write_bytes(0, b"0123456789abcdefXYZ").unwrap();
        let mut out = [0u8; 19];
        words[..].read_bytes(0, &mut out).unwrap();
        assert_eq!(&out, b"0123456789abcdefXYZ");
        let mut out2 = [0u8; 19];
        mem.read_bytes(0, &mut out2).unwrap();
        assert_eq!(out, out2);
        assert_eq!(mem.write_bytes(2, &[0; 17]), None);
    }
}
