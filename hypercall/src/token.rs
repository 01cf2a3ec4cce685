//! The 32-byte map token (`kvmi_map_mem_token`).
//!
//! A token is a capability the shim hands to a tool on the KVMI channel (`GET_MAP_TOKEN`),
//! which the appliance presents to [`Hypercall::MemMap`] or [`Hypercall::MapRange`] by placing
//! it in its own RAM and passing its guest-physical address. To the appliance the 32 bytes are
//! opaque. The shim fills them with a random nonce, an expiry, a scope and a format byte
//! (words 0 and 1) under a 128-bit MAC keyed per target (words 2 and 3), which the shim's pager
//! checks with the key alone; binding to a target, expiry and single use are the shim's
//! policy (`kvmi_engine::tokens`). This module only defines the bytes and a comparison that
//! does not leak where two tokens differ.
//!
//! [`Hypercall::MemMap`]: crate::call::Hypercall::MemMap
//! [`Hypercall::MapRange`]: crate::call::Hypercall::MapRange

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of a map token in bytes.
pub const TOKEN_SIZE: usize = 32;

/// A map token: four little-endian 64-bit words, as in KVMI v4.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MapToken {
    /// The words: nonce, expiry/scope/format, and the two words of the tag (as the shim
    /// writes them; opaque to the appliance).
    pub words: [u64; 4],
}

const _: () = assert!(core::mem::size_of::<MapToken>() == TOKEN_SIZE);

impl MapToken {
    /// A token from its four words.
    pub const fn new(words: [u64; 4]) -> Self {
        MapToken { words }
    }

    /// A token from its 32 bytes (little-endian words).
    pub fn from_bytes(bytes: [u8; TOKEN_SIZE]) -> Self {
        zerocopy::transmute!(bytes)
    }

    /// The token's 32 bytes.
    pub fn to_bytes(&self) -> [u8; TOKEN_SIZE] {
        zerocopy::transmute!(*self)
    }

    /// Compares two tokens in time independent of where they differ.
    pub fn ct_eq(&self, other: &MapToken) -> bool {
        let diff = self
            .words
            .iter()
            .zip(other.words.iter())
            .fold(0u64, |acc, (a, b)| acc | (a ^ b));
        // Keep the optimizer from turning the fold into an early-exit comparison.
        core::hint::black_box(diff) == 0
    }

    /// Whether every bit is zero (never a valid token: the shim rejects it).
    pub fn is_zero(&self) -> bool {
        self.ct_eq(&MapToken::new([0; 4]))
    }
}

impl core::fmt::Debug for MapToken {
    /// Tokens are secrets: only a short prefix is printed.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MapToken({:08x}…)", self.words[0] >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_detects_each_word() {
        let a = MapToken::new([1, 2, 3, 4]);
        assert!(a.ct_eq(&MapToken::new([1, 2, 3, 4])));
        for i in 0..4 {
            let mut words = a.words;
            words[i] ^= 1 << 63;
            assert!(!a.ct_eq(&MapToken::new(words)), "word {i}");
        }
        assert!(MapToken::new([0; 4]).is_zero());
        assert!(!a.is_zero());
    }

    #[test]
    fn bytes_round_trip_little_endian() {
        let mut bytes = [0u8; TOKEN_SIZE];
        bytes[0] = 0x11;
        bytes[31] = 0x22;
        let token = MapToken::from_bytes(bytes);
        assert_eq!(token.words[0], 0x11);
        assert_eq!(token.words[3], 0x22 << 56);
        assert_eq!(token.to_bytes(), bytes);
        assert!(!format!("{token:?}").contains("22"));
    }
}
