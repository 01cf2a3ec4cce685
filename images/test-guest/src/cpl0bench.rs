//! `mode=bench-cpl0`: what single instructions cost when CPL0 code is emulated (PVM), in TSC
//! cycles per instruction, so kernel paths can be designed around them.

use guest_runtime::{Boot, cpu, port, println, status};

fn tsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Runs `body` (which executes `per_call` instructions of interest) `count` times and
/// returns TSC cycles per instruction, minus the cost of an empty loop iteration.
fn measure(count: u64, per_call: u64, empty: u64, body: impl Fn()) -> u64 {
    let start = tsc();
    for _ in 0..count {
        body();
    }
    let total = tsc() - start;
    (total / count).saturating_sub(empty) / per_call
}

/// Prints the cost of each instruction kind (`n=` iterations, default 2000).
pub fn bench_cpl0(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(2000).clamp(1, 1 << 20);
    let empty = measure(count, 1, 0, || core::hint::black_box(()));
    println!("bench-cpl0 n={count} empty_iteration_tsc={empty}");
    let nop = measure(count, 8, empty, || {
        // SAFETY: no effects.
        unsafe {
            core::arch::asm!(
                "nop",
                "nop",
                "nop",
                "nop",
                "nop",
                "nop",
                "nop",
                "nop",
                options(nomem, nostack)
            )
        }
    });
    let reg = measure(count, 8, empty, || {
        // SAFETY: register arithmetic only.
        unsafe {
            core::arch::asm!("add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1",
                "add {0}, 1", "add {0}, 1", "add {0}, 1", "add {0}, 1", out(reg) _, options(nomem, nostack))
        }
    });
    let push_pop = measure(count, 8, empty, || {
        // SAFETY: balanced pushes and pops on the current stack.
        unsafe {
            core::arch::asm!("push rax", "push rax", "push rax", "push rax",
                "pop rax", "pop rax", "pop rax", "pop rax", out("rax") _)
        }
    });
    let load = measure(count, 8, empty, || {
        // SAFETY: loads from the current stack.
        unsafe {
            core::arch::asm!("mov {0}, [rsp]", "mov {0}, [rsp]", "mov {0}, [rsp]", "mov {0}, [rsp]",
                "mov {0}, [rsp]", "mov {0}, [rsp]", "mov {0}, [rsp]", "mov {0}, [rsp]", out(reg) _, options(nostack, readonly))
        }
    });
    let swapgs = measure(count, 2, empty, || {
        // SAFETY: two swaps restore GS.
        unsafe { core::arch::asm!("swapgs", "swapgs", options(nomem, nostack)) }
    });
    let fs_base = cpu::read_msr(cpu::msr::FS_BASE);
    let wrmsr = measure(count, 1, empty, || {
        // SAFETY: rewrites FS_BASE with its current value (the kernel does not use FS).
        unsafe { cpu::write_msr(cpu::msr::FS_BASE, fs_base) }
    });
    let cr3 = cpu::read_cr3();
    let mov_cr3 = measure(count, 1, empty, || {
        // SAFETY: reloads the current CR3.
        unsafe { cpu::write_cr3(cr3) }
    });
    let out = measure(count.min(500), 1, empty, || {
        port::inb(0x3fd);
    });
    println!(
        "bench-cpl0 tsc_per: nop={nop} add={reg} push_or_pop={push_pop} load={load} swapgs={swapgs} wrmsr={wrmsr} mov_cr3={mov_cr3} in={out}"
    );
    port::exit(status::SUCCESS)
}
