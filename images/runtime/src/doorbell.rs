//! Hypercalls through the doorbell port (`hypercall::ports::HYPERCALL_DOORBELL`), callable at
//! CPL0 and CPL3.
//!
//! Register convention (`hypercall::call`): RAX = number, RBX/RCX/RDX/RSI = arguments, RDI =
//! the agent call's sub-function; the VMM writes the result to RAX. The `out` is 32-bit
//! (`out 0xe4, eax`); CPL3 code may make it because the TSS I/O permission bitmap allows the
//! doorbell's four ports (the runtime's `cpu` module).

/// Makes hypercall `number` with arguments `args` (RBX, RCX, RDX, RSI) and `rdi`; returns RAX.
///
/// `#[inline(always)]`, so it can be called from `.utext` code.
#[inline(always)]
pub fn hypercall(number: u64, args: [u64; 4], rdi: u64) -> u64 {
    let result: u64;
    // SAFETY: a port write to the VMM's doorbell; RBX is saved and restored around it (LLVM
    // reserves RBX, so it is swapped in through a scratch register); the VMM changes only RAX.
    unsafe {
        core::arch::asm!(
            "xchg {a0}, rbx",
            "out 0xe4, eax",
            "xchg {a0}, rbx",
            a0 = inout(reg) args[0] => _,
            inlateout("rax") number => result,
            in("rcx") args[1],
            in("rdx") args[2],
            in("rsi") args[3],
            in("rdi") rdi,
            options(nostack),
        );
    }
    result
}

/// The KVMI agent call (number 34, RDI = 24, RSI = 0): raises a hypercall event for the
/// introspector; returns what the VMM put in RAX.
#[inline(always)]
pub fn agent_call() -> u64 {
    hypercall(34, [0; 4], 24)
}
