//! A probe vCPU that never exits is kicked by the watchdog within its deadline.

use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use vmm::probe::tiny::{ProbeVm, Watchdog};
use vmm::run_area::Exit;

#[test]
fn hung_probe_vcpu_is_kicked() {
    if !kvmi_tests::require_kvm("hung_probe_vcpu_is_kicked") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let wd = Watchdog::start().unwrap();
    // `jmp $` forever at CPL0.
    let mut vm = ProbeVm::new(&kvm, &cpuid, &[0xeb, 0xfe], |_, _| Ok(())).unwrap();
    let t = Instant::now();
    let exit = vm.run_to_exit(&wd, Duration::from_millis(100)).unwrap();
    let took = t.elapsed();
    assert_eq!(exit, Exit::Interrupted);
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Once stopped, later runs return at once instead of hanging.
    let t = Instant::now();
    assert_eq!(
        vm.run_to_exit(&wd, Duration::from_secs(30)).unwrap(),
        Exit::Interrupted
    );
    assert!(t.elapsed() < Duration::from_secs(1));
}
