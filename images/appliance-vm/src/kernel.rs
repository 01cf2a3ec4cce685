//! The CPL0 part, kept short (CPL0 code is emulated on PVM hosts): check that the VMM gave us
//! a ring region and a map window, build the address space, hand the heap its memory, enter
//! the agent at CPL3 and exit the VM with its status. [`entry!`](crate::entry) calls
//! [`boot`] (CPL0) and [`run_agent`] (CPL3).
//!
//! Address space (virtual = physical everywhere):
//! - the image with [`ImageAccess::Shared`] (ordinary Rust code runs at CPL3), including the
//!   agent's stack (a static in `.bss`);
//! - free RAM: the first 2 MiB after the image hold the page tables (supervisor-only); the
//!   rest, up to 1 GiB, is the heap, mapped user-writable with 2 MiB pages;
//! - the ring region and the map window (above RAM), user-writable, 2 MiB pages where aligned.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};

use guest_driver::Discovery;
use guest_runtime::paging::{
    self, AddressSpace, FrameAllocator, ImageAccess, ImageLayout, PagingError, flags,
};
use guest_runtime::trap::{self, UserContext};
use guest_runtime::{Boot, SpinLock, cpu, port, println, user};
use hypercall::boot::BootInfo;

use crate::heap::Heap;
use crate::identity;

/// Exit status: the boot info names no (valid) ring region or map window: the image was
/// booted alone, not as `kvmi run --appliance`.
pub const NO_RING_REGION: u32 = 10;
/// Exit status: the page tables or the heap could not be built (too little RAM).
pub const NO_MEMORY: u32 = 5;
/// Exit status: the agent made a system call (it has none: it ends through the debug-exit
/// port, see [`run_agent`]).
pub const BAD_SYSCALL: u32 = 4;

/// Bytes of the agent's stack.
const USER_STACK_BYTES: usize = 256 * 1024;
/// Bytes reserved after the image for page-table frames.
const TABLE_FRAMES_BYTES: u64 = paging::LARGE_PAGE_SIZE;
/// Smallest heap the agent starts with.
const MIN_HEAP_BYTES: u64 = 4 << 20;

/// Ring regions and windows (start, length) the kernel mapped for the agent: slot 0's two,
/// then up to two per further slot. Written at CPL0 before the agent starts, read by
/// [`is_mapped`] at CPL3.
static MAPPED: [[AtomicU64; 2]; 2 * hypercall::directory::MAX_SLOTS as usize + 2] =
    [const { [AtomicU64::new(0), AtomicU64::new(0)] };
        2 * hypercall::directory::MAX_SLOTS as usize + 2];

/// Whether `[start, start + len)` lies inside one ring region or window the kernel mapped
/// user-writable, virtual = physical, for the rest of the program.
pub fn is_mapped(start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    MAPPED.iter().any(|[s, l]| {
        let (s, l) = (s.load(Ordering::Relaxed), l.load(Ordering::Relaxed));
        l != 0 && s <= start && end <= s + l
    })
}

/// The target directory (start, length) the kernel mapped user-readable, if any.
static DIRECTORY: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The target directory's area, when the kernel mapped one (a fleet appliance): virtual =
/// physical, user-readable, for the rest of the program.
pub fn directory() -> Option<(u64, u64)> {
    let (start, len) = (
        DIRECTORY[0].load(Ordering::Relaxed),
        DIRECTORY[1].load(Ordering::Relaxed),
    );
    (len != 0).then_some((start, len))
}

/// Notes an area [`is_mapped`] accepts.
fn note_mapped(start: u64, len: u64) {
    if let Some([s, l]) = MAPPED.iter().find(|[_, l]| l.load(Ordering::Relaxed) == 0) {
        s.store(start, Ordering::Relaxed);
        l.store(len, Ordering::Relaxed);
    }
}

#[repr(C, align(4096))]
struct UserStack([u8; USER_STACK_BYTES]);

/// The agent's stack (in `.bss`, zeroed by the VMM; user-writable through `Shared`).
static mut USER_STACK: UserStack = UserStack([0; USER_STACK_BYTES]);

/// The global allocator: [`Heap`] behind a spin lock (usable at CPL0 and CPL3).
struct LockedHeap(SpinLock<Heap>);

// SAFETY: every block comes from `Heap::alloc` (distinct, inside the heap's memory, aligned as
// the layout asks, or null) and goes back to `Heap::dealloc` with its layout; the lock
// serialises all access.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.lock().alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller (`ptr` came from `alloc` with `layout`).
        unsafe { self.0.lock().dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: LockedHeap = LockedHeap(SpinLock::new(Heap::empty()));

/// The heap's counters (for the summary).
pub fn heap_stats() -> crate::heap::HeapStats {
    HEAP.0.lock().stats()
}

/// Halts this vCPU for good (interrupts are off).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `hlt` with interrupts disabled only stops this vCPU.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}

/// The image's `main` on every vCPU: vCPU 0 checks the boot info, builds the address space
/// and enters `agent` at CPL3 (RDI = the BootInfo's address); other vCPUs halt.
pub fn boot(boot: Boot, agent: extern "sysv64" fn(u64) -> !) -> ! {
    if boot.vcpu != 0 {
        halt_forever()
    }
    start(boot, agent)
}

/// The agent's side at CPL3: runs `agent_main` with the BootInfo at `info` and exits the VM
/// with the status it returns (a 32-bit `out` to the debug-exit port, allowed at CPL3).
pub fn run_agent(info: u64, agent_main: fn(&'static BootInfo) -> u32) -> ! {
    // SAFETY: `start` passes the address of the VMM's BootInfo, mapped user-readable and
    // never written after boot.
    let info: &'static BootInfo = unsafe { &*(info as *const BootInfo) };
    user::exit(agent_main(info))
}

fn start(boot: Boot, agent: extern "sysv64" fn(u64) -> !) -> ! {
    let discovery = match Discovery::from_boot_info(boot.info) {
        Ok(discovery) => discovery,
        Err(error) => {
            println!(
                "appliance: no ring region or map window ({error}); boot me as the appliance VM \
                 (`kvmi run --appliance`)"
            );
            port::exit(NO_RING_REGION)
        }
    };
    let heap = match build_address_space(&boot, &discovery) {
        Ok(heap) => heap,
        Err(error) => {
            println!("appliance: cannot build the address space: {error:?}");
            port::exit(NO_MEMORY)
        }
    };
    // SAFETY: `heap` is RAM past the page-table frames, mapped user-writable and used by
    // nothing else.
    unsafe {
        HEAP.0
            .lock()
            .init(heap.start as usize, (heap.end - heap.start) as usize)
    };
    let top = (&raw const USER_STACK) as u64 + USER_STACK_BYTES as u64;
    let mut ctx = UserContext::new(agent as *const () as u64, top, boot.info as *const _ as u64);
    // SAFETY: the agent is trusted code of this image (`ImageAccess::Shared` gives no
    // isolation by design); the kernel keeps nothing it relies on from CPL3 after this point
    // except its stack, which the agent does not touch.
    unsafe { trap::run_user(&mut ctx) };
    if !ctx.is_syscall() {
        port::exit(ctx.report_exception())
    }
    println!(
        "appliance: unexpected system call {} from the agent",
        ctx.rax
    );
    port::exit(BAD_SYSCALL)
}

/// The areas of a fleet appliance beyond slot 0's: the directory and slots 1.. (ring region
/// and window each), checked to lie above RAM and inside the boot identity map.
struct FleetAreas {
    directory: (u64, u64),
    slots: [Option<(u64, u64)>; 2 * hypercall::directory::MAX_SLOTS as usize],
}

fn fleet_areas(info: &hypercall::boot::BootInfo, discovery: &Discovery) -> Option<FleetAreas> {
    let (gpa, size) = (info.directory_gpa, info.directory_size);
    let fits = |start: u64, len: u64| {
        start >= info.ram_size
            && start.is_multiple_of(4096)
            && len.is_multiple_of(4096)
            && start
                .checked_add(len)
                .is_some_and(|end| end <= hypercall::boot::IDENTITY_MAP_BYTES)
    };
    if gpa == 0 || size == 0 || !fits(gpa, size) {
        return None;
    }
    // SAFETY: `gpa..gpa+size` lies inside the boot identity map (checked above), which the
    // kernel runs on; the region is only read through atomic word loads.
    let region = unsafe {
        hypercall::ring::SharedRegion::new((), gpa as *mut u8, usize::try_from(size).ok()?)
    }
    .ok()?;
    let directory = hypercall::directory::Directory::open(&region).ok()?;
    let mut slots = [None; 2 * hypercall::directory::MAX_SLOTS as usize];
    for i in 1..directory.slot_count() {
        let Ok(slot) = directory.slot(i) else {
            continue;
        };
        for (k, (start, len)) in [
            (slot.ring_gpa, slot.ring_size),
            (slot.window_gpa, slot.window_size),
        ]
        .into_iter()
        .enumerate()
        {
            let overlaps_slot0 = [
                (discovery.ring_gpa, discovery.ring_size),
                (discovery.window_gpa, discovery.window_size),
            ]
            .iter()
            .any(|&(s, l)| start < s + l && s < start + len);
            if len != 0 && fits(start, len) && !overlaps_slot0 {
                slots[2 * i as usize + k] = Some((start, len));
            }
        }
    }
    Some(FleetAreas {
        directory: (gpa, size),
        slots,
    })
}

/// Builds and loads the address space; returns the heap's physical range.
fn build_address_space(
    boot: &Boot,
    discovery: &Discovery,
) -> Result<core::ops::Range<u64>, PagingError> {
    let ram_end =
        boot.info.ram_size.min(paging::KERNEL_RAM_MAP_LIMIT) & !(paging::LARGE_PAGE_SIZE - 1);
    let tables = ImageLayout::free_ram_start();
    let heap = tables + TABLE_FRAMES_BYTES..ram_end;
    if heap.end < heap.start + MIN_HEAP_BYTES {
        return Err(PagingError::OutOfFrames);
    }
    let mut alloc = FrameAllocator::new(tables, tables + TABLE_FRAMES_BYTES);
    let mut space = AddressSpace::new(&mut alloc)?;
    paging::map_kernel(&mut space, boot.info, ImageAccess::Shared, &[], &mut alloc)?;
    let user_data = flags::USER | flags::WRITABLE | flags::NO_EXECUTE;
    let mut at = heap.start;
    while at < heap.end {
        space.map_2m(at, at, user_data, &mut alloc)?;
        at += paging::LARGE_PAGE_SIZE;
    }
    let mut map = |start: u64, len: u64, flags: u64| -> Result<(), PagingError> {
        let pieces = identity::pieces(start, len).ok_or(PagingError::Misaligned)?;
        for piece in pieces {
            if piece.size == identity::LARGE {
                space.map_2m(piece.addr, piece.addr, flags, &mut alloc)?;
            } else {
                space.map_4k(piece.addr, piece.addr, flags, &mut alloc)?;
            }
        }
        Ok(())
    };
    // Discovery checked both areas are page multiples that do not wrap.
    map(discovery.ring_gpa, discovery.ring_size, user_data)?;
    map(discovery.window_gpa, discovery.window_size, user_data)?;
    note_mapped(discovery.ring_gpa, discovery.ring_size);
    note_mapped(discovery.window_gpa, discovery.window_size);
    // A fleet appliance: the directory (read-only for the agent) and every other slot's ring
    // region and window (the shim wrote their addresses before boot, empty slots included).
    if let Some(areas) = fleet_areas(boot.info, discovery) {
        map(
            areas.directory.0,
            areas.directory.1,
            flags::USER | flags::NO_EXECUTE,
        )?;
        DIRECTORY[0].store(areas.directory.0, Ordering::Relaxed);
        DIRECTORY[1].store(areas.directory.1, Ordering::Relaxed);
        for (start, len) in areas.slots.iter().flatten() {
            map(*start, *len, user_data)?;
            note_mapped(*start, *len);
        }
    }
    // SAFETY: `space` maps the image (code, stacks, descriptor tables), the boot info and the
    // RAM the kernel uses at their current addresses.
    unsafe { cpu::write_cr3(space.root()) };
    Ok(heap)
}
