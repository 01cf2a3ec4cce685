//! The listener: a unix socket, one thread per connection (at most [`MAX_CONNECTIONS`]),
//! bounded and timed reads, and the socket file's life (a live server's file is refused, a
//! stale one replaced, ours removed at the end).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::backend::Backend;
use super::error::ApiError;
use super::http::{ReadError, Reader, write_response};
use super::routes::Api;

/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send a whole request (and, on a kept-alive connection, the next
/// one) before it gets 408 and the connection is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a response may take to be written (a client that does not read is dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the server looks for paused targets that ended.
const REAP_PERIOD: Duration = Duration::from_millis(50);

/// Why the API server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another server answers on the path.
    #[error("{0} is in use: a server answers there (stop it, or choose another path)")]
    InUse(PathBuf),
    /// The path exists and is not a socket (it is never removed).
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running API server; dropping it (or [`ApiServer::stop`]) stops it and removes its
/// socket file.
pub struct ApiServer {
    path: PathBuf,
    api: Arc<Api>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish()
    }
}

/// Keeps the count of live connections right, however the connection's thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Removes a stale socket file at `path`, or refuses a live one or a non-socket.
fn claim(path: &Path) -> Result<(), ServerError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_owned()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ServerError::InUse(path.to_owned()));
    }
    tracing::info!("api: replacing the stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|source| ServerError::Io {
        what: "removing the stale socket",
        path: path.to_owned(),
        source,
    })
}

/// The API socket, bound and not served yet: `kvmi run` binds it before any VM starts, so a
/// path in use fails at once. Dropped unserved, it removes its file.
#[derive(Debug)]
pub struct ApiListener {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl ApiListener {
    /// Binds `path` (replacing a stale socket there; refusing a live one or a non-socket),
    /// readable and writable by the owner only.
    pub fn bind(path: &Path) -> Result<ApiListener, ServerError> {
        claim(path)?;
        let io = |what| {
            let path = path.to_owned();
            move |source| ServerError::Io { what, path, source }
        };
        let listener = UnixListener::bind(path).map_err(io("binding"))?;
        let bound = ApiListener {
            listener: Some(listener),
            path: path.to_owned(),
        };
        // The API controls the VMs: only the owner may connect.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("restricting"))?;
        Ok(bound)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ApiServer {
    /// Serves `backend`'s VMs on `listener`.
    pub fn start(
        mut listener: ApiListener,
        backend: Arc<dyn Backend>,
    ) -> Result<ApiServer, ServerError> {
        let path = listener.path.clone();
        let io = |what| {
            let path = path.clone();
            move |source| ServerError::Io { what, path, source }
        };
        let api = Arc::new(Api::new(backend));
        let stop = Arc::new(AtomicBool::new(false));
        let reaper = {
            let (api, stop) = (api.clone(), stop.clone());
            std::thread::Builder::new()
                .name("kvmi-api-reap".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        api.reap_paused();
                        std::thread::sleep(REAP_PERIOD);
                    }
                })
                .map_err(io("starting the server thread"))?
        };
        let mut server = ApiServer {
            path: path.clone(),
            api: api.clone(),
            stop: stop.clone(),
            threads: vec![reaper],
        };
        let Some(socket) = listener.listener.take() else {
            return Err(io("serving")(std::io::Error::other("already served")));
        };
        let accept = std::thread::Builder::new()
            .name("kvmi-api".into())
            .spawn(move || accept_loop(&socket, &api, &stop))
            .map_err(io("starting the server thread"))?;
        server.threads.push(accept);
        tracing::info!("api: listening on {}", path.display());
        Ok(server)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, resumes the targets the API paused and removes the socket file.
    /// Connections being served finish their request on their own.
    pub fn stop(self) {}

    fn shut_down(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept loop: it sees the stop flag on this connection.
        let _ = UnixStream::connect(&self.path);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.api.resume_paused();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn accept_loop(listener: &UnixListener, api: &Arc<Api>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("api: accept: {e}");
                // E.g. out of file descriptors: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let e =
                ApiError::Unavailable(format!("too many connections (at most {MAX_CONNECTIONS})"));
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_response(&mut stream, e.status(), &e.body(), false, None);
            continue;
        }
        let slot = Slot(active.clone());
        let api = api.clone();
        let spawned = std::thread::Builder::new()
            .name("kvmi-api-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve(&api, stream);
            });
        if let Err(e) = spawned {
            tracing::warn!("api: cannot start a connection thread: {e}");
        }
    }
}

/// Serves one connection until the client closes it, asks to, or misbehaves.
fn serve(api: &Api, mut stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut reader = Reader::new(REQUEST_TIMEOUT);
    loop {
        let req = match reader.next(&mut stream) {
            Ok(req) => req,
            Err(ReadError::Closed) => return,
            Err(ReadError::Reply(e)) => {
                tracing::debug!("api: bad request: {e}");
                let _ = write_response(&mut stream, e.status(), &e.body(), false, None);
                return;
            }
        };
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| api.handle(&req)))
            .unwrap_or_else(|_| Err(ApiError::Internal("the request handler failed".into())));
        let (status, body, allow) = match answer {
            Ok((status, value)) => (status, value.to_string().into_bytes(), None),
            Err(e) => {
                tracing::debug!("api: {} {}: {} {e}", req.method, req.path, e.status());
                let allow = match &e {
                    ApiError::MethodNotAllowed { allowed, .. } => Some(*allowed),
                    _ => None,
                };
                (e.status(), e.body(), allow)
            }
        };
        tracing::debug!("api: {} {} -> {status}", req.method, req.path);
        if write_response(&mut stream, status, &body, req.keep_alive, allow).is_err()
            || !req.keep_alive
        {
            return;
        }
    }
}
