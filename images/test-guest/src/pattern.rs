//! `mode=pattern`: CPL3 code that writes a known pattern into RAM forever, so a memory dump
//! can be checked for consistency (every page as of one instant) without stopping the guest.
//!
//! The area is the last `mib=` MiB (default 2, a multiple of 2) of the kernel-mapped RAM, at
//! guest-physical `area`: page 0 is the header, pages `1..=n` the data pages. Step `i`
//! (from 1) writes `i` to words 0 and 511 of data page `1 + i % n`, then `i` to header word 0
//! (`seq`). x86 stores are seen in program order, so at any instant with `seq = g` every data
//! page `k` holds the last `i <= g` with `i % n == k - 1` (or 0) in both words, except the one
//! page step `g + 1` is writing: its words hold `g + 1` or that older value, and word 511
//! holds `g + 1` only if word 0 does.

use guest_runtime::paging::{self, AddressSpace, FrameAllocator, ImageAccess, ImageLayout, flags};
use guest_runtime::{Boot, cpu, port, println, trap};

/// Where CPL3 sees the area (PML4 slot 2, away from the identity map and the user stack).
const AREA_VA: u64 = 0x100_0000_0000;
/// Header words: `seq`, then the magic, then the data page count.
const MAGIC: u64 = 0x7061_7474_6572_6e31; // "pattern1"
/// Words in a page.
const WORDS: usize = 512;

/// Exit status when the area does not fit.
const BAD_AREA: u32 = 6;

/// The CPL3 writer: `arg` is the number of data pages. Never returns.
extern "sysv64" fn writer(pages: u64) -> ! {
    let area = AREA_VA as *mut u64;
    let mut i: u64 = 0;
    loop {
        i = i.wrapping_add(1);
        let page = 1 + (i % pages) as usize;
        // SAFETY: `page <= pages`, and the kernel mapped `1 + pages` user-writable pages at
        // AREA_VA; volatile stores keep their program order (x86 is TSO).
        unsafe {
            let words = area.add(page * WORDS);
            words.write_volatile(i);
            words.add(WORDS - 1).write_volatile(i);
            area.write_volatile(i);
        }
    }
}

/// `mode=pattern mib=<m>`: prints `pattern area=0x.. pages=N`, then runs [`writer`] at CPL3
/// until the VM is stopped.
pub fn pattern(boot: Boot) -> ! {
    let mib = boot.arg_u64_or_exit("mib").unwrap_or(2);
    let ram_end =
        boot.info.ram_size.min(paging::KERNEL_RAM_MAP_LIMIT) & !(paging::LARGE_PAGE_SIZE - 1);
    let size = mib << 20;
    let start = ImageLayout::free_ram_start() + 4 * paging::LARGE_PAGE_SIZE;
    if mib == 0 || !size.is_multiple_of(paging::LARGE_PAGE_SIZE) || start + size > ram_end {
        println!("pattern: mib={mib} must be even and fit below {ram_end:#x}");
        port::exit(BAD_AREA)
    }
    let area = ram_end - size;
    let pages = size / paging::PAGE_SIZE - 1;
    let mut alloc = FrameAllocator::new(ImageLayout::free_ram_start(), area);
    let built = AddressSpace::new(&mut alloc).and_then(|mut space| {
        paging::map_kernel(&mut space, boot.info, ImageAccess::Shared, &[], &mut alloc)?;
        let stack = alloc.alloc()?;
        space.map_4k(
            crate::usermode::USER_STACK_VA,
            stack,
            flags::WRITABLE | flags::USER | flags::NO_EXECUTE,
            &mut alloc,
        )?;
        let mut offset = 0;
        while offset < size {
            let bits = flags::WRITABLE | flags::USER | flags::NO_EXECUTE;
            space.map_2m(AREA_VA + offset, area + offset, bits, &mut alloc)?;
            offset += paging::LARGE_PAGE_SIZE;
        }
        Ok(space)
    });
    let space = match built {
        Ok(space) => space,
        Err(error) => {
            println!("cannot build page tables: {error:?}");
            port::exit(BAD_AREA)
        }
    };
    let header = area as *mut u64;
    // SAFETY: `area` is RAM below `ram_end`, identity-mapped by the boot page tables; no CPL3
    // code runs yet.
    unsafe {
        header.add(1).write_volatile(MAGIC);
        header.add(2).write_volatile(pages);
    }
    println!("pattern area={area:#x} pages={pages}");
    // SAFETY: `space` maps the kernel image, its stacks and RAM at their current addresses.
    unsafe { cpu::write_cr3(space.root()) };
    let mut ctx = trap::UserContext::new(
        writer as *const () as u64,
        crate::usermode::USER_STACK_VA + paging::PAGE_SIZE,
        pages,
    );
    // SAFETY: the address space keeps the kernel mapped; the writer only touches its area.
    unsafe { trap::run_user(&mut ctx) };
    port::exit(ctx.report_exception())
}
