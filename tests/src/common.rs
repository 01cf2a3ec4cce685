//! Running the embedded images on a real VM and reading their profiles.

use std::time::Duration;

use kvmi::images::Image;
use kvmi::profile::Profile;
use vmm::{RunLimits, RunReport, SerialSink, SharedBuffer, UnknownIoPolicy, Vm, VmConfig};

/// The embedded ELF of `image` (every image is embedded: the crate does not build otherwise).
pub fn elf(image: Image) -> &'static [u8] {
    image
        .elf()
        .expect("every image is embedded (checked at compile time)")
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
