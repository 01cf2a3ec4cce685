//! Support for the workspace's end-to-end tests (`tests/tests/*`): every test boots real VMs
//! on `/dev/kvm` from the guest images the workspace builds.
//!
//! - [`require_kvm`] decides whether a test that needs KVM runs: without `/dev/kvm` it
//!   reports SKIPPED on the terminal (not swallowed by the test harness), and with
//!   `KVMI_REQUIRE_KVM=1` (set by CI) it fails instead, so a green CI run means the KVM tests
//!   ran.
//! - [`common`] runs an embedded image on an in-process VM; [`socket_target`] runs one under
//!   the `kvmi` command with a KVMI socket and attaches a client.
//! - [`kvmi_bin`] is the `kvmi` command under test (this package builds it as its example
//!   `kvmi`, from the same `kvmi::app::main`).
//! - [`libkvmi_peer`] is a libkvmi stand-in: the tool side of the libkvmi (`kvmi-v7`) dialect,
//!   byte for byte as libkvmi 1.1 behaves, for the shim's `--kvmi-dialect libkvmi`.
//! - [`gdb`] runs the real GDB against `kvmi gdb` (the GDB remote stub over a KVMI socket)
//!   on a VM started by [`socket_target`], with a timeout, and parses what GDB printed.
//! - [`hostile`] is a misbehaving tool in a child process (the example `hostile_tool`) that a
//!   test can make stop reading, fill the socket, stop (SIGSTOP), resume and kill.

pub mod common;
pub mod dump_file;
pub mod gdb;
pub mod hostile;
pub mod libkvmi_peer;
pub mod pattern;
pub mod socket_target;
pub mod wait;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::OnceLock;

// Every end-to-end test needs the guest images: a build without them (KVMI_SKIP_IMAGES)
// must not compile the tests rather than let them pass vacuously.
const _: () = assert!(
    kvmi::images::ALL_EMBEDDED,
    "the end-to-end tests need the embedded guest images (unset KVMI_SKIP_IMAGES)"
);

/// The environment variable that turns a missing `/dev/kvm` into a test failure.
pub const REQUIRE_KVM: &str = "KVMI_REQUIRE_KVM";

/// True when `test` can run here. Without `/dev/kvm` it prints `SKIPPED: <test>: <why>` to
/// the terminal and returns false, or panics when `KVMI_REQUIRE_KVM=1`.
pub fn require_kvm(test: &str) -> bool {
    if vmm::kvm_available() {
        return true;
    }
    let why = "/dev/kvm is not available (or not read-write)";
    if std::env::var(REQUIRE_KVM).is_ok_and(|v| v == "1") {
        panic!("{test}: {why}, and {REQUIRE_KVM}=1 requires the KVM tests to run");
    }
    // Straight to the process's stderr: the harness captures `println!`/`eprintln!`.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    false
}

/// The environment variable that turns a missing third-party reader (Volatility 3) into a
/// test failure; `.ci/run` installs the readers and sets it.
pub const REQUIRE_TOOLS: &str = "KVMI_REQUIRE_TOOLS";

/// True when the Python package `module` can be imported by `python3`. Otherwise prints
/// `SKIPPED: <test>: ...` (or panics with [`REQUIRE_TOOLS`]`=1`) and returns false.
pub fn require_python_module(test: &str, module: &str) -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    let why = format!("python3 cannot import {module} (pip install {module})");
    if std::env::var(REQUIRE_TOOLS).is_ok_and(|v| v == "1") {
        panic!("{test}: {why}, and {REQUIRE_TOOLS}=1 requires it");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    false
}

/// The `kvmi` command under test: this package's example `kvmi` (`examples/kvmi.rs`).
///
/// `cargo test` builds it with the tests, but `cargo test --test NAME` does not, so the first
/// call in a test process brings it up to date with `cargo build --example kvmi` (cargo
/// releases its build lock while tests run) into the same target directory and profile.
/// Without cargo (a test binary run by hand) the example must already be built. Panics with
/// the fix when it cannot be had.
pub fn kvmi_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_bin("kvmi")).clone()
}

/// The hostile tool's program: this package's example `hostile_tool`
/// (`examples/hostile_tool.rs`, see [`hostile`]), built on demand as [`kvmi_bin`] is.
pub fn hostile_tool_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_bin("hostile_tool")).clone()
}

/// The seccomp tests' child process: this package's example `seccomp_child`
/// (`examples/seccomp_child.rs`), built on demand as [`kvmi_bin`] is.
pub fn seccomp_child_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_bin("seccomp_child")).clone()
}

/// This package's example `name`, brought up to date with cargo when cargo runs the tests.
fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("examples").join(name);
    if let (Some(cargo), Some(target_dir)) = (std::env::var_os("CARGO"), profile_dir.parent()) {
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", "kvmi-tests", "--example", name])
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .unwrap_or_else(|e| panic!("run cargo to build the {name} example: {e}"));
        assert!(
            status.success(),
            "building the {name} example failed ({status})"
        );
    }
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p kvmi-tests --example {name}`",
        bin.display()
    );
    bin
}
