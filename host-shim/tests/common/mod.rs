//! Helpers shared by the host-shim integration tests (real /dev/kvm, real images).
#![allow(dead_code)]

use std::time::Duration;

use host_shim::images::Image;
use host_shim::profile::Profile;
use host_shim::{RunLimits, RunReport, SerialSink, SharedBuffer, UnknownIoPolicy, Vm, VmConfig};

/// True (after printing SKIPPED) when the test cannot run here.
pub fn skip(test: &str) -> bool {
    if !host_shim::kvm_available() {
        println!("SKIPPED: {test}: /dev/kvm is not available");
        return true;
    }
    false
}

/// The embedded ELF of `image`; panics with a clear message if this build has none.
pub fn elf(image: Image) -> &'static [u8] {
    image
        .elf()
        .unwrap_or_else(|| panic!("image {} not embedded (KVMI_SKIP_IMAGES?)", image.name()))
}

/// The embedded profile of `image`.
pub fn profile(image: Image) -> Profile {
    image
        .profile()
        .expect("profile embedded")
        .expect("profile parses")
}

/// Runs `image` with `cmdline` on `vcpus` vCPUs; returns the report and the serial text.
pub fn run(
    image: Image,
    cmdline: &str,
    vcpus: u32,
    unknown_io: UnknownIoPolicy,
    timeout: Duration,
) -> (RunReport, String) {
    let config = VmConfig {
        name: format!("test-{}", image.name()),
        memory_bytes: 64 << 20,
        vcpus,
        cmdline: cmdline.to_string(),
        unknown_io,
    };
    let serial = SharedBuffer::new();
    let mut vm = Vm::new(config, elf(image)).expect("VM builds");
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    let report = vm
        .run(RunLimits {
            timeout: Some(timeout),
            interrupt: None,
        })
        .expect("VM runs");
    (report, serial.text())
}

/// Runs test-guest in `mode` on one vCPU with a 20 s limit.
pub fn test_guest(mode: &str) -> (RunReport, String) {
    run(
        Image::TestGuest,
        &format!("mode={mode}"),
        1,
        UnknownIoPolicy::Ignore,
        Duration::from_secs(20),
    )
}
