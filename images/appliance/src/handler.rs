//! The main job's event handler: the `appliance` crate's [`Guard`] decides (SKIP user writes
//! to the write-protected kernel text and task table, trace `task_create`), this wrapper adds
//! what needs the target's memory: the created task's name (read through the map window with
//! the event's CR3) and the live task list (the task table read zero-copy through the window).

use alloc::string::String;
use alloc::vec::Vec;

use appliance::agent::{EventContext, EventHandler, erased};
use appliance::guard::{Guard, GuardPlan, GuardStats};
use appliance::memory::{CacheStats, CachedMemory, TokenSource};
use appliance::paging::AddressSpace;
use appliance::tasks::TaskLayout;
use appliance_image::watch::{TaskLine, TaskWatch};
use guest_driver::Hypercalls;
use hypercall::ring::SharedMemory;
use protocol::{Event, EventReply};

/// Longest task name read at a `task_create` breakpoint.
const MAX_NAME: usize = 32;

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

/// An [`EventContext`] that keeps the line a handler emits instead of writing it.
struct Capture<'a> {
    inner: &'a mut dyn EventContext,
    line: Option<Vec<u8>>,
}

impl EventContext for Capture<'_> {
    fn vcpu(&self) -> u32 {
        self.inner.vcpu()
    }
    fn seq(&self) -> u32 {
        self.inner.seq()
    }
    fn emit(&mut self, value: &dyn erased::Json) -> bool {
        self.line = value.to_json().ok();
        self.line.is_some()
    }
}

/// An already-serialized JSON object, emitted as is.
struct RawLine<'a>(&'a [u8]);

impl erased::Json for RawLine<'_> {
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        Ok(self.0.to_vec())
    }
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

    /// The name `task_create` was called with (`name_ptr`, `name_len` in the task's space).
    fn read_name(&mut self, cr3: u64, ptr: u64, len: u64) -> Option<String> {
        if ptr == 0 || len == 0 {
            return None;
        }
        let mut buf = [0u8; MAX_NAME];
        let buf = &mut buf[..(len as usize).min(MAX_NAME)];
        AddressSpace::Paged { cr3 }
            .read(&mut self.mem, ptr, buf)
            .ok()?;
        Some(appliance::tasks::printable_name(buf))
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
        let mut capture = Capture {
            inner: &mut *ctx,
            line: None,
        };
        let reply = self
            .guard
            .on_page_fault(&mut capture, event, gva, gpa, mode);
        // A finding (write_denied): the shim reports an unknown gva as all-ones; print null.
        if let Some(line) = capture.line {
            match serde_json::from_slice::<serde_json::Value>(&line) {
                Ok(mut value) if value.is_object() && gva == u64::MAX => {
                    value["gva"] = serde_json::Value::Null;
                    ctx.emit(&value);
                }
                _ => {
                    ctx.emit(&RawLine(&line));
                }
            }
        }
        reply
    }

    fn on_breakpoint(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gpa: u64,
    ) -> EventReply<'static> {
        let cr3 = event.common.sregs.cr3.get();
        self.cr3 = Some(cr3);
        let mut capture = Capture {
            inner: &mut *ctx,
            line: None,
        };
        let reply = self.guard.on_breakpoint(&mut capture, event, gpa);
        let Some(line) = capture.line else {
            return reply;
        };
        // `task_create` has the C calling convention (see the demo target's docs): the
        // guard's line carries the name pointer (RDI), its length (RSI) and the parent (RDX);
        // add the name itself, read from the target through the window.
        let regs = &event.common.regs;
        let (ptr, len) = (regs.rdi.get(), regs.rsi.get());
        let name = self.read_name(cr3, ptr, len);
        let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&line) else {
            return reply;
        };
        if value.is_object() {
            value["name"] = name.map_or(serde_json::Value::Null, serde_json::Value::String);
        }
        ctx.emit(&value);
        reply
    }
}
