//! The CPL3 modes: `user` (print from CPL3, `syscall` and `int 0x80` round trips),
//! `fault-user` (a CPL3 page fault reported by the exception handler) and the `bench-*`
//! modes that time CPL3→CPL0→CPL3 round trips.

use guest_runtime::paging::{
    self, AddressSpace, FrameAllocator, ImageAccess, ImageLayout, PagingError, flags,
};
use guest_runtime::trap::{self, UserContext, VECTOR_INT3, VECTOR_SYSCALL};
use guest_runtime::{Boot, cpu, doorbell, port, println, status, user};

/// Where the user stack page is mapped (PML4 slot 1, away from the kernel's identity map).
pub(crate) const USER_STACK_VA: u64 = 0x80_0000_0000;

/// System call numbers understood by this image's kernel.
const SYS_EXIT: u64 = 0;
const SYS_PING: u64 = 1;
const SYS_NOP: u64 = 2;

/// Exit status when the CPL3 code saw something unexpected.
const USER_MISMATCH: u32 = 4;
/// Exit status when the page tables could not be built.
const NO_MEMORY: u32 = 5;

/// A kernel data word that `fault-user` writes from CPL3 (supervisor-only: page fault).
static mut FAULT_TARGET: u64 = 0;

core::arch::global_asm!(
    ".globl \"kvmi_profile.sym.fault_user_target\"",
    ".set \"kvmi_profile.sym.fault_user_target\", {target}",
    target = sym FAULT_TARGET,
);

fn address_space(boot: &Boot, access: ImageAccess) -> Result<AddressSpace, PagingError> {
    let ram_end = boot.info.ram_size.min(paging::KERNEL_RAM_MAP_LIMIT);
    let mut alloc = FrameAllocator::new(ImageLayout::free_ram_start(), ram_end);
    let mut space = AddressSpace::new(&mut alloc)?;
    paging::map_kernel(&mut space, boot.info, access, &[], &mut alloc)?;
    let stack = alloc.alloc()?;
    space.map_4k(
        USER_STACK_VA,
        stack,
        flags::WRITABLE | flags::USER | flags::NO_EXECUTE,
        &mut alloc,
    )?;
    Ok(space)
}

/// Builds and loads the address space, then returns a context that starts `entry(arg)`.
fn enter(boot: &Boot, entry: extern "sysv64" fn(u64) -> !, arg: u64) -> UserContext {
    enter_with(boot, ImageAccess::Separated, entry, arg)
}

/// [`enter`] with a choice of how much of the image CPL3 may use.
fn enter_with(
    boot: &Boot,
    access: ImageAccess,
    entry: extern "sysv64" fn(u64) -> !,
    arg: u64,
) -> UserContext {
    let space = match address_space(boot, access) {
        Ok(space) => space,
        Err(error) => {
            println!("cannot build page tables: {error:?}");
            port::exit(NO_MEMORY)
        }
    };
    // SAFETY: `space` maps the kernel image, its stacks and RAM at their current addresses.
    unsafe { cpu::write_cr3(space.root()) };
    UserContext::new(
        entry as *const () as u64,
        USER_STACK_VA + paging::PAGE_SIZE,
        arg,
    )
}

fn run(ctx: &mut UserContext) {
    // SAFETY: the address space built by `address_space` keeps every kernel page
    // supervisor-only; only the user text and the user stack are CPL3-accessible.
    unsafe { trap::run_user(ctx) }
}

fn via(ctx: &UserContext) -> &'static str {
    match ctx.vector {
        VECTOR_INT3 => "int3",
        VECTOR_SYSCALL => "syscall",
        _ => "int80",
    }
}

/// How `mode=user` makes its system calls (`via=`): 0 int3 (default), 1 syscall, 2 int 0x80.
fn via_arg(boot: &Boot) -> u64 {
    match boot.arg("via") {
        Some(b"syscall") => 1,
        Some(b"int80") => 2,
        _ => 0,
    }
}

#[unsafe(link_section = ".urodata")]
static HELLO_CPL3: [u8; 16] = *b"hello from cpl3\n";

#[unsafe(link_section = ".utext")]
extern "sysv64" fn user_main(via: u64) -> ! {
    // SAFETY: HELLO_CPL3 is in `.urodata`, user-readable.
    unsafe { user::write_serial((&raw const HELLO_CPL3).cast(), 16) };
    let cs: u64;
    // SAFETY: reading CS has no side effects.
    unsafe {
        core::arch::asm!("mov {0:r}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    };
    let call = |number, arg| match via {
        0 => user::call(number, arg, 0, 0),
        1 => user::syscall(number, arg, 0, 0),
        _ => user::int80(number, arg, 0, 0),
    };
    let first = call(SYS_PING, cs & 3);
    let second = call(SYS_PING, first);
    call(SYS_EXIT, second);
    loop {
        core::hint::spin_loop();
    }
}

/// `mode=user`: print from CPL3, two system-call round trips, user exit. System calls use
/// `int3` (default), or `via=syscall` / `via=int80`, which fail on PVM hosts: `syscall`
/// reaches LSTAR still at CPL3 (#PF on the supervisor-only page), `int 0x80` raises #UD.
pub fn user(boot: Boot) -> ! {
    let mut ctx = enter(&boot, user_main, via_arg(&boot));
    loop {
        run(&mut ctx);
        if !ctx.is_syscall() {
            port::exit(ctx.report_exception());
        }
        match ctx.rax {
            SYS_PING => {
                println!(
                    "syscall ping via={} arg={} cpl={}",
                    via(&ctx),
                    ctx.rdi,
                    ctx.cs & 3
                );
                ctx.rax = ctx.rdi + 1;
            }
            SYS_EXIT => {
                println!("user exit arg={} via={}", ctx.rdi, via(&ctx));
                // CPL3 saw CPL 3 (arg 3), then each round trip added one.
                let ok = ctx.rdi == 5;
                println!(
                    "{}",
                    if ok {
                        "user mode ok"
                    } else {
                        "user mode MISMATCH"
                    }
                );
                port::exit(if ok { status::SUCCESS } else { USER_MISMATCH })
            }
            other => {
                println!("unknown syscall {other}");
                port::exit(USER_MISMATCH)
            }
        }
    }
}

/// Ordinary Rust code (kernel text) run at CPL3 in a [`ImageAccess::Shared`] address space:
/// formatting, the serial lock and `println!` all work there.
extern "sysv64" fn user_shared_main(arg: u64) -> ! {
    let cs: u64;
    // SAFETY: reading CS has no side effects.
    unsafe {
        core::arch::asm!("mov {0:r}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    };
    println!("println from cpl{} arg={arg:#x}", cs & 3);
    user::call(SYS_EXIT, cs & 3, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// `mode=user-shared`: the whole image user-accessible (the appliance model); CPL3 uses
/// `println!` and exits through a system call with its CPL.
pub fn user_shared(boot: Boot) -> ! {
    let mut ctx = enter_with(&boot, ImageAccess::Shared, user_shared_main, 0x5a);
    run(&mut ctx);
    if !ctx.is_syscall() {
        port::exit(ctx.report_exception());
    }
    let ok = ctx.rax == SYS_EXIT && ctx.rdi == 3;
    println!(
        "{}",
        if ok {
            "user-shared ok"
        } else {
            "user-shared MISMATCH"
        }
    );
    port::exit(if ok { status::SUCCESS } else { USER_MISMATCH })
}

/// The hypercall `mode=hypercall` makes (number and arguments from the command line).
#[derive(Clone, Copy)]
struct HypercallRequest {
    number: u64,
    args: [u64; 4],
    rdi: u64,
}

static mut HYPERCALL_REQUEST: HypercallRequest = HypercallRequest {
    number: 0,
    args: [0; 4],
    rdi: 0,
};

/// CPL3 side of `mode=hypercall` (Shared address space: reads the request from kernel data).
extern "sysv64" fn user_hypercall(_arg: u64) -> ! {
    // SAFETY: written by the kernel before entering CPL3, read-only afterwards.
    let request = unsafe { (&raw const HYPERCALL_REQUEST).read() };
    let result = doorbell::hypercall(request.number, request.args, request.rdi);
    user::call(SYS_EXIT, result, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// `mode=hypercall`: makes hypercall `nr=` (default 34, the agent call) with `a0=`..`a3=`
/// and `rdi=` (default 24 for 34, else 0) from CPL0 and then from CPL3 (`out 0xe4, eax`),
/// printing `hypercall nr=.. cpl=.. rax=..` for each; exit 0.
pub fn hypercall(boot: Boot) -> ! {
    let number = boot.arg_u64_or_exit("nr").unwrap_or(34);
    let mut args = [0u64; 4];
    for (arg, key) in args.iter_mut().zip(["a0", "a1", "a2", "a3"]) {
        *arg = boot.arg_u64_or_exit(key).unwrap_or(0);
    }
    let default_rdi = if number == 34 { 24 } else { 0 };
    let rdi = boot.arg_u64_or_exit("rdi").unwrap_or(default_rdi);
    let result = doorbell::hypercall(number, args, rdi);
    println!("hypercall nr={number} cpl=0 rax={result:#x}");
    // SAFETY: no CPL3 code runs yet; this is the only writer.
    unsafe { (&raw mut HYPERCALL_REQUEST).write(HypercallRequest { number, args, rdi }) };
    let mut ctx = enter_with(&boot, ImageAccess::Shared, user_hypercall, 0);
    run(&mut ctx);
    if !ctx.is_syscall() {
        port::exit(ctx.report_exception());
    }
    println!("hypercall nr={number} cpl=3 rax={:#x}", ctx.rdi);
    port::exit(status::SUCCESS)
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn user_exit(status: u64) -> ! {
    user::exit(status as u32)
}

/// `mode=user-exit`: CPL3 ends the VM itself through the debug-exit port (32-bit `out`) with
/// `status=` (default 0x42).
pub fn user_exit_mode(boot: Boot) -> ! {
    let status = boot.arg_u64_or_exit("status").unwrap_or(0x42);
    let mut ctx = enter(&boot, user_exit, status);
    run(&mut ctx);
    if !ctx.is_syscall() {
        port::exit(ctx.report_exception());
    }
    println!("user exit did not end the VM");
    port::exit(USER_MISMATCH)
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn user_fault(_arg: u64) -> ! {
    // SAFETY: deliberately writes a supervisor-only kernel page: the CPU raises #PF.
    unsafe { (&raw mut FAULT_TARGET).write_volatile(0xbad) };
    user::call(SYS_EXIT, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// `mode=fault-user`: a CPL3 write to kernel data; the page fault is reported and its status
/// (0x10e) is the exit status.
pub fn fault_user(boot: Boot) -> ! {
    let mut ctx = enter(&boot, user_fault, 0);
    run(&mut ctx);
    if ctx.is_syscall() {
        println!("user write to kernel data did not fault");
        port::exit(USER_MISMATCH);
    }
    port::exit(ctx.report_exception())
}

/// What a `bench-*` mode repeats at CPL3.
#[derive(Clone, Copy)]
pub enum BenchKind {
    /// `int3` → kernel → `iretq`.
    Int3,
    /// `syscall` → kernel → `sysretq`.
    Syscall,
    /// `int 0x80` → kernel → `iretq`.
    Int80,
    /// `in al, 0x3fd` (a VM exit straight from CPL3, no kernel involvement).
    Port,
}

#[unsafe(link_section = ".utext")]
extern "sysv64" fn user_bench(packed: u64) -> ! {
    let kind = packed & 0xff;
    let count = packed >> 8;
    // SAFETY: rdtsc has no side effects (CR4.TSD is clear).
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    let mut done = 0;
    while done < count {
        match kind {
            0 => {
                user::call(SYS_NOP, 0, 0, 0);
            }
            1 => {
                user::syscall(SYS_NOP, 0, 0, 0);
            }
            2 => {
                user::int80(SYS_NOP, 0, 0, 0);
            }
            _ => {
                core::hint::black_box(port::inb(0x3fd));
            }
        }
        done += 1;
    }
    // SAFETY: as above.
    let end = unsafe { core::arch::x86_64::_rdtsc() };
    user::call(SYS_EXIT, end - start, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// `mode=bench-*`, `n=` iterations (default 10000): prints TSC cycles per round trip.
pub fn bench(boot: Boot, kind: BenchKind) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(10_000).min(1 << 40);
    let (name, code) = match kind {
        BenchKind::Int3 => ("int3", 0),
        BenchKind::Syscall => ("syscall", 1),
        BenchKind::Int80 => ("int80", 2),
        BenchKind::Port => ("port", 3),
    };
    let mut ctx = enter(&boot, user_bench, (count << 8) | code);
    loop {
        run(&mut ctx);
        if !ctx.is_syscall() {
            port::exit(ctx.report_exception());
        }
        if ctx.rax == SYS_EXIT {
            let per = ctx.rdi / count.max(1);
            println!(
                "bench kind={name} n={count} tsc_total={} tsc_per_iteration={per}",
                ctx.rdi
            );
            port::exit(status::SUCCESS)
        }
        ctx.rax = 0;
    }
}
