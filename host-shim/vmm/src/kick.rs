//! Kicking, stopping and pausing vCPU threads.
//!
//! A kick makes `KVM_RUN` return promptly however the guest behaves: the kicker first records
//! its request, then sets `kvm_run.immediate_exit` (so a vCPU about to enter returns at once),
//! then signals the vCPU thread (so a vCPU inside the guest returns with `EINTR`). The vCPU
//! thread clears `immediate_exit` *before* reading the request, so no kick is ever lost.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Condvar, Once};

use crate::sync::{RankedGuard, RankedMutex, vmm_ranks};

use kvm_bindings::{kvm_regs, kvm_sregs};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// No request pending.
const REQ_NONE: u32 = 0;
/// The vCPU should pause until resumed.
const REQ_PAUSE: u32 = 1;
/// The vCPU should stop for good.
const REQ_STOP: u32 = 2;

/// What the vCPU loop should do after a kick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Keep running.
    None,
    /// Pause until [`VcpuControl::resume`].
    Pause,
    /// Leave the run loop.
    Stop,
}

/// The signal used to kick vCPU threads (SIGRTMIN + 1; its handler does nothing).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler once per process, without `SA_RESTART`, so that
/// `KVM_RUN` returns `EINTR` when the signal arrives.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// The thread and `kvm_run` of a running vCPU, valid while registered.
struct Target {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

// SAFETY: `Target` is only a pair of handles; the pointer is dereferenced only while the Mutex
// is held and the owning vCPU thread keeps the mapping alive until it unregisters (under the
// same Mutex).
unsafe impl Send for Target {}

/// A paused vCPU's registers, captured by its own thread just before it parked.
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER.
    pub sregs: kvm_sregs,
}

/// Shared control block of one vCPU: requests, kick target and pause state.
pub struct VcpuControl {
    request: AtomicU32,
    /// Set by [`VcpuControl::nudge`]: run the exit hook's `kicked` before the next entry.
    attention: AtomicBool,
    target: RankedMutex<Option<Target>>,
    paused: RankedMutex<bool>,
    pause_changed: Condvar,
    /// The vCPU thread has ended: it will never run the guest again.
    exited: AtomicBool,
    /// The registers of the parked vCPU (None while it runs).
    state: RankedMutex<Option<VcpuState>>,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("request", &self.request())
            .finish()
    }
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            request: AtomicU32::new(REQ_NONE),
            attention: AtomicBool::new(false),
            target: RankedMutex::new(vmm_ranks::KICK_TARGET, None),
            paused: RankedMutex::new(vmm_ranks::PAUSE, false),
            pause_changed: Condvar::new(),
            exited: AtomicBool::new(false),
            state: RankedMutex::new(vmm_ranks::VCPU_STATE, None),
        }
    }
}

impl VcpuControl {
    /// Creates a control block with no request and no registered thread.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the calling thread as the vCPU thread whose `kvm_run.immediate_exit` byte is
    /// at `immediate_exit`.
    ///
    /// # Safety
    /// `immediate_exit` must stay valid until [`VcpuControl::unregister`] is called, and the
    /// calling thread must call `unregister` before it exits.
    pub unsafe fn register(&self, immediate_exit: *mut u8) {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        *self.lock_target() = Some(Target {
            thread,
            immediate_exit,
        });
    }

    /// Unregisters the vCPU thread; later kicks only record their request.
    pub fn unregister(&self) {
        *self.lock_target() = None;
    }

    fn lock_target(&self) -> RankedGuard<'_, Option<Target>> {
        self.target.lock()
    }

    /// The pending request.
    pub fn request(&self) -> Request {
        match self.request.load(Ordering::SeqCst) {
            REQ_STOP => Request::Stop,
            REQ_PAUSE => Request::Pause,
            _ => Request::None,
        }
    }

    /// Asks the vCPU thread to call the exit hook's `kicked` (e.g. to run a queued
    /// introspection command) before it next enters the guest, and kicks it. Never lost: the
    /// flag is set before the kick, and the thread clears `immediate_exit` before it takes
    /// the flag, so either it sees the flag or `KVM_RUN` returns at once and it sees it then.
    /// A thread that is not running yet sees the flag at its first entry.
    pub fn nudge(&self) {
        self.attention.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Takes the flag [`VcpuControl::nudge`] set (vCPU thread, before each entry).
    pub fn take_attention(&self) -> bool {
        self.attention.swap(false, Ordering::SeqCst)
    }

    /// Asks the vCPU to stop for good and kicks it.
    pub fn stop(&self) {
        self.request.store(REQ_STOP, Ordering::SeqCst);
        self.kick();
    }

    /// Asks the vCPU to pause and kicks it; [`VcpuControl::wait_paused`] waits for it.
    pub fn pause(&self) {
        let _ =
            self.request
                .compare_exchange(REQ_NONE, REQ_PAUSE, Ordering::SeqCst, Ordering::SeqCst);
        self.kick();
    }

    /// Lets a paused vCPU run again (a stop request stays in force).
    pub fn resume(&self) {
        let _ =
            self.request
                .compare_exchange(REQ_PAUSE, REQ_NONE, Ordering::SeqCst, Ordering::SeqCst);
        let _guard = self.paused.lock();
        self.pause_changed.notify_all();
    }

    /// Waits until the vCPU thread reports it is paused, or has ended (it cannot run the
    /// guest either), or `timeout` passes; true if paused or ended.
    pub fn wait_paused(&self, timeout: std::time::Duration) -> bool {
        let guard = self.paused.lock();
        let (guard, _) = guard.wait_timeout_while(&self.pause_changed, timeout, |paused| {
            !*paused && !self.exited.load(Ordering::SeqCst)
        });
        *guard || self.exited.load(Ordering::SeqCst)
    }

    /// Whether a pause is requested and not yet resumed (the vCPU may still be on its way to
    /// park).
    pub fn pause_requested(&self) -> bool {
        self.request() == Request::Pause
    }

    /// Called by the vCPU thread as it ends: waiters of [`VcpuControl::wait_paused`] stop
    /// waiting for it.
    pub fn mark_exited(&self) {
        self.exited.store(true, Ordering::SeqCst);
        let _guard = self.paused.lock();
        self.pause_changed.notify_all();
    }

    /// The registers the vCPU thread captured as it parked; `None` unless the vCPU is paused
    /// (valid until [`VcpuControl::resume`]).
    pub fn paused_state(&self) -> Option<VcpuState> {
        *self.state.lock()
    }

    /// Called by the vCPU thread on a pause request with its registers (if it could read
    /// them): publishes them, then blocks until resumed or stopped.
    pub fn park_with(&self, state: Option<VcpuState>) {
        *self.state.lock() = state;
        self.park();
        *self.state.lock() = None;
    }

    /// Called by the vCPU thread on a pause request: blocks until resumed or stopped.
    pub fn park(&self) {
        let mut paused = self.paused.lock();
        *paused = true;
        self.pause_changed.notify_all();
        while self.request() == Request::Pause {
            paused = paused.wait(&self.pause_changed);
        }
        *paused = false;
        self.pause_changed.notify_all();
    }

    /// Makes `KVM_RUN` of the registered vCPU return (immediate_exit + signal). Does nothing
    /// when no thread is registered.
    pub fn kick(&self) {
        let target = self.lock_target();
        if let Some(t) = target.as_ref() {
            // SAFETY: the vCPU thread keeps `immediate_exit` valid while registered, and we hold
            // the lock it takes to unregister. The byte is shared with the kernel and the vCPU
            // thread, so it is accessed atomically.
            unsafe { AtomicU8::from_ptr(t.immediate_exit) }.store(1, Ordering::SeqCst);
            // SAFETY: the thread is registered, so it has not exited (it unregisters first).
            let rc = unsafe { libc::pthread_kill(t.thread, kick_signal()) };
            if rc != 0 {
                tracing::warn!("kicking vCPU thread failed: errno {rc}");
            }
        }
        // Also wake a parked vCPU so it sees a stop request.
        if self.request() == Request::Stop {
            let _guard = self.paused.lock();
            self.pause_changed.notify_all();
        }
    }
}
