//! The built-in port devices every guest gets: the COM1 serial console (vm-superio 8250) and
//! the debug-exit port; plus the policy for I/O nobody claims.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use crate::sync::{RankedMutex, vmm_ranks};

use hypercall::ports::{DEBUG_EXIT, SERIAL_COM1, SERIAL_COM1_LEN};
use vm_superio::{Serial, Trigger};

/// Where the guest's serial output goes.
#[derive(Debug)]
pub enum SerialSink {
    /// The VMM's standard output.
    Stdout,
    /// A file (created/truncated by the caller).
    File(File),
    /// An in-memory buffer (tests, tools).
    Buffer(SharedBuffer),
    /// Discarded.
    Null,
}

impl SerialSink {
    /// Another sink writing to the same place (a restarted VM's console).
    pub fn try_clone(&self) -> io::Result<SerialSink> {
        Ok(match self {
            SerialSink::Stdout => SerialSink::Stdout,
            SerialSink::File(f) => SerialSink::File(f.try_clone()?),
            SerialSink::Buffer(b) => SerialSink::Buffer(b.clone()),
            SerialSink::Null => SerialSink::Null,
        })
    }
}

/// A cloneable in-memory byte sink.
#[derive(Clone, Debug)]
pub struct SharedBuffer(Arc<RankedMutex<Vec<u8>>>);

impl Default for SharedBuffer {
    fn default() -> Self {
        SharedBuffer(Arc::new(RankedMutex::new(
            vmm_ranks::SERIAL_BUFFER,
            Vec::new(),
        )))
    }
}

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().clone()
    }

    /// Everything written so far, as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialSink::Stdout => io::stdout().lock().write(buf),
            SerialSink::File(f) => f.write(buf),
            SerialSink::Buffer(b) => {
                b.0.lock().extend_from_slice(buf);
                Ok(buf.len())
            }
            SerialSink::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialSink::Stdout => io::stdout().lock().flush(),
            SerialSink::File(f) => f.flush(),
            SerialSink::Buffer(_) | SerialSink::Null => Ok(()),
        }
    }
}

/// What to do with port or MMIO accesses no device claims.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownIoPolicy {
    /// Log them (debug level); writes are dropped, reads return all-ones (0xff…).
    #[default]
    Ignore,
    /// Stop the VM with [`crate::RunOutcome::UnhandledIo`].
    Error,
}

/// The serial device has no interrupt line here (no irqchip): its trigger does nothing.
#[derive(Debug)]
struct NoIrq;

impl Trigger for NoIrq {
    type E = io::Error;
    fn trigger(&self) -> Result<(), io::Error> {
        Ok(())
    }
}

/// Result of offering a port access to the built-in devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PortResult {
    /// A device handled it.
    Done,
    /// The guest wrote its exit status.
    GuestExit(u32),
    /// No built-in device at this port.
    Unknown,
}

/// The longest partial line a console holds back before writing it anyway.
const MAX_LINE: usize = 4096;

/// One VM's console output, written a whole line at a time: the guest writes its serial port
/// a byte at a time, and several VMs (a fleet's targets and its appliance) may share one
/// stream, where byte-sized writes would interleave their lines. A line goes out with one
/// `write_all` (one `write` for a line under the pipe's atomic size) when its newline comes,
/// when it grows past [`MAX_LINE`], or when the VM's devices are dropped. In-memory buffers
/// and the null sink get the bytes at once (nobody else writes into them mid-line).
struct ConsoleOut {
    sink: SerialSink,
    line: Vec<u8>,
}

impl ConsoleOut {
    fn new(sink: SerialSink) -> ConsoleOut {
        ConsoleOut {
            sink,
            line: Vec::new(),
        }
    }

    fn write_line(&mut self) -> io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        let result = self.sink.write_all(&self.line);
        self.line.clear();
        result
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if matches!(self.sink, SerialSink::Buffer(_) | SerialSink::Null) {
            return self.sink.write(buf);
        }
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= MAX_LINE {
            self.write_line()?;
        }
        Ok(buf.len())
    }

    /// Flushes the sink, not a partial line (the serial device flushes after every byte).
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

impl Drop for ConsoleOut {
    fn drop(&mut self) {
        let _ = self.write_line();
        let _ = self.sink.flush();
    }
}

/// The built-in devices of one VM, shared by its vCPU threads.
pub(crate) struct Devices {
    serial: RankedMutex<Serial<NoIrq, vm_superio::serial::NoEvents, ConsoleOut>>,
    serial_failed: std::sync::atomic::AtomicBool,
}

impl Devices {
    pub(crate) fn new(sink: SerialSink) -> Self {
        Devices {
            serial: RankedMutex::new(vmm_ranks::SERIAL, Serial::new(NoIrq, ConsoleOut::new(sink))),
            serial_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Offers a port access (`data` = size × count bytes) to the built-in devices.
    pub(crate) fn pio(&self, port: u16, write: bool, size: u8, data: &mut [u8]) -> PortResult {
        if (SERIAL_COM1..SERIAL_COM1 + SERIAL_COM1_LEN).contains(&port) {
            let offset = (port - SERIAL_COM1) as u8;
            let mut serial = self.serial.lock();
            let step = usize::from(size.max(1));
            for chunk in data.chunks_mut(step) {
                if write {
                    if let Err(e) = serial.write(offset, chunk[0])
                        && !self
                            .serial_failed
                            .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!("serial output failed (logged once): {e}");
                    }
                } else {
                    chunk.fill(0);
                    chunk[0] = serial.read(offset);
                }
            }
            return PortResult::Done;
        }
        if port == DEBUG_EXIT {
            if write {
                let mut v = [0u8; 4];
                let n = data.len().min(usize::from(size)).min(4);
                v[..n].copy_from_slice(&data[..n]);
                return PortResult::GuestExit(u32::from_le_bytes(v));
            }
            data.fill(0xff);
            return PortResult::Done;
        }
        PortResult::Unknown
    }
}

/// Writes `line` and a newline to stderr with one `write` (a line under the pipe's atomic
/// size is never split): guest serial output that goes to the same stream from other threads
/// cannot land in the middle of it, as it can with `eprintln!`, whose pieces are separate
/// writes on the unbuffered stderr.
pub fn eprint_line(line: std::fmt::Arguments<'_>) {
    let text = format!("{line}\n");
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    fn temp_file() -> File {
        let path = std::env::temp_dir().join(format!(
            "kvmi-console-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        file
    }

    #[test]
    fn consoles_sharing_a_file_write_whole_lines_and_the_rest_at_the_end() {
        let mut file = temp_file();
        let mut a = ConsoleOut::new(SerialSink::File(file.try_clone().unwrap()));
        let mut b = ConsoleOut::new(SerialSink::File(file.try_clone().unwrap()));
        // Byte by byte, alternating, as two vCPUs on two VMs would.
        for (x, y) in b"all 2 vcpus up\nA"
            .iter()
            .zip(b"heartbeat round=1\n".iter())
        {
            a.write_all(&[*x]).unwrap();
            a.flush().unwrap();
            b.write_all(&[*y]).unwrap();
            b.flush().unwrap();
        }
        b.write_all(b"xyz").unwrap();
        drop(a);
        drop(b);
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        // `a`'s line went out whole at its newline; the zip stopped after 16 bytes, so `b`'s
        // line ("heartbeat round=" + "xyz") and `a`'s "A" were held back until they ended.
        assert_eq!(text, "all 2 vcpus up\nAheartbeat round=xyz");
    }

    #[test]
    fn a_buffer_sink_gets_every_byte_at_once() {
        let buffer = SharedBuffer::new();
        let mut console = ConsoleOut::new(SerialSink::Buffer(buffer.clone()));
        console.write_all(b"gate waiting").unwrap();
        assert_eq!(buffer.text(), "gate waiting");
    }

    #[test]
    fn a_line_without_an_end_goes_out_at_the_limit() {
        let mut file = temp_file();
        let mut console = ConsoleOut::new(SerialSink::File(file.try_clone().unwrap()));
        console.write_all(&vec![b'x'; MAX_LINE]).unwrap();
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text.len(), MAX_LINE);
        drop(console);
    }
}
