//! The cooperative scheduler: each vCPU runs its own tasks once per round; a task runs until
//! it yields (or exits, or faults). vCPU 0 drives the rounds and prints the heartbeat; a
//! second vCPU follows vCPU 0's round counter.
//!
//! On every switch the kernel loads the task's CR3 and writes its FS base and user GS base
//! with `wrmsr` (`FS_BASE`, `KERNEL_GS_BASE`), in [`task_switch`].

use core::sync::atomic::{AtomicU64, Ordering};

use guest_runtime::cpu::{self, msr};
use guest_runtime::{Boot, port, println, status, trap};

use crate::memory::{KERNEL_STATS, SECRET_CHECKSUM};
use crate::task::{self, MAX_TASKS, SLOT_OWNER, TABLE_LOCK, Task, state};
use crate::workload::{Kind, sys};

/// Workers spawned so far (names them `worker-N`).
static WORKERS_SPAWNED: AtomicU64 = AtomicU64::new(0);

/// Creates a task and logs it (`task created pid=.. name=.. parent=.. cr3=..`).
pub fn spawn(name: &[u8], parent: u32, kind: Kind, cpu: u32) -> Option<u32> {
    let round = KERNEL_STATS.rounds.load(Ordering::Relaxed);
    let mut result: task::CreateResult = Err(task::CreateError::TableFull);
    // SAFETY: `name` is a live slice: its pointer and length describe readable bytes.
    unsafe {
        task::task_create(
            name.as_ptr(),
            name.len(),
            parent,
            kind,
            cpu,
            round,
            &mut result,
        )
    };
    match result {
        Ok((pid, slot)) => {
            KERNEL_STATS.tasks_created.fetch_add(1, Ordering::Relaxed);
            let task = task::read(slot);
            println!(
                "task created pid={} name={} parent={} cr3={:#x} cpu={}",
                pid,
                task.name_str(),
                parent,
                task.cr3,
                task.cpu
            );
            Some(pid)
        }
        Err(error) => {
            println!(
                "task create failed name={:?}: {error:?}",
                core::str::from_utf8(name)
            );
            None
        }
    }
}

/// Runs this vCPU's tasks forever (vCPU 0 exits after `rounds` rounds when given).
pub fn run(boot: Boot, rounds: Option<u64>) -> ! {
    let me = boot.vcpu;
    let mut round = 0u64;
    loop {
        if me == 0 {
            round += 1;
        } else {
            // Follow vCPU 0: one pass per round it starts.
            while KERNEL_STATS.rounds.load(Ordering::Acquire) < round {
                core::hint::spin_loop();
            }
            round += 1;
        }
        for (slot, owner) in SLOT_OWNER.iter().enumerate() {
            if owner.load(Ordering::Acquire) != me {
                continue;
            }
            if let Some(task) = claim(slot, me) {
                run_task(boot, slot, &task);
            }
        }
        if me == 0 {
            KERNEL_STATS.rounds.store(round, Ordering::Release);
            println!("heartbeat round={} tasks={}", round, live_tasks());
            if rounds.is_some_and(|limit| round >= limit) {
                port::exit(status::SUCCESS);
            }
        }
    }
}

fn live_tasks() -> usize {
    let _lock = TABLE_LOCK.lock();
    (0..MAX_TASKS)
        .filter(|&slot| matches!(task::read(slot).state, state::READY | state::RUNNING))
        .count()
}

/// Marks `slot` RUNNING if it is READY; reports table changes the kernel did not make.
fn claim(slot: usize, me: u32) -> Option<Task> {
    let _lock = TABLE_LOCK.lock();
    if SLOT_OWNER[slot].load(Ordering::Acquire) != me {
        return None;
    }
    // SAFETY: this vCPU owns the slot (SLOT_OWNER) and holds TABLE_LOCK.
    let private = unsafe { task::private(slot) };
    let published = task::read(slot);
    if published.state != private.expected_state {
        println!(
            "integrity: task pid={} state {} -> {} changed outside the kernel",
            private.shadow.pid, private.expected_state, published.state
        );
        private.expected_state = published.state;
    }
    if published.name != private.shadow.name && !private.renamed {
        println!(
            "integrity: task pid={} renamed {} -> {} outside the kernel",
            private.shadow.pid,
            private.shadow.name_str(),
            published.name_str()
        );
        private.renamed = true;
    }
    if published.state != state::READY {
        return None;
    }
    task::set_state(slot, state::RUNNING);
    private.expected_state = state::RUNNING;
    Some(private.shadow)
}

/// Ends `slot`'s turn with `next` (READY or EXITED) unless the table was changed meanwhile.
fn release(slot: usize, next: u32, exit_status: u32) {
    let _lock = TABLE_LOCK.lock();
    // SAFETY: this vCPU owns the slot and holds TABLE_LOCK.
    let private = unsafe { task::private(slot) };
    if task::read(slot).state == state::RUNNING {
        if next == state::EXITED {
            // SAFETY: the field is inside the table; we hold TABLE_LOCK.
            unsafe { (&raw mut (*task::entry(slot)).exit_status).write_volatile(exit_status) };
        }
        task::set_state(slot, next);
        private.expected_state = next;
    }
}

/// Switches this vCPU to `task`: its page tables, FS base and user GS base.
///
/// Never inlined: its address (`kvmi_profile.sym.task_switch`) is a breakpoint target that
/// sees every switch, and the MSR writes here are what an MSR-write filter observes.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn task_switch(task: &Task) {
    // SAFETY: the task's address space shares the kernel's top-level entry (kernel code,
    // data, stacks and RAM at the same addresses); FS_BASE and KERNEL_GS_BASE only affect
    // CPL3 (the kernel never uses FS, and uses GS only after `swapgs`).
    unsafe {
        cpu::write_cr3(task.cr3);
        cpu::write_msr(msr::FS_BASE, task.fs_base);
        cpu::write_msr(msr::KERNEL_GS_BASE, task.gs_base);
    }
    KERNEL_STATS.switches.fetch_add(1, Ordering::Relaxed);
}

fn run_task(boot: Boot, slot: usize, task: &Task) {
    task_switch(task);
    let table = task::entry(slot);
    // SAFETY: counters inside this vCPU's own slot; volatile because of the user alias.
    unsafe {
        let switches = &raw mut (*table).switches;
        switches.write_volatile(switches.read_volatile() + 1);
    }
    // SAFETY: this vCPU owns the slot; nothing else touches its context while it runs.
    let ctx = unsafe { &mut task::private(slot).ctx };
    loop {
        // SAFETY: the task's address space keeps the kernel supervisor-only except the
        // stats page (atomics only) and the rootkit's table alias (volatile accesses only).
        unsafe { trap::run_user(ctx) };
        if !ctx.is_syscall() {
            println!(
                "task pid={} name={} killed by an exception:",
                task.pid,
                task.name_str()
            );
            let status = ctx.report_exception();
            release(slot, state::EXITED, status);
            return;
        }
        // SAFETY: as for `switches` above.
        unsafe {
            let syscalls = &raw mut (*table).syscalls;
            syscalls.write_volatile(syscalls.read_volatile() + 1);
        }
        match ctx.rax {
            sys::YIELD => {
                ctx.rax = 0;
                release(slot, state::READY, 0);
                return;
            }
            sys::EXIT => {
                println!(
                    "task exited pid={} name={} status={}",
                    task.pid,
                    task.name_str(),
                    ctx.rdi
                );
                release(slot, state::EXITED, ctx.rdi as u32);
                return;
            }
            sys::SPAWN => {
                let number = WORKERS_SPAWNED.fetch_add(1, Ordering::Relaxed) + 1;
                let cpu = if boot.vcpu_count() > 1 {
                    (number % 2) as u32
                } else {
                    0
                };
                let name = worker_name(number);
                ctx.rax = spawn(&name, task.pid, Kind::Worker, cpu).map_or(u64::MAX, u64::from);
            }
            sys::REPORT => {
                report(task, ctx.rdi, ctx.rsi);
                ctx.rax = 0;
            }
            other => {
                println!("task pid={} unknown syscall {other}", task.pid);
                ctx.rax = u64::MAX;
            }
        }
    }
}

fn report(task: &Task, what: u64, value: u64) {
    match what {
        sys::REPORT_SECRET => println!(
            "task pid={} read the secret buffer: checksum={:#x} expected={:#x}",
            task.pid, value, SECRET_CHECKSUM
        ),
        sys::REPORT_AGENT => {
            println!(
                "task pid={} agent hypercall returned rax={:#x}",
                task.pid, value
            )
        }
        _ => println!("task pid={} report what={what} value={value:#x}", task.pid),
    }
}

/// `worker-N` as a NUL-padded name.
fn worker_name(number: u64) -> [u8; task::NAME_LEN] {
    let mut name = [0u8; task::NAME_LEN];
    name[..7].copy_from_slice(b"worker-");
    let mut digits = [0u8; 20];
    let mut value = number;
    let mut count = 0;
    loop {
        digits[count] = b'0' + (value % 10) as u8;
        count += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for i in 0..count.min(task::NAME_LEN - 7) {
        name[7 + i] = digits[count - 1 - i];
    }
    name
}
