//! Per-vCPU CPU state: the GDT (shared, one TSS slot per vCPU), each vCPU's TSS and per-CPU
//! block (reached through `GS` at CPL0), the MSRs for `syscall`, and small CPU helpers.
//!
//! GDT layout (selectors): `0x08` kernel code, `0x10` kernel data, `0x1b` user data,
//! `0x23` user code (the order `sysret` needs), then a 16-byte TSS descriptor per vCPU from
//! `0x28`.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::{MAX_CPUS, entry, trap};

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x18 | 3;
/// User code selector (RPL 3).
pub const USER_CS: u16 = 0x20 | 3;
const TSS_BASE_SELECTOR: u16 = 0x28;
const GDT_LEN: usize = 5 + 2 * MAX_CPUS;

/// MSR numbers used by the runtime (and images).
pub mod msr {
    /// `EFER`.
    pub const EFER: u32 = 0xc000_0080;
    /// `STAR`: `syscall`/`sysret` selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// `LSTAR`: 64-bit `syscall` entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// `SFMASK`: RFLAGS bits cleared on `syscall`.
    pub const SFMASK: u32 = 0xc000_0084;
    /// `FS_BASE`.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// `GS_BASE` (the per-CPU block while in the kernel).
    pub const GS_BASE: u32 = 0xc000_0101;
    /// `KERNEL_GS_BASE` (the user's GS base while in the kernel; swapped by `swapgs`).
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// Ports covered by the TSS I/O permission bitmap (higher ports are always denied at CPL3).
const IO_BITMAP_PORTS: usize = 0x400;
const IO_BITMAP_BYTES: usize = IO_BITMAP_PORTS / 8 + 1; // + the all-ones terminator byte

/// Ports CPL3 code may use directly: COM1, the debug exit and the hypercall doorbell. A
/// 32-bit access checks the bits of all four ports it touches, hence the length 4.
const USER_PORTS: [(u16, u16); 3] = [
    (
        hypercall::ports::SERIAL_COM1,
        hypercall::ports::SERIAL_COM1_LEN,
    ),
    (hypercall::ports::DEBUG_EXIT, 4),
    (hypercall::ports::HYPERCALL_DOORBELL, 4),
];

/// The I/O permission bitmap (bit set = denied), computed at compile time.
const fn io_bitmap() -> [u8; IO_BITMAP_BYTES] {
    let mut bitmap = [0xffu8; IO_BITMAP_BYTES];
    let mut i = 0;
    while i < USER_PORTS.len() {
        let (first, len) = USER_PORTS[i];
        let mut port = first as usize;
        while port < first as usize + len as usize {
            bitmap[port / 8] &= !(1 << (port % 8));
            port += 1;
        }
        i += 1;
    }
    bitmap
}

/// The 64-bit task-state segment: RSP0 (the stack for traps from CPL3) and an I/O
/// permission bitmap that lets CPL3 use the VMM's ports (PVM hosts drop the IOPL bits of
/// RFLAGS when entering CPL3, so IOPL 3 alone does not give CPL3 port access there).
#[repr(C, packed(4))]
pub struct Tss {
    reserved0: u32,
    /// Stack pointer loaded on a trap from CPL3.
    pub rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    io_bitmap: [u8; IO_BITMAP_BYTES],
}

const TSS_HEADER: usize = 104;
const _: () = assert!(core::mem::offset_of!(Tss, io_bitmap) == TSS_HEADER);

/// Per-vCPU block; `GS_BASE` points at it while in the kernel. Field offsets are used by the
/// trap assembly (see [`trap`](crate::trap)).
#[repr(C)]
pub struct PerCpu {
    /// Kernel stack pointer saved by `run_user` (offset 0).
    pub kernel_rsp: u64,
    /// End of the running user context (offset 8): traps push the user frame below it.
    pub ctx_end: u64,
    /// Scratch slot for the user RSP on `syscall` (offset 16).
    pub scratch: u64,
    /// This vCPU's index (offset 24).
    pub vcpu: u64,
    /// Address of this vCPU's TSS (offset 32).
    pub tss: u64,
}

#[repr(C, align(16))]
struct Gdt([u64; GDT_LEN]);

static mut GDT: Gdt = {
    let mut gdt = [0u64; GDT_LEN];
    gdt[1] = 0x00af_9b00_0000_ffff; // kernel code: 64-bit, DPL0
    gdt[2] = 0x00cf_9300_0000_ffff; // kernel data
    gdt[3] = 0x00cf_f300_0000_ffff; // user data, DPL3
    gdt[4] = 0x00af_fb00_0000_ffff; // user code: 64-bit, DPL3
    Gdt(gdt)
};

static mut TSS: [Tss; MAX_CPUS] = [const {
    Tss {
        reserved0: 0,
        rsp0: 0,
        rsp1: 0,
        rsp2: 0,
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: TSS_HEADER as u16,
        io_bitmap: io_bitmap(),
    }
}; MAX_CPUS];

static mut PER_CPU: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        kernel_rsp: 0,
        ctx_end: 0,
        scratch: 0,
        vcpu: 0,
        tss: 0,
    }
}; MAX_CPUS];

static IDT_READY: AtomicBool = AtomicBool::new(false);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Sets up this vCPU's descriptor tables, per-CPU block and `syscall` MSRs (called once per
/// vCPU by the runtime before the image's `main`).
pub(crate) fn init(vcpu: u32) {
    let index = vcpu as usize;
    // SAFETY: each vCPU touches only its own TSS, per-CPU block and GDT slot (indexed by its
    // unique vCPU index < MAX_CPUS, checked by `_start`); the IDT is written once, by vCPU 0,
    // before IDT_READY is released.
    unsafe {
        let tss = &raw mut TSS[index];
        (*tss).rsp0 = entry::kernel_stack_top(vcpu);
        let per_cpu = &raw mut PER_CPU[index];
        (*per_cpu).vcpu = vcpu as u64;
        (*per_cpu).tss = tss as u64;

        let base = tss as u64;
        let limit = (TSS_HEADER + IO_BITMAP_BYTES - 1) as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, 64-bit available TSS
            | (((base >> 24) & 0xff) << 56);
        let slot = 5 + 2 * index;
        let gdt = &raw mut GDT;
        (*gdt).0[slot] = low;
        (*gdt).0[slot + 1] = base >> 32;

        let gdt_ptr = DescriptorPointer {
            limit: (GDT_LEN * 8 - 1) as u16,
            base: gdt as u64,
        };
        core::arch::asm!("lgdt [{}]", in(reg) &gdt_ptr, options(readonly, nostack, preserves_flags));
        let selector = TSS_BASE_SELECTOR + 16 * index as u16;
        core::arch::asm!("ltr {0:x}", in(reg) selector, options(nomem, nostack, preserves_flags));

        write_msr(msr::GS_BASE, per_cpu as u64);
        write_msr(msr::KERNEL_GS_BASE, 0);
        write_msr(
            msr::STAR,
            ((KERNEL_DS as u64) << 48) | ((KERNEL_CS as u64) << 32),
        );
        write_msr(msr::LSTAR, trap::syscall_entry_address());
        write_msr(msr::SFMASK, 0x4_4700); // AC, NT, DF, IF, TF
    }
    if vcpu == 0 {
        trap::build_idt();
        IDT_READY.store(true, Ordering::Release);
    } else {
        while !IDT_READY.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    trap::load_idt();
}

/// Writes a model-specific register (CPL0 only).
///
/// # Safety
/// The caller must ensure the write keeps the CPU state the runtime relies on intact
/// (e.g. not changing `GS_BASE`, `LSTAR`, `STAR` or `EFER`).
#[inline(always)]
pub unsafe fn write_msr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags));
    }
}

/// Reads a model-specific register (CPL0 only).
#[inline(always)]
pub fn read_msr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reading an MSR has no side effects on memory; an unknown MSR raises #GP, which
    // the exception handler reports.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags));
    }
    ((high as u64) << 32) | low as u64
}

/// Reads CR2 (the faulting address of the last page fault).
#[inline(always)]
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads CR3 (the current page-table root).
#[inline(always)]
pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Loads CR3 (switches address space and flushes non-global TLB entries).
///
/// # Safety
/// `root` must be the physical address of a valid PML4 that maps the running kernel code,
/// its stack and data at their current addresses.
#[inline(always)]
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(bitmap: &[u8], port: usize) -> bool {
        bitmap[port / 8] & (1 << (port % 8)) == 0
    }

    #[test]
    fn io_bitmap_allows_exactly_the_user_ports() {
        let bitmap = io_bitmap();
        let expected = |port: usize| {
            (0x3f8..0x400).contains(&port)
                || (0xf4..0xf8).contains(&port)
                || (0xe4..0xe8).contains(&port)
        };
        for port in 0..IO_BITMAP_PORTS {
            assert_eq!(allowed(&bitmap, port), expected(port), "port {port:#x}");
        }
        assert_eq!(bitmap[IO_BITMAP_BYTES - 1], 0xff, "terminator byte");
    }

    #[test]
    fn tss_descriptor_limit_covers_the_bitmap() {
        // The descriptor's limit is TSS_HEADER + IO_BITMAP_BYTES - 1; the struct holds it all.
        assert!(core::mem::size_of::<Tss>() >= TSS_HEADER + IO_BITMAP_BYTES);
    }
}
