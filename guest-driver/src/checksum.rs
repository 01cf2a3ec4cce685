//! A checksum of target memory contents, computed the same way wherever the bytes were read
//! (through the map window in the appliance, or with READ_PHYSICAL on the host), so a
//! benchmark or a test can show that two readers saw the same bytes.

/// Folds `bytes` (a multiple of 8, little-endian words) into `acc`. `first_word` is the
/// index of the first word in the whole read, so a word's position matters:
/// `acc + Σ word[i] * (2i + 1)` (wrapping). Trailing bytes short of a word are ignored.
pub fn content_checksum(acc: u64, first_word: u64, bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .zip(first_word..)
        .fold(acc, |acc, (word, i)| {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc.wrapping_add(u64::from_le_bytes(w).wrapping_mul(i.wrapping_mul(2) | 1))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_reads_agree_with_one_read() {
        let bytes: alloc::vec::Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = content_checksum(0, 0, &bytes);
        let halves = content_checksum(content_checksum(0, 0, &bytes[..2048]), 256, &bytes[2048..]);
        assert_eq!(whole, halves);
        assert_ne!(whole, 0);
    }

    #[test]
    fn position_matters() {
        let mut a = [0u8; 16];
        a[0] = 1;
        let mut b = [0u8; 16];
        b[8] = 1;
        assert_eq!(content_checksum(0, 0, &a), 1);
        assert_eq!(content_checksum(0, 0, &b), 3);
        assert_eq!(content_checksum(0, 0, &[0u8; 4096]), 0);
    }
}
