//! The VMM side of the libkvmi handshake: send the 96-byte VMM struct, read the tool's answer
//! (at least 24 bytes, extra bytes ignored), check the cookie hash when a secret is set.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use protocol::wire::libkvmi::frame::{CookieHash, FrameError, split_tool_handshake, vmm_handshake};
use zerocopy::IntoBytes;

use super::LibkvmiConfig;

/// How long the tool has to answer the handshake (QEMU's `handshake_timeout` default).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a handshake failed (the connection is closed; `--kvmi-connect` tries again later).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or closed.
    #[error("handshake I/O: {0}")]
    Io(#[from] std::io::Error),
    /// No complete answer within [`HANDSHAKE_TIMEOUT`].
    #[error("no handshake answer within {0:?}")]
    Timeout(Duration),
    /// The answer's `struct_size` is out of range.
    #[error("invalid handshake answer: {0}")]
    Invalid(FrameError),
    /// The cookie hash is not SHA-1 of the configured secret.
    #[error("received cookie doesn't match the --kvmi-secret")]
    CookieMismatch,
}

/// Runs the handshake on `stream` and returns the bytes the tool sent after its answer (its
/// first messages), which the reader must handle first.
pub fn run(stream: &mut UnixStream, config: &LibkvmiConfig) -> Result<Vec<u8>, HandshakeError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let hello = vmm_handshake(config.uuid, config.start_time, config.name.as_bytes());
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.write_all(hello.as_bytes())?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 4096];
    let (cookie, rest): (CookieHash, Vec<u8>) = loop {
        match split_tool_handshake(&buf) {
            Ok(Some((cookie, rest))) => break (cookie, rest.to_vec()),
            Ok(None) => {}
            Err(e) => return Err(HandshakeError::Invalid(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(HandshakeError::Io(ErrorKind::UnexpectedEof.into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    if let Some(expected) = config.cookie_hash
        && cookie != expected
    {
        return Err(HandshakeError::CookieMismatch);
    }
    if config.cookie_hash.is_none() {
        tracing::debug!("libkvmi tool not authenticated (no --kvmi-secret)");
    }
    Ok(rest)
}
