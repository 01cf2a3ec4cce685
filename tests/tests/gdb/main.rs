//! End-to-end tests of `kvmi gdb`, the GDB remote-protocol stub over a KVMI socket, with the
//! real GDB (`gdb -batch -nx`, GDB 13 here and in CI): the demo target runs under
//! `kvmi run --kvmi-socket`, GDB loads the ELF that `kvmi image demo-target --output` wrote and
//! attaches with `target remote | kvmi gdb --socket SOCK`. Every test checks what GDB printed
//! against the image's profile, its ELF symbols and the guest's serial output.
//!
//! The libkvmi tests (`libkvmi`) run the demo with `--kvmi-dialect libkvmi --kvmi-connect
//! SOCK` and attach with `target remote | kvmi gdb --libkvmi-listen SOCK`.
//!
//! The harness is `kvmi_tests::gdb`. Without `/dev/kvm` or without `gdb` on PATH the tests
//! print SKIPPED, or fail under `KVMI_REQUIRE_KVM=1`.

mod breakpoints;
mod libkvmi;
mod registers;
mod session;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use kvmi::images::Image;
use kvmi_tests::socket_target::Target;

/// How long a test waits for the demo's first heartbeat (boot done: the six initial tasks
/// exist) or for later serial output.
pub const SERIAL_WAIT: Duration = Duration::from_secs(30);

/// Starts the demo target with `cmdline` and extra `kvmi run` arguments, waits for its first
/// heartbeat and writes its ELF; None (after printing SKIPPED) when GDB is missing. (Each test
/// checks for KVM first.)
pub fn demo(test: &str, cmdline: &str, extra: &[&str]) -> Option<(Target, PathBuf)> {
    if !kvmi_tests::gdb::require_gdb(test) {
        return None;
    }
    let target = Target::start(Image::DemoTarget, cmdline, extra);
    assert!(
        target.wait_serial("heartbeat round=1", SERIAL_WAIT),
        "the demo did not boot; serial: {}; stderr: {}",
        target.serial(),
        target.stderr()
    );
    let elf = kvmi_tests::gdb::image_elf(Image::DemoTarget, target.dir());
    Some((target, elf))
}

/// [`demo`] in the libkvmi dialect: the demo target runs with `kvmi run --kvmi-dialect libkvmi
/// --kvmi-connect SOCK` (it boots while no tool listens, retrying the connection), and
/// `target.socket` is SOCK, where `kvmi gdb --libkvmi-listen` will listen.
pub fn demo_libkvmi(test: &str) -> Option<(Target, PathBuf)> {
    if !kvmi_tests::gdb::require_gdb(test) {
        return None;
    }
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let sock = std::env::temp_dir().join(format!(
        "kvmi-gdb-lk-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let target = Target::start_connecting(
        Image::DemoTarget,
        "",
        &sock,
        &["--kvmi-dialect", "libkvmi"],
        None,
    );
    assert!(
        target.wait_serial("heartbeat round=1", SERIAL_WAIT),
        "the demo did not boot; serial: {}; stderr: {}",
        target.serial(),
        target.stderr()
    );
    let elf = kvmi_tests::gdb::image_elf(Image::DemoTarget, target.dir());
    Some((target, elf))
}

/// The commands of a test, one string per `-ex`.
pub fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|c| c.to_string()).collect()
}

/// The `heartbeat round=` lines of the serial output so far.
pub fn heartbeats(target: &Target) -> usize {
    target.serial().matches("heartbeat round=").count()
}

/// The CR3 values of every task the demo created (`task created ... cr3=0x...` lines).
pub fn task_cr3s(target: &Target) -> Vec<u64> {
    target
        .serial()
        .lines()
        .filter(|l| l.starts_with("task created "))
        .filter_map(|l| {
            let v = l.split_whitespace().find_map(|w| w.strip_prefix("cr3="))?;
            kvmi_tests::gdb::parse_num(v)
        })
        .collect()
}

/// Whether `addr` is in the profile range `name`.
pub fn in_range(target: &Target, name: &str, addr: u64) -> bool {
    let r = target
        .profile
        .range(name)
        .unwrap_or_else(|| panic!("profile has no range.{name}"));
    (r.start..r.end).contains(&addr)
}
