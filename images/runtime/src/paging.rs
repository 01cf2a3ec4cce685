//! 4-level page tables: a bump allocator over zeroed frames, address spaces with 4 KiB and
//! 2 MiB mappings, and the standard kernel mapping of the image.
//!
//! Physical memory is identity-mapped in the kernel part of every address space, so a
//! table's physical address is also where the kernel writes it. Frames are never freed and
//! are assumed zero (RAM is zero at boot: clearing a page at CPL0 would cost ~1 µs per
//! instruction on PVM hosts). Intermediate entries are present, writable and user: only
//! leaf entries decide permissions.

use core::ops::Range;

use hypercall::boot::{BOOT_INFO_ADDR, BootInfo};

/// Size of a small page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large (2 MiB) page.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// Highest physical address the standard kernel map identity-maps (1 GiB).
pub const KERNEL_RAM_MAP_LIMIT: u64 = 1 << 30;

/// Page-table entry flags.
pub mod flags {
    /// The entry is valid.
    pub const PRESENT: u64 = 1 << 0;
    /// Writes allowed.
    pub const WRITABLE: u64 = 1 << 1;
    /// CPL3 access allowed.
    pub const USER: u64 = 1 << 2;
    /// A 2 MiB page (page-directory level).
    pub const LARGE: u64 = 1 << 7;
    /// Instruction fetches not allowed (EFER.NXE is set by the VMM).
    pub const NO_EXECUTE: u64 = 1 << 63;
}

const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const TABLE_FLAGS: u64 = flags::PRESENT | flags::WRITABLE | flags::USER;

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingError {
    /// The frame allocator is exhausted.
    OutOfFrames,
    /// An address is not aligned to the page size.
    Misaligned,
    /// A large page already covers the address (cannot split it).
    LargePageInTheWay,
}

/// Hands out zeroed 4 KiB frames from a physical range, never freeing them.
pub struct FrameAllocator {
    next: u64,
    end: u64,
}

impl FrameAllocator {
    /// An allocator over `[start, end)`, rounded inwards to page boundaries. The range must
    /// be zeroed, unused RAM that the kernel has identity-mapped.
    pub const fn new(start: u64, end: u64) -> Self {
        let start = (start + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        Self {
            next: start,
            end: end & !(PAGE_SIZE - 1),
        }
    }

    /// One zeroed frame.
    pub fn alloc(&mut self) -> Result<u64, PagingError> {
        self.alloc_contiguous(1)
    }

    /// `count` physically contiguous zeroed frames; returns the first.
    pub fn alloc_contiguous(&mut self, count: u64) -> Result<u64, PagingError> {
        let bytes = count
            .checked_mul(PAGE_SIZE)
            .ok_or(PagingError::OutOfFrames)?;
        let frame = self.next;
        let next = frame
            .checked_add(bytes)
            .filter(|&n| n <= self.end)
            .ok_or(PagingError::OutOfFrames)?;
        self.next = next;
        Ok(frame)
    }

    /// Frames still available.
    pub fn remaining(&self) -> u64 {
        (self.end - self.next) / PAGE_SIZE
    }
}

/// One address space: the physical address of its PML4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressSpace {
    root: u64,
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new(alloc: &mut FrameAllocator) -> Result<Self, PagingError> {
        Ok(Self {
            root: alloc.alloc()?,
        })
    }

    /// An address space whose PML4 is at `root` (e.g. one built earlier and stored as a
    /// number).
    ///
    /// # Safety
    /// `root` must be the physical address of a page-table root in identity-mapped RAM,
    /// built by this module (or all zero).
    pub const unsafe fn from_root(root: u64) -> Self {
        Self { root }
    }

    /// The PML4's physical address (the value for CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Makes PML4 entries `indices` of this space point at the same lower tables as `from`'s,
    /// so both spaces share those mappings (and later changes to them).
    pub fn share_top_level(&mut self, from: &AddressSpace, indices: Range<usize>) {
        for index in indices.start..indices.end.min(512) {
            // SAFETY: both roots are page tables in identity-mapped RAM and the index is < 512.
            unsafe {
                let value = table(from.root).add(index).read_volatile();
                table(self.root).add(index).write_volatile(value);
            }
        }
    }

    /// Maps the 4 KiB page at `virt` to the frame at `phys` with `flags` (PRESENT is added).
    pub fn map_4k(
        &mut self,
        virt: u64,
        phys: u64,
        flags: u64,
        alloc: &mut FrameAllocator,
    ) -> Result<(), PagingError> {
        if !virt.is_multiple_of(PAGE_SIZE) || !phys.is_multiple_of(PAGE_SIZE) {
            return Err(PagingError::Misaligned);
        }
        let pdpt = next_table(self.root, index(virt, 39), alloc)?;
        let pd = next_table(pdpt, index(virt, 30), alloc)?;
        let pt = next_table(pd, index(virt, 21), alloc)?;
        // SAFETY: `pt` is a page table in identity-mapped RAM; the index is < 512.
        unsafe {
            table(pt)
                .add(index(virt, 12))
                .write_volatile(phys | flags | flags::PRESENT)
        };
        Ok(())
    }

    /// Maps the 2 MiB page at `virt` to `phys` with `flags` (PRESENT and LARGE are added).
    pub fn map_2m(
        &mut self,
        virt: u64,
        phys: u64,
        flags: u64,
        alloc: &mut FrameAllocator,
    ) -> Result<(), PagingError> {
        if !virt.is_multiple_of(LARGE_PAGE_SIZE) || !phys.is_multiple_of(LARGE_PAGE_SIZE) {
            return Err(PagingError::Misaligned);
        }
        let pdpt = next_table(self.root, index(virt, 39), alloc)?;
        let pd = next_table(pdpt, index(virt, 30), alloc)?;
        // SAFETY: `pd` is a page directory in identity-mapped RAM; the index is < 512.
        unsafe {
            table(pd)
                .add(index(virt, 21))
                .write_volatile(phys | flags | flags::PRESENT | flags::LARGE)
        };
        Ok(())
    }

    /// Maps `[virt, virt + len)` to `[phys, ...)` with 4 KiB pages.
    pub fn map_range_4k(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        flags: u64,
        alloc: &mut FrameAllocator,
    ) -> Result<(), PagingError> {
        let mut offset = 0;
        while offset < len {
            self.map_4k(virt + offset, phys + offset, flags, alloc)?;
            offset += PAGE_SIZE;
        }
        Ok(())
    }

    /// The physical address `virt` maps to, if any (software walk).
    pub fn translate(&self, virt: u64) -> Option<u64> {
        let mut table_phys = self.root;
        for shift in [39u32, 30, 21, 12] {
            // SAFETY: every table reached is a page table in identity-mapped RAM.
            let entry = unsafe { table(table_phys).add(index(virt, shift)).read_volatile() };
            if entry & flags::PRESENT == 0 {
                return None;
            }
            if shift != 12 && shift != 39 && entry & flags::LARGE != 0 {
                let size = 1u64 << shift;
                return Some((entry & ADDRESS_MASK & !(size - 1)) | (virt & (size - 1)));
            }
            table_phys = entry & ADDRESS_MASK;
        }
        Some(table_phys | (virt & (PAGE_SIZE - 1)))
    }
}

fn index(virt: u64, shift: u32) -> usize {
    ((virt >> shift) & 0x1ff) as usize
}

fn table(phys: u64) -> *mut u64 {
    phys as *mut u64
}

/// The table that entry `index` of `parent` points to, allocating it if absent.
fn next_table(parent: u64, index: usize, alloc: &mut FrameAllocator) -> Result<u64, PagingError> {
    // SAFETY: `parent` is a page table in identity-mapped RAM and `index < 512`.
    let slot = unsafe { table(parent).add(index) };
    // SAFETY: as above.
    let entry = unsafe { slot.read_volatile() };
    if entry & flags::PRESENT != 0 {
        if entry & flags::LARGE != 0 {
            return Err(PagingError::LargePageInTheWay);
        }
        return Ok(entry & ADDRESS_MASK);
    }
    let frame = alloc.alloc()?;
    // SAFETY: as above; the new frame is zeroed (an empty table).
    unsafe { slot.write_volatile(frame | TABLE_FLAGS) };
    Ok(frame)
}

#[cfg(not(test))]
unsafe extern "C" {
    static __image_start: u8;
    static __kernel_text_start: u8;
    static __kernel_text_end: u8;
    static __user_text_start: u8;
    static __user_text_end: u8;
    static __kernel_rodata_start: u8;
    static __kernel_rodata_end: u8;
    static __kernel_data_start: u8;
    static __kernel_data_end: u8;
    static __image_end: u8;
}

/// The image's sections as laid out by `link.ld` (page-aligned, virtual = physical).
#[derive(Clone, Debug)]
pub struct ImageLayout {
    /// Kernel code (CPL0 only).
    pub kernel_text: Range<u64>,
    /// User code and constants (mapped user-executable).
    pub user_text: Range<u64>,
    /// Kernel read-only data.
    pub kernel_rodata: Range<u64>,
    /// Kernel data and bss.
    pub kernel_data: Range<u64>,
}

#[cfg(not(test))]
impl ImageLayout {
    /// The layout of the running image (from the linker script's symbols).
    pub fn current() -> Self {
        let addr = |symbol: *const u8| symbol as u64;
        Self {
            kernel_text: addr(&raw const __kernel_text_start)..addr(&raw const __kernel_text_end),
            user_text: addr(&raw const __user_text_start)..addr(&raw const __user_text_end),
            kernel_rodata: addr(&raw const __kernel_rodata_start)
                ..addr(&raw const __kernel_rodata_end),
            kernel_data: addr(&raw const __kernel_data_start)..addr(&raw const __kernel_data_end),
        }
    }

    /// First byte after the image, rounded up to a 2 MiB boundary: where free RAM starts for
    /// the standard kernel map.
    pub fn free_ram_start() -> u64 {
        let end = &raw const __image_end as u64;
        (end + LARGE_PAGE_SIZE - 1) & !(LARGE_PAGE_SIZE - 1)
    }
}

/// Who may use the image's pages in [`map_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageAccess {
    /// Kernel text, rodata and data supervisor-only; only `.utext` (and the listed user data
    /// pages) reachable from CPL3. For images whose user code is confined to `.utext`.
    Separated,
    /// The whole image reachable from CPL3 (code executable, data writable). For images that
    /// run ordinary Rust code at CPL3 (e.g. an agent using `core::fmt`, the spin lock, the
    /// serial macros); the kernel stacks and descriptor tables are then user-writable too, so
    /// this gives no isolation between CPL3 and the kernel.
    Shared,
}

#[cfg(not(test))]
/// Builds the standard kernel part of an address space (virtual = physical):
/// the boot-info page (read-only), the image with per-section permissions (kernel text
/// read-only/executable, user text user-executable, rodata read-only, data read/write;
/// with [`ImageAccess::Separated`] all supervisor-only except user text and the pages listed
/// in `user_data_pages`, which are user-writable), and RAM from
/// [`ImageLayout::free_ram_start`] up to `min(ram_size, 1 GiB)` as supervisor 2 MiB pages.
/// Page 0 stays unmapped.
pub fn map_kernel(
    space: &mut AddressSpace,
    info: &BootInfo,
    access: ImageAccess,
    user_data_pages: &[u64],
    alloc: &mut FrameAllocator,
) -> Result<(), PagingError> {
    use flags::{NO_EXECUTE, USER, WRITABLE};
    let all_user = if access == ImageAccess::Shared {
        USER
    } else {
        0
    };
    let layout = ImageLayout::current();
    space.map_4k(BOOT_INFO_ADDR, BOOT_INFO_ADDR, NO_EXECUTE | all_user, alloc)?;
    let text = &layout.kernel_text;
    space.map_range_4k(
        text.start,
        text.start,
        text.end - text.start,
        all_user,
        alloc,
    )?;
    let user = &layout.user_text;
    space.map_range_4k(user.start, user.start, user.end - user.start, USER, alloc)?;
    let rodata = &layout.kernel_rodata;
    let rodata_len = rodata.end - rodata.start;
    space.map_range_4k(
        rodata.start,
        rodata.start,
        rodata_len,
        NO_EXECUTE | all_user,
        alloc,
    )?;
    let data = &layout.kernel_data;
    let mut page = data.start;
    while page < data.end {
        let user_bit = if user_data_pages.contains(&page) {
            USER
        } else {
            all_user
        };
        space.map_4k(page, page, WRITABLE | NO_EXECUTE | user_bit, alloc)?;
        page += PAGE_SIZE;
    }
    let ram_end = info.ram_size.min(KERNEL_RAM_MAP_LIMIT) & !(LARGE_PAGE_SIZE - 1);
    let mut phys = ImageLayout::free_ram_start();
    while phys < ram_end {
        space.map_2m(phys, phys, WRITABLE | NO_EXECUTE, alloc)?;
        phys += LARGE_PAGE_SIZE;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zeroed, page-aligned host memory standing in for identity-mapped RAM.
    #[repr(C, align(4096))]
    struct Ram([u8; 16 * 4096]);

    fn ram() -> (Box<Ram>, FrameAllocator) {
        let ram = Box::new(Ram([0; 16 * 4096]));
        let start = ram.0.as_ptr() as u64;
        let alloc = FrameAllocator::new(start, start + 16 * PAGE_SIZE);
        (ram, alloc)
    }

    #[test]
    fn allocator_hands_out_distinct_frames_until_exhausted() {
        let (_ram, mut alloc) = ram();
        let first = alloc.alloc().unwrap();
        let second = alloc.alloc().unwrap();
        assert_eq!(second, first + PAGE_SIZE);
        assert_eq!(alloc.remaining(), 14);
        assert_eq!(alloc.alloc_contiguous(15), Err(PagingError::OutOfFrames));
        assert_eq!(alloc.alloc_contiguous(14).unwrap(), second + PAGE_SIZE);
        assert_eq!(alloc.alloc(), Err(PagingError::OutOfFrames));
        assert_eq!(
            alloc.alloc_contiguous(u64::MAX),
            Err(PagingError::OutOfFrames)
        );
    }

    #[test]
    fn small_pages_translate_with_their_flags() {
        let (_ram, mut alloc) = ram();
        let mut space = AddressSpace::new(&mut alloc).unwrap();
        let virt = 0x80_0000_3000;
        space
            .map_4k(virt, 0x5000_0000, flags::USER | flags::WRITABLE, &mut alloc)
            .unwrap();
        assert_eq!(space.translate(virt + 0x123), Some(0x5000_0123));
        assert_eq!(space.translate(virt + PAGE_SIZE), None);
        assert_eq!(space.translate(0x1000), None);
        // Root, PDPT, PD and PT: four frames.
        assert_eq!(alloc.remaining(), 12);
        // A second page in the same table allocates nothing.
        space
            .map_4k(virt + PAGE_SIZE, 0x6000_0000, 0, &mut alloc)
            .unwrap();
        assert_eq!(alloc.remaining(), 12);
        assert_eq!(space.translate(virt + PAGE_SIZE + 8), Some(0x6000_0008));
    }

    #[test]
    fn large_pages_translate_and_block_small_ones() {
        let (_ram, mut alloc) = ram();
        let mut space = AddressSpace::new(&mut alloc).unwrap();
        space
            .map_2m(0x4000_0000, 0x20_0000, flags::WRITABLE, &mut alloc)
            .unwrap();
        assert_eq!(space.translate(0x4000_0000 + 0x1_2345), Some(0x21_2345));
        assert_eq!(
            space.map_4k(0x4000_1000, 0x1000, 0, &mut alloc),
            Err(PagingError::LargePageInTheWay)
        );
    }

    #[test]
    fn misaligned_mappings_are_rejected() {
        let (_ram, mut alloc) = ram();
        let mut space = AddressSpace::new(&mut alloc).unwrap();
        assert_eq!(
            space.map_4k(0x1001, 0x2000, 0, &mut alloc),
            Err(PagingError::Misaligned)
        );
        assert_eq!(
            space.map_4k(0x1000, 0x2001, 0, &mut alloc),
            Err(PagingError::Misaligned)
        );
        assert_eq!(
            space.map_2m(0x1000, 0, 0, &mut alloc),
            Err(PagingError::Misaligned)
        );
        assert_eq!(space.translate(0x1000), None);
    }

    #[test]
    fn shared_top_level_entries_share_later_mappings() {
        let (_ram, mut alloc) = ram();
        let mut kernel = AddressSpace::new(&mut alloc).unwrap();
        kernel.map_4k(0x10_0000, 0x10_0000, 0, &mut alloc).unwrap();
        let mut task = AddressSpace::new(&mut alloc).unwrap();
        task.share_top_level(&kernel, 0..1);
        task.map_4k(0x80_0000_0000, 0x7000, flags::USER, &mut alloc)
            .unwrap();
        assert_eq!(task.translate(0x10_0000), Some(0x10_0000));
        assert_eq!(kernel.translate(0x80_0000_0000), None);
        // A later kernel mapping under the shared entry shows up in the task.
        kernel.map_4k(0x20_0000, 0x30_0000, 0, &mut alloc).unwrap();
        assert_eq!(task.translate(0x20_0000), Some(0x30_0000));
        assert_ne!(task.root(), kernel.root());
    }

    #[test]
    fn running_out_of_frames_is_an_error() {
        let ram = Box::new(Ram([0; 16 * 4096]));
        let start = ram.0.as_ptr() as u64;
        let mut alloc = FrameAllocator::new(start, start + 2 * PAGE_SIZE);
        let mut space = AddressSpace::new(&mut alloc).unwrap();
        assert_eq!(
            space.map_4k(0x1000, 0x1000, 0, &mut alloc),
            Err(PagingError::OutOfFrames)
        );
    }
}
