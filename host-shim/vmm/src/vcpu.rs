//! vCPU creation (CPUID, boot state, sync_regs) and the per-vCPU run loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::dispatch::{Dispatcher, Flow};
use crate::error::VmError;
use crate::kick::{Request, VcpuControl};
use crate::layout::{boot_regs, boot_sregs};
use crate::outcome::RunOutcome;
use crate::run_area::{RunArea, run_once};

/// A created vCPU in its boot state, not yet running.
pub struct PreparedVcpu {
    // `area` points into `fd`'s mapping: declared first so it is dropped first.
    pub(crate) area: RunArea,
    pub(crate) fd: VcpuFd,
    pub(crate) index: u32,
}

impl std::fmt::Debug for PreparedVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVcpu")
            .field("index", &self.index)
            .finish()
    }
}

impl PreparedVcpu {
    /// The vCPU fd (e.g. to set guest debug before the run starts).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The run area (sync regs).
    pub fn area(&mut self) -> &mut RunArea {
        &mut self.area
    }
}

/// CPUID for vCPU `index`: the host-supported table with the APIC ids set to the index.
fn cpuid_for(base: &CpuId, index: u32) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

/// Creates vCPU `index` of `vm` with CPUID from `supported`, entering at `entry` in the
/// contract's long-mode state, with sync_regs enabled.
pub fn create_vcpu(
    vm: &VmFd,
    supported: &CpuId,
    index: u32,
    entry: u64,
) -> Result<PreparedVcpu, VmError> {
    let mut fd = vm
        .create_vcpu(u64::from(index))
        .map_err(VmError::kvm("create vCPU"))?;
    fd.set_cpuid2(&cpuid_for(supported, index))
        .map_err(VmError::kvm("set CPUID"))?;
    let sregs = fd.get_sregs().map_err(VmError::kvm("get sregs"))?;
    fd.set_sregs(&boot_sregs(sregs))
        .map_err(VmError::kvm("set sregs"))?;
    fd.set_regs(&boot_regs(entry, index))
        .map_err(VmError::kvm("set regs"))?;
    // SAFETY: `run_size` is the size KVM reports for every vCPU mapping, and the area is
    // stored next to (and dropped before) the fd that owns the mapping.
    let mut area = unsafe { RunArea::new(&mut fd, vm.run_size()) };
    area.enable_sync_regs();
    Ok(PreparedVcpu { area, fd, index })
}

/// Runs one vCPU until it halts, is stopped, or ends the run. Returns the ending, if this
/// vCPU produced one.
pub(crate) fn run_vcpu(
    vcpu: &mut PreparedVcpu,
    control: &VcpuControl,
    dispatcher: &Dispatcher,
    exits: &AtomicU64,
) -> Option<RunOutcome> {
    // SAFETY: the immediate_exit byte lives in `vcpu.fd`'s mapping, which outlives this
    // function; `_registered` unregisters when the function returns or unwinds.
    unsafe { control.register(vcpu.area.immediate_exit_ptr()) };
    let _registered = Unregister(control);
    let started = match dispatcher.start(vcpu.index, &vcpu.fd, &mut vcpu.area) {
        Flow::End(outcome) => Some(outcome),
        _ => None,
    };
    let ending = if started.is_some() {
        started
    } else {
        loop {
            // Clear first, then read the request: a concurrent kick is never lost.
            vcpu.area.clear_immediate_exit();
            match control.request() {
                Request::Stop => break None,
                Request::Pause => {
                    control.park();
                    continue;
                }
                Request::None => {}
            }
            if control.take_attention() {
                match dispatcher.kicked(vcpu.index, &vcpu.fd, &mut vcpu.area) {
                    Flow::End(outcome) => break Some(outcome),
                    Flow::Halt => break None,
                    Flow::Continue => {}
                }
            }
            let exit = match run_once(&mut vcpu.fd, &vcpu.area) {
                Ok(exit) => exit,
                Err(e) => {
                    break Some(RunOutcome::VcpuError {
                        vcpu: vcpu.index,
                        error: format!("KVM_RUN failed: {e}"),
                    });
                }
            };
            exits.fetch_add(1, Ordering::Relaxed);
            match dispatcher.handle(vcpu.index, &vcpu.fd, &mut vcpu.area, exit) {
                Flow::Continue => {}
                Flow::Halt => break None,
                Flow::End(outcome) => break Some(outcome),
            }
        }
    };
    dispatcher.hook.vcpu_exit(vcpu.index);
    ending
}

/// Unregisters a vCPU thread from its control block when dropped, so that no kick writes to
/// its `kvm_run` mapping after the thread left [`run_vcpu`], even by a panic.
struct Unregister<'a>(&'a VcpuControl);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.unregister();
    }
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Spawns the thread of one vCPU; `done` is called with its ending when the loop returns.
pub(crate) fn spawn_vcpu_thread(
    mut vcpu: PreparedVcpu,
    control: Arc<VcpuControl>,
    dispatcher: Arc<Dispatcher>,
    exits: Arc<[AtomicU64]>,
    done: impl FnOnce(Option<RunOutcome>) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, VmError> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.index))
        .spawn(move || {
            let i = vcpu.index as usize;
            let counter = &exits[i.min(exits.len().saturating_sub(1))];
            // A panic is a bug in the VMM or a hook; it ends the run with a VMM error naming
            // it instead of leaving the other vCPUs waiting for this one.
            let ending = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_vcpu(&mut vcpu, &control, &dispatcher, counter)
            }))
            .unwrap_or_else(|payload| {
                let error = format!("vCPU thread panicked: {}", panic_message(&*payload));
                tracing::error!(vcpu = vcpu.index, "{error}");
                Some(RunOutcome::VcpuError {
                    vcpu: vcpu.index,
                    error,
                })
            });
            drop(vcpu);
            done(ending);
        })
        .map_err(VmError::Thread)
}
