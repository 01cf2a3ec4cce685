//! Traps and the CPL3 round trip: the IDT, exception reporting, the `syscall` entry and
//! [`run_user`].
//!
//! The kernel drives user code like a hypervisor drives a vCPU: [`run_user`] saves the
//! kernel's callee-saved registers, enters CPL3 from a [`UserContext`], and returns when the
//! user code makes a `syscall`, executes `int 0x80`, or takes an exception. The context then
//! holds the user registers and [`UserContext::vector`] says why it stopped.
//!
//! System calls: `int3` (vector 3, a DPL3 gate) is the one that works on PVM hosts and on
//! upstream KVM; `syscall`/`sysretq` and `int 0x80` are wired up as well but fail from CPL3 on
//! PVM (see `user::call`).
//!
//! How the user frame is saved without copying: while user code runs, `TSS.RSP0` and the
//! per-CPU `ctx_end` point just past the running `UserContext`, whose layout ends with the
//! hardware interrupt frame. A trap from CPL3 makes the CPU push `ss, rsp, rflags, cs, rip`
//! straight into the context; the stub pushes the error code and vector and the common code
//! pushes the general registers below them. `syscall` builds the same frame by hand.
//! Returning to the user uses `sysretq` after a `syscall` (RCX/R11 are already lost) and
//! `iretq` otherwise.

use core::fmt;

use crate::cpu::{self, USER_CS, USER_DS};
use crate::{port, println, status};

/// [`UserContext::vector`] value for a stop caused by the `syscall` instruction.
pub const VECTOR_SYSCALL: u64 = 0x100;
/// Vector of `int3` (#BP), the system call that works on every host (see `user::call`).
pub const VECTOR_INT3: u64 = 3;
/// Vector of the DPL3 interrupt gate usable as a system call (`int 0x80`).
pub const VECTOR_INT80: u64 = 0x80;
/// Initial user RFLAGS: IOPL 3 (ports usable from CPL3), interrupts off, reserved bit 1.
pub const USER_RFLAGS: u64 = 0x3002;
/// RFLAGS bits user code may keep (arithmetic flags, TF, DF, IOPL, AC); bit 1 is forced.
const USER_RFLAGS_ALLOWED: u64 = 0x4_3dd5;

/// User register state, laid out as the trap entry code pushes it (lowest address first).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct UserContext {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Why the user code stopped: an exception vector, [`VECTOR_INT80`] or [`VECTOR_SYSCALL`]
    /// (0 for a context that never ran).
    pub vector: u64,
    /// The exception's error code (0 when it has none).
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const CTX_SIZE: usize = core::mem::size_of::<UserContext>();
const _: () = assert!(CTX_SIZE == 176 && CTX_SIZE.is_multiple_of(16));
const _: () = assert!(core::mem::offset_of!(UserContext, vector) == 120);

impl UserContext {
    /// A context that starts at `rip` with stack `rsp` and `rdi` = `arg`.
    pub const fn new(rip: u64, rsp: u64, arg: u64) -> Self {
        Self {
            r15: 0,
            r14: 0,
            r13: 0,
            r12: 0,
            r11: 0,
            r10: 0,
            r9: 0,
            r8: 0,
            rbp: 0,
            rdi: arg,
            rsi: 0,
            rdx: 0,
            rcx: 0,
            rbx: 0,
            rax: 0,
            vector: 0,
            error: 0,
            rip,
            cs: USER_CS as u64,
            rflags: USER_RFLAGS,
            rsp,
            ss: USER_DS as u64,
        }
    }

    /// True when the last stop was a system call (`int3`, `syscall` or `int 0x80`).
    pub fn is_syscall(&self) -> bool {
        matches!(self.vector, VECTOR_INT3 | VECTOR_SYSCALL | VECTOR_INT80)
    }

    /// Prints the standard exception report for this (user) stop and returns its exit
    /// status (`status::exception(vector)`).
    pub fn report_exception(&self) -> u32 {
        let cr2 = if self.vector == 14 {
            cpu::read_cr2()
        } else {
            0
        };
        println!(
            "{}",
            ExceptionReport {
                vector: self.vector,
                error: self.error,
                rip: self.rip,
                cr2,
                cpl: self.cs & 3
            }
        );
        status::exception(self.vector as u8)
    }
}

/// The one-line exception report printed on COM1.
struct ExceptionReport {
    vector: u64,
    error: u64,
    rip: u64,
    cr2: u64,
    cpl: u64,
}

impl fmt::Display for ExceptionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EXCEPTION vector={} err={:#x} rip={:#x} cr2={:#x} cpl={}",
            self.vector, self.error, self.rip, self.cr2, self.cpl
        )
    }
}

/// Runs user code from `ctx` until it makes a system call or takes an exception; the
/// registers it had then are in `ctx` on return.
///
/// A context whose `rip` or `rsp` is not a canonical lower-half address is not entered: it
/// returns at once as a general-protection fault (vector 13). Segment selectors are forced to
/// the user ones and RFLAGS to the allowed user bits.
///
/// # Safety
/// The current address space must keep every page the kernel relies on out of CPL3's reach
/// (supervisor-only), except pages the kernel deliberately shares and only accesses with
/// volatile or atomic operations.
pub unsafe fn run_user(ctx: &mut UserContext) {
    const LOWER_HALF_END: u64 = 0x0000_8000_0000_0000;
    if ctx.rip >= LOWER_HALF_END || ctx.rsp >= LOWER_HALF_END {
        ctx.vector = 13;
        ctx.error = 0;
        return;
    }
    ctx.cs = USER_CS as u64;
    ctx.ss = USER_DS as u64;
    ctx.rflags = (ctx.rflags & USER_RFLAGS_ALLOWED) | 0x2;
    // SAFETY: `ctx` is a valid, 16-byte aligned context with user selectors and a canonical
    // user rip/rsp; `run_user_asm` returns here through `return_to_kernel` with the kernel's
    // callee-saved registers and stack restored; the caller guarantees the address space.
    unsafe { run_user_asm(ctx) }
}

unsafe extern "sysv64" {
    fn run_user_asm(ctx: *mut UserContext);
    static trap_stubs: u8;
    fn syscall_entry();
}

/// Address of the `syscall` entry point (for `LSTAR`).
pub(crate) fn syscall_entry_address() -> u64 {
    syscall_entry as *const () as u64
}

/// Called by the trap code for an exception taken at CPL0: report it and exit.
extern "sysv64" fn kernel_exception(frame: &UserContext) -> ! {
    let cr2 = if frame.vector == 14 {
        cpu::read_cr2()
    } else {
        0
    };
    println!(
        "{}",
        ExceptionReport {
            vector: frame.vector,
            error: frame.error,
            rip: frame.rip,
            cr2,
            cpl: frame.cs & 3
        }
    );
    port::exit(status::exception(frame.vector as u8))
}

core::arch::global_asm!(
    ".section .text.trap, \"ax\"",
    ".macro TRAP_NOERR v",
    "    .balign 16",
    "    push 0",
    "    push \\v",
    "    jmp trap_common",
    ".endm",
    ".macro TRAP_ERR v",
    "    .balign 16",
    "    push \\v",
    "    jmp trap_common",
    ".endm",
    ".balign 16",
    ".globl trap_stubs",
    "trap_stubs:",
    "TRAP_NOERR 0", "TRAP_NOERR 1", "TRAP_NOERR 2", "TRAP_NOERR 3", "TRAP_NOERR 4",
    "TRAP_NOERR 5", "TRAP_NOERR 6", "TRAP_NOERR 7", "TRAP_ERR 8", "TRAP_NOERR 9",
    "TRAP_ERR 10", "TRAP_ERR 11", "TRAP_ERR 12", "TRAP_ERR 13", "TRAP_ERR 14",
    "TRAP_NOERR 15", "TRAP_NOERR 16", "TRAP_ERR 17", "TRAP_NOERR 18", "TRAP_NOERR 19",
    "TRAP_NOERR 20", "TRAP_ERR 21", "TRAP_NOERR 22", "TRAP_NOERR 23", "TRAP_NOERR 24",
    "TRAP_NOERR 25", "TRAP_NOERR 26", "TRAP_NOERR 27", "TRAP_NOERR 28", "TRAP_ERR 29",
    "TRAP_ERR 30", "TRAP_NOERR 31", "TRAP_NOERR 0x80",
    // Common trap path. Stack: vector, error, rip, cs, rflags, rsp, ss.
    ".balign 16",
    "trap_common:",
    "    test byte ptr [rsp + 24], 3",
    "    jz 2f",
    "    swapgs",
    "    push rax", "    push rbx", "    push rcx", "    push rdx", "    push rsi",
    "    push rdi", "    push rbp", "    push r8", "    push r9", "    push r10",
    "    push r11", "    push r12", "    push r13", "    push r14", "    push r15",
    "    jmp return_to_kernel",
    "2:",
    "    push rax", "    push rbx", "    push rcx", "    push rdx", "    push rsi",
    "    push rdi", "    push rbp", "    push r8", "    push r9", "    push r10",
    "    push r11", "    push r12", "    push r13", "    push r14", "    push r15",
    "    mov rdi, rsp",
    "    call {kernel_exception}",
    "    ud2",
    // syscall from CPL3: RCX = user rip, R11 = user rflags, RSP = user rsp.
    ".balign 16",
    ".globl syscall_entry",
    "syscall_entry:",
    "    swapgs",
    "    mov gs:[16], rsp",
    "    mov rsp, gs:[8]",
    "    push {user_ds}",
    "    push qword ptr gs:[16]",
    "    push r11",
    "    push {user_cs}",
    "    push rcx",
    "    push 0",
    "    push {vector_syscall}",
    "    push rax", "    push rbx", "    push rcx", "    push rdx", "    push rsi",
    "    push rdi", "    push rbp", "    push r8", "    push r9", "    push r10",
    "    push r11", "    push r12", "    push r13", "    push r14", "    push r15",
    "return_to_kernel:",
    "    mov rsp, gs:[0]",
    "    pop r15", "    pop r14", "    pop r13", "    pop r12", "    pop rbp", "    pop rbx",
    "    ret",
    // run_user_asm(ctx = rdi)
    ".balign 16",
    ".globl run_user_asm",
    "run_user_asm:",
    "    push rbx", "    push rbp", "    push r12", "    push r13", "    push r14", "    push r15",
    "    mov gs:[0], rsp",
    "    lea rax, [rdi + {ctx_size}]",
    "    mov gs:[8], rax",
    "    mov rcx, gs:[32]",
    "    mov [rcx + 4], rax",
    "    mov rsp, rdi",
    "    pop r15", "    pop r14", "    pop r13", "    pop r12",
    "    cmp qword ptr [rsp + 88], {vector_syscall}",
    "    je 3f",
    "    pop r11", "    pop r10", "    pop r9", "    pop r8", "    pop rbp", "    pop rdi",
    "    pop rsi", "    pop rdx", "    pop rcx", "    pop rbx", "    pop rax",
    "    add rsp, 16",
    "    swapgs",
    "    iretq",
    "3:",
    "    add rsp, 8",
    "    pop r10", "    pop r9", "    pop r8", "    pop rbp", "    pop rdi",
    "    pop rsi", "    pop rdx",
    "    add rsp, 8",
    "    pop rbx", "    pop rax",
    "    mov rcx, [rsp + 16]",
    "    mov r11, [rsp + 32]",
    "    mov rsp, [rsp + 40]",
    "    swapgs",
    "    sysretq",
    kernel_exception = sym kernel_exception,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    vector_syscall = const VECTOR_SYSCALL,
    ctx_size = const CTX_SIZE,
);

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

const STUB_STRIDE: u64 = 16;

fn set_gate(idt: *mut Idt, vector: usize, handler: u64, dpl: u64) {
    let low = (handler & 0xffff)
        | ((cpu::KERNEL_CS as u64) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    // SAFETY: `vector < 256`, so both words are inside the table; only vCPU 0 writes it,
    // before the other vCPUs load it.
    unsafe {
        (*idt).0[2 * vector] = low;
        (*idt).0[2 * vector + 1] = handler >> 32;
    }
}

/// Fills the shared IDT: vectors 0..32 (vector 3, `int3`, callable from CPL3) and the DPL3
/// system-call gate at 0x80.
pub(crate) fn build_idt() {
    let base = (&raw const trap_stubs) as u64;
    let idt = &raw mut IDT;
    for vector in 0..32 {
        let dpl = if vector == 3 { 3 } else { 0 };
        set_gate(idt, vector, base + STUB_STRIDE * vector as u64, dpl);
    }
    set_gate(idt, VECTOR_INT80 as usize, base + STUB_STRIDE * 32, 3);
}

/// Loads the shared IDT on this vCPU.
pub(crate) fn load_idt() {
    let pointer = DescriptorPointer {
        limit: (512 * 8 - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    // SAFETY: the IDT is built (vCPU 0 finished `build_idt` before IDT_READY) and static.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags))
    }
}

/// Loads an IDT with limit 0: the next exception becomes a triple fault (VM shutdown).
pub fn load_empty_idt() {
    let pointer = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: an empty IDT only changes how later exceptions are delivered (not at all).
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags))
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}
