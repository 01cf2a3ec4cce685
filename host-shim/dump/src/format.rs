//! The file layouts: where each guest-physical range and each metadata byte lands in the file.
//!
//! Pure code (no I/O): a [`Layout`] is a list of pieces — metadata bytes (LiME headers, the
//! ELF header, program headers and notes) and RAM ranges at file offsets — from which the
//! writer assembles any file range. ELF and raw keep RAM data at page-aligned file offsets, so
//! O_DIRECT can write it straight from the mapped guest memory; LiME's 32-byte headers shift
//! its data, which is then staged through aligned buffers.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vmm::kick::VcpuState;

use crate::Format;

/// File alignment of RAM data where the format allows it (and of O_DIRECT writes).
pub const ALIGN: u64 = 4096;

/// LiME's header magic ("EMiL" little-endian).
pub const LIME_MAGIC: u32 = 0x4C69_4D45;
/// LiME's header version.
pub const LIME_VERSION: u32 = 1;
/// Size of one LiME range header.
pub const LIME_HEADER: u64 = 32;

/// Size of `struct elf_prstatus` on x86_64.
pub const PRSTATUS_SIZE: usize = 336;
/// Offset of `pr_reg` in `struct elf_prstatus`.
pub const PRSTATUS_REG_OFFSET: usize = 112;
/// Offset of `pr_pid` in `struct elf_prstatus`.
pub const PRSTATUS_PID_OFFSET: usize = 32;
/// Size of QEMU's `QEMUCPUState` (version 1).
pub const QEMU_CPU_STATE_SIZE: usize = 440;
/// `NT_PRSTATUS`.
pub const NT_PRSTATUS: u32 = 1;

const ELF_HEADER: u64 = 64;
const PHDR: u64 = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// One part of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Metadata bytes at a file offset.
    Bytes {
        /// File offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `len` bytes of guest RAM from `gpa`, at file offset `offset`.
    Ram {
        /// File offset.
        offset: u64,
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl Piece {
    /// The file range the piece covers.
    pub fn file_range(&self) -> (u64, u64) {
        match self {
            Piece::Bytes { offset, data } => (*offset, offset + data.len() as u64),
            Piece::Ram { offset, len, .. } => (*offset, offset + len),
        }
    }
}

/// Why a layout cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A range is empty, unaligned, overlaps the previous one or is out of order.
    #[error("RAM range {start:#x}+{len:#x} is empty, not page-aligned or out of order")]
    BadRange {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// Too many ranges for the format's header fields.
    #[error("{0} RAM ranges are more than the format can describe")]
    TooManyRanges(usize),
}

/// Where everything lands in a dump file of one format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The pieces, in file order (they never overlap).
    pub pieces: Vec<Piece>,
    /// The file's size.
    pub file_size: u64,
    /// File bytes before the first RAM byte (headers, notes; rewritten after a pause).
    pub metadata_end: u64,
}

impl Layout {
    /// The layout of `format` for guest RAM `ranges` (`(gpa, len)`, page-aligned, ascending)
    /// and, for ELF, one register note per entry of `vcpus` (zeros where `None`).
    pub fn new(
        format: Format,
        ranges: &[(u64, u64)],
        vcpus: &[Option<VcpuState>],
    ) -> Result<Layout, LayoutError> {
        let mut prev_end = 0;
        for &(start, len) in ranges {
            if len == 0
                || !start.is_multiple_of(ALIGN)
                || !len.is_multiple_of(ALIGN)
                || start < prev_end
                || start.checked_add(len).is_none()
            {
                return Err(LayoutError::BadRange { start, len });
            }
            prev_end = start + len;
        }
        let mut pieces = Vec::new();
        let file_size;
        let metadata_end;
        match format {
            Format::Raw => {
                for &(gpa, len) in ranges {
                    pieces.push(Piece::Ram {
                        offset: gpa,
                        gpa,
                        len,
                    });
                }
                file_size = prev_end;
                metadata_end = 0;
            }
            Format::Lime => {
                let mut off = 0;
                for &(gpa, len) in ranges {
                    pieces.push(Piece::Bytes {
                        offset: off,
                        data: lime_header(gpa, gpa + len - 1).to_vec(),
                    });
                    pieces.push(Piece::Ram {
                        offset: off + LIME_HEADER,
                        gpa,
                        len,
                    });
                    off += LIME_HEADER + len;
                }
                file_size = off;
                metadata_end = LIME_HEADER;
            }
            Format::Elf => {
                let phnum = ranges.len() + 1;
                if phnum >= 0xffff {
                    return Err(LayoutError::TooManyRanges(ranges.len()));
                }
                let notes = elf_notes(vcpus);
                let notes_off = ELF_HEADER + PHDR * phnum as u64;
                let data_off = (notes_off + notes.len() as u64).next_multiple_of(ALIGN);
                let mut head = Vec::with_capacity(notes_off as usize + notes.len());
                head.extend_from_slice(&elf_header(phnum as u16));
                head.extend_from_slice(&phdr(PT_NOTE, 0, notes_off, 0, notes.len() as u64, 0));
                let mut off = data_off;
                for &(gpa, len) in ranges {
                    head.extend_from_slice(&phdr(PT_LOAD, 7, off, gpa, len, 0));
                    pieces.push(Piece::Ram {
                        offset: off,
                        gpa,
                        len,
                    });
                    off += len;
                }
                head.extend_from_slice(&notes);
                pieces.insert(
                    0,
                    Piece::Bytes {
                        offset: 0,
                        data: head,
                    },
                );
                file_size = off;
                metadata_end = data_off;
            }
        }
        Ok(Layout {
            pieces,
            file_size,
            metadata_end,
        })
    }

    /// The file ranges holding guest bytes `gpa..gpa+len` (clipped to the RAM pieces).
    pub fn file_ranges_of(&self, gpa: u64, len: u64) -> Vec<(u64, u64)> {
        let end = gpa.saturating_add(len);
        self.pieces
            .iter()
            .filter_map(|p| match *p {
                Piece::Ram {
                    offset,
                    gpa: g,
                    len: l,
                } => {
                    let (s, e) = (gpa.max(g), end.min(g + l));
                    (s < e).then(|| (offset + (s - g), offset + (e - g)))
                }
                Piece::Bytes { .. } => None,
            })
            .collect()
    }
}

/// One LiME range header: magic, version, start, inclusive end, 8 reserved bytes.
pub fn lime_header(start: u64, end_inclusive: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&LIME_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&LIME_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&start.to_le_bytes());
    h[16..24].copy_from_slice(&end_inclusive.to_le_bytes());
    h
}

fn elf_header(phnum: u16) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // ELFCLASS64
    h[5] = 1; // ELFDATA2LSB
    h[6] = 1; // EV_CURRENT
    h[16..18].copy_from_slice(&4u16.to_le_bytes()); // ET_CORE
    h[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    h[20..24].copy_from_slice(&1u32.to_le_bytes()); // e_version
    h[32..40].copy_from_slice(&ELF_HEADER.to_le_bytes()); // e_phoff
    h[52..54].copy_from_slice(&(ELF_HEADER as u16).to_le_bytes()); // e_ehsize
    h[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    h[56..58].copy_from_slice(&phnum.to_le_bytes());
    h
}

fn phdr(kind: u32, flags: u32, offset: u64, paddr: u64, size: u64, vaddr: u64) -> [u8; 56] {
    let mut p = [0u8; 56];
    p[0..4].copy_from_slice(&kind.to_le_bytes());
    p[4..8].copy_from_slice(&flags.to_le_bytes());
    p[8..16].copy_from_slice(&offset.to_le_bytes());
    p[16..24].copy_from_slice(&vaddr.to_le_bytes());
    p[24..32].copy_from_slice(&paddr.to_le_bytes());
    p[32..40].copy_from_slice(&size.to_le_bytes()); // p_filesz
    p[40..48].copy_from_slice(&size.to_le_bytes()); // p_memsz
    let align = if kind == PT_LOAD { ALIGN } else { 0 };
    p[48..56].copy_from_slice(&align.to_le_bytes());
    p
}

/// One ELF note: namesz, descsz, type, name padded to 4, desc padded to 4.
fn note(out: &mut Vec<u8>, name: &[u8], kind: u32, desc: &[u8]) {
    out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    let start = out.len();
    out.extend_from_slice(name);
    out.push(0);
    out.resize(start + (name.len() + 1).next_multiple_of(4), 0);
    let start = out.len();
    out.extend_from_slice(desc);
    out.resize(start + desc.len().next_multiple_of(4), 0);
}

/// The PT_NOTE contents: an `NT_PRSTATUS` "CORE" note per vCPU, then a "QEMU" note per vCPU
/// (the order QEMU's `dump-guest-memory` writes).
pub fn elf_notes(vcpus: &[Option<VcpuState>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, s) in vcpus.iter().enumerate() {
        note(
            &mut out,
            b"CORE",
            NT_PRSTATUS,
            &prstatus(i as u32, &s.unwrap_or_default()),
        );
    }
    for s in vcpus {
        note(
            &mut out,
            b"QEMU",
            0,
            &qemu_cpu_state(&s.unwrap_or_default()),
        );
    }
    out
}

/// `struct elf_prstatus` (x86_64) for vCPU `index`: pr_pid = index + 1, pr_reg in
/// `user_regs_struct` order (orig_rax = rax, as QEMU writes it).
pub fn prstatus(index: u32, s: &VcpuState) -> [u8; PRSTATUS_SIZE] {
    let mut p = [0u8; PRSTATUS_SIZE];
    p[PRSTATUS_PID_OFFSET..PRSTATUS_PID_OFFSET + 4].copy_from_slice(&(index + 1).to_le_bytes());
    let (r, sr) = (&s.regs, &s.sregs);
    let regs = [
        r.r15,
        r.r14,
        r.r13,
        r.r12,
        r.rbp,
        r.rbx,
        r.r11,
        r.r10,
        r.r9,
        r.r8,
        r.rax,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rax, // orig_rax
        r.rip,
        u64::from(sr.cs.selector),
        r.rflags,
        r.rsp,
        u64::from(sr.ss.selector),
        sr.fs.base,
        sr.gs.base,
        u64::from(sr.ds.selector),
        u64::from(sr.es.selector),
        u64::from(sr.fs.selector),
        u64::from(sr.gs.selector),
    ];
    for (i, v) in regs.iter().enumerate() {
        let at = PRSTATUS_REG_OFFSET + i * 8;
        p[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    p
}

/// QEMU's segment flags: the descriptor's attribute bits where they sit in its high dword.
fn qemu_seg_flags(s: &kvm_segment) -> u32 {
    u32::from(s.type_) << 8
        | u32::from(s.s) << 12
        | u32::from(s.dpl) << 13
        | u32::from(s.present) << 15
        | u32::from(s.avl) << 20
        | u32::from(s.l) << 21
        | u32::from(s.db) << 22
        | u32::from(s.g) << 23
}

/// `QEMUCPUState` version 1 (what `crash` and Volatility read from a QEMU dump).
/// `kernel_gs_base` is 0: it is an MSR, not in the registers captured at the pause.
pub fn qemu_cpu_state(s: &VcpuState) -> [u8; QEMU_CPU_STATE_SIZE] {
    let mut out = Vec::with_capacity(QEMU_CPU_STATE_SIZE);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(QEMU_CPU_STATE_SIZE as u32).to_le_bytes());
    let r = &s.regs;
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let sr: &kvm_sregs = &s.sregs;
    let mut seg = |selector: u16, limit: u32, flags: u32, base: u64| {
        out.extend_from_slice(&u32::from(selector).to_le_bytes());
        out.extend_from_slice(&limit.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&base.to_le_bytes());
    };
    for sg in [
        &sr.cs, &sr.ds, &sr.es, &sr.fs, &sr.gs, &sr.ss, &sr.ldt, &sr.tr,
    ] {
        seg(sg.selector, sg.limit, qemu_seg_flags(sg), sg.base);
    }
    seg(0, u32::from(sr.gdt.limit), 0, sr.gdt.base);
    seg(0, u32::from(sr.idt.limit), 0, sr.idt.base);
    for v in [sr.cr0, 0, sr.cr2, sr.cr3, sr.cr4, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut a = [0u8; QEMU_CPU_STATE_SIZE];
    a.copy_from_slice(&out);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::Endianness;
    use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};

    fn state(rip: u64) -> VcpuState {
        let mut s = VcpuState::default();
        s.regs.rip = rip;
        s.regs.rax = 0xaa;
        s.regs.r15 = 0xf15;
        s.regs.rsp = 0x5000;
        s.regs.rflags = 0x202;
        s.sregs.cs.selector = 0x08;
        s.sregs.cs.l = 1;
        s.sregs.cs.present = 1;
        s.sregs.cs.s = 1;
        s.sregs.cs.type_ = 11;
        s.sregs.ss.selector = 0x10;
        s.sregs.cr3 = 0x9000;
        s.sregs.gdt.base = 0x500;
        s.sregs.gdt.limit = 23;
        s
    }

    /// Builds the file a layout describes, with RAM byte `gpa` = `(gpa / 4096) as u8 ^ 0x5a`.
    fn render(l: &Layout) -> Vec<u8> {
        let mut f = vec![0u8; l.file_size as usize];
        for p in &l.pieces {
            match p {
                Piece::Bytes { offset, data } => {
                    f[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                Piece::Ram { offset, gpa, len } => {
                    for i in 0..*len {
                        f[(offset + i) as usize] = ((gpa + i) / 4096) as u8 ^ 0x5a;
                    }
                }
            }
        }
        f
    }

    #[test]
    fn lime_headers_carry_magic_version_and_inclusive_ends() {
        let ranges = [(0, 0x2000), (0x10000, 0x1000)];
        let l = Layout::new(Format::Lime, &ranges, &[]).unwrap();
        assert_eq!(l.file_size, 2 * 32 + 0x3000);
        let f = render(&l);
        let h = &f[0..32];
        assert_eq!(
            h[0..4],
            [0x45, 0x4d, 0x69, 0x4c],
            "0x4C694D45 little-endian"
        );
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), 0x1fff);
        assert_eq!(h[24..32], [0; 8]);
        assert_eq!(f[32], 0x5a, "page 0 data right after the header");
        assert_eq!(f[32 + 0x1000], 1 ^ 0x5a);
        let h2 = &f[32 + 0x2000..64 + 0x2000];
        assert_eq!(u64::from_le_bytes(h2[8..16].try_into().unwrap()), 0x10000);
        assert_eq!(u64::from_le_bytes(h2[16..24].try_into().unwrap()), 0x10fff);
        assert_eq!(f[64 + 0x2000], 0x10 ^ 0x5a);
        assert_eq!(
            l.file_ranges_of(0x10000, 0x1000),
            vec![(64 + 0x2000, 64 + 0x3000)]
        );
        assert_eq!(l.file_ranges_of(0x3000, 0x1000), vec![], "a hole");
    }

    #[test]
    fn raw_puts_each_byte_at_its_address_and_leaves_holes_zero() {
        let l = Layout::new(Format::Raw, &[(0x1000, 0x1000), (0x4000, 0x2000)], &[]).unwrap();
        assert_eq!(l.file_size, 0x6000);
        let f = render(&l);
        assert_eq!(f[0..0x1000], [0; 0x1000]);
        assert_eq!(f[0x1000], 1 ^ 0x5a);
        assert_eq!(f[0x2000..0x4000], [0; 0x2000]);
        assert_eq!(f[0x5fff], 5 ^ 0x5a);
        assert_eq!(
            l.file_ranges_of(0x1800, 0x4000),
            vec![(0x1800, 0x2000), (0x4000, 0x5800)]
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        for r in [
            [(0, 0)],
            [(0x10, 0x1000)],
            [(0, 0x1001)],
            [(u64::MAX - 0xfff, 0x2000)],
        ] {
            assert!(Layout::new(Format::Raw, &r, &[]).is_err(), "{r:?}");
        }
        let overlap = [(0x1000, 0x2000), (0x2000, 0x1000)];
        assert_eq!(
            Layout::new(Format::Elf, &overlap, &[]),
            Err(LayoutError::BadRange {
                start: 0x2000,
                len: 0x1000
            })
        );
    }

    #[test]
    fn elf_core_parses_with_notes_and_one_load_per_range() {
        let ranges = [(0, 0x3000), (0x100000, 0x2000)];
        let vcpus = [Some(state(0x1234)), None];
        let l = Layout::new(Format::Elf, &ranges, &vcpus).unwrap();
        assert!(l.metadata_end.is_multiple_of(4096));
        let f = render(&l);
        let elf = ElfFile64::<Endianness>::parse(&*f).unwrap();
        let hdr = elf.elf_header();
        let e = Endianness::Little;
        assert_eq!(hdr.e_type(e), object::elf::ET_CORE);
        assert_eq!(hdr.e_machine(e), object::elf::EM_X86_64);
        let phdrs = elf.elf_program_headers();
        assert_eq!(phdrs.len(), 3);
        assert_eq!(phdrs[0].p_type(e), object::elf::PT_NOTE);
        let loads: Vec<_> = phdrs[1..]
            .iter()
            .map(|p| {
                assert_eq!(p.p_type(e), object::elf::PT_LOAD);
                assert_eq!(p.p_vaddr(e), 0);
                assert_eq!(p.p_filesz(e), p.p_memsz(e));
                assert!(p.p_offset(e).is_multiple_of(4096));
                (p.p_paddr(e), p.p_filesz(e), p.p_offset(e))
            })
            .collect();
        assert_eq!(loads[0].0..loads[0].0 + loads[0].1, 0..0x3000);
        assert_eq!((loads[1].0, loads[1].1), (0x100000, 0x2000));
        assert_eq!(f[loads[1].2 as usize + 0x1000], 0x01 ^ 0x5a);
        let mut notes = phdrs[0].notes(e, &*f).unwrap().unwrap();
        let mut seen = Vec::new();
        while let Some(n) = notes.next().unwrap() {
            seen.push((n.name().to_vec(), n.n_type(e), n.desc().to_vec()));
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0].0, b"CORE");
        assert_eq!(seen[0].1, object::elf::NT_PRSTATUS);
        assert_eq!(seen[0].2.len(), PRSTATUS_SIZE);
        let d = &seen[0].2;
        let word = |i: usize| {
            u64::from_le_bytes(d[PRSTATUS_REG_OFFSET + 8 * i..][..8].try_into().unwrap())
        };
        assert_eq!(u32::from_le_bytes(d[32..36].try_into().unwrap()), 1);
        assert_eq!(word(0), 0xf15, "r15 first");
        assert_eq!(word(10), 0xaa, "rax");
        assert_eq!(word(16), 0x1234, "rip");
        assert_eq!(word(17), 0x08, "cs");
        assert_eq!(word(18), 0x202, "eflags");
        assert_eq!(word(19), 0x5000, "rsp");
        assert_eq!(word(20), 0x10, "ss");
        assert_eq!(u32::from_le_bytes(seen[1].2[32..36].try_into().unwrap()), 2);
        assert_eq!(seen[2].0, b"QEMU");
        assert_eq!(seen[2].1, 0);
        let q = &seen[2].2;
        assert_eq!(q.len(), QEMU_CPU_STATE_SIZE);
        let q64 = |at: usize| u64::from_le_bytes(q[at..at + 8].try_into().unwrap());
        assert_eq!(u32::from_le_bytes(q[0..4].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(q[4..8].try_into().unwrap()), 440);
        assert_eq!(q64(8), 0xaa, "rax");
        assert_eq!(q64(8 + 16 * 8), 0x1234, "rip");
        // cs: selector 8, flags type 11 | S | P | L.
        let cs = 8 + 18 * 8;
        assert_eq!(u32::from_le_bytes(q[cs..cs + 4].try_into().unwrap()), 8);
        assert_eq!(
            u32::from_le_bytes(q[cs + 8..cs + 12].try_into().unwrap()),
            11 << 8 | 1 << 12 | 1 << 15 | 1 << 21
        );
        let gdt = cs + 8 * 24;
        assert_eq!(q64(gdt + 16), 0x500);
        assert_eq!(q64(cs + 10 * 24 + 3 * 8), 0x9000, "cr3");
        let mut empty = vec![0u8; QEMU_CPU_STATE_SIZE];
        empty[0] = 1;
        empty[4..8].copy_from_slice(&440u32.to_le_bytes());
        assert_eq!(
            seen[3].2, empty,
            "a vCPU without registers: version and size only"
        );
    }
}
