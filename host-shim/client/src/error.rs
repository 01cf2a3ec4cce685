//! Errors of the KVMI client.

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
