//! KVM error codes and the typed errors of decoding and encoding.
//!
//! Every [`ProtocolError`] maps to the wire error code a host sends back for the offending
//! command ([`ProtocolError::code`]); an [`EncodeError`] is a local mistake of the sender.

use crate::command::CommandKind;
use crate::event::EventKind;
use crate::event_reply::Action;

/// A KVM error code (`include/uapi/linux/kvm_para.h`). The wire carries it negated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `KVM_ENOSYS` (1000): unknown or unsupported command or event.
    NoSys,
    /// `KVM_EFAULT` (14): bad address.
    Fault,
    /// `KVM_E2BIG` (7): argument list too long.
    TooBig,
    /// `KVM_EPERM` (1): command or event not allowed.
    Perm,
    /// `KVM_EOPNOTSUPP` (95): operation not supported.
    OpNotSupp,
    /// `KVM_EAGAIN` (11): try again (e.g. vCPU not ready for introspection).
    Again,
    /// `KVM_EBUSY` (16): busy (e.g. a command is already queued for the vCPU).
    Busy,
    /// `KVM_EINVAL` (22): invalid argument, non-zero padding or a bad size.
    Inval,
    /// `KVM_ENOENT` (2): no such entry.
    NoEnt,
    /// `KVM_ENOMEM` (12): out of memory.
    NoMem,
}

impl ErrorCode {
    /// Every error code.
    pub const ALL: [ErrorCode; 10] = [
        Self::NoSys,
        Self::Fault,
        Self::TooBig,
        Self::Perm,
        Self::OpNotSupp,
        Self::Again,
        Self::Busy,
        Self::Inval,
        Self::NoEnt,
        Self::NoMem,
    ];

    /// The positive `KVM_E*` value.
    pub const fn value(self) -> i32 {
        match self {
            Self::NoSys => 1000,
            Self::Fault => 14,
            Self::TooBig => 7,
            Self::Perm => 1,
            Self::OpNotSupp => 95,
            Self::Again => 11,
            Self::Busy => 16,
            Self::Inval => 22,
            Self::NoEnt => 2,
            Self::NoMem => 12,
        }
    }

    /// The value carried on the wire: the negated [`ErrorCode::value`].
    pub const fn wire(self) -> i32 {
        -self.value()
    }

    /// The code for a wire value (negative); `None` for 0, positive or unknown values.
    pub fn from_wire(wire: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.wire() == wire)
    }
}

/// Why a message was rejected. Every variant maps to a wire error code ([`Self::code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The buffer ends before the message header does.
    #[error("message header truncated: {got} of 8 bytes")]
    TruncatedHeader {
        /// Bytes available.
        got: usize,
    },
    /// A message or struct has the wrong size.
    #[error("{what}: {got} bytes, expected {expected}")]
    SizeMismatch {
        /// What was being decoded.
        what: &'static str,
        /// Bytes expected.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// A message is shorter than its fixed part.
    #[error("{what}: truncated, {got} bytes, need at least {needed}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// An array count claims more entries than the message holds.
    #[error("{what}: count {count} overruns the message")]
    CountOverrun {
        /// The array.
        what: &'static str,
        /// The claimed count.
        count: usize,
    },
    /// An array count is larger than a reply could ever carry.
    #[error("{what}: count {count} exceeds the limit of {max}")]
    CountTooBig {
        /// The array.
        what: &'static str,
        /// The claimed count.
        count: usize,
        /// The largest count accepted.
        max: usize,
    },
    /// A padding field is not zero.
    #[error("non-zero padding in {0}")]
    NonZeroPadding(&'static str),
    /// A field holds a value outside its domain.
    #[error("invalid {field}: {value:#x}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The offending value.
        value: u64,
    },
    /// An unknown message ID.
    #[error("unknown message id {0}")]
    UnknownMessage(u16),
    /// An unknown event bit (or no bit).
    #[error("unknown event {0:#x}")]
    UnknownEvent(u32),
    /// The message is of a kind this side does not accept in this direction.
    #[error("message id {0} is not expected in this direction")]
    UnexpectedMessage(u16),
    /// The command is outside the allowed-command mask.
    #[error("command {0:?} is not allowed")]
    CommandNotAllowed(CommandKind),
    /// The event is outside the allowed-event mask.
    #[error("event {0:?} is not allowed")]
    EventNotAllowed(EventKind),
    /// The event does not accept this action.
    #[error("event {event:?} does not accept action {action:?}")]
    ActionNotAccepted {
        /// The event being answered.
        event: EventKind,
        /// The action given.
        action: Action,
    },
}

impl ProtocolError {
    /// The error code this error maps to.
    pub const fn error_code(&self) -> ErrorCode {
        match self {
            Self::UnknownMessage(_) | Self::UnknownEvent(_) => ErrorCode::NoSys,
            Self::CountTooBig { .. } => ErrorCode::TooBig,
            Self::CommandNotAllowed(_) | Self::EventNotAllowed(_) => ErrorCode::Perm,
            Self::TruncatedHeader { .. }
            | Self::SizeMismatch { .. }
            | Self::Truncated { .. }
            | Self::CountOverrun { .. }
            | Self::NonZeroPadding(_)
            | Self::InvalidValue { .. }
            | Self::UnexpectedMessage(_)
            | Self::ActionNotAccepted { .. } => ErrorCode::Inval,
        }
    }

    /// The wire error code (negative), as a host puts it in `kvmi_error_code.err`.
    pub const fn code(&self) -> i32 {
        self.error_code().wire()
    }
}

/// Why a message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The caller's buffer is too small; `needed` is the encoded length.
    #[error("buffer too small: {needed} bytes needed, {available} available")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The payload does not fit the header's `size` field (or the profile's maximum).
    #[error("payload of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The payload size.
        size: usize,
        /// The largest payload allowed.
        max: usize,
    },
    /// The reply does not belong to the command it is said to answer.
    #[error("reply does not match command {0:?}")]
    ReplyMismatch(CommandKind),
    /// The message would not pass validation on the other side.
    #[error("invalid message: {0}")]
    Invalid(#[from] ProtocolError),
}
