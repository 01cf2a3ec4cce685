//! A hook that panics (a bug) ends the run with a VMM error that names the panic: the other
//! vCPUs stop, the process stays up, and no kick reaches the dead thread's `kvm_run` page.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvmi::images::Image;
use vmm::hook::{ExitContext, ExitHook, HookResult, PioAccess};
use vmm::{RunLimits, RunOutcome, SerialSink, Vm, VmConfig};

/// Panics on the `after`th port access of vCPU 0 (its serial output); counts them.
struct PanicOnPort {
    seen: AtomicU64,
    after: u64,
}

impl ExitHook for PanicOnPort {
    fn pio(&self, ctx: &mut ExitContext<'_>, _io: &mut PioAccess<'_>) -> HookResult {
        if ctx.vcpu_index() == 0 && self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            panic!("hook bug on purpose");
        }
        HookResult::Unhandled
    }
}

#[test]
fn a_panicking_hook_ends_the_run_with_an_error_naming_the_panic() {
    if !kvmi_tests::require_kvm("a_panicking_hook_ends_the_run_with_an_error_naming_the_panic") {
        return;
    }
    let config = VmConfig {
        name: "test-panicking-hook".into(),
        memory_bytes: 32 << 20,
        vcpus: 2,
        // The guest spins forever after printing: only the panic can end this run (vCPU 1
        // keeps running until the run's end stops it).
        cmdline: "mode=spin".into(),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(config, kvmi_tests::common::elf(Image::TestGuest)).unwrap();
    vm.set_serial(SerialSink::Null);
    let hook = Arc::new(PanicOnPort {
        seen: AtomicU64::new(0),
        after: 3,
    });
    vm.set_hook(hook.clone());
    let report = vm
        .run(RunLimits {
            timeout: Some(Duration::from_secs(30)),
            interrupt: None,
        })
        .unwrap();
    match &report.outcome {
        RunOutcome::VcpuError { vcpu, error } => {
            assert_eq!(*vcpu, 0, "{error}");
            assert!(error.contains("hook bug on purpose"), "{error}");
        }
        other => panic!("expected the panic as a VMM error, got {other}"),
    }
    assert_eq!(
        hook.seen.load(Ordering::SeqCst),
        3,
        "the run ended at the panic"
    );
}
