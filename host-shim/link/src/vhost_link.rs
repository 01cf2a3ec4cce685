//! The link between a target VM process and the appliance VM process of `kvmi run --isolate`
//! (docs/isolation.md), in the vhost-user protocol over a socket pair the supervisor made.
//!
//! The appliance process is the **frontend** (it owns the slot's ring region, which is its
//! guest RAM); the target process is the **backend**:
//!
//! 1. `SET_OWNER`, features (`VHOST_USER_F_PROTOCOL_FEATURES`), protocol features
//!    (`BACKEND_REQ`, `SHMEM`), `SET_BACKEND_REQ_FD`: the backend's channel back.
//! 2. `SET_MEM_TABLE`: one region, the slot's ring region memfd (`kvmi-ring-slotN`) at its
//!    guest-physical address. The target process maps it and runs its ring service there.
//! 3. `SET_VRING_KICK` (queue 0): an eventfd, the appliance's NOTIFY doorbell for this slot.
//! 4. The backend answers with `SHMEM_MAP` (backend request): its guest RAM as a descriptor
//!    reopened **read-only** (`/proc/self/fd/N`, `O_RDONLY`), offset 0, the RAM's length.
//!    The appliance's pager maps granted pages of it `MAP_FIXED`, `PROT_READ`, into the slot's
//!    map window; a writable mapping of it is refused by the kernel (`EACCES`).
//!
//! Every value from the peer is checked (one region, sizes, a descriptor present); a bad
//! message fails the link, never the process.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMMap, VhostUserMMapFlags, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Frontend, FrontendReqHandler, GpuBackend,
    VhostUserBackendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd;

/// Why the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The vhost-user exchange failed.
    #[error("vhost-user: {0}")]
    Protocol(#[from] vhost::vhost_user::Error),
    /// A frontend request failed.
    #[error("vhost-user: {0}")]
    Frontend(#[from] vhost::Error),
    /// A system call failed.
    #[error("vhost-user link: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something the link does not allow.
    #[error("vhost-user link: {0}")]
    Refused(&'static str),
}

/// The protocol features the link needs.
fn wanted() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::SHMEM
}

/// The target's RAM as the appliance process received it.
#[derive(Debug)]
pub struct TargetRam {
    /// The read-only descriptor of the target's guest RAM memfd.
    pub fd: OwnedFd,
    /// Its length in bytes.
    pub len: u64,
}

/// The frontend's handler of backend requests: takes the one `SHMEM_MAP`.
#[derive(Default)]
struct RamReceiver {
    got: Mutex<Option<TargetRam>>,
}

impl VhostUserFrontendReqHandler for RamReceiver {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> std::io::Result<u64> {
        if req.fd_offset != 0 || req.len == 0 || !req.len.is_multiple_of(4096) {
            return Err(std::io::Error::other("SHMEM_MAP: not a whole RAM"));
        }
        // SAFETY: `fd` is the descriptor the request carried, open for this call; dup gives
        // us our own.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a new descriptor nothing else owns.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        *self.got.lock().unwrap_or_else(|e| e.into_inner()) = Some(TargetRam {
            fd: owned,
            len: req.len,
        });
        Ok(0)
    }
}

/// How long either end of a link waits for the other during the setup. The appliance's end
/// starts as soon as the supervisor hands it the link, while the target's process may still
/// be starting (exec, images, its VM): on a loaded host that takes seconds.
pub const LINK_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Shuts sockets down unless the setup ends before a deadline. vhost's reads retry on a
/// receive timeout, so a socket option cannot bound them; a shut-down socket ends them (the
/// read returns end-of-file and the setup fails).
struct Watchdog {
    fds: Arc<Mutex<Vec<i32>>>,
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Arms the deadline for `fd` (more sockets with [`Watchdog::watch`]). The watched
    /// sockets must stay open until the watchdog is dropped (declare it after them).
    fn arm(fd: i32, timeout: Duration) -> std::io::Result<Watchdog> {
        let fds = Arc::new(Mutex::new(vec![fd]));
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watched = fds.clone();
        let thread = std::thread::Builder::new()
            .name("kvmi-link-setup".into())
            .spawn(move || {
                if wait.recv_timeout(timeout) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    for &fd in watched.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                        // SAFETY: the owner of `fd` keeps it open until it has dropped the
                        // watchdog, which joins this thread first; shutdown only ends the
                        // socket's pending and later reads.
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    }
                }
            })?;
        Ok(Watchdog {
            fds,
            done: Some(done),
            thread: Some(thread),
        })
    }

    /// Adds socket `fd` to the ones shut down at the deadline.
    fn watch(&self, fd: i32) {
        self.fds.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The appliance process's end of one slot's link.
pub struct ApplianceLink {
    frontend: Frontend,
    /// The NOTIFY doorbell of the slot: a write wakes the target's ring service.
    pub kick: EventFd,
    _requests: FrontendReqHandler<RamReceiver>,
}

impl std::fmt::Debug for ApplianceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplianceLink").finish()
    }
}

impl ApplianceLink {
    /// Runs the frontend's side over `stream`: shares the slot's ring region (`ring_fd`, `len`
    /// bytes at `ring_gpa`, mapped at `ring_host` in this process) and its doorbell, and
    /// receives the target's RAM. A target that stops answering fails it after
    /// [`LINK_SETUP_TIMEOUT`].
    pub fn connect(
        stream: UnixStream,
        ring_fd: &dyn AsRawFd,
        ring_gpa: u64,
        ring_host: u64,
        len: u64,
    ) -> Result<(ApplianceLink, TargetRam), LinkError> {
        Self::connect_within(
            stream,
            ring_fd,
            ring_gpa,
            ring_host,
            len,
            LINK_SETUP_TIMEOUT,
        )
    }

    /// [`ApplianceLink::connect`] with every wait for the target (its answers on `stream`, its
    /// `SHMEM_MAP`) bounded by `timeout`: a silent or stalled target process cannot hang the
    /// appliance process (at the deadline both sockets are shut down and the setup fails).
    pub fn connect_within(
        stream: UnixStream,
        ring_fd: &dyn AsRawFd,
        ring_gpa: u64,
        ring_host: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<(ApplianceLink, TargetRam), LinkError> {
        let stream_fd = stream.as_raw_fd();
        let mut frontend = Frontend::from_stream(stream, 1);
        let watchdog = Watchdog::arm(stream_fd, timeout)?;
        frontend.set_owner()?;
        let features = frontend.get_features()?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & protocol_bit == 0 {
            return Err(LinkError::Refused("the backend has no protocol features"));
        }
        frontend.set_features(protocol_bit)?;
        let offered = frontend.get_protocol_features()?;
        if !offered.contains(wanted()) {
            return Err(LinkError::Refused("the backend lacks BACKEND_REQ or SHMEM"));
        }
        frontend.set_protocol_features(wanted())?;
        let receiver = Arc::new(RamReceiver::default());
        let mut requests = FrontendReqHandler::new(receiver.clone())?;
        watchdog.watch(requests.as_raw_fd());
        frontend.set_backend_request_fd(&requests.get_tx_raw_fd())?;
        frontend.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: ring_gpa,
            memory_size: len,
            userspace_addr: ring_host,
            mmap_offset: 0,
            mmap_handle: ring_fd.as_raw_fd(),
        }])?;
        let kick = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
        frontend.set_vring_kick(0, &kick)?;
        // The backend answers the kick descriptor with its RAM.
        requests.handle_request()?;
        let ram = receiver
            .got
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(LinkError::Refused("no SHMEM_MAP from the target"))?;
        Ok((
            ApplianceLink {
                frontend,
                kick,
                _requests: requests,
            },
            ram,
        ))
    }

    /// Rings the target's doorbell (the appliance's NOTIFY for this slot).
    pub fn notify(&self) {
        let _ = self.kick.write(1);
    }

    /// The frontend (for further requests).
    pub fn frontend(&self) -> &Frontend {
        &self.frontend
    }
}

/// What the target process received from the appliance.
#[derive(Debug)]
pub struct RingShare {
    /// The slot's ring region memfd.
    pub ring: File,
    /// Its guest-physical address in the appliance and its length.
    pub gpa: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The doorbell: readable when the appliance made NOTIFY for this slot.
    pub kick: File,
}

#[derive(Default)]
struct BackendState {
    features: u64,
    protocol: u64,
    ring: Option<(File, u64, u64)>,
    kick: Option<File>,
    channel: Option<Backend>,
}

/// The target process's end: a backend that takes the ring region and the doorbell, then
/// offers its RAM.
#[derive(Default)]
pub struct TargetBackend {
    state: Mutex<BackendState>,
}

type VResult<T> = vhost::vhost_user::Result<T>;

fn unsupported<T>() -> VResult<T> {
    Err(vhost::vhost_user::Error::InvalidOperation(
        "not used by the kvmi link",
    ))
}

impl TargetBackend {
    fn state(&self) -> std::sync::MutexGuard<'_, BackendState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves the backend's side over `stream` until the appliance shared the ring region and
/// the doorbell, then sends `ram` (reopened read-only from `/proc/self/fd`) with
/// `SHMEM_MAP`. Returns what the appliance shared and the handler, whose later requests the
/// caller may serve (its end is how the target sees the appliance go).
pub fn serve_target_end(
    stream: UnixStream,
    ram: &dyn AsRawFd,
    ram_len: u64,
) -> Result<(RingShare, BackendReqHandler<TargetBackend>), LinkError> {
    serve_target_end_within(stream, ram, ram_len, None)
}

/// [`serve_target_end`] with the waits for the appliance's setup requests bounded by
/// `timeout` (at the deadline the socket is shut down: a silent appliance process fails the
/// setup instead of hanging the target's).
pub fn serve_target_end_within(
    stream: UnixStream,
    ram: &dyn AsRawFd,
    ram_len: u64,
    timeout: Option<Duration>,
) -> Result<(RingShare, BackendReqHandler<TargetBackend>), LinkError> {
    // A descriptor of the same socket that outlives the watchdog whatever the setup does.
    let setup = stream.try_clone()?;
    let watchdog = match timeout {
        Some(t) => Some(Watchdog::arm(setup.as_raw_fd(), t)?),
        None => None,
    };
    let served = serve_backend(stream, ram, ram_len);
    drop(watchdog);
    drop(setup);
    served
}

fn serve_backend(
    stream: UnixStream,
    ram: &dyn AsRawFd,
    ram_len: u64,
) -> Result<(RingShare, BackendReqHandler<TargetBackend>), LinkError> {
    let backend = Arc::new(TargetBackend::default());
    let mut handler = BackendReqHandler::from_stream(stream, backend.clone());
    loop {
        handler.handle_request()?;
        let st = backend.state();
        if st.ring.is_some() && st.kick.is_some() && st.channel.is_some() {
            break;
        }
    }
    let read_only = File::open(format!("/proc/self/fd/{}", ram.as_raw_fd()))?;
    let mut st = backend.state();
    let channel = st
        .channel
        .take()
        .ok_or(LinkError::Refused("no backend channel"))?;
    channel.set_shmem_flag(true);
    let request = VhostUserMMap {
        shmid: 0,
        padding: [0; 7],
        fd_offset: 0,
        shm_offset: 0,
        len: ram_len,
        flags: VhostUserMMapFlags::default().bits(),
    };
    channel.shmem_map(&request, &read_only)?;
    let (ring, gpa, len) = st.ring.take().ok_or(LinkError::Refused("no ring region"))?;
    let kick = st.kick.take().ok_or(LinkError::Refused("no doorbell"))?;
    drop(st);
    Ok((
        RingShare {
            ring,
            gpa,
            len,
            kick,
        },
        handler,
    ))
}

impl VhostUserBackendReqHandler for TargetBackend {
    fn set_owner(&self) -> VResult<()> {
        Ok(())
    }
    fn reset_owner(&self) -> VResult<()> {
        unsupported()
    }
    fn reset_device(&self) -> VResult<()> {
        unsupported()
    }
    fn get_features(&self) -> VResult<u64> {
        Ok(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }
    fn set_features(&self, features: u64) -> VResult<()> {
        if features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        self.state().features = features;
        Ok(())
    }
    fn set_mem_table(&self, ctx: &[VhostUserMemoryRegion], files: Vec<File>) -> VResult<()> {
        let ([region], [file]) = (
            ctx,
            <[File; 1]>::try_from(files).map_err(|_| vhost::vhost_user::Error::InvalidParam)?,
        ) else {
            return Err(vhost::vhost_user::Error::InvalidParam);
        };
        if region.memory_size == 0 || region.mmap_offset != 0 {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        let size = file
            .metadata()
            .map_err(vhost::vhost_user::Error::ReqHandlerError)?
            .len();
        if size < region.memory_size {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        self.state().ring = Some((file, region.guest_phys_addr, region.memory_size));
        Ok(())
    }
    fn set_vring_num(&self, _: u32, _: u32) -> VResult<()> {
        unsupported()
    }
    fn set_vring_addr(
        &self,
        _: u32,
        _: VhostUserVringAddrFlags,
        _: u64,
        _: u64,
        _: u64,
        _: u64,
    ) -> VResult<()> {
        unsupported()
    }
    fn set_vring_base(&self, _: u32, _: u32) -> VResult<()> {
        unsupported()
    }
    fn get_vring_base(&self, _: u32) -> VResult<VhostUserVringState> {
        unsupported()
    }
    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> VResult<()> {
        match (index, fd) {
            (0, Some(fd)) => {
                self.state().kick = Some(fd);
                Ok(())
            }
            _ => Err(vhost::vhost_user::Error::InvalidParam),
        }
    }
    fn set_vring_call(&self, _: u8, _: Option<File>) -> VResult<()> {
        unsupported()
    }
    fn set_vring_err(&self, _: u8, _: Option<File>) -> VResult<()> {
        unsupported()
    }
    fn get_protocol_features(&self) -> VResult<VhostUserProtocolFeatures> {
        Ok(wanted())
    }
    fn set_protocol_features(&self, features: u64) -> VResult<()> {
        if features & !wanted().bits() != 0 {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        self.state().protocol = features;
        Ok(())
    }
    fn get_queue_num(&self) -> VResult<u64> {
        Ok(1)
    }
    fn set_vring_enable(&self, _: u32, _: bool) -> VResult<()> {
        unsupported()
    }
    fn get_config(&self, _: u32, _: u32, _: VhostUserConfigFlags) -> VResult<Vec<u8>> {
        unsupported()
    }
    fn set_config(&self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VResult<()> {
        unsupported()
    }
    fn set_backend_req_fd(&self, backend: Backend) {
        self.state().channel = Some(backend);
    }
    fn set_gpu_socket(&self, _: GpuBackend) -> VResult<()> {
        unsupported()
    }
    fn get_shared_object(&self, _: VhostUserSharedMsg) -> VResult<File> {
        unsupported()
    }
    fn get_inflight_fd(&self, _: &VhostUserInflight) -> VResult<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(&self, _: &VhostUserInflight, _: File) -> VResult<()> {
        unsupported()
    }
    fn get_max_mem_slots(&self) -> VResult<u64> {
        Ok(1)
    }
    fn add_mem_region(&self, _: &VhostUserSingleMemoryRegion, _: File) -> VResult<()> {
        unsupported()
    }
    fn remove_mem_region(&self, _: &VhostUserSingleMemoryRegion) -> VResult<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> VResult<Option<File>> {
        unsupported()
    }
    fn check_device_state(&self) -> VResult<()> {
        unsupported()
    }
    fn get_shmem_config(&self) -> VResult<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&self, _: &VhostUserLog, _: File) -> VResult<()> {
        unsupported()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm::memory::GuestRam;

    fn link_name(fd: &dyn AsRawFd) -> String {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("readlink")
            .display()
            .to_string()
    }

    #[test]
    fn the_ring_region_goes_one_way_and_a_read_only_ram_the_other() {
        let (appliance_end, target_end) = UnixStream::pair().expect("socketpair");
        let ram = GuestRam::new("kvmi-ram-web", 2 << 20).expect("target RAM");
        ram.write(0x1000, b"target bytes").expect("write");
        let ring = GuestRam::new("kvmi-ring-slot1", 64 << 10).expect("ring region");
        let ram_fd = ram.memfd_file().clone();
        let target = std::thread::spawn(move || {
            let (share, _handler) =
                serve_target_end(target_end, &*ram_fd, 2 << 20).expect("target end");
            share
        });
        let (link, got) = ApplianceLink::connect(
            appliance_end,
            &*ring.memfd_file().clone(),
            0xC700_0000,
            ring.host_base() as u64,
            64 << 10,
        )
        .expect("appliance end");
        let mut share = target.join().expect("target thread");
        // The ring region reached the target: its memfd, at the slot's address.
        assert!(
            link_name(&share.ring).contains("memfd:kvmi-ring-slot1"),
            "{}",
            link_name(&share.ring)
        );
        assert_eq!((share.gpa, share.len), (0xC700_0000, 64 << 10));
        // The target's RAM reached the appliance read-only: its memfd, its length.
        assert!(
            link_name(&got.fd).contains("memfd:kvmi-ram-web"),
            "{}",
            link_name(&got.fd)
        );
        assert_eq!(got.len, 2 << 20);
        // SAFETY: F_GETFL only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(got.fd.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        // SAFETY: mapping a descriptor we own; the result is checked and unmapped below.
        let writable = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                got.fd.as_raw_fd(),
                0,
            )
        };
        assert_eq!(
            writable,
            libc::MAP_FAILED,
            "a writable mapping of the target's RAM"
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EACCES)
        );
        let mut buf = [0u8; 12];
        let file = File::from(got.fd.try_clone().expect("dup"));
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0x1000).expect("pread");
        assert_eq!(&buf, b"target bytes");
        // The doorbell: NOTIFY in the appliance is readable in the target.
        link.notify();
        let mut count = [0u8; 8];
        share
            .kick
            .read_exact(&mut count)
            .expect("the kick is readable");
        assert_eq!(u64::from_ne_bytes(count), 1);
    }

    #[test]
    fn a_silent_target_fails_the_appliance_s_setup_instead_of_hanging_it() {
        let (appliance_end, silent) = UnixStream::pair().expect("socketpair");
        let ring = GuestRam::new("kvmi-ring-slot2", 64 << 10).expect("ring region");
        let started = std::time::Instant::now();
        let got = ApplianceLink::connect_within(
            appliance_end,
            &*ring.memfd_file().clone(),
            0xC700_0000,
            ring.host_base() as u64,
            64 << 10,
            Duration::from_millis(200),
        );
        assert!(got.is_err(), "a link with a target that never answered");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        drop(silent);
    }

    #[test]
    fn a_silent_appliance_fails_the_target_s_setup_instead_of_hanging_it() {
        let (silent, target_end) = UnixStream::pair().expect("socketpair");
        let ram = GuestRam::new("kvmi-ram-silent", 2 << 20).expect("target RAM");
        let started = std::time::Instant::now();
        let got = serve_target_end_within(
            target_end,
            &*ram.memfd_file().clone(),
            2 << 20,
            Some(Duration::from_millis(200)),
        );
        assert!(got.is_err(), "a link with an appliance that never spoke");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        drop(silent);
    }
}
