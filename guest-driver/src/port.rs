//! The in-VM backend: the doorbell port.
//!
//! A hypercall is `out 0xe4, eax` ([`hypercall::ports::HYPERCALL_DOORBELL`]) with RAX = the
//! number and RBX, RCX, RDX, RSI, RDI = the arguments; the VMM writes the result to RAX before
//! the instruction retires. The guest runtime allows ports 0xe4..=0xe7 through the TSS I/O
//! permission bitmap, so the agent issues it at CPL3 without a system call. RBX is reserved by
//! the compiler, so the sequence swaps it with a scratch register around the `out`.
//!
//! Map calls pass the token by guest-physical address: [`PortHypercalls`] owns a 32-byte
//! token buffer in the appliance's RAM and is told its guest-physical address (the image
//! knows how its user memory maps to physical memory).

use core::sync::atomic::{AtomicU64, Ordering};

use hypercall::token::MapToken;

use crate::{DriverError, Hypercalls};

/// The doorbell backend, for the agent running inside the appliance VM (x86-64 only).
#[derive(Debug)]
pub struct PortHypercalls {
    token: &'static [AtomicU64; 4],
    token_gpa: u64,
}

impl PortHypercalls {
    /// A backend whose map calls stage tokens in `token` (guest-physical address
    /// `token_gpa`, 8-byte aligned). The buffer is written with atomic stores, so the VMM
    /// reading it at the exit is no data race.
    pub fn new(token: &'static [AtomicU64; 4], token_gpa: u64) -> Result<Self, DriverError> {
        if !token_gpa.is_multiple_of(8) {
            return Err(DriverError::BadBootInfo(
                "token buffer address not 8-byte aligned",
            ));
        }
        Ok(PortHypercalls { token, token_gpa })
    }
}

impl Hypercalls for PortHypercalls {
    fn raw_call(&self, nr: u64, args: [u64; 5]) -> Result<u64, DriverError> {
        Ok(doorbell(nr, args))
    }

    fn stage_token(&self, token: &MapToken) -> Result<u64, DriverError> {
        for (word, value) in self.token.iter().zip(token.words) {
            word.store(value, Ordering::Relaxed);
        }
        // The `out` that follows is the release point: the VMM reads the buffer at the exit.
        core::sync::atomic::fence(Ordering::SeqCst);
        Ok(self.token_gpa)
    }
}

/// Issues one hypercall through the doorbell port and returns RAX.
///
/// Only meaningful inside a VM whose VMM decodes port 0xe4 (on a host the `out` faults).
pub fn doorbell(nr: u64, args: [u64; 5]) -> u64 {
    let mut rax = nr;
    // SAFETY: the sequence writes no memory and uses no stack; RBX (reserved by LLVM) is
    // swapped with a scratch register and restored before the block ends; every other
    // register it touches is declared. The VMM may change memory (it maps pages into the
    // window) during the exit, so the block is not `nomem`: the compiler assumes memory
    // changed. The `out` is allowed at CPL3 by the guest runtime's TSS I/O bitmap.
    unsafe {
        core::arch::asm!(
            "xchg {a0}, rbx",
            "out 0xe4, eax",
            "xchg {a0}, rbx",
            a0 = inout(reg) args[0] => _,
            inout("rax") rax,
            in("rcx") args[1],
            in("rdx") args[2],
            in("rsi") args[3],
            in("rdi") args[4],
            options(nostack, preserves_flags),
        );
    }
    rax
}
