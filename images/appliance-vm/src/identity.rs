//! Cutting an identity mapping into pages: the ring region and the map window sit above RAM
//! (e.g. at 4 GiB and up) and are mapped virtual = physical for the agent; 2 MiB pages where
//! alignment allows (fewer emulated page-table writes at CPL0), 4 KiB pages elsewhere.

/// A small page.
pub const SMALL: u64 = 4096;
/// A large page.
pub const LARGE: u64 = 2 << 20;

/// One page of an identity mapping: its address and size ([`SMALL`] or [`LARGE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Virtual = physical address.
    pub addr: u64,
    /// [`SMALL`] or [`LARGE`].
    pub size: u64,
}

/// The pages covering `[start, start + len)`: `start` and `len` must be 4 KiB multiples
/// (`None` otherwise, or when the range wraps).
pub fn pieces(start: u64, len: u64) -> Option<impl Iterator<Item = Piece>> {
    if !start.is_multiple_of(SMALL) || !len.is_multiple_of(SMALL) {
        return None;
    }
    let end = start.checked_add(len)?;
    let mut at = start;
    Some(core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let size = if at.is_multiple_of(LARGE) && end - at >= LARGE {
            LARGE
        } else {
            SMALL
        };
        let piece = Piece { addr: at, size };
        at += size;
        Some(piece)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_areas_use_large_pages_and_the_rest_small_ones() {
        let all: Vec<_> = pieces(0x1_0000_0000 - 0x2000, 0x2000 + LARGE + 0x3000)
            .unwrap()
            .collect();
        assert_eq!(all.len(), 2 + 1 + 3);
        assert_eq!(
            all[0],
            Piece {
                addr: 0xffff_e000,
                size: SMALL
            }
        );
        assert_eq!(
            all[2],
            Piece {
                addr: 0x1_0000_0000,
                size: LARGE
            }
        );
        assert_eq!(all[5].addr, 0x1_0020_2000);
        // Contiguous and exact.
        for pair in all.windows(2) {
            assert_eq!(pair[0].addr + pair[0].size, pair[1].addr);
        }
        let last = all.last().unwrap();
        assert_eq!(last.addr + last.size, 0x1_0000_0000 + LARGE + 0x3000);
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(pieces(0x1001, 0x1000).is_none());
        assert!(pieces(0x1000, 0x10).is_none());
        assert!(pieces(!0xfff, 0x2000).is_none());
        assert_eq!(pieces(0x1000, 0).unwrap().count(), 0);
    }
}
