//! Small semantic value types shared by commands, replies and events.

use core::fmt;

/// Page access rights: the set of *allowed* accesses (a missing bit is a restriction).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access(u8);

impl Access {
    /// No access allowed.
    pub const NONE: Access = Access(0);
    /// Read allowed (`KVMI_PAGE_ACCESS_R`).
    pub const R: Access = Access(1 << 0);
    /// Write allowed (`KVMI_PAGE_ACCESS_W`).
    pub const W: Access = Access(1 << 1);
    /// Execute allowed (`KVMI_PAGE_ACCESS_X`).
    pub const X: Access = Access(1 << 2);
    /// Every access allowed (the default; setting it makes the host forget the page).
    pub const RWX: Access = Access(0b111);

    /// Access rights from their bits; `None` if an unknown bit is set.
    pub const fn from_bits(bits: u8) -> Option<Access> {
        if bits & !Self::RWX.0 == 0 {
            Some(Access(bits))
        } else {
            None
        }
    }

    /// The bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every right in `other` is in `self`.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets of rights.
    pub const fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |a: Access, c: char| if self.contains(a) { c } else { '-' };
        write!(
            f,
            "Access({}{}{})",
            flag(Self::R, 'r'),
            flag(Self::W, 'w'),
            flag(Self::X, 'x')
        )
    }
}

/// The vCPU operating mode, as the operand width in bytes (the `mode` field of replies and
/// events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuMode {
    /// 16-bit (real mode or 16-bit protected mode): 2.
    Bits16,
    /// 32-bit protected mode or compatibility mode: 4.
    Bits32,
    /// 64-bit long mode: 8.
    Bits64,
}

impl CpuMode {
    /// The width in bytes.
    pub const fn bytes(self) -> u8 {
        match self {
            Self::Bits16 => 2,
            Self::Bits32 => 4,
            Self::Bits64 => 8,
        }
    }

    /// The mode for a width in bytes; `None` unless 2, 4 or 8.
    pub const fn from_bytes(bytes: u32) -> Option<CpuMode> {
        match bytes {
            2 => Some(Self::Bits16),
            4 => Some(Self::Bits32),
            8 => Some(Self::Bits64),
            _ => None,
        }
    }
}

/// Which vCPUs a VM-wide or per-vCPU request applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VcpuSelector {
    /// Every vCPU (encoded as vCPU `0xffff`).
    All,
    /// One vCPU; its index must not be `0xffff`.
    One(u16),
}

/// A 256-bit map token (`struct kvmi_map_mem_token`, four `u64`s), kept as its 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MapToken(pub [u8; 32]);

impl fmt::Debug for MapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are capabilities: never print them.
        f.write_str("MapToken(..)")
    }
}

/// One entry of `KVMI_SET_PAGE_ACCESS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageAccessEntry {
    /// Guest-physical address.
    pub gpa: u64,
    /// The rights to set.
    pub access: Access,
}

/// One MSR index and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsrEntry {
    /// MSR index.
    pub index: u32,
    /// MSR value.
    pub data: u64,
}

/// Page size for `READ_PHYSICAL` / `WRITE_PHYSICAL`: an access must stay in one page.
pub const PAGE_SIZE: u64 = 4096;

/// Whether `[gpa, gpa + size)` is non-empty and within one 4 KiB page.
pub const fn fits_one_page(gpa: u64, size: u64) -> bool {
    size != 0 && size <= PAGE_SIZE && (gpa & (PAGE_SIZE - 1)) + size <= PAGE_SIZE
}

/// Whether `cr` may be intercepted with `CONTROL_CR` (CR0, CR3, CR4).
pub const fn is_controllable_cr(cr: u32) -> bool {
    matches!(cr, 0 | 3 | 4)
}

/// Whether writes to `msr` may be intercepted with `CONTROL_MSR` (the VMX MSR-bitmap ranges
/// `0..=0x1fff` and `0xc0000000..=0xc0001fff`).
pub const fn is_controllable_msr(msr: u32) -> bool {
    msr <= 0x1fff || (msr >= 0xc000_0000 && msr <= 0xc000_1fff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rejects_unknown_bits() {
        assert_eq!(Access::from_bits(0b101), Some(Access::R.union(Access::X)));
        assert_eq!(Access::from_bits(0b1000), None);
        assert_eq!(Access::from_bits(0xff), None);
        assert_eq!(
            format!("{:?}", Access::from_bits(5).unwrap()),
            "Access(r-x)"
        );
    }

    #[test]
    fn one_page_rule() {
        assert!(fits_one_page(0x1000, 4096));
        assert!(fits_one_page(0x1fff, 1));
        assert!(!fits_one_page(0x1fff, 2));
        assert!(!fits_one_page(0x1000, 0));
        assert!(!fits_one_page(0, u64::MAX));
        assert!(!fits_one_page(u64::MAX, 2));
    }

    #[test]
    fn cr_and_msr_domains() {
        for cr in 0..16 {
            assert_eq!(is_controllable_cr(cr), [0, 3, 4].contains(&cr));
        }
        assert!(is_controllable_msr(0));
        assert!(is_controllable_msr(0x1fff));
        assert!(!is_controllable_msr(0x2000));
        assert!(!is_controllable_msr(0x4000_0000));
        assert!(!is_controllable_msr(0xbfff_ffff));
        assert!(is_controllable_msr(0xc000_0000));
        assert!(is_controllable_msr(0xc000_1fff));
        assert!(!is_controllable_msr(0xc000_2000));
    }

    #[test]
    fn cpu_mode_widths() {
        for m in [CpuMode::Bits16, CpuMode::Bits32, CpuMode::Bits64] {
            assert_eq!(CpuMode::from_bytes(m.bytes().into()), Some(m));
        }
        assert_eq!(CpuMode::from_bytes(0), None);
        assert_eq!(CpuMode::from_bytes(3), None);
    }
}
