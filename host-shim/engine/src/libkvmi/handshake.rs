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
    run_within(stream, config, HANDSHAKE_TIMEOUT)
}

/// [`run`] with another time limit.
fn run_within(
    stream: &mut UnixStream,
    config: &LibkvmiConfig,
    limit: Duration,
) -> Result<Vec<u8>, HandshakeError> {
    let deadline = Instant::now() + limit;
    let hello = vmm_handshake(config.uuid, config.start_time, config.name.as_bytes());
    stream.set_write_timeout(Some(limit))?;
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
            return Err(HandshakeError::Timeout(limit));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(HandshakeError::Io(ErrorKind::UnexpectedEof.into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HandshakeError::Timeout(limit));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cookie_hash: Option<[u8; 20]>) -> LibkvmiConfig {
        LibkvmiConfig {
            uuid: [7; 16],
            start_time: 1_700_000_000,
            name: "vm-name".into(),
            cookie_hash,
            ..LibkvmiConfig::default()
        }
    }

    /// Runs the VMM side against `tool`, which gets the tool's end of a socket pair.
    fn handshake(
        config: LibkvmiConfig,
        limit: Duration,
        tool: impl FnOnce(UnixStream) + Send + 'static,
    ) -> Result<Vec<u8>, HandshakeError> {
        let (mut vmm, t) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || tool(t));
        let result = run_within(&mut vmm, &config, limit);
        drop(vmm);
        peer.join().unwrap();
        result
    }

    fn read_hello(t: &mut UnixStream) -> [u8; 96] {
        let mut hello = [0u8; 96];
        t.read_exact(&mut hello).unwrap();
        hello
    }

    #[test]
    fn the_vmm_record_goes_first_and_bytes_after_the_answer_are_kept() {
        let got = handshake(config(None), Duration::from_secs(5), |mut t| {
            let hello = read_hello(&mut t);
            assert_eq!(&hello[..4], &96u32.to_le_bytes());
            assert_eq!(&hello[4..20], &[7; 16]);
            assert_eq!(&hello[24..32], &1_700_000_000i64.to_le_bytes());
            assert_eq!(&hello[32..39], b"vm-name");
            assert!(hello[39..].iter().all(|&b| b == 0));
            // A 28-byte answer (4 bytes past the 24 libkvmi sends are ignored), then the
            // first message's bytes in the same write.
            let mut answer = 28u32.to_le_bytes().to_vec();
            answer.extend([0xab; 24]);
            answer.extend([2, 0, 0, 0, 1, 0, 0, 0]);
            t.write_all(&answer).unwrap();
        });
        assert_eq!(got.unwrap(), vec![2, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn a_secret_admits_only_its_cookie() {
        let hash = [0x5a; 20];
        let answer = |cookie: [u8; 20]| {
            move |mut t: UnixStream| {
                read_hello(&mut t);
                let mut a = 24u32.to_le_bytes().to_vec();
                a.extend(cookie);
                let _ = t.write_all(&a);
            }
        };
        assert!(handshake(config(Some(hash)), Duration::from_secs(5), answer(hash)).is_ok());
        assert!(matches!(
            handshake(config(Some(hash)), Duration::from_secs(5), answer([0; 20])),
            Err(HandshakeError::CookieMismatch)
        ));
        // Without a secret any cookie is accepted.
        assert!(handshake(config(None), Duration::from_secs(5), answer([1; 20])).is_ok());
    }

    #[test]
    fn a_silent_short_or_oversized_answer_fails() {
        let limit = Duration::from_millis(200);
        let started = Instant::now();
        let silent = handshake(config(None), limit, |mut t| {
            read_hello(&mut t);
            // Half an answer, then nothing until the VMM gives up.
            t.write_all(&24u32.to_le_bytes()).unwrap();
            let mut rest = Vec::new();
            let _ = t.read_to_end(&mut rest);
        });
        assert!(matches!(silent, Err(HandshakeError::Timeout(d)) if d == limit));
        assert!(started.elapsed() >= limit);
        let closed = handshake(config(None), limit, |mut t| {
            read_hello(&mut t);
        });
        assert!(matches!(closed, Err(HandshakeError::Io(_))), "{closed:?}");
        let small = handshake(config(None), limit, |mut t| {
            read_hello(&mut t);
            t.write_all(&[3, 0, 0, 0]).unwrap();
        });
        assert!(
            matches!(small, Err(HandshakeError::Invalid(_))),
            "{small:?}"
        );
        let huge = handshake(config(None), limit, |mut t| {
            read_hello(&mut t);
            t.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
        });
        assert!(matches!(huge, Err(HandshakeError::Invalid(_))), "{huge:?}");
    }
}
