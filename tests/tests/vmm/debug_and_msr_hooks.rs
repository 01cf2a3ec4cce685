//! Debug and MSR exits reaching an ExitHook: hardware breakpoints (with step-over) and the
//! MSR write filter, on the test guest.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kvm_bindings::{
    KVM_CAP_X86_USER_SPACE_MSR, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_MSR_EXIT_REASON_FILTER, kvm_enable_cap, kvm_guest_debug,
};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
use kvmi::images::Image;
use vmm::{
    DebugEvent, ExitContext, ExitHook, HookResult, MsrAccess, RunLimits, SerialSink, SharedBuffer,
    Vm, VmConfig,
};

fn guest_debug(control: u32, dr0: u64, dr7: u64) -> kvm_guest_debug {
    let mut dbg = kvm_guest_debug {
        control,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = dr7;
    dbg
}

/// Counts hits of a DR0 exec breakpoint and steps over each one portably: disable the
/// breakpoint, single-step one instruction, re-arm (RF alone is ignored at CPL0 on PVM).
struct Breakpoint {
    target: u64,
    hits: AtomicU64,
    stepping: AtomicBool,
}

impl ExitHook for Breakpoint {
    fn debug(&self, ctx: &mut ExitContext<'_>, ev: &DebugEvent) -> HookResult {
        let arm = guest_debug(
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            self.target,
            0x401,
        );
        if self.stepping.swap(false, Ordering::SeqCst) {
            return match ctx.vcpu_fd().set_guest_debug(&arm) {
                Ok(()) => HookResult::Handled,
                Err(e) => HookResult::Stop(format!("re-arm: {e}")),
            };
        }
        if ev.exception != 1 || ev.pc != self.target || ctx.regs().rip != self.target {
            return HookResult::Stop(format!("unexpected debug exit {ev:?}"));
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        let step = guest_debug(
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_SINGLESTEP,
            self.target,
            0x400,
        );
        self.stepping.store(true, Ordering::SeqCst);
        match ctx.vcpu_fd().set_guest_debug(&step) {
            Ok(()) => HookResult::Handled,
            Err(e) => HookResult::Stop(format!("step: {e}")),
        }
    }
}

fn config(cmdline: &str) -> VmConfig {
    VmConfig {
        name: "test-debug".into(),
        memory_bytes: 32 << 20,
        cmdline: cmdline.into(),
        ..VmConfig::default()
    }
}

const LIMITS: RunLimits = RunLimits {
    timeout: Some(Duration::from_secs(20)),
    interrupt: None,
};

#[test]
fn hardware_breakpoint_hits_reach_the_hook() {
    if !kvmi_tests::require_kvm("hardware_breakpoint_hits_reach_the_hook") {
        return;
    }
    let target = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("breakpoint_target")
        .expect("profile has sym.breakpoint_target");
    let hook = std::sync::Arc::new(Breakpoint {
        target,
        hits: AtomicU64::new(0),
        stepping: AtomicBool::new(false),
    });
    let serial = SharedBuffer::new();
    let mut vm = Vm::new(
        config("mode=breakpoint n=5"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    vm.set_hook(hook.clone());
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    vm.vcpus_mut()[0]
        .fd()
        .set_guest_debug(&guest_debug(
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            target,
            0x401,
        ))
        .unwrap();
    let report = vm.run(LIMITS).unwrap();
    assert!(
        report.outcome.is_success(),
        "{}: {}",
        report.outcome,
        serial.text()
    );
    assert_eq!(hook.hits.load(Ordering::SeqCst), 5);
    assert!(
        serial.text().contains("breakpoint calls=5"),
        "{}",
        serial.text()
    );
}

/// Records filtered MSR writes and lets the guest continue without performing them.
#[derive(Default)]
struct MsrLog(Mutex<Vec<(u32, u64)>>);

impl ExitHook for MsrLog {
    fn msr(&self, _ctx: &mut ExitContext<'_>, msr: &mut MsrAccess<'_>) -> HookResult {
        if !msr.write || msr.reason != KVM_MSR_EXIT_REASON_FILTER {
            return HookResult::Unhandled;
        }
        self.0.lock().unwrap().push((msr.index, *msr.data));
        *msr.error = 0;
        HookResult::Handled
    }
}

#[test]
fn filtered_msr_writes_reach_the_hook() {
    if !kvmi_tests::require_kvm("filtered_msr_writes_reach_the_hook") {
        return;
    }
    let hook = std::sync::Arc::new(MsrLog::default());
    let serial = SharedBuffer::new();
    let mut vm = Vm::new(
        config("mode=msr msr=0x174 value=0x10"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    vm.vm_fd().enable_cap(&cap).unwrap();
    let deny = [0u8; 1];
    vm.vm_fd()
        .set_msr_filter(
            MsrFilterDefaultAction::ALLOW,
            &[MsrFilterRange {
                flags: MsrFilterRangeFlags::WRITE,
                base: 0x174,
                msr_count: 1,
                bitmap: &deny,
            }],
        )
        .unwrap();
    vm.set_hook(hook.clone());
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    let report = vm.run(LIMITS).unwrap();
    let text = serial.text();
    assert!(report.outcome.is_success(), "{}: {text}", report.outcome);
    assert_eq!(*hook.0.lock().unwrap(), vec![(0x174, 0x10)]);
    // The hook swallowed the write: the guest reads the MSR's old value back.
    assert!(text.contains("msr 0x174 wrote 0x10 read 0x0"), "{text}");
}
