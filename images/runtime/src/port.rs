//! Port I/O and the debug-exit port.
//!
//! At CPL0 every `in`/`out` is one VM exit; at CPL3 it needs IOPL = 3 in RFLAGS (the runtime
//! enters user mode with IOPL 3) and costs about three times as much on PVM hosts.

use hypercall::ports::DEBUG_EXIT;

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects; the ports used by the runtime are the
    // VMM-decoded ones (serial, debug exit, hypercall doorbell) and unknown ports are ignored.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`: no memory effects.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects.
    unsafe {
        core::arch::asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Ends the VM with `status` through the debug-exit port (a 32-bit `out`).
///
/// Never returns: if the VMM ignores the write, the vCPU halts forever.
pub fn exit(status: u32) -> ! {
    outl(DEBUG_EXIT, status);
    halt_forever()
}

/// Halts this vCPU forever (with interrupts off `hlt` exits to the VMM each time).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `hlt` only stops the vCPU until the next event; at CPL3 it faults (#GP),
        // which the exception handler reports.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}
