//! The KVMI unix-socket transport: the shim listens on a path (`--kvmi-socket`), or connects
//! to a tool listening on a path (`--kvmi-connect`, as QEMU does, reconnecting after a
//! detach). One reader thread feeds the attached tool's whole messages to the introspector.
//!
//! # One tool at a time
//! While a tool is attached on a listening socket, another one that connects is refused: its
//! connection is accepted, its first message (sent within [`REFUSAL_WAIT`] of connecting) is
//! answered with an error reply `-KVM_EBUSY` under that message's id and seq, and the socket
//! is closed; one that sends nothing within that time is closed with nothing sent. The VMM
//! logs a warning (`a tool is already attached; refusing another one`) for the first tool
//! refused during an attachment (at debug level for the next ones). A tool that gets
//! `-KVM_EBUSY` from its first command should retry later. A tool that has closed its
//! socket no longer counts: its successor waits (a second at most) for the engine to finish
//! unhooking, then is served.
//!
//! # No tool can freeze the guest
//! Every message is written whole or the tool is detached: writes to the tool never block
//! while holding a lock (they are non-blocking; a writer that finds the socket full waits for
//! room with `poll`, holding nothing), and each message has a deadline, the reply timeout
//! (`--kvmi-timeout`): a tool that has not taken a message within it (stopped, or no longer
//! reading) is detached with a warning saying so, and no byte is written after the part of a
//! message already sent. Closing the channel (every detach) shuts the socket down at once
//! without waiting for a blocked writer, whose wait then ends. With no reply timeout (`0`,
//! wait forever) writes wait forever too, as events do.
//!
//! # Reconnecting (`--kvmi-connect`)
//! A failed connection is retried after 50 ms, doubling up to [`BACKOFF_MAX`] (2 s); the
//! first failure of a series is logged at info level, every failure at debug level. A session
//! that stays attached at least [`BACKOFF_MAX`] resets the back-off, so a detached tool's
//! successor is reached at once, while a tool that accepts and drops the VM at once is
//! retried with the growing back-off.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::V4;
use protocol::error::ErrorCode;
use protocol::wire::WireProfile;

use super::engine::error_message;
use super::libkvmi::session::{self as libkvmi_session, LibkvmiChannel};
use super::libkvmi::{LibkvmiConfig, handshake};
use super::lock_order;
use super::transport::{Channel, ChannelError, Route};
use super::{IntrospectError, Introspector};
use vmm::running::VmHandle;
use vmm::sync::RankedMutex;

/// The wire dialect of a KVMI socket: chosen per server, so per connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// This project's v4 dialect (no handshake).
    #[default]
    V4,
    /// libkvmi's kvmi-v7 dialect: the VMM handshake first, then kvmi-v7 messages; the
    /// UNHOOK event before the shim stops or detaches ([`SocketServer::unhook`]).
    Libkvmi(LibkvmiConfig),
}

/// Where the KVMI socket is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The shim listens on this path and serves one tool at a time (refusing others with
    /// `-KVM_EBUSY`, see the module docs).
    Listen(PathBuf),
    /// The shim connects to a tool listening on this path (and reconnects after a detach).
    Connect(PathBuf),
}

impl Endpoint {
    /// The socket path.
    pub fn path(&self) -> &Path {
        match self {
            Endpoint::Listen(p) | Endpoint::Connect(p) => p,
        }
    }
}

/// Poll interval of the accept loop.
const POLL: Duration = Duration::from_millis(20);
/// The first delay before reconnecting to a tool (`--kvmi-connect`).
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest delay before reconnecting to a tool.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a refused second tool has to send its first message (answered `-KVM_EBUSY`).
pub const REFUSAL_WAIT: Duration = Duration::from_secs(2);
/// Refused tools waited for at once; more are closed without an answer.
const MAX_REFUSING: usize = 16;
/// How long a blocked writer sleeps before it looks again whether another writer sent its
/// message for it.
const WRITE_RECHECK: Duration = Duration::from_millis(20);
/// How long the accept loop waits for a session whose tool hung up to end.
const HANGUP_GRACE: Duration = Duration::from_secs(1);

/// Why a write to the tool failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The tool took nothing of a message within the deadline.
    #[error(
        "the tool stopped reading: a {len}-byte message was not taken within {deadline:?} \
         ({sent} bytes of it sent)"
    )]
    Stalled {
        /// The message's length.
        len: usize,
        /// Bytes of it that went out.
        sent: usize,
        /// The write deadline (the reply timeout).
        deadline: Duration,
    },
    /// The channel was closed (detached), or an earlier write failed.
    #[error("the channel is closed")]
    Closed,
    /// The socket failed.
    #[error("socket write: {0}")]
    Io(#[from] std::io::Error),
}

impl From<WriteError> for std::io::Error {
    fn from(e: WriteError) -> std::io::Error {
        match e {
            WriteError::Io(e) => e,
            e @ WriteError::Stalled { .. } => std::io::Error::new(ErrorKind::TimedOut, e),
            e @ WriteError::Closed => std::io::Error::new(ErrorKind::BrokenPipe, e),
        }
    }
}

/// The bytes accepted for the tool and not yet written, oldest first.
#[derive(Debug, Default)]
struct Outbox {
    pending: VecDeque<u8>,
    /// Bytes accepted since the connection opened (the end of the last message queued).
    accepted: u64,
    /// Bytes written since the connection opened.
    written: u64,
}

/// A connected tool's socket as a [`Channel`]: messages go out in the order they were
/// handed over, each whole or not at all (after a failure nothing more is written).
/// The outbox lock is held only across non-blocking writes.
struct SocketChannel {
    stream: UnixStream,
    outbox: RankedMutex<Outbox>,
    /// Closed by a detach, or broken by a failed write: nothing is written any more.
    closed: AtomicBool,
    /// The deadline of each message (None: wait forever).
    deadline: Option<Duration>,
}

impl SocketChannel {
    fn new(stream: UnixStream, deadline: Option<Duration>) -> SocketChannel {
        SocketChannel {
            stream,
            outbox: RankedMutex::new(lock_order::SOCKET_WRITER, Outbox::default()),
            closed: AtomicBool::new(false),
            deadline,
        }
    }

    /// Writes `message` whole within the deadline, or fails and closes the channel.
    fn write_message(&self, message: &[u8]) -> Result<(), WriteError> {
        let started = Instant::now();
        let end = {
            let mut o = self.outbox.lock();
            if self.closed.load(Ordering::SeqCst) {
                return Err(WriteError::Closed);
            }
            o.accepted += message.len() as u64;
            let end = o.accepted;
            let result = if o.pending.is_empty() {
                // The common case: straight from the caller's buffer.
                self.try_send(message).map(|n| {
                    o.written += n as u64;
                    o.pending.extend(&message[n..]);
                })
            } else {
                o.pending.extend(message);
                self.flush(&mut o)
            };
            if let Err(e) = result {
                return Err(self.broken(e));
            }
            if o.written >= end {
                return Ok(());
            }
            end
        };
        // The socket is full: wait for room holding nothing, so that other writers, the
        // vCPUs and a detach never wait for this one.
        loop {
            let wait = match self.deadline {
                Some(d) => d.saturating_sub(started.elapsed()).min(WRITE_RECHECK),
                None => WRITE_RECHECK,
            };
            if !wait.is_zero() {
                poll_writable(&self.stream, wait);
            }
            let mut o = self.outbox.lock();
            if self.closed.load(Ordering::SeqCst) {
                return Err(WriteError::Closed);
            }
            if let Err(e) = self.flush(&mut o) {
                return Err(self.broken(e));
            }
            if o.written >= end {
                return Ok(());
            }
            if let Some(deadline) = self.deadline
                && started.elapsed() >= deadline
            {
                let start = end - message.len() as u64;
                let sent = o.written.saturating_sub(start) as usize;
                self.closed.store(true, Ordering::SeqCst);
                o.pending.clear();
                drop(o);
                let _ = self.stream.shutdown(Shutdown::Both);
                let e = WriteError::Stalled {
                    len: message.len(),
                    sent,
                    deadline,
                };
                tracing::warn!("KVMI: {e}; detaching it");
                return Err(e);
            }
        }
    }

    /// Writes as much of the outbox as the socket takes now.
    fn flush(&self, o: &mut Outbox) -> std::io::Result<()> {
        while !o.pending.is_empty() {
            let n = self.try_send(o.pending.as_slices().0)?;
            if n == 0 {
                break;
            }
            o.pending.drain(..n);
            o.written += n as u64;
        }
        Ok(())
    }

    /// One non-blocking write: bytes taken, 0 if the socket is full.
    fn try_send(&self, bytes: &[u8]) -> std::io::Result<usize> {
        send_nonblocking(&self.stream, bytes)
    }

    /// Marks the channel broken after a failed write and shuts the socket down.
    fn broken(&self, e: std::io::Error) -> WriteError {
        let detached = self.closed.swap(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        if detached {
            WriteError::Closed
        } else {
            WriteError::Io(e)
        }
    }
}

impl Channel for SocketChannel {
    fn send(&self, message: &[u8], _route: Route) -> std::io::Result<()> {
        self.write_message(message).map_err(Into::into)
    }

    /// Shuts the socket down without taking the outbox lock: a writer waiting for room
    /// wakes up and fails at once.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Waits until `stream` can take bytes, it was shut down, or `wait` passed.
fn poll_writable(stream: &UnixStream, wait: Duration) {
    poll(stream, libc::POLLOUT, wait);
}

/// poll(2) on one socket: the events among `events` (and errors) that are ready.
fn poll(stream: &UnixStream, events: libc::c_short, wait: Duration) -> libc::c_short {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is one valid pollfd for the duration of the call, on an open socket.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    if n > 0 { fd.revents } else { 0 }
}

/// Whether the peer of `stream` has closed it (or shut down its sending side).
fn peer_hung_up(stream: &UnixStream) -> bool {
    let ready = poll(stream, libc::POLLRDHUP, Duration::ZERO);
    ready & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The delays between attempts to connect to a tool: [`BACKOFF_MIN`] doubling up to
/// [`BACKOFF_MAX`].
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            attempts: 0,
        }
    }
}

impl Backoff {
    /// Counts a failed attempt; returns its number (from 1) and the delay before the next.
    pub(crate) fn failed(&mut self) -> (u32, Duration) {
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        self.attempts += 1;
        (self.attempts, delay)
    }

    /// Starts over (after a successful session).
    pub(crate) fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// The thread serving one VM's KVMI socket.
pub struct SocketServer {
    path: PathBuf,
    listening: bool,
    stop: Arc<AtomicBool>,
    vm: Arc<OnceLock<VmHandle>>,
    shared: Arc<Shared>,
    current: Arc<RankedMutex<Option<UnixStream>>>,
    thread: RankedMutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SocketServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketServer")
            .field("path", &self.path)
            .field("listening", &self.listening)
            .finish()
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> IntrospectError {
    move |source| IntrospectError::Io { what, source }
}

/// What the serving threads share.
struct Shared {
    introspector: Arc<Introspector>,
    stop: Arc<AtomicBool>,
    vm: Arc<OnceLock<VmHandle>>,
    /// The attached tool's socket (to shut it down on stop, and see whether it hung up).
    current: Arc<RankedMutex<Option<UnixStream>>>,
    /// A connection was handed to the tool thread and its session has not ended.
    serving: AtomicBool,
    /// The dialect every connection speaks.
    dialect: Dialect,
    /// The attached libkvmi session (to send it UNHOOK).
    session: RankedMutex<Option<Arc<LibkvmiChannel>>>,
    /// Set by [`SocketServer::unhook`]: no new session starts (no reconnect, no accept).
    unhooking: AtomicBool,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
            && !self.unhooking.load(Ordering::SeqCst)
            && !self.vm.get().is_some_and(VmHandle::has_ended)
    }

    /// Why a session ended, as its reader saw it, corrected for a socket the server shut down
    /// itself (its reader then sees end of file, not a tool that closed).
    fn session_end(&self, reader_reason: String) -> String {
        if self.stop.load(Ordering::SeqCst) {
            "the shim is stopping".into()
        } else {
            reader_reason
        }
    }

    /// Sleeps `delay` in short steps; false if the server stopped meanwhile.
    fn sleep(&self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if !self.running() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(POLL));
        }
    }
}

impl SocketServer {
    /// Starts serving `endpoint` for `introspector`. A listening path is bound before this
    /// returns (a stale socket file is replaced; any other existing file is an error).
    pub fn start(
        introspector: Arc<Introspector>,
        endpoint: Endpoint,
    ) -> Result<SocketServer, IntrospectError> {
        Self::start_dialect(introspector, endpoint, Dialect::V4)
    }

    /// [`SocketServer::start`] speaking `dialect`.
    pub fn start_dialect(
        introspector: Arc<Introspector>,
        endpoint: Endpoint,
        dialect: Dialect,
    ) -> Result<SocketServer, IntrospectError> {
        let path = endpoint.path().to_path_buf();
        let listener = match &endpoint {
            Endpoint::Listen(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    if !meta.file_type().is_socket() {
                        return Err(IntrospectError::Io {
                            what: format!("{} exists and is not a socket", p.display()),
                            source: std::io::Error::from(ErrorKind::AlreadyExists),
                        });
                    }
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p)
                    .map_err(io_err(format!("binding the KVMI socket {}", p.display())))?;
                l.set_nonblocking(true)
                    .map_err(io_err("non-blocking listener".into()))?;
                Some(l)
            }
            Endpoint::Connect(_) => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let vm: Arc<OnceLock<VmHandle>> = Arc::new(OnceLock::new());
        let current: Arc<RankedMutex<Option<UnixStream>>> =
            Arc::new(RankedMutex::new(lock_order::SOCKET_CURRENT, None));
        let shared = Arc::new(Shared {
            introspector,
            stop: stop.clone(),
            vm: vm.clone(),
            current: current.clone(),
            serving: AtomicBool::new(false),
            dialect,
            session: RankedMutex::new(lock_order::SOCKET_SESSION, None),
            unhooking: AtomicBool::new(false),
        });
        let shared_out = shared.clone();
        let p = path.clone();
        let thread = std::thread::Builder::new()
            .name("kvmi-socket".into())
            .spawn(move || match listener {
                Some(l) => listen_loop(&shared, &l),
                None => connect_loop(&shared, &p),
            })
            .map_err(io_err("spawning the KVMI socket thread".into()))?;
        if matches!(endpoint, Endpoint::Listen(_)) {
            tracing::info!(path = %path.display(), "KVMI socket listening");
        }
        Ok(SocketServer {
            path,
            listening: matches!(endpoint, Endpoint::Listen(_)),
            stop,
            vm,
            shared: shared_out,
            current,
            thread: RankedMutex::new(lock_order::SOCKET_THREAD, Some(thread)),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets the server stop accepting once the VM has ended.
    pub fn set_vm(&self, handle: VmHandle) {
        let _ = self.vm.set(handle);
    }

    /// Before the shim stops: no new session starts, and an attached libkvmi tool that
    /// enabled the UNHOOK event gets it and `timeout` to close its socket. Then (or at once,
    /// for any other tool) the session ends and the engine removes every hook; the VM runs
    /// on untouched. Returns whether the tool closed by itself.
    pub fn unhook(&self, timeout: Duration) -> bool {
        self.shared.unhooking.store(true, Ordering::SeqCst);
        let session = self.shared.session.lock().clone();
        let Some(session) = session else {
            return false;
        };
        if !session.wants_unhook() {
            return false;
        }
        let seq = self.shared.introspector.next_event_seq();
        if let Err(e) = session.send_unhook(seq) {
            tracing::warn!("KVMI: sending UNHOOK: {e}");
            return false;
        }
        tracing::info!("KVMI: UNHOOK sent; waiting up to {timeout:?} for the tool to close");
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.shared.session.lock().is_none() {
                tracing::info!("KVMI: the tool closed after UNHOOK");
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!("KVMI: the tool did not close within {timeout:?} of UNHOOK; unhooking");
        false
    }

    /// Closes the current connection, stops the threads and removes a listening socket file.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.current.lock().as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if self.listening {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `--kvmi-socket`: accepts tools. The attached one is served by one long-lived thread
/// (`kvmi-tool`, no thread per connection); others that connect meanwhile are refused by this
/// loop, without blocking and without a thread each.
fn listen_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    let (to_worker, from_acceptor) = std::sync::mpsc::channel::<UnixStream>();
    let s = shared.clone();
    let worker = std::thread::Builder::new()
        .name("kvmi-tool".into())
        .spawn(move || {
            if let Err(e) = vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service) {
                tracing::error!("KVMI tool thread: {e}");
                return;
            }
            while let Ok(stream) = from_acceptor.recv() {
                serve_one(&s, stream);
                s.serving.store(false, Ordering::SeqCst);
            }
        });
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("KVMI socket: spawning the tool's reader thread: {e}");
            return;
        }
    };
    // After the one spawn: this thread starts no other.
    if let Err(e) = vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service) {
        tracing::error!("KVMI socket: {e}");
        return;
    }
    let mut refusals: Vec<Refusal> = Vec::new();
    let mut refused = 0u64;
    while shared.running() {
        refusals.retain_mut(Refusal::progress);
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => {
                tracing::warn!("KVMI accept: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        if session_busy(shared) {
            refused += 1;
            if refused == 1 {
                tracing::warn!(
                    "KVMI: a tool is already attached; refusing another one (its first command \
                     is answered -KVM_EBUSY)"
                );
            } else {
                tracing::debug!(
                    "KVMI: a tool is already attached; refusing another one ({refused})"
                );
            }
            if matches!(shared.dialect, Dialect::Libkvmi(_)) {
                // A libkvmi tool waits for the VMM's handshake: closing tells it at once.
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            match Refusal::new(stream) {
                Some(r) if refusals.len() < MAX_REFUSING => refusals.push(r),
                Some(r) => r.close(),
                None => {}
            }
            continue;
        }
        refused = 0;
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!("KVMI socket: {e}");
            continue;
        }
        shared.serving.store(true, Ordering::SeqCst);
        if to_worker.send(stream).is_err() {
            tracing::error!("KVMI socket: the tool's reader thread is gone");
            break;
        }
    }
    for r in refusals {
        r.close();
    }
    drop(to_worker);
    let _ = worker.join();
}

/// Whether a tool is being served and still there. A session that is starting or ending (no
/// socket yet or any more, or its tool hung up) is given [`HANGUP_GRACE`] to settle: a tool
/// that just closed its socket does not get its successor refused.
fn session_busy(shared: &Shared) -> bool {
    let until = Instant::now() + HANGUP_GRACE;
    loop {
        if !shared.serving.load(Ordering::SeqCst) {
            return false;
        }
        let attached = shared
            .current
            .lock()
            .as_ref()
            .is_some_and(|s| !peer_hung_up(s));
        if attached || Instant::now() >= until {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A tool refused because another is attached: its first message is answered `-KVM_EBUSY`
/// (read without blocking, within [`REFUSAL_WAIT`]), then it is closed.
struct Refusal {
    stream: UnixStream,
    received: Vec<u8>,
    deadline: Instant,
}

impl Refusal {
    fn new(stream: UnixStream) -> Option<Refusal> {
        if stream.set_nonblocking(true).is_err() {
            let _ = stream.shutdown(Shutdown::Both);
            return None;
        }
        Some(Refusal {
            stream,
            received: Vec::new(),
            deadline: Instant::now() + REFUSAL_WAIT,
        })
    }

    /// Reads what arrived; answers a whole header. False once the refusal is over (closed).
    fn progress(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.discard();
                    return false;
                }
                Ok(n) => {
                    self.received.extend_from_slice(&chunk[..n]);
                    if let Ok(header) = protocol::frame::Header::parse(&self.received) {
                        let reply = error_message(header.id, header.seq, ErrorCode::Busy);
                        // A fresh socket has room for 16 bytes: this never blocks.
                        let _ = (&self.stream).write_all(&reply);
                        self.discard();
                        return false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.discard();
                    return false;
                }
            }
        }
        if Instant::now() >= self.deadline {
            self.discard();
            return false;
        }
        true
    }

    /// Drops whatever else the tool sent (so that it reads the answer, then end of file),
    /// and shuts the socket down.
    fn discard(&mut self) {
        let mut chunk = [0u8; 4096];
        while matches!(self.stream.read(&mut chunk), Ok(n) if n > 0) {}
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn close(mut self) {
        self.discard();
    }
}

/// `--kvmi-connect`: connects to the tool, serves it until it detaches, reconnects (with
/// back-off while it cannot).
fn connect_loop(shared: &Shared, path: &Path) {
    if let Err(e) = vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service) {
        tracing::error!("KVMI socket: {e}");
        return;
    }
    let mut backoff = Backoff::default();
    while shared.running() {
        match UnixStream::connect(path) {
            Ok(stream) => {
                let started = Instant::now();
                let attached = serve_one(shared, stream);
                if attached && started.elapsed() >= BACKOFF_MAX {
                    backoff.reset();
                } else {
                    let (n, delay) = backoff.failed();
                    tracing::debug!(
                        "KVMI session {n} with {} ended at once; next attempt in {} ms",
                        path.display(),
                        delay.as_millis()
                    );
                    shared.sleep(delay);
                }
            }
            Err(e) => {
                let (n, delay) = backoff.failed();
                if n == 1 {
                    tracing::info!(
                        "waiting for a tool at {}: {e} (retrying, up to every {} s)",
                        path.display(),
                        BACKOFF_MAX.as_secs()
                    );
                }
                tracing::debug!(
                    "KVMI connect attempt {n} to {} failed ({e}); next attempt in {} ms",
                    path.display(),
                    delay.as_millis()
                );
                shared.sleep(delay);
            }
        }
    }
}

/// Serves one connected tool until it detaches; whether it attached.
fn serve_one(shared: &Shared, stream: UnixStream) -> bool {
    if let Dialect::Libkvmi(config) = &shared.dialect {
        return serve_libkvmi(shared, stream, config);
    }
    let introspector = &shared.introspector;
    let (Ok(writer), Ok(control)) = (stream.try_clone(), stream.try_clone()) else {
        tracing::warn!("KVMI socket: cannot clone the stream");
        return false;
    };
    let deadline = introspector.config.reply_timeout;
    let channel = Arc::new(SocketChannel::new(writer, deadline));
    let generation = match introspector.attach(channel) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!("KVMI attach refused: {e}");
            return false;
        }
    };
    *shared.current.lock() = Some(control);
    // A stop that came before `current` was set shut nothing down: do it here.
    if !shared.running() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    let reason = shared.session_end(read_messages(introspector, generation, stream));
    introspector.detach(generation, &reason);
    *shared.current.lock() = None;
    true
}

/// Serves one libkvmi tool: the handshake, then its session until it detaches; whether it
/// attached.
fn serve_libkvmi(shared: &Shared, mut stream: UnixStream, config: &LibkvmiConfig) -> bool {
    let introspector = &shared.introspector;
    let pending = match handshake::run(&mut stream, config) {
        Ok(pending) => pending,
        Err(e) => {
            // A tool that closes while the shim connects (e.g. one exiting just after its
            // session) is routine; a refused or silent one is worth a warning.
            if matches!(e, handshake::HandshakeError::Io(_)) {
                tracing::debug!("KVMI libkvmi handshake failed: {e}");
            } else {
                tracing::warn!("KVMI libkvmi handshake failed: {e}");
            }
            let _ = stream.shutdown(Shutdown::Both);
            return false;
        }
    };
    let (Ok(writer), Ok(control)) = (stream.try_clone(), stream.try_clone()) else {
        tracing::warn!("KVMI socket: cannot clone the stream");
        return false;
    };
    let socket = Arc::new(SocketChannel::new(
        writer,
        introspector.config.reply_timeout,
    ));
    let channel = Arc::new(LibkvmiChannel::new(socket, introspector));
    let generation = match introspector.attach(channel.clone()) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!("KVMI attach refused: {e}");
            let _ = stream.shutdown(Shutdown::Both);
            return false;
        }
    };
    channel.set_generation(generation);
    *shared.current.lock() = Some(control);
    *shared.session.lock() = Some(channel.clone());
    if !shared.running() && !shared.unhooking.load(Ordering::SeqCst) {
        let _ = stream.shutdown(Shutdown::Both);
    }
    tracing::info!("libkvmi tool attached (handshake done)");
    let reason = shared.session_end(libkvmi_session::read_messages(
        introspector,
        &channel,
        generation,
        stream,
        pending,
    ));
    *shared.session.lock() = None;
    introspector.detach(generation, &reason);
    *shared.current.lock() = None;
    true
}

/// Reads and handles messages until the channel closes; returns why it closed.
fn read_messages(introspector: &Introspector, generation: u64, mut stream: UnixStream) -> String {
    let mut buf: Vec<u8> = Vec::with_capacity(V4::MAX_MSG_SIZE);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return "tool closed the socket".into(),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return format!("socket read: {e}"),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        loop {
            let rest = &buf[consumed..];
            match V4::split_frame(rest) {
                Ok(Some((_, tail))) => {
                    let len = rest.len() - tail.len();
                    let message = &buf[consumed..consumed + len];
                    match introspector.handle_message(generation, message) {
                        Ok(()) => {}
                        Err(ChannelError::Detached) => return "detached".into(),
                        Err(e) => return e.to_string(),
                    }
                    consumed += len;
                }
                Ok(None) => break,
                Err(e) => return format!("protocol error: {e}"),
            }
        }
        buf.drain(..consumed);
    }
}

/// One non-blocking send on `stream`: the bytes the kernel took, 0 when the socket is full (or
/// `bytes` is empty). `MSG_DONTWAIT` makes this one call non-blocking without changing the
/// file's flags (which a blocking reader's clone shares); `MSG_NOSIGNAL` turns a closed peer
/// into `EPIPE` instead of a signal.
pub fn send_nonblocking(stream: &UnixStream, bytes: &[u8]) -> std::io::Result<usize> {
    if bytes.is_empty() {
        return Ok(0);
    }
    loop {
        // SAFETY: `bytes` is valid for reads of its length for the whole call, and the fd is
        // `stream`'s open socket, borrowed for the call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            ErrorKind::WouldBlock => return Ok(0),
            ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u16, seq: u32, len: usize) -> Vec<u8> {
        let mut m = Vec::with_capacity(8 + len);
        m.extend_from_slice(&id.to_le_bytes());
        m.extend_from_slice(&(len as u16).to_le_bytes());
        m.extend_from_slice(&seq.to_le_bytes());
        m.extend((0..len).map(|i| (i as u32 ^ seq) as u8));
        m
    }

    /// Reads until end of file; the bytes.
    fn read_all(mut s: UnixStream) -> Vec<u8> {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        all
    }

    #[test]
    fn messages_are_written_whole_and_in_order() {
        let (host, tool) = UnixStream::pair().unwrap();
        let channel = SocketChannel::new(host, Some(Duration::from_secs(5)));
        let reader = std::thread::spawn(move || read_all(tool));
        let mut expected = Vec::new();
        for seq in 0..200 {
            let m = frame(13, seq, 4096);
            channel.send(&m, Route::CommandReply).unwrap();
            expected.extend_from_slice(&m);
        }
        channel.close();
        assert_eq!(reader.join().unwrap(), expected);
    }

    #[test]
    fn concurrent_writers_never_interleave_messages() {
        let (host, tool) = UnixStream::pair().unwrap();
        let channel = Arc::new(SocketChannel::new(host, Some(Duration::from_secs(10))));
        let reader = std::thread::spawn(move || read_all(tool));
        let writers: Vec<_> = (0..4u16)
            .map(|w| {
                let c = channel.clone();
                std::thread::spawn(move || {
                    for seq in 0..100 {
                        c.send(
                            &frame(w, seq, 3000 + usize::from(w) * 7),
                            Route::CommandReply,
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        channel.close();
        let bytes = reader.join().unwrap();
        let mut rest = &bytes[..];
        let mut next = [0u32; 4];
        while let Ok(Some((f, tail))) = V4::split_frame(rest) {
            let w = usize::from(f.header.id);
            let whole = frame(f.header.id, f.header.seq, usize::from(f.header.size));
            assert_eq!(&rest[..rest.len() - tail.len()], &whole[..]);
            assert_eq!(f.header.seq, next[w], "writer {w}'s messages in order");
            next[w] += 1;
            rest = tail;
        }
        assert!(rest.is_empty());
        assert_eq!(next, [100; 4]);
    }

    #[test]
    fn a_tool_that_stops_reading_fails_the_write_at_the_deadline_and_nothing_follows() {
        let (host, tool) = UnixStream::pair().unwrap();
        let deadline = Duration::from_millis(300);
        let channel = SocketChannel::new(host, Some(deadline));
        let started = Instant::now();
        let mut sent = Vec::new();
        let err = loop {
            let m = frame(13, sent.len() as u32, 4096);
            match channel.write_message(&m) {
                Ok(()) => sent.push(m),
                Err(e) => break e,
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never timed out"
            );
        };
        assert!(matches!(err, WriteError::Stalled { .. }), "{err}");
        let stalled = started.elapsed();
        assert!(stalled >= deadline, "{stalled:?}");
        // Closed for good: the next write fails at once.
        let again = Instant::now();
        assert!(matches!(
            channel.write_message(&frame(13, 9999, 8)),
            Err(WriteError::Closed)
        ));
        assert!(again.elapsed() < Duration::from_millis(100));
        // The tool gets the whole messages, then at most part of the stalled one, then EOF.
        let got = read_all(tool);
        let whole: Vec<u8> = sent.concat();
        assert!(got.len() >= whole.len());
        assert_eq!(&got[..whole.len()], &whole[..]);
        assert!(
            got.len() - whole.len() < 8 + 4096,
            "more than one cut message"
        );
    }

    #[test]
    fn close_wakes_a_blocked_writer_without_its_lock() {
        let (host, _tool) = UnixStream::pair().unwrap();
        let channel = Arc::new(SocketChannel::new(host, Some(Duration::from_secs(60))));
        let c = channel.clone();
        let writer = std::thread::spawn(move || {
            loop {
                if let Err(e) = c.write_message(&frame(13, 0, 4096)) {
                    return e;
                }
            }
        });
        // Wait until the writer is blocked (the socket is full), then close.
        let full = Instant::now();
        while channel.outbox.lock().pending.is_empty() {
            assert!(full.elapsed() < Duration::from_secs(10), "never filled");
            std::thread::sleep(Duration::from_millis(5));
        }
        let closing = Instant::now();
        channel.close();
        let e = writer.join().unwrap();
        assert!(
            closing.elapsed() < Duration::from_secs(1),
            "{:?}",
            closing.elapsed()
        );
        assert!(matches!(e, WriteError::Closed | WriteError::Io(_)), "{e}");
    }

    #[test]
    fn no_deadline_waits_for_a_slow_reader() {
        let (host, mut tool) = UnixStream::pair().unwrap();
        let channel = Arc::new(SocketChannel::new(host, None));
        let c = channel.clone();
        let writer = std::thread::spawn(move || {
            for seq in 0..100 {
                c.write_message(&frame(13, seq, 4096)).unwrap();
            }
        });
        let mut got = 0;
        let mut buf = vec![0u8; 1000];
        while got < 100 * (8 + 4096) {
            std::thread::sleep(Duration::from_micros(200));
            got += tool.read(&mut buf).unwrap();
        }
        writer.join().unwrap();
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.failed().1.as_millis() as u64).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.failed().0, 9);
        b.reset();
        assert_eq!(b.failed(), (1, BACKOFF_MIN));
    }

    #[test]
    fn a_refused_tool_gets_ebusy_for_its_first_command_then_end_of_file() {
        let (host, mut tool) = UnixStream::pair().unwrap();
        let mut refusal = Refusal::new(host).unwrap();
        assert!(refusal.progress(), "nothing sent yet: still waiting");
        // GET_VERSION (id 1), seq 7, sent in two pieces, plus a second message.
        tool.write_all(&[1, 0, 0]).unwrap();
        assert!(refusal.progress());
        tool.write_all(&[0, 7, 0, 0, 0]).unwrap();
        tool.write_all(&frame(3, 8, 0)).unwrap();
        assert!(!refusal.progress(), "answered and closed");
        let got = read_all(tool);
        assert_eq!(got, error_message(1, 7, ErrorCode::Busy));
        let frame = V4::parse_frame(&got).unwrap();
        assert_eq!((frame.header.id, frame.header.seq), (1, 7));
    }

    #[test]
    fn a_refused_tool_that_sends_nothing_is_closed_at_the_deadline() {
        let (host, tool) = UnixStream::pair().unwrap();
        let mut refusal = Refusal::new(host).unwrap();
        assert!(refusal.progress());
        refusal.deadline = Instant::now();
        assert!(!refusal.progress());
        assert!(read_all(tool).is_empty());
    }

    #[test]
    fn peer_hang_up_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!peer_hung_up(&a));
        drop(b);
        assert!(peer_hung_up(&a));
    }
}
