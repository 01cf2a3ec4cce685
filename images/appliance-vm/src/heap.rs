//! A size-class heap over one range of memory: blocks are powers of two (16 bytes up), a
//! freed block goes on its class's free list and is reused by the next allocation of that
//! class; new blocks come from a bump pointer. Constant time, no coalescing: the agent's
//! allocations are a few long-lived buffers and many short-lived, small ones (JSON lines,
//! task lists) that recycle the same classes, so the heap stops growing after warm-up.
//!
//! Not thread-safe by itself: the image wraps it in a spin lock (`GlobalAlloc`).

use core::alloc::Layout;
use core::ptr::null_mut;

/// Smallest block: 16 bytes (2^4), room for the free-list link.
const MIN_SHIFT: u32 = 4;
/// Number of classes: 16 bytes .. 2^(MIN_SHIFT + CLASSES - 1) = 1 GiB.
const CLASSES: usize = 27;
/// Blocks of this size and below are aligned to their size; larger ones to a page (or the
/// requested alignment, if larger).
const NATURAL_ALIGN_LIMIT: usize = 4096;

/// Counters of a [`Heap`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes handed out by the bump pointer so far (including alignment gaps).
    pub bumped: usize,
    /// Bytes in live blocks (block sizes, not requested sizes).
    pub in_use: usize,
    /// Allocations that failed (heap exhausted or request too large).
    pub failures: u64,
}

/// The heap. See the module docs.
#[derive(Debug)]
pub struct Heap {
    start: usize,
    next: usize,
    end: usize,
    free: [usize; CLASSES],
    stats: HeapStats,
}

impl Heap {
    /// An empty heap (every allocation fails until [`Heap::init`]).
    pub const fn empty() -> Self {
        Heap {
            start: 0,
            next: 0,
            end: 0,
            free: [0; CLASSES],
            stats: HeapStats {
                bumped: 0,
                in_use: 0,
                failures: 0,
            },
        }
    }

    /// Hands the heap the memory `[start, start + len)`.
    ///
    /// # Safety
    /// The range must be readable and writable memory that nothing else uses for as long as
    /// blocks from this heap are alive, and `start + len` must not overflow.
    pub unsafe fn init(&mut self, start: usize, len: usize) {
        self.start = start;
        self.next = start;
        self.end = start + len;
        self.free = [0; CLASSES];
    }

    /// The counters.
    pub fn stats(&self) -> HeapStats {
        self.stats
    }

    /// Bytes the bump pointer has not reached yet.
    pub fn untouched(&self) -> usize {
        self.end - self.next
    }

    /// The class of `layout`: index and block size; `None` when too large.
    fn class(layout: Layout) -> Option<(usize, usize)> {
        let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
        let block = size.checked_next_power_of_two()?;
        let index = (block.trailing_zeros() - MIN_SHIFT) as usize;
        (index < CLASSES).then_some((index, block))
    }

    /// A block for `layout`, or null when the heap is exhausted.
    pub fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let Some((index, block)) = Self::class(layout) else {
            self.stats.failures += 1;
            return null_mut();
        };
        let head = self.free[index];
        if head != 0 && head.is_multiple_of(layout.align()) {
            // SAFETY: `head` is a block of this class that `dealloc` put on the list; its
            // first word holds the next link (written there by `dealloc`).
            self.free[index] = unsafe { (head as *const usize).read() };
            self.stats.in_use += block;
            return head as *mut u8;
        }
        let align = if block <= NATURAL_ALIGN_LIMIT {
            block
        } else {
            NATURAL_ALIGN_LIMIT.max(layout.align())
        };
        let Some(at) = self.next.checked_next_multiple_of(align) else {
            self.stats.failures += 1;
            return null_mut();
        };
        match at.checked_add(block) {
            Some(end) if end <= self.end => {
                self.stats.bumped += end - self.next;
                self.stats.in_use += block;
                self.next = end;
                at as *mut u8
            }
            _ => {
                self.stats.failures += 1;
                null_mut()
            }
        }
    }

    /// Returns a block to its class's free list.
    ///
    /// # Safety
    /// `ptr` must come from [`Heap::alloc`] of this heap with the same `layout`, and must not
    /// be used afterwards.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        let Some((index, block)) = Self::class(layout) else {
            return;
        };
        let addr = ptr as usize;
        debug_assert!(addr >= self.start && addr < self.end);
        // SAFETY: the caller gives back a block of at least 16 bytes (the class minimum) that
        // is ours and unused from now on: its first word becomes the free-list link.
        unsafe { (addr as *mut usize).write(self.free[index]) };
        self.free[index] = addr;
        self.stats.in_use -= block;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Arena([u8; 64 * 1024]);

    fn heap(arena: &mut Arena) -> Heap {
        let mut heap = Heap::empty();
        // SAFETY: the arena is ours for the test and outlives the heap.
        unsafe { heap.init(arena.0.as_mut_ptr() as usize, arena.0.len()) };
        heap
    }

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn blocks_are_distinct_aligned_and_inside_the_arena() {
        let mut arena = Box::new(Arena([0; 64 * 1024]));
        let base = arena.0.as_ptr() as usize;
        let mut heap = heap(&mut arena);
        let mut blocks = Vec::new();
        for (size, align) in [(1, 1), (24, 8), (100, 16), (4096, 4096), (5000, 8), (3, 64)] {
            let p = heap.alloc(layout(size, align)) as usize;
            assert_ne!(p, 0);
            assert_eq!(p % align, 0, "size {size} align {align}");
            assert!(p >= base && p + size <= base + 64 * 1024);
            blocks.push((p, size.max(align).max(16).next_power_of_two()));
        }
        blocks.sort();
        for pair in blocks.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "overlap: {pair:?}");
        }
        assert_eq!(
            heap.stats().in_use,
            blocks.iter().map(|b| b.1).sum::<usize>()
        );
    }

    #[test]
    fn freed_blocks_are_reused_by_their_class() {
        let mut arena = Box::new(Arena([0; 64 * 1024]));
        let mut heap = heap(&mut arena);
        let a = heap.alloc(layout(40, 8));
        let b = heap.alloc(layout(40, 8));
        // SAFETY: `a` came from this heap with this layout and is not used again.
        unsafe { heap.dealloc(a, layout(40, 8)) };
        let bumped = heap.stats().bumped;
        // Same class (64 bytes): the freed block comes back, the bump pointer stays.
        assert_eq!(heap.alloc(layout(60, 4)), a);
        assert_eq!(heap.stats().bumped, bumped);
        assert_ne!(b, a);
        // Churn of one class never grows the heap.
        for _ in 0..10_000 {
            let p = heap.alloc(layout(200, 8));
            // SAFETY: as above.
            unsafe { heap.dealloc(p, layout(200, 8)) };
        }
        assert!(heap.stats().bumped <= bumped + 256 + 256);
    }

    #[test]
    fn exhaustion_and_oversized_requests_fail_cleanly() {
        let mut arena = Box::new(Arena([0; 64 * 1024]));
        let mut heap = heap(&mut arena);
        assert!(heap.alloc(layout(64 * 1024 + 1, 8)).is_null());
        assert!(heap.alloc(layout(1 << 40, 8)).is_null());
        let whole = heap.alloc(layout(64 * 1024, 4096));
        assert!(!whole.is_null());
        assert!(heap.alloc(layout(16, 8)).is_null());
        assert_eq!(heap.stats().failures, 3);
        assert_eq!(heap.untouched(), 0);
    }

    #[test]
    fn an_empty_heap_allocates_nothing() {
        let mut heap = Heap::empty();
        assert!(heap.alloc(layout(8, 8)).is_null());
    }
}
