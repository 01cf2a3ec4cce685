//! Conversions between kvm-bindings' register structs and the wire mirrors of the protocol
//! crate (byte-identical layouts, so they are plain byte copies).

use kvm_bindings::{kvm_regs, kvm_sregs};
use protocol::kvm::{KvmRegs, KvmSregs};
use protocol::types::CpuMode;
use zerocopy::{FromBytes, IntoBytes};

/// `kvm_regs` → the wire's `KvmRegs`.
pub fn regs_to_wire(r: &kvm_regs) -> KvmRegs {
    KvmRegs::read_from_bytes(r.as_bytes()).unwrap_or_default()
}

/// The wire's `KvmRegs` → `kvm_regs`.
pub fn regs_from_wire(r: &KvmRegs) -> kvm_regs {
    kvm_regs::read_from_bytes(r.as_bytes()).unwrap_or_default()
}

/// `kvm_sregs` → the wire's `KvmSregs`.
pub fn sregs_to_wire(s: &kvm_sregs) -> KvmSregs {
    KvmSregs::read_from_bytes(s.as_bytes()).unwrap_or_default()
}

/// The vCPU's operating mode (operand width) from its system registers.
pub fn cpu_mode(s: &kvm_sregs) -> CpuMode {
    const EFER_LMA: u64 = 1 << 10;
    if s.efer & EFER_LMA != 0 && s.cs.l != 0 {
        CpuMode::Bits64
    } else if s.cr0 & 1 != 0 && s.cs.db != 0 {
        CpuMode::Bits32
    } else {
        CpuMode::Bits16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_and_modes() {
        let r = kvm_regs {
            rax: 1,
            rip: 0x10_0000,
            rflags: 0x202,
            r15: u64::MAX,
            ..Default::default()
        };
        let w = regs_to_wire(&r);
        assert_eq!(w.rip.get(), 0x10_0000);
        assert_eq!(w.r15.get(), u64::MAX);
        assert_eq!(regs_from_wire(&w), r);
        let mut s = kvm_sregs {
            cr3: 0x1000,
            ..Default::default()
        };
        assert_eq!(sregs_to_wire(&s).cr3.get(), 0x1000);
        assert_eq!(cpu_mode(&s), CpuMode::Bits16);
        s.cr0 = 1;
        s.cs.db = 1;
        assert_eq!(cpu_mode(&s), CpuMode::Bits32);
        s.efer = 0x500;
        s.cs.l = 1;
        s.cs.db = 0;
        assert_eq!(cpu_mode(&s), CpuMode::Bits64);
    }
}
