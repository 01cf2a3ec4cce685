//! The image entry point (`_start`), per-vCPU boot stacks and the hand-off to the image's
//! `main` (declared with [`entry!`](crate::entry)).
//!
//! Every vCPU enters `_start` at the same time with `RDI` = the boot-info address and
//! `RSI` = its index (see `hypercall::boot`). `_start` picks the vCPU's stack from the index,
//! then [`runtime_start`] checks the boot record, installs this vCPU's GDT, TSS and IDT, and
//! calls the image's `main`.

use hypercall::boot::{BOOT_MAGIC, BOOT_VERSION, BootInfo};

use crate::{MAX_CPUS, cpu, port, status};

/// Bytes of kernel stack per vCPU (also the TSS RSP0 stack for traps from CPL3).
pub const KERNEL_STACK_SIZE: usize = 16 * 1024;
#[cfg(not(test))]
const STACK_SHIFT: u32 = KERNEL_STACK_SIZE.trailing_zeros();

#[repr(C, align(4096))]
struct Stacks([[u8; KERNEL_STACK_SIZE]; MAX_CPUS]);

static mut KERNEL_STACKS: Stacks = Stacks([[0; KERNEL_STACK_SIZE]; MAX_CPUS]);

/// What the image's `main` receives on each vCPU.
#[derive(Clone, Copy)]
pub struct Boot {
    /// The VMM's boot record (identity-mapped, read-only by convention).
    pub info: &'static BootInfo,
    /// This vCPU's index (0-based).
    pub vcpu: u32,
}

impl Boot {
    /// Number of vCPUs the VMM started (at least 1).
    pub fn vcpu_count(&self) -> u32 {
        self.info.vcpu_count.max(1)
    }

    /// The value of `key=value` on the command line.
    pub fn arg(&self, key: &str) -> Option<&'static [u8]> {
        self.info.cmdline_value(key)
    }

    /// `key=value` parsed as a decimal (or `0x` hexadecimal) `u64`: `Ok(None)` when absent,
    /// an error naming the key when present but not a number.
    pub fn arg_u64(&self, key: &'static str) -> Result<Option<u64>, BadArgument> {
        match self.arg(key) {
            None => Ok(None),
            Some(text) => parse_u64(text)
                .map(Some)
                .ok_or(BadArgument { key, value: text }),
        }
    }

    /// Like [`Boot::arg_u64`], but a bad value prints the error and ends the VM with
    /// [`status::BAD_COMMAND_LINE`].
    pub fn arg_u64_or_exit(&self, key: &'static str) -> Option<u64> {
        self.arg_u64(key).unwrap_or_else(|error| {
            crate::println!("{error}");
            port::exit(status::BAD_COMMAND_LINE)
        })
    }
}

/// A command-line value that is not what its key needs.
#[derive(Clone, Copy, Debug)]
pub struct BadArgument {
    /// The key.
    pub key: &'static str,
    /// The value given.
    pub value: &'static [u8],
}

impl core::fmt::Display for BadArgument {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let value = core::str::from_utf8(self.value).unwrap_or("<not utf-8>");
        write!(
            f,
            "bad command line: {}={value:?} is not a number",
            self.key
        )
    }
}

/// Parses a decimal (or `0x` hexadecimal) unsigned number.
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(radix)? as u64;
        acc.checked_mul(radix as u64)?.checked_add(digit)
    })
}

/// Top of `vcpu`'s kernel stack.
pub fn kernel_stack_top(vcpu: u32) -> u64 {
    let base = (&raw const KERNEL_STACKS) as u64;
    base + (vcpu as u64 + 1) * KERNEL_STACK_SIZE as u64
}

#[cfg(not(test))]
/// Printed (without a stack) by a vCPU whose index is at or above `MAX_CPUS`.
static TOO_MANY_MESSAGE: [u8; 59] =
    *b"runtime: a vCPU index >= MAX_CPUS started; it has no stack\n";

#[cfg(not(test))]
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".globl _start",
    ".type _start, @function",
    "_start:",
    "    cmp rsi, {max_cpus}",
    "    jae 2f",
    "    lea rsp, [rip + {stacks}]",
    "    mov rax, rsi",
    "    inc rax",
    "    shl rax, {shift}",
    "    add rsp, rax",
    "    xor ebp, ebp",
    "    call {start}",
    // No stack for this vCPU: print a fixed message without one, then exit.
    "2:  lea rsi, [rip + {message}]",
    "    mov ecx, {message_len}",
    "    mov edx, {com1}",
    "4:  mov al, [rsi]",
    "    out dx, al",
    "    inc rsi",
    "    dec ecx",
    "    jnz 4b",
    "    mov eax, {too_many}",
    "    out 0xf4, eax",
    "3:  hlt",
    "    jmp 3b",
    ".size _start, . - _start",
    max_cpus = const MAX_CPUS,
    stacks = sym KERNEL_STACKS,
    shift = const STACK_SHIFT,
    start = sym runtime_start,
    too_many = const status::TOO_MANY_VCPUS,
    com1 = const hypercall::ports::SERIAL_COM1,
    message = sym TOO_MANY_MESSAGE,
    message_len = const TOO_MANY_MESSAGE.len(),
);

#[cfg(not(test))]
unsafe extern "Rust" {
    /// The image's main function, defined by [`entry!`](crate::entry).
    fn __guest_main(boot: Boot) -> !;
}

#[cfg(not(test))]
/// First Rust code on every vCPU (called by `_start` on the vCPU's own stack).
extern "sysv64" fn runtime_start(info: *const BootInfo, vcpu: u64) -> ! {
    // SAFETY: the boot contract puts a BootInfo at `info`, identity-mapped, written by the
    // VMM before any vCPU ran and never changed afterwards.
    let info: &'static BootInfo = unsafe { &*info };
    if info.magic != BOOT_MAGIC || info.version != BOOT_VERSION {
        port::exit(status::BAD_BOOT_INFO);
    }
    let vcpu = vcpu as u32;
    cpu::init(vcpu);
    // SAFETY: `entry!` defines `__guest_main` with exactly this signature.
    unsafe { __guest_main(Boot { info, vcpu }) }
}

/// Declares the image's main function: `fn main(boot: Boot) -> !`, run on every vCPU after
/// the runtime has set up its stack, GDT, TSS and IDT.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn __guest_main(boot: $crate::Boot) -> ! {
            let main: fn($crate::Boot) -> ! = $main;
            main(boot)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::parse_u64;

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"12"), Some(12));
        assert_eq!(parse_u64(b"0x1f"), Some(31));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn bad_numbers_are_rejected() {
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"0x"), None);
        assert_eq!(parse_u64(b"12a"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"0x10000000000000000"), None);
    }
}
