//! The benchmarks' runs with the agent inside the appliance VM: the embedded appliance image
//! in its `bench=` mode (images/appliance/src/bench.rs) against a target, wired as
//! `kvmi run --appliance` wires them. The image reports one JSON line on the log ring with
//! its spans in TSC cycles; [`TscClock`] converts them with the rate the host measures over
//! the same run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypercall::ring::RingSizes;
use serde::Deserialize;

use appliance_link::launch::{ApplianceConfig, start_installed};
use appliance_link::rings::DEFAULT_FULL_TIMEOUT;
use kvmi_engine::{Introspector, IntrospectorConfig};
use vmm::devices::{SerialSink, SharedBuffer, UnknownIoPolicy};
use vmm::hook::{DebugEvent, ExitContext, ExitHook, HookResult, MmioAccess, MsrAccess, PioAccess};
use vmm::vm::{RunLimits, Vm, VmConfig};

/// The time-stamp counter against the monotonic clock, from [`TscClock::start`] to now.
pub(super) struct TscClock {
    at: Instant,
    tsc: u64,
}

fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl TscClock {
    /// Starts measuring.
    pub(super) fn start() -> Self {
        TscClock {
            at: Instant::now(),
            tsc: rdtsc(),
        }
    }

    /// Cycles per second since the start (the guest's TSC runs at the host's rate: the
    /// shim sets no TSC scaling).
    pub(super) fn hz(&self) -> f64 {
        let cycles = rdtsc().wrapping_sub(self.tsc) as f64;
        cycles / self.at.elapsed().as_secs_f64().max(1e-9)
    }
}

/// `cycles` at `hz` as a duration.
pub(super) fn cycles(cycles: u64, hz: f64) -> Duration {
    Duration::from_secs_f64(cycles as f64 / hz.max(1.0))
}

/// Passes every exit on to the real hook; records the time of each MMIO write first (the
/// write to the target's write-protected page, as the floor's hook does).
pub(super) struct TimingHook {
    inner: Arc<dyn ExitHook>,
    /// When each MMIO write exit arrived.
    pub(super) times: Mutex<Vec<Instant>>,
}

impl TimingHook {
    pub(super) fn new(inner: Arc<dyn ExitHook>, capacity: usize) -> Self {
        TimingHook {
            inner,
            times: Mutex::new(Vec::with_capacity(capacity)),
        }
    }

    pub(super) fn take(&self) -> Vec<Instant> {
        std::mem::take(&mut *self.times.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ExitHook for TimingHook {
    fn pio(&self, ctx: &mut ExitContext<'_>, io: &mut PioAccess<'_>) -> HookResult {
        self.inner.pio(ctx, io)
    }
    fn hypercall(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        self.inner.hypercall(ctx)
    }
    fn mmio(&self, ctx: &mut ExitContext<'_>, io: &mut MmioAccess<'_>) -> HookResult {
        if io.write {
            self.times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now());
        }
        self.inner.mmio(ctx, io)
    }
    fn debug(&self, ctx: &mut ExitContext<'_>, event: &DebugEvent) -> HookResult {
        self.inner.debug(ctx, event)
    }
    fn msr(&self, ctx: &mut ExitContext<'_>, msr: &mut MsrAccess<'_>) -> HookResult {
        self.inner.msr(ctx, msr)
    }
    fn memory_fault(&self, ctx: &mut ExitContext<'_>, gpa: u64, size: u64) -> HookResult {
        self.inner.memory_fault(ctx, gpa, size)
    }
    fn emulation_failure(&self, ctx: &mut ExitContext<'_>, insn: &[u8]) -> HookResult {
        self.inner.emulation_failure(ctx, insn)
    }
    fn vcpu_start(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        self.inner.vcpu_start(ctx)
    }
    fn halted(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        self.inner.halted(ctx)
    }
    fn vcpu_exit(&self, index: u32) {
        self.inner.vcpu_exit(index)
    }
    fn kicked(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        self.inner.kicked(ctx)
    }
}

/// The `bench=events` result line.
#[derive(Clone, Copy, Debug, Deserialize)]
pub(super) struct EventsLine {
    /// Events the agent handled.
    pub(super) events: u64,
    /// Replies it sent.
    pub(super) replies: u64,
    /// Times it armed the wake words and slept.
    pub(super) sleeps: u64,
    /// TSC cycles from opening the gate to the last reply.
    pub(super) cycles: u64,
}

/// The `bench=read` result line.
#[derive(Clone, Copy, Debug, Deserialize)]
pub(super) struct ReadLine {
    /// Bytes mapped and read.
    pub(super) bytes: u64,
    /// MAP_RANGE calls (one token each).
    pub(super) map_calls: u64,
    /// Cycles to get the tokens and map everything.
    pub(super) map_cycles: u64,
    /// Of which getting the tokens (GET_MAP_TOKEN on the command ring).
    pub(super) token_cycles: u64,
    /// Cycles of the first read (first touch of every page).
    pub(super) read_cycles: u64,
    /// Cycles of the second read.
    pub(super) reread_cycles: u64,
    /// [`guest_driver::content_checksum`] of the first read.
    pub(super) checksum: u64,
    /// The same of the second read.
    pub(super) checksum_again: u64,
}

/// What an appliance-VM run produced.
pub(super) struct VmRun<T> {
    /// The result line.
    pub(super) line: T,
    /// The host's TSC rate over the run.
    pub(super) tsc_hz: f64,
}

const LIMITS: RunLimits = RunLimits {
    timeout: Some(Duration::from_secs(120)),
    interrupt: None,
};

/// How the target of a [`run`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TargetEnd {
    /// By itself, with status 0 (checked).
    Exits,
    /// It runs forever: stopped once the appliance has ended.
    Stopped,
}

/// Runs `target` (built, not started) with the appliance image in `bench=` mode given by
/// `cmdline`, the target's exit hook wrapped by `wrap`; returns the image's result line of
/// type `T`.
pub(super) fn run<T: for<'de> Deserialize<'de>>(
    mut target: Vm,
    appliance_image: &[u8],
    cmdline: String,
    window_size: u64,
    end: TargetEnd,
    wrap: impl FnOnce(Arc<dyn ExitHook>) -> Arc<dyn ExitHook>,
) -> Result<VmRun<T>, String> {
    let caps = vmm::probe::cached_capabilities().map_err(|e| format!("probe: {e}"))?;
    let intro = Introspector::install(&mut target, caps, IntrospectorConfig::default())
        .map_err(|e| format!("introspector: {e}"))?;
    target.set_hook(wrap(target.hook()));
    let lines = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let sink = lines.clone();
    let serial = SharedBuffer::new();
    let config = ApplianceConfig {
        vm: VmConfig {
            name: "bench-appliance".into(),
            memory_bytes: 64 << 20,
            vcpus: 1,
            cmdline,
            unknown_io: UnknownIoPolicy::Ignore,
        },
        image: appliance_image.to_vec(),
        serial: SerialSink::Buffer(serial.clone()),
        log: Box::new(move |record: &[u8]| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(record.to_vec());
        }),
        window_size,
        sizes: RingSizes::default(),
        full_timeout: DEFAULT_FULL_TIMEOUT,
        restarts: 0,
    };
    let clock = TscClock::start();
    let run = start_installed(target, intro, config).map_err(|e| format!("start: {e}"))?;
    if end == TargetEnd::Stopped {
        let deadline = Instant::now() + LIMITS.timeout.unwrap_or_default();
        while !run.appliance_gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        run.target.handle().stop();
    }
    let report = run.wait(LIMITS);
    let tsc_hz = clock.hz();
    let lines = std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner()));
    let line = lines
        .iter()
        .find_map(|l| serde_json::from_slice::<T>(l).ok())
        .ok_or_else(|| {
            format!(
                "no result line from the appliance (target {}, appliance {}; serial: {})",
                report.target.outcome,
                report
                    .appliance
                    .as_ref()
                    .map_or("not run".to_string(), |r| r.outcome.to_string()),
                serial.text().trim()
            )
        })?;
    if end == TargetEnd::Exits && !report.target.outcome.is_success() {
        return Err(format!("target: {}", report.target.outcome));
    }
    Ok(VmRun { line, tsc_hz })
}

/// Times every MMIO write exit and drops it (the floor: the VMM alone handles the exit).
struct FloorHook(Mutex<Vec<Instant>>);

impl ExitHook for FloorHook {
    fn mmio(&self, _ctx: &mut ExitContext<'_>, io: &mut MmioAccess<'_>) -> HookResult {
        if io.write {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now());
            return HookResult::Handled;
        }
        HookResult::Unhandled
    }
}

/// The floor of a test-guest write loop: `vm` (gated on `gate`) runs with `page` read-only
/// and its write exits timed and dropped by the VMM; returns the exit times.
pub(super) fn floor_times(
    mut vm: Vm,
    page: u64,
    gate: u64,
    limits: RunLimits,
) -> Result<Vec<Instant>, String> {
    let hook = Arc::new(FloorHook(Mutex::new(Vec::new())));
    vm.set_hook(hook.clone());
    let ram = vm.ram().clone();
    ram.write(gate, &1u64.to_le_bytes())
        .and_then(|()| ram.protect(page, 4096, libc::PROT_READ))
        .map_err(|e| format!("floor setup: {e}"))?;
    let report = vm.run(limits).map_err(|e| format!("floor run: {e}"))?;
    if !report.outcome.is_success() {
        return Err(format!("floor run: {}", report.outcome));
    }
    Ok(std::mem::take(
        &mut *hook.0.lock().unwrap_or_else(|p| p.into_inner()),
    ))
}
