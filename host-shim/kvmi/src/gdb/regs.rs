//! The register set `kvmi gdb` serves: gdb's x86-64 core and SSE registers, the segment
//! bases and the control registers, mapped from and to KVMI's `kvm_regs` / `kvm_sregs`.

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::reg::id::X86_64CoreRegId;
use protocol::kvm::{KvmRegs, KvmSregs};

/// The target description gdb reads (`qXfer:features:read:target.xml`).
pub const TARGET_XML: &str = include_str!("target.xml");

/// The architecture: x86-64 with the registers of [`GdbRegisters`].
pub enum KvmiX86_64 {}

impl Arch for KvmiX86_64 {
    type Usize = u64;
    type Registers = GdbRegisters;
    type RegId = X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// Every register of the `g` packet, in [`TARGET_XML`]'s order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GdbRegisters {
    /// rax..r15, rip, eflags, the selectors, x87 and SSE (gdb's core and sse features).
    pub core: X86_64CoreRegs,
    /// FS base.
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// cr0, cr2, cr3, cr4, cr8, efer.
    pub control: [u64; 6],
}

/// Bytes of gdbstub_arch's core + SSE part of the `g` packet.
const CORE_BYTES: usize = 0x218;
/// Bytes of the whole `g` packet.
pub const G_BYTES: usize = CORE_BYTES + 8 * 8;

impl Registers for GdbRegisters {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        let extra = [self.fs_base, self.gs_base].into_iter().chain(self.control);
        for value in extra {
            for b in value.to_le_bytes() {
                write_byte(Some(b));
            }
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() < G_BYTES {
            return Err(());
        }
        self.core.gdb_deserialize(&bytes[..CORE_BYTES])?;
        let mut words = bytes[CORE_BYTES..G_BYTES]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        self.fs_base = words.next().ok_or(())?;
        self.gs_base = words.next().ok_or(())?;
        for slot in &mut self.control {
            *slot = words.next().ok_or(())?;
        }
        Ok(())
    }
}

/// gdb's general-register order (rax rbx rcx rdx rsi rdi rbp rsp r8..r15) from `kvm_regs`
/// (whose order has rsp before rbp).
fn gprs(r: &KvmRegs) -> [u64; 16] {
    [
        r.rax.get(),
        r.rbx.get(),
        r.rcx.get(),
        r.rdx.get(),
        r.rsi.get(),
        r.rdi.get(),
        r.rbp.get(),
        r.rsp.get(),
        r.r8.get(),
        r.r9.get(),
        r.r10.get(),
        r.r11.get(),
        r.r12.get(),
        r.r13.get(),
        r.r14.get(),
        r.r15.get(),
    ]
}

/// The gdb view of a vCPU's registers (x87/SSE state is reported as zeros).
pub fn to_gdb(regs: &KvmRegs, sregs: &KvmSregs) -> GdbRegisters {
    let mut core = X86_64CoreRegs {
        regs: gprs(regs),
        rip: regs.rip.get(),
        // gdb's eflags is 32 bits wide; the upper half of RFLAGS is reserved (zero).
        eflags: regs.rflags.get() as u32,
        ..Default::default()
    };
    let sel = |s: &protocol::kvm::KvmSegment| u32::from(s.selector.get());
    core.segments.cs = sel(&sregs.cs);
    core.segments.ss = sel(&sregs.ss);
    core.segments.ds = sel(&sregs.ds);
    core.segments.es = sel(&sregs.es);
    core.segments.fs = sel(&sregs.fs);
    core.segments.gs = sel(&sregs.gs);
    GdbRegisters {
        core,
        fs_base: sregs.fs.base.get(),
        gs_base: sregs.gs.base.get(),
        control: [
            sregs.cr0.get(),
            sregs.cr2.get(),
            sregs.cr3.get(),
            sregs.cr4.get(),
            sregs.cr8.get(),
            sregs.efer.get(),
        ],
    }
}

/// Fills the x87 and SSE registers from an XSAVE area (its legacy FXSAVE region, 64-bit
/// format); a short area leaves them as they are.
pub fn fill_fpu(regs: &mut GdbRegisters, xsave: &[u8]) {
    if xsave.len() < 416 {
        return;
    }
    let u16_at = |o: usize| u16::from_le_bytes([xsave[o], xsave[o + 1]]);
    let u32_at =
        |o: usize| u32::from_le_bytes([xsave[o], xsave[o + 1], xsave[o + 2], xsave[o + 3]]);
    let fpu = &mut regs.core.fpu;
    fpu.fctrl = u32::from(u16_at(0));
    fpu.fstat = u32::from(u16_at(2));
    // The abridged tag (1 bit per register, 1 = valid) as the full tag word gdb shows:
    // 00 valid, 11 empty (the finer zero/special classes are not recovered).
    let abridged = xsave[4];
    fpu.ftag = (0..8)
        .map(|i| {
            if abridged & (1 << i) != 0 {
                0
            } else {
                3 << (2 * i)
            }
        })
        .sum();
    fpu.fop = u32::from(u16_at(6));
    fpu.fioff = u32_at(8);
    fpu.fiseg = 0;
    fpu.fooff = u32_at(16);
    fpu.foseg = 0;
    regs.core.mxcsr = u32_at(24);
    for (i, st) in regs.core.st.iter_mut().enumerate() {
        let at = 32 + 16 * i;
        st.copy_from_slice(&xsave[at..at + 10]);
    }
    for (i, xmm) in regs.core.xmm.iter_mut().enumerate() {
        let at = 160 + 16 * i;
        let mut b = [0u8; 16];
        b.copy_from_slice(&xsave[at..at + 16]);
        *xmm = u128::from_le_bytes(b);
    }
}

/// Why a register write is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// gdb changed a register SET_REGISTERS cannot set (only rax..r15, rip, rflags).
    #[error("only the general registers, rip and eflags can be written (not {0})")]
    ReadOnly(&'static str),
}

/// `kvm_regs` with gdb's values of the general registers, rip and eflags applied to `old`;
/// refuses a change to any other register (compared with `current`, the view gdb was given).
pub fn apply_write(
    old: &KvmRegs,
    current: &GdbRegisters,
    new: &GdbRegisters,
) -> Result<KvmRegs, WriteError> {
    if new.core.segments != current.core.segments {
        return Err(WriteError::ReadOnly("segment selectors"));
    }
    if new.core.st != current.core.st
        || new.core.fpu != current.core.fpu
        || new.core.xmm != current.core.xmm
        || new.core.mxcsr != current.core.mxcsr
    {
        return Err(WriteError::ReadOnly("x87/SSE registers"));
    }
    if new.fs_base != current.fs_base || new.gs_base != current.gs_base {
        return Err(WriteError::ReadOnly("fs_base/gs_base"));
    }
    if new.control != current.control {
        return Err(WriteError::ReadOnly("control registers"));
    }
    let g = &new.core.regs;
    let mut out = *old;
    out.rax.set(g[0]);
    out.rbx.set(g[1]);
    out.rcx.set(g[2]);
    out.rdx.set(g[3]);
    out.rsi.set(g[4]);
    out.rdi.set(g[5]);
    out.rbp.set(g[6]);
    out.rsp.set(g[7]);
    out.r8.set(g[8]);
    out.r9.set(g[9]);
    out.r10.set(g[10]);
    out.r11.set(g[11]);
    out.r12.set(g[12]);
    out.r13.set(g[13]);
    out.r14.set(g[14]);
    out.r15.set(g[15]);
    out.rip.set(new.core.rip);
    // Keep RFLAGS' reserved upper half as it was.
    out.rflags
        .set((old.rflags.get() & !0xffff_ffff) | u64::from(new.core.eflags));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (KvmRegs, KvmSregs) {
        let mut r = KvmRegs::default();
        for (i, slot) in [
            &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rsp,
            &mut r.rbp, &mut r.r8, &mut r.r9, &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13,
            &mut r.r14, &mut r.r15,
        ]
        .into_iter()
        .enumerate()
        {
            slot.set(0x100 + i as u64);
        }
        r.rip.set(0xffff_8000_0010_2030);
        r.rflags.set(0x246);
        let mut s = KvmSregs::default();
        s.cs.selector.set(0x08);
        s.ss.selector.set(0x10);
        s.fs.base.set(0x7000);
        s.gs.base.set(0x8000);
        s.cr0.set(0x8000_0011);
        s.cr2.set(0xdead);
        s.cr3.set(0x20_0000);
        s.cr4.set(0x20);
        s.cr8.set(2);
        s.efer.set(0x500);
        (r, s)
    }

    #[test]
    fn kvm_registers_map_to_gdb_order() {
        let (r, s) = sample();
        let g = to_gdb(&r, &s);
        assert_eq!(g.core.regs[6], 0x107, "gdb's rbp is kvm_regs' 8th field");
        assert_eq!(g.core.regs[7], 0x106, "gdb's rsp is kvm_regs' 7th field");
        assert_eq!(g.core.regs[15], 0x10f);
        assert_eq!(g.pc(), 0xffff_8000_0010_2030);
        assert_eq!(g.core.eflags, 0x246);
        assert_eq!((g.core.segments.cs, g.core.segments.ss), (0x08, 0x10));
        assert_eq!((g.fs_base, g.gs_base), (0x7000, 0x8000));
        assert_eq!(g.control, [0x8000_0011, 0xdead, 0x20_0000, 0x20, 2, 0x500]);
    }

    #[test]
    fn g_packet_round_trips_and_puts_cr3_where_the_xml_says() {
        let (r, s) = sample();
        let g = to_gdb(&r, &s);
        let mut bytes = Vec::new();
        g.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        assert_eq!(bytes.len(), G_BYTES);
        // cr3 is the 60th register: after 0x218 core bytes, fs_base, gs_base, cr0, cr2.
        let at = CORE_BYTES + 4 * 8;
        assert_eq!(&bytes[at..at + 8], &0x20_0000u64.to_le_bytes());
        let mut back = GdbRegisters::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, g);
        assert!(back.gdb_deserialize(&bytes[..G_BYTES - 1]).is_err());
        // The XML lists exactly the registers serialized.
        assert_eq!(
            TARGET_XML.matches("<reg ").count(),
            16 + 1 + 1 + 6 + 8 + 8 + 16 + 1 + 8
        );
        let cr3 = TARGET_XML.find("name=\"cr3\"").unwrap();
        assert!(TARGET_XML.find("name=\"fs_base\"").unwrap() < cr3);
    }

    #[test]
    fn x87_and_sse_come_from_the_xsave_legacy_region() {
        let mut area = vec![0u8; 576];
        area[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        area[2..4].copy_from_slice(&0x0800u16.to_le_bytes());
        area[4] = 0b0000_0001;
        area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        area[32..42].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        area[160 + 16..160 + 32]
            .copy_from_slice(&0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00u128.to_le_bytes());
        let mut g = GdbRegisters::default();
        fill_fpu(&mut g, &area);
        assert_eq!(g.core.fpu.fctrl, 0x37f);
        assert_eq!(g.core.fpu.fstat, 0x800);
        assert_eq!(g.core.fpu.ftag, 0xfffc, "st0 valid, the others empty");
        assert_eq!(g.core.mxcsr, 0x1f80);
        assert_eq!(g.core.st[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(g.core.xmm[1], 0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00);
        let mut untouched = GdbRegisters::default();
        fill_fpu(&mut untouched, &area[..100]);
        assert_eq!(untouched, GdbRegisters::default());
    }

    #[test]
    fn writes_set_general_registers_and_refuse_the_others() {
        let (r, s) = sample();
        let current = to_gdb(&r, &s);
        let mut new = current.clone();
        new.core.regs[0] = 0x4242;
        new.core.regs[7] = 0x9999; // rsp
        new.core.rip += 1;
        new.core.eflags = 0x202;
        let out = apply_write(&r, &current, &new).unwrap();
        assert_eq!(out.rax.get(), 0x4242);
        assert_eq!(out.rsp.get(), 0x9999);
        assert_eq!(out.rbp.get(), r.rbp.get());
        assert_eq!(out.rip.get(), r.rip.get() + 1);
        assert_eq!(out.rflags.get(), 0x202);
        let mut bad = current.clone();
        bad.control[2] = 0x1000;
        assert_eq!(
            apply_write(&r, &current, &bad),
            Err(WriteError::ReadOnly("control registers"))
        );
        let mut bad = current.clone();
        bad.core.segments.cs = 0x33;
        assert!(apply_write(&r, &current, &bad).is_err());
        let mut bad = current;
        bad.fs_base = 1;
        assert!(
            apply_write(&r, &bad.clone(), &{
                let mut b = bad;
                b.gs_base = 5;
                b
            })
            .is_err()
        );
    }
}
