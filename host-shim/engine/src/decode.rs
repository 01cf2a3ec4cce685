//! A minimal x86-64 memory-operand decoder for the instructions PVM's emulator hands back
//! (emulation failure) when they touch a protected page, e.g. `lock inc qword [rip+d]`:
//! prefixes, REX, one/two/three-byte opcodes, ModRM/SIB/displacement and the immediate
//! sizes of the common read-modify-write forms. Enough to name the data address in a PF
//! event and the instruction length for SKIP; anything else is `None`.

use kvm_bindings::kvm_regs;

/// A decoded memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOperand {
    /// Effective address (before segment base; FS/GS bases are added by the caller).
    pub ea: u64,
    /// Segment override: 4 = FS, 5 = GS, 0 = none.
    pub segment: u8,
    /// Whole instruction length.
    pub len: usize,
}

fn gpr(r: &kvm_regs, n: u8) -> u64 {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ][usize::from(n & 15)]
}

/// Immediate size of a one-byte opcode with a ModRM operand (`reg` = ModRM.reg), given
/// the operand-size prefix.
fn imm_one_byte(op: u8, reg: u8, opsize16: bool) -> Option<usize> {
    let iz = if opsize16 { 2 } else { 4 };
    Some(match op {
        0x80 | 0x83 | 0xc0 | 0xc1 | 0xc6 | 0x6b => 1,
        0x81 | 0xc7 | 0x69 => iz,
        0xf6 if reg < 2 => 1,
        0xf7 if reg < 2 => iz,
        0x00..=0x3f if op & 7 < 4 => 0,
        0x84..=0x8f | 0xd0..=0xd3 | 0xf6 | 0xf7 | 0xfe | 0xff => 0,
        _ => return None,
    })
}

/// Decodes the memory operand of `insn` (rip = the instruction's address).
pub fn mem_operand(insn: &[u8], regs: &kvm_regs) -> Option<MemOperand> {
    let mut i = 0;
    let mut segment = 0;
    let mut opsize16 = false;
    while let Some(&b) = insn.get(i) {
        match b {
            0xf0 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x36 | 0x67 => {}
            0x66 => opsize16 = true,
            0x64 => segment = 4,
            0x65 => segment = 5,
            _ => break,
        }
        i += 1;
    }
    let mut rex = 0u8;
    if let Some(&b) = insn.get(i)
        && b & 0xf0 == 0x40
    {
        rex = b;
        i += 1;
    }
    let op = *insn.get(i)?;
    i += 1;
    let (two_byte, op2) = if op == 0x0f {
        let o = *insn.get(i)?;
        i += 1;
        if o == 0x38 || o == 0x3a {
            i += 1;
        }
        (true, o)
    } else {
        (false, op)
    };
    let modrm = *insn.get(i)?;
    i += 1;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 {
        return None;
    }
    let mut ea: u64;
    let mut rip_relative = false;
    if rm == 4 {
        let sib = *insn.get(i)?;
        i += 1;
        let (scale, index, base) = (sib >> 6, ((sib >> 3) & 7) | ((rex & 2) << 2), sib & 7);
        ea = if index == 4 {
            0
        } else {
            gpr(regs, index) << scale
        };
        if base == 5 && md == 0 {
            let d = i32::from_le_bytes(insn.get(i..i + 4)?.try_into().ok()?);
            i += 4;
            ea = ea.wrapping_add(d as i64 as u64);
        } else {
            ea = ea.wrapping_add(gpr(regs, base | ((rex & 1) << 3)));
        }
    } else if md == 0 && rm == 5 {
        rip_relative = true;
        ea = 0;
    } else {
        ea = gpr(regs, rm | ((rex & 1) << 3));
    }
    let disp = match (md, rip_relative) {
        (_, true) | (2, _) => {
            let d = i32::from_le_bytes(insn.get(i..i + 4)?.try_into().ok()?);
            i += 4;
            d as i64
        }
        (1, _) => {
            let d = *insn.get(i)? as i8;
            i += 1;
            i64::from(d)
        }
        _ => 0,
    };
    ea = ea.wrapping_add(disp as u64);
    let imm = if two_byte {
        match op2 {
            0xba => 1,
            0xb0 | 0xb1 | 0xc0 | 0xc1 | 0xab | 0xb3 | 0xbb | 0xc7 => 0,
            _ => return None,
        }
    } else {
        imm_one_byte(op2, reg, opsize16)?
    };
    let len = i + imm;
    if len > insn.len().min(15) {
        return None;
    }
    if rip_relative {
        ea = ea.wrapping_add(regs.rip.wrapping_add(len as u64));
    }
    Some(MemOperand { ea, segment, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_lock_inc_rip_relative_and_register_forms() {
        let regs = kvm_regs {
            rip: 0x100d70,
            rbx: 0x5000,
            rcx: 3,
            ..Default::default()
        };
        // lock inc qword [rip+0xb288]
        let m = mem_operand(&[0xf0, 0x48, 0xff, 0x05, 0x88, 0xb2, 0, 0, 0xeb], &regs).unwrap();
        assert_eq!(m.len, 8);
        assert_eq!(m.ea, 0x100d70 + 8 + 0xb288);
        // lock add dword [rbx+rcx*8+0x10], 1
        let m = mem_operand(&[0xf0, 0x83, 0x44, 0xcb, 0x10, 0x01], &regs).unwrap();
        assert_eq!((m.ea, m.len), (0x5000 + 24 + 0x10, 6));
        // lock cmpxchg [rbx], ecx ; gs: prefix
        let m = mem_operand(&[0x65, 0xf0, 0x0f, 0xb1, 0x0b], &regs).unwrap();
        assert_eq!((m.ea, m.len, m.segment), (0x5000, 5, 5));
        // register operand, truncated bytes, unknown opcode
        assert_eq!(mem_operand(&[0xff, 0xc0], &regs), None);
        assert_eq!(mem_operand(&[0xf0, 0x48, 0xff, 0x05, 0x88], &regs), None);
        assert_eq!(mem_operand(&[0xcc], &regs), None);
    }
}
