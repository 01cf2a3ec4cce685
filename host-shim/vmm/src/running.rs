//! A started VM: the vCPU threads' shared run state, the control handle, and the wait for the
//! run's end with its limits (timeout, interrupt flag, grace period for stuck vCPUs).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar};

use crate::sync::RankedMutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::dirty::DirtyLog;
use crate::error::VmError;
use crate::kick::{VcpuControl, VcpuState};
use crate::memory::GuestRam;
use crate::outcome::RunOutcome;
use crate::vm::{RunLimits, RunReport};
use crate::window::RemapWindow;

/// How long `wait` keeps kicking vCPUs that do not stop before it gives up joining them.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Poll interval of `wait` for the interrupt flag and re-kicks.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// State shared by the vCPU threads and the waiter.
pub(crate) struct RunShared {
    pub(crate) outcome: RankedMutex<Option<RunOutcome>>,
    pub(crate) changed: Condvar,
    pub(crate) live: AtomicU32,
    pub(crate) controls: Vec<Arc<VcpuControl>>,
    // The VM fd is declared (and dropped) before the RAM it maps.
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) ram: Arc<GuestRam>,
}

impl RunShared {
    /// Records the run's ending (the first one wins) and stops every vCPU.
    pub(crate) fn finish(&self, outcome: RunOutcome) {
        {
            let mut slot = self.outcome.lock();
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

    pub(crate) fn vcpu_done(&self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        let _guard = self.outcome.lock();
        self.changed.notify_all();
    }

    fn has_outcome(&self) -> bool {
        self.outcome.lock().is_some()
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

    /// Pauses every vCPU and waits (up to `timeout` each) until they are parked (or their
    /// threads have ended); true if all are. Guest RAM and the vCPUs' state are then stable
    /// for inspection.
    pub fn pause_all(&self, timeout: Duration) -> bool {
        for c in &self.shared.controls {
            c.pause();
        }
        self.shared.controls.iter().all(|c| c.wait_paused(timeout))
    }

    /// Whether every vCPU has a pause in force (someone paused the whole VM and has not
    /// resumed it).
    pub fn pause_requested_all(&self) -> bool {
        self.shared.controls.iter().all(|c| c.pause_requested())
    }

    /// Resumes every paused vCPU.
    pub fn resume_all(&self) {
        for c in &self.shared.controls {
            c.resume();
        }
    }

    /// Guest RAM (memslot 0 at guest-physical 0; [`GuestRam::memslot`] has its id and flags).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.shared.ram
    }

    /// The KVM VM fd.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.shared.vm_fd
    }

    /// Starts dirty logging of guest RAM (see [`crate::dirty`]); stopped when the returned
    /// log is dropped. [`VmError::Busy`] if another log is active.
    pub fn start_dirty_log(&self) -> Result<DirtyLog, VmError> {
        DirtyLog::start(self.shared.vm_fd.clone(), self.shared.ram.clone())
    }

    /// Each vCPU's registers as captured when it parked: `Some` for a paused vCPU (after
    /// [`VmHandle::pause_all`] returned true, until [`VmHandle::resume_all`]), `None` for one
    /// that runs or whose registers KVM would not give.
    pub fn vcpu_states(&self) -> Vec<Option<VcpuState>> {
        self.shared
            .controls
            .iter()
            .map(|c| c.paused_state())
            .collect()
    }

    /// True once the run has an ending (the vCPUs may still be stopping).
    pub fn has_ended(&self) -> bool {
        self.shared.has_outcome()
    }
}

/// A VM whose vCPU threads are running.
pub struct RunningVm {
    pub(crate) shared: Arc<RunShared>,
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) started: Instant,
    pub(crate) exits: Arc<[AtomicU64]>,
    // Kept alive until the run ends; the VM fd is dropped before the memory.
    pub(crate) _fd: Arc<VmFd>,
    pub(crate) _ram: Arc<GuestRam>,
    pub(crate) _extra_ram: Vec<Arc<GuestRam>>,
    pub(crate) _windows: Vec<Arc<RemapWindow>>,
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
            let guard = self.shared.outcome.lock();
            if self.shared.live.load(Ordering::SeqCst) == 0 {
                break;
            }
            drop(guard.wait_timeout(&self.shared.changed, slice.max(Duration::from_millis(1))));
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
