//! The map window: slots the host maps target pages into, and RAII handles for them.
//!
//! The window is `size / 4096` page slots at `base_gpa` in the appliance's physical address
//! space, visible to the agent as shared memory (`M`, e.g. a
//! [`SharedRegion`](hypercall::ring::SharedRegion) over the window's mapping). [`MapWindow::map`]
//! picks a free slot and asks the host (MEM_MAP) to map a target page there;
//! [`MapWindow::map_range`] maps several pages with one token and one call (MAP_RANGE). The
//! returned [`Page`] / [`PageRange`] unmaps its slots (MEM_UNMAP) when dropped.
//!
//! # Reading mapped pages
//! A mapped page is the target's own memory (no copy): the target keeps running and can change
//! any byte at any time. So the handles never hand out references into the window; they copy
//! bytes out with atomic word loads ([`PageRange::read`]), and the reader validates the copy.

use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use hypercall::call::MAX_RANGE_PAGES;
use hypercall::ring::SharedMemory;
use hypercall::token::MapToken;

use crate::discovery::PAGE;
use crate::{DriverError, Hypercalls, HypercallsExt};

/// Counters of a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Successful MEM_MAP calls.
    pub maps: u64,
    /// Successful MAP_RANGE calls.
    pub range_maps: u64,
    /// Pages mapped in total.
    pub pages_mapped: u64,
    /// Successful MEM_UNMAP calls.
    pub unmaps: u64,
    /// MEM_UNMAP calls the host refused (the slot is freed anyway).
    pub unmap_errors: u64,
}

/// The appliance's map window.
pub struct MapWindow<H, M> {
    calls: H,
    mem: M,
    base_gpa: u64,
    used: RefCell<Vec<bool>>,
    hint: Cell<usize>,
    stats: Cell<WindowStats>,
}

impl<H, M> core::fmt::Debug for MapWindow<H, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MapWindow")
            .field("base_gpa", &format_args!("{:#x}", self.base_gpa))
            .field("slots", &self.used.borrow().len())
            .finish()
    }
}

impl<H: Hypercalls, M: SharedMemory> MapWindow<H, M> {
    /// A window of `mem` (its whole length, a page multiple) at guest-physical `base_gpa`,
    /// served by `calls`. Every slot starts free.
    pub fn new(calls: H, mem: M, base_gpa: u64) -> Result<Self, DriverError> {
        let bytes = (mem.word_count() as u64) * 8;
        if bytes == 0 || !bytes.is_multiple_of(PAGE) || !base_gpa.is_multiple_of(PAGE) {
            return Err(DriverError::BadBootInfo("map window not whole pages"));
        }
        base_gpa
            .checked_add(bytes)
            .ok_or(DriverError::BadBootInfo("map window wraps"))?;
        Ok(MapWindow {
            calls,
            mem,
            base_gpa,
            used: RefCell::new(vec![false; (bytes / PAGE) as usize]),
            hint: Cell::new(0),
            stats: Cell::new(WindowStats::default()),
        })
    }

    /// The hypercall backend.
    pub fn calls(&self) -> &H {
        &self.calls
    }

    /// Guest-physical base of the window.
    pub fn base_gpa(&self) -> u64 {
        self.base_gpa
    }

    /// Number of page slots.
    pub fn slot_count(&self) -> usize {
        self.used.borrow().len()
    }

    /// Number of free slots.
    pub fn free_slots(&self) -> usize {
        self.used.borrow().iter().filter(|u| !**u).count()
    }

    /// The counters.
    pub fn stats(&self) -> WindowStats {
        self.stats.get()
    }

    /// Guest-physical address of slot `slot`.
    pub fn slot_gpa(&self, slot: usize) -> u64 {
        self.base_gpa + slot as u64 * PAGE
    }

    /// Maps target page `target_gpa` (page-aligned) with `token` (MEM_MAP) into a free slot.
    pub fn map(&self, token: &MapToken, target_gpa: u64) -> Result<Page<'_, H, M>, DriverError> {
        let slot = self.alloc(1)?;
        match self.calls.mem_map(token, target_gpa, self.slot_gpa(slot)) {
            Ok(()) => {
                self.count(|s| {
                    s.maps += 1;
                    s.pages_mapped += 1;
                });
                Ok(Page(PageRange {
                    window: self,
                    first: slot,
                    pages: 1,
                    target_gpa,
                }))
            }
            Err(err) => {
                self.free(slot, 1);
                Err(err)
            }
        }
    }

    /// Maps `pages` target pages from `target_gpa` with one token and one call (MAP_RANGE)
    /// into a run of free slots.
    pub fn map_range(
        &self,
        token: &MapToken,
        target_gpa: u64,
        pages: u64,
    ) -> Result<PageRange<'_, H, M>, DriverError> {
        if pages == 0 || pages > MAX_RANGE_PAGES {
            return Err(DriverError::BadPageCount(pages));
        }
        let first = self.alloc(pages as usize)?;
        match self
            .calls
            .map_range(token, target_gpa, self.slot_gpa(first), pages)
        {
            Ok(()) => {
                self.count(|s| {
                    s.range_maps += 1;
                    s.pages_mapped += pages;
                });
                Ok(PageRange {
                    window: self,
                    first,
                    pages: pages as usize,
                    target_gpa,
                })
            }
            Err(err) => {
                self.free(first, pages as usize);
                Err(err)
            }
        }
    }

    /// Drops every mapping in the window (REVOKE_ALL) and frees every slot. Needs `&mut`, so
    /// no [`Page`] can be alive. Returns the number of pages the host unmapped.
    pub fn revoke_all(&mut self) -> Result<u64, DriverError> {
        let unmapped = self.calls.revoke_all()?;
        self.used.borrow_mut().iter_mut().for_each(|u| *u = false);
        Ok(unmapped)
    }

    fn count(&self, f: impl FnOnce(&mut WindowStats)) {
        let mut stats = self.stats.get();
        f(&mut stats);
        self.stats.set(stats);
    }

    /// First fit from the hint, wrapping once.
    fn alloc(&self, pages: usize) -> Result<usize, DriverError> {
        let mut used = self.used.borrow_mut();
        let n = used.len();
        let start = self.hint.get().min(n);
        let fits = |used: &[bool], at: usize| {
            used.get(at..at + pages)
                .is_some_and(|s| s.iter().all(|u| !*u))
        };
        let found = (start..n)
            .chain(0..start)
            .find(|&at| at + pages <= n && fits(&used, at))
            .ok_or(DriverError::WindowFull {
                pages: pages as u64,
            })?;
        used[found..found + pages]
            .iter_mut()
            .for_each(|u| *u = true);
        self.hint.set((found + pages) % n.max(1));
        Ok(found)
    }

    fn free(&self, first: usize, pages: usize) {
        let mut used = self.used.borrow_mut();
        if let Some(slots) = used.get_mut(first..first + pages) {
            slots.iter_mut().for_each(|u| *u = false);
        }
    }

    /// Copies `dst.len()` bytes at byte `offset` of the window.
    fn read_window(&self, offset: usize, dst: &mut [u8]) -> Option<()> {
        read_unaligned(&self.mem, offset, dst)
    }
}

/// Copies bytes at any byte offset of word-addressed shared memory.
pub fn read_unaligned<M: SharedMemory + ?Sized>(
    mem: &M,
    offset: usize,
    dst: &mut [u8],
) -> Option<()> {
    let head = offset % 8;
    let word = offset / 8;
    if head == 0 {
        return mem.read_bytes(word, dst);
    }
    let first = mem
        .load(word, core::sync::atomic::Ordering::Relaxed)?
        .to_le_bytes();
    let take = (8 - head).min(dst.len());
    dst[..take].copy_from_slice(&first[head..head + take]);
    if take == dst.len() {
        return Some(());
    }
    mem.read_bytes(word + 1, &mut dst[take..])
}

/// Target pages mapped into consecutive window slots; unmapped when dropped.
pub struct PageRange<'w, H: Hypercalls, M: SharedMemory> {
    window: &'w MapWindow<H, M>,
    first: usize,
    pages: usize,
    target_gpa: u64,
}

impl<H: Hypercalls, M: SharedMemory> core::fmt::Debug for PageRange<'_, H, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageRange")
            .field("target_gpa", &format_args!("{:#x}", self.target_gpa))
            .field("window_gpa", &format_args!("{:#x}", self.window_gpa()))
            .field("pages", &self.pages)
            .finish()
    }
}

impl<H: Hypercalls, M: SharedMemory> PageRange<'_, H, M> {
    /// Target guest-physical address of the first page.
    pub fn target_gpa(&self) -> u64 {
        self.target_gpa
    }

    /// Window guest-physical address of the first page.
    pub fn window_gpa(&self) -> u64 {
        self.window.slot_gpa(self.first)
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pages * PAGE as usize
    }

    /// Always false: a range has at least one page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Copies `dst.len()` bytes from byte `offset` of the range. The target may change the
    /// bytes concurrently: validate the copy, never re-read to check.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), DriverError> {
        let end = offset.checked_add(dst.len());
        if end.is_none_or(|end| end > self.len()) {
            return Err(DriverError::OutOfBounds {
                offset,
                len: dst.len(),
            });
        }
        let at = self.first * PAGE as usize + offset;
        self.window
            .read_window(at, dst)
            .ok_or(DriverError::OutOfBounds {
                offset,
                len: dst.len(),
            })
    }

    /// A copy of the whole range.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        // The range is inside the window by construction; on failure the copy stays zero.
        let _ = self.read(0, &mut out);
        out
    }

    /// The little-endian `u64` at byte `offset`.
    pub fn read_u64(&self, offset: usize) -> Result<u64, DriverError> {
        let mut bytes = [0u8; 8];
        self.read(offset, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }
}

impl<H: Hypercalls, M: SharedMemory> Drop for PageRange<'_, H, M> {
    fn drop(&mut self) {
        for i in 0..self.pages {
            let result = self
                .window
                .calls
                .mem_unmap(self.window.slot_gpa(self.first + i));
            self.window.count(|s| match result {
                Ok(()) => s.unmaps += 1,
                Err(_) => s.unmap_errors += 1,
            });
        }
        self.window.free(self.first, self.pages);
    }
}

/// One target page mapped into a window slot; unmapped when dropped.
pub struct Page<'w, H: Hypercalls, M: SharedMemory>(PageRange<'w, H, M>);

impl<H: Hypercalls, M: SharedMemory> core::fmt::Debug for Page<'_, H, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'w, H: Hypercalls, M: SharedMemory> Page<'w, H, M> {
    /// Target guest-physical address of the page.
    pub fn target_gpa(&self) -> u64 {
        self.0.target_gpa
    }

    /// Window guest-physical address of the page.
    pub fn window_gpa(&self) -> u64 {
        self.0.window_gpa()
    }

    /// Copies `dst.len()` bytes from byte `offset` of the page (see [`PageRange::read`]).
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), DriverError> {
        self.0.read(offset, dst)
    }

    /// A copy of the whole page.
    pub fn to_array(&self) -> [u8; PAGE as usize] {
        let mut out = [0u8; PAGE as usize];
        let _ = self.0.read(0, &mut out);
        out
    }

    /// The little-endian `u64` at byte `offset`.
    pub fn read_u64(&self, offset: usize) -> Result<u64, DriverError> {
        self.0.read_u64(offset)
    }

    /// The page as a one-page range.
    pub fn into_range(self) -> PageRange<'w, H, M> {
        self.0
    }
}
