//! Tiny probe VMs (64 KiB of memfd RAM, one vCPU, a code snippet) and the watchdog that
//! kicks a probe vCPU that does not exit in time.

use std::sync::{Arc, Condvar};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VmFd};

use crate::error::VmError;
use crate::kick::{Request, VcpuControl, install_kick_handler};
use crate::layout::write_boot_tables;
use crate::memory::GuestRam;
use crate::run_area::{Exit, run_once};
use crate::sync::{RankedMutex, vmm_ranks};
use crate::vcpu::{PreparedVcpu, create_vcpu};

use super::snippets::CODE_GPA;

/// RAM of a probe VM: boot tables end at 0xf000.
pub const PROBE_RAM: u64 = 0x1_0000;

/// A one-vCPU VM running a snippet on the calling thread.
pub struct ProbeVm {
    // Drop order: vCPU, then VM, then RAM.
    pub(crate) vcpu: PreparedVcpu,
    pub(crate) vm: VmFd,
    pub(crate) ram: GuestRam,
    control: Arc<VcpuControl>,
}

impl ProbeVm {
    /// Creates the VM, loads `code` at `CODE_GPA`, runs `setup` on the VM (extra slots, caps,
    /// filters) and creates the vCPU entering at the code.
    pub fn new(
        kvm: &Kvm,
        cpuid: &CpuId,
        code: &[u8],
        setup: impl FnOnce(&VmFd, &GuestRam) -> Result<(), VmError>,
    ) -> Result<ProbeVm, VmError> {
        install_kick_handler();
        let vm = kvm.create_vm().map_err(VmError::kvm("create probe VM"))?;
        let ram = GuestRam::new("kvmi-probe", PROBE_RAM)?;
        ram.register(&vm, 0)?;
        write_boot_tables(&ram)?;
        ram.write(CODE_GPA, code)?;
        setup(&vm, &ram)?;
        let mut vcpu = create_vcpu(&vm, cpuid, 0, CODE_GPA)?;
        let control = Arc::new(VcpuControl::new());
        // SAFETY: the byte lives in `vcpu`'s mapping, which lives as long as `self`; Drop
        // unregisters first. Probe VMs are run only on the thread that created them.
        unsafe { control.register(vcpu.area().immediate_exit_ptr()) };
        Ok(ProbeVm {
            vcpu,
            vm,
            ram,
            control,
        })
    }

    /// Runs until the next exit; the watchdog stops the vCPU if it takes longer than
    /// `limit` (the result is then [`Exit::Interrupted`] and every later run returns at once).
    pub fn run(&mut self, wd: &Watchdog, limit: Duration) -> Result<Exit, kvm_ioctls::Error> {
        self.vcpu.area.clear_immediate_exit();
        if self.control.request() == Request::Stop {
            return Ok(Exit::Interrupted);
        }
        wd.arm(self.control.clone(), limit);
        let r = run_once(&mut self.vcpu.fd, &self.vcpu.area);
        wd.disarm();
        r
    }

    /// Runs until an exit other than a kick, at most `limit` in total.
    pub fn run_to_exit(
        &mut self,
        wd: &Watchdog,
        limit: Duration,
    ) -> Result<Exit, kvm_ioctls::Error> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let exit = self.run(wd, left)?;
            if exit != Exit::Interrupted
                || self.control.request() == Request::Stop
                || left.is_zero()
            {
                return Ok(exit);
            }
        }
    }
}

impl Drop for ProbeVm {
    fn drop(&mut self) {
        self.control.unregister();
    }
}

#[derive(Default)]
struct WdState {
    armed: Option<(Instant, Arc<VcpuControl>)>,
    quit: bool,
}

/// One thread that stops the armed probe vCPU when its deadline passes.
pub struct Watchdog {
    state: Arc<(RankedMutex<WdState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog thread.
    pub fn start() -> Result<Watchdog, VmError> {
        let state: Arc<(RankedMutex<WdState>, Condvar)> = Arc::new((
            RankedMutex::new(vmm_ranks::PROBE_WATCHDOG, WdState::default()),
            Condvar::new(),
        ));
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name("probe-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = lock.lock();
                while !st.quit {
                    match &st.armed {
                        Some((deadline, control)) => {
                            let now = Instant::now();
                            if now >= *deadline {
                                control.stop();
                                st.armed = None;
                            } else {
                                let wait = *deadline - now;
                                st = st.wait_timeout(cv, wait).0;
                            }
                        }
                        None => st = st.wait(cv),
                    }
                }
            })
            .map_err(VmError::Thread)?;
        Ok(Watchdog {
            state,
            thread: Some(thread),
        })
    }

    fn arm(&self, control: Arc<VcpuControl>, limit: Duration) {
        let (lock, cv) = &*self.state;
        lock.lock().armed = Some((Instant::now() + limit, control));
        cv.notify_all();
    }

    fn disarm(&self) {
        let (lock, cv) = &*self.state;
        lock.lock().armed = None;
        cv.notify_all();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().quit = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
