//! Per-vCPU introspection state, shared by the vCPU thread and the channel's reader thread.

use std::collections::BTreeSet;
use std::sync::Condvar;

use vmm::sync::{RankedGuard, RankedMutex};

use crate::lock_order;

use protocol::command::{Command, CommandKind};
use protocol::event::{EventKind, EventMsrs, EventSet};
use protocol::event_reply::Action;
use protocol::kvm::KvmRegs;

/// A vCPU-scope command, decoded once on the channel's reader thread and run on the vCPU's
/// own thread (the only thread that may touch its registers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VcpuCommand {
    /// GET_REGISTERS with the MSRs to read.
    GetRegisters { msrs: Vec<u32> },
    /// SET_REGISTERS (only while the vCPU is in an event).
    SetRegisters { regs: KvmRegs },
    /// GET_CPUID of a leaf and sub-leaf.
    GetCpuid { function: u32, index: u32 },
    /// GET_XSAVE.
    GetXsave,
    /// INJECT_EXCEPTION.
    InjectException {
        vector: u8,
        error_code: Option<u16>,
        address: u64,
    },
    /// CONTROL_EVENTS: the vCPU's new enabled-event set.
    ControlEvents { events: EventSet },
}

impl VcpuCommand {
    /// The owned form of `command`, or `None` when it is not a vCPU-scope command.
    pub(crate) fn from_command(command: &Command<'_>) -> Option<VcpuCommand> {
        Some(match *command {
            Command::GetRegisters { msrs, .. } => VcpuCommand::GetRegisters {
                msrs: msrs.iter().collect(),
            },
            Command::SetRegisters { regs, .. } => VcpuCommand::SetRegisters { regs },
            Command::GetCpuid {
                function, index, ..
            } => VcpuCommand::GetCpuid { function, index },
            Command::GetXsave { .. } => VcpuCommand::GetXsave,
            Command::InjectException {
                vector,
                error_code,
                address,
                ..
            } => VcpuCommand::InjectException {
                vector,
                error_code,
                address,
            },
            Command::ControlEvents { events, .. } => VcpuCommand::ControlEvents { events },
            _ => return None,
        })
    }

    /// The command's kind (names its reply).
    pub(crate) fn kind(&self) -> CommandKind {
        match self {
            VcpuCommand::GetRegisters { .. } => CommandKind::GetRegisters,
            VcpuCommand::SetRegisters { .. } => CommandKind::SetRegisters,
            VcpuCommand::GetCpuid { .. } => CommandKind::GetCpuid,
            VcpuCommand::GetXsave => CommandKind::GetXsave,
            VcpuCommand::InjectException { .. } => CommandKind::InjectException,
            VcpuCommand::ControlEvents { .. } => CommandKind::ControlEvents,
        }
    }
}

/// A command queued for a vCPU thread: the typed command and the `seq` its reply carries.
#[derive(Debug)]
pub(crate) struct QueuedCommand {
    pub(crate) ticket: u64,
    pub(crate) seq: u32,
    pub(crate) command: VcpuCommand,
}

/// A tool's answer to an event, copied out of the receive buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedReply {
    /// The action.
    pub action: Action,
    /// `new_val` of an MSR (or CR) reply.
    pub new_val: Option<u64>,
    /// `ctx_data` of a PF reply (empty: none).
    pub ctx_data: Vec<u8>,
}

impl OwnedReply {
    /// The reply assumed when no tool answers (detach, timeout): CONTINUE, no data.
    pub fn continue_default() -> OwnedReply {
        OwnedReply {
            action: Action::Continue,
            new_val: None,
            ctx_data: Vec::new(),
        }
    }
}

/// An injected exception whose TRAP event is still to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingTrap {
    pub(crate) vector: u32,
    pub(crate) error_code: u32,
    pub(crate) cr2: u64,
}

/// The registers of a vCPU inside a PF read event (PVM: an emulated MMIO read that KVM
/// completes on the next entry). Loading registers before that completion makes KVM drop
/// the emulator's register cache and the read never reaches its destination, so
/// SET_REGISTERS only records the tool's registers here; once KVM has completed the read
/// they are merged into what it left ([`PendingRead::merge`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PendingRead {
    /// The registers when the event was raised.
    pub(crate) at_event: kvm_bindings::kvm_regs,
    /// The registers of the tool's last SET_REGISTERS (None: it sent none).
    pub(crate) tool: Option<kvm_bindings::kvm_regs>,
}

impl PendingRead {
    /// The registers after the read: for each general register, rip and rflags, the tool's
    /// value where it changed it (differs from the event's), else `completed`'s (what KVM
    /// left: the destination written, rip past the instruction).
    pub(crate) fn merge(&self, completed: &kvm_bindings::kvm_regs) -> kvm_bindings::kvm_regs {
        let Some(tool) = &self.tool else {
            return *completed;
        };
        let mut out = *completed;
        let pick = |out: &mut u64, at: u64, tool: u64| {
            if tool != at {
                *out = tool;
            }
        };
        let e = &self.at_event;
        pick(&mut out.rax, e.rax, tool.rax);
        pick(&mut out.rbx, e.rbx, tool.rbx);
        pick(&mut out.rcx, e.rcx, tool.rcx);
        pick(&mut out.rdx, e.rdx, tool.rdx);
        pick(&mut out.rsi, e.rsi, tool.rsi);
        pick(&mut out.rdi, e.rdi, tool.rdi);
        pick(&mut out.rsp, e.rsp, tool.rsp);
        pick(&mut out.rbp, e.rbp, tool.rbp);
        pick(&mut out.r8, e.r8, tool.r8);
        pick(&mut out.r9, e.r9, tool.r9);
        pick(&mut out.r10, e.r10, tool.r10);
        pick(&mut out.r11, e.r11, tool.r11);
        pick(&mut out.r12, e.r12, tool.r12);
        pick(&mut out.r13, e.r13, tool.r13);
        pick(&mut out.r14, e.r14, tool.r14);
        pick(&mut out.r15, e.r15, tool.r15);
        pick(&mut out.rip, e.rip, tool.rip);
        pick(&mut out.rflags, e.rflags, tool.rflags);
        out
    }
}

/// The guest-debug state last loaded with KVM_SET_GUEST_DEBUG.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct AppliedDebug {
    pub(crate) control: u32,
    pub(crate) debugreg: [u64; 8],
}

/// The life of a vCPU's thread, as the other threads see it.
///
/// ```text
/// Live ──halts for good──▶ Halted ──thread ends──▶ Ended
///   └──────────────thread ends (stop, error)──────────▲
/// ```
/// A halted vCPU's thread stays to serve the tool (commands, PAUSE_VCPU); an ended one
/// answers commands with `-KVM_EAGAIN`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Life {
    /// Runs the guest (or is about to).
    #[default]
    Live,
    /// Halted with nothing to wake it; its thread serves the tool.
    Halted,
    /// The thread ended.
    Ended,
}

/// A vCPU's event exchange with the tool: at most one event outstanding per vCPU.
///
/// ```text
/// Idle ──event sent──▶ Sent{seq, kind} ──reply──▶ Answered(reply) ──taken──▶ Idle
///                        └──send failed / timeout / detach──────────────────▲
/// ```
/// While not `Idle` the vCPU's thread is inside the event, blocked in `wait_reply`: it runs
/// queued commands without a kick, and SET_REGISTERS is allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Exchange {
    /// No event in flight.
    #[default]
    Idle,
    /// Event `seq` of `kind` was sent; its reply has not come.
    Sent { seq: u32, kind: EventKind },
    /// The reply came; the vCPU thread has not taken it yet.
    Answered(OwnedReply),
}

impl Exchange {
    /// The vCPU thread is inside an event (and waits on the slot: no kick needed).
    pub(crate) fn in_event(&self) -> bool {
        *self != Exchange::Idle
    }
}

/// The mailbox of vCPU-scope commands the reader thread hands to the vCPU's thread.
///
/// ```text
/// Empty ──queued──▶ Queued(cmd) ──vCPU takes it──▶ Running{ticket} ──ran──▶ Done{ticket, reply}
///   ▲                 └──reader gives up (timeout, vCPU ended)──▶ Empty       │
///   └──────────────────────reader takes its reply (or queues anew)────────────┘
/// ```
/// A command arriving while one is `Queued` or `Running` gets `-KVM_EBUSY`.
#[derive(Debug, Default)]
pub(crate) enum Mailbox {
    /// Nothing queued.
    #[default]
    Empty,
    /// Waiting for the vCPU thread.
    Queued(QueuedCommand),
    /// The vCPU thread runs the command of `ticket`.
    Running { ticket: u64 },
    /// The reply message of the command of `ticket`, for the reader to take.
    Done { ticket: u64, reply: Vec<u8> },
}

impl Mailbox {
    /// A new command can be queued (nothing queued or running).
    pub(crate) fn accepts(&self) -> bool {
        matches!(self, Mailbox::Empty | Mailbox::Done { .. })
    }

    /// Takes the queued command for the vCPU thread to run (marking it running).
    pub(crate) fn start(&mut self) -> Option<QueuedCommand> {
        match std::mem::take(self) {
            Mailbox::Queued(cmd) => {
                *self = Mailbox::Running { ticket: cmd.ticket };
                Some(cmd)
            }
            other => {
                *self = other;
                None
            }
        }
    }

    /// Stores the reply of the command of `ticket` (unless the reader gave up on it).
    pub(crate) fn finish(&mut self, ticket: u64, reply: Vec<u8>) {
        if *self == (Mailbox::Running { ticket }) {
            *self = Mailbox::Done { ticket, reply };
        }
    }

    /// The reply of the command of `ticket`, if it is done (the mailbox empties).
    pub(crate) fn take_reply(&mut self, ticket: u64) -> Option<Vec<u8>> {
        match std::mem::take(self) {
            Mailbox::Done { ticket: t, reply } if t == ticket => Some(reply),
            other => {
                *self = other;
                None
            }
        }
    }

    /// The reader gives up on `ticket`: a command still queued is withdrawn, a running one
    /// will find nobody to store its reply for.
    pub(crate) fn abandon(&mut self, ticket: u64) {
        let mine = match self {
            Mailbox::Queued(cmd) => cmd.ticket == ticket,
            Mailbox::Running { ticket: t } | Mailbox::Done { ticket: t, .. } => *t == ticket,
            Mailbox::Empty => false,
        };
        if mine {
            *self = Mailbox::Empty;
        }
    }

    /// A command is queued for the vCPU thread.
    pub(crate) fn has_queued(&self) -> bool {
        matches!(self, Mailbox::Queued(_))
    }
}

impl PartialEq for Mailbox {
    fn eq(&self, other: &Mailbox) -> bool {
        match (self, other) {
            (Mailbox::Empty, Mailbox::Empty) => true,
            (Mailbox::Queued(a), Mailbox::Queued(b)) => a.ticket == b.ticket,
            (Mailbox::Running { ticket: a }, Mailbox::Running { ticket: b }) => a == b,
            (Mailbox::Done { ticket: a, .. }, Mailbox::Done { ticket: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// One-instruction steps in flight: each lifts something for one single-stepped instruction
/// and is undone at the single-step exit that ends it. They can combine (an exec fault right
/// after a breakpoint's step-over), so they are flags, all ended by the same exit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct OneStep {
    /// Stepping over a breakpoint: breakpoints disarmed for one instruction.
    pub(crate) over_breakpoint: bool,
    /// Pages lifted for one instruction (PF CONTINUE): re-protected after it with their
    /// restriction of that moment. Two at most: an instruction whose fetch (or data access)
    /// crosses from one restricted page into the next needs both.
    pub(crate) through_pages: [Option<u64>; 2],
    /// Executing one instruction the emulator could not complete on a protected page (e.g.
    /// a locked read-modify-write): every tracked page is unprotected for one step.
    pub(crate) all_pages: bool,
    /// A CPL3 instruction stepped at CPL0 (PVM single-steps only the CPL0 code it emulates):
    /// the user state to put back at the step's exit.
    pub(crate) user_mode: Option<UserMode>,
}

/// The CPL3 state a privileged step (see [`OneStep::user_mode`]) replaced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct UserMode {
    pub(crate) cs: kvm_bindings::kvm_segment,
    pub(crate) ss: kvm_bindings::kvm_segment,
    /// RFLAGS.AC was set for the step (SMAP) and must be cleared again.
    pub(crate) set_ac: bool,
    /// The instruction's address (for the log).
    pub(crate) rip: u64,
}

impl OneStep {
    /// Some step is in flight (the vCPU single-steps).
    pub(crate) fn active(&self) -> bool {
        self.over_breakpoint
            || self.through_pages.iter().any(Option::is_some)
            || self.all_pages
            || self.user_mode.is_some()
    }

    /// `page` is lifted for the step in flight.
    pub(crate) fn lifts(&self, page: u64) -> bool {
        self.through_pages.contains(&Some(page))
    }

    /// Records `page` as lifted; false when two other pages are lifted already.
    pub(crate) fn lift(&mut self, page: u64) -> bool {
        if self.lifts(page) {
            return true;
        }
        match self.through_pages.iter_mut().find(|p| p.is_none()) {
            Some(free) => {
                *free = Some(page);
                true
            }
            None => false,
        }
    }

    /// The lifted pages.
    pub(crate) fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.through_pages.iter().flatten().copied()
    }
}

/// What the engine last saw of a vCPU's system state (at its last exit through the engine),
/// for the reader thread, which has no access to a running vCPU's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuView {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// IDTR (base, limit).
    pub idt: (u64, u16),
    /// GDTR (base, limit).
    pub gdt: (u64, u16),
    /// TR's base and limit.
    pub tr: (u64, u32),
}

impl VcpuView {
    /// The view of `s`.
    pub fn of(s: &kvm_bindings::kvm_sregs) -> VcpuView {
        VcpuView {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            idt: (s.idt.base, s.idt.limit),
            gdt: (s.gdt.base, s.gdt.limit),
            tr: (s.tr.base, s.tr.limit),
        }
    }
}

/// Page-table roots a vCPU loaded lately (CR3 values seen at its exits), newest kept.
pub(crate) const RECENT_ROOTS: usize = 32;

/// One vCPU's introspection state: the three state machines above, the tool's settings, and
/// requests for the vCPU's thread.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// The thread's life.
    pub(crate) life: Life,
    /// The event exchange.
    pub(crate) exchange: Exchange,
    /// The command mailbox.
    pub(crate) mailbox: Mailbox,
    /// One-instruction steps in flight.
    pub(crate) step: OneStep,
    /// Events the tool enabled (CONTROL_EVENTS).
    pub(crate) events: EventSet,
    /// MSRs the tool asked to intercept (CONTROL_MSR).
    pub(crate) msrs: BTreeSet<u32>,
    /// A PAUSE_VCPU was accepted; the PAUSE_VCPU event is still to be sent.
    pub(crate) pause_pending: bool,
    /// A TRAP event to send before the next entry.
    pub(crate) pending_trap: Option<PendingTrap>,
    /// Guest debug must be reloaded before the next entry.
    pub(crate) debug_dirty: bool,
    /// Last guest debug state loaded.
    pub(crate) applied: AppliedDebug,
    /// Shadow of the event-header MSRs (read at the first event after attach).
    pub(crate) msr_shadow: Option<EventMsrs>,
    /// The system state at the vCPU's last exit through the engine, and how often it was
    /// recorded (the reader waits for a fresh one after a kick).
    pub(crate) view: Option<VcpuView>,
    pub(crate) view_seq: u64,
    /// The reader waits for the next view (notify the slot when recording it).
    pub(crate) view_wanted: bool,
    /// Page-table roots seen lately (a ring of distinct CR3 page addresses).
    pub(crate) roots: Vec<u64>,
    /// The last emulation failure or fault nothing explained, with the protection epoch it
    /// happened in: it is retried once (it may have come from a protection lifted since).
    pub(crate) unexplained: Option<(u64, u64)>,
    /// Inside a PF read event, until KVM has completed the read: SET_REGISTERS is recorded
    /// here instead of loaded (see [`PendingRead`]).
    pub(crate) pending_read: Option<PendingRead>,
}

impl Slot {
    /// Records the vCPU's system state at an exit.
    pub(crate) fn note_view(&mut self, sregs: &kvm_bindings::kvm_sregs) {
        self.view = Some(VcpuView::of(sregs));
        self.view_seq = self.view_seq.wrapping_add(1);
        let root = sregs.cr3 & 0x000f_ffff_ffff_f000;
        if self.roots.last() != Some(&root) {
            self.roots.retain(|r| *r != root);
            if self.roots.len() >= RECENT_ROOTS {
                self.roots.remove(0);
            }
            self.roots.push(root);
        }
    }
}

/// A slot with the condition variable both threads wait on.
#[derive(Debug)]
pub(crate) struct VcpuSlot {
    state: RankedMutex<Slot>,
    pub(crate) changed: Condvar,
}

impl Default for VcpuSlot {
    fn default() -> Self {
        VcpuSlot {
            state: RankedMutex::new(lock_order::SLOT, Slot::default()),
            changed: Condvar::new(),
        }
    }
}

impl VcpuSlot {
    pub(crate) fn lock(&self) -> RankedGuard<'_, Slot> {
        self.state.lock()
    }

    /// Waits on the slot's condition for at most `timeout`; returns the guard and whether
    /// it timed out.
    pub(crate) fn wait<'a>(
        &self,
        guard: RankedGuard<'a, Slot>,
        timeout: std::time::Duration,
    ) -> (RankedGuard<'a, Slot>, bool) {
        guard.wait_timeout(&self.changed, timeout)
    }
}

impl Slot {
    /// Forgets everything a tool set up (unhook). The thread's life, the guest debug state
    /// it loaded and what the engine saw of the vCPU stay, and so does a step in flight that
    /// must be undone at its exit: its lifted pages are re-protected (with no restriction
    /// left, read-write) and a CPL3 instruction stepped at CPL0 gets its CPL3 state back.
    /// An event in flight ends (its waiter sees the detach); registers a tool set during a
    /// pending read are still merged in once the read completes.
    pub(crate) fn reset(&mut self) {
        let life = self.life;
        let pending_read = self.pending_read;
        let applied = self.applied;
        let step = OneStep {
            through_pages: self.step.through_pages,
            user_mode: self.step.user_mode,
            ..OneStep::default()
        };
        let (view, view_seq, roots, unexplained) = (
            self.view,
            self.view_seq,
            std::mem::take(&mut self.roots),
            self.unexplained,
        );
        *self = Slot::default();
        self.life = life;
        self.applied = applied;
        self.step = step;
        self.view = view;
        self.view_seq = view_seq;
        self.roots = roots;
        self.unexplained = unexplained;
        self.pending_read = pending_read;
        self.debug_dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(ticket: u64) -> Mailbox {
        Mailbox::Queued(QueuedCommand {
            ticket,
            seq: 7,
            command: VcpuCommand::GetXsave,
        })
    }

    #[test]
    fn a_command_goes_queued_running_done_and_back_to_empty() {
        let mut m = Mailbox::default();
        assert!(m.accepts());
        m = queued(1);
        assert!(!m.accepts() && m.has_queued());
        let cmd = m.start().expect("the queued command");
        assert_eq!((cmd.ticket, cmd.seq), (1, 7));
        assert_eq!(m, Mailbox::Running { ticket: 1 });
        assert!(
            !m.accepts(),
            "a running command makes the next one wait (EBUSY)"
        );
        assert!(m.start().is_none(), "nothing else to run");
        assert_eq!(m.take_reply(1), None, "not done yet");
        m.finish(1, vec![1, 2, 3]);
        assert!(m.accepts(), "a finished reply does not block a new command");
        assert_eq!(m.take_reply(2), None, "another ticket's reply is not taken");
        assert_eq!(m.take_reply(1), Some(vec![1, 2, 3]));
        assert_eq!(m, Mailbox::Empty);
    }

    #[test]
    fn an_abandoned_command_is_withdrawn_and_its_late_reply_dropped() {
        let mut m = queued(3);
        m.abandon(4);
        assert!(m.has_queued(), "another ticket does not withdraw it");
        m.abandon(3);
        assert_eq!(m, Mailbox::Empty);
        let mut m = queued(5);
        m.start().expect("queued");
        m.abandon(5);
        m.finish(5, vec![9]);
        assert_eq!(m, Mailbox::Empty, "nobody waits for the reply any more");
    }

    #[test]
    fn a_step_lifts_at_most_two_pages_once_each() {
        let mut step = OneStep::default();
        assert!(!step.active());
        assert!(step.lift(0x1000) && step.lift(0x1000) && step.lift(0x2000));
        assert!(!step.lift(0x3000), "a third page does not fit");
        assert!(step.lifts(0x2000) && !step.lifts(0x3000));
        assert_eq!(step.pages().collect::<Vec<_>>(), [0x1000, 0x2000]);
        assert!(step.active());
    }

    #[test]
    fn views_count_and_roots_are_a_bounded_ring_of_distinct_pages() {
        let mut s = Slot::default();
        let mut sregs = kvm_bindings::kvm_sregs {
            cr3: 0x5000 | 0x18,
            ..Default::default()
        };
        s.note_view(&sregs);
        s.note_view(&sregs);
        assert_eq!((s.view_seq, s.roots.clone()), (2, vec![0x5000]));
        for k in 0..(RECENT_ROOTS as u64 + 3) {
            sregs.cr3 = 0x10_0000 + k * 0x1000;
            s.note_view(&sregs);
        }
        assert_eq!(s.roots.len(), RECENT_ROOTS);
        assert!(!s.roots.contains(&0x5000), "the oldest root left the ring");
        sregs.cr3 = 0x10_0000 + 10 * 0x1000;
        s.note_view(&sregs);
        assert_eq!(s.roots.len(), RECENT_ROOTS);
        assert_eq!(
            s.roots.last(),
            Some(&0x10_a000),
            "a root seen again is the newest"
        );
        assert_eq!(s.view.map(|v| v.cr3), Some(0x10_a000));
    }

    #[test]
    fn a_pending_read_takes_the_tool_s_registers_where_it_changed_them() {
        let at_event = kvm_bindings::kvm_regs {
            rax: 0xa1,
            r12: 0,
            rip: 0x1000,
            rflags: 0x2,
            ..Default::default()
        };
        let completed = kvm_bindings::kvm_regs {
            rax: 5,
            rip: 0x1008,
            ..at_event
        };
        let none = PendingRead {
            at_event,
            tool: None,
        };
        assert_eq!(none.merge(&completed), completed);
        // Only R12 changed: the read's destination and rip are KVM's.
        let r12 = PendingRead {
            at_event,
            tool: Some(kvm_bindings::kvm_regs {
                r12: 0x1234,
                ..at_event
            }),
        };
        let m = r12.merge(&completed);
        assert_eq!((m.rax, m.r12, m.rip, m.rflags), (5, 0x1234, 0x1008, 0x2));
        // The destination and rip changed by the tool: the tool's values win.
        let rax = PendingRead {
            at_event,
            tool: Some(kvm_bindings::kvm_regs {
                rax: 0xbeef,
                rip: 0x2000,
                rflags: 0x202,
                ..at_event
            }),
        };
        let m = rax.merge(&completed);
        assert_eq!((m.rax, m.r12, m.rip, m.rflags), (0xbeef, 0, 0x2000, 0x202));
    }

    #[test]
    fn reset_ends_the_exchange_and_the_tool_settings_but_keeps_life_and_a_page_step() {
        let mut s = Slot {
            life: Life::Halted,
            exchange: Exchange::Sent {
                seq: 9,
                kind: EventKind::PageFault,
            },
            mailbox: queued(1),
            step: OneStep {
                over_breakpoint: true,
                through_pages: [Some(0x5000), Some(0x6000)],
                all_pages: true,
                user_mode: Some(UserMode {
                    cs: kvm_bindings::kvm_segment {
                        dpl: 3,
                        ..Default::default()
                    },
                    ss: kvm_bindings::kvm_segment::default(),
                    set_ac: false,
                    rip: 0x40_0000,
                }),
            },
            pause_pending: true,
            ..Slot::default()
        };
        s.events = s.events.with(EventKind::Breakpoint);
        s.msrs.insert(0x174);
        s.reset();
        assert_eq!(s.life, Life::Halted);
        assert_eq!(s.exchange, Exchange::Idle);
        assert!(!s.exchange.in_event());
        assert_eq!(s.mailbox, Mailbox::Empty);
        assert!(!s.step.over_breakpoint && !s.step.all_pages);
        assert_eq!(s.step.pages().collect::<Vec<_>>(), [0x5000, 0x6000]);
        assert!(
            s.step.user_mode.is_some_and(|u| u.cs.dpl == 3),
            "a CPL3 instruction stepped at CPL0 still gets its CPL3 state back"
        );
        assert!(s.step.active(), "the step in flight still ends at its exit");
        assert!(s.events.bits() == 0 && s.msrs.is_empty() && !s.pause_pending);
        assert!(
            s.debug_dirty,
            "guest debug is reloaded without the tool's settings"
        );
    }
}
