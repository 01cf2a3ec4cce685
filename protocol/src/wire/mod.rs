//! Wire profiles: how the semantic messages are numbered and laid out on the wire.
//!
//! A [`WireProfile`] maps [`Command`], [`Reply`](crate::reply::Reply), [`Event`] and [`EventReply`] to bytes and
//! back. [`v4`] is the only profile today (the RFC v4 numbering and layouts with this
//! project's extensions). A second profile, e.g. the KVM-VMI `kvmi-v7` ABI that libkvmi
//! speaks, is another module implementing the same trait; the semantic types do not change.

pub(crate) mod codec;
pub mod libkvmi;
pub mod v4;

use crate::command::{Command, CommandKind};
use crate::error::{EncodeError, ErrorCode, ProtocolError};
use crate::event::{Event, EventKind};
use crate::event_reply::EventReply;
use crate::frame::{self, Frame};
use crate::reply::CommandResult;

/// A message a tool sends to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolMessage<'a> {
    /// A command; answer with a reply carrying the same `seq`.
    Command {
        /// Sequence number.
        seq: u32,
        /// The decoded, validated command.
        command: Command<'a>,
    },
    /// A reply to an event. Find the event by `seq`, then decode the payload with
    /// [`WireProfile::decode_event_reply`].
    EventReply {
        /// Sequence number of the event answered.
        seq: u32,
        /// The undecoded payload.
        payload: &'a [u8],
    },
}

/// A message the host sends to a tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "no allocation in no_std: an event is carried by value, once per message"
)]
pub enum HostMessage<'a> {
    /// An event; answer with an event reply carrying the same `seq`.
    Event {
        /// Sequence number.
        seq: u32,
        /// The decoded, validated event.
        event: Event,
    },
    /// A reply to a command. Check `seq` against the command sent, then decode the payload
    /// with [`WireProfile::decode_reply`].
    Reply {
        /// Sequence number of the command answered.
        seq: u32,
        /// The command kind named by the message ID.
        command: CommandKind,
        /// The undecoded payload.
        payload: &'a [u8],
    },
}

/// A wire numbering and layout of the semantic messages.
///
/// Decoders take the payload (after the header) and validate everything: sizes, padding,
/// array counts, field values. Encoders validate the same rules, then write header and
/// payload into the caller's buffer and return the length written; `*_len` gives that length
/// up front. For every message `m` that encodes, decoding the bytes gives back `m`.
pub trait WireProfile {
    /// Short name of the profile.
    const NAME: &'static str;
    /// Largest message, header included.
    const MAX_MSG_SIZE: usize;
    /// Message ID of events.
    const EVENT_ID: u16;
    /// Message ID of event replies.
    const EVENT_REPLY_ID: u16;

    /// The message ID of a command.
    fn command_id(kind: CommandKind) -> u16;
    /// The command with a message ID.
    fn command_kind(id: u16) -> Option<CommandKind>;

    /// Decode and validate a command payload with message ID `id`.
    fn decode_command(id: u16, payload: &[u8]) -> Result<Command<'_>, ProtocolError>;
    /// Encoded length of a command message (header included).
    fn command_len(command: &Command<'_>) -> Result<usize, EncodeError>;
    /// Encode a command message.
    fn encode_command(
        seq: u32,
        command: &Command<'_>,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError>;

    /// Decode a reply payload to a command of kind `kind`.
    fn decode_reply(kind: CommandKind, payload: &[u8]) -> Result<CommandResult<'_>, ProtocolError>;
    /// Encoded length of a reply message (header included).
    fn reply_len(kind: CommandKind, result: &CommandResult<'_>) -> Result<usize, EncodeError>;
    /// Encode a reply message to a command of kind `kind`.
    fn encode_reply(
        kind: CommandKind,
        seq: u32,
        result: &CommandResult<'_>,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError>;

    /// Encode an error-only reply for any message ID, including IDs that decode to no
    /// command (a host answers an unknown command ID with `-KVM_ENOSYS` under that ID).
    fn encode_error_reply(
        id: u16,
        seq: u32,
        code: ErrorCode,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError>;

    /// Decode and validate an event payload.
    fn decode_event(payload: &[u8]) -> Result<Event, ProtocolError>;
    /// Encoded length of an event message (header included).
    fn event_len(event: &Event) -> usize;
    /// Encode an event message.
    fn encode_event(seq: u32, event: &Event, buf: &mut [u8]) -> Result<usize, EncodeError>;

    /// Decode and validate the reply payload to an event of kind `event`.
    fn decode_event_reply(
        event: EventKind,
        payload: &[u8],
    ) -> Result<EventReply<'_>, ProtocolError>;
    /// Encoded length of an event-reply message (header included).
    fn event_reply_len(reply: &EventReply<'_>) -> Result<usize, EncodeError>;
    /// Encode an event-reply message.
    fn encode_event_reply(
        seq: u32,
        reply: &EventReply<'_>,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError>;

    /// Parse a buffer holding exactly one message.
    fn parse_frame(buf: &[u8]) -> Result<Frame<'_>, ProtocolError> {
        frame::parse_frame(buf, Self::MAX_MSG_SIZE)
    }

    /// Take the first whole message off a stream buffer (`Ok(None)`: need more bytes).
    fn split_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, &[u8])>, ProtocolError> {
        frame::split_frame(buf, Self::MAX_MSG_SIZE)
    }

    /// Classify and decode a message from a tool (host side).
    fn decode_tool_message(frame: Frame<'_>) -> Result<ToolMessage<'_>, ProtocolError> {
        let seq = frame.header.seq;
        match frame.header.id {
            id if id == Self::EVENT_REPLY_ID => Ok(ToolMessage::EventReply {
                seq,
                payload: frame.payload,
            }),
            id if id == Self::EVENT_ID => Err(ProtocolError::UnexpectedMessage(id)),
            id => Ok(ToolMessage::Command {
                seq,
                command: Self::decode_command(id, frame.payload)?,
            }),
        }
    }

    /// Classify and decode a message from the host (tool side).
    fn decode_host_message(frame: Frame<'_>) -> Result<HostMessage<'_>, ProtocolError> {
        let seq = frame.header.seq;
        match frame.header.id {
            id if id == Self::EVENT_ID => Ok(HostMessage::Event {
                seq,
                event: Self::decode_event(frame.payload)?,
            }),
            id if id == Self::EVENT_REPLY_ID => Err(ProtocolError::UnexpectedMessage(id)),
            id => Ok(HostMessage::Reply {
                seq,
                command: Self::command_kind(id).ok_or(ProtocolError::UnknownMessage(id))?,
                payload: frame.payload,
            }),
        }
    }
}
