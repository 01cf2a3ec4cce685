//! The task table (kernel data an introspection tool reads through the image's profile) and
//! `task_create`.
//!
//! The table is one page-aligned array of [`Task`] entries. The kernel changes it only while
//! holding [`TABLE_LOCK`], with volatile accesses: one task deliberately has a user-writable
//! alias of this page (see `workload::rootkit`), so its contents can change behind the
//! kernel's back. Kernel-private state per slot (the saved user registers, the address
//! space, the state the kernel last set) lives in [`SlotPrivate`], outside the table.

use core::sync::atomic::{AtomicU32, Ordering};

use guest_runtime::SpinLock;
use guest_runtime::paging::PagingError;
use guest_runtime::trap::UserContext;

use crate::memory::{self, TaskPages};
use crate::workload::Kind;

/// Number of entries in the task table.
pub const MAX_TASKS: usize = 32;
/// Bytes of a task name (NUL-padded, not necessarily NUL-terminated).
pub const NAME_LEN: usize = 16;

/// `Task::state` values.
pub mod state {
    /// The slot is unused.
    pub const FREE: u32 = 0;
    /// Runnable, waiting for its vCPU.
    pub const READY: u32 = 1;
    /// Running on its vCPU now.
    pub const RUNNING: u32 = 2;
    /// Finished (or killed); the slot may be reused.
    pub const EXITED: u32 = 3;
}

/// One entry of the task table.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Task {
    /// Process id (never 0 for a used slot).
    pub pid: u32,
    /// One of [`state`].
    pub state: u32,
    /// The creating task's pid (0 for tasks the kernel created at boot).
    pub parent: u32,
    /// The vCPU that runs this task.
    pub cpu: u32,
    /// Name, NUL-padded.
    pub name: [u8; NAME_LEN],
    /// The task's page-table root (loaded into CR3 when it runs).
    pub cr3: u64,
    /// The task's FS base (written to `FS_BASE` on every switch to it).
    pub fs_base: u64,
    /// The task's user GS base (written to `KERNEL_GS_BASE` on every switch to it).
    pub gs_base: u64,
    /// The workload ([`Kind`] as a number).
    pub kind: u32,
    /// Exit status once [`state::EXITED`].
    pub exit_status: u32,
    /// Times the task was switched to.
    pub switches: u64,
    /// System calls it made.
    pub syscalls: u64,
    /// Scheduler round in which it was created.
    pub created_round: u64,
}

impl Task {
    const EMPTY: Task = Task {
        pid: 0,
        state: state::FREE,
        parent: 0,
        cpu: 0,
        name: [0; NAME_LEN],
        cr3: 0,
        fs_base: 0,
        gs_base: 0,
        kind: 0,
        exit_status: 0,
        switches: 0,
        syscalls: 0,
        created_round: 0,
    };

    /// The name up to its first NUL, as text.
    pub fn name_str(&self) -> &str {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }
}

/// The task table: its own page(s), so it can be aliased and watched page-wise.
#[repr(C, align(4096))]
pub struct TaskTable {
    /// The entries, indexed by slot.
    pub tasks: [Task; MAX_TASKS],
}

const _: () = assert!(core::mem::size_of::<TaskTable>() == 4096);

/// The task table.
#[unsafe(no_mangle)]
pub static mut TASK_TABLE: TaskTable = TaskTable {
    tasks: [Task::EMPTY; MAX_TASKS],
};

/// Serialises kernel changes to the task table; holds the next pid.
pub static TABLE_LOCK: SpinLock<u32> = SpinLock::new(1);

/// The vCPU that owns each slot (kernel truth; the table's `cpu` field is only published).
/// Changed only under [`TABLE_LOCK`] while the slot is not running.
pub static SLOT_OWNER: [AtomicU32; MAX_TASKS] = [const { AtomicU32::new(u32::MAX) }; MAX_TASKS];

/// Kernel-private state of one slot.
pub struct SlotPrivate {
    /// Saved user registers.
    pub ctx: UserContext,
    /// The slot's address space and pages (kept and reused when the slot is reused by a
    /// task of the same kind).
    pub pages: Option<TaskPages>,
    /// The state the kernel last wrote to the table (to notice changes made behind its back).
    pub expected_state: u32,
    /// The kernel's own copy of the entry as created (pid, name, CR3, FS/GS bases): what it
    /// uses to switch to the task, whatever the published table says.
    pub shadow: Task,
    /// A rename behind the kernel's back was already reported.
    pub renamed: bool,
}

/// Kernel-private state per slot. A slot's entry is written by `task_create` (under
/// [`TABLE_LOCK`], before the slot becomes READY) and afterwards only by the slot's vCPU.
pub static mut SLOTS: [SlotPrivate; MAX_TASKS] = [const {
    SlotPrivate {
        ctx: UserContext::new(0, 0, 0),
        pages: None,
        expected_state: state::FREE,
        shadow: Task::EMPTY,
        renamed: false,
    }
}; MAX_TASKS];

/// Pointer to the table entry of `slot` (`slot < MAX_TASKS`).
pub fn entry(slot: usize) -> *mut Task {
    // SAFETY: only the address is computed; callers index with slot < MAX_TASKS.
    unsafe { &raw mut TASK_TABLE.tasks[slot] }
}

/// A volatile copy of `slot`'s entry.
pub fn read(slot: usize) -> Task {
    // SAFETY: the entry is valid memory; a racing user write through the alias can only
    // change plain integers and bytes, for which any bit pattern is valid.
    unsafe { entry(slot).read_volatile() }
}

/// Writes `slot`'s state field (volatile).
pub fn set_state(slot: usize, value: u32) {
    // SAFETY: the field is valid memory inside the table; callers hold TABLE_LOCK or own
    // the slot.
    unsafe { (&raw mut (*entry(slot)).state).write_volatile(value) };
}

/// Kernel-private state of `slot` (`slot < MAX_TASKS`).
///
/// # Safety
/// The caller must own the slot: hold [`TABLE_LOCK`] while creating it, or be the vCPU that
/// runs it; no other reference to it may be live.
pub unsafe fn private(slot: usize) -> &'static mut SlotPrivate {
    // SAFETY: forwarded to the caller.
    unsafe { &mut *(&raw mut SLOTS).cast::<SlotPrivate>().add(slot) }
}

/// Why `task_create` failed.
pub enum CreateError {
    /// Every slot is in use.
    TableFull,
    /// No memory for the address space.
    Memory(PagingError),
}

impl core::fmt::Debug for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CreateError::TableFull => f.write_str("task table full"),
            CreateError::Memory(error) => write!(f, "out of memory ({error:?})"),
        }
    }
}

/// What [`task_create`] writes through its last argument: `(pid, slot)` or why it failed.
pub type CreateResult = Result<(u32, usize), CreateError>;

/// Creates a task: picks a free (or exited) slot, builds or reuses its address space, fills
/// its table entry and context and makes it READY on vCPU `cpu`. Writes `(pid, slot)` or the
/// error to `result`.
///
/// The kernel's task-creation entry point, a real never-inlined function: its address is the
/// profile symbol `kvmi_profile.sym.task_create` (a hardware-breakpoint target for
/// introspection). It has the C calling convention so a tool can read its arguments from the
/// registers at entry, whatever the compiler version (System V: RDI = name pointer, RSI =
/// name length, RDX = parent pid, RCX = workload kind, R8 = vCPU, R9 = round, and the result
/// pointer on the stack), as a real OS's profile documents its entry points.
///
/// # Safety
/// `name` must point to `name_len` readable bytes.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn task_create(
    name: *const u8,
    name_len: usize,
    parent: u32,
    kind: Kind,
    cpu: u32,
    round: u64,
    result: &mut CreateResult,
) {
    // SAFETY: the caller passes a readable `name_len`-byte buffer (this function's contract).
    let name = unsafe { core::slice::from_raw_parts(name, name_len) };
    *result = create(name, parent, kind, cpu, round);
}

fn create(name: &[u8], parent: u32, kind: Kind, cpu: u32, round: u64) -> CreateResult {
    let mut next_pid = TABLE_LOCK.lock();
    let slot = (0..MAX_TASKS)
        .find(|&slot| matches!(read(slot).state, state::FREE | state::EXITED))
        .ok_or(CreateError::TableFull)?;
    // SAFETY: we hold TABLE_LOCK and the slot is FREE or EXITED, so no vCPU runs it.
    let private = unsafe { private(slot) };
    let reusable = private.pages.filter(|pages| pages.kind == kind);
    let pages = match reusable {
        Some(pages) => pages,
        None => memory::build_task_space(kind).map_err(CreateError::Memory)?,
    };
    private.pages = Some(pages);
    let pid = *next_pid;
    *next_pid += 1;

    let mut task = Task::EMPTY;
    task.pid = pid;
    task.state = state::READY;
    task.parent = parent;
    task.cpu = cpu;
    let len = name.len().min(NAME_LEN);
    task.name[..len].copy_from_slice(&name[..len]);
    task.cr3 = pages.space.root();
    task.fs_base = memory::USER_TLS + (pid as u64 % 64) * 64;
    task.gs_base = 0x0000_5a5a_0000_0000 | pid as u64;
    task.kind = kind as u32;
    task.created_round = round;

    private.ctx = UserContext::new(kind.entry(), memory::USER_STACK_TOP, pid as u64);
    private.ctx.rsi = kind.argument();
    private.expected_state = state::READY;
    private.shadow = task;
    private.renamed = false;
    SLOT_OWNER[slot].store(cpu, Ordering::Release);
    // SAFETY: we hold TABLE_LOCK; the slot is not running anywhere.
    unsafe { entry(slot).write_volatile(task) };
    drop(next_pid);
    Ok((pid, slot))
}
