//! A VM: guest RAM, the loaded image, boot state, vCPU threads, and the run with its limits.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypercall::boot::BootInfo;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};

use crate::devices::{Devices, SerialSink, UnknownIoPolicy};
use crate::dispatch::Dispatcher;
use crate::error::VmError;
use crate::hook::{ExitHook, NoHook};
use crate::kick::{VcpuControl, install_kick_handler};
use crate::layout::{write_boot_info, write_boot_tables};
use crate::loader::{LoadedImage, load_image};
use crate::memory::GuestRam;
use crate::outcome::RunOutcome;
use crate::vcpu::{PreparedVcpu, create_vcpu, spawn_vcpu_thread};

/// Most vCPUs a VM may have here.
pub const MAX_VCPUS: u32 = 64;
/// How long `wait` keeps kicking vCPUs that do not stop before it gives up joining them.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Poll interval of `wait` for the interrupt flag and re-kicks.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name of the memfd (shows in /proc/PID/fd).
    pub name: String,
    /// Guest RAM in bytes (multiple of 4 KiB, at least 2 MiB).
    pub memory_bytes: u64,
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u32,
    /// The guest command line (`key=value` words).
    pub cmdline: String,
    /// What to do with I/O no device claims.
    pub unknown_io: UnknownIoPolicy,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "guest-ram".to_string(),
            memory_bytes: 64 << 20,
            vcpus: 1,
            cmdline: String::new(),
            unknown_io: UnknownIoPolicy::Ignore,
        }
    }
}

/// Limits of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunLimits {
    /// Wall-clock limit; on expiry every vCPU is kicked and the run ends TimedOut.
    pub timeout: Option<Duration>,
    /// A flag (e.g. set by a SIGINT handler) that ends the run as Interrupted.
    pub interrupt: Option<&'static AtomicBool>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: RunOutcome,
    /// Wall-clock time from start to the end of the last vCPU.
    pub elapsed: Duration,
    /// Exits handled per vCPU.
    pub exits: Vec<u64>,
    /// vCPU threads that did not stop within the grace period (left detached).
    pub stuck_vcpus: u32,
}

/// A built VM, ready to start.
pub struct Vm {
    // vCPUs first: dropped before the VM fd and RAM.
    vcpus: Vec<PreparedVcpu>,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    image: LoadedImage,
    boot_info: BootInfo,
    config: VmConfig,
    hook: Arc<dyn ExitHook>,
    serial: SerialSink,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("image", &self.image)
            .finish()
    }
}

impl Vm {
    /// Builds a VM from `image` (a static ELF per `hypercall::boot`): RAM memfd as slot 0,
    /// image loaded, boot tables and BootInfo written, vCPUs created in the entry state.
    pub fn new(config: VmConfig, image: &[u8]) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "vCPU count {} must be 1..={MAX_VCPUS}",
                config.vcpus
            )));
        }
        if config.memory_bytes < (2 << 20) {
            return Err(VmError::Config(format!(
                "guest RAM {:#x} is below the 2 MiB minimum",
                config.memory_bytes
            )));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::kvm("create VM"))?;
        let ram = GuestRam::new(&config.name, config.memory_bytes)?;
        ram.register(&fd, 0)?;
        let loaded = load_image(&ram, image)?;
        write_boot_tables(&ram)?;
        let boot_info = write_boot_info(&ram, config.vcpus, loaded.end, &config.cmdline)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::kvm("get supported CPUID"))?;
        let vcpus = (0..config.vcpus)
            .map(|i| create_vcpu(&fd, &supported, i, loaded.entry))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(
            entry = format_args!("{:#x}", loaded.entry),
            image_end = format_args!("{:#x}", loaded.end),
            vcpus = config.vcpus,
            ram_mib = config.memory_bytes >> 20,
            "VM built"
        );
        Ok(Vm {
            vcpus,
            fd: Arc::new(fd),
            ram: Arc::new(ram),
            image: loaded,
            boot_info,
            config,
            hook: Arc::new(NoHook),
            serial: SerialSink::Stdout,
        })
    }

    /// Guest RAM (memfd-backed; see [`GuestRam`]).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM fd (memslots, MSR filter, ioeventfds).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Where the loader put the image.
    pub fn image(&self) -> LoadedImage {
        self.image
    }

    /// The BootInfo record written for the guest.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot_info
    }

    /// The vCPUs (before start), e.g. to set guest debug state.
    pub fn vcpus_mut(&mut self) -> &mut [PreparedVcpu] {
        &mut self.vcpus
    }

    /// Installs the exit hook (default: [`NoHook`]).
    pub fn set_hook(&mut self, hook: Arc<dyn ExitHook>) {
        self.hook = hook;
    }

    /// Sets where serial output goes (default: stdout).
    pub fn set_serial(&mut self, sink: SerialSink) {
        self.serial = sink;
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, VmError> {
        install_kick_handler();
        let n = self.vcpus.len();
        let shared = Arc::new(RunShared {
            outcome: Mutex::new(None),
            changed: Condvar::new(),
            live: AtomicU32::new(n as u32),
            controls: (0..n).map(|_| Arc::new(VcpuControl::new())).collect(),
        });
        let exits: Arc<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let dispatcher = Arc::new(Dispatcher {
            devices: Devices::new(self.serial),
            hook: self.hook,
            policy: self.config.unknown_io,
            ram: self.ram.clone(),
            doorbell_warned: AtomicBool::new(false),
        });
        let started = Instant::now();
        let mut threads = Vec::with_capacity(n);
        for vcpu in self.vcpus {
            let control = shared.controls[vcpu.index as usize].clone();
            let s = shared.clone();
            let spawned = spawn_vcpu_thread(
                vcpu,
                control,
                dispatcher.clone(),
                exits.clone(),
                move |ending| {
                    if let Some(o) = ending {
                        s.finish(o);
                    }
                    s.vcpu_done();
                },
            );
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.finish(RunOutcome::Interrupted);
                    shared.live.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(RunningVm {
            shared,
            threads,
            started,
            exits,
            _fd: self.fd,
            _ram: self.ram,
        })
    }

    /// Starts the VM and waits for its end within `limits`.
    pub fn run(self, limits: RunLimits) -> Result<RunReport, VmError> {
        Ok(self.start()?.wait(limits))
    }
}

/// State shared by the vCPU threads and the waiter.
struct RunShared {
    outcome: Mutex<Option<RunOutcome>>,
    changed: Condvar,
    live: AtomicU32,
    controls: Vec<Arc<VcpuControl>>,
}

impl RunShared {
    /// Records the run's ending (the first one wins) and stops every vCPU.
    fn finish(&self, outcome: RunOutcome) {
        {
            let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                tracing::debug!("run ends: {outcome}");
                *slot = Some(outcome);
            }
        }
        for c in &self.controls {
            c.stop();
        }
        self.changed.notify_all();
    }

    fn vcpu_done(&self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        let _guard = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    fn has_outcome(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// A handle to control a running VM from other threads.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<RunShared>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("vcpus", &self.shared.controls.len())
            .finish()
    }
}

impl VmHandle {
    /// Ends the run as [`RunOutcome::Interrupted`] (unless it already ended).
    pub fn stop(&self) {
        self.shared.finish(RunOutcome::Interrupted);
    }

    /// Ends the run with `outcome` (unless it already ended).
    pub fn stop_with(&self, outcome: RunOutcome) {
        self.shared.finish(outcome);
    }

    /// The control block of vCPU `index` (kick, pause, resume).
    pub fn vcpu(&self, index: u32) -> Option<&Arc<VcpuControl>> {
        self.shared.controls.get(index as usize)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.shared.controls.len() as u32
    }
}

/// A VM whose vCPU threads are running.
pub struct RunningVm {
    shared: Arc<RunShared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
    exits: Arc<[AtomicU64]>,
    _fd: Arc<VmFd>,
    _ram: Arc<GuestRam>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.threads.len())
            .finish()
    }
}

impl RunningVm {
    /// A cloneable control handle.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }

    /// Waits until the run ends: a vCPU's terminal exit, every vCPU halted, the timeout, the
    /// interrupt flag, or [`VmHandle::stop`]. Never blocks on a guest: vCPUs that do not stop
    /// are kicked again, and after a grace period left behind (counted in the report).
    pub fn wait(self, limits: RunLimits) -> RunReport {
        let deadline = limits.timeout.map(|t| self.started + t);
        let mut stopping_since: Option<Instant> = None;
        loop {
            if self.shared.live.load(Ordering::SeqCst) == 0 {
                break;
            }
            let now = Instant::now();
            if limits.interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) {
                self.shared.finish(RunOutcome::Interrupted);
            }
            if let (Some(d), Some(t)) = (deadline, limits.timeout)
                && now >= d
            {
                self.shared.finish(RunOutcome::TimedOut { after: t });
            }
            if self.shared.has_outcome() {
                let since = *stopping_since.get_or_insert(now);
                if now.duration_since(since) > STOP_GRACE {
                    tracing::error!("vCPU threads did not stop; leaving them behind");
                    break;
                }
                for c in &self.shared.controls {
                    c.stop();
                }
            }
            let mut slice = WAIT_SLICE;
            if let Some(d) = deadline {
                slice = slice.min(d.saturating_duration_since(now));
            }
            let guard = self
                .shared
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if self.shared.live.load(Ordering::SeqCst) == 0 {
                break;
            }
            drop(
                self.shared
                    .changed
                    .wait_timeout(guard, slice.max(Duration::from_millis(1)))
                    .unwrap_or_else(|p| p.into_inner()),
            );
        }
        let elapsed = self.started.elapsed();
        let stuck = self.shared.live.load(Ordering::SeqCst);
        if stuck == 0 {
            for t in self.threads {
                let _ = t.join();
            }
        }
        let outcome = self
            .shared
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(RunOutcome::AllHalted);
        RunReport {
            outcome,
            elapsed,
            exits: self
                .exits
                .iter()
                .map(|e| e.load(Ordering::Relaxed))
                .collect(),
            stuck_vcpus: stuck,
        }
    }
}

/// Builds and runs a VM to its end: the one-call API for tools and tests.
pub fn run_image(
    config: VmConfig,
    image: &[u8],
    serial: SerialSink,
    limits: RunLimits,
) -> Result<RunReport, VmError> {
    let mut vm = Vm::new(config, image)?;
    vm.set_serial(serial);
    vm.run(limits)
}
