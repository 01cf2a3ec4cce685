//! The guard: what the agent enforces on a target, driven by the target's
//! [`TargetRules`] (a compiled policy, see [`policy`](crate::policy)).
//!
//! - [`GuardPlan`] turns the rules into the set-up: the pages to protect (every page of each
//!   protect rule keeps the rule's `allow` accesses; a page shared by two rules keeps what
//!   both allow), a breakpoint per traced function and the events to enable;
//!   [`GuardPlan::setup_commands`] encodes them as KVMI commands for the command ring.
//! - [`Guard`] is the [`EventHandler`]. A page fault in a protect rule's range whose access
//!   the rule denies, from an accessor the rule's `from` covers, gets the rule's action:
//!
//!   | action  | reply    | finding                                                |
//!   |---------|----------|--------------------------------------------------------|
//!   | `deny`  | SKIP     | `write_denied`, `exec_denied` or `read_denied`         |
//!   | `log`   | CONTINUE | `access_logged`                                        |
//!   | `pause` | SKIP     | `paused_for_analysis`, and a [`PauseRequest`] to take  |
//!   | `crash` | CRASH    | `target_crashed`                                       |
//!
//!   Each line has `finding`, `range` (the rule's name), `gpa`, `gva` (`null` when the shim
//!   does not know it), `rip`, `cr3`, `vcpu`, `action` and `access` (the letters of the
//!   attempted access, e.g. `"w"`). A denied access from an accessor outside `from` is let
//!   through (CONTINUE) and counted; any other page fault is answered CONTINUE.
//! - A breakpoint on a traced function emits a line whose `finding` is the function's name,
//!   with `vcpu`, `cr3` and one field per argument; string arguments are read from the
//!   target through a [`TargetMemory`] ([`Guard::trace`]).
//!
//! The demo target's kernel is identity-mapped (virtual = physical), so profile addresses
//! are used as guest-physical addresses.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use protocol::event::{EventKind, EventSet};
use protocol::types::{PageAccessEntry, VcpuSelector};
use protocol::{Action, Command, Event, EventReply};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::agent::{EventContext, EventHandler, reply_with};
use crate::memory::PhysicalMemory;
use crate::policy::{AccessBits, ArgKind, PolicyError, TargetRules, Violation, demo_rules};
use crate::profile::{AddrRange, Profile, ProfileError};

/// Most page entries in one SET_PAGE_ACCESS command (a v4 message holds 64 KiB).
pub const PAGES_PER_COMMAND: usize = 2048;

/// What to set up on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardPlan {
    /// The rules the plan was built from.
    pub rules: TargetRules,
    /// Protected ranges, by rule name, in rule order.
    pub ranges: Vec<(String, AddrRange)>,
    /// Pages with the access they keep, ascending.
    pub pages: Vec<PageAccessEntry>,
    /// Breakpoint addresses, one per trace rule, in rule order.
    pub breakpoints: Vec<u64>,
    /// Address of the traced function named `task_create` (0 if it is not traced).
    pub task_create: u64,
}

impl GuardPlan {
    /// The plan for `rules` (checked first: they may come from untrusted bytes).
    pub fn from_rules(rules: &TargetRules) -> Result<Self, PolicyError> {
        rules.validate(None)?;
        let mut access: BTreeMap<u64, AccessBits> = BTreeMap::new();
        for rule in &rules.protect {
            let first = rule.start / 4096;
            for page in first..first + rule.pages() {
                let entry = access.entry(page * 4096).or_insert(AccessBits::RWX);
                *entry = entry.intersection(rule.allow);
            }
        }
        Ok(GuardPlan {
            rules: rules.clone(),
            ranges: rules
                .protect
                .iter()
                .map(|r| {
                    (
                        r.name.clone(),
                        AddrRange {
                            start: r.start,
                            end: r.end,
                        },
                    )
                })
                .collect(),
            pages: access
                .into_iter()
                .map(|(gpa, allow)| PageAccessEntry {
                    gpa,
                    access: allow.access(),
                })
                .collect(),
            breakpoints: rules.trace.iter().map(|t| t.addr).collect(),
            task_create: rules
                .trace
                .iter()
                .find(|t| t.function == "task_create")
                .map_or(0, |t| t.addr),
        })
    }

    /// The demo policy's plan (`policies/demo.toml`: [`demo_rules`]) for the image described
    /// by `profile`.
    pub fn from_profile(profile: &Profile) -> Result<Self, ProfileError> {
        let rules = demo_rules(profile)?;
        GuardPlan::from_rules(&rules).map_err(|_| ProfileError::Invalid {
            name: profile.image.clone(),
            why: "the demo policy is invalid for this profile",
        })
    }

    /// The events the guard handles: page faults if anything is protected, breakpoints if
    /// anything is traced.
    pub fn events(&self) -> EventSet {
        let mut events = EventSet::EMPTY;
        if !self.rules.protect.is_empty() {
            events = events.with(EventKind::PageFault);
        }
        if !self.rules.trace.is_empty() {
            events = events.with(EventKind::Breakpoint);
        }
        events
    }

    /// The set-up commands, in order: enable the events on every vCPU (if any), protect the
    /// pages (one SET_PAGE_ACCESS per [`PAGES_PER_COMMAND`] pages), set each breakpoint on
    /// every vCPU.
    pub fn setup_commands(&self, vcpus: u16) -> Vec<Command<'_>> {
        let events = self.events();
        let mut commands: Vec<Command<'_>> = Vec::new();
        if events != EventSet::EMPTY {
            commands.extend((0..vcpus).map(|vcpu| Command::ControlEvents { vcpu, events }));
        }
        commands.extend(
            self.pages
                .chunks(PAGES_PER_COMMAND)
                .map(|chunk| Command::SetPageAccess {
                    vcpu: 0,
                    view: 0,
                    entries: protocol::list::List::from_slice(chunk),
                }),
        );
        commands.extend(
            self.breakpoints
                .iter()
                .map(|&gva| Command::ControlBreakpoint {
                    vcpus: VcpuSelector::All,
                    enable: true,
                    gva,
                }),
        );
        commands
    }

    /// The name of the first protect rule holding `gpa`, if any.
    pub fn protected(&self, gpa: u64) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(_, r)| r.contains(gpa))
            .map(|(name, _)| name.as_str())
    }
}

/// Counters of the guard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuardStats {
    /// Accesses with a write denied by a `deny` rule.
    pub writes_denied: u64,
    /// Writes from the kernel that a rule's `from` let through.
    pub kernel_writes: u64,
    /// Calls of a traced function named `task_create`.
    pub tasks_created: u64,
    /// Events outside the plan (answered CONTINUE).
    pub other: u64,
    /// Accesses denied by a `deny` rule (reads, writes and executes).
    pub denied: u64,
    /// Violating accesses a rule's `from` let through (`kernel_writes` included).
    pub exempt: u64,
    /// Accesses let through and reported by a `log` rule.
    pub logged: u64,
    /// Accesses dropped by a `pause` rule.
    pub paused: u64,
    /// Accesses answered CRASH by a `crash` rule.
    pub crashed: u64,
    /// Calls of every traced function.
    pub traced: u64,
}

/// A `pause` rule fired: the agent loop should pause the whole target for analysis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PauseRequest {
    /// The rule's name.
    pub rule: String,
    /// The vCPU that made the access.
    pub vcpu: u16,
    /// The address accessed.
    pub gpa: u64,
    /// The instruction that made it.
    pub rip: u64,
}

/// Target memory for string arguments.
pub trait TargetMemory {
    /// Reads up to `buf.len()` bytes at `gva` in the address space of `cr3`; returns how many
    /// leading bytes of `buf` were read (a short count: the next page is not readable).
    fn read_virt(&mut self, cr3: u64, gva: u64, buf: &mut [u8]) -> usize;
}

/// No target memory: every string argument is `null`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMemory;

impl TargetMemory for NoMemory {
    fn read_virt(&mut self, _: u64, _: u64, _: &mut [u8]) -> usize {
        0
    }
}

/// Target memory through the target's page tables ([`crate::paging::read_virt`]).
pub struct Paged<'a, M: PhysicalMemory>(pub &'a mut M);

impl<M: PhysicalMemory> TargetMemory for Paged<'_, M> {
    fn read_virt(&mut self, cr3: u64, gva: u64, buf: &mut [u8]) -> usize {
        crate::paging::read_virt(self.0, cr3, gva, buf).read
    }
}

#[derive(Serialize)]
struct AccessFinding<'a> {
    finding: &'static str,
    range: &'a str,
    gpa: u64,
    gva: Option<u64>,
    rip: u64,
    cr3: u64,
    vcpu: u16,
    action: &'static str,
    access: &'static str,
}

/// The guard's event handler.
#[derive(Clone, Debug)]
pub struct Guard {
    plan: GuardPlan,
    stats: GuardStats,
    pause: Option<PauseRequest>,
}

impl Guard {
    /// A guard for `plan`.
    pub fn new(plan: GuardPlan) -> Self {
        Guard {
            plan,
            stats: GuardStats::default(),
            pause: None,
        }
    }

    /// The plan.
    pub fn plan(&self) -> &GuardPlan {
        &self.plan
    }

    /// The counters.
    pub fn stats(&self) -> GuardStats {
        self.stats
    }

    /// The pause a `pause` rule asked for since the last call (the first one, if several).
    pub fn take_pause_request(&mut self) -> Option<PauseRequest> {
        self.pause.take()
    }

    /// Handles a breakpoint, reading string arguments through `mem`: a traced function's
    /// call becomes a finding named after it; anything else is counted in `other`. Always
    /// CONTINUE.
    pub fn trace(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gpa: u64,
        mem: &mut dyn TargetMemory,
    ) -> EventReply<'static> {
        let rip = event.common.regs.rip.get();
        let Some(rule) = self
            .plan
            .rules
            .trace
            .iter()
            .find(|t| t.addr == gpa || t.addr == rip)
        else {
            self.stats.other += 1;
            return reply_with(event, Action::Continue);
        };
        self.stats.traced += 1;
        if rule.function == "task_create" {
            self.stats.tasks_created += 1;
        }
        let regs = &event.common.regs;
        let cr3 = event.common.sregs.cr3.get();
        let mut line = Map::new();
        line.insert("finding".into(), Value::from(rule.function.as_str()));
        line.insert("vcpu".into(), Value::from(event.common.vcpu));
        line.insert("cr3".into(), Value::from(cr3));
        for arg in &rule.args {
            let raw = arg.reg.get(regs);
            let value = match arg.kind {
                ArgKind::Int | ArgKind::Pointer => Value::from(raw),
                ArgKind::U32 => Value::from(raw & 0xffff_ffff),
                ArgKind::CStr { max_len } => read_cstr(mem, cr3, raw, max_len),
                ArgKind::Str { len_reg, max_len } => {
                    read_str(mem, cr3, raw, len_reg.get(regs), max_len)
                }
            };
            line.insert(arg.name.clone(), value);
        }
        ctx.emit(&Value::Object(line));
        reply_with(event, Action::Continue)
    }
}

/// The NUL-terminated string at `ptr` (at most `max_len` bytes): `null` if `ptr` is 0 or
/// nothing up to the NUL or `max_len` is readable.
fn read_cstr(mem: &mut dyn TargetMemory, cr3: u64, ptr: u64, max_len: u32) -> Value {
    if ptr == 0 {
        return Value::Null;
    }
    let mut buf = alloc::vec![0u8; max_len.min(crate::policy::MAX_STRING) as usize];
    let read = mem.read_virt(cr3, ptr, &mut buf);
    let bytes = &buf[..read.min(buf.len())];
    if bytes.contains(&0) || read == buf.len() {
        Value::String(crate::tasks::printable_name(bytes))
    } else {
        Value::Null
    }
}

/// The `len`-byte string at `ptr` (clamped to `max_len`): `null` if `ptr` or `len` is 0 or
/// it is not all readable.
fn read_str(mem: &mut dyn TargetMemory, cr3: u64, ptr: u64, len: u64, max_len: u32) -> Value {
    if ptr == 0 || len == 0 {
        return Value::Null;
    }
    let len = len.min(u64::from(max_len.min(crate::policy::MAX_STRING))) as usize;
    let mut buf = alloc::vec![0u8; len];
    if mem.read_virt(cr3, ptr, &mut buf) < len {
        return Value::Null;
    }
    Value::String(crate::tasks::printable_name(&buf))
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
        let access = AccessBits::from_mode(mode);
        let user = from_user(event);
        let mut violated = false;
        let rule = self.plan.rules.protect.iter().find(|r| {
            let hit = r.contains(gpa) && !r.denied(access).is_empty();
            violated |= hit;
            hit && r.from.matches(user)
        });
        let Some(rule) = rule else {
            if violated {
                self.stats.exempt += 1;
                if access.contains(AccessBits::W) && !user {
                    self.stats.kernel_writes += 1;
                }
            } else {
                self.stats.other += 1;
            }
            return reply_with(event, Action::Continue);
        };
        let write = access.contains(AccessBits::W);
        let rip = event.common.regs.rip.get();
        let (finding, reply) = match rule.action {
            Violation::Deny => {
                self.stats.denied += 1;
                if write {
                    self.stats.writes_denied += 1;
                }
                let denied = rule.denied(access);
                let finding = if denied.contains(AccessBits::W) {
                    "write_denied"
                } else if denied.contains(AccessBits::X) {
                    "exec_denied"
                } else {
                    "read_denied"
                };
                (finding, Action::Skip)
            }
            Violation::Log => {
                self.stats.logged += 1;
                ("access_logged", Action::Continue)
            }
            Violation::Pause => {
                self.stats.paused += 1;
                if self.pause.is_none() {
                    self.pause = Some(PauseRequest {
                        rule: rule.name.clone(),
                        vcpu: event.common.vcpu,
                        gpa,
                        rip,
                    });
                }
                ("paused_for_analysis", Action::Skip)
            }
            Violation::Crash => {
                self.stats.crashed += 1;
                ("target_crashed", Action::Crash)
            }
        };
        ctx.emit(&AccessFinding {
            finding,
            range: &rule.name,
            gpa,
            // The shim reports an unknown gva as all-ones.
            gva: (gva != u64::MAX).then_some(gva),
            rip,
            cr3: event.common.sregs.cr3.get(),
            vcpu: event.common.vcpu,
            action: rule.action.name(),
            access: access.as_str(),
        });
        reply_with(event, reply)
    }

    fn on_breakpoint(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gpa: u64,
    ) -> EventReply<'static> {
        self.trace(ctx, event, gpa, &mut NoMemory)
    }
}
