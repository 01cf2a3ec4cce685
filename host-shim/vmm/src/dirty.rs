//! Dirty-page tracking of guest RAM: KVM's dirty log of memslot 0 merged with a software
//! bitmap of the host's own writes.
//!
//! KVM logs only the guest's writes (through its page tables). The host writes into guest RAM
//! too — [`GuestRam::write`] (boot tables, the boot record, tools' gates) and the engine's
//! private alias (`kvmi-engine`'s `RamAlias`: WRITE_PHYSICAL, the completion of a trapped
//! write, every other write the engine makes) — and those bytes never reach KVM's log. Every such
//! path calls [`SoftDirty::mark`] *after* its copy; while a [`DirtyLog`] is active the pages
//! are recorded in the software bitmap, and [`DirtyLog::fetch`] merges it into KVM's. While no
//! log is active `mark` is one relaxed atomic load.
//!
//! Not covered (documented, not tracked): pages of this RAM replaced by another memfd's
//! pages with [`GuestRam::share_from`] (the dump reads the RAM's own memfd, which no longer
//! backs those addresses; nothing in the shim uses it on a target), and writes by another
//! process or VM that maps this RAM's memfd writable ([`crate::window::RemapWindow::map_shared`]
//! of a target's pages; the appliance link maps target pages read-only only).
//!
//! Only one [`DirtyLog`] may exist per RAM at a time (a second one gets
//! [`VmError::Busy`]): fetching clears the log, so two consumers
//! would steal each other's pages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;

use crate::error::VmError;
use crate::memory::{GuestRam, PAGE_SIZE};

/// The software half of dirty tracking: one bit per page of a [`GuestRam`], set by host
/// writes while a [`DirtyLog`] is active.
#[derive(Debug)]
pub struct SoftDirty {
    /// Host writes are recorded (a log is active).
    enabled: AtomicBool,
    /// A [`DirtyLog`] owns this RAM's tracking.
    claimed: AtomicBool,
    bits: Box<[AtomicU64]>,
    pages: u64,
}

impl SoftDirty {
    /// A bitmap for `size` bytes of RAM (all clear, recording off).
    pub fn new(size: u64) -> SoftDirty {
        let pages = size.div_ceil(PAGE_SIZE);
        SoftDirty {
            enabled: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Records that the host wrote `gpa..gpa+len` (call after the copy). One atomic load when
    /// no log is active; the range is clipped to RAM.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.enabled.load(Ordering::SeqCst) {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let last = (gpa.saturating_add(len - 1) / PAGE_SIZE).min(self.pages.saturating_sub(1));
        for page in first..=last {
            if let Some(word) = self.bits.get((page / 64) as usize) {
                word.fetch_or(1 << (page % 64), Ordering::SeqCst);
            }
        }
    }

    /// Whether host writes are being recorded.
    pub fn is_recording(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Takes (and clears) the recorded bits, OR-ing them into `out`.
    fn take_into(&self, out: &mut [u64]) {
        for (o, w) in out.iter_mut().zip(self.bits.iter()) {
            *o |= w.swap(0, Ordering::SeqCst);
        }
    }

    fn clear(&self) {
        for w in self.bits.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }
}

/// A set of dirty pages of guest RAM (bit `n` = page at `n * 4096`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An empty set for `size` bytes of RAM.
    pub fn empty(size: u64) -> DirtyBitmap {
        let pages = size.div_ceil(PAGE_SIZE);
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// A set from KVM-layout words (bits beyond `size` are dropped).
    pub fn from_words(mut words: Vec<u64>, size: u64) -> DirtyBitmap {
        let pages = size.div_ceil(PAGE_SIZE);
        words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (pages % 64)) - 1;
        }
        DirtyBitmap { words, pages }
    }

    /// Adds page `page` (ignored beyond RAM).
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Whether page `page` is in the set.
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Bytes of the dirty pages.
    pub fn bytes(&self) -> u64 {
        self.count() * PAGE_SIZE
    }

    /// The dirty pages' indexes, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// The dirty pages as maximal runs `(gpa, len)` in bytes, ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for page in self.pages() {
            let gpa = page * PAGE_SIZE;
            match out.last_mut() {
                Some((start, len)) if *start + *len == gpa => *len += PAGE_SIZE,
                _ => out.push((gpa, PAGE_SIZE)),
            }
        }
        out
    }

    /// Adds every page of `other` (same size).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }
}

/// KVM dirty logging of a VM's RAM memslot, plus the software log of host writes; stopped
/// (the memslot's flags restored) when dropped.
#[derive(Debug)]
pub struct DirtyLog {
    // The VM fd is declared (and dropped) before the RAM it maps.
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    slot: u32,
    flags: u32,
    gpa: u64,
}

impl DirtyLog {
    /// Starts logging `ram` (registered in `vm` as a memslot): re-registers the slot with
    /// `KVM_MEM_LOG_DIRTY_PAGES` added to its flags and turns on the software log. Fails if
    /// another log of this RAM is active or the RAM is not a registered memslot.
    pub fn start(vm: Arc<VmFd>, ram: Arc<GuestRam>) -> Result<DirtyLog, VmError> {
        let Some((slot, flags, gpa)) = ram.memslot() else {
            return Err(VmError::Config(
                "dirty logging: the RAM is not registered as a memslot".into(),
            ));
        };
        let soft = ram.soft_dirty();
        if soft
            .claimed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(VmError::Busy(
                "dirty logging is already active on this VM's RAM",
            ));
        }
        soft.clear();
        soft.enabled.store(true, Ordering::SeqCst);
        let log = DirtyLog {
            vm,
            ram,
            slot,
            flags,
            gpa,
        };
        // On failure the log is dropped: recording off, claim released, flags re-set.
        log.set_flags(flags | KVM_MEM_LOG_DIRTY_PAGES)?;
        tracing::debug!(slot, flags, "dirty logging started");
        Ok(log)
    }

    fn set_flags(&self, flags: u32) -> Result<(), VmError> {
        // SAFETY: the RAM's mapping is the one already registered as this slot, and `self`
        // keeps the RAM alive at least as long as the VM fd it holds.
        unsafe {
            crate::memory::register_slot(
                &self.vm,
                self.slot,
                self.gpa,
                self.ram.host_base(),
                self.ram.size(),
                flags,
            )
        }
    }

    /// The RAM being logged.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Fetches and clears the pages dirtied since the start or the previous fetch: KVM's log
    /// (`KVM_GET_DIRTY_LOG`) merged with the host's writes.
    pub fn fetch(&self) -> Result<DirtyBitmap, VmError> {
        let size = self.ram.size();
        let words = self
            .vm
            .get_dirty_log(self.slot, size as usize)
            .map_err(VmError::kvm("get dirty log"))?;
        let mut words = words;
        words.resize(size.div_ceil(PAGE_SIZE).div_ceil(64) as usize, 0);
        self.ram.soft_dirty().take_into(&mut words);
        Ok(DirtyBitmap::from_words(words, size))
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if let Err(e) = self.set_flags(self.flags) {
            tracing::error!("cannot stop dirty logging of memslot {}: {e}", self.slot);
        }
        let soft = self.ram.soft_dirty();
        soft.enabled.store(false, Ordering::SeqCst);
        soft.clear();
        soft.claimed.store(false, Ordering::SeqCst);
        tracing::debug!(slot = self.slot, "dirty logging stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_marks_only_while_recording_and_clips_to_ram() {
        let s = SoftDirty::new(10 * PAGE_SIZE);
        s.mark(0, 1);
        let mut out = vec![0u64; 1];
        s.take_into(&mut out);
        assert_eq!(out, [0]);
        s.enabled.store(true, Ordering::SeqCst);
        s.mark(PAGE_SIZE - 1, 2); // pages 0 and 1
        s.mark(9 * PAGE_SIZE, u64::MAX); // page 9, clipped
        s.mark(5 * PAGE_SIZE, 0); // nothing
        s.take_into(&mut out);
        assert_eq!(out, [0b10_0000_0011]);
        let mut again = vec![0u64; 1];
        s.take_into(&mut again);
        assert_eq!(again, [0], "taking clears");
    }

    #[test]
    fn bitmap_runs_and_counts() {
        let mut b = DirtyBitmap::from_words(vec![u64::MAX, 1], 66 * PAGE_SIZE);
        assert_eq!(b.count(), 65);
        assert_eq!(b.runs(), vec![(0, 65 * PAGE_SIZE)]);
        let dropped = DirtyBitmap::from_words(vec![0, 0b1100], 66 * PAGE_SIZE);
        assert_eq!(dropped.count(), 0, "bits beyond RAM are dropped");
        b = DirtyBitmap::empty(200 * PAGE_SIZE);
        for p in [3, 4, 5, 64, 199, 200] {
            b.set(p);
        }
        assert!(b.is_set(64) && !b.is_set(6) && !b.is_set(200));
        assert_eq!(
            b.runs(),
            vec![
                (3 * PAGE_SIZE, 3 * PAGE_SIZE),
                (64 * PAGE_SIZE, PAGE_SIZE),
                (199 * PAGE_SIZE, PAGE_SIZE)
            ]
        );
        assert_eq!(b.bytes(), 5 * PAGE_SIZE);
        let mut c = DirtyBitmap::empty(200 * PAGE_SIZE);
        c.set(7);
        c.merge(&b);
        assert_eq!(c.count(), 6);
    }
}
