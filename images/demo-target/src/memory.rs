//! Memory of the demo OS: the frame allocator, the kernel address space, the user-writable
//! kernel stats page, the secret buffer, and each task's address space.
//!
//! User virtual layout (PML4 slot 1, identical in every task, backed by different frames):
//! stack [`USER_STACK_TOP`] - 8 KiB, private data page [`USER_DATA`], TLS page [`USER_TLS`]
//! (FS base points into it), and for some kinds an alias of a kernel page:
//! [`SECRET_ALIAS`] (read-only view of the secret buffer, `secret-reader` only) and
//! [`TABLE_ALIAS`] (read/write view of the task table, `rootkit` only).

use core::sync::atomic::{AtomicU64, Ordering};

use guest_runtime::SpinLock;
use guest_runtime::paging::{
    self, AddressSpace, FrameAllocator, ImageAccess, ImageLayout, PAGE_SIZE, PagingError, flags,
};
use hypercall::boot::BootInfo;

use crate::task::TASK_TABLE;
use crate::workload::Kind;

/// Base of the per-task user area (PML4 slot 1).
pub const USER_BASE: u64 = 0x80_0000_0000;
/// Initial user stack pointer (two stack pages below it).
pub const USER_STACK_TOP: u64 = USER_BASE + 0x2000;
/// The task's private data page.
pub const USER_DATA: u64 = USER_BASE + 0x1_0000;
/// The task's TLS page (its FS base points inside).
pub const USER_TLS: u64 = USER_BASE + 0x1_1000;
/// Read-only alias of the secret buffer (`secret-reader` only).
pub const SECRET_ALIAS: u64 = USER_BASE + 0x2_0000;
/// Read/write alias of the task-table page (`rootkit` only).
pub const TABLE_ALIAS: u64 = USER_BASE + 0x3_0000;

/// Kernel statistics, in a page of kernel data that is deliberately mapped user-writable in
/// every address space (tasks update it from CPL3).
#[repr(C, align(4096))]
pub struct KernelStats {
    /// Scheduler rounds completed (kernel).
    pub rounds: AtomicU64,
    /// Writes by tasks (CPL3).
    pub user_writes: AtomicU64,
    /// Pid of the last task that wrote (CPL3).
    pub last_writer: AtomicU64,
    /// Tasks created (kernel).
    pub tasks_created: AtomicU64,
    /// Context switches (kernel).
    pub switches: AtomicU64,
}

/// The kernel stats page.
#[unsafe(no_mangle)]
pub static KERNEL_STATS: KernelStats = KernelStats {
    rounds: AtomicU64::new(0),
    user_writes: AtomicU64::new(0),
    last_writer: AtomicU64::new(0),
    tasks_created: AtomicU64::new(0),
    switches: AtomicU64::new(0),
};

const SECRET_TEXT: &[u8] = b"TOP-SECRET demo-target key=7f3a9c21e4b85d06 do-not-leak";
const _: () = assert!(SECRET_TEXT.len() <= crate::workload::SECRET_READ_BYTES);

/// A page of secret kernel data (supervisor-only in the kernel map; one task reads it
/// through a user alias).
#[repr(C, align(4096))]
pub struct SecretBuffer(pub [u8; 4096]);

/// The secret buffer.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.secret")]
pub static SECRET_BUFFER: SecretBuffer = {
    let mut bytes = [0u8; 4096];
    let mut i = 0;
    while i < SECRET_TEXT.len() {
        bytes[i] = SECRET_TEXT[i];
        i += 1;
    }
    SecretBuffer(bytes)
};

/// Sum of the secret's bytes (what `secret-reader` should report).
pub const SECRET_CHECKSUM: u64 = {
    let mut sum = 0u64;
    let mut i = 0;
    while i < SECRET_TEXT.len() {
        sum += SECRET_TEXT[i] as u64;
        i += 1;
    }
    sum
};

static FRAMES: SpinLock<FrameAllocator> = SpinLock::new(FrameAllocator::new(0, 0));
static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);

/// A task's address space and its private frames.
#[derive(Clone, Copy)]
pub struct TaskPages {
    /// The address space (its root is the task's CR3).
    pub space: AddressSpace,
    /// The workload it was built for (aliases depend on it).
    pub kind: Kind,
}

/// Builds the kernel address space (vCPU 0, once) and returns its root.
pub fn init_kernel_space(info: &BootInfo) -> Result<u64, PagingError> {
    let mut frames = FRAMES.lock();
    let ram_end = info.ram_size.min(paging::KERNEL_RAM_MAP_LIMIT);
    *frames = FrameAllocator::new(ImageLayout::free_ram_start(), ram_end);
    let mut space = AddressSpace::new(&mut frames)?;
    let stats_page = &raw const KERNEL_STATS as u64;
    paging::map_kernel(
        &mut space,
        info,
        ImageAccess::Separated,
        &[stats_page],
        &mut frames,
    )?;
    KERNEL_ROOT.store(space.root(), Ordering::Release);
    Ok(space.root())
}

/// Builds a task address space for `kind`: the shared kernel part, then private stack, data
/// and TLS pages, and the kind's aliases.
pub fn build_task_space(kind: Kind) -> Result<TaskPages, PagingError> {
    use flags::{NO_EXECUTE, USER, WRITABLE};
    let mut frames = FRAMES.lock();
    let kernel = kernel_space();
    let mut space = AddressSpace::new(&mut frames)?;
    space.share_top_level(&kernel, 0..1);
    let private = USER | WRITABLE | NO_EXECUTE;
    for page in [
        USER_STACK_TOP - 2 * PAGE_SIZE,
        USER_STACK_TOP - PAGE_SIZE,
        USER_DATA,
        USER_TLS,
    ] {
        let frame = frames.alloc()?;
        space.map_4k(page, frame, private, &mut frames)?;
    }
    match kind {
        Kind::SecretReader => {
            let secret = &raw const SECRET_BUFFER as u64;
            space.map_4k(SECRET_ALIAS, secret, USER | NO_EXECUTE, &mut frames)?;
        }
        Kind::Rootkit => {
            let table = &raw const TASK_TABLE as u64;
            space.map_4k(TABLE_ALIAS, table, private, &mut frames)?;
        }
        _ => {}
    }
    Ok(TaskPages { space, kind })
}

/// The kernel address space built by [`init_kernel_space`].
fn kernel_space() -> AddressSpace {
    // SAFETY: KERNEL_ROOT holds the root built by `init_kernel_space` (vCPU 0 builds it
    // before any task exists, and tasks are only built after that).
    unsafe { AddressSpace::from_root(KERNEL_ROOT.load(Ordering::Acquire)) }
}
