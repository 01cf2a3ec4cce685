//! x86-64 4-level page-table walks from a CR3, over [`PhysicalMemory`].
//!
//! [`translate`] walks PML4 → PDPT → PD → PT for any address space (any task's CR3): 4 KiB,
//! 2 MiB and 1 GiB pages, with the effective permissions of the path (writable and user only
//! when every level allows it, no-execute when any level forbids execution). [`read_virt`]
//! reads a virtual range page by page and, like memflow, returns what it could read plus the
//! first faulting address instead of failing the whole read.
//!
//! The tables are the target's memory: entries are read once each, and a bad entry (reserved
//! bits, a large page at PML4 level) is an error, never a panic.

use crate::memory::{MemError, PhysicalMemory};

/// Bits 12..52 of an entry or CR3: a physical frame address.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;

/// Size of a translated page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB (a PT entry).
    Size4K,
    /// 2 MiB (a PD entry with PS).
    Size2M,
    /// 1 GiB (a PDPT entry with PS).
    Size1G,
}

impl PageSize {
    /// Bytes in the page.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// Effective permissions of a translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PteFlags {
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// Not executable (NX at some level).
    pub no_execute: bool,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address of the virtual address asked for.
    pub pa: u64,
    /// Size of the page that maps it.
    pub size: PageSize,
    /// Effective permissions.
    pub flags: PteFlags,
}

/// Why a translation failed.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// Bits 48..64 are not copies of bit 47.
    #[error("{va:#x} is not canonical")]
    NonCanonical {
        /// The address.
        va: u64,
    },
    /// The entry at `level` (4 = PML4 … 1 = PT) is not present.
    #[error("{va:#x} not mapped (level {level} entry not present)")]
    NotPresent {
        /// The address.
        va: u64,
        /// The level whose entry is clear.
        level: u8,
    },
    /// The entry at `level` has reserved bits set (or PS where it is reserved).
    #[error("{va:#x}: reserved bits in level {level} entry {entry:#x}")]
    Reserved {
        /// The address.
        va: u64,
        /// The level.
        level: u8,
        /// The entry read.
        entry: u64,
    },
    /// A table could not be read.
    #[error("reading a page table: {0}")]
    Memory(#[from] MemError),
}

/// Whether `va` is canonical (48-bit virtual addresses).
pub const fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1_ffff
}

/// Translates `va` in the address space rooted at `cr3` (PCID and flag bits are ignored).
pub fn translate(
    mem: &mut impl PhysicalMemory,
    cr3: u64,
    va: u64,
) -> Result<Translation, WalkError> {
    if !is_canonical(va) {
        return Err(WalkError::NonCanonical { va });
    }
    let mut table = cr3 & ADDR_MASK;
    let mut flags = PteFlags {
        writable: true,
        user: true,
        no_execute: false,
    };
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let index = (va >> shift) & 0x1ff;
        let entry = mem.read_u64(table + index * 8)?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent { va, level });
        }
        flags.writable &= entry & WRITABLE != 0;
        flags.user &= entry & USER != 0;
        flags.no_execute |= entry & NO_EXECUTE != 0;
        let large = entry & LARGE != 0;
        match (level, large) {
            (4, true) => return Err(WalkError::Reserved { va, level, entry }),
            (3 | 2, true) => {
                let size = if level == 3 {
                    PageSize::Size1G
                } else {
                    PageSize::Size2M
                };
                let offset_mask = size.bytes() - 1;
                // Bit 12 is PAT; bits 13..page size must be clear.
                if entry & ADDR_MASK & offset_mask & !(1 << 12) != 0 {
                    return Err(WalkError::Reserved { va, level, entry });
                }
                let base = entry & ADDR_MASK & !offset_mask;
                return Ok(Translation {
                    pa: base | (va & offset_mask),
                    size,
                    flags,
                });
            }
            (1, _) => {
                return Ok(Translation {
                    pa: (entry & ADDR_MASK) | (va & 0xfff),
                    size: PageSize::Size4K,
                    flags,
                });
            }
            _ => table = entry & ADDR_MASK,
        }
    }
    unreachable!("level 1 always returns")
}

/// The outcome of [`read_virt`]: `read` bytes were copied; when that is short of the request,
/// `fault` names the first virtual address that could not be read and why.
#[derive(Debug)]
pub struct VirtRead {
    /// Bytes copied into the start of the buffer.
    pub read: usize,
    /// The first address that failed, with the reason.
    pub fault: Option<(u64, WalkError)>,
}

impl VirtRead {
    /// Whether the whole range was read.
    pub fn is_complete(&self) -> bool {
        self.fault.is_none()
    }

    /// The read as a `Result`: `Ok` only when complete.
    pub fn into_result(self) -> Result<(), WalkError> {
        match self.fault {
            None => Ok(()),
            Some((_, err)) => Err(err),
        }
    }
}

/// Reads `dst.len()` bytes at `va` in the address space of `cr3`, page by page (pages may
/// be physically scattered). Stops at the first page that does not translate or read.
pub fn read_virt(mem: &mut impl PhysicalMemory, cr3: u64, va: u64, dst: &mut [u8]) -> VirtRead {
    let mut read = 0;
    while read < dst.len() {
        let at = va.wrapping_add(read as u64);
        let t = match translate(mem, cr3, at) {
            Ok(t) => t,
            Err(err) => {
                return VirtRead {
                    read,
                    fault: Some((at, err)),
                };
            }
        };
        let in_page = (t.size.bytes() - (at & (t.size.bytes() - 1))) as usize;
        let take = in_page.min(dst.len() - read);
        if let Err(err) = mem.read_phys(t.pa, &mut dst[read..read + take]) {
            return VirtRead {
                read,
                fault: Some((at, WalkError::Memory(err))),
            };
        }
        read += take;
    }
    VirtRead { read, fault: None }
}

/// How kernel virtual addresses reach physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// Virtual = physical (the demo target's kernel is identity-mapped in every task).
    Identity,
    /// Through the page tables rooted at this CR3.
    Paged {
        /// The root.
        cr3: u64,
    },
}

impl AddressSpace {
    /// Reads `dst.len()` bytes at `va` in this address space.
    pub fn read(
        &self,
        mem: &mut impl PhysicalMemory,
        va: u64,
        dst: &mut [u8],
    ) -> Result<(), WalkError> {
        match *self {
            AddressSpace::Identity => Ok(mem.read_phys(va, dst)?),
            AddressSpace::Paged { cr3 } => read_virt(mem, cr3, va, dst).into_result(),
        }
    }
}
