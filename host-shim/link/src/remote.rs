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
use crate::vhost_link::{LinkError, RingShare, serve_target_end};

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
    link_fd: i32,
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
        let (
            RingShare {
                ring, len, kick, ..
            },
            mut handler,
        ) = serve_target_end(stream, &ram.memfd(), ram.size())?;
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
        let link_fd = handler.as_raw_fd();
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
            link_fd,
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
        // SAFETY: `link_fd` is the socket the link thread's handler owns; the thread is
        // joined below, so the descriptor is still open (and still that socket) here.
        // shutdown only ends the thread's blocking read.
        unsafe { libc::shutdown(self.link_fd, libc::SHUT_RDWR) };
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
