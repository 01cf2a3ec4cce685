//! The boot contract between the VMM (`host-shim`) and a freestanding guest image.
//!
//! # Image
//! A static ELF64 executable for `x86_64-unknown-none`, linked at its physical addresses
//! (virtual = physical), every loadable segment at or above [`IMAGE_MIN_ADDR`]. The VMM loads
//! each `PT_LOAD` segment at its `p_paddr` and zero-fills its bss.
//!
//! # Entry state (every vCPU)
//! All vCPUs start at the ELF entry point at the same time, in 64-bit long mode at CPL0:
//! - `CR0 = PE | MP | ET | NE | WP | PG`, `CR4 = PAE | PGE`, `EFER = SCE | LME | LMA | NXE`;
//! - `CR3` = [`BOOT_PML4`]: an identity map of the first [`IDENTITY_MAP_BYTES`] of physical
//!   address space with 2 MiB pages, supervisor-only, read/write, executable;
//! - the GDT at [`BOOT_GDT`] holds [`GDT_ENTRIES`] entries: null, [`SEL_KERNEL_CODE`] (64-bit
//!   code, DPL0), [`SEL_KERNEL_DATA`] (data, DPL0); CS/DS/ES/FS/GS/SS are loaded from them;
//! - no IDT is loaded (limit 0): the guest must install its own before it can take exceptions;
//! - `RFLAGS = 0x2` (interrupts off), `RDI` = the guest-physical address of the [`BootInfo`]
//!   record ([`BOOT_INFO_ADDR`]), `RSI` = the vCPU index (0-based), `RSP = 0`: the guest sets up
//!   its own stacks before its first push.
//!
//! # Memory
//! Guest RAM starts at physical address 0 and is zero-filled at boot. The VMM owns
//! `0..IMAGE_MIN_ADDR` (boot structures); everything from the end of the image to the end of
//! RAM is free for the guest. On PVM hosts guest CPL0 code is emulated (slow): guests should
//! rely on zeroed RAM instead of clearing it.

#[cfg(test)]
use zerocopy::FromZeros;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Guest-physical address of the boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// Number of 8-byte descriptors in the boot GDT.
pub const GDT_ENTRIES: usize = 3;
/// Selector of the 64-bit kernel code segment in the boot GDT.
pub const SEL_KERNEL_CODE: u16 = 0x08;
/// Selector of the kernel data segment in the boot GDT.
pub const SEL_KERNEL_DATA: u16 = 0x10;
/// Guest-physical address of the [`BootInfo`] record.
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// Guest-physical address of the boot PML4 (the PDPT and page directories follow it).
pub const BOOT_PML4: u64 = 0x9000;
/// Bytes of physical address space identity-mapped at entry (4 GiB).
pub const IDENTITY_MAP_BYTES: u64 = 4 << 30;
/// Lowest address an image segment may be loaded at; below it is the VMM's.
pub const IMAGE_MIN_ADDR: u64 = 0x10_0000;
/// Maximum length of the command line in [`BootInfo::cmdline`], including its NUL.
pub const CMDLINE_MAX: usize = 256;
/// [`BootInfo::magic`]: "KVMIBOOT" in little-endian byte order.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"KVMIBOOT");
/// [`BootInfo::version`] of this layout (2: the target directory fields were added).
pub const BOOT_VERSION: u32 = 2;

/// The record the VMM writes at [`BOOT_INFO_ADDR`] before the first vCPU runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BootInfo {
    /// Always [`BOOT_MAGIC`].
    pub magic: u64,
    /// Layout version, [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs started at the entry point.
    pub vcpu_count: u32,
    /// Bytes of guest RAM, starting at physical address 0.
    pub ram_size: u64,
    /// Physical address one past the highest byte of the loaded image.
    pub image_end: u64,
    /// Guest-physical base of the appliance ring region, 0 when none is mapped.
    pub ring_region_gpa: u64,
    /// Size of the ring region in bytes, 0 when none is mapped.
    pub ring_region_size: u64,
    /// Guest-physical base of the map window, 0 when none is reserved.
    pub map_window_gpa: u64,
    /// Size of the map window in bytes, 0 when none is reserved.
    pub map_window_size: u64,
    /// Length of the command line in bytes, without the NUL.
    pub cmdline_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The command line (`key=value` words separated by spaces), NUL-terminated.
    pub cmdline: [u8; CMDLINE_MAX],
    /// Guest-physical base of the appliance's target directory (see
    /// [`crate::directory`]), 0 when there is none (a guest that is not an appliance).
    pub directory_gpa: u64,
    /// Size of the target directory region in bytes, 0 when there is none.
    pub directory_size: u64,
}

const _: () = {
    assert!(core::mem::size_of::<BootInfo>() == 344);
    assert!(core::mem::offset_of!(BootInfo, directory_gpa) == 328);
    assert!(core::mem::offset_of!(BootInfo, ram_size) == 16);
    assert!(core::mem::offset_of!(BootInfo, ring_region_gpa) == 32);
    assert!(core::mem::offset_of!(BootInfo, cmdline_len) == 64);
    assert!(core::mem::offset_of!(BootInfo, cmdline) == 72);
    assert!(BOOT_INFO_ADDR + core::mem::size_of::<BootInfo>() as u64 <= BOOT_PML4);
};

impl BootInfo {
    /// The command line as bytes (without its NUL), clamped to the buffer.
    pub fn cmdline_bytes(&self) -> &[u8] {
        let len = (self.cmdline_len as usize).min(CMDLINE_MAX);
        &self.cmdline[..len]
    }

    /// The value of `key=value` on the command line, if present.
    pub fn cmdline_value(&self, key: &str) -> Option<&[u8]> {
        cmdline_value(self.cmdline_bytes(), key)
    }
}

/// Looks up `key=value` in a space-separated command line.
pub fn cmdline_value<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    cmdline.split(|&b| b == b' ').find_map(|word| {
        let rest = word.strip_prefix(key.as_bytes())?;
        rest.strip_prefix(b"=")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lookup_finds_exact_keys_only() {
        let line = b"mode=triple-fault rounds=12 roundsx=3";
        assert_eq!(cmdline_value(line, "rounds"), Some(&b"12"[..]));
        assert_eq!(cmdline_value(line, "mode"), Some(&b"triple-fault"[..]));
        assert_eq!(cmdline_value(line, "round"), None);
        assert_eq!(cmdline_value(line, "missing"), None);
    }

    #[test]
    fn cmdline_len_is_clamped() {
        let mut info = BootInfo::new_zeroed();
        info.cmdline_len = 10_000;
        assert_eq!(info.cmdline_bytes().len(), CMDLINE_MAX);
    }
}
