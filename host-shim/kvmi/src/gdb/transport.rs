//! The byte stream to gdb: stdin/stdout (`target remote | kvmi gdb ...`) or one TCP
//! connection (`--listen HOST:PORT`). A reader thread turns the input into a channel of
//! bytes, so the session loop can wait for gdb and for KVMI events at once.

use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::time::Duration;

use gdbstub::conn::{Connection, ConnectionExt};

/// The connection to gdb.
pub struct GdbConnection {
    writer: Box<dyn Write + Send>,
    input: Receiver<Vec<u8>>,
    pending: std::collections::VecDeque<u8>,
}

impl GdbConnection {
    /// gdb's packets on `reader`, replies to `writer`.
    pub fn new(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static) -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(64);
        let mut reader = reader;
        std::thread::Builder::new()
            .name("gdb-input".into())
            .spawn(move || {
                if let Err(e) = vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service) {
                    tracing::error!("gdb input: {e}");
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx.send(buf[..n].to_vec()).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .ok();
        GdbConnection {
            writer: Box::new(writer),
            input: rx,
            pending: Default::default(),
        }
    }

    /// The next byte from gdb, waiting at most `timeout` (`Ok(None)`: none yet); an
    /// `UnexpectedEof` error once gdb closed its end.
    pub fn next_byte(&mut self, timeout: Duration) -> std::io::Result<Option<u8>> {
        if let Some(b) = self.pending.pop_front() {
            return Ok(Some(b));
        }
        match self.input.recv_timeout(timeout) {
            Ok(chunk) => {
                self.pending.extend(chunk);
                Ok(self.pending.pop_front())
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "gdb closed the connection",
            )),
        }
    }
}

impl Connection for GdbConnection {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> std::io::Result<()> {
        self.writer.write_all(&[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

impl ConnectionExt for GdbConnection {
    fn read(&mut self) -> std::io::Result<u8> {
        loop {
            if let Some(b) = self.next_byte(Duration::from_secs(3600))? {
                return Ok(b);
            }
        }
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        if self.pending.is_empty()
            && let Ok(chunk) = self.input.try_recv()
        {
            self.pending.extend(chunk);
        }
        Ok(self.pending.front().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_and_eof_is_an_error() {
        let input: &'static [u8] = b"$g#67";
        let mut conn = GdbConnection::new(input, std::io::sink());
        let mut got = Vec::new();
        while let Some(b) = conn.next_byte(Duration::from_secs(2)).unwrap() {
            got.push(b);
            if got.len() == 5 {
                break;
            }
        }
        assert_eq!(got, b"$g#67");
        let end = loop {
            match conn.next_byte(Duration::from_secs(2)) {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(end.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
