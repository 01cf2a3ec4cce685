//! Errors of the KVMI client.

use protocol::wire::libkvmi::tool::ToolError;
use protocol::{CommandKind, EncodeError, ErrorCode, ProtocolError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, accepting, reading or writing the socket failed.
    #[error("KVMI socket: {context}")]
    Io {
        /// What the client was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host answered the command with a KVM error code (e.g. `-KVM_EPERM`).
    #[error("{command:?} failed: {code:?} (-{})", code.value())]
    Kvm {
        /// The command that failed.
        command: CommandKind,
        /// The KVM error code the host returned.
        code: ErrorCode,
    },
    /// The host's message could not be decoded (the client closes the channel).
    #[error("bad message from the host: {0}")]
    Protocol(#[from] ProtocolError),
    /// The command or event reply could not be encoded (a bad argument).
    #[error("cannot encode the message: {0}")]
    Encode(EncodeError),
    /// The channel is closed (the host closed it, or a protocol error closed it).
    #[error("the KVMI channel is closed: {0}")]
    Closed(String),
    /// No reply arrived in time.
    #[error("no reply to {command:?} (seq {seq}) within {millis} ms")]
    Timeout {
        /// The command.
        command: CommandKind,
        /// Its sequence number.
        seq: u32,
        /// The time waited.
        millis: u128,
    },
    /// A reply of the wrong shape for the command (a host bug).
    #[error("unexpected reply to {0:?}")]
    UnexpectedReply(CommandKind),
    /// Invalid input to a client helper (e.g. an unknown event name).
    #[error("{0}")]
    Invalid(String),
    /// The command has no equivalent in the channel's wire dialect (e.g. the v4 extension
    /// `CONTROL_BREAKPOINT` over libkvmi, which has no way to set a breakpoint).
    #[error("{command:?} has no equivalent in the {dialect} dialect")]
    Unsupported {
        /// The command.
        command: CommandKind,
        /// The dialect's name.
        dialect: &'static str,
    },
    /// The host answered with an error value that is no known `KVM_E*` code.
    #[error("{command:?} failed with unknown error {err}")]
    UnknownCode {
        /// The command that failed.
        command: CommandKind,
        /// The value on the wire.
        err: i32,
    },
    /// A libkvmi (kvmi-v7) message could not be encoded or read.
    #[error("libkvmi: {0}")]
    Libkvmi(#[from] ToolError),
    /// The libkvmi handshake failed.
    #[error("libkvmi handshake: {0}")]
    Handshake(#[from] HandshakeError),
}

/// Why the libkvmi handshake with a connecting VM failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The VM's `struct_size` is below 32 (no room for the name) or above 65 536.
    #[error("the VM's struct_size {0} is outside 32..=65536")]
    StructSize(u32),
    /// The VM closed the connection during the handshake.
    #[error("the VM closed the connection")]
    Closed,
    /// `GET_VERSION` answered a version below 1.
    #[error("the VM speaks KVMI version {0} (at least 1 is required)")]
    Version(u32),
}

impl ClientError {
    /// The KVM error code, for errors the host returned.
    pub fn kvm_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Kvm { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClientError {
        let context = context.into();
        move |source| ClientError::Io { context, source }
    }
}

impl From<EncodeError> for ClientError {
    fn from(e: EncodeError) -> Self {
        ClientError::Encode(e)
    }
}
