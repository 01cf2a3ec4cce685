//! `test-guest`: the image the VMM tests boot. `mode=` on the command line picks what it does
//! (see images/README.md); the default is `hello`.
#![no_std]
#![no_main]

mod cpl0bench;
mod pattern;
mod probes;
mod tool_probes;
mod usermode;

use core::sync::atomic::{AtomicU32, Ordering};

use guest_runtime::{Boot, port, println, status, trap};

guest_runtime::entry!(main);

/// Exit status when a mode that should have stopped the VM kept running.
const SURVIVED: u32 = 3;

fn main(boot: Boot) -> ! {
    let mode = boot.arg("mode").unwrap_or(b"hello");
    // Modes that only make sense once run on vCPU 0; the others park.
    let single = !matches!(mode, b"hello" | b"smp" | b"mem-write-all");
    if single && boot.vcpu != 0 {
        port::halt_forever();
    }
    tool_probes::wait_gate(&boot);
    match mode {
        b"hello" => hello(boot),
        b"smp" => smp(boot),
        b"triple-fault" => triple_fault(),
        b"bad-insn" => bad_insn(),
        b"bad-port" => bad_port(),
        b"user" => usermode::user(boot),
        b"hypercall" => usermode::hypercall(boot),
        b"msr" => probes::msr(boot),
        b"mem-write" => probes::mem_write(boot),
        b"mem-write-all" => probes::mem_write_all(boot),
        b"mem-read" => probes::mem_read(boot),
        b"mem-read-regs" => probes::mem_read_regs(boot),
        b"breakpoint" => probes::breakpoint(boot),
        b"spin" => probes::spin(),
        b"pattern" => pattern::pattern(boot),
        b"cycle" => probes::cycle(boot),
        b"step" => tool_probes::step(boot),
        b"user-exit" => usermode::user_exit_mode(boot),
        b"user-shared" => usermode::user_shared(boot),
        b"fault-user" => usermode::fault_user(boot),
        b"bench-cpl0" => cpl0bench::bench_cpl0(boot),
        b"bench-int3" => usermode::bench(boot, usermode::BenchKind::Int3),
        b"bench-syscall" => usermode::bench(boot, usermode::BenchKind::Syscall),
        b"bench-int80" => usermode::bench(boot, usermode::BenchKind::Int80),
        b"bench-port" => usermode::bench(boot, usermode::BenchKind::Port),
        _ => {
            println!(
                "unknown mode {:?}",
                core::str::from_utf8(mode).unwrap_or("<not utf-8>")
            );
            port::exit(status::BAD_COMMAND_LINE)
        }
    }
}

/// vCPUs that have printed their line (hello, smp).
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);

fn wait_for_all(boot: &Boot) {
    while CHECKED_IN.load(Ordering::Acquire) < boot.vcpu_count() {
        core::hint::spin_loop();
    }
}

/// Every vCPU prints a greeting; vCPU 0 exits with 0 once all have printed.
fn hello(boot: Boot) -> ! {
    println!("hello from vcpu {}", boot.vcpu);
    CHECKED_IN.fetch_add(1, Ordering::AcqRel);
    if boot.vcpu == 0 {
        wait_for_all(&boot);
        port::exit(status::SUCCESS)
    }
    port::halt_forever()
}

/// Every vCPU checks in; vCPU 0 prints the total and exits with 0.
fn smp(boot: Boot) -> ! {
    println!("vcpu {} up", boot.vcpu);
    CHECKED_IN.fetch_add(1, Ordering::AcqRel);
    if boot.vcpu == 0 {
        wait_for_all(&boot);
        println!("all {} vcpus up", boot.vcpu_count());
        port::exit(status::SUCCESS)
    }
    port::halt_forever()
}

/// Loads an empty IDT and raises #UD: #UD → #GP → #DF → triple fault → VM shutdown.
fn triple_fault() -> ! {
    println!("triple fault next");
    trap::load_empty_idt();
    // SAFETY: deliberately faults; with no IDT the CPU shuts down and nothing returns here.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    port::exit(SURVIVED)
}

core::arch::global_asm!(
    ".section .text.bad_insn, \"ax\"",
    ".globl bad_insn_routine",
    "bad_insn_routine:",
    ".globl \"kvmi_profile.sym.bad_insn\"",
    "\"kvmi_profile.sym.bad_insn\":",
    "    popcnt rax, rdi",
    "    ret",
);

unsafe extern "sysv64" {
    fn bad_insn_routine(value: u64) -> u64;
}

/// Executes `popcnt` at CPL0, which the PVM emulator cannot emulate (an emulation-failure
/// exit at `kvmi_profile.sym.bad_insn`). Where it runs (upstream KVM), exit with [`SURVIVED`].
fn bad_insn() -> ! {
    println!("bad instruction next");
    // SAFETY: a leaf routine that only computes a population count.
    let bits = unsafe { bad_insn_routine(0xff) };
    println!("bad instruction executed, popcnt={bits}");
    port::exit(SURVIVED)
}

/// Writes to port 0x99, which no device decodes, then carries on.
fn bad_port() -> ! {
    port::outb(0x99, 0x5a);
    println!("survived bad port");
    port::exit(status::SUCCESS)
}
