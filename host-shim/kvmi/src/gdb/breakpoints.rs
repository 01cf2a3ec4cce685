//! Breakpoint and watchpoint bookkeeping: which guest-physical pages carry software
//! breakpoints (execute traps) and watchpoints (read/write traps), and the page access each
//! page needs. Pure: the target applies the changes with `SET_PAGE_ACCESS`.

use std::collections::{BTreeMap, BTreeSet};

use protocol::types::Access;

use super::memory::PAGE;

/// What a watchpoint traps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchKind {
    /// Writes (gdb `watch`, Z2).
    Write,
    /// Reads (gdb `rwatch`, Z3).
    Read,
    /// Reads and writes (gdb `awatch`, Z4).
    Access,
}

impl WatchKind {
    /// Whether an access of `mode` (PF event bits: 1 read, 2 write) triggers this watch.
    pub fn triggered_by(self, mode: u32) -> bool {
        let read = mode & 1 != 0;
        let write = mode & 2 != 0;
        match self {
            WatchKind::Write => write,
            WatchKind::Read => read && !write,
            WatchKind::Access => read || write,
        }
    }
}

/// One watched range: guest-virtual `[gva, gva + len)`, backed by guest-physical pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// First watched byte (as gdb gave it).
    pub gva: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it traps.
    pub kind: WatchKind,
    /// `(gpa, len)` of each page piece, in gva order.
    pub pieces: Vec<(u64, u64)>,
}

impl Watch {
    /// The watched gva at guest-physical `gpa`, if `[gpa, gpa + size)` overlaps the range.
    pub fn hit(&self, gpa: u64, size: u64) -> Option<u64> {
        let mut gva = self.gva;
        for &(start, len) in &self.pieces {
            let end = start + len;
            if gpa < end && gpa.saturating_add(size.max(1)) > start {
                return Some(gva + gpa.saturating_sub(start));
            }
            gva += len;
        }
        None
    }
}

/// A software breakpoint: a gva and the guest-physical page its byte lies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SwBreakpoint {
    /// The breakpoint's address.
    pub gva: u64,
    /// Its guest-physical address.
    pub gpa: u64,
}

/// Every software breakpoint and watchpoint, and the page access they imply.
#[derive(Debug, Default)]
pub struct Bookkeeping {
    sw: BTreeSet<SwBreakpoint>,
    watches: Vec<Watch>,
}

/// The page frame of `gpa`.
pub fn page_of(gpa: u64) -> u64 {
    gpa & !(PAGE - 1)
}

impl Bookkeeping {
    /// The access page `page` needs: no X under a software breakpoint, no W under a write
    /// watch, neither R nor W under a read watch (KVMI has no write-only pages).
    pub fn access_for(&self, page: u64) -> Access {
        let mut r = true;
        let mut w = true;
        let mut x = true;
        if self.sw.iter().any(|b| page_of(b.gpa) == page) {
            x = false;
        }
        for watch in &self.watches {
            let on_page = watch.pieces.iter().any(|&(gpa, _)| page_of(gpa) == page);
            if !on_page {
                continue;
            }
            match watch.kind {
                WatchKind::Write => w = false,
                WatchKind::Read | WatchKind::Access => {
                    r = false;
                    w = false;
                }
            }
        }
        let mut bits = 0;
        if r {
            bits |= Access::R.bits();
        }
        if w {
            bits |= Access::W.bits();
        }
        if x {
            bits |= Access::X.bits();
        }
        Access::from_bits(bits).unwrap_or(Access::RWX)
    }

    /// Adds a software breakpoint; returns the pages whose access changes, with the new
    /// access (empty if the breakpoint exists or its page is restricted already).
    pub fn add_sw(&mut self, bp: SwBreakpoint) -> Vec<(u64, Access)> {
        let page = page_of(bp.gpa);
        let before = self.access_for(page);
        self.sw.insert(bp);
        changed(page, before, self.access_for(page))
    }

    /// Removes a software breakpoint at `gva`; `None` if there is none, else the page
    /// changes (the page's access comes back when its last breakpoint goes).
    pub fn remove_sw(&mut self, gva: u64) -> Option<Vec<(u64, Access)>> {
        let bp = *self.sw.iter().find(|b| b.gva == gva)?;
        let page = page_of(bp.gpa);
        let before = self.access_for(page);
        self.sw.remove(&bp);
        Some(changed(page, before, self.access_for(page)))
    }

    /// The software breakpoint at `gva` whose page is `gpa`'s (`gpa` unknown: any).
    pub fn sw_at(&self, gva: u64, gpa: Option<u64>) -> Option<SwBreakpoint> {
        self.sw
            .iter()
            .find(|b| b.gva == gva && gpa.is_none_or(|g| page_of(g) == page_of(b.gpa)))
            .copied()
    }

    /// Number of software breakpoints.
    pub fn sw_count(&self) -> usize {
        self.sw.len()
    }

    /// Adds a watchpoint; returns the page changes.
    pub fn add_watch(&mut self, watch: Watch) -> Vec<(u64, Access)> {
        let pages = pages_of(&watch);
        let before: Vec<Access> = pages.iter().map(|&p| self.access_for(p)).collect();
        self.watches.push(watch);
        diff(self, &pages, &before)
    }

    /// Removes the watchpoint `(gva, len, kind)`; `None` if there is none.
    pub fn remove_watch(
        &mut self,
        gva: u64,
        len: u64,
        kind: WatchKind,
    ) -> Option<Vec<(u64, Access)>> {
        let at = self
            .watches
            .iter()
            .position(|w| w.gva == gva && w.len == len && w.kind == kind)?;
        let pages = pages_of(&self.watches[at]);
        let before: Vec<Access> = pages.iter().map(|&p| self.access_for(p)).collect();
        self.watches.remove(at);
        Some(diff(self, &pages, &before))
    }

    /// The watch an access of `mode` at `gpa` triggers, with the watched gva it touched.
    pub fn watch_hit(&self, gpa: u64, mode: u32) -> Option<(&Watch, u64)> {
        self.watches
            .iter()
            .filter(|w| w.kind.triggered_by(mode))
            .find_map(|w| w.hit(gpa, 1).map(|gva| (w, gva)))
    }

    /// Every page with a restriction, and its access.
    pub fn restricted_pages(&self) -> Vec<(u64, Access)> {
        let mut pages: BTreeSet<u64> = self.sw.iter().map(|b| page_of(b.gpa)).collect();
        for w in &self.watches {
            pages.extend(pages_of(w));
        }
        pages
            .into_iter()
            .map(|p| (p, self.access_for(p)))
            .filter(|(_, a)| *a != Access::RWX)
            .collect()
    }
}

fn changed(page: u64, before: Access, after: Access) -> Vec<(u64, Access)> {
    if before == after {
        Vec::new()
    } else {
        vec![(page, after)]
    }
}

fn pages_of(watch: &Watch) -> Vec<u64> {
    let set: BTreeMap<u64, ()> = watch
        .pieces
        .iter()
        .map(|&(gpa, _)| (page_of(gpa), ()))
        .collect();
    set.into_keys().collect()
}

fn diff(book: &Bookkeeping, pages: &[u64], before: &[Access]) -> Vec<(u64, Access)> {
    pages
        .iter()
        .zip(before)
        .filter_map(|(&p, &b)| {
            let a = book.access_for(p);
            (a != b).then_some((p, a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx() -> Access {
        Access::R.union(Access::X)
    }

    fn rw() -> Access {
        Access::R.union(Access::W)
    }

    #[test]
    fn many_sw_breakpoints_share_a_page_and_the_last_removal_restores_it() {
        let mut book = Bookkeeping::default();
        let a = SwBreakpoint {
            gva: 0xffff_8000_0010_0010,
            gpa: 0x10_0010,
        };
        let b = SwBreakpoint {
            gva: 0xffff_8000_0010_0020,
            gpa: 0x10_0020,
        };
        let c = SwBreakpoint {
            gva: 0xffff_8000_0020_0000,
            gpa: 0x20_0000,
        };
        assert_eq!(book.add_sw(a), vec![(0x10_0000, rw())]);
        assert_eq!(book.add_sw(b), vec![], "same page: nothing to change");
        assert_eq!(book.add_sw(c), vec![(0x20_0000, rw())]);
        assert_eq!(book.sw_count(), 3);
        assert_eq!(book.sw_at(b.gva, Some(0x10_0fff)), Some(b));
        assert_eq!(
            book.sw_at(b.gva, Some(0x30_0000)),
            None,
            "other address space"
        );
        assert_eq!(book.remove_sw(a.gva), Some(vec![]), "b still on the page");
        assert_eq!(book.remove_sw(a.gva), None, "already gone");
        assert_eq!(book.remove_sw(b.gva), Some(vec![(0x10_0000, Access::RWX)]));
        assert_eq!(book.restricted_pages(), vec![(0x20_0000, rw())]);
        assert_eq!(book.remove_sw(c.gva), Some(vec![(0x20_0000, Access::RWX)]));
        assert!(book.restricted_pages().is_empty());
    }

    #[test]
    fn watches_restrict_w_or_r_and_combine_with_breakpoints() {
        let mut book = Bookkeeping::default();
        let write = Watch {
            gva: 0x7000_0ffc,
            len: 8,
            kind: WatchKind::Write,
            pieces: vec![(0x5ffc, 4), (0x9000, 4)],
        };
        assert_eq!(
            book.add_watch(write.clone()),
            vec![(0x5000, rx()), (0x9000, rx())]
        );
        // A read watch on the same first page takes R and W away.
        let read = Watch {
            gva: 0x7000_0010,
            len: 4,
            kind: WatchKind::Read,
            pieces: vec![(0x5010, 4)],
        };
        assert_eq!(book.add_watch(read), vec![(0x5000, Access::X)]);
        // A breakpoint there leaves no right at all.
        let bp = SwBreakpoint {
            gva: 0x7000_0020,
            gpa: 0x5020,
        };
        assert_eq!(book.add_sw(bp), vec![(0x5000, Access::NONE)]);
        assert_eq!(
            book.remove_watch(0x7000_0010, 4, WatchKind::Read),
            Some(vec![(0x5000, Access::R)])
        );
        assert_eq!(book.remove_watch(0x7000_0010, 4, WatchKind::Read), None);
        assert_eq!(book.remove_sw(bp.gva), Some(vec![(0x5000, rx())]));
        assert_eq!(
            book.remove_watch(write.gva, 8, WatchKind::Write),
            Some(vec![(0x5000, Access::RWX), (0x9000, Access::RWX)])
        );
    }

    #[test]
    fn watch_range_overlap_maps_gpa_back_to_gva() {
        let w = Watch {
            gva: 0x7000_0ffc,
            len: 8,
            kind: WatchKind::Access,
            pieces: vec![(0x5ffc, 4), (0x9000, 4)],
        };
        assert_eq!(w.hit(0x5ffc, 1), Some(0x7000_0ffc));
        assert_eq!(w.hit(0x5fff, 1), Some(0x7000_0fff));
        assert_eq!(w.hit(0x9003, 1), Some(0x7000_1003));
        assert_eq!(w.hit(0x9004, 1), None);
        assert_eq!(w.hit(0x5ffb, 1), None);
        assert_eq!(
            w.hit(0x5ff8, 8),
            Some(0x7000_0ffc),
            "an 8-byte access reaching in"
        );
        assert_eq!(w.hit(0x5000, 1), None, "same page, outside the range");
    }

    #[test]
    fn watch_kinds_match_access_modes() {
        let mut book = Bookkeeping::default();
        book.add_watch(Watch {
            gva: 0x100,
            len: 4,
            kind: WatchKind::Write,
            pieces: vec![(0x100, 4)],
        });
        assert!(book.watch_hit(0x101, 2).is_some());
        assert!(
            book.watch_hit(0x101, 1).is_none(),
            "a read does not trip `watch`"
        );
        assert!(WatchKind::Read.triggered_by(1));
        assert!(!WatchKind::Read.triggered_by(2));
        assert!(WatchKind::Access.triggered_by(1) && WatchKind::Access.triggered_by(2));
    }
}
