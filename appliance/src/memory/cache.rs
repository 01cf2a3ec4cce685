//! Target memory through the map window, with an LRU cache of mapped pages.
//!
//! Each miss takes a fresh single-use token from a [`TokenSource`] (GET_MAP_TOKEN on the
//! command ring), maps the page into a free window slot (MEM_MAP) and keeps the mapping; a
//! hit reads the live page with no hypercall at all. When the cache is full (or the window has
//! no free slot) the least recently used page is unmapped first.

use alloc::vec::Vec;

use guest_driver::{DriverError, Hypercalls, MapWindow, Page};
use hypercall::ring::SharedMemory;
use hypercall::token::MapToken;

use super::{MemError, PAGE_SIZE, PhysicalMemory};

/// Where map tokens come from (one per mapping: tokens are single use).
pub trait TokenSource {
    /// A fresh token for the target.
    fn next_token(&mut self) -> Result<MapToken, MemError>;
}

impl<F: FnMut() -> Result<MapToken, MemError>> TokenSource for F {
    fn next_token(&mut self) -> Result<MapToken, MemError> {
        self()
    }
}

/// Cache counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Page lookups served by a mapped page.
    pub hits: u64,
    /// Page lookups that had to map the page.
    pub misses: u64,
    /// Pages unmapped to make room.
    pub evictions: u64,
}

struct Entry<'w, H: Hypercalls, M: SharedMemory> {
    pfn: u64,
    last_used: u64,
    page: Page<'w, H, M>,
}

/// [`PhysicalMemory`] over a [`MapWindow`], caching up to `capacity` mapped pages.
pub struct CachedMemory<'w, H: Hypercalls, M: SharedMemory, T> {
    window: &'w MapWindow<H, M>,
    tokens: T,
    entries: Vec<Entry<'w, H, M>>,
    capacity: usize,
    clock: u64,
    stats: CacheStats,
}

impl<H: Hypercalls, M: SharedMemory, T> core::fmt::Debug for CachedMemory<'_, H, M, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CachedMemory")
            .field("capacity", &self.capacity)
            .field("cached", &self.entries.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<'w, H: Hypercalls, M: SharedMemory, T: TokenSource> CachedMemory<'w, H, M, T> {
    /// A cache of at most `capacity` pages (at least 1) in `window`, tokens from `tokens`.
    pub fn new(window: &'w MapWindow<H, M>, tokens: T, capacity: usize) -> Self {
        CachedMemory {
            window,
            tokens,
            entries: Vec::new(),
            capacity: capacity.max(1),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Pages currently mapped by the cache.
    pub fn cached_pages(&self) -> usize {
        self.entries.len()
    }

    /// Unmaps every cached page.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Unmaps the cached page `pfn` if present (e.g. after the target freed it).
    pub fn invalidate(&mut self, pa: u64) {
        let pfn = pa / PAGE_SIZE;
        self.entries.retain(|e| e.pfn != pfn);
    }

    fn evict_lru(&mut self) -> bool {
        let Some(victim) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used)
        else {
            return false;
        };
        self.entries.swap_remove(victim);
        self.stats.evictions += 1;
        true
    }

    /// The index of the entry for `pfn`, mapping it on a miss.
    fn lookup(&mut self, pfn: u64) -> Result<usize, MemError> {
        self.clock += 1;
        if let Some(i) = self.entries.iter().position(|e| e.pfn == pfn) {
            self.stats.hits += 1;
            self.entries[i].last_used = self.clock;
            return Ok(i);
        }
        self.stats.misses += 1;
        if self.entries.len() >= self.capacity {
            self.evict_lru();
        }
        let pa = pfn * PAGE_SIZE;
        loop {
            let token = self.tokens.next_token()?;
            match self.window.map(&token, pa) {
                Ok(page) => {
                    self.entries.push(Entry {
                        pfn,
                        last_used: self.clock,
                        page,
                    });
                    return Ok(self.entries.len() - 1);
                }
                // Slots held elsewhere: make room from the cache and retry.
                Err(DriverError::WindowFull { .. }) if self.evict_lru() => {}
                Err(source) => return Err(MemError::Map { pa, source }),
            }
        }
    }
}

impl<H: Hypercalls, M: SharedMemory, T: TokenSource> PhysicalMemory for CachedMemory<'_, H, M, T> {
    fn read_phys(&mut self, pa: u64, dst: &mut [u8]) -> Result<(), MemError> {
        let mut done = 0;
        while done < dst.len() {
            let at = pa
                .checked_add(done as u64)
                .ok_or(MemError::OutOfRange { pa: u64::MAX })?;
            let offset = (at % PAGE_SIZE) as usize;
            let take = (PAGE_SIZE as usize - offset).min(dst.len() - done);
            let index = self.lookup(at / PAGE_SIZE)?;
            self.entries[index]
                .page
                .read(offset, &mut dst[done..done + take])
                .map_err(|source| MemError::Map { pa: at, source })?;
            done += take;
        }
        Ok(())
    }
}
