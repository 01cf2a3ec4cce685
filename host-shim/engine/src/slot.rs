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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OneStep {
    /// Stepping over a breakpoint: breakpoints disarmed for one instruction.
    pub(crate) over_breakpoint: bool,
    /// Executing one instruction from a no-exec page (PF CONTINUE): re-protect it after.
    pub(crate) through_page: Option<u64>,
    /// Executing one instruction the emulator could not complete on a protected page (e.g.
    /// a locked read-modify-write): every tracked page is unprotected for one step.
    pub(crate) all_pages: bool,
}

impl OneStep {
    /// Some step is in flight (the vCPU single-steps).
    pub(crate) fn active(&self) -> bool {
        self.over_breakpoint || self.through_page.is_some() || self.all_pages
    }
}

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
    /// Forgets everything a tool set up (unhook). The thread's life and the guest debug
    /// state it loaded stay, and so does a step through a no-exec page (its page must still
    /// be re-protected); an event in flight ends (its waiter sees the detach).
    pub(crate) fn reset(&mut self) {
        let life = self.life;
        let applied = self.applied;
        let through_page = self.step.through_page;
        *self = Slot::default();
        self.life = life;
        self.applied = applied;
        self.step.through_page = through_page;
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
                through_page: Some(0x5000),
                all_pages: true,
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
        assert_eq!(
            s.step,
            OneStep {
                through_page: Some(0x5000),
                ..OneStep::default()
            }
        );
        assert!(s.events.bits() == 0 && s.msrs.is_empty() && !s.pause_pending);
        assert!(
            s.debug_dirty,
            "guest debug is reloaded without the tool's settings"
        );
    }
}
