//! Booting a target and its appliance VM in one shim process, wired together: the ring
//! region and the map window in the appliance's physical address space (recorded in its
//! BootInfo), the ring service attached to the target's introspector, the page calls served
//! by the appliance's exit hook, and everything revoked when either side ends.
//!
//! A watcher thread supervises the appliance: when it ends (exit, crash) or is detached
//! (reply timeout, corrupt ring, protocol error) while the target runs, its grants are
//! revoked, its VM stopped, and — while [`ApplianceConfig::restarts`] remain — a fresh
//! appliance VM with a fresh ring region and window is booted and attached (the engine
//! unhooked the target at the detach, so the new agent sets up its own events). With no
//! restart left the target runs on, unhooked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use hypercall::discovery::Features;
use hypercall::ring::{LayoutParams, RingSizes};

use super::hook::{ApplianceHook, SERVED_FEATURES};
use super::pager::{Pager, PagerStats, hand_out_key};
use super::rings::{LogSink, RingService, ServiceEnd, create_region};
use kvmi_engine::lock_order;
use kvmi_engine::{IntrospectError, Introspector, IntrospectorConfig};
use vmm::devices::SerialSink;
use vmm::running::RunningVm;
use vmm::sync::RankedMutex;
use vmm::vm::{RunLimits, RunReport, Vm, VmConfig};
use vmm::{GuestRam, VmError, window::RemapWindow};

/// Guest-physical address of the ring region in the appliance (3 GiB: above any appliance
/// RAM this shim accepts, inside the 4 GiB boot identity map).
pub const RING_REGION_GPA: u64 = 0xC000_0000;
/// Guest-physical address of the map window in the appliance (3 GiB + 16 MiB).
pub const MAP_WINDOW_GPA: u64 = 0xC100_0000;
/// Default size of the map window (64 MiB).
pub const DEFAULT_WINDOW_SIZE: u64 = 64 << 20;

/// How to build the appliance VM.
pub struct ApplianceConfig {
    /// The appliance VM (image, RAM, vCPUs, command line).
    pub vm: VmConfig,
    /// The appliance image (a static ELF per `hypercall::boot`).
    pub image: Vec<u8>,
    /// Where the appliance's serial output goes.
    pub serial: SerialSink,
    /// Where the log ring's records go.
    pub log: LogSink,
    /// Size of the map window (page multiple, at most 256 MiB here).
    pub window_size: u64,
    /// Ring sizes.
    pub sizes: RingSizes,
    /// How long a full ring may block a vCPU before the appliance is declared dead.
    pub full_timeout: Duration,
    /// How many times a fresh appliance VM is booted and attached when the current one ends
    /// or is detached (crash, exit, reply timeout, corrupt ring) while the target runs.
    pub restarts: u32,
}

impl std::fmt::Debug for ApplianceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplianceConfig")
            .field("vm", &self.vm)
            .field("window_size", &self.window_size)
            .field("restarts", &self.restarts)
            .finish()
    }
}

fn vm_err(e: impl std::fmt::Display) -> IntrospectError {
    IntrospectError::Io {
        what: "setting up the appliance".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// One appliance VM attached to the target's introspector.
struct Attached {
    appliance: RunningVm,
    service: Arc<RingService>,
    pager: Arc<Pager>,
}

/// What ended appliances left behind.
#[derive(Default)]
struct Ended {
    /// The last ended appliance's run and why its service ended.
    last: Option<(RunReport, ServiceEnd)>,
    /// Page counters of every ended appliance.
    pages: PagerStats,
}

/// Boots appliances for one target and replaces an ended one while restarts remain.
struct Supervisor {
    introspector: Arc<Introspector>,
    target_ram: Arc<vmm::memory::GuestRam>,
    target_vcpus: u32,
    vm: VmConfig,
    image: Vec<u8>,
    serial: SerialSink,
    log: Arc<RankedMutex<LogSink>>,
    window_size: u64,
    sizes: RingSizes,
    full_timeout: Duration,
    restarts_left: AtomicU32,
    restarts: AtomicU32,
    current: RankedMutex<Option<Attached>>,
    ended: RankedMutex<Ended>,
}

impl Supervisor {
    /// Builds an appliance VM (ring region, map window), attaches its ring service to the
    /// introspector and starts it.
    fn boot(&self) -> Result<Attached, IntrospectError> {
        let params = LayoutParams {
            vcpu_count: self.target_vcpus,
            sizes: self.sizes,
            features: SERVED_FEATURES,
            map_window_gpa: MAP_WINDOW_GPA,
            map_window_size: self.window_size,
        };
        params.validate().map_err(vm_err)?;
        let ring_size = params.region_size().next_multiple_of(4096);
        if RING_REGION_GPA + ring_size > MAP_WINDOW_GPA || self.window_size > 256 << 20 {
            return Err(vm_err("ring region or map window too large"));
        }
        let mut vm = Vm::new(self.vm.clone(), &self.image)?;
        vm.set_serial(self.serial.try_clone().map_err(vm_err)?);
        let (ring_ram, window) = add_appliance_regions(&mut vm, ring_size, self.window_size)?;
        let region = create_region(ring_ram, &params).map_err(vm_err)?;
        let log = self.log.clone();
        let sink: LogSink = Box::new(move |record: &[u8]| (log.lock())(record));
        // The supervisor's step: a fresh key for this appliance's pager and the target's
        // engine (tokens issued to an earlier appliance are dead), before the agent can ask.
        let verifier = hand_out_key(&self.introspector).map_err(vm_err)?;
        let service = Arc::new(
            RingService::start(self.introspector.clone(), &region, sink, self.full_timeout)
                .map_err(vm_err)?,
        );
        let pager = Arc::new(Pager::new(
            verifier,
            self.target_ram.clone(),
            Vec::new(),
            window,
            MAP_WINDOW_GPA,
        ));
        vm.set_hook(Arc::new(ApplianceHook::new(pager.clone(), service.waker())));
        match vm.start() {
            Ok(appliance) => Ok(Attached {
                appliance,
                service,
                pager,
            }),
            Err(e) => {
                pager.retire();
                let _ = service.stop();
                self.introspector
                    .detach(service.generation(), "the appliance VM did not start");
                Err(e.into())
            }
        }
    }

    /// Detaches `att`, revokes its grants, stops its VM and records how it ended.
    fn retire(&self, att: Attached, why: &str) -> usize {
        let revoked = att.pager.retire();
        let service = att.service.stop();
        self.introspector.detach(att.service.generation(), why);
        att.appliance.handle().stop();
        let report = att.appliance.wait(RunLimits {
            timeout: Some(APPLIANCE_GRACE),
            interrupt: None,
        });
        let mut ended = self.ended.lock();
        ended.pages = ended.pages.plus(att.pager.stats());
        ended.last = Some((report, service));
        revoked
    }

    /// One look at the current appliance: when it ended or was detached, retire it and boot
    /// the next one if restarts remain.
    fn check(&self) {
        let mut current = self.current.lock();
        let mut vm_ended = false;
        let Some(att) = current.take_if(|att| {
            vm_ended = att.appliance.handle().has_ended();
            vm_ended || att.service.has_ended()
        }) else {
            return;
        };
        let why = if vm_ended {
            "the appliance VM ended"
        } else {
            "the appliance was detached"
        };
        self.retire(att, why);
        let outcome = self
            .ended
            .lock()
            .last
            .as_ref()
            .map(|(r, s)| format!("{}; rings {s:?}", r.outcome))
            .unwrap_or_default();
        let left = self.restarts_left.load(Ordering::SeqCst);
        if left == 0 {
            vmm::devices::eprint_line(format_args!(
                "kvmi: {why} ({outcome}); the target runs on, unhooked"
            ));
            return;
        }
        self.restarts_left.store(left - 1, Ordering::SeqCst);
        let n = self.restarts.fetch_add(1, Ordering::SeqCst) + 1;
        match self.boot() {
            Ok(next) => {
                vmm::devices::eprint_line(format_args!(
                    "kvmi: {why} ({outcome}); started appliance #{n}"
                ));
                *current = Some(next);
            }
            Err(e) => vmm::devices::eprint_line(format_args!(
                "kvmi: {why} ({outcome}); restarting it failed: {e}; the target runs on, unhooked"
            )),
        }
    }
}

/// A target and its appliance, running.
pub struct ApplianceRun {
    /// The target VM.
    pub target: RunningVm,
    /// The target's introspector (the appliance is its tool).
    pub introspector: Arc<Introspector>,
    supervisor: Arc<Supervisor>,
    watch_stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApplianceRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplianceRun")
            .field("restarts", &self.restarts())
            .finish()
    }
}

/// What the run did.
#[derive(Debug)]
pub struct ApplianceReport {
    /// The target's run.
    pub target: RunReport,
    /// The last appliance's run.
    pub appliance: Option<RunReport>,
    /// Why the last appliance's ring service ended.
    pub service: ServiceEnd,
    /// Page-call counters of every appliance of the run.
    pub pages: PagerStats,
    /// Pages revoked when the target ended.
    pub revoked_at_end: usize,
    /// Appliances booted after the first.
    pub restarts: u32,
}

/// Starts `target` with an introspector and the appliance VM of `config` as its tool.
pub fn start_with_appliance(
    mut target: Vm,
    intro_config: IntrospectorConfig,
    config: ApplianceConfig,
) -> Result<ApplianceRun, IntrospectError> {
    let caps = vmm::probe::cached_capabilities().map_err(vm_err)?;
    let introspector = Introspector::install(&mut target, caps, intro_config)?;
    start_installed(target, introspector, config)
}

/// [`start_with_appliance`] for a target whose introspector is already installed (its exit
/// hook may have been wrapped since, e.g. by a benchmark timing the exits).
pub fn start_installed(
    target: Vm,
    introspector: Arc<Introspector>,
    config: ApplianceConfig,
) -> Result<ApplianceRun, IntrospectError> {
    let supervisor = Arc::new(Supervisor {
        introspector: introspector.clone(),
        target_ram: target.ram().clone(),
        target_vcpus: target.boot_info().vcpu_count,
        vm: config.vm,
        image: config.image,
        serial: config.serial,
        log: Arc::new(RankedMutex::new(lock_order::APPLIANCE_LOG, config.log)),
        window_size: config.window_size,
        sizes: config.sizes,
        full_timeout: config.full_timeout,
        restarts_left: AtomicU32::new(config.restarts),
        restarts: AtomicU32::new(0),
        current: RankedMutex::new(lock_order::APPLIANCE_CURRENT, None),
        ended: RankedMutex::new(lock_order::APPLIANCE_ENDED, Ended::default()),
    });
    // The appliance attaches first (its rings are ready before the target's first event).
    let first = supervisor.boot()?;
    let target = match target.start() {
        Ok(t) => t,
        Err(e) => {
            supervisor.retire(first, "the target did not start");
            return Err(e.into());
        }
    };
    introspector.set_handle(target.handle());
    *supervisor.current.lock() = Some(first);
    // Watch the appliance: when it ends or is detached first, revoke its grants and boot the
    // next one while restarts remain; else the target runs on, unhooked.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let (ws, th, sup) = (watch_stop.clone(), target.handle(), supervisor.clone());
    let watcher = std::thread::Builder::new()
        .name("kvmi-appliance-watch".into())
        .spawn(move || {
            while !ws.load(Ordering::SeqCst) && !th.has_ended() {
                sup.check();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .ok();
    Ok(ApplianceRun {
        target,
        introspector,
        supervisor,
        watch_stop,
        watcher,
    })
}

/// How long the appliance gets to end after the target did.
const APPLIANCE_GRACE: Duration = Duration::from_secs(2);

impl ApplianceRun {
    /// Appliances booted after the first so far.
    pub fn restarts(&self) -> u32 {
        self.supervisor.restarts.load(Ordering::SeqCst)
    }

    /// True when no appliance is attached or running any more (the current one ended and no
    /// restart is left).
    pub fn appliance_gone(&self) -> bool {
        self.supervisor.check();
        self.supervisor.current.lock().is_none()
    }

    /// Waits for the target's end within `limits`, then revokes every mapping, detaches and
    /// stops the appliance.
    pub fn wait(mut self, limits: RunLimits) -> ApplianceReport {
        let target = self.target.wait(limits);
        self.watch_stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let current = self.supervisor.current.lock().take();
        let revoked_at_end = current
            .map(|att| self.supervisor.retire(att, "the target ended"))
            .unwrap_or(0);
        let ended = std::mem::take(&mut *self.supervisor.ended.lock());
        // An appliance was booted before the target started, and every one is retired by
        // now, so `last` is always there.
        let (appliance, service) = ended
            .last
            .map_or((None, ServiceEnd::Stopped), |(r, s)| (Some(r), s));
        ApplianceReport {
            target,
            appliance,
            service,
            pages: ended.pages,
            revoked_at_end,
            restarts: self.supervisor.restarts.load(Ordering::SeqCst),
        }
    }
}

/// The features an appliance of this shim sees (re-exported for tools).
pub fn served_features() -> Features {
    SERVED_FEATURES
}

/// Adds the appliance VM's ring region (at [`RING_REGION_GPA`]) and map window (at
/// [`MAP_WINDOW_GPA`]) to `vm` and records both in its boot record, where the agent's
/// discovery finds them.
pub fn add_appliance_regions(
    vm: &mut Vm,
    ring_size: u64,
    window_size: u64,
) -> Result<(Arc<GuestRam>, Arc<RemapWindow>), VmError> {
    let ring = vm.add_shared_region("kvmi-ring-region", RING_REGION_GPA, ring_size)?;
    let window = vm.add_remap_window(MAP_WINDOW_GPA, window_size)?;
    vm.update_boot_info(|boot| {
        boot.ring_region_gpa = RING_REGION_GPA;
        boot.ring_region_size = ring_size;
        boot.map_window_gpa = MAP_WINDOW_GPA;
        boot.map_window_size = window_size;
    })?;
    Ok((ring, window))
}
