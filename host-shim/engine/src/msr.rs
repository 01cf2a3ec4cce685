//! MSR write interception with KVM's MSR filter: the MSRs a tool asked for (CONTROL_MSR) plus
//! the event-header MSRs whose shadow the introspector keeps (so building an event costs no
//! KVM_GET_MSRS). Writes to filtered MSRs exit to userspace, which completes them with
//! KVM_SET_MSRS (or not, if the tool says so).

use vmm::sync::RankedMutex;

use kvm_bindings::{KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER, kvm_enable_cap};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

/// IA32_SYSENTER_CS/ESP/EIP.
pub const MSR_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_SYSENTER_EIP: u32 = 0x176;
/// IA32_PAT.
pub const MSR_PAT: u32 = 0x277;
/// STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;

/// The event-header MSRs kept in a shadow (EFER comes from sregs).
pub const SHADOWED: [u32; 7] = [
    MSR_SYSENTER_CS,
    MSR_SYSENTER_ESP,
    MSR_SYSENTER_EIP,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_PAT,
];

/// The x2APIC MSRs (0x800–0x8ff). KVM's MSR filter does not apply to them (KVM handles them
/// in the local APIC, whatever the filter says), so no MSR event can come for one:
/// CONTROL_MSR refuses them with `-KVM_EINVAL`.
pub const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// Whether CONTROL_MSR can intercept writes to `msr` with the MSR filter (the v4 ranges
/// themselves are checked when the command is decoded).
pub fn filterable(msr: u32) -> bool {
    !X2APIC_MSRS.contains(&msr)
}

/// One filter range: `base` and a deny bitmap (bit clear = write exits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// First MSR of the range.
    pub base: u32,
    /// Number of MSRs covered.
    pub count: u32,
    /// KVM's bitmap: bit set = allowed, clear = filtered.
    pub bitmap: Vec<u8>,
}

/// Groups MSRs into at most two ranges (low 0–0x1fff, high 0xc0000000–0xc0001fff), each
/// spanning its lowest to highest MSR, with exactly `msrs` filtered.
pub fn ranges_for(msrs: &[u32]) -> Vec<Range> {
    let mut out = Vec::new();
    for high in [false, true] {
        let mut group: Vec<u32> = msrs
            .iter()
            .copied()
            .filter(|m| (*m >= 0xc000_0000) == high)
            .collect();
        group.sort_unstable();
        group.dedup();
        let (Some(&first), Some(&last)) = (group.first(), group.last()) else {
            continue;
        };
        let count = last - first + 1;
        let mut bitmap = vec![0xffu8; count.div_ceil(8) as usize];
        for m in group {
            let bit = (m - first) as usize;
            bitmap[bit / 8] &= !(1 << (bit % 8));
        }
        out.push(Range {
            base: first,
            count,
            bitmap,
        });
    }
    out
}

/// The VM's MSR filter as the introspector manages it.
#[derive(Debug)]
pub struct MsrFilter {
    enabled: bool,
    current: RankedMutex<Vec<u32>>,
}

impl MsrFilter {
    /// Enables user-space MSR exits for filtered MSRs on `vm` (no MSR is filtered yet).
    pub fn new(vm: &VmFd) -> MsrFilter {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
        let enabled = match vm.enable_cap(&cap) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("KVM_CAP_X86_USER_SPACE_MSR unavailable: {e}");
                false
            }
        };
        MsrFilter {
            enabled,
            current: RankedMutex::new(crate::lock_order::MSR_FILTER, Vec::new()),
        }
    }

    /// Filters writes to `tool_msrs` plus the shadowed event-header MSRs.
    pub fn apply(&self, vm: &VmFd, tool_msrs: &[u32]) -> Result<(), kvm_ioctls::Error> {
        if !self.enabled {
            return Err(kvm_ioctls::Error::new(libc::ENOTSUP));
        }
        let mut all: Vec<u32> = tool_msrs.iter().chain(SHADOWED.iter()).copied().collect();
        all.sort_unstable();
        all.dedup();
        let mut current = self.current.lock();
        if *current == all {
            return Ok(());
        }
        let ranges = ranges_for(&all);
        let kvm_ranges: Vec<MsrFilterRange<'_>> = ranges
            .iter()
            .map(|r| MsrFilterRange {
                flags: MsrFilterRangeFlags::WRITE,
                base: r.base,
                msr_count: r.count,
                bitmap: &r.bitmap,
            })
            .collect();
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &kvm_ranges)?;
        *current = all;
        Ok(())
    }

    /// Removes every filter (unhook).
    pub fn clear(&self, vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
        if !self.enabled {
            return Ok(());
        }
        let mut current = self.current.lock();
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[])?;
        current.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x2apic_msrs_are_not_filterable() {
        for m in [0x800, 0x830, 0x8ff] {
            assert!(!filterable(m), "{m:#x}");
        }
        for m in [0x7ff, 0x900, MSR_LSTAR, MSR_SYSENTER_CS] {
            assert!(filterable(m), "{m:#x}");
        }
    }

    #[test]
    fn ranges_filter_exactly_the_listed_msrs() {
        let r = ranges_for(&[0x176, 0x174, MSR_LSTAR, 0x277, 0x174]);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].base, 0x174);
        assert_eq!(r[0].count, 0x277 - 0x174 + 1);
        let denied = |r: &Range, m: u32| {
            let b = (m - r.base) as usize;
            r.bitmap[b / 8] & (1 << (b % 8)) == 0
        };
        assert!(denied(&r[0], 0x174));
        assert!(!denied(&r[0], 0x175));
        assert!(denied(&r[0], 0x176));
        assert!(denied(&r[0], 0x277));
        assert!(!denied(&r[0], 0x200));
        assert_eq!(r[1].base, MSR_LSTAR);
        assert_eq!(r[1].count, 1);
        assert!(denied(&r[1], MSR_LSTAR));
        assert!(ranges_for(&[]).is_empty());
    }
}
