//! The v4 wire profile: RFC v4 (Dec 2017) numbering and layouts, with this project's
//! extensions (see the crate docs): `SKIP` = action bit 3, `SINGLESTEP` = event bit 11,
//! `CONTROL_VE` = command 20, `CONTROL_BREAKPOINT` = command 21.

pub mod event_layout;
pub mod layout;

mod command_codec;
mod event_codec;
mod reply_codec;

use crate::command::{Command, CommandKind};
use crate::error::{EncodeError, ErrorCode, ProtocolError};
use crate::event::{Event, EventKind, EventSet};
use crate::event_reply::{Action, EventReply};
use crate::frame::HEADER_SIZE;
use crate::reply::CommandResult;
use crate::wire::WireProfile;

/// `KVMI_VERSION` of this profile.
pub const KVMI_VERSION: u32 = 1;

/// Largest v4 message: the header plus a `u16`-sized payload (65 543 bytes).
pub const MAX_MSG_SIZE: usize = HEADER_SIZE + u16::MAX as usize;

/// v4 message IDs (and this project's extensions, marked).
pub mod ids {
    /// `KVMI_GET_VERSION`.
    pub const GET_VERSION: u16 = 1;
    /// `KVMI_PAUSE_VCPU`.
    pub const PAUSE_VCPU: u16 = 2;
    /// `KVMI_GET_GUEST_INFO`.
    pub const GET_GUEST_INFO: u16 = 3;
    /// `KVMI_GET_REGISTERS`.
    pub const GET_REGISTERS: u16 = 6;
    /// `KVMI_SET_REGISTERS`.
    pub const SET_REGISTERS: u16 = 7;
    /// `KVMI_GET_PAGE_ACCESS`.
    pub const GET_PAGE_ACCESS: u16 = 10;
    /// `KVMI_SET_PAGE_ACCESS`.
    pub const SET_PAGE_ACCESS: u16 = 11;
    /// `KVMI_INJECT_EXCEPTION`.
    pub const INJECT_EXCEPTION: u16 = 12;
    /// `KVMI_READ_PHYSICAL`.
    pub const READ_PHYSICAL: u16 = 13;
    /// `KVMI_WRITE_PHYSICAL`.
    pub const WRITE_PHYSICAL: u16 = 14;
    /// `KVMI_GET_MAP_TOKEN`.
    pub const GET_MAP_TOKEN: u16 = 15;
    /// `KVMI_CONTROL_EVENTS`.
    pub const CONTROL_EVENTS: u16 = 17;
    /// `KVMI_CONTROL_CR`.
    pub const CONTROL_CR: u16 = 18;
    /// `KVMI_CONTROL_MSR`.
    pub const CONTROL_MSR: u16 = 19;
    /// `KVMI_CONTROL_VE` (extension: v4 documents it without an ID).
    pub const CONTROL_VE: u16 = 20;
    /// `KVMI_CONTROL_BREAKPOINT` (extension).
    pub const CONTROL_BREAKPOINT: u16 = 21;
    /// `KVMI_EVENT`.
    pub const EVENT: u16 = 23;
    /// `KVMI_EVENT_REPLY`.
    pub const EVENT_REPLY: u16 = 24;
    /// `KVMI_GET_CPUID`.
    pub const GET_CPUID: u16 = 25;
    /// `KVMI_GET_XSAVE`.
    pub const GET_XSAVE: u16 = 26;
}

/// v4 event-reply action bits (`KVMI_EVENT_ACTION_*`).
pub mod actions {
    /// `CONTINUE` (v3 `ALLOW`).
    pub const CONTINUE: u32 = 1 << 0;
    /// `RETRY`.
    pub const RETRY: u32 = 1 << 1;
    /// `CRASH`.
    pub const CRASH: u32 = 1 << 2;
    /// `SKIP` (extension: the v3 action v4 folded into `RETRY`).
    pub const SKIP: u32 = 1 << 3;
}

/// The v4 wire profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4;

/// The v4 message ID of a command.
pub const fn command_id(kind: CommandKind) -> u16 {
    use CommandKind::*;
    match kind {
        GetVersion => ids::GET_VERSION,
        PauseVcpu => ids::PAUSE_VCPU,
        GetGuestInfo => ids::GET_GUEST_INFO,
        GetRegisters => ids::GET_REGISTERS,
        SetRegisters => ids::SET_REGISTERS,
        GetPageAccess => ids::GET_PAGE_ACCESS,
        SetPageAccess => ids::SET_PAGE_ACCESS,
        InjectException => ids::INJECT_EXCEPTION,
        ReadPhysical => ids::READ_PHYSICAL,
        WritePhysical => ids::WRITE_PHYSICAL,
        GetMapToken => ids::GET_MAP_TOKEN,
        ControlEvents => ids::CONTROL_EVENTS,
        ControlCr => ids::CONTROL_CR,
        ControlMsr => ids::CONTROL_MSR,
        ControlVe => ids::CONTROL_VE,
        ControlBreakpoint => ids::CONTROL_BREAKPOINT,
        GetCpuid => ids::GET_CPUID,
        GetXsave => ids::GET_XSAVE,
    }
}

/// The command with a v4 message ID.
pub fn command_kind(id: u16) -> Option<CommandKind> {
    CommandKind::ALL.into_iter().find(|k| command_id(*k) == id)
}

/// The v4 event bit (`KVMI_EVENT_*`) of an event.
pub const fn event_bit(kind: EventKind) -> u32 {
    use EventKind::*;
    match kind {
        Cr => 1 << 1,
        Msr => 1 << 2,
        Xsetbv => 1 << 3,
        Breakpoint => 1 << 4,
        Hypercall => 1 << 5,
        PageFault => 1 << 6,
        Trap => 1 << 7,
        Descriptor => 1 << 8,
        CreateVcpu => 1 << 9,
        PauseVcpu => 1 << 10,
        Singlestep => 1 << 11,
    }
}

/// The event of a `kvmi_event.event` value: `-KVM_ENOSYS` for no or unknown bits,
/// `-KVM_EINVAL` for several known bits.
pub fn event_kind(bits: u32) -> Result<EventKind, ProtocolError> {
    if bits.count_ones() > 1 && bits & !event_set_to_bits(EventSet::ALL) == 0 {
        return Err(ProtocolError::InvalidValue {
            field: "event",
            value: bits.into(),
        });
    }
    EventKind::ALL
        .into_iter()
        .find(|k| event_bit(*k) == bits)
        .ok_or(ProtocolError::UnknownEvent(bits))
}

/// The v4 event mask of a set of events.
pub fn event_set_to_bits(set: EventSet) -> u32 {
    EventKind::ALL
        .into_iter()
        .filter(|k| set.contains(*k))
        .fold(0, |bits, k| bits | event_bit(k))
}

/// The set of events in a v4 event mask (`-KVM_EINVAL` for unknown bits).
pub fn event_set_from_bits(bits: u32) -> Result<EventSet, ProtocolError> {
    let set: EventSet = EventKind::ALL
        .into_iter()
        .filter(|k| bits & event_bit(*k) != 0)
        .collect();
    if event_set_to_bits(set) != bits {
        return Err(ProtocolError::InvalidValue {
            field: "events",
            value: bits.into(),
        });
    }
    Ok(set)
}

/// The v4 bit of an action.
pub const fn action_bit(action: Action) -> u32 {
    match action {
        Action::Continue => actions::CONTINUE,
        Action::Retry => actions::RETRY,
        Action::Crash => actions::CRASH,
        Action::Skip => actions::SKIP,
    }
}

/// The action of a `kvmi_event_reply.action` (exactly one known bit, else `-KVM_EINVAL`).
pub fn action_from_bits(bits: u32) -> Result<Action, ProtocolError> {
    Action::ALL
        .into_iter()
        .find(|a| action_bit(*a) == bits)
        .ok_or(ProtocolError::InvalidValue {
            field: "action",
            value: bits.into(),
        })
}

impl WireProfile for V4 {
    const NAME: &'static str = "kvmi-v4";
    const MAX_MSG_SIZE: usize = MAX_MSG_SIZE;
    const EVENT_ID: u16 = ids::EVENT;
    const EVENT_REPLY_ID: u16 = ids::EVENT_REPLY;

    fn command_id(kind: CommandKind) -> u16 {
        command_id(kind)
    }
    fn command_kind(id: u16) -> Option<CommandKind> {
        command_kind(id)
    }
    fn decode_command(id: u16, payload: &[u8]) -> Result<Command<'_>, ProtocolError> {
        command_codec::decode(id, payload)
    }
    fn command_len(command: &Command<'_>) -> Result<usize, EncodeError> {
        command_codec::encoded_len(command)
    }
    fn encode_command(
        seq: u32,
        command: &Command<'_>,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        command_codec::encode(seq, command, buf)
    }
    fn decode_reply(kind: CommandKind, payload: &[u8]) -> Result<CommandResult<'_>, ProtocolError> {
        reply_codec::decode(kind, payload)
    }
    fn reply_len(kind: CommandKind, result: &CommandResult<'_>) -> Result<usize, EncodeError> {
        reply_codec::encoded_len(kind, result)
    }
    fn encode_reply(
        kind: CommandKind,
        seq: u32,
        result: &CommandResult<'_>,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        reply_codec::encode(kind, seq, result, buf)
    }
    fn encode_error_reply(
        id: u16,
        seq: u32,
        code: ErrorCode,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        reply_codec::encode_error(id, seq, code, buf)
    }
    fn decode_event(payload: &[u8]) -> Result<Event, ProtocolError> {
        event_codec::decode_event(payload)
    }
    fn event_len(event: &Event) -> usize {
        event_codec::event_len(event)
    }
    fn encode_event(seq: u32, event: &Event, buf: &mut [u8]) -> Result<usize, EncodeError> {
        event_codec::encode_event(seq, event, buf)
    }
    fn decode_event_reply(
        event: EventKind,
        payload: &[u8],
    ) -> Result<EventReply<'_>, ProtocolError> {
        event_codec::decode_reply(event, payload)
    }
    fn event_reply_len(reply: &EventReply<'_>) -> Result<usize, EncodeError> {
        event_codec::reply_len(reply)
    }
    fn encode_event_reply(
        seq: u32,
        reply: &EventReply<'_>,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        event_codec::encode_reply(seq, reply, buf)
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
