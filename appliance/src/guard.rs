//! The demo target's guard: what the main job asks of the agent, derived from the image
//! profile alone.
//!
//! - [`GuardPlan`] turns the profile into the set-up: the pages to write-protect (the ranges
//!   `kernel_text` and `task_table`), the breakpoint (symbol `task_create`) and the events to
//!   enable; [`GuardPlan::setup_commands`] encodes them as KVMI commands for the command ring.
//! - [`Guard`] is the [`EventHandler`]: a write to a protected page from user mode (CPL3) is
//!   denied with SKIP, a kernel write is let through (CONTINUE); a breakpoint on
//!   `task_create` is reported with the call's arguments. Every finding is a JSON line.
//!
//! The demo target's kernel is identity-mapped (virtual = physical), so profile addresses
//! are used as guest-physical addresses.

use alloc::vec::Vec;

use protocol::event::{EventKind, EventSet};
use protocol::types::{Access, PageAccessEntry, VcpuSelector};
use protocol::{Action, Command, Event, EventReply};
use serde::Serialize;

use crate::agent::{EventContext, EventHandler, reply_with};
use crate::profile::{AddrRange, Profile, ProfileError};

/// Names of the ranges the guard write-protects.
pub const PROTECTED_RANGES: [&str; 2] = ["kernel_text", "task_table"];

/// What to set up on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardPlan {
    /// Protected ranges, by name.
    pub ranges: Vec<(&'static str, AddrRange)>,
    /// Page addresses to make read+execute only.
    pub pages: Vec<PageAccessEntry>,
    /// Address of `task_create`.
    pub task_create: u64,
}

impl GuardPlan {
    /// The plan for the image described by `profile`.
    pub fn from_profile(profile: &Profile) -> Result<Self, ProfileError> {
        let mut ranges = Vec::new();
        let mut pages = Vec::new();
        for name in PROTECTED_RANGES {
            let range = profile.range(name)?;
            let pages_in = (range.end.div_ceil(4096)).saturating_sub(range.start / 4096);
            if range.start == range.end || pages_in > 4096 {
                return Err(ProfileError::Invalid {
                    name: name.into(),
                    why: "protected range empty or implausibly large",
                });
            }
            let first = range.start & !0xfff;
            pages.extend((0..pages_in).map(|i| PageAccessEntry {
                gpa: first + i * 4096,
                access: Access::R.union(Access::X),
            }));
            ranges.push((name, range));
        }
        Ok(GuardPlan {
            ranges,
            pages,
            task_create: profile.symbol("task_create")?,
        })
    }

    /// The events the guard handles.
    pub fn events() -> EventSet {
        [EventKind::Breakpoint, EventKind::PageFault]
            .into_iter()
            .collect()
    }

    /// The set-up commands, in order: enable the events on every vCPU, write-protect the
    /// pages, set the breakpoint on every vCPU.
    pub fn setup_commands(&self, vcpus: u16) -> Vec<Command<'_>> {
        let mut commands: Vec<Command<'_>> = (0..vcpus)
            .map(|vcpu| Command::ControlEvents {
                vcpu,
                events: Self::events(),
            })
            .collect();
        commands.push(Command::SetPageAccess {
            vcpu: 0,
            view: 0,
            entries: protocol::list::List::from_slice(&self.pages),
        });
        commands.push(Command::ControlBreakpoint {
            vcpus: VcpuSelector::All,
            enable: true,
            gva: self.task_create,
        });
        commands
    }

    /// The protected range holding `gpa`, if any.
    pub fn protected(&self, gpa: u64) -> Option<&'static str> {
        self.ranges
            .iter()
            .find(|(_, r)| r.contains(gpa))
            .map(|(name, _)| *name)
    }
}

/// Counters of the guard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuardStats {
    /// User-mode writes denied.
    pub writes_denied: u64,
    /// Kernel writes let through.
    pub kernel_writes: u64,
    /// Task creations traced.
    pub tasks_created: u64,
    /// Events outside the plan (answered CONTINUE).
    pub other: u64,
}

#[derive(Serialize)]
struct WriteDenied {
    finding: &'static str,
    range: &'static str,
    gpa: u64,
    gva: u64,
    rip: u64,
    cr3: u64,
    vcpu: u16,
}

#[derive(Serialize)]
struct TaskCreate {
    finding: &'static str,
    vcpu: u16,
    cr3: u64,
    /// `task_create(name: &[u8], parent, kind, cpu, round)`: name pointer and length, parent.
    name_ptr: u64,
    name_len: u64,
    parent: u64,
}

/// The guard's event handler.
#[derive(Clone, Debug)]
pub struct Guard {
    plan: GuardPlan,
    stats: GuardStats,
}

impl Guard {
    /// A guard for `plan`.
    pub fn new(plan: GuardPlan) -> Self {
        Guard {
            plan,
            stats: GuardStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> GuardStats {
        self.stats
    }
}

/// Whether the event happened in user mode (CPL3, from the CS selector's RPL).
pub fn from_user(event: &Event) -> bool {
    event.common.sregs.cs.selector.get() & 3 == 3
}

impl EventHandler for Guard {
    fn on_page_fault(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gva: u64,
        gpa: u64,
        mode: u32,
    ) -> EventReply<'static> {
        let write = mode & 2 != 0;
        match self.plan.protected(gpa) {
            Some(range) if write && from_user(event) => {
                self.stats.writes_denied += 1;
                ctx.emit(&WriteDenied {
                    finding: "write_denied",
                    range,
                    gpa,
                    gva,
                    rip: event.common.regs.rip.get(),
                    cr3: event.common.sregs.cr3.get(),
                    vcpu: event.common.vcpu,
                });
                reply_with(event, Action::Skip)
            }
            Some(_) if write => {
                self.stats.kernel_writes += 1;
                reply_with(event, Action::Continue)
            }
            _ => {
                self.stats.other += 1;
                reply_with(event, Action::Continue)
            }
        }
    }

    fn on_breakpoint(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gpa: u64,
    ) -> EventReply<'static> {
        let rip = event.common.regs.rip.get();
        if gpa == self.plan.task_create || rip == self.plan.task_create {
            self.stats.tasks_created += 1;
            // The demo target's `task_create` has the C calling convention: RDI = name
            // pointer, RSI = name length, EDX = parent pid.
            let r = &event.common.regs;
            ctx.emit(&TaskCreate {
                finding: "task_create",
                vcpu: event.common.vcpu,
                cr3: event.common.sregs.cr3.get(),
                name_ptr: r.rdi.get(),
                name_len: r.rsi.get(),
                parent: r.rdx.get() & 0xffff_ffff,
            });
        } else {
            self.stats.other += 1;
        }
        reply_with(event, Action::Continue)
    }
}
