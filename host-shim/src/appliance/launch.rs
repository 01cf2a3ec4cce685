//! Booting a target and its appliance VM in one shim process, wired together: the ring
//! region and the map window in the appliance's physical address space (recorded in its
//! BootInfo), the ring service attached to the target's introspector, the page calls served
//! by the appliance's exit hook, and everything revoked when either side ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use hypercall::discovery::Features;
use hypercall::ring::{LayoutParams, Region, RingSizes};

use super::hook::{ApplianceHook, SERVED_FEATURES};
use super::pager::{Pager, PagerStats};
use super::rings::{LogSink, RingMemory, RingService, ServiceEnd, create_region};
use crate::devices::SerialSink;
use crate::introspect::{IntrospectError, Introspector, IntrospectorConfig};
use crate::running::RunningVm;
use crate::vm::{RunLimits, RunReport, Vm, VmConfig};
use crate::window::RemapWindow;

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
}

impl std::fmt::Debug for ApplianceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplianceConfig")
            .field("vm", &self.vm)
            .field("window_size", &self.window_size)
            .finish()
    }
}

fn vm_err(e: impl std::fmt::Display) -> IntrospectError {
    IntrospectError::Io {
        what: "setting up the appliance".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A target and its appliance, running.
pub struct ApplianceRun {
    /// The target VM.
    pub target: RunningVm,
    /// The appliance VM.
    pub appliance: RunningVm,
    /// The target's introspector (the appliance is its tool).
    pub introspector: Arc<Introspector>,
    /// The ring service.
    pub service: Arc<RingService>,
    /// The page-call server.
    pub pager: Arc<Pager>,
    /// The appliance's exit hook.
    pub hook: Arc<ApplianceHook>,
    watch_stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApplianceRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplianceRun")
            .field("pager", &self.pager)
            .finish()
    }
}

/// What the run did.
#[derive(Debug)]
pub struct ApplianceReport {
    /// The target's run.
    pub target: RunReport,
    /// The appliance's run.
    pub appliance: RunReport,
    /// Why the ring service ended.
    pub service: ServiceEnd,
    /// Page-call counters.
    pub pages: PagerStats,
    /// Pages revoked at the end.
    pub revoked_at_end: usize,
}

/// The appliance VM before start, with its ring region and map window.
struct BuiltAppliance {
    vm: Vm,
    region: Region<RingMemory>,
    window: Arc<RemapWindow>,
    log: LogSink,
    full_timeout: Duration,
}

/// Builds the appliance VM for a target of `target_vcpus` vCPUs: the ring region laid out
/// and the map window reserved.
fn build_appliance(
    config: ApplianceConfig,
    target_vcpus: u32,
) -> Result<BuiltAppliance, IntrospectError> {
    let params = LayoutParams {
        vcpu_count: target_vcpus,
        sizes: config.sizes,
        features: SERVED_FEATURES,
        map_window_gpa: MAP_WINDOW_GPA,
        map_window_size: config.window_size,
    };
    params.validate().map_err(vm_err)?;
    let ring_size = params.region_size().next_multiple_of(4096);
    if RING_REGION_GPA + ring_size > MAP_WINDOW_GPA || config.window_size > 256 << 20 {
        return Err(vm_err("ring region or map window too large"));
    }
    let mut vm = Vm::new(config.vm, &config.image)?;
    vm.set_serial(config.serial);
    let ring_ram = vm.add_ring_region(RING_REGION_GPA, ring_size)?;
    let window = vm.add_map_window(MAP_WINDOW_GPA, config.window_size)?;
    let region = create_region(ring_ram, &params).map_err(vm_err)?;
    Ok(BuiltAppliance {
        vm,
        region,
        window,
        log: config.log,
        full_timeout: config.full_timeout,
    })
}

/// Starts `target` with an introspector and the appliance VM of `config` as its tool.
pub fn start_with_appliance(
    mut target: Vm,
    intro_config: IntrospectorConfig,
    config: ApplianceConfig,
) -> Result<ApplianceRun, IntrospectError> {
    let caps = crate::probe::cached_capabilities().map_err(vm_err)?;
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
    let target_ram = target.ram().clone();
    let BuiltAppliance {
        vm: mut appliance,
        region,
        window,
        log,
        full_timeout,
    } = build_appliance(config, target.boot_info().vcpu_count)?;
    let service = Arc::new(
        RingService::start(introspector.clone(), &region, log, full_timeout).map_err(vm_err)?,
    );
    let pager = Arc::new(Pager::new(
        introspector.clone(),
        target_ram,
        Vec::new(),
        window,
        MAP_WINDOW_GPA,
    ));
    let hook = Arc::new(ApplianceHook::new(pager.clone(), service.waker()));
    appliance.set_hook(hook.clone());
    let target = target.start()?;
    introspector.set_handle(target.handle());
    let appliance = match appliance.start() {
        Ok(a) => a,
        Err(e) => {
            target.handle().stop();
            return Err(e.into());
        }
    };
    // Watch the appliance: when it ends first, detach it (the target runs on, unhooked) and
    // revoke its mappings.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let (ws, ah, th, svc, pg, intro) = (
        watch_stop.clone(),
        appliance.handle(),
        target.handle(),
        service.clone(),
        pager.clone(),
        introspector.clone(),
    );
    let watcher = std::thread::Builder::new()
        .name("kvmi-appliance-watch".into())
        .spawn(move || {
            while !ws.load(Ordering::SeqCst) {
                if ah.has_ended() && !th.has_ended() {
                    eprintln!("kvmi: the appliance VM ended; the target runs on, unhooked");
                    let _ = svc.stop();
                    intro.detach(svc.generation(), "the appliance VM ended");
                    pg.retire();
                    return;
                }
                if svc.has_ended() {
                    pg.retire();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .ok();
    Ok(ApplianceRun {
        target,
        appliance,
        introspector,
        service,
        pager,
        hook,
        watch_stop,
        watcher,
    })
}

/// How long the appliance gets to end after the target did.
const APPLIANCE_GRACE: Duration = Duration::from_secs(2);

impl ApplianceRun {
    /// Waits for the target's end within `limits`, then revokes every mapping, detaches and
    /// stops the appliance.
    pub fn wait(mut self, limits: RunLimits) -> ApplianceReport {
        let target = self.target.wait(limits);
        self.watch_stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let revoked_at_end = self.pager.retire();
        let service = self.service.stop();
        self.introspector
            .detach(self.service.generation(), "the target ended");
        self.appliance.handle().stop();
        let appliance = self.appliance.wait(RunLimits {
            timeout: Some(APPLIANCE_GRACE),
            interrupt: None,
        });
        ApplianceReport {
            target,
            appliance,
            service,
            pages: self.pager.stats(),
            revoked_at_end,
        }
    }
}

/// The features an appliance of this shim sees (re-exported for tools).
pub fn served_features() -> Features {
    SERVED_FEATURES
}
