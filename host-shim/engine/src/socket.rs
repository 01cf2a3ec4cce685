//! The KVMI unix-socket transport: the shim listens on a path (`--kvmi-socket`), or connects
//! to a tool listening on a path (`--kvmi-connect`, as QEMU does, reconnecting after a
//! detach). One tool at a time; a reader thread feeds whole messages to the introspector;
//! every message is written with one write under a writer lock.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use protocol::V4;
use protocol::wire::WireProfile;

use super::lock_order;
use super::transport::{Channel, ChannelError, Route};
use super::{IntrospectError, Introspector};
use vmm::running::VmHandle;
use vmm::sync::RankedMutex;

/// Where the KVMI socket is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The shim listens on this path and accepts one tool at a time.
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

/// A connected tool's socket as a [`Channel`].
struct SocketChannel {
    writer: RankedMutex<UnixStream>,
}

impl Channel for SocketChannel {
    fn send(&self, message: &[u8], _route: Route) -> std::io::Result<()> {
        let mut w = self.writer.lock();
        w.write_all(message)
    }

    fn close(&self) {
        let w = self.writer.lock();
        let _ = w.shutdown(Shutdown::Both);
    }
}

/// Poll interval of the accept/connect loop.
const POLL: Duration = Duration::from_millis(20);

/// The thread serving one VM's KVMI socket.
pub struct SocketServer {
    path: PathBuf,
    listening: bool,
    stop: Arc<AtomicBool>,
    vm: Arc<OnceLock<VmHandle>>,
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

impl SocketServer {
    /// Starts serving `endpoint` for `introspector`. A listening path is bound before this
    /// returns (a stale socket file is replaced; any other existing file is an error).
    pub fn start(
        introspector: Arc<Introspector>,
        endpoint: Endpoint,
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
        let (s, v, c, p) = (stop.clone(), vm.clone(), current.clone(), path.clone());
        let thread = std::thread::Builder::new()
            .name("kvmi-socket".into())
            .spawn(move || serve_loop(&introspector, listener, &p, &s, &v, &c))
            .map_err(io_err("spawning the KVMI socket thread".into()))?;
        if listener_path_is_listen(&endpoint) {
            tracing::info!(path = %path.display(), "KVMI socket listening");
        }
        Ok(SocketServer {
            path,
            listening: matches!(endpoint, Endpoint::Listen(_)),
            stop,
            vm,
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

    /// Closes the current connection, stops the thread and removes a listening socket file.
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

fn listener_path_is_listen(e: &Endpoint) -> bool {
    matches!(e, Endpoint::Listen(_))
}

fn serve_loop(
    introspector: &Introspector,
    listener: Option<UnixListener>,
    path: &Path,
    stop: &AtomicBool,
    vm: &OnceLock<VmHandle>,
    current: &RankedMutex<Option<UnixStream>>,
) {
    let mut connect_warned = false;
    while !stop.load(Ordering::SeqCst) && !vm.get().is_some_and(VmHandle::has_ended) {
        let stream = match &listener {
            Some(l) => match l.accept() {
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
            },
            None => match UnixStream::connect(path) {
                Ok(s) => s,
                Err(e) => {
                    if !connect_warned {
                        tracing::info!("waiting for a tool at {}: {e}", path.display());
                        connect_warned = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        connect_warned = false;
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!("KVMI socket: {e}");
            continue;
        }
        serve_one(introspector, stream, current);
    }
}

fn serve_one(
    introspector: &Introspector,
    stream: UnixStream,
    current: &RankedMutex<Option<UnixStream>>,
) {
    let (Ok(writer), Ok(control)) = (stream.try_clone(), stream.try_clone()) else {
        tracing::warn!("KVMI socket: cannot clone the stream");
        return;
    };
    let channel = Arc::new(SocketChannel {
        writer: RankedMutex::new(lock_order::SOCKET_WRITER, writer),
    });
    let generation = match introspector.attach(channel) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!("KVMI attach refused: {e}");
            return;
        }
    };
    *current.lock() = Some(control);
    let reason = read_messages(introspector, generation, stream);
    introspector.detach(generation, &reason);
    *current.lock() = None;
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
