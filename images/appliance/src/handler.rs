//! The main job's event handler: the `appliance` crate's [`Guard`] decides (driven by the
//! target's policy rules: SKIP user writes to the write-protected kernel text and task table,
//! trace `task_create`, ...), this wrapper gives it the target's memory for string arguments
//! (read through the map window with the event's CR3, e.g. the created task's name) and adds
//! the live task list (the task table read zero-copy through the window).

use alloc::vec::Vec;

use appliance::agent::{EventContext, EventHandler};
use appliance::guard::{Guard, GuardPlan, GuardStats, Paged, PauseRequest};
use appliance::memory::{CacheStats, CachedMemory, TokenSource};
use appliance::paging::AddressSpace;
use appliance::tasks::TaskLayout;
use appliance_image::watch::{TaskLine, TaskWatch};
use guest_driver::Hypercalls;
use hypercall::ring::SharedMemory;
use protocol::{Event, EventReply};

/// Counters of the task list.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanStats {
    /// Listings of the task table.
    pub scans: u64,
    /// Listings that failed through the page tables and were read identity-mapped instead.
    pub fallbacks: u64,
    /// Listings that failed altogether.
    pub failures: u64,
}

/// The handler: the guard plus the target's memory and the task list.
pub struct MainJob<H: Hypercalls + 'static, M: SharedMemory + 'static, T> {
    guard: Guard,
    mem: CachedMemory<'static, H, M, T>,
    layout: TaskLayout,
    watch: TaskWatch,
    /// CR3 of the last event: the target's kernel half is the same in every task's space.
    cr3: Option<u64>,
    scan: ScanStats,
}

impl<H: Hypercalls, M: SharedMemory, T: TokenSource> MainJob<H, M, T> {
    /// A handler for `plan` reading the task table laid out as `layout` through `mem`.
    pub fn new(plan: GuardPlan, layout: TaskLayout, mem: CachedMemory<'static, H, M, T>) -> Self {
        MainJob {
            guard: Guard::new(plan),
            mem,
            layout,
            watch: TaskWatch::new(),
            cr3: None,
            scan: ScanStats::default(),
        }
    }

    /// The guard's counters.
    pub fn guard_stats(&self) -> GuardStats {
        self.guard.stats()
    }

    /// The pause a `pause` rule asked for since the last call, if any.
    pub fn take_pause_request(&mut self) -> Option<PauseRequest> {
        self.guard.take_pause_request()
    }

    /// The page cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.mem.stats()
    }

    /// The task list's counters.
    pub fn scan_stats(&self) -> ScanStats {
        self.scan
    }

    /// Live tasks in the last listing.
    pub fn live_tasks(&self) -> usize {
        self.watch.live()
    }

    /// Lists the task table (through the page tables of the last event's CR3, or
    /// identity-mapped before any event) and returns the changes since the last listing.
    pub fn scan(&mut self) -> Vec<TaskLine> {
        self.scan.scans += 1;
        let paged = self
            .cr3
            .map(|cr3| self.layout.list(&mut self.mem, AddressSpace::Paged { cr3 }));
        let tasks = match paged {
            Some(Ok(tasks)) => tasks,
            other => {
                if other.is_some() {
                    self.scan.fallbacks += 1;
                }
                match self.layout.list(&mut self.mem, AddressSpace::Identity) {
                    Ok(tasks) => tasks,
                    Err(_) => {
                        self.scan.failures += 1;
                        return Vec::new();
                    }
                }
            }
        };
        self.watch.update(tasks)
    }
}

impl<H: Hypercalls, M: SharedMemory, T: TokenSource> EventHandler for MainJob<H, M, T> {
    fn on_page_fault(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gva: u64,
        gpa: u64,
        mode: u32,
    ) -> EventReply<'static> {
        self.cr3 = Some(event.common.sregs.cr3.get());
        self.guard.on_page_fault(ctx, event, gva, gpa, mode)
    }

    fn on_breakpoint(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gpa: u64,
    ) -> EventReply<'static> {
        self.cr3 = Some(event.common.sregs.cr3.get());
        // String arguments (the demo policy: `task_create`'s name) are read through the
        // window in the address space of the event's CR3.
        self.guard.trace(ctx, event, gpa, &mut Paged(&mut self.mem))
    }
}
