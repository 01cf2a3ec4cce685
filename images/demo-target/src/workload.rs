//! The CPL3 workloads (in `.utext`, user-executable) and the system-call numbers they use.
//!
//! Each workload is `extern "sysv64" fn(pid, argument) -> !` and loops forever: do a bit of
//! work natively at CPL3, then yield with a system call. They only touch user-mapped memory:
//! their own pages, the user-writable kernel stats page, and the aliases their kind gets.
//! No bounds-checked indexing (the panic path lives in kernel text).

use core::sync::atomic::Ordering;

use guest_runtime::user;

use crate::memory::{KERNEL_STATS, SECRET_ALIAS, TABLE_ALIAS, USER_DATA};
use crate::task::{MAX_TASKS, NAME_LEN, Task, state};

/// System-call numbers (RAX) of the demo kernel.
pub mod sys {
    /// End this task's turn for the current round.
    pub const YIELD: u64 = 0;
    /// Exit with status RDI.
    pub const EXIT: u64 = 1;
    /// Create a worker task (child of the caller); returns its pid or `u64::MAX`.
    pub const SPAWN: u64 = 2;
    /// Report a value to the kernel log: RDI = what ([`REPORT_SECRET`], [`REPORT_AGENT`]),
    /// RSI = value.
    pub const REPORT: u64 = 3;
    /// `REPORT` code: checksum of the secret buffer as read through the alias.
    pub const REPORT_SECRET: u64 = 1;
    /// `REPORT` code: RAX returned by the agent hypercall.
    pub const REPORT_AGENT: u64 = 2;
}

/// The workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Writes the kernel stats page every round and spawns a worker every few rounds.
    Init = 1,
    /// A harmless task (the rootkit's victim).
    Monitor = 2,
    /// Reads the secret buffer (its first [`SECRET_READ_BYTES`], eight 8-byte loads) through
    /// its read-only alias every round.
    SecretReader = 3,
    /// Rewrites task-table entries through its user-writable alias of the table page.
    Rootkit = 4,
    /// Calls the agent hypercall (34) from CPL3 every round.
    AgentCaller = 5,
    /// A CPU-bound loop (runs on vCPU 1 when there are two).
    Busy = 6,
    /// Short-lived: checksums its data page a few rounds, then exits.
    Worker = 7,
}

/// Rounds between two spawns by `init`.
pub const SPAWN_EVERY: u64 = 3;
/// Runs a worker lives before it exits.
pub const WORKER_LIFETIME: u64 = 4;
/// The rootkit's run on which it tampers with the table.
pub const ROOTKIT_TAMPER_RUN: u64 = 3;
/// The name the rootkit gives itself.
pub const ROOTKIT_ALIAS_NAME: [u8; NAME_LEN] = *b"kworker/0\0\0\0\0\0\0\0";
/// `ROOTKIT_ALIAS_NAME` as two little-endian words (computed at compile time, so the CPL3
/// code needs no slicing).
const ROOTKIT_ALIAS_WORDS: [u64; 2] = {
    let n = ROOTKIT_ALIAS_NAME;
    [
        u64::from_le_bytes([n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]]),
        u64::from_le_bytes([n[8], n[9], n[10], n[11], n[12], n[13], n[14], n[15]]),
    ]
};
/// The name of the rootkit's victim.
pub const VICTIM_NAME: [u8; 8] = *b"monitor\0";
/// Inner-loop iterations of `busy` per run.
const BUSY_ITERATIONS: u64 = 2_000_000;

impl Kind {
    /// The workload's user entry point.
    pub fn entry(self) -> u64 {
        let entry: extern "sysv64" fn(u64, u64) -> ! = match self {
            Kind::Init => init,
            Kind::Monitor => monitor,
            Kind::SecretReader => secret_reader,
            Kind::Rootkit => rootkit,
            Kind::AgentCaller => agent_caller,
            Kind::Busy => busy,
            Kind::Worker => worker,
        };
        entry as *const () as u64
    }

    /// The second argument (RSI) the workload starts with.
    pub fn argument(self) -> u64 {
        match self {
            Kind::Worker => WORKER_LIFETIME,
            Kind::Busy => BUSY_ITERATIONS,
            _ => 0,
        }
    }
}

/// Records a CPL3 write in the kernel stats page.
#[inline(always)]
fn touch_stats(pid: u64) {
    KERNEL_STATS.user_writes.fetch_add(1, Ordering::Relaxed);
    KERNEL_STATS.last_writer.store(pid, Ordering::Relaxed);
}

#[inline(always)]
fn yield_now() {
    user::call(sys::YIELD, 0, 0, 0);
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn init(pid: u64, _arg: u64) -> ! {
    let mut runs = 0u64;
    loop {
        runs += 1;
        touch_stats(pid);
        // A plain `%` (inlined arithmetic): a library call would land in kernel text.
        #[allow(clippy::manual_is_multiple_of)]
        if runs % SPAWN_EVERY == 0 {
            user::call(sys::SPAWN, 0, 0, 0);
        }
        yield_now();
    }
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn monitor(pid: u64, _arg: u64) -> ! {
    let data = USER_DATA as *mut u64;
    loop {
        // SAFETY: USER_DATA is this task's private, user-writable page.
        unsafe { data.write_volatile(data.read_volatile() + pid) };
        yield_now();
    }
}

/// Bytes of the secret buffer the reader reads each round (the secret text fits in it). Kept
/// small and word-sized: under a read trap every access is one VM exit.
pub const SECRET_READ_BYTES: usize = 64;

#[unsafe(link_section = ".utext")]
extern "sysv64" fn secret_reader(_pid: u64, _arg: u64) -> ! {
    let secret = SECRET_ALIAS as *const u64;
    let mut reported = false;
    loop {
        let mut sum = 0u64;
        let mut word_index = 0;
        while word_index < SECRET_READ_BYTES / 8 {
            // SAFETY: SECRET_ALIAS is a user-readable page in this task's address space.
            let word = unsafe { secret.add(word_index).read_volatile() };
            let mut byte = 0;
            while byte < 8 {
                sum += (word >> (8 * byte)) & 0xff;
                byte += 1;
            }
            word_index += 1;
        }
        if !reported {
            user::call(sys::REPORT, sys::REPORT_SECRET, sum, 0);
            reported = true;
        }
        yield_now();
    }
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn rootkit(pid: u64, _arg: u64) -> ! {
    let mut runs = 0u64;
    loop {
        runs += 1;
        if runs == ROOTKIT_TAMPER_RUN {
            tamper(pid);
        }
        yield_now();
    }
}

/// Through the user-writable alias of the task-table page: mark the `monitor` task exited
/// and rename our own entry to look like a kernel thread.
#[unsafe(link_section = ".utext")]
#[inline(never)]
pub(crate) fn tamper(pid: u64) {
    let size = core::mem::size_of::<Task>();
    let pid_at = core::mem::offset_of!(Task, pid);
    let state_at = core::mem::offset_of!(Task, state);
    let name_at = core::mem::offset_of!(Task, name);
    let victim = u64::from_le_bytes(VICTIM_NAME);
    let mut slot = 0;
    while slot < MAX_TASKS {
        let base = TABLE_ALIAS + (slot * size) as u64;
        // SAFETY: TABLE_ALIAS maps the task-table page read/write in this address space and
        // every offset stays inside the entry (within the page).
        unsafe {
            let name = (base + name_at as u64) as *mut u64;
            let state = (base + state_at as u64) as *mut u32;
            let entry_pid = (base + pid_at as u64) as *const u32;
            if name.read_volatile() == victim && state.read_volatile() != state::FREE {
                state.write_volatile(state::EXITED);
            }
            if entry_pid.read_volatile() as u64 == pid {
                name.write_volatile(ROOTKIT_ALIAS_WORDS[0]);
                name.add(1).write_volatile(ROOTKIT_ALIAS_WORDS[1]);
            }
        }
        slot += 1;
    }
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn agent_caller(_pid: u64, _arg: u64) -> ! {
    let mut reported = false;
    loop {
        // The agent call from CPL3: RAX = 34, RDI = 24, RSI = 0, `out 0xe4, eax`.
        let result = guest_runtime::doorbell::agent_call();
        if !reported {
            user::call(sys::REPORT, sys::REPORT_AGENT, result, 0);
            reported = true;
        }
        yield_now();
    }
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn busy(_pid: u64, iterations: u64) -> ! {
    let data = USER_DATA as *mut u64;
    let mut value = 0x1234_5678u64;
    loop {
        let mut i = 0;
        while i < iterations {
            value = value
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            i += 1;
        }
        // SAFETY: USER_DATA is this task's private, user-writable page.
        unsafe { data.write_volatile(value) };
        yield_now();
    }
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn worker(pid: u64, lifetime: u64) -> ! {
    let data = USER_DATA as *mut u64;
    let mut runs = 0u64;
    loop {
        runs += 1;
        let mut sum = 0u64;
        let mut i = 0;
        while i < 512 {
            // SAFETY: USER_DATA is this task's private page (512 u64 words).
            unsafe {
                let word = data.add(i);
                word.write_volatile(word.read_volatile().wrapping_add(pid + i as u64));
                sum = sum.wrapping_add(word.read_volatile());
            }
            i += 1;
        }
        // SAFETY: FS points into this task's TLS page (set by the kernel on every switch).
        unsafe {
            core::arch::asm!("add qword ptr fs:[0], {}", in(reg) sum & 0xff, options(nostack));
        }
        touch_stats(pid);
        if runs >= lifetime {
            user::call(sys::EXIT, 0, 0, 0);
        }
        yield_now();
    }
}
