//! A VMM-private, always read-write alias of guest RAM.
//!
//! The page-access tracker `mprotect`s pages of the KVM-facing mapping (the memslot), so the
//! introspector must never touch guest memory through that mapping: it maps the same memfd a
//! second time here and does every read and write (READ/WRITE_PHYSICAL, completing a trapped
//! access, page-table walks) through this alias, which is never protected.
//!
//! Every write through the alias is recorded in the RAM's software dirty log
//! ([`vmm::dirty`]) after its copy: KVM's dirty log sees only the guest's own writes, and a
//! live memory dump must re-copy pages the host changed too.

use std::io;
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use vmm::dirty::SoftDirty;
use vmm::memory::GuestRam;

/// A second `MAP_SHARED` read-write mapping of a guest's RAM memfd, unmapped on drop.
#[derive(Debug)]
pub struct RamAlias {
    map: MmapRaw,
    size: u64,
    soft_dirty: Arc<SoftDirty>,
}

impl RamAlias {
    /// Maps the whole of `ram`'s memfd read-write.
    pub fn new(ram: &GuestRam) -> io::Result<RamAlias> {
        let len = usize::try_from(ram.size()).map_err(|_| io::Error::other("RAM too large"))?;
        // `map_raw` is `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)`: a fresh
        // mapping at an address of the kernel's choice; `MmapRaw` hands out only raw pointers.
        let map = MmapOptions::new().len(len).map_raw(&ram.memfd())?;
        Ok(RamAlias {
            map,
            size: ram.size(),
            soft_dirty: ram.soft_dirty().clone(),
        })
    }

    /// Size of the aliased RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True when `gpa..gpa+len` lies inside RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        if self.contains(gpa, len as u64) {
            Some(self.map.as_mut_ptr().wrapping_add(gpa as usize))
        } else {
            None
        }
    }

    /// Copies guest RAM at `gpa` into `buf`; false if the range is outside RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(src) = self.ptr(gpa, buf.len()) else {
            return false;
        };
        // SAFETY: `src..src+len` lies inside our live mapping (checked). Guest vCPUs may write
        // the same bytes concurrently; we only copy plain bytes (no references into guest
        // memory are kept), as every VMM does with shared guest RAM.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copies `data` into guest RAM at `gpa` (and records the pages in the software dirty
    /// log); false if the range is outside RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some(dst) = self.ptr(gpa, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`; the mapping is writable and never protected.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        self.soft_dirty.mark(gpa, data.len() as u64);
        true
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }
}

/// Translates a guest-virtual address with the 4-level page tables rooted at `cr3` (4 KiB,
/// 2 MiB and 1 GiB pages), reading the tables through `alias`. `None` if a level is not
/// present or a table lies outside RAM. With paging off (`cr0.PG` clear) the gva is the gpa.
pub fn translate(alias: &RamAlias, cr0: u64, cr3: u64, gva: u64) -> Option<u64> {
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    if cr0 & (1 << 31) == 0 {
        return Some(gva);
    }
    let mut table = cr3 & ADDR;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (gva >> shift) & 0x1ff;
        let entry = alias.read_u64(table + index * 8)?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level > 0 && level < 3 && entry & HUGE != 0 {
            let page = 1u64 << shift;
            return Some((entry & ADDR & !(page - 1)) | (gva & (page - 1)));
        }
        table = entry & ADDR;
    }
    Some(table | (gva & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_reads_and_writes_the_same_memfd() {
        let ram = GuestRam::new("alias-test", 0x4000).unwrap();
        let alias = RamAlias::new(&ram).unwrap();
        ram.write(0x1008, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        assert!(alias.read(0x1008, &mut b));
        assert_eq!(b, [1, 2, 3]);
        // Protecting the KVM-facing mapping does not affect the alias.
        ram.protect(0x1000, 0x1000, libc::PROT_NONE).unwrap();
        assert!(alias.write(0x1010, &[9]));
        ram.protect(0x1000, 0x1000, libc::PROT_READ | libc::PROT_WRITE)
            .unwrap();
        let mut c = [0u8; 1];
        ram.read(0x1010, &mut c).unwrap();
        assert_eq!(c, [9]);
        assert!(!alias.read(0x3fff, &mut [0u8; 2]));
        assert!(!alias.write(u64::MAX, &[0]));
    }

    #[test]
    fn page_walk_follows_4k_and_2m_pages() {
        let ram = GuestRam::new("walk-test", 0x10_0000).unwrap();
        let alias = RamAlias::new(&ram).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        let put = |gpa: u64, v: u64| assert!(alias.write(gpa, &v.to_le_bytes()));
        put(pml4, pdpt | 3);
        put(pdpt, pd | 3);
        put(pd, 0x20_0000 | 0x83); // gva 0..2M: 2 MiB page at 2 MiB
        put(pd + 8, pt | 3); // gva 2M..4M: 4 KiB pages
        put(pt + 5 * 8, 0x7000 | 3);
        let cr0 = 1 << 31;
        assert_eq!(translate(&alias, cr0, pml4, 0x1234), Some(0x20_1234));
        assert_eq!(translate(&alias, cr0, pml4, 0x20_5abc), Some(0x7abc));
        assert_eq!(translate(&alias, cr0, pml4, 0x20_6000), None);
        assert_eq!(translate(&alias, cr0, pml4, 1 << 39), None);
        assert_eq!(translate(&alias, 0, pml4, 0x1234), Some(0x1234));
    }
}
