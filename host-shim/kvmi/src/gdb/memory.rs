//! Guest-virtual memory: the x86-64 4-level page walk over a physical reader, and the
//! address space a memory access goes through (the thread's CR3, a chosen CR3, or physical).

/// Bits 12..=51 of a page-table entry: the next table's or the page's frame.
const FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Present bit.
const PRESENT: u64 = 1;
/// User/supervisor bit: CPL3 may access the page only if every level sets it.
const USER: u64 = 1 << 2;
/// Page-size bit (a 1 GiB page in a PDPT entry, a 2 MiB page in a PD entry).
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// CR0.PG.
const CR0_PG: u64 = 1 << 31;
/// EFER.LMA.
const EFER_LMA: u64 = 1 << 10;
/// CR4.LA57 (5-level paging, not supported).
const CR4_LA57: u64 = 1 << 12;

/// Size of the smallest page.
pub const PAGE: u64 = 4096;

/// Why a translation failed.
#[derive(Debug, thiserror::Error)]
pub enum WalkError<E> {
    /// Reading a page-table entry failed.
    #[error("reading a page-table entry at {gpa:#x}: {source}")]
    Read {
        /// The entry's guest-physical address.
        gpa: u64,
        /// The reader's error.
        source: E,
    },
    /// The paging mode is not walked here (legacy 32-bit or PAE paging, 5-level paging).
    #[error("unsupported paging mode (cr0 {cr0:#x}, cr4 {cr4:#x}, efer {efer:#x})")]
    Unsupported {
        /// CR0.
        cr0: u64,
        /// CR4.
        cr4: u64,
        /// EFER.
        efer: u64,
    },
}

/// How guest addresses turn into guest-physical ones for a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// Addresses are guest-physical (paging off, or `monitor phys`).
    Physical,
    /// A 4-level walk from this CR3.
    Paged {
        /// The root (CR3; the low 12 bits and bit 63 are ignored).
        cr3: u64,
    },
}

impl AddressSpace {
    /// The address space of a vCPU with these control registers (`cr3_override`: a root
    /// chosen with `monitor cr3`).
    pub fn of_vcpu<E>(
        cr0: u64,
        cr3: u64,
        cr4: u64,
        efer: u64,
        cr3_override: Option<u64>,
    ) -> Result<AddressSpace, WalkError<E>> {
        if cr0 & CR0_PG == 0 {
            return Ok(match cr3_override {
                Some(cr3) => AddressSpace::Paged { cr3 },
                None => AddressSpace::Physical,
            });
        }
        if efer & EFER_LMA == 0 || cr4 & CR4_LA57 != 0 {
            return Err(WalkError::Unsupported { cr0, cr4, efer });
        }
        Ok(AddressSpace::Paged {
            cr3: cr3_override.unwrap_or(cr3),
        })
    }
}

/// Reads one little-endian `u64` of guest-physical memory (a page-table entry).
pub trait PhysReader {
    /// The reader's error.
    type Error;
    /// The 8 bytes at `gpa` (8-byte aligned).
    fn read_u64(&mut self, gpa: u64) -> Result<u64, Self::Error>;
}

/// Where a guest-virtual address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The guest-physical address.
    pub gpa: u64,
    /// Whether CPL3 code may access it (U/S set at every level; false when physical).
    pub user: bool,
}

/// Translates `gva` in `space`: `Ok(None)` when it is not mapped (or not canonical).
#[cfg(test)]
pub fn translate<R: PhysReader>(
    reader: &mut R,
    space: AddressSpace,
    gva: u64,
) -> Result<Option<u64>, WalkError<R::Error>> {
    Ok(walk(reader, space, gva)?.map(|m| m.gpa))
}

/// Translates `gva` in `space` with the mapping's user bit.
pub fn walk<R: PhysReader>(
    reader: &mut R,
    space: AddressSpace,
    gva: u64,
) -> Result<Option<Mapping>, WalkError<R::Error>> {
    let AddressSpace::Paged { cr3 } = space else {
        return Ok(Some(Mapping {
            gpa: gva,
            user: false,
        }));
    };
    // Canonical: bits 63..=47 all equal.
    let top = gva >> 47;
    if top != 0 && top != 0x1_ffff {
        return Ok(None);
    }
    let mut table = cr3 & FRAME_MASK;
    let mut user = true;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (gva >> shift) & 511;
        let at = table + index * 8;
        let entry = reader
            .read_u64(at)
            .map_err(|source| WalkError::Read { gpa: at, source })?;
        if entry & PRESENT == 0 {
            return Ok(None);
        }
        user &= entry & USER != 0;
        // A large page at the PDPT (level 2: 1 GiB) or PD (level 1: 2 MiB).
        if (level == 1 || level == 2) && entry & PAGE_SIZE_BIT != 0 {
            let size = 1u64 << shift;
            let base = entry & FRAME_MASK & !(size - 1);
            return Ok(Some(Mapping {
                gpa: base | (gva & (size - 1)),
                user,
            }));
        }
        table = entry & FRAME_MASK;
    }
    Ok(Some(Mapping {
        gpa: table | (gva & (PAGE - 1)),
        user,
    }))
}

/// Splits `[addr, addr + len)` into pieces that do not cross a 4 KiB page: `(addr, len)`.
pub fn page_pieces(addr: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
    let mut at = addr;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let room = PAGE - (at & (PAGE - 1));
        let n = (room as usize).min(left);
        let piece = (at, n);
        at = at.wrapping_add(n as u64);
        left -= n;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Guest memory as a map of 8-byte words.
    #[derive(Default)]
    struct FakePhys(HashMap<u64, u64>);

    impl PhysReader for FakePhys {
        type Error = String;
        fn read_u64(&mut self, gpa: u64) -> Result<u64, String> {
            if gpa >= 1 << 30 {
                return Err(format!("{gpa:#x} outside RAM"));
            }
            Ok(self.0.get(&gpa).copied().unwrap_or(0))
        }
    }

    const CR3: u64 = 0x1000;

    fn entry(table: u64, index: u64) -> u64 {
        table + index * 8
    }

    /// Maps 4 KiB page `gva` to `gpa` through tables at 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT).
    fn four_level() -> FakePhys {
        let mut m = FakePhys::default();
        let gva: u64 = 0x0000_7f80_4020_3000;
        m.0.insert(entry(CR3, (gva >> 39) & 511), 0x2000 | 3);
        m.0.insert(entry(0x2000, (gva >> 30) & 511), 0x3000 | 3);
        m.0.insert(entry(0x3000, (gva >> 21) & 511), 0x4000 | 3);
        m.0.insert(entry(0x4000, (gva >> 12) & 511), 0x0abc_d000 | 3);
        m
    }

    #[test]
    fn four_level_walk_maps_4k_pages_and_misses_absent_entries() {
        let mut m = four_level();
        let space = AddressSpace::Paged { cr3: CR3 | 0x18 };
        assert_eq!(
            translate(&mut m, space, 0x0000_7f80_4020_3123).unwrap(),
            Some(0x0abc_d123)
        );
        assert_eq!(
            translate(&mut m, space, 0x0000_7f80_4020_4000).unwrap(),
            None
        );
        assert_eq!(translate(&mut m, space, 0x1000).unwrap(), None);
        // Not canonical.
        assert_eq!(
            translate(&mut m, space, 0x0000_8000_0000_0000).unwrap(),
            None
        );
    }

    #[test]
    fn the_user_bit_must_be_set_at_every_level() {
        let mut m = four_level();
        let gva: u64 = 0x0000_7f80_4020_3000;
        let space = AddressSpace::Paged { cr3: CR3 };
        assert!(!walk(&mut m, space, gva).unwrap().unwrap().user);
        for (table, shift) in [(CR3, 39), (0x2000, 30), (0x3000, 21), (0x4000, 12)] {
            let at = entry(table, (gva >> shift) & 511);
            let e = m.0[&at];
            m.0.insert(at, e | USER);
        }
        let user = walk(&mut m, space, gva).unwrap().unwrap();
        assert_eq!(
            user,
            Mapping {
                gpa: 0x0abc_d000,
                user: true
            }
        );
        assert!(
            !walk(&mut m, AddressSpace::Physical, gva)
                .unwrap()
                .unwrap()
                .user
        );
    }

    #[test]
    fn large_pages_of_2m_and_1g() {
        let mut m = FakePhys::default();
        // gva 0 .. 1 GiB: PDPT entry 0 a 1 GiB page at 0x4000_0000.
        m.0.insert(entry(CR3, 0), 0x2000 | 3);
        m.0.insert(entry(0x2000, 0), 0x4000_0000 | 0x83);
        // gva 1 GiB ..: PDPT entry 1 -> PD at 0x3000, entry 2 a 2 MiB page at 0x60_0000.
        m.0.insert(entry(0x2000, 1), 0x3000 | 3);
        m.0.insert(entry(0x3000, 2), 0x60_0000 | 0x83);
        let space = AddressSpace::Paged { cr3: CR3 };
        assert_eq!(
            translate(&mut m, space, 0x1234_5678).unwrap(),
            Some(0x4000_0000 + 0x1234_5678)
        );
        assert_eq!(
            translate(&mut m, space, (1 << 30) + (2 << 21) + 0x1_2345).unwrap(),
            Some(0x60_0000 + 0x1_2345)
        );
        assert_eq!(
            translate(&mut m, space, (1 << 30) + (3 << 21)).unwrap(),
            None
        );
    }

    #[test]
    fn physical_space_and_paging_modes() {
        let mut m = FakePhys::default();
        assert_eq!(
            translate(&mut m, AddressSpace::Physical, 0x1234).unwrap(),
            Some(0x1234)
        );
        let off = AddressSpace::of_vcpu::<()>(0x11, CR3, 0, 0, None).unwrap();
        assert_eq!(off, AddressSpace::Physical);
        let long = AddressSpace::of_vcpu::<()>(0x8000_0011, CR3, 0x20, 0x500, None).unwrap();
        assert_eq!(long, AddressSpace::Paged { cr3: CR3 });
        let chosen =
            AddressSpace::of_vcpu::<()>(0x8000_0011, CR3, 0x20, 0x500, Some(0x9000)).unwrap();
        assert_eq!(chosen, AddressSpace::Paged { cr3: 0x9000 });
        assert!(AddressSpace::of_vcpu::<()>(0x8000_0011, CR3, 0x20, 0, None).is_err());
    }

    #[test]
    fn a_failing_reader_is_an_error_not_unmapped() {
        let mut m = FakePhys::default();
        let space = AddressSpace::Paged { cr3: 1 << 31 };
        assert!(matches!(
            translate(&mut m, space, 0),
            Err(WalkError::Read { gpa, .. }) if gpa == 1 << 31
        ));
    }

    #[test]
    fn pieces_split_at_page_boundaries() {
        let p: Vec<_> = page_pieces(0xff0, 0x20).collect();
        assert_eq!(p, vec![(0xff0, 0x10), (0x1000, 0x10)]);
        let p: Vec<_> = page_pieces(0x1000, 0x2001).collect();
        assert_eq!(p, vec![(0x1000, 0x1000), (0x2000, 0x1000), (0x3000, 1)]);
        assert_eq!(page_pieces(5, 0).count(), 0);
    }
}
