//! The page-access table: the R/W/X restrictions a tool set per guest page, and the host
//! protection (`mprotect` of the KVM-facing mapping) that makes KVM report the accesses.
//!
//! On PVM a `PROT_READ` page traps guest writes (MMIO write exit, data decoded, rip
//! advanced); a `PROT_NONE` page traps reads (MMIO read exit) and execution (emulation
//! failure with rip inside the page). So: W removed → `PROT_READ`; R or X removed →
//! `PROT_NONE` (then the accesses that are still allowed trap as well and are completed by
//! the introspector without an event).

use std::collections::HashMap;

use protocol::types::Access;

/// Guest page size.
pub const PAGE: u64 = 4096;

/// The host protection that traps every access `access` does not allow.
pub fn prot_for(access: Access) -> libc::c_int {
    if !access.contains(Access::R) || !access.contains(Access::X) {
        libc::PROT_NONE
    } else if !access.contains(Access::W) {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    }
}

/// The kind of a guest access to a tracked page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Exec,
}

impl AccessKind {
    /// The access bit this kind needs.
    pub fn bit(self) -> Access {
        match self {
            AccessKind::Read => Access::R,
            AccessKind::Write => Access::W,
            AccessKind::Exec => Access::X,
        }
    }
}

/// Restrictions per page (pages absent from the map are rwx).
#[derive(Debug, Default)]
pub struct AccessTable {
    pages: HashMap<u64, Access>,
}

/// A change the caller must apply to the host mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtChange {
    /// Page-aligned guest-physical address.
    pub page: u64,
    /// New host protection.
    pub prot: libc::c_int,
}

impl AccessTable {
    /// The allowed access of the page holding `gpa`.
    pub fn get(&self, gpa: u64) -> Access {
        self.pages
            .get(&(gpa & !(PAGE - 1)))
            .copied()
            .unwrap_or(Access::RWX)
    }

    /// Sets the allowed access of the page holding `gpa`; rwx forgets the page. Returns the
    /// host protection change, if the protection differs.
    pub fn set(&mut self, gpa: u64, access: Access) -> Option<ProtChange> {
        let page = gpa & !(PAGE - 1);
        let old = self.get(page);
        if access == Access::RWX {
            self.pages.remove(&page);
        } else {
            self.pages.insert(page, access);
        }
        (prot_for(old) != prot_for(access)).then(|| ProtChange {
            page,
            prot: prot_for(access),
        })
    }

    /// Whether an access of `kind` to `gpa` is restricted (must raise an event).
    pub fn restricts(&self, gpa: u64, kind: AccessKind) -> bool {
        !self.get(gpa).contains(kind.bit())
    }

    /// Every tracked page with its allowed access.
    pub fn pages(&self) -> Vec<(u64, Access)> {
        self.pages.iter().map(|(p, a)| (*p, *a)).collect()
    }

    /// Number of tracked pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when no page is tracked.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Forgets every restriction; returns the pages to make read-write again (unhook).
    pub fn clear(&mut self) -> Vec<u64> {
        let mut pages: Vec<u64> = self.pages.drain().map(|(p, _)| p).collect();
        pages.sort_unstable();
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(bits: u8) -> Access {
        Access::from_bits(bits).unwrap()
    }

    #[test]
    fn protections_trap_exactly_the_removed_rights() {
        assert_eq!(prot_for(Access::RWX), libc::PROT_READ | libc::PROT_WRITE);
        assert_eq!(prot_for(a(0b101)), libc::PROT_READ); // r-x: writes trap
        assert_eq!(prot_for(a(0b011)), libc::PROT_NONE); // rw-: exec traps
        assert_eq!(prot_for(a(0b110)), libc::PROT_NONE); // -wx: reads trap
        assert_eq!(prot_for(Access::NONE), libc::PROT_NONE);
    }

    #[test]
    fn table_tracks_pages_and_reports_changes() {
        let mut t = AccessTable::default();
        assert_eq!(t.get(0x5123), Access::RWX);
        let c = t.set(0x5123, a(0b101)).unwrap();
        assert_eq!(
            c,
            ProtChange {
                page: 0x5000,
                prot: libc::PROT_READ
            }
        );
        assert!(t.restricts(0x5ff8, AccessKind::Write));
        assert!(!t.restricts(0x5ff8, AccessKind::Read));
        assert!(!t.restricts(0x6000, AccessKind::Write));
        // Same protection: no change to apply.
        assert_eq!(t.set(0x5000, a(0b101)), None);
        assert_eq!(t.set(0x5000, a(0b001)).unwrap().prot, libc::PROT_NONE);
        assert!(t.restricts(0x5000, AccessKind::Exec));
        t.set(0x9000, Access::NONE);
        assert_eq!(t.len(), 2);
        // rwx forgets the page and restores read-write.
        let c = t.set(0x5000, Access::RWX).unwrap();
        assert_eq!(c.prot, libc::PROT_READ | libc::PROT_WRITE);
        assert_eq!(t.len(), 1);
        assert_eq!(t.clear(), vec![0x9000]);
        assert!(t.is_empty());
    }
}
