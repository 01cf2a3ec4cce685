//! `demo-target`: a tiny OS to introspect. It keeps a task table in kernel memory, gives each
//! task its own address space (CR3), and runs workloads at CPL3 that matter for
//! introspection: writes to kernel data (a user-writable stats page; a rootkit rewriting the
//! task table through a user alias), a task reading a secret buffer, per-task MSR writes on
//! every switch, agent hypercalls from CPL3, and tasks created over time by `task_create`.
//! See images/README.md for the command line, the output and the profile symbols.
#![no_std]
#![no_main]

mod memory;
mod profile;
mod sched;
mod task;
mod workload;

use core::sync::atomic::{AtomicBool, Ordering};

use guest_runtime::{Boot, cpu, port, println};

use workload::Kind;

guest_runtime::entry!(main);

/// Exit status when the kernel's page tables cannot be built.
const NO_MEMORY: u32 = 5;

static BOOTED: AtomicBool = AtomicBool::new(false);

fn main(boot: Boot) -> ! {
    let rounds = boot.arg_u64_or_exit("rounds");
    if boot.vcpu == 0 {
        println!(
            "demo-target: vcpus={} rounds={}",
            boot.vcpu_count(),
            rounds.unwrap_or(0)
        );
        let root = match memory::init_kernel_space(boot.info) {
            Ok(root) => root,
            Err(error) => {
                println!("cannot build the kernel address space: {error:?}");
                port::exit(NO_MEMORY)
            }
        };
        // SAFETY: the kernel space maps the image, its stacks and RAM at their addresses.
        unsafe { cpu::write_cr3(root) };
        let second = if boot.vcpu_count() > 1 { 1 } else { 0 };
        let initial: [(&[u8], Kind, u32); 6] = [
            (b"init", Kind::Init, 0),
            (b"monitor", Kind::Monitor, 0),
            (b"secret-reader", Kind::SecretReader, 0),
            (b"rootkit", Kind::Rootkit, 0),
            (b"agent-caller", Kind::AgentCaller, 0),
            (b"busy", Kind::Busy, second),
        ];
        for (name, kind, cpu) in initial {
            sched::spawn(name, 0, kind, cpu);
        }
        BOOTED.store(true, Ordering::Release);
    } else {
        while !BOOTED.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    sched::run(boot, rounds)
}
