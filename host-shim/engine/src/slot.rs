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

/// One vCPU's introspection state.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Events the tool enabled (CONTROL_EVENTS).
    pub(crate) events: EventSet,
    /// MSRs the tool asked to intercept (CONTROL_MSR).
    pub(crate) msrs: BTreeSet<u32>,
    /// A command waiting for this vCPU thread.
    pub(crate) command: Option<QueuedCommand>,
    /// The reply message of the last executed command, by ticket.
    pub(crate) result: Option<(u64, Vec<u8>)>,
    /// A PAUSE_VCPU was accepted; the PAUSE_VCPU event is still to be sent.
    pub(crate) pause_pending: bool,
    /// The event sent and not yet answered: (seq, kind).
    pub(crate) outstanding: Option<(u32, EventKind)>,
    /// The answer to `outstanding`.
    pub(crate) reply: Option<OwnedReply>,
    /// The vCPU thread is inside an event (SET_REGISTERS allowed).
    pub(crate) in_event: bool,
    /// The vCPU thread is blocked waiting (no kick needed to reach it).
    pub(crate) waiting: bool,
    /// The vCPU thread ended (halted or stopped): commands get -KVM_EAGAIN.
    pub(crate) dead: bool,
    /// The vCPU halted for good; its thread stays to serve the tool.
    pub(crate) halted: bool,
    /// Guest debug must be reloaded before the next entry.
    pub(crate) debug_dirty: bool,
    /// Stepping over a breakpoint: breakpoints disarmed for one instruction.
    pub(crate) stepping_over: bool,
    /// Executing one instruction from a no-exec page (PF ALLOW): re-protect it after the step.
    pub(crate) exec_step_page: Option<u64>,
    /// Executing one instruction the emulator could not complete on a protected page (e.g. a
    /// locked read-modify-write): every tracked page is unprotected for one step.
    pub(crate) step_all: bool,
    /// Last guest debug state loaded.
    pub(crate) applied: AppliedDebug,
    /// Shadow of the event-header MSRs (read at the first event after attach).
    pub(crate) msr_shadow: Option<EventMsrs>,
    /// A TRAP event to send before the next entry.
    pub(crate) pending_trap: Option<PendingTrap>,
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
    /// Forgets everything a tool set up (unhook); keeps `dead`.
    pub(crate) fn reset(&mut self) {
        let dead = self.dead;
        let halted = self.halted;
        let applied = self.applied;
        let waiting = self.waiting;
        let exec_step_page = self.exec_step_page;
        *self = Slot::default();
        self.dead = dead;
        self.halted = halted;
        self.applied = applied;
        self.waiting = waiting;
        self.exec_step_page = exec_step_page;
        self.debug_dirty = true;
    }
}
