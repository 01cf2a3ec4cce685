//! The memory location a guest instruction accesses, decoded with iced-x86: for a native CPL3
//! write that faults with `EFAULT` and no gpa (PVM), and for the instructions KVM's emulator
//! hands back (emulation failure) when they touch a protected page, e.g.
//! `lock inc qword [rip+d]`. It names the data address in a PF event and the instruction
//! length for SKIP.
//!
//! iced-x86 replaced a hand decoder of prefixes, REX, ModRM/SIB and the immediates of the
//! common read-modify-write opcodes. On 2,000,000 random 15-byte inputs (prefix-biased) the
//! hand decoder answered 218,000: 180,000 as iced-x86 does, 8,700 wrongly (address-size
//! prefix ignored; `push`/`call` on memory named the read, not the faulting stack write; XOP
//! read as `pop`) and 29,900 for no access at all (26,700 invalid encodings, 3,200 `lea`);
//! `66 REX.W` immediates also got the wrong length. iced-x86 answers 444,000 more: string
//! instructions (`rep stos`/`movs`, what `memset`/`memcpy` write with), moffs forms, SSE, VEX
//! and EVEX stores, `setcc`, x87, pushes.
//!
//! The cost, measured on this 2-core machine: iced-x86 (features `std`, `decoder`,
//! `instr_info`) adds 6 to 7 s to a clean build, dev or release, and nothing to an
//! incremental one; a release binary grows by 245 KB of code and tables. The first decode
//! builds iced's tables (0.5 to 0.8 ms, once per process), later ones take about 0.1 µs
//! (hand decoder: 0.03 µs), nothing beside a VM exit. `instr_info` (90 KB of the 245) says
//! which locations an instruction reads and writes, so no list of opcodes that access nothing
//! (`lea`, `nop [m]`, prefetches) is kept here. One new crate (MIT); its lazy_static is
//! already in the lock.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, InstructionInfoOptions, Mnemonic,
    OpAccess, OpKind, Register,
};
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

/// The value of a register that can form an address in 64-bit mode (segment registers
/// count 0: the caller adds the FS/GS base). `None` for the vector indices of gathers and
/// scatters, which `kvm_regs` does not hold.
fn register(r: &kvm_regs, reg: Register) -> Option<u64> {
    let gprs = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    let in_row = |first: Register, last: Register| {
        (first..=last)
            .contains(&reg)
            .then(|| gprs[reg as usize - first as usize])
    };
    match reg {
        Register::ES | Register::CS | Register::SS | Register::DS | Register::FS | Register::GS => {
            Some(0)
        }
        // `xlat`: [rbx + al].
        Register::AL => Some(r.rax & 0xff),
        _ => in_row(Register::RAX, Register::R15)
            .or_else(|| in_row(Register::EAX, Register::R15D).map(|v| v & 0xffff_ffff)),
    }
}

fn writes(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

fn reads(access: OpAccess) -> bool {
    matches!(access, OpAccess::Read | OpAccess::CondRead)
}

/// Decodes the instruction at the start of `insn` (64-bit mode, rip = its address) and
/// returns the memory location it accesses: the first one it writes (the faults this serves
/// are writes: `push [m]` names the stack slot, `movs` its destination), else the first one it
/// reads. `None` for an invalid or truncated instruction, one that accesses no memory (`lea`,
/// `nop [m]`, prefetches) and a gather or scatter (vector index).
pub fn mem_operand(insn: &[u8], regs: &kvm_regs) -> Option<MemOperand> {
    let mut decoder = Decoder::with_ip(64, insn, regs.rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return None;
    }
    let mut factory = InstructionInfoFactory::new();
    let used = factory
        .info_options(&instruction, InstructionInfoOptions::NO_REGISTER_USAGE)
        .used_memory();
    let written = used.iter().filter(|m| writes(m.access()));
    let read = used.iter().filter(|m| reads(m.access()));
    written.chain(read).find_map(|m| {
        Some(MemOperand {
            // RIP-relative locations come with rip already added (the decoder knows rip).
            ea: m.virtual_address(0, |reg, _, _| register(regs, reg))?,
            segment: match m.segment() {
                Register::FS => 4,
                Register::GS => 5,
                _ => 0,
            },
            len: instruction.len(),
        })
    })
}

/// A memory location an instruction accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemAccess {
    /// Effective address (before segment base; FS/GS bases are added by the caller).
    pub ea: u64,
    /// Segment override: 4 = FS, 5 = GS, 0 = none.
    pub segment: u8,
    /// Bytes accessed (16 where iced-x86 gives no size).
    pub size: usize,
    /// Written (or read and written).
    pub write: bool,
}

/// An instruction that behaves the same at CPL0 as at CPL3 when it may touch only the memory
/// CPL3 may: its length and every memory location it accesses (stack slots included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeutralStep {
    /// Whole instruction length.
    pub len: usize,
    /// The memory it accesses.
    pub accesses: Vec<MemAccess>,
}

/// Decodes the instruction at the start of `insn` and returns it if running it at CPL0
/// instead of CPL3 changes nothing but which memory it may touch (the caller checks that
/// every location in [`NeutralStep::accesses`] is user-accessible): not privileged or
/// IOPL-sensitive, not a far transfer, interrupt, `iret` or system call, no segment-register
/// load, no flag image (`pushf`/`popf`), nothing that faults by itself (`div`, `ud2`) or
/// depends on CR4 controls meant for CPL3 (`rdtsc`, UMIP's `sgdt` and kin), no `rep`
/// (later iterations reach memory the check did not see). `None` otherwise, for an invalid
/// or truncated instruction, and for a location whose address is unknown (gathers).
pub fn cpl_neutral(insn: &[u8], regs: &kvm_regs) -> Option<NeutralStep> {
    let mut decoder = Decoder::with_ip(64, insn, regs.rip, DecoderOptions::NONE);
    let i = decoder.decode();
    if i.is_invalid()
        || i.is_privileged()
        || i.has_rep_prefix()
        || i.has_repne_prefix()
        || i.is_call_far()
        || i.is_call_far_indirect()
        || i.is_jmp_far()
        || i.is_jmp_far_indirect()
    {
        return None;
    }
    let flow = matches!(
        i.flow_control(),
        FlowControl::Next
            | FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Return
            | FlowControl::Call
            | FlowControl::IndirectCall
    );
    let denied = matches!(
        i.mnemonic(),
        Mnemonic::Retf
            | Mnemonic::Iret
            | Mnemonic::Iretd
            | Mnemonic::Iretq
            | Mnemonic::Syscall
            | Mnemonic::Sysret
            | Mnemonic::Sysretq
            | Mnemonic::Sysenter
            | Mnemonic::Sysexit
            | Mnemonic::Sysexitq
            | Mnemonic::Div
            | Mnemonic::Idiv
            | Mnemonic::Popf
            | Mnemonic::Popfd
            | Mnemonic::Popfq
            | Mnemonic::Pushf
            | Mnemonic::Pushfd
            | Mnemonic::Pushfq
            | Mnemonic::Rdtsc
            | Mnemonic::Rdtscp
            | Mnemonic::Rdpmc
            | Mnemonic::Smsw
            | Mnemonic::Sgdt
            | Mnemonic::Sidt
            | Mnemonic::Sldt
            | Mnemonic::Str
            | Mnemonic::Lar
            | Mnemonic::Lsl
            | Mnemonic::Verr
            | Mnemonic::Verw
            | Mnemonic::Cpuid
            | Mnemonic::Lss
            | Mnemonic::Lfs
            | Mnemonic::Lgs
    );
    let loads_segment = matches!(i.mnemonic(), Mnemonic::Mov | Mnemonic::Pop)
        && i.op_count() > 0
        && i.op0_kind() == OpKind::Register
        && i.op0_register().is_segment_register();
    if !flow || denied || loads_segment {
        return None;
    }
    let mut factory = InstructionInfoFactory::new();
    let used = factory
        .info_options(&i, InstructionInfoOptions::NO_REGISTER_USAGE)
        .used_memory();
    let accesses = used
        .iter()
        .map(|m| {
            Some(MemAccess {
                ea: m.virtual_address(0, |reg, _, _| register(regs, reg))?,
                segment: match m.segment() {
                    Register::FS => 4,
                    Register::GS => 5,
                    _ => 0,
                },
                size: match m.memory_size().size() {
                    0 => 16,
                    n => n,
                },
                write: writes(m.access()),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(NeutralStep {
        len: i.len(),
        accesses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpl_neutral_steps_exclude_privileged_far_segment_flag_and_faulting_forms() {
        let regs = kvm_regs {
            rip: 0x40_1000,
            rbx: 0x5000,
            rsp: 0x7ff0,
            ..Default::default()
        };
        let neutral = |insn: &[u8]| cpl_neutral(insn, &regs);
        // lock xadd [rbx], rax: one read-written location.
        let s = neutral(&[0xf0, 0x48, 0x0f, 0xc1, 0x03]).unwrap();
        assert_eq!(s.len, 5);
        assert_eq!(
            s.accesses,
            [MemAccess {
                ea: 0x5000,
                segment: 0,
                size: 8,
                write: true
            }]
        );
        // call [rbx]: the read of the target and the stack write.
        let s = neutral(&[0xff, 0x13]).unwrap();
        assert!(s.accesses.contains(&MemAccess {
            ea: 0x7fe8,
            segment: 0,
            size: 8,
            write: true
        }));
        assert!(neutral(&[0x48, 0x89, 0xd8]).unwrap().accesses.is_empty()); // mov rax, rbx
        assert!(neutral(&[0xeb, 0xfe]).is_some()); // jmp $
        for (what, insn) in [
            ("call far [rbx]", &[0xff, 0x1b][..]),
            ("jmp far [rbx]", &[0xff, 0x2b]),
            ("retf", &[0xcb]),
            ("iretq", &[0x48, 0xcf]),
            ("int3", &[0xcc]),
            ("int 0x80", &[0xcd, 0x80]),
            ("syscall", &[0x0f, 0x05]),
            ("mov ss, [rbx]", &[0x8e, 0x13]),
            ("pop fs", &[0x0f, 0xa1]),
            ("popfq", &[0x9d]),
            ("pushfq", &[0x9c]),
            ("div dword [rbx]", &[0xf7, 0x33]),
            ("cli", &[0xfa]),
            ("hlt", &[0xf4]),
            ("in al, dx", &[0xec]),
            ("mov cr3, rax", &[0x0f, 0x22, 0xd8]),
            ("wrmsr", &[0x0f, 0x30]),
            ("rdtsc", &[0x0f, 0x31]),
            ("sgdt [rbx]", &[0x0f, 0x01, 0x03]),
            ("ud2", &[0x0f, 0x0b]),
            ("rep stosb", &[0xf3, 0xaa]),
            ("truncated", &[0xf0, 0x48, 0xff]),
        ] {
            assert_eq!(neutral(insn), None, "{what}");
        }
    }

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
        // register operand, truncated bytes, no memory (int3)
        assert_eq!(mem_operand(&[0xff, 0xc0], &regs), None);
        assert_eq!(mem_operand(&[0xf0, 0x48, 0xff, 0x05, 0x88], &regs), None);
        assert_eq!(mem_operand(&[0xcc], &regs), None);
    }

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: 0x40_1000,
            rax: 0x1_0000_0010,
            rbx: 0x5000,
            rcx: 3,
            rsp: 0x7ff0,
            rsi: 0x6000,
            rdi: 0x8000,
            r12: 0x100,
            r13: 0x9000,
            ..Default::default()
        }
    }

    fn op(insn: &[u8]) -> Option<(u64, usize, u8)> {
        mem_operand(insn, &regs()).map(|m| (m.ea, m.len, m.segment))
    }

    #[test]
    fn modrm_forms_with_prefixes_rex_and_immediates() {
        let r = regs();
        // mov qword [rax], imm32: REX.W wins over 66 (the hand decoder took a 2-byte imm).
        assert_eq!(
            op(&[0x66, 0x48, 0xc7, 0x00, 0x78, 0x56, 0x34, 0x12]),
            Some((r.rax, 8, 0))
        );
        // mov dword [rip+0x10], 1: rip-relative counts from the end, after the immediate.
        let m = op(&[0xc7, 0x05, 0x10, 0, 0, 0, 1, 0, 0, 0]).unwrap();
        assert_eq!(m, (r.rip + 10 + 0x10, 10, 0));
        // mov [rax+r12*4], eax (REX.X); mov [r13], eax (REX.B, mod 1 with disp8 0);
        // mov eax, [0x1000] (SIB without base or index).
        assert_eq!(
            op(&[0x42, 0x89, 0x04, 0xa0]),
            Some((r.rax + r.r12 * 4, 4, 0))
        );
        assert_eq!(op(&[0x41, 0x89, 0x45, 0x00]), Some((r.r13, 4, 0)));
        assert_eq!(
            op(&[0x8b, 0x04, 0x25, 0x00, 0x10, 0, 0]),
            Some((0x1000, 7, 0))
        );
        // lock inc qword [rip+0x10] in the last 4 bytes: the end of the instruction, and so
        // the address, wraps past the top of the address space.
        let top = kvm_regs {
            rip: u64::MAX - 3,
            ..Default::default()
        };
        let m = mem_operand(&[0xf0, 0x48, 0xff, 0x05, 0x10, 0, 0, 0], &top).unwrap();
        assert_eq!((m.ea, m.len), (4 + 0x10, 8));
        // mov [eax], ecx: the address-size prefix makes a 32-bit address.
        assert_eq!(op(&[0x67, 0x89, 0x08]), Some((0x10, 3, 0)));
        // cmpxchg16b [rbx]; sete [rbx]; fstp qword [rbx].
        assert_eq!(op(&[0x48, 0x0f, 0xc7, 0x0b]), Some((r.rbx, 4, 0)));
        assert_eq!(op(&[0x0f, 0x94, 0x03]), Some((r.rbx, 3, 0)));
        assert_eq!(op(&[0xdd, 0x1b]), Some((r.rbx, 2, 0)));
    }

    #[test]
    fn moffs_string_and_vector_forms() {
        let r = regs();
        // mov [0x1122334455667788], rax; gs: mov rax, [0x10].
        let moffs = [0x48, 0xa3, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11];
        assert_eq!(op(&moffs), Some((0x1122_3344_5566_7788, 10, 0)));
        assert_eq!(
            op(&[0x65, 0x48, 0xa1, 0x10, 0, 0, 0, 0, 0, 0, 0]),
            Some((0x10, 11, 5))
        );
        // rep stosb; rep movsq and fs: movsb write es:[rdi] (no override); lodsb reads [rsi];
        // xlat reads [rbx+al].
        assert_eq!(op(&[0xf3, 0xaa]), Some((r.rdi, 2, 0)));
        assert_eq!(op(&[0xf3, 0x48, 0xa5]), Some((r.rdi, 3, 0)));
        assert_eq!(op(&[0x64, 0xa4]), Some((r.rdi, 2, 0)));
        assert_eq!(op(&[0xac]), Some((r.rsi, 1, 0)));
        assert_eq!(op(&[0xd7]), Some((r.rbx + 0x10, 1, 0)));
        // movdqa [rsi], xmm0; vmovdqu [rdi], ymm0 (VEX); vmovdqu32 [rdi+0x40], zmm0 (EVEX,
        // disp8 scaled by 64).
        assert_eq!(op(&[0x66, 0x0f, 0x7f, 0x06]), Some((r.rsi, 4, 0)));
        assert_eq!(op(&[0xc5, 0xfe, 0x7f, 0x07]), Some((r.rdi, 4, 0)));
        let evex = [0x62, 0xf1, 0x7e, 0x48, 0x7f, 0x47, 0x01];
        assert_eq!(op(&evex), Some((r.rdi + 0x40, 7, 0)));
    }

    #[test]
    fn the_written_location_comes_first() {
        let r = regs();
        // push qword [rbx] reads [rbx] and writes the stack; push rax; pop qword [rsp]
        // stores after the increment; ret only reads.
        assert_eq!(op(&[0xff, 0x33]), Some((r.rsp - 8, 2, 0)));
        assert_eq!(op(&[0x50]), Some((r.rsp - 8, 1, 0)));
        assert_eq!(op(&[0x8f, 0x04, 0x24]), Some((r.rsp + 8, 3, 0)));
        assert_eq!(op(&[0xc3]), Some((r.rsp, 1, 0)));
    }

    #[test]
    fn no_operand_for_no_access_invalid_or_overlong_instructions() {
        // lea rax, [rsp]; nop dword [rax]; prefetcht0 [rax]: no access.
        assert_eq!(op(&[0x48, 0x8d, 0x04, 0x24]), None);
        assert_eq!(op(&[0x0f, 0x1f, 0x00]), None);
        assert_eq!(op(&[0x0f, 0x18, 0x08]), None);
        // vpgatherdd xmm0, [rax+xmm1*4], xmm2: the index is a vector register.
        assert_eq!(op(&[0xc4, 0xe2, 0x69, 0x90, 0x04, 0x88]), None);
        // c7 /5 is undefined (the hand decoder returned [rdx+disp32]).
        assert_eq!(op(&[0xc7, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        // mov [rax], ax behind 13 bytes of 66 prefixes is 15 bytes long; one more is too long.
        let mut insn = vec![0x66; 13];
        insn.extend([0x89, 0x00]);
        assert_eq!(op(&insn).map(|m| m.1), Some(15));
        insn.insert(0, 0x66);
        assert_eq!(op(&insn), None);
    }
}
