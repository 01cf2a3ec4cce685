//! The boot state of the contract in `hypercall::boot`: GDT, identity page tables, BootInfo and
//! the register state every vCPU starts with.

use hypercall::boot::{
    BOOT_GDT, BOOT_INFO_ADDR, BOOT_MAGIC, BOOT_PML4, BOOT_VERSION, BootInfo, CMDLINE_MAX,
    IDENTITY_MAP_BYTES, SEL_KERNEL_CODE, SEL_KERNEL_DATA,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use zerocopy::{FromZeros, IntoBytes};

use crate::error::VmError;
use crate::memory::GuestRam;

/// 64-bit code, DPL0, present, long mode (L=1), granularity 4 KiB.
const GDT_CODE: u64 = 0x00af_9b00_0000_ffff;
/// Data, DPL0, present, writable, 32-bit default size, granularity 4 KiB.
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PGE: u64 = 1 << 7;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Entry CR0 of the boot contract.
pub const BOOT_CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
/// Entry CR4 of the boot contract.
pub const BOOT_CR4: u64 = CR4_PAE | CR4_PGE;
/// Entry EFER of the boot contract.
pub const BOOT_EFER: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 << 20;

/// Number of page directories for the identity map (one per GiB).
const PAGE_DIRS: u64 = IDENTITY_MAP_BYTES >> 30;
/// First byte after the boot page tables (PML4, PDPT, page directories).
pub const BOOT_TABLES_END: u64 = BOOT_PML4 + (2 + PAGE_DIRS) * 0x1000;

/// Writes the boot GDT and the identity page tables into RAM (needs RAM ≥ [`BOOT_TABLES_END`]).
pub fn write_boot_tables(ram: &GuestRam) -> Result<(), VmError> {
    if ram.size() < BOOT_TABLES_END {
        return Err(VmError::Config(format!(
            "guest RAM {:#x} is too small for the boot tables (need {BOOT_TABLES_END:#x})",
            ram.size()
        )));
    }
    let gdt: [u64; 3] = [0, GDT_CODE, GDT_DATA];
    ram.write(BOOT_GDT, gdt.as_bytes())?;

    let pdpt = BOOT_PML4 + 0x1000;
    let first_pd = pdpt + 0x1000;
    let mut pml4 = [0u64; 512];
    pml4[0] = pdpt | PTE_PRESENT | PTE_WRITE;
    ram.write(BOOT_PML4, pml4.as_bytes())?;
    let mut pdpt_entries = [0u64; 512];
    for (i, e) in pdpt_entries.iter_mut().take(PAGE_DIRS as usize).enumerate() {
        *e = (first_pd + i as u64 * 0x1000) | PTE_PRESENT | PTE_WRITE;
    }
    ram.write(pdpt, pdpt_entries.as_bytes())?;
    for dir in 0..PAGE_DIRS {
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            let phys = (dir * 512 + i as u64) * TWO_MIB;
            *e = phys | PTE_PRESENT | PTE_WRITE | PTE_HUGE;
        }
        ram.write(first_pd + dir * 0x1000, pd.as_bytes())?;
    }
    Ok(())
}

/// Builds the [`BootInfo`] record and writes it at `BOOT_INFO_ADDR`.
pub fn write_boot_info(
    ram: &GuestRam,
    vcpu_count: u32,
    image_end: u64,
    cmdline: &str,
) -> Result<BootInfo, VmError> {
    let bytes = cmdline.as_bytes();
    if bytes.len() >= CMDLINE_MAX || bytes.contains(&0) {
        return Err(VmError::Config(format!(
            "command line must be under {CMDLINE_MAX} bytes and contain no NUL"
        )));
    }
    let mut info = BootInfo::new_zeroed();
    info.magic = BOOT_MAGIC;
    info.version = BOOT_VERSION;
    info.vcpu_count = vcpu_count;
    info.ram_size = ram.size();
    info.image_end = image_end;
    info.cmdline_len = bytes.len() as u32;
    info.cmdline[..bytes.len()].copy_from_slice(bytes);
    ram.write(BOOT_INFO_ADDR, info.as_bytes())?;
    Ok(info)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Applies the contract's system state (long mode, GDT, segments, CR0/CR3/CR4/EFER) to `sregs`
/// (start from the vCPU's current sregs so the other fields keep KVM's reset values).
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(SEL_KERNEL_CODE, true);
    let data = segment(SEL_KERNEL_DATA, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (hypercall::boot::GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = BOOT_CR0;
    sregs.cr3 = BOOT_PML4;
    sregs.cr4 = BOOT_CR4;
    sregs.efer = BOOT_EFER;
    sregs
}

/// The contract's general-purpose register state for vCPU `index` entering at `entry`.
pub fn boot_regs(entry: u64, index: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: 0x2,
        rdi: BOOT_INFO_ADDR,
        rsi: u64::from(index),
        rsp: 0,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_below_the_image() {
        const { assert!(BOOT_TABLES_END <= hypercall::boot::IMAGE_MIN_ADDR) };
        assert_eq!(BOOT_TABLES_END, 0xf000);
    }

    #[test]
    fn control_registers_match_the_contract() {
        assert_eq!(BOOT_CR0, 0x8001_0033);
        assert_eq!(BOOT_CR4, 0xa0);
        assert_eq!(BOOT_EFER, 0xd01);
    }
}
