//! Modes that give the introspection tests something precise to watch: MSR writes, page
//! writes and reads at a published address, calls of a published function, all three in an
//! endless cycle, and an endless counter loop. Every address involved is a profile symbol.
//! The finite modes take `hold=1`: instead of exiting they print `holding` and spin.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_runtime::cpu::{read_msr, write_msr};
use guest_runtime::{Boot, port, println, status};

/// A page-aligned page of kernel data the probes write and read.
#[repr(C, align(4096))]
pub struct ScratchPage(pub [u64; 512]);

/// The page `mem-write`/`mem-read` use (`kvmi_profile.sym.scratch_page`).
pub static mut SCRATCH_PAGE: ScratchPage = ScratchPage([0; 512]);

/// Counts calls of [`breakpoint_target`] and iterations of `spin`
/// (`kvmi_profile.sym.probe_counter`).
pub static PROBE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A function the breakpoint tests put a hardware breakpoint on
/// (`kvmi_profile.sym.breakpoint_target`); returns its argument plus one.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "sysv64" fn breakpoint_target(value: u64) -> u64 {
    PROBE_COUNTER.fetch_add(1, Ordering::Relaxed);
    value + 1
}

core::arch::global_asm!(
    ".globl \"kvmi_profile.sym.scratch_page\"",
    ".set \"kvmi_profile.sym.scratch_page\", {scratch}",
    ".globl \"kvmi_profile.sym.probe_counter\"",
    ".set \"kvmi_profile.sym.probe_counter\", {counter}",
    ".globl \"kvmi_profile.sym.breakpoint_target\"",
    ".set \"kvmi_profile.sym.breakpoint_target\", {target}",
    scratch = sym SCRATCH_PAGE,
    counter = sym PROBE_COUNTER,
    target = sym breakpoint_target,
);

/// `mode=msr msr=<n> value=<v>` (defaults: 0x174 = SYSENTER_CS, 0x10): `wrmsr`, then
/// `rdmsr`; prints `msr 0x.. wrote 0x.. read 0x..`; exit 0.
pub fn msr(boot: Boot) -> ! {
    let number = boot.arg_u64_or_exit("msr").unwrap_or(0x174);
    let value = boot.arg_u64_or_exit("value").unwrap_or(0x10);
    let Ok(number) = u32::try_from(number) else {
        println!("bad command line: msr={number:#x} does not fit 32 bits");
        port::exit(status::BAD_COMMAND_LINE)
    };
    // SAFETY: the test chooses the MSR; a write the CPU refuses raises #GP, which the
    // exception handler reports. The runtime's own MSRs are the caller's responsibility.
    unsafe { write_msr(number, value) };
    let read = read_msr(number);
    println!("msr {number:#x} wrote {value:#x} read {read:#x}");
    finish(&boot)
}

/// `mode=mem-write n=<count>` (default 16): writes word `i` of the scratch page with
/// `0x5ca1_0000 + i` for `i` in `0..n` (wrapping at 512 words); prints
/// `mem-write n=.. last=0x..`; exit 0.
pub fn mem_write(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(16);
    let page = (&raw mut SCRATCH_PAGE).cast::<u64>();
    let mut last = 0;
    for i in 0..count {
        last = 0x5ca1_0000 + i;
        // SAFETY: the index is reduced modulo the page's 512 words; only vCPU 0 runs this.
        unsafe { page.add((i % 512) as usize).write_volatile(last) };
    }
    println!("mem-write n={count} last={last:#x}");
    finish(&boot)
}

/// vCPUs of `mem-write-all` that have done their writes.
static WRITERS_DONE: AtomicU32 = AtomicU32::new(0);

/// `mode=mem-write-all n=<count>` (default 16): every vCPU writes `n` words of the scratch
/// page (vCPU `v`, write `i`: word `(64 v + i) % 512`, value `0x5ca1_0000 + i`); vCPU 0 waits
/// for all of them, prints `mem-write-all vcpus=V n=N`, exit 0 (the others halt). The
/// many-vCPU load of `kvmi appliance-bench --targets N --vcpus M`.
pub fn mem_write_all(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(16);
    let page = (&raw mut SCRATCH_PAGE).cast::<u64>();
    let first = u64::from(boot.vcpu) * 64;
    for i in 0..count {
        // SAFETY: the index is reduced modulo the page's 512 words; concurrent vCPUs write
        // whole words (volatile, aligned): no torn or out-of-bounds access.
        unsafe {
            page.add(((first + i) % 512) as usize)
                .write_volatile(0x5ca1_0000 + i)
        };
    }
    WRITERS_DONE.fetch_add(1, Ordering::AcqRel);
    if boot.vcpu != 0 {
        port::halt_forever();
    }
    while WRITERS_DONE.load(Ordering::Acquire) < boot.vcpu_count() {
        core::hint::spin_loop();
    }
    println!("mem-write-all vcpus={} n={count}", boot.vcpu_count());
    finish(&boot)
}

/// `mode=mem-read n=<count>` (default 16): sums words `0..n` of the scratch page (wrapping
/// at 512); prints `mem-read n=.. sum=0x..`; exit 0. The page is zero unless someone (the
/// host, an introspection tool) wrote it.
pub fn mem_read(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(16);
    let page = (&raw const SCRATCH_PAGE).cast::<u64>();
    let mut sum = 0u64;
    for i in 0..count {
        // SAFETY: as in `mem_write`.
        sum = sum.wrapping_add(unsafe { page.add((i % 512) as usize).read_volatile() });
    }
    println!("mem-read n={count} sum={sum:#x}");
    finish(&boot)
}

/// `mode=mem-read-regs n=<count>` (default 2): read `i` (from 0) sets R12 = 0 and
/// RAX = 0xa1, then loads word `i % 512` of the scratch page with one `mov rax, [word]` (which
/// does not touch R12); prints `mem-read-regs i=.. rax=0x.. r12=0x..` after each; exit 0. A
/// tool that traps the load (page access) sees what the completed load leaves in RAX and R12.
pub fn mem_read_regs(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(2);
    let page = (&raw const SCRATCH_PAGE).cast::<u64>();
    for i in 0..count {
        // SAFETY: as in `mem_write`: the index stays inside the page.
        let word = unsafe { page.add((i % 512) as usize) };
        let (rax, r12): (u64, u64);
        // SAFETY: reads one word of the scratch page; RAX and R12 are declared outputs.
        unsafe {
            core::arch::asm!(
                "xor r12d, r12d",
                "mov eax, 0xa1",
                "mov rax, [{word}]",
                word = in(reg) word,
                out("rax") rax,
                out("r12") r12,
                options(nostack, readonly, preserves_flags),
            );
        }
        println!("mem-read-regs i={i} rax={rax:#x} r12={r12:#x}");
    }
    finish(&boot)
}

/// `mode=breakpoint n=<count>` (default 3): calls `breakpoint_target` n times; prints
/// `breakpoint calls=.. result=..`; exit 0.
pub fn breakpoint(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(3);
    let mut value = 0;
    for _ in 0..count {
        value = breakpoint_target(core::hint::black_box(value));
    }
    println!(
        "breakpoint calls={} result={value}",
        PROBE_COUNTER.load(Ordering::Relaxed)
    );
    finish(&boot)
}

/// `mode=spin`: prints `spinning`, then increments the probe counter forever at CPL0 (for
/// pause, kick and timeout tests).
pub fn spin() -> ! {
    println!("spinning");
    count_forever()
}

fn count_forever() -> ! {
    loop {
        PROBE_COUNTER.fetch_add(1, Ordering::Relaxed);
    }
}

/// The end of a finite probe mode: exit 0, or with `hold=1` print `holding` and increment the
/// probe counter forever (as `spin` does), so a test can still read the guest's memory and
/// see it alive after the mode's work.
fn finish(boot: &Boot) -> ! {
    if boot.arg("hold") == Some(b"1") {
        println!("holding");
        count_forever()
    }
    port::exit(status::SUCCESS)
}

/// `mode=cycle n=<count> every=<k> msr=<m>` (defaults: forever, 100, 0x174 = SYSENTER_CS, as
/// for `msr`): iteration `i` (from 0) writes word `i % 512` of the scratch page with
/// `0x5ca1_0000 + i`, writes `i` to MSR `m` and calls `breakpoint_target` (so the probe
/// counter counts iterations); every `k` iterations it prints `cycle i=<iterations so far>`.
/// With `n=`: prints `cycle n=N done` and exits 0 after `n` iterations. Detach tests watch
/// all three (page write, MSR write, breakpointed call) recur.
pub fn cycle(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n");
    let every = boot.arg_u64_or_exit("every").unwrap_or(100).max(1);
    let number = boot.arg_u64_or_exit("msr").unwrap_or(0x174);
    let Ok(number) = u32::try_from(number) else {
        println!("bad command line: msr={number:#x} does not fit 32 bits");
        port::exit(status::BAD_COMMAND_LINE)
    };
    let page = (&raw mut SCRATCH_PAGE).cast::<u64>();
    let mut i = 0u64;
    while count.is_none_or(|n| i < n) {
        // SAFETY: as in `mem_write`.
        unsafe { page.add((i % 512) as usize).write_volatile(0x5ca1_0000 + i) };
        // SAFETY: as in `msr`; the default, SYSENTER_CS, is unused in long mode.
        unsafe { write_msr(number, i) };
        breakpoint_target(core::hint::black_box(i));
        i += 1;
        if i.is_multiple_of(every) {
            println!("cycle i={i}");
        }
    }
    println!("cycle n={i} done");
    port::exit(status::SUCCESS)
}
