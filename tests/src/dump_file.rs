//! Reading dump files back: the guest RAM bytes a LiME, ELF core or raw dump holds, and
//! the registers of an ELF core's notes.

use kvmi_dump::Format;
use object::Endianness;
use object::read::elf::{ElfFile64, ProgramHeader as _};

/// The RAM bytes of a dump file, by format.
pub fn ram_of(format: Format, file: &[u8], ram_size: u64) -> Vec<u8> {
    match format {
        Format::Raw => file.to_vec(),
        Format::Lime => {
            assert_eq!(file.len() as u64, 32 + ram_size);
            assert_eq!(&file[0..4], &0x4C69_4D45u32.to_le_bytes());
            assert_eq!(
                u64::from_le_bytes(file[16..24].try_into().unwrap()),
                ram_size - 1
            );
            file[32..].to_vec()
        }
        Format::Elf => {
            let elf = ElfFile64::<Endianness>::parse(file).unwrap();
            let e = Endianness::Little;
            let loads: Vec<_> = elf
                .elf_program_headers()
                .iter()
                .filter(|p| p.p_type(e) == object::elf::PT_LOAD)
                .collect();
            assert_eq!(loads.len(), 1, "one RAM range, one PT_LOAD");
            assert_eq!(loads[0].p_paddr(e), 0);
            assert_eq!(loads[0].p_filesz(e), ram_size);
            let off = loads[0].p_offset(e) as usize;
            file[off..off + ram_size as usize].to_vec()
        }
    }
}

/// The rip of each NT_PRSTATUS note (pr_pid, rip).
pub fn prstatus_rips(file: &[u8]) -> Vec<(u32, u64)> {
    let elf = ElfFile64::<Endianness>::parse(file).unwrap();
    let e = Endianness::Little;
    let mut out = Vec::new();
    for p in elf.elf_program_headers() {
        if let Ok(Some(mut notes)) = p.notes(e, file) {
            while let Some(n) = notes.next().unwrap() {
                if n.name() == b"CORE" && n.n_type(e) == object::elf::NT_PRSTATUS {
                    let d = n.desc();
                    let rip = u64::from_le_bytes(d[112 + 16 * 8..][..8].try_into().unwrap());
                    out.push((u32::from_le_bytes(d[32..36].try_into().unwrap()), rip));
                }
            }
        }
    }
    out
}
