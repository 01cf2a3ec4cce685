//! Helpers for code that runs at CPL3.
//!
//! User code must live in user-mapped pages: put user functions in `.utext`
//! (`#[unsafe(link_section = ".utext")]`) and their constants in `.urodata`. Everything here
//! is either `#[inline(always)]` (so it lands in the calling function's section) or placed in
//! `.utext` itself. Port I/O from CPL3 works through the TSS I/O permission bitmap (COM1, the
//! debug exit and the hypercall doorbell); IOPL 3 does not help on PVM hosts (dropped).

use hypercall::ports::{DEBUG_EXIT, SERIAL_COM1};

use crate::port::{inb, outb, outl};

/// Makes a system call the way that works on every host: `int3`, which raises #BP through
/// the DPL3 gate at vector 3 (the runtime treats vector 3 from CPL3 as a system call; RIP is
/// already past the 1-byte instruction). Number in RAX, arguments in RDI, RSI, RDX; the
/// result comes back in RAX.
///
/// On PVM hosts neither `syscall` (it reaches LSTAR still at CPL3) nor `int 0x80` (#UD) work
/// from CPL3; exceptions do.
#[inline(always)]
pub fn call(number: u64, arg0: u64, arg1: u64, arg2: u64) -> u64 {
    let result: u64;
    // SAFETY: `int3` enters the kernel through the DPL3 #BP gate, which saves and restores
    // every register except RAX (the result).
    unsafe {
        core::arch::asm!("int3", inlateout("rax") number => result, in("rdi") arg0, in("rsi") arg1,
            in("rdx") arg2, options(nostack));
    }
    result
}

/// Makes a system call with the `syscall` instruction (upstream KVM only, see [`call`]): number in RAX, arguments in RDI, RSI,
/// RDX; the kernel's result comes back in RAX.
#[inline(always)]
pub fn syscall(number: u64, arg0: u64, arg1: u64, arg2: u64) -> u64 {
    let result: u64;
    // SAFETY: `syscall` transfers to the kernel's entry point, which saves and restores every
    // register except RAX (the result), RCX and R11 (clobbered by the instruction).
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") number => result, in("rdi") arg0, in("rsi") arg1,
            in("rdx") arg2, out("rcx") _, out("r11") _, options(nostack));
    }
    result
}

/// Makes a system call through the DPL3 interrupt gate (`int 0x80`), same registers as
/// [`syscall`] (upstream KVM only, see [`call`]).
#[inline(always)]
pub fn int80(number: u64, arg0: u64, arg1: u64, arg2: u64) -> u64 {
    let result: u64;
    // SAFETY: `int 0x80` enters the kernel through the DPL3 gate, which saves and restores
    // every register except RAX (the result).
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") number => result, in("rdi") arg0, in("rsi") arg1,
            in("rdx") arg2, options(nostack));
    }
    result
}

/// Writes `len` bytes at `bytes` to COM1 from CPL3 (polls the UART like the kernel does).
///
/// Takes a raw pointer and length instead of a slice so no bounds-check code (which lives in
/// kernel text) is generated. Not locked: callers serialise with a lock in user memory if
/// lines must not interleave.
///
/// # Safety
/// `bytes..bytes+len` must be readable at CPL3.
#[unsafe(link_section = ".utext")]
#[inline(never)]
pub unsafe fn write_serial(bytes: *const u8, len: usize) {
    const LSR: u16 = SERIAL_COM1 + 5;
    let mut sent = 0;
    while sent < len {
        while inb(LSR) & (1 << 5) == 0 {
            core::hint::spin_loop();
        }
        let burst_end = if len - sent > 16 { sent + 16 } else { len };
        while sent < burst_end {
            // SAFETY: `sent < len`, inside the caller's readable range.
            outb(SERIAL_COM1, unsafe { bytes.add(sent).read_volatile() });
            sent += 1;
        }
    }
}

/// Formats `value` in decimal into `buf` (right-aligned); returns the index of the first digit.
#[unsafe(link_section = ".utext")]
#[inline(never)]
pub fn format_decimal(mut value: u64, buf: &mut [u8; 20]) -> usize {
    let mut at = 20;
    loop {
        at -= 1;
        // `at` stays in 0..20: a u64 has at most 20 digits.
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 || at == 0 {
            return at;
        }
    }
}

/// Ends the VM from CPL3 through the debug-exit port (a 32-bit `out`).
#[inline(always)]
pub fn exit(status: u32) -> ! {
    outl(DEBUG_EXIT, status);
    loop {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::format_decimal;

    fn render(value: u64) -> String {
        let mut buf = [0u8; 20];
        let start = format_decimal(value, &mut buf);
        String::from_utf8(buf[start..].to_vec()).unwrap()
    }

    #[test]
    fn decimal_formatting_matches_std() {
        for value in [0, 7, 10, 12345, u64::MAX] {
            assert_eq!(render(value), value.to_string());
        }
    }
}
