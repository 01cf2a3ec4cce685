//! The page-access table: the R/W/X restrictions a tool set per guest page, and the host
//! protection (`mprotect` of the KVM-facing mapping) that makes KVM report the accesses.
//!
//! On PVM a `PROT_READ` page traps guest writes (MMIO write exit, data decoded, rip
//! advanced); a `PROT_NONE` page traps reads (MMIO read exit) and execution (emulation
//! failure with rip inside the page). So: W removed → `PROT_READ`; R or X removed →
//! `PROT_NONE` (then the accesses that are still allowed trap as well and are completed by
//! the introspector without an event).
//!
//! # Only what is enforced is recorded
//! [`AccessTable::set_with`] checks a change against the limit below, has the caller apply
//! the host protection, and records the change only once that succeeded: a refused or failed
//! change leaves the page exactly as it was, in the table and in the host mapping, so
//! GET_PAGE_ACCESS reports only restrictions that are in force.
//!
//! # What a restriction costs, and the per-VM limit
//! The kernel keeps one mapping (VMA) per run of contiguous pages with the same protection
//! and merges neighbours that match, so `mprotect` of a page inside the RAM mapping splits
//! it. A VM whose restrictions form `n` *restricted ranges* (maximal runs of contiguous
//! pages with the same host protection other than read-write) costs at most `2n + 1`
//! mappings for its RAM. Those come out of the process's `vm.max_map_count` (65530 by
//! default), which every thread stack (two mappings: stack and guard page), window grant,
//! library and other VM's RAM of the process share; when it runs out, `mprotect`, `mmap`
//! and thread creation fail with ENOMEM.
//!
//! So each VM may hold at most [`range_limit`] restricted ranges: `vm.max_map_count / 16`,
//! read once from `/proc/sys/vm/max_map_count` (65530 when unreadable), clamped to
//! [`MIN_RANGES`]`..=`[`MAX_RANGES`]: **4095 ranges on a default host**. One VM's
//! restrictions then take at most 1/8 of the process's mappings; even four VMs restricted to
//! the limit in one process leave half of them for threads, window grants and the transient
//! splits of step-through (one page per vCPU). The limit counts ranges, not pages:
//! restricting a page next to a range with the same protection extends that range, one
//! between two such ranges joins them, and a range can always be lifted (page by page from
//! either end, or whole). Any change that would take the VM past the limit — a new range, a
//! different protection inside a range, lifting a page inside a range — is refused with
//! `-KVM_ENOMEM` before `mprotect` is called.
//!
//! Refusals are logged once per burst ([`BURST_GAP`]), not once per page.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use protocol::types::Access;

/// Guest page size.
pub const PAGE: u64 = 4096;

/// `vm.max_map_count` assumed when `/proc/sys/vm/max_map_count` cannot be read (the kernel's
/// default).
pub const DEFAULT_MAX_MAP_COUNT: u64 = 65530;
/// One VM's restricted ranges may number `vm.max_map_count /` this (each range costs up to
/// two mappings, so a VM's restrictions use at most 1/8 of the process's mappings).
pub const MAP_COUNT_SHARE: u64 = 16;
/// The per-VM range limit is never below this.
pub const MIN_RANGES: usize = 16;
/// The per-VM range limit is never above this (hosts with a huge `vm.max_map_count`).
pub const MAX_RANGES: usize = 1 << 16;
/// Refusals less than this apart belong to one burst, which is logged once.
pub const BURST_GAP: Duration = Duration::from_secs(10);

const READ_WRITE: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// The per-VM limit on restricted ranges for a host whose `vm.max_map_count` is
/// `max_map_count`: `max_map_count / 16`, clamped to [`MIN_RANGES`]`..=`[`MAX_RANGES`].
pub fn range_limit_for(max_map_count: u64) -> usize {
    usize::try_from(max_map_count / MAP_COUNT_SHARE)
        .unwrap_or(MAX_RANGES)
        .clamp(MIN_RANGES, MAX_RANGES)
}

/// The per-VM limit on restricted ranges on this host ([`range_limit_for`] of
/// `/proc/sys/vm/max_map_count`, read once per process).
pub fn range_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let read = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let max_map_count = read.unwrap_or_else(|| {
            tracing::warn!(
                "cannot read /proc/sys/vm/max_map_count; assuming {DEFAULT_MAX_MAP_COUNT}"
            );
            DEFAULT_MAX_MAP_COUNT
        });
        let limit = range_limit_for(max_map_count);
        tracing::debug!(max_map_count, limit, "restricted page ranges per VM");
        limit
    })
}

/// The host protection that traps every access `access` does not allow.
pub fn prot_for(access: Access) -> libc::c_int {
    if !access.contains(Access::R) || !access.contains(Access::X) {
        libc::PROT_NONE
    } else if !access.contains(Access::W) {
        libc::PROT_READ
    } else {
        READ_WRITE
    }
}

/// Whether SET_PAGE_ACCESS accepts `access`: write without read (`-w-`, `-wx`) is refused
/// with `-KVM_EINVAL`, as KVMI specifies (EPT has no write-only pages).
pub fn access_is_valid(access: Access) -> bool {
    !access.contains(Access::W) || access.contains(Access::R)
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

/// A change the caller must apply to the host mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtChange {
    /// Page-aligned guest-physical address.
    pub page: u64,
    /// New host protection.
    pub prot: libc::c_int,
}

/// Why [`AccessTable::set_with`] left a page as it was.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused<E> {
    /// The change would take the VM past its limit of restricted ranges (`mprotect` was not
    /// called).
    #[error(
        "page {page:#x}: the change would make {ranges} restricted ranges, above this VM's \
         limit of {limit}"
    )]
    RangeLimit {
        /// The page.
        page: u64,
        /// Restricted ranges the change would have made.
        ranges: usize,
        /// The VM's limit.
        limit: usize,
    },
    /// Applying the host protection failed.
    #[error("page {page:#x}: changing the host protection failed: {error}")]
    Host {
        /// The page.
        page: u64,
        /// What the caller's apply step returned.
        error: E,
    },
}

/// Counts refusals so that a burst of them is logged once.
#[derive(Debug, Default)]
struct RefusalLog {
    /// The last refusal of the current burst.
    last: Option<Instant>,
    /// Refusals in the current burst.
    count: u64,
}

impl RefusalLog {
    /// Records a refusal at `now`. `Some(n)`: it starts a burst (log it); the burst before
    /// had `n` refusals (0: none). `None`: it belongs to the current burst (count it only).
    fn refused(&mut self, now: Instant) -> Option<u64> {
        let within = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < BURST_GAP);
        self.last = Some(now);
        if within {
            self.count += 1;
            return None;
        }
        Some(std::mem::replace(&mut self.count, 1))
    }

    /// Ends the current burst; its number of refusals, if there was one.
    fn finish(&mut self) -> Option<u64> {
        self.last = None;
        let n = std::mem::take(&mut self.count);
        (n > 0).then_some(n)
    }
}

fn log_previous_burst(n: u64) {
    if n > 1 {
        tracing::warn!("{n} page-access changes were refused in that burst");
    }
}

/// Restrictions per page (pages absent from the map are rwx), with the number of restricted
/// ranges they form and this VM's limit on it.
#[derive(Debug)]
pub struct AccessTable {
    pages: HashMap<u64, Access>,
    /// Maximal runs of contiguous pages with the same host protection (not read-write).
    ranges: usize,
    limit: usize,
    refusals: RefusalLog,
}

impl Default for AccessTable {
    /// An empty table with this host's [`range_limit`].
    fn default() -> Self {
        AccessTable::with_limit(range_limit())
    }
}

/// Whether `page`, with host protection `this`, starts a restricted range after a page with
/// protection `prev`.
fn starts_range(prev: libc::c_int, this: libc::c_int) -> bool {
    this != READ_WRITE && this != prev
}

impl AccessTable {
    /// An empty table allowing at most `limit` restricted ranges.
    pub fn with_limit(limit: usize) -> AccessTable {
        AccessTable {
            pages: HashMap::new(),
            ranges: 0,
            limit,
            refusals: RefusalLog::default(),
        }
    }

    /// The most restricted ranges this table allows.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The restricted ranges (maximal runs of contiguous pages with the same host
    /// protection other than read-write) the tracked pages form now.
    pub fn ranges(&self) -> usize {
        self.ranges
    }

    /// The allowed access of the page holding `gpa`.
    pub fn get(&self, gpa: u64) -> Access {
        self.pages
            .get(&(gpa & !(PAGE - 1)))
            .copied()
            .unwrap_or(Access::RWX)
    }

    fn prot_at(&self, page: Option<u64>) -> libc::c_int {
        page.map_or(READ_WRITE, |p| prot_for(self.get(p)))
    }

    /// The number of restricted ranges after `page` changes from protection `old` to `new`.
    fn ranges_after(&self, page: u64, old: libc::c_int, new: libc::c_int) -> usize {
        let left = self.prot_at(page.checked_sub(PAGE));
        let right = self.prot_at(page.checked_add(PAGE));
        let count =
            |this| usize::from(starts_range(left, this)) + usize::from(starts_range(this, right));
        (self.ranges + count(new)).saturating_sub(count(old))
    }

    /// Sets the allowed access of the page holding `gpa` (rwx forgets the page), all or
    /// nothing: a change past the range limit is refused without calling `apply`; otherwise,
    /// when the host protection differs, `apply` must put the new one in place, and the
    /// change is recorded only if it succeeds. Refusals are logged once per burst.
    pub fn set_with<E: std::fmt::Display>(
        &mut self,
        gpa: u64,
        access: Access,
        apply: impl FnOnce(ProtChange) -> Result<(), E>,
    ) -> Result<(), Refused<E>> {
        self.set_at(gpa, access, apply, Instant::now())
    }

    fn set_at<E: std::fmt::Display>(
        &mut self,
        gpa: u64,
        access: Access,
        apply: impl FnOnce(ProtChange) -> Result<(), E>,
        now: Instant,
    ) -> Result<(), Refused<E>> {
        let page = gpa & !(PAGE - 1);
        let (old, new) = (prot_for(self.get(page)), prot_for(access));
        let ranges = self.ranges_after(page, old, new);
        let result = if ranges > self.limit && ranges > self.ranges {
            Err(Refused::RangeLimit {
                page,
                ranges,
                limit: self.limit,
            })
        } else if old != new {
            apply(ProtChange { page, prot: new }).map_err(|error| Refused::Host { page, error })
        } else {
            Ok(())
        };
        match &result {
            Ok(()) => {
                if access == Access::RWX {
                    self.pages.remove(&page);
                } else {
                    self.pages.insert(page, access);
                }
                self.ranges = ranges;
            }
            Err(refused) => {
                if let Some(previous) = self.refusals.refused(now) {
                    log_previous_burst(previous);
                    tracing::warn!(
                        "SET_PAGE_ACCESS refused: {refused}; further refusals within \
                         {BURST_GAP:?} of each other are counted, not logged"
                    );
                }
            }
        }
        result
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

    /// Forgets every restriction (unhook); returns the runs of contiguous tracked pages
    /// (start, length in bytes), ascending, to make read-write again. Each run lies between
    /// read-write pages, so restoring it merges mappings and never needs a new one.
    pub fn clear(&mut self) -> Vec<(u64, u64)> {
        let mut pages: Vec<u64> = self.pages.drain().map(|(p, _)| p).collect();
        pages.sort_unstable();
        self.ranges = 0;
        if let Some(n) = self.refusals.finish() {
            log_previous_burst(n);
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in pages {
            match runs.last_mut() {
                Some((start, len)) if start.checked_add(*len) == Some(page) => *len += PAGE,
                _ => runs.push((page, PAGE)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(bits: u8) -> Access {
        Access::from_bits(bits).unwrap()
    }

    #[test]
    fn write_without_read_is_not_a_valid_access() {
        for bits in 0..8 {
            let valid = access_is_valid(a(bits));
            // -w- (W) and -wx (W|X) are refused; every other combination is accepted.
            assert_eq!(valid, bits != 2 && bits != 6, "access {bits:#05b}");
        }
    }

    fn ok(_: ProtChange) -> Result<(), String> {
        Ok(())
    }

    /// The restricted ranges of `t`, counted from scratch.
    fn count_ranges(t: &AccessTable) -> usize {
        let mut pages = t.pages();
        pages.sort_unstable_by_key(|(p, _)| *p);
        let mut prev: Option<(u64, libc::c_int)> = None;
        let mut n = 0;
        for (page, access) in pages {
            let prot = prot_for(access);
            let joins = prev.is_some_and(|(p, q)| p + PAGE == page && q == prot);
            n += usize::from(!joins);
            prev = Some((page, prot));
        }
        n
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
    fn table_tracks_pages_and_applies_only_protection_changes() {
        let mut t = AccessTable::with_limit(100);
        assert_eq!(t.get(0x5123), Access::RWX);
        let mut applied = Vec::new();
        let mut set = |t: &mut AccessTable, gpa, access| {
            t.set_with(gpa, access, |c| {
                applied.push(c);
                Ok::<(), String>(())
            })
            .unwrap();
        };
        set(&mut t, 0x5123, a(0b101));
        assert!(t.restricts(0x5ff8, AccessKind::Write));
        assert!(!t.restricts(0x5ff8, AccessKind::Read));
        assert!(!t.restricts(0x6000, AccessKind::Write));
        set(&mut t, 0x5000, a(0b011));
        assert!(t.restricts(0x5000, AccessKind::Exec));
        // Same protection: recorded, nothing to apply.
        set(&mut t, 0x5000, a(0b001));
        assert_eq!(t.get(0x5000), a(0b001));
        set(&mut t, 0x9000, Access::NONE);
        assert_eq!(t.len(), 2);
        // rwx forgets the page and restores read-write.
        set(&mut t, 0x5000, Access::RWX);
        assert_eq!(
            applied,
            [
                (0x5000, libc::PROT_READ),
                (0x5000, libc::PROT_NONE),
                (0x9000, libc::PROT_NONE),
                (0x5000, libc::PROT_READ | libc::PROT_WRITE),
            ]
            .map(|(page, prot)| ProtChange { page, prot })
        );
        assert_eq!((t.len(), t.ranges()), (1, 1));
        assert_eq!(t.clear(), vec![(0x9000, PAGE)]);
        assert!(t.is_empty());
        assert_eq!(t.ranges(), 0);
    }

    #[test]
    fn a_failed_host_change_leaves_no_trace() {
        let mut t = AccessTable::with_limit(100);
        let err = t.set_with(0x7000, a(0b101), |_| Err("ENOMEM")).unwrap_err();
        assert_eq!(
            err,
            Refused::Host {
                page: 0x7000,
                error: "ENOMEM"
            }
        );
        assert_eq!(t.get(0x7000), Access::RWX);
        assert_eq!((t.len(), t.ranges()), (0, 0));
        // A failed lift keeps the page restricted: it still is.
        t.set_with(0x7000, a(0b101), ok).unwrap();
        assert!(t.set_with(0x7000, Access::RWX, |_| Err("EINTR")).is_err());
        assert_eq!(t.get(0x7000), a(0b101));
        assert_eq!(t.ranges(), 1);
    }

    #[test]
    fn the_limit_counts_ranges_and_refuses_without_applying() {
        let mut t = AccessTable::with_limit(3);
        let ro = a(0b101);
        for page in [0, 2, 4] {
            t.set_with(page * PAGE, ro, ok).unwrap();
        }
        assert_eq!(t.ranges(), 3);
        // A fourth range: refused before apply is called, and not recorded.
        let err = t
            .set_with(6 * PAGE, ro, |_| -> Result<(), String> {
                panic!("apply called past the limit")
            })
            .unwrap_err();
        assert!(matches!(
            err,
            Refused::RangeLimit {
                page: 0x6000,
                ranges: 4,
                limit: 3
            }
        ));
        assert_eq!(t.get(6 * PAGE), Access::RWX);
        // Extending a range and joining two cost nothing.
        t.set_with(5 * PAGE, ro, ok).unwrap();
        assert_eq!(t.ranges(), 3);
        t.set_with(PAGE, ro, ok).unwrap();
        assert_eq!(t.ranges(), 2);
        t.set_with(7 * PAGE, ro, ok).unwrap();
        assert_eq!(t.ranges(), 3);
        // Another protection inside a range splits it in three: refused at the limit.
        assert!(matches!(
            t.set_with(PAGE, Access::NONE, ok),
            Err(Refused::RangeLimit { ranges: 5, .. })
        ));
        // Lifting a page inside a range splits it: refused too; from its end it is fine.
        assert!(t.set_with(PAGE, Access::RWX, ok).is_err());
        assert_eq!(t.get(PAGE), ro);
        t.set_with(0, Access::RWX, ok).unwrap();
        assert_eq!(t.ranges(), 3);
        // Adjacent ranges of different protections are distinct ranges.
        t.set_with(6 * PAGE, Access::NONE, ok).unwrap_err();
        assert_eq!(t.ranges(), count_ranges(&t));
        assert_eq!(
            t.clear(),
            vec![(PAGE, 2 * PAGE), (4 * PAGE, 2 * PAGE), (7 * PAGE, PAGE)]
        );
    }

    #[test]
    fn the_range_count_matches_a_recount_after_any_changes() {
        let mut t = AccessTable::with_limit(usize::MAX);
        let choices = [Access::RWX, a(0b101), a(0b011), Access::NONE, a(0b100)];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            // xorshift64: a fixed pseudo-random sequence.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = (x % 64) * PAGE;
            let access = choices[((x >> 32) % choices.len() as u64) as usize];
            t.set_with(page, access, ok).unwrap();
            assert_eq!(
                t.ranges(),
                count_ranges(&t),
                "after {access:?} at {page:#x}"
            );
        }
        // Page 0 and the top of the address space have one neighbour each.
        t.set_with(0, Access::NONE, ok).unwrap();
        t.set_with(u64::MAX, Access::NONE, ok).unwrap();
        assert_eq!(t.ranges(), count_ranges(&t));
    }

    #[test]
    fn the_limit_is_a_sixteenth_of_the_map_count_within_bounds() {
        assert_eq!(range_limit_for(DEFAULT_MAX_MAP_COUNT), 4095);
        assert_eq!(range_limit_for(262_144), 16_384);
        assert_eq!(range_limit_for(0), MIN_RANGES);
        assert_eq!(range_limit_for(u64::MAX), MAX_RANGES);
        // The mappings a VM's ranges add to its RAM mapping (at most 2 per range) are at
        // most an eighth of the map count.
        for count in [DEFAULT_MAX_MAP_COUNT, 262_144, 1 << 20, 1 << 40] {
            let added = 2 * range_limit_for(count) as u64;
            assert!(added <= count / 8, "{added} of {count}");
        }
        let limit = range_limit();
        assert!((MIN_RANGES..=MAX_RANGES).contains(&limit));
        assert_eq!(AccessTable::default().limit(), limit);
    }

    #[test]
    fn refusals_are_logged_once_per_burst() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.refused(t0), Some(0));
        for k in 1..1000 {
            assert_eq!(log.refused(t0 + Duration::from_millis(k)), None);
        }
        // A quiet gap ends the burst: the next refusal is logged with the burst's count.
        let later = t0 + Duration::from_millis(999) + BURST_GAP;
        assert_eq!(log.refused(later), Some(1000));
        assert_eq!(log.finish(), Some(1));
        assert_eq!(log.finish(), None);
        assert_eq!(log.refused(later), Some(0));
    }
}
