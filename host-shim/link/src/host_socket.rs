//! The host-agent backend (`kvmi run --appliance-socket PATH`): the agent runs as a host
//! process (guest-driver's `HostAgent`, see `guest-driver/src/host.rs` for the protocol), a
//! unix socket stands in for the doorbell port, memfds for the ring region and the window.
//!
//! Per connection (one agent at a time): a fresh ring region and window memfd are created,
//! sent with the agent's BootInfo in one `SCM_RIGHTS` message, the rings are attached to the
//! target's introspector (the same [`RingService`] as for the appliance VM), and every
//! 80-byte request is served by the same [`ApplianceHook`] as the VM doorbell, answered by
//! the new RAX. The one difference: the shim cannot remap pages inside another process, so
//! granted pages are copied into the window memfd at map time ([`Pager::new_copying`]).
//! Closing the socket detaches the agent and revokes (zeroes) everything it was granted.
//!
//! The serving thread sleeps in `epoll_wait` on the socket it serves (the listener, then the
//! agent's stream) and the server's stop eventfd, so a connection, a request and a stop are
//! each handled as soon as they arrive.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use guest_driver::host::{HOST_TOKEN_GPA, HostRequest, REQUEST_SIZE, send_with_fds};
use hypercall::boot::{BOOT_MAGIC, BOOT_VERSION, BootInfo};
use hypercall::call::Request;
use hypercall::error::{HcError, encode};
use hypercall::ring::{LayoutParams, RingSizes};
use hypercall::token::MapToken;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::hook::{ApplianceHook, SERVED_FEATURES};
use super::launch::{MAP_WINDOW_GPA, RING_REGION_GPA};
use super::pager::{Pager, hand_out_key};
use super::rings::{DEFAULT_FULL_TIMEOUT, RingService, create_region, stdout_sink};
use kvmi_engine::lock_order;
use kvmi_engine::{IntrospectError, Introspector};
use vmm::memory::GuestRam;
use vmm::sync::RankedMutex;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Pause after a failed `accept` (e.g. out of descriptors) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// The thread serving host agents on a unix socket.
pub struct HostSocketServer {
    path: PathBuf,
    /// Written once by [`HostSocketServer::stop`] and never read: it stays readable, and every
    /// wait of the serving thread returns.
    stop: EventFd,
    thread: RankedMutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for HostSocketServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSocketServer")
            .field("path", &self.path)
            .finish()
    }
}

/// What one agent connection needs.
#[derive(Clone)]
struct Target {
    intro: Arc<Introspector>,
    ram: Arc<GuestRam>,
    vcpus: u32,
    window_size: u64,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> IntrospectError {
    move |source| IntrospectError::Io { what, source }
}

impl HostSocketServer {
    /// Listens on `path` (a stale socket file is replaced) and serves agents for the target
    /// whose introspector is `intro` (RAM `ram`, `vcpus` vCPUs), with a window of
    /// `window_size` bytes.
    pub fn start(
        intro: Arc<Introspector>,
        ram: Arc<GuestRam>,
        vcpus: u32,
        path: &Path,
        window_size: u64,
    ) -> Result<HostSocketServer, IntrospectError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(IntrospectError::Io {
                    what: format!("{} exists and is not a socket", path.display()),
                    source: ErrorKind::AlreadyExists.into(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("non-blocking listener".into()))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(io_err("stop eventfd".into()))?;
        let s = stop.try_clone().map_err(io_err("stop eventfd".into()))?;
        let target = Target {
            intro,
            ram,
            vcpus,
            window_size,
        };
        let thread = std::thread::Builder::new()
            .name("kvmi-host-agent".into())
            .spawn(move || accept_loop(&listener, &target, &s))
            .map_err(io_err("spawning the host-agent thread".into()))?;
        tracing::info!(path = %path.display(), "host-agent socket listening");
        Ok(HostSocketServer {
            path: path.to_path_buf(),
            stop,
            thread: RankedMutex::new(lock_order::HOST_AGENT_THREAD, Some(thread)),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving (an agent connected now is detached) and removes the socket file.
    pub fn stop(&self) {
        match self.stop.write(1) {
            Ok(()) => {
                if let Some(t) = self.thread.lock().take() {
                    let _ = t.join();
                }
            }
            // Cannot happen for an eventfd written a few times; joining would then hang.
            Err(e) => tracing::error!("waking the host-agent thread to stop: {e}"),
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for HostSocketServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An epoll set of one socket and the server's stop eventfd (vmm-sys-util's [`Epoll`]).
struct StopOr {
    epoll: Epoll,
}

impl StopOr {
    const STOP: u64 = 0;
    const SOCKET: u64 = 1;

    fn new(stop: &EventFd, socket: RawFd) -> std::io::Result<StopOr> {
        let epoll = Epoll::new()?;
        for (fd, token) in [(stop.as_raw_fd(), Self::STOP), (socket, Self::SOCKET)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(StopOr { epoll })
    }

    /// Blocks until the socket is readable (or hung up): `Ok(true)`, or the server is
    /// stopped: `Ok(false)` (a stop wins over a readable socket).
    fn wait(&self) -> std::io::Result<bool> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            match self.epoll.wait(-1, &mut events) {
                Ok(n) if events[..n].iter().any(|e| e.data() == Self::STOP) => return Ok(false),
                Ok(0) => {}
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn accept_loop(listener: &UnixListener, target: &Target, stop: &EventFd) {
    let waiter = match StopOr::new(stop, listener.as_raw_fd()) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("host-agent socket: cannot wait for connections: {e}");
            return;
        }
    };
    loop {
        match waiter.wait() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!("host-agent socket: waiting for connections: {e}");
                return;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => match serve_agent(target, stream, stop) {
                Ok(reason) => tracing::info!("host agent detached: {reason}"),
                Err(e) => tracing::warn!("host agent: {e}"),
            },
            // The connection went away between the wakeup and the accept.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("host-agent accept: {e}");
                std::thread::sleep(ACCEPT_RETRY);
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes, each read after `waiter` saw the stream readable.
/// `Ok(false)`: the peer closed (or we were stopped).
fn read_request(stream: &mut UnixStream, buf: &mut [u8], waiter: &StopOr) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        if !waiter.wait()? {
            return Ok(false);
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn handshake_boot_info(ring_size: u64, window_size: u64) -> BootInfo {
    let mut boot = BootInfo::new_zeroed();
    boot.magic = BOOT_MAGIC;
    boot.version = BOOT_VERSION;
    boot.vcpu_count = 1;
    boot.ring_region_gpa = RING_REGION_GPA;
    boot.ring_region_size = ring_size;
    boot.map_window_gpa = MAP_WINDOW_GPA;
    boot.map_window_size = window_size;
    boot
}

/// Serves one agent until it closes; returns why it ended.
fn serve_agent(target: &Target, mut stream: UnixStream, stop: &EventFd) -> Result<String, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let waiter = StopOr::new(stop, stream.as_raw_fd()).map_err(|e| e.to_string())?;
    let params = LayoutParams {
        vcpu_count: target.vcpus,
        sizes: RingSizes::default(),
        features: SERVED_FEATURES,
        map_window_gpa: MAP_WINDOW_GPA,
        map_window_size: target.window_size,
    };
    let ring_size = params.region_size().next_multiple_of(4096);
    let mem = |name: &str, size| {
        GuestRam::new(name, size)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    };
    let ring = mem("kvmi-host-rings", ring_size)?;
    let window = mem("kvmi-host-window", target.window_size)?;
    let token_ram = mem("kvmi-host-token", 4096)?;
    let region = create_region(ring.clone(), &params).map_err(|e| e.to_string())?;
    let boot = handshake_boot_info(ring_size, target.window_size);
    send_with_fds(
        &stream,
        boot.as_bytes(),
        &[ring.memfd().as_raw_fd(), window.memfd().as_raw_fd()],
    )
    .map_err(|e| format!("handshake: {e}"))?;
    // The supervisor's step: this target's key, to its engine and to the pager (before the
    // agent can ask for a token).
    let verifier = hand_out_key(&target.intro).map_err(|e| format!("map-token key: {e}"))?;
    let service = RingService::start(
        target.intro.clone(),
        &region,
        stdout_sink(),
        DEFAULT_FULL_TIMEOUT,
    )
    .map_err(|e| format!("attaching the agent: {e}"))?;
    let pager = Arc::new(Pager::new_copying(
        verifier,
        target.ram.clone(),
        window,
        MAP_WINDOW_GPA,
    ));
    let hook = ApplianceHook::new(pager.clone(), service.waker());
    let mut buf = [0u8; REQUEST_SIZE];
    let reason = loop {
        match read_request(&mut stream, &mut buf, &waiter) {
            Ok(true) => {}
            Ok(false) => break "the agent closed the socket".to_string(),
            Err(e) => break format!("socket read: {e}"),
        }
        let Ok(request) = HostRequest::read_from_bytes(&buf) else {
            break "malformed request".into();
        };
        let regs = request.regs();
        let result = match Request::decode(&regs) {
            Ok(Request::MemMap { token_gpa, .. } | Request::MapRange { token_gpa, .. })
                if token_gpa != HOST_TOKEN_GPA =>
            {
                Err(HcError::Fault)
            }
            _ => token_ram
                .write(0, &MapToken::new(request.token).to_bytes())
                .map_err(|_| HcError::NoMemory)
                .and_then(|()| hook.call(&regs, &token_ram)),
        };
        if let Err(e) = stream.write_all(&encode(result).to_le_bytes()) {
            break format!("socket write: {e}");
        }
    };
    let revoked = pager.retire();
    let _ = service.stop();
    target.intro.detach(service.generation(), &reason);
    Ok(format!("{reason} ({revoked} pages revoked)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_end_on_data_and_on_a_stop_which_wins() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let waiter = StopOr::new(&stop, a.as_raw_fd()).unwrap();
        b.write_all(&[1]).unwrap();
        assert!(waiter.wait().unwrap());
        // A thread waiting on an idle socket wakes on the stop.
        let (idle, _peer) = UnixStream::pair().unwrap();
        let s = stop.try_clone().unwrap();
        let t = std::thread::spawn(move || StopOr::new(&s, idle.as_raw_fd()).unwrap().wait());
        stop.write(1).unwrap();
        assert!(!t.join().unwrap().unwrap());
        assert!(!waiter.wait().unwrap(), "stopped, though a byte is waiting");
    }

    #[test]
    fn a_request_is_read_across_writes_until_the_peer_closes() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let waiter = StopOr::new(&stop, a.as_raw_fd()).unwrap();
        let writer = std::thread::spawn(move || {
            b.write_all(&[7; 30]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(&[8; 50]).unwrap();
            b.write_all(&[9; 10]).unwrap();
        });
        let mut buf = [0u8; REQUEST_SIZE];
        assert!(read_request(&mut a, &mut buf, &waiter).unwrap());
        assert_eq!((buf[29], buf[30], buf[79]), (7, 8, 8));
        writer.join().unwrap();
        assert!(
            !read_request(&mut a, &mut buf, &waiter).unwrap(),
            "closed mid-request"
        );
    }
}
