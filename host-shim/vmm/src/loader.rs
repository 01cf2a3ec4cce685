//! Loads a guest image (static ELF64, linked at its physical addresses) into guest RAM.
//!
//! The program headers are validated here first (every `PT_LOAD` at or above
//! `IMAGE_MIN_ADDR`, inside RAM, `filesz <= memsz`, the entry inside a loaded segment), then
//! linux-loader copies the segments. bss needs no clearing: RAM is a fresh, zeroed memfd.

use std::io::Cursor;

use hypercall::boot::IMAGE_MIN_ADDR;
use linux_loader::loader::{Elf, KernelLoader};
use object::elf::{EM_X86_64, PT_LOAD};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object};
use vm_memory::GuestAddress;

use crate::error::VmError;
use crate::memory::GuestRam;

/// What the loader placed in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point (guest-physical = virtual).
    pub entry: u64,
    /// Lowest loaded address.
    pub start: u64,
    /// One past the highest byte of any loaded segment (including bss).
    pub end: u64,
}

/// Checks `image` against the boot contract for a RAM of `ram_size` bytes, without loading.
pub fn validate_image(image: &[u8], ram_size: u64) -> Result<LoadedImage, VmError> {
    let bad = |m: String| VmError::Image(m);
    let elf = ElfFile64::<Endianness>::parse(image).map_err(|e| bad(format!("not ELF64: {e}")))?;
    let endian = elf.endian();
    let header = elf.elf_header();
    if header.e_machine(endian) != EM_X86_64 {
        return Err(bad("not an x86-64 image".into()));
    }
    let entry = elf.entry();
    let mut start = u64::MAX;
    let mut end = 0u64;
    let mut entry_ok = false;
    for ph in elf.elf_program_headers() {
        if ph.p_type(endian) != PT_LOAD {
            continue;
        }
        let paddr = ph.p_paddr(endian);
        let memsz = ph.p_memsz(endian);
        let filesz = ph.p_filesz(endian);
        if memsz == 0 {
            continue;
        }
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad(format!("segment at {paddr:#x} overflows")))?;
        if paddr < IMAGE_MIN_ADDR {
            return Err(bad(format!(
                "segment at {paddr:#x} lies below {IMAGE_MIN_ADDR:#x} (reserved for the VMM)"
            )));
        }
        if seg_end > ram_size {
            return Err(bad(format!(
                "segment {paddr:#x}..{seg_end:#x} does not fit in {ram_size:#x} bytes of RAM"
            )));
        }
        if filesz > memsz {
            return Err(bad(format!("segment at {paddr:#x} has filesz > memsz")));
        }
        if (paddr..seg_end).contains(&entry) {
            entry_ok = true;
        }
        start = start.min(paddr);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(bad("no loadable segment".into()));
    }
    if !entry_ok {
        return Err(bad(format!(
            "entry {entry:#x} is not inside a loaded segment"
        )));
    }
    Ok(LoadedImage { entry, start, end })
}

/// Validates `image` and copies its segments into `ram` at their physical addresses.
pub fn load_image(ram: &GuestRam, image: &[u8]) -> Result<LoadedImage, VmError> {
    let loaded = validate_image(image, ram.size())?;
    let mut reader = Cursor::new(image);
    Elf::load(
        ram.memory(),
        None,
        &mut reader,
        Some(GuestAddress(IMAGE_MIN_ADDR)),
    )
    .map_err(|e| VmError::Image(format!("ELF load failed: {e}")))?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_rejected_with_a_clear_error() {
        let err = validate_image(b"\x7fELF but not really", 1 << 26).unwrap_err();
        assert!(err.to_string().contains("bad guest image"), "{err}");
        assert!(validate_image(&[], 1 << 26).is_err());
    }
}
