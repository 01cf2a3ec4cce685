//! A target's end of its slot when the appliance runs in another process (`kvmi run
//! --isolate`, docs/isolation.md): the vhost-user link ([`crate::vhost_link`]) brings the
//! slot's ring region and doorbell, the target's ring service serves them, and the link's
//! socket is how the target sees the appliance process go.
//!
//! [`TargetSlot::attach`] runs the backend's side of the link (the target's RAM goes to the
//! appliance read-only), maps the ring region memfd it received
//! ([`vmm::GuestRam::from_file`]), opens the layout the appliance wrote there, starts a
//! [`RingService`] without the log ring (the appliance process prints the log) and a
//! [`KickForwarder`] for the doorbell. A thread then serves the link's later requests; when
//! the socket closes (the appliance process ended or died) or carries something the link does
//! not allow, the introspector detaches the appliance: the target runs on, unhooked, as it does
//! when an in-process appliance ends.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hypercall::ring::{Region, SharedRegion};
use kvmi_engine::Introspector;
use vmm::memory::GuestRam;

use crate::kick::{KickEnd, KickForwarder};
use crate::rings::{RingMemory, RingService, ServiceEnd};
use crate::vhost_link::{LinkError, RingShare, serve_target_end_within};

/// Why a target's slot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotEnd {
    /// Why the ring service ended.
    pub service: ServiceEnd,
    /// Why the doorbell thread ended.
    pub doorbell: KickEnd,
    /// Whether the appliance process closed the link (or broke it) before the slot was
    /// stopped.
    pub link_lost: bool,
}

/// The target process's end of one slot, attached to its introspector.
pub struct TargetSlot {
    service: Arc<RingService>,
    doorbell: KickForwarder,
    link: Option<JoinHandle<bool>>,
    link_socket: UnixStream,
    region: Region<RingMemory>,
}

impl std::fmt::Debug for TargetSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetSlot")
            .field("generation", &self.service.generation())
            .finish()
    }
}

fn refused(what: &'static str) -> LinkError {
    LinkError::Refused(what)
}

impl TargetSlot {
    /// Serves the link on `stream` (the target's RAM `ram` goes to the appliance read-only),
    /// then attaches the slot's rings to `introspector`. `full_timeout` is how long a full
    /// ring may stay full before the appliance is declared dead.
    pub fn attach(
        stream: UnixStream,
        introspector: Arc<Introspector>,
        ram: &GuestRam,
        full_timeout: Duration,
    ) -> Result<TargetSlot, LinkError> {
        // A second descriptor of the socket: the slot shuts the link down through it (the
        // link thread's own descriptor is closed when that thread ends, and its number may
        // then be reused).
        let link_socket = stream.try_clone()?;
        let (
            RingShare {
                ring, len, kick, ..
            },
            mut handler,
        ) = serve_target_end_within(
            stream,
            &ram.memfd(),
            ram.size(),
            Some(crate::vhost_link::LINK_SETUP_TIMEOUT),
        )?;
        let ring = Arc::new(
            GuestRam::from_file(ring, len)
                .map_err(|_| refused("the ring region cannot be mapped"))?,
        );
        let (ptr, size) = (ring.host_base(), ring.size() as usize);
        // SAFETY: `ptr..ptr+size` is the ring memfd's shared mapping, kept alive by the
        // `Arc<GuestRam>` stored as the region's owner; this process accesses it only through
        // the region's atomics (the appliance process and its VM write it concurrently, which
        // the ring code allows: every word it reads is checked).
        let memory = unsafe { SharedRegion::new(ring, ptr, size) }
            .map_err(|_| refused("the ring region is not a region"))?;
        let region = Region::open(Arc::new(memory))
            .map_err(|_| refused("the ring region holds no valid layout"))?;
        let service = Arc::new(
            RingService::start_without_log(introspector.clone(), &region, full_timeout)
                .map_err(|_| refused("the ring service cannot start"))?,
        );
        let doorbell = KickForwarder::start(kick, service.waker())?;
        let generation = service.generation();
        let link = std::thread::Builder::new()
            .name("kvmi-link".into())
            .spawn(move || {
                if let Err(e) = vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service) {
                    introspector.detach(generation, &format!("the link thread: {e}"));
                    return true;
                }
                // Until the socket closes: the appliance sends nothing after the setup.
                let why = loop {
                    if let Err(e) = handler.handle_request() {
                        break e;
                    }
                };
                let lost = introspector.current_generation() == generation;
                if lost {
                    tracing::warn!("appliance link: {why}; detaching the appliance");
                    introspector.detach(generation, "the appliance process closed the link");
                }
                lost
            })?;
        Ok(TargetSlot {
            service,
            doorbell,
            link: Some(link),
            link_socket,
            region,
        })
    }

    /// The slot's ring region (as the target maps it).
    pub fn region(&self) -> &Region<RingMemory> {
        &self.region
    }

    /// The ring service.
    pub fn service(&self) -> &RingService {
        &self.service
    }

    /// Wake-ups the doorbell brought so far.
    pub fn doorbell_wakeups(&self) -> u64 {
        self.doorbell.wakeups()
    }

    /// True once the link's socket has closed (the appliance process ended or broke the
    /// link).
    pub fn link_closed(&self) -> bool {
        self.link.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Ends the slot: the ring service stops (its generation detaches if still attached), the
    /// doorbell thread stops, the link is shut down. Returns how each ended.
    pub fn stop(mut self, introspector: &Introspector) -> SlotEnd {
        self.finish(introspector)
    }

    fn finish(&mut self, introspector: &Introspector) -> SlotEnd {
        let service = self.service.stop();
        introspector.detach(self.service.generation(), "the target's slot was stopped");
        let doorbell = self.doorbell.stop();
        let link_lost = self.close_link();
        SlotEnd {
            service,
            doorbell,
            link_lost,
        }
    }

    fn close_link(&mut self) -> bool {
        let Some(link) = self.link.take() else {
            return false;
        };
        // Ends the thread's blocking read (the socket may be closed by the peer already).
        let _ = self.link_socket.shutdown(std::net::Shutdown::Both);
        link.join().unwrap_or(false)
    }
}

impl Drop for TargetSlot {
    fn drop(&mut self) {
        if self.link.is_some() {
            let _ = self.service.stop();
            let _ = self.doorbell.stop();
            let _ = self.close_link();
        }
    }
}

/// The appliance process's end of one slot whose target runs in another process: the link's
/// frontend, the slot's pager over the target's read-only RAM, the hook's route (NOTIFY rings
/// the target's doorbell), a thread printing the slot's log ring labelled with the target, and
/// a thread watching the link: when the target's process ends (its end of the socket closes)
/// the slot is marked gone and every page the target granted is revoked.
pub struct ApplianceSlot {
    /// Held open: its closing is how the target's process sees the appliance go.
    _link: crate::vhost_link::ApplianceLink,
    pager: Arc<crate::pager::Pager>,
    waker: crate::rings::Waker,
    stop: Arc<vmm_sys_util::eventfd::EventFd>,
    log_stop: Arc<std::sync::atomic::AtomicBool>,
    log: Option<JoinHandle<u64>>,
    watch: Option<JoinHandle<()>>,
    gone: Arc<std::sync::atomic::AtomicBool>,
    final_seen: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for ApplianceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplianceSlot")
            .field("gone", &self.is_gone())
            .finish()
    }
}

/// What [`ApplianceSlot::connect`] needs to know about the slot and its target.
pub struct SlotSetup {
    /// The slot's ring region memory (memfd `kvmi-ring-slotN`), mapped in the appliance VM at
    /// `ring_gpa`.
    pub ring: Arc<GuestRam>,
    /// Its guest-physical address in the appliance.
    pub ring_gpa: u64,
    /// The ring layout for the target (its vCPUs, the slot's window).
    pub params: hypercall::ring::LayoutParams,
    /// The verifier of the target's tokens (its key and token page from the supervisor).
    pub verifier: Arc<kvmi_engine::tokens::TokenVerifier>,
    /// The slot's map window and its guest-physical address.
    pub window: Arc<vmm::window::RemapWindow>,
    /// Guest-physical base of the window.
    pub window_gpa: u64,
    /// The target's id and name (log lines are labelled with them).
    pub target: (u64, String),
    /// Where the labelled log lines go.
    pub sink: crate::rings::LogSink,
}

/// Why [`ApplianceSlot::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceSlotError {
    /// The ring layout could not be written.
    #[error("the slot's ring layout: {0}")]
    Layout(#[from] hypercall::ring::RingError),
    /// The link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The target's RAM is not acceptable.
    #[error(transparent)]
    Ram(#[from] crate::pager::RemoteRamError),
    /// A thread could not start.
    #[error("starting a slot thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl ApplianceSlot {
    /// Lays the slot's rings out for the target, runs the frontend's side of the link on
    /// `stream` (ring region and doorbell out, the target's RAM in) and starts the slot's log
    /// and watch threads. The caller installs [`ApplianceSlot::pager`] and
    /// [`ApplianceSlot::waker`] as the hook's route for the slot.
    pub fn connect(
        stream: UnixStream,
        setup: SlotSetup,
    ) -> Result<ApplianceSlot, ApplianceSlotError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let SlotSetup {
            ring,
            ring_gpa,
            params,
            verifier,
            window,
            window_gpa,
            target: (id, name),
            mut sink,
        } = setup;
        let len = params.region_size().next_multiple_of(4096);
        let region = crate::rings::create_region_in(ring.clone(), len as usize, &params)?;

        let (link, ram) = crate::vhost_link::ApplianceLink::connect(
            stream,
            &**ring.memfd_file(),
            ring_gpa,
            ring.host_base() as u64,
            len,
        )?;
        let pager = Arc::new(crate::pager::Pager::new_remote(
            verifier,
            ram,
            Vec::new(),
            window,
            window_gpa,
        )?);
        let kick = Arc::new(link.kick.try_clone()?);

        let mut log_ring = region.consumer_for(hypercall::discovery::RingKind::Log, 0)?;
        let (log_stop, final_seen) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (stop_flag, seen) = (log_stop.clone(), final_seen.clone());
        let log = std::thread::Builder::new()
            .name("kvmi-slot-log".into())
            .spawn(move || {
                let _ = vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service);
                let mut scratch = vec![0u8; log_ring.max_payload()];
                let mut records = 0u64;
                let mut print = |record: &[u8]| {
                    if crate::fleet::contains(record, b"\"final\":true") {
                        seen.store(true, Ordering::SeqCst);
                    }
                    sink(&crate::fleet::label_line(record, id, &name));
                    records += 1;
                };
                loop {
                    // The agent's words are checked by the ring code; a broken ring ends the
                    // log (the slot's other parts run on).
                    // Read before the drain: once stopping, one more pass prints what was
                    // published before the stop, and the thread ends even if the agent
                    // keeps writing (a flooded ring cannot hold the slot's close).
                    let stopping = stop_flag.load(Ordering::SeqCst);
                    let drained =
                        log_ring.drain(&mut scratch, &hypercall::ring::NoNotify, &mut print);
                    match drained {
                        Ok(_) if stopping => break,
                        Ok(0) => std::thread::sleep(LOG_POLL),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!("slot log ring of target {id}: {e}");
                            break;
                        }
                    }
                }
                records
            })?;

        let mut responder = Responder {
            commands: region.consumer_for(hypercall::discovery::RingKind::Command, 0)?,
            replies: region.producer_for(hypercall::discovery::RingKind::CommandReply, 0)?,
            scratch: vec![0u8; 1 << 20],
        };
        let stop = Arc::new(vmm_sys_util::eventfd::EventFd::new(
            libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
        )?);
        let gone = Arc::new(AtomicBool::new(false));
        let (s, g, p, f) = (
            stop.clone(),
            gone.clone(),
            pager.clone(),
            final_seen.clone(),
        );
        let link_fd = link.frontend().as_raw_fd();
        let watch = std::thread::Builder::new()
            .name("kvmi-slot-watch".into())
            .spawn(move || {
                let _ = vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service);
                if !wait_for_hangup(link_fd, &s) {
                    return;
                }
                g.store(true, Ordering::SeqCst);
                tracing::info!(target_id = id, "the target's process closed its link");
                // Until the slot is closed, commands on its ring are refused here (nobody
                // else serves them now): an agent waiting for a reply is not left hanging.
                // The agent may still read the target's pages for its final summary (the
                // slot turns ending); then every grant goes.
                let deadline = std::time::Instant::now() + crate::fleet::FINAL_GRACE;
                let mut retired = false;
                loop {
                    if let Err(e) = responder.refuse_all() {
                        tracing::warn!("command ring of target {id}: {e}");
                    }
                    if !retired
                        && (f.load(Ordering::SeqCst) || std::time::Instant::now() >= deadline)
                    {
                        let revoked = p.retire();
                        tracing::info!(target_id = id, revoked, "grants revoked");
                        retired = true;
                    }
                    if wait_readable(&s, Duration::from_millis(2)) {
                        break;
                    }
                }
            })?;
        Ok(ApplianceSlot {
            _link: link,
            pager,
            waker: crate::rings::Waker::doorbell(kick),
            stop,
            log_stop,
            log: Some(log),
            watch: Some(watch),
            gone,
            final_seen,
        })
    }

    /// The slot's pager (the hook's route).
    pub fn pager(&self) -> &Arc<crate::pager::Pager> {
        &self.pager
    }

    /// The slot's NOTIFY (the hook's route): rings the target's doorbell.
    pub fn waker(&self) -> crate::rings::Waker {
        self.waker.clone()
    }

    /// True once the target's process closed its end of the link (its pages are revoked).
    pub fn is_gone(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// True once the agent's final summary for the target came through the log ring.
    pub fn final_seen(&self) -> bool {
        self.final_seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends the slot: the log ring is drained once more and its thread ends, the pager is
    /// retired (pages revoked), the link closes (the target's process detaches the
    /// appliance). Returns the log records printed.
    pub fn close(mut self) -> u64 {
        self.finish()
    }

    fn finish(&mut self) -> u64 {
        let _ = self.stop.write(1);
        if let Some(watch) = self.watch.take() {
            let _ = watch.join();
        }
        self.log_stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let records = self.log.take().map_or(0, |log| log.join().unwrap_or(0));
        self.pager.retire();
        records
    }
}

impl Drop for ApplianceSlot {
    fn drop(&mut self) {
        if self.log.is_some() || self.watch.is_some() {
            let _ = self.finish();
        }
    }
}

/// How often the appliance process looks at a slot's log ring when it was empty.
const LOG_POLL: Duration = Duration::from_millis(2);

/// Answers the commands of a slot whose target's process is gone: each with `-KVM_ENOENT`
/// under its own id and sequence number.
struct Responder {
    commands: hypercall::ring::Consumer<RingMemory>,
    replies: hypercall::ring::Producer<RingMemory>,
    scratch: Vec<u8>,
}

impl Responder {
    /// Refuses every command on the ring now; returns how many. A record that is no
    /// message is dropped (the agent's words are untrusted); a full reply ring drops the
    /// reply (the agent's own wait then ends on the slot's state).
    fn refuse_all(&mut self) -> Result<usize, hypercall::ring::RingError> {
        use protocol::wire::WireProfile;
        let replies = &mut self.replies;
        self.commands.drain(
            &mut self.scratch,
            &hypercall::ring::NoNotify,
            &mut |record: &[u8]| {
                let Ok(frame) = protocol::V4::parse_frame(record) else {
                    return;
                };
                let mut reply = [0u8; 16];
                if let Ok(n) = protocol::V4::encode_error_reply(
                    frame.header.id,
                    frame.header.seq,
                    protocol::ErrorCode::NoEnt,
                    &mut reply,
                ) {
                    let _ = replies.try_push(&reply[..n]);
                }
            },
        )
    }
}

/// Whether `fd` turns readable within `timeout`.
fn wait_readable(fd: &vmm_sys_util::eventfd::EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is one valid pollfd for the call; the eventfd outlives it (borrowed).
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Waits until the socket `fd` is hung up by its peer (true) or `stop` is readable (false).
fn wait_for_hangup(fd: i32, stop: &vmm_sys_util::eventfd::EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the call; the descriptors are the
        // link's socket (owned by the slot, which joins this thread before closing it) and the
        // stop eventfd (kept alive by the Arc this thread holds).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
        {
            return true;
        }
    }
}
