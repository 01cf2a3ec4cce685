//! A hostile tool: a raw client of a KVMI socket that misbehaves on demand.
//!
//! The misbehaving client runs in a child process (this package's example `hostile_tool`,
//! whose `main` is [`child_main`]) so that a test can do to it what happens to real tools:
//! stop it ([`HostileTool::stop`], SIGSTOP), resume it ([`HostileTool::resume`], SIGCONT) and
//! kill it at a chosen moment ([`HostileTool::kill`]). The test drives it over the child's
//! stdin and stdout, one request line and one answer line at a time, so every request returns
//! only once the child did it.
//!
//! The child never reads its KVMI socket unless asked ([`HostileTool::read`],
//! [`HostileTool::drain`]): a tool that "stops reading" is this one doing nothing. It sends
//! any bytes ([`HostileTool::send`]), and fills the socket both ways
//! ([`HostileTool::fill`]): it sends one message over and over without reading until the
//! host takes no more bytes.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use protocol::{V4, WireProfile};

use crate::wait;

/// How long the test waits for the child to answer a request (only reached on failure: the
/// child bounds every request by its own, shorter, waits).
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// How long the child's `send` waits for the host to take the bytes.
const SEND_WAIT: Duration = Duration::from_secs(10);

/// The whole message `{id, size, seq}` + `payload` (any id, any payload up to 64 KiB).
pub fn frame(id: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let size = u16::try_from(payload.len()).expect("a payload fits the 16-bit size field");
    let mut msg = Vec::with_capacity(8 + payload.len());
    msg.extend_from_slice(&id.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(&seq.to_le_bytes());
    msg.extend_from_slice(payload);
    msg
}

/// The encoded command message `command` under `seq`.
pub fn command(seq: u32, command: &protocol::Command<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; V4::command_len(command).expect("command length")];
    let n = V4::encode_command(seq, command, &mut buf).expect("command encodes");
    buf.truncate(n);
    buf
}

/// What [`HostileTool::fill`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// Whole messages the host took.
    pub messages: u64,
    /// Bytes the host took (the last message may be partly sent).
    pub bytes: u64,
    /// The host closed the socket while the child was filling it.
    pub closed: bool,
}

/// What [`HostileTool::drain`] read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Every byte read.
    pub bytes: Vec<u8>,
    /// The host closed the socket (end of file or a reset) within the wait.
    pub closed: bool,
}

impl Drained {
    /// The whole messages at the start of the bytes read, as (id, seq, payload size), and the
    /// number of bytes left over after them (a message the host did not send whole).
    pub fn frames(&self) -> (Vec<(u16, u32, u16)>, usize) {
        let mut rest = &self.bytes[..];
        let mut out = Vec::new();
        while let Ok(Some((frame, tail))) = V4::split_frame(rest) {
            out.push((frame.header.id, frame.header.seq, frame.header.size));
            rest = tail;
        }
        (out, rest.len())
    }
}

/// A hostile tool running in a child process, connected to a KVMI socket. Killed when
/// dropped.
pub struct HostileTool {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    answers: Receiver<String>,
    stopped: bool,
}

impl std::fmt::Debug for HostileTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileTool")
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("stopped", &self.stopped)
            .finish()
    }
}

impl HostileTool {
    /// Starts a hostile tool connected to a VM listening on `socket` (`--kvmi-socket`),
    /// retrying while the socket does not exist yet.
    pub fn connect(socket: &Path) -> HostileTool {
        Self::spawn("connect", socket)
    }

    /// Starts a hostile tool that listens on `socket` and accepts a VM started with
    /// `--kvmi-connect` (the path is bound before this returns).
    pub fn accept(socket: &Path) -> HostileTool {
        Self::spawn("accept", socket)
    }

    fn spawn(how: &str, socket: &Path) -> HostileTool {
        let mut child = Command::new(crate::hostile_tool_bin())
            .arg(how)
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the hostile tool");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, answers) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tool = HostileTool {
            child: Some(child),
            stdin,
            answers,
            stopped: false,
        };
        let first = tool.answer();
        let expected = if how == "accept" { "bound" } else { "ready" };
        assert_eq!(first, expected, "the hostile tool did not get ready");
        tool
    }

    /// For a tool started with [`HostileTool::accept`]: waits until the VM connected.
    pub fn wait_accepted(&mut self) {
        let ready = self.answer();
        assert_eq!(ready, "ready", "the hostile tool accepted no VM");
    }

    /// The child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn answer(&mut self) -> String {
        match self.answers.recv_timeout(ANSWER_WAIT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("the hostile tool did not answer within {ANSWER_WAIT:?}")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("the hostile tool died"),
        }
    }

    fn request(&mut self, line: &str) -> String {
        assert!(
            !self.stopped,
            "the hostile tool is stopped: resume it first"
        );
        let stdin = self.stdin.as_mut().expect("the hostile tool is alive");
        writeln!(stdin, "{line}").expect("write to the hostile tool");
        stdin.flush().expect("flush to the hostile tool");
        let answer = self.answer();
        if let Some(why) = answer.strip_prefix("error ") {
            panic!("the hostile tool failed `{}`: {why}", short(line));
        }
        answer
    }

    /// Sends `bytes` (anything: whole messages, parts of messages, garbage), waiting up to
    /// 10 s for the host to take them; returns how many it took.
    pub fn send(&mut self, bytes: &[u8]) -> usize {
        let answer = self.request(&format!("send {}", hex(bytes)));
        number(&answer, "sent")
    }

    /// Sends `message` over and over without reading, until the host has taken no byte for
    /// `quiet`: then the host's receive buffer and the tool's are full (the host stopped
    /// reading because it cannot write its replies). A partly sent message stays partly sent.
    pub fn fill(&mut self, message: &[u8], quiet: Duration) -> Fill {
        let answer = self.request(&format!("fill {} {}", quiet.as_millis(), hex(message)));
        let mut fields = answer.split_whitespace();
        assert_eq!(fields.next(), Some("full"), "unexpected answer {answer}");
        let mut next = || {
            fields
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected answer {answer}"))
        };
        Fill {
            messages: next(),
            bytes: next(),
            closed: next() != 0,
        }
    }

    /// Reads what the host sent, up to `max` bytes, waiting at most `wait` for the first.
    pub fn read(&mut self, max: usize, wait: Duration) -> Vec<u8> {
        let answer = self.request(&format!("read {} {max}", wait.as_millis()));
        unhex(answer.strip_prefix("read").unwrap_or_default().trim())
    }

    /// Reads everything the host sent until it closes the socket or `wait` passes.
    pub fn drain(&mut self, wait: Duration) -> Drained {
        let answer = self.request(&format!("drain {}", wait.as_millis()));
        let mut fields = answer.split_whitespace();
        assert_eq!(fields.next(), Some("drained"), "unexpected answer");
        let closed = fields.next() == Some("1");
        Drained {
            bytes: unhex(fields.next().unwrap_or_default()),
            closed,
        }
    }

    /// Shuts the socket down both ways (the tool process lives on).
    pub fn shutdown_socket(&mut self) {
        self.request("shutdown");
    }

    /// Stops the tool process (SIGSTOP) and waits until the kernel shows it stopped.
    pub fn stop(&mut self) {
        let pid = self.pid().expect("the hostile tool is alive");
        self.signal(libc::SIGSTOP);
        self.stopped = true;
        wait::until(Duration::from_secs(10), "the hostile tool to stop", || {
            process_state(pid) == Some('T')
        });
    }

    /// Resumes a stopped tool process (SIGCONT).
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        self.stopped = false;
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("the hostile tool is alive");
        let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid (not yet reaped, so not reused).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Kills the tool process now (SIGKILL, even while stopped) and reaps it: the kernel
    /// closes its socket with whatever it holds unread.
    pub fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
    }
}

impl Drop for HostileTool {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The kernel's state letter of process `pid` (`/proc/PID/stat`), if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2 + 1);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

fn unhex(text: &str) -> Vec<u8> {
    if text == "-" {
        return Vec::new();
    }
    (0..text.len() / 2)
        .filter_map(|i| text.get(2 * i..2 * i + 2))
        .filter_map(|pair| u8::from_str_radix(pair, 16).ok())
        .collect()
}

fn short(line: &str) -> &str {
    line.get(..line.len().min(40)).unwrap_or(line)
}

fn number(answer: &str, word: &str) -> usize {
    answer
        .strip_prefix(word)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {answer}"))
}

// ---------------------------------------------------------------------------------------
// The child process.

/// The hostile tool's `main` (the example `hostile_tool`): `hostile_tool connect PATH` or
/// `hostile_tool accept PATH`, then one request per stdin line, one answer per stdout line.
pub fn child_main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(how), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: hostile_tool connect|accept PATH");
        return ExitCode::from(2);
    };
    let stream = match how.as_str() {
        "connect" => connect(Path::new(path)),
        "accept" => accept(Path::new(path)),
        _ => Err(format!("unknown mode {how}")),
    };
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hostile_tool: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        return ExitCode::from(1);
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let answer = serve(&mut stream, &line).unwrap_or_else(|e| format!("error {e}"));
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
    ExitCode::SUCCESS
}

fn connect(path: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("connecting to {}: {e}", path.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn accept(path: &Path) -> Result<UnixStream, String> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    // Bound: tell the parent (the VM may be started now), then wait for the VM.
    println!("bound");
    let (stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    Ok(stream)
}

fn serve(stream: &mut UnixStream, line: &str) -> Result<String, String> {
    let mut words = line.split_whitespace();
    let op = words.next().unwrap_or_default();
    let mut arg = || {
        words
            .next()
            .ok_or_else(|| format!("`{op}` needs more arguments"))
    };
    let millis = |w: &str| {
        w.parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| e.to_string())
    };
    match op {
        "send" => {
            let bytes = unhex(arg()?);
            let sent = send_within(stream, &bytes, SEND_WAIT).map_err(|e| e.to_string())?;
            Ok(format!("sent {sent}"))
        }
        "fill" => {
            let quiet = millis(arg()?)?;
            let message = unhex(arg()?);
            let f = fill(stream, &message, quiet);
            Ok(format!(
                "full {} {} {}",
                f.messages,
                f.bytes,
                u8::from(f.closed)
            ))
        }
        "read" => {
            let wait = millis(arg()?)?;
            let max: usize = arg()?
                .parse()
                .map_err(|e: std::num::ParseIntError| e.to_string())?;
            let bytes = read_some(stream, max, wait).map_err(|e| e.to_string())?;
            Ok(format!("read {}", hex(&bytes)))
        }
        "drain" => {
            let wait = millis(arg()?)?;
            let (bytes, closed) = drain(stream, wait);
            Ok(format!("drained {} {}", u8::from(closed), hex(&bytes)))
        }
        "shutdown" => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            Ok("shut".into())
        }
        _ => Err(format!("unknown request `{op}`")),
    }
}

/// poll(2) on the socket for `events`, at most `wait`; the events that are ready.
fn poll(stream: &UnixStream, events: libc::c_short, wait: Duration) -> libc::c_short {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    if n > 0 { fd.revents } else { 0 }
}

fn send_within(stream: &UnixStream, bytes: &[u8], wait: Duration) -> std::io::Result<usize> {
    let deadline = Instant::now() + wait;
    let mut sent = 0;
    while sent < bytes.len() {
        let n = kvmi_engine::socket::send_nonblocking(stream, &bytes[sent..])?;
        sent += n;
        if n == 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            poll(stream, libc::POLLOUT, deadline - now);
        }
    }
    Ok(sent)
}

fn fill(stream: &UnixStream, message: &[u8], quiet: Duration) -> Fill {
    let mut f = Fill {
        messages: 0,
        bytes: 0,
        closed: false,
    };
    if message.is_empty() {
        return f;
    }
    let mut offset = 0;
    let mut last_progress = Instant::now();
    loop {
        match kvmi_engine::socket::send_nonblocking(stream, &message[offset..]) {
            Ok(0) => {
                let idle = last_progress.elapsed();
                if idle >= quiet {
                    return f;
                }
                poll(stream, libc::POLLOUT, quiet - idle);
            }
            Ok(n) => {
                last_progress = Instant::now();
                f.bytes += n as u64;
                offset += n;
                if offset == message.len() {
                    offset = 0;
                    f.messages += 1;
                }
            }
            Err(_) => {
                f.closed = true;
                return f;
            }
        }
    }
}

fn read_some(stream: &mut UnixStream, max: usize, wait: Duration) -> std::io::Result<Vec<u8>> {
    if poll(stream, libc::POLLIN, wait) == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; max];
    let n = stream.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn drain(stream: &mut UnixStream, wait: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + wait;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return (all, false);
        }
        if poll(stream, libc::POLLIN, deadline - now) == 0 {
            continue;
        }
        match stream.read(&mut buf) {
            Ok(0) => return (all, true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (all, true),
        }
    }
}
