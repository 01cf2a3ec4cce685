//! The engine's x86-64 memory-operand decoder (`kvmi_engine::decode::mem_operand`) on guest
//! instruction bytes: the guest chooses them (the instruction at RIP when a protected page
//! faults, or the bytes KVM hands back after an emulation failure).
//!
//! Input: the instruction bytes (any length; the engine passes at most 15). Checks, whenever
//! an operand decodes:
//! - its length is at least 1 (`push`, `stos` and the like have no ModRM), at most the
//!   input's and at most 15 (the architectural limit), and its segment is none, FS or GS;
//! - only the instruction's own bytes matter: decoding exactly `len` bytes gives the same
//!   operand, and every shorter cut is a truncated instruction (`None`);
//! - moving RIP moves the address by the same amount (RIP-relative) or not at all; with a
//!   32-bit address size (prefix 0x67) the moved address wraps at 4 GiB.
#![no_main]

use kvm_bindings::kvm_regs;
use kvmi_engine::decode::mem_operand;
use libfuzzer_sys::fuzz_target;

/// Registers with distinct values (so a wrong register shows in the address), `rip` given.
fn regs(rip: u64) -> kvm_regs {
    let r = |n: u64| 0x0101_0101_0101_0101u64.wrapping_mul(n) ^ (n << 40);
    kvm_regs {
        rax: r(1),
        rcx: r(2),
        rdx: r(3),
        rbx: r(4),
        rsp: r(5),
        rbp: r(6),
        rsi: r(7),
        rdi: r(8),
        r8: r(9),
        r9: r(10),
        r10: r(11),
        r11: r(12),
        r12: r(13),
        r13: r(14),
        r14: r(15),
        r15: r(16),
        rip,
        ..Default::default()
    }
}

/// RIP moves by this much in the second decoding.
const MOVE: u64 = 0x1_0000;

fuzz_target!(|insn: &[u8]| {
    let at = regs(0xffff_ffff_8100_0000);
    let Some(op) = mem_operand(insn, &at) else {
        return;
    };
    assert!(op.len >= 1, "{op:?}");
    assert!(op.len <= insn.len(), "{op:?} from {} bytes", insn.len());
    assert!(op.len <= 15, "{op:?}: longer than any x86 instruction");
    assert!(matches!(op.segment, 0 | 4 | 5), "{op:?}");
    assert_eq!(
        mem_operand(&insn[..op.len], &at),
        Some(op),
        "depends on later bytes"
    );
    for cut in 0..op.len {
        assert_eq!(mem_operand(&insn[..cut], &at), None, "truncated at {cut}");
    }
    let moved = mem_operand(insn, &regs(at.rip.wrapping_add(MOVE))).expect("decodes again");
    assert_eq!((moved.len, moved.segment), (op.len, op.segment));
    let delta = moved.ea.wrapping_sub(op.ea);
    let wrapped_32 = op.ea >> 32 == 0 && moved.ea == op.ea.wrapping_add(MOVE) & 0xffff_ffff;
    assert!(
        delta == 0 || delta == MOVE || wrapped_32,
        "{op:?} vs {moved:?}"
    );
});
