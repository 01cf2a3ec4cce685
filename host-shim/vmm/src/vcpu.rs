//! vCPU creation (CPUID, boot state, sync_regs) and the per-vCPU run loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::dispatch::{Dispatcher, Flow};
use crate::error::VmError;
use crate::kick::{Request, VcpuControl, VcpuState};
use crate::layout::{boot_regs, boot_sregs};
use crate::outcome::RunOutcome;
use crate::run_area::{Exit, RunArea, run_once};

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
                    control.park_with(capture_state(vcpu));
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
            // A hook asked to be called back once the pending I/O is complete: this KVM_RUN
            // completes it and returns EINTR without entering the guest (KVM checks
            // immediate_exit after complete_userspace_io). Setting the byte after the request
            // was read loses no kick: a kicker's flag is read on the next iteration.
            let completing = vcpu.area.io_callback_requested();
            if completing {
                vcpu.area.set_immediate_exit();
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
            let flow = if completing && exit == Exit::Interrupted {
                vcpu.area.clear_io_callback();
                dispatcher.io_completed(vcpu.index, &vcpu.fd, &mut vcpu.area)
            } else {
                dispatcher.handle(vcpu.index, &vcpu.fd, &mut vcpu.area, exit)
            };
            match flow {
                Flow::Continue => {}
                Flow::Halt => break None,
                Flow::End(outcome) => break Some(outcome),
            }
        }
    };
    dispatcher.hook.vcpu_exit(vcpu.index);
    ending
}

/// The vCPU's registers as the guest will see them on its next entry: KVM's (ioctls; a
/// paused vCPU is not a hot path), overridden by the run area's copy where a hook edited it
/// and the edit is still pending. None (logged) if KVM refuses the ioctls.
fn capture_state(vcpu: &PreparedVcpu) -> Option<VcpuState> {
    let mut regs = vcpu
        .fd
        .get_regs()
        .map_err(|e| tracing::warn!(vcpu = vcpu.index, "get regs at pause: {e}"))
        .ok()?;
    let mut sregs = vcpu
        .fd
        .get_sregs()
        .map_err(|e| tracing::warn!(vcpu = vcpu.index, "get sregs at pause: {e}"))
        .ok()?;
    let (pending_regs, pending_sregs) = vcpu.area.pending_edits();
    if pending_regs {
        regs = *vcpu.area.regs();
    }
    if pending_sregs {
        sregs = *vcpu.area.sregs();
    }
    Some(VcpuState { regs, sregs })
}

/// Unregisters a vCPU thread from its control block when dropped, so that no kick writes to
/// its `kvm_run` mapping after the thread left [`run_vcpu`], even by a panic.
struct Unregister<'a>(&'a VcpuControl);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.unregister();
        self.0.mark_exited();
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
            // The vCPU's allow-list, before the guest's first instruction; without it the
            // guest never runs.
            if let Err(e) = crate::seccomp::install_current(crate::seccomp::ThreadKind::Vcpu) {
                tracing::error!(vcpu = vcpu.index, "{e}");
                dispatcher.hook.vcpu_exit(vcpu.index);
                let vcpu_index = vcpu.index;
                drop(vcpu);
                done(Some(RunOutcome::VcpuError {
                    vcpu: vcpu_index,
                    error: e.to_string(),
                }));
                return;
            }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::{Arc, Mutex};

    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::Kvm;

    use super::{create_vcpu, run_vcpu};
    use crate::devices::{Devices, SerialSink, UnknownIoPolicy};
    use crate::dispatch::Dispatcher;
    use crate::hook::{ExitContext, ExitHook, HookResult, MmioAccess, PioAccess};
    use crate::kick::{VcpuControl, install_kick_handler};
    use crate::layout::write_boot_tables;
    use crate::memory::GuestRam;
    use crate::outcome::RunOutcome;
    use crate::probe::snippets::{CODE_GPA, DONE_PORT, SLOT_GPA};
    use crate::probe::tiny::PROBE_RAM;

    /// What the MMIO read returns.
    const DATA: u64 = 0x1122_3344_5566_7788;

    /// `mov r12d, 0x77; mov eax, 0xa1; mov rax, [SLOT_GPA]; out 0x10, eax; jmp $` (the load
    /// is an MMIO read: nothing is mapped at SLOT_GPA).
    const LOAD: &[u8] = &[
        0x41, 0xbc, 0x77, 0x00, 0x00, 0x00, // mov r12d, 0x77
        0xb8, 0xa1, 0x00, 0x00, 0x00, // mov eax, 0xa1
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00, // mov rax, [0x100000]
        0xe7, 0x10, // out 0x10, eax
        0xeb, 0xfe, // jmp $
    ];

    /// Registers seen by the hook: (rip at the MMIO exit, (rax, rip) in io_completed,
    /// (rax, r12) at the `out`).
    #[derive(Default)]
    struct Seen {
        mmio_rip: Option<u64>,
        completed: Option<(u64, u64)>,
        done: Option<(u64, u64)>,
    }

    /// Completes the read with [`DATA`] and sets R12: in `io_completed` after asking to be
    /// called back (`defer`), else at once in the MMIO exit.
    struct CallBack {
        defer: bool,
        seen: Mutex<Seen>,
    }

    impl ExitHook for CallBack {
        fn mmio(&self, ctx: &mut ExitContext<'_>, io: &mut MmioAccess<'_>) -> HookResult {
            assert!(!io.write && io.addr == SLOT_GPA, "{io:?}");
            io.data
                .copy_from_slice(&DATA.to_le_bytes()[..io.data.len()]);
            self.seen.lock().unwrap().mmio_rip = Some(ctx.regs().rip);
            if self.defer {
                ctx.complete_then_call_back();
            } else {
                ctx.regs_mut().r12 = 0x1234;
            }
            HookResult::Handled
        }

        fn io_completed(&self, ctx: &mut ExitContext<'_>) -> HookResult {
            let r = ctx.regs();
            self.seen.lock().unwrap().completed = Some((r.rax, r.rip));
            ctx.regs_mut().r12 = 0x1234;
            HookResult::Handled
        }

        fn pio(&self, ctx: &mut ExitContext<'_>, io: &mut PioAccess<'_>) -> HookResult {
            if io.port != DONE_PORT {
                return HookResult::Unhandled;
            }
            let r = ctx.regs();
            self.seen.lock().unwrap().done = Some((r.rax, r.r12));
            HookResult::Stop("done".into())
        }
    }

    /// Runs [`LOAD`] with a [`CallBack`] hook until its `out`; None (skipped) without
    /// `/dev/kvm`, unless `KVMI_REQUIRE_KVM=1`.
    fn run_load(defer: bool) -> Option<Seen> {
        if !crate::kvm_available() {
            assert!(
                std::env::var("KVMI_REQUIRE_KVM").as_deref() != Ok("1"),
                "/dev/kvm is not available and KVMI_REQUIRE_KVM=1"
            );
            eprintln!("SKIPPED: /dev/kvm is not available");
            return None;
        }
        let kvm = Kvm::new().unwrap();
        install_kick_handler();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        let ram = GuestRam::new("vmm-test", PROBE_RAM).unwrap();
        ram.register(&vm, 0).unwrap();
        write_boot_tables(&ram).unwrap();
        ram.write(CODE_GPA, LOAD).unwrap();
        let mut vcpu = create_vcpu(&vm, &cpuid, 0, CODE_GPA).unwrap();
        let hook = Arc::new(CallBack {
            defer,
            seen: Mutex::default(),
        });
        let dispatcher = Dispatcher {
            devices: Devices::new(SerialSink::Null),
            hook: hook.clone(),
            policy: UnknownIoPolicy::Error,
            ram: Arc::new(ram),
            doorbell_warned: AtomicBool::new(false),
        };
        let control = VcpuControl::new();
        let ending = run_vcpu(&mut vcpu, &control, &dispatcher, &AtomicU64::new(0));
        assert!(
            matches!(&ending, Some(RunOutcome::Stopped { reason, .. }) if reason == "done"),
            "{ending:?}"
        );
        Some(std::mem::take(&mut *hook.seen.lock().unwrap()))
    }

    #[test]
    fn a_register_edit_after_the_completion_keeps_the_mmio_read_s_destination() {
        let Some(seen) = run_load(true) else { return };
        let mmio_rip = seen.mmio_rip.expect("an MMIO read exit");
        // The callback came after KVM wrote the destination and moved rip past the load
        // (8 bytes), before the guest ran on.
        assert_eq!(seen.completed, Some((DATA, mmio_rip + 8)));
        // The edit made in the callback and the read's data both reached the guest.
        assert_eq!(seen.done, Some((DATA, 0x1234)));
    }

    /// Why `complete_then_call_back` exists (measured on PVM): registers changed while the
    /// read is pending make KVM drop the emulator's register cache, and the destination
    /// keeps its old value. If this starts failing, KVM no longer loses the write-back.
    #[test]
    fn a_register_edit_during_a_pending_mmio_read_loses_its_destination() {
        let Some(seen) = run_load(false) else { return };
        assert_eq!(seen.completed, None);
        assert_eq!(seen.done, Some((0xa1, 0x1234)));
    }
}
