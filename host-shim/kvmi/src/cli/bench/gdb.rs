//! `kvmi bench --gdb`: the breakpoint round trip as gdb sees it (continue → hit → stop
//! reported), through `kvmi gdb`, against the hardware-breakpoint floor of the same run.
//!
//! The VM is a child `kvmi run --kvmi-socket` on the floor's guest loop (test-guest
//! `mode=breakpoint n=N gate=1`); the stub is a child `kvmi gdb --socket` on pipes, driven by
//! the minimal GDB remote-protocol client below (`$...#cs` packets, acknowledged with `+`). The
//! client sets one breakpoint at `sym.breakpoint_target` (`Z1`: hardware, CONTROL_BREAKPOINT;
//! or `Z0`: software, an execute trap on its page), opens the guest's start gate through the
//! stub's memory writes (`monitor phys`, `M`), then sends `vCont;c` N times; each sample is the
//! time from sending `vCont;c` to receiving the `T05`/`S05` stop reply.

use std::io::{Read, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{ChildVm, finish_vm, spawn_vm};

/// How long one reply from the stub may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// Which breakpoint gdb sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdbBreak {
    /// `hbreak` (`Z1`): a hardware breakpoint.
    Hardware,
    /// `break` (`Z0`): a software breakpoint, an execute trap on its page.
    Software,
}

impl GdbBreak {
    /// The name in the output and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            GdbBreak::Hardware => "hbreak",
            GdbBreak::Software => "break",
        }
    }
    fn z_type(self) -> u8 {
        match self {
            GdbBreak::Hardware => 1,
            GdbBreak::Software => 0,
        }
    }
}

/// The GDB remote-protocol checksum: the sum of the payload's bytes modulo 256.
fn checksum(payload: &[u8]) -> u8 {
    payload.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// `$payload#cs`.
fn frame(payload: &str) -> Vec<u8> {
    format!("${payload}#{:02x}", checksum(payload.as_bytes())).into_bytes()
}

/// Lowercase hex of `bytes` (`qRcmd` and `M` arguments).
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Expands the remote protocol's run-length encoding: `X*N` stands for `X` followed by
/// `N - 29` more copies of it (`N` a printable character).
fn expand_runs(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let mut bytes = payload.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'*'
            && let Some(&last) = out.last()
            && let Some(count) = bytes.next()
        {
            out.extend(std::iter::repeat_n(
                last,
                usize::from(count.saturating_sub(29)),
            ));
        } else {
            out.push(b);
        }
    }
    out
}

/// Whether `reply` is a stop reply for SIGTRAP (`S05` or `T05...`).
pub fn is_trap_stop(reply: &str) -> bool {
    (reply.starts_with("T05") || reply.starts_with("S05")) && reply.len() >= 3
}

/// A minimal GDB remote-protocol client on the stub's stdin/stdout.
struct RspClient {
    input: ChildStdin,
    output: Receiver<Vec<u8>>,
    pending: std::collections::VecDeque<u8>,
}

impl RspClient {
    fn new(input: ChildStdin, mut output: impl Read + Send + 'static) -> Self {
        let (tx, rx) = channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match output.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        RspClient {
            input,
            output: rx,
            pending: Default::default(),
        }
    }

    fn byte(&mut self, deadline: Instant) -> Result<u8> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Ok(b);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.pending.extend(chunk),
                Err(RecvTimeoutError::Timeout) => bail!("the stub sent nothing for {left:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("the stub closed its output"),
            }
        }
    }

    fn send(&mut self, payload: &str) -> Result<()> {
        self.input.write_all(&frame(payload))?;
        self.input.flush()?;
        Ok(())
    }

    /// The next packet's payload (acks skipped), acknowledged with `+`.
    fn packet(&mut self) -> Result<String> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while self.byte(deadline)? != b'$' {}
        let mut payload = Vec::new();
        loop {
            match self.byte(deadline)? {
                b'#' => break,
                b => payload.push(b),
            }
        }
        let cs = [self.byte(deadline)?, self.byte(deadline)?];
        let cs = u8::from_str_radix(std::str::from_utf8(&cs)?, 16)?;
        if cs != checksum(&payload) {
            bail!("bad checksum on {:?}", String::from_utf8_lossy(&payload));
        }
        // The stub may exit right after its last reply (`OK` to `D`): an ack it can no
        // longer read is not an error.
        match self.input.write_all(b"+").and_then(|()| self.input.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        Ok(String::from_utf8_lossy(&expand_runs(&payload)).into_owned())
    }

    /// Sends `payload` and returns the reply (console output packets `O...` skipped).
    fn request(&mut self, payload: &str) -> Result<String> {
        self.send(payload)?;
        loop {
            let reply = self.packet()?;
            if reply.starts_with('O') && reply != "OK" {
                continue;
            }
            return Ok(reply);
        }
    }

    /// Sends `payload` and requires `OK`.
    fn ok(&mut self, payload: &str) -> Result<()> {
        let reply = self.request(payload)?;
        if reply != "OK" {
            bail!("`{payload}`: the stub replied `{reply}`");
        }
        Ok(())
    }
}

/// The continue → stop-reply round trips through `kvmi gdb`, one sample per stop.
pub fn round_trips(kind: GdbBreak, n: u64, target: u64, gate: u64) -> Result<Vec<Duration>> {
    let (mut vm, socket) = spawn_vm(
        &format!("mode=breakpoint n={n} gate=1"),
        &format!("gdb-{}", kind.name()),
    )?;
    let mut stub = Command::new(std::env::current_exe()?)
        .args(["gdb", "--connect-timeout", "20", "--socket"])
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting kvmi gdb")?;
    let (input, output) = (stub.stdin.take(), stub.stdout.take());
    let mut stub = ChildVm(Some(stub));
    let mut gdb = RspClient::new(
        input.context("the stub's stdin")?,
        output.context("the stub's stdout")?,
    );
    gdb.request("qSupported:swbreak+;hwbreak+;vContSupported+")?;
    let first = gdb.request("?")?;
    if !(first.starts_with('T') || first.starts_with('S')) {
        bail!("`?`: the stub replied `{first}`");
    }
    gdb.ok(&format!("Z{},{target:x},1", kind.z_type()))?;
    // Open the start gate (a physical address, like every test-guest symbol's page).
    gdb.ok(&format!("qRcmd,{}", hex(b"phys")))?;
    gdb.ok(&format!("M{gate:x},8:{}", hex(&1u64.to_le_bytes())))?;
    gdb.ok(&format!("qRcmd,{}", hex(b"virt")))?;
    let mut samples = Vec::with_capacity(n as usize);
    while (samples.len() as u64) < n {
        let start = Instant::now();
        let reply = gdb
            .request("vCont;c")
            .with_context(|| format!("continue after {} stops", samples.len()))?;
        let took = start.elapsed();
        if !is_trap_stop(&reply) {
            bail!(
                "continue after {} stops: the stub replied `{reply}`",
                samples.len()
            );
        }
        samples.push(took);
    }
    // The guest is at its last breakpoint hit (checked: rip, the 17th register of `g`, at
    // hex offset 16 × 16): lift it and detach; the VM runs to its end.
    let regs = gdb.request("g")?;
    let rip = regs
        .get(256..272)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .map(u64::swap_bytes);
    if rip != Some(target) {
        bail!("after {n} stops rip is {rip:x?}, not the breakpoint {target:#x}: {regs}");
    }
    gdb.ok(&format!("z{},{target:x},1", kind.z_type()))?;
    gdb.ok("D")?;
    drop(gdb);
    if let Some(mut c) = stub.0.take() {
        c.wait()?;
    }
    finish_vm(&mut vm, &socket, "gdb")?;
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_carry_their_checksum() {
        assert_eq!(frame("?"), b"$?#3f");
        assert_eq!(frame("vCont;c"), b"$vCont;c#a8");
        assert_eq!(hex(b"phys"), "70687973");
    }

    #[test]
    fn runs_are_expanded() {
        // "0* " is '0' and three more copies (' ' is 32 = 29 + 3).
        assert_eq!(expand_runs(b"a0* b"), b"a0000b");
        assert_eq!(expand_runs(b"OK"), b"OK");
        // A '*' with nothing before it stays as it is, with what follows.
        assert_eq!(expand_runs(b"*x"), b"*x");
    }

    #[test]
    fn only_sigtrap_stops_count() {
        assert!(is_trap_stop("T05thread:01;"));
        assert!(is_trap_stop("S05"));
        assert!(!is_trap_stop("T02thread:01;"));
        assert!(!is_trap_stop("OK"));
        assert!(!is_trap_stop("E01"));
    }
}
