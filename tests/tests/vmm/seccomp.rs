//! The seccomp allow-lists (`vmm::seccomp`): a syscall outside a list kills the process with
//! SIGSYS; under `kvmi run` every vCPU and service thread is filtered and the main thread is
//! not; `--no-seccomp` filters nothing; `kvmi caps` reports the support.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvmi_tests::wait;

/// Runs the child in `mode`; returns its stdout and how it ended.
fn child(mode: &str) -> (String, std::process::ExitStatus) {
    let (out, _, status) = child_with_stderr(mode);
    (out, status)
}

/// Runs the child in `mode` with RUST_BACKTRACE=1; returns its stdout, stderr and status.
fn child_with_stderr(mode: &str) -> (String, String, std::process::ExitStatus) {
    let out = Command::new(kvmi_tests::seccomp_child_bin())
        .arg(mode)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (text(&out.stdout), text(&out.stderr), out.status)
}

#[test]
fn a_socket_call_on_a_vcpu_thread_kills_the_process_after_allowed_calls_worked() {
    let (out, status) = child("socket");
    assert!(out.contains("filter installed\n"), "{out}");
    assert!(out.contains("allowed syscalls returned\n"), "{out}");
    assert!(!out.contains("survived"), "{out}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?} {out}");
}

#[test]
fn argument_rules_kill_an_executable_mapping_and_a_non_kvm_ioctl() {
    for mode in ["exec-mmap", "tty-ioctl"] {
        let (out, status) = child(mode);
        assert!(out.contains("filter installed\n"), "{mode}: {out}");
        assert!(!out.contains("survived"), "{mode}: {out}");
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{mode}: {status:?}");
    }
}

#[test]
fn execve_on_a_service_thread_kills_the_process() {
    let (out, status) = child("execve");
    assert!(out.contains("filter installed\n"), "{out}");
    assert!(!out.contains("survived"), "{out}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

#[test]
fn a_panic_on_a_filtered_thread_is_reported_not_killed() {
    // RUST_BACKTRACE=1: the panic hook prints a symbolized backtrace (it reads files).
    let (out, err, status) = child_with_stderr("panic");
    assert!(err.contains("panicked at"), "{err}");
    assert!(err.contains("a bug on a vCPU thread"), "{err}");
    assert!(err.contains("stack backtrace:"), "{err}");
    assert!(err.contains("seccomp_child::main"), "no symbols: {err}");
    assert!(
        out.contains("panic caught: a bug on a vCPU thread\n"),
        "{status:?} {out}"
    );
    assert!(out.contains("thread joined\n"), "{out}");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// (thread id, name, `Seccomp:` mode) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(u32, String, u32)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|s| s.trim().to_string())
        };
        let (Some(name), Some(mode)) = (field("Name:"), field("Seccomp:")) else {
            continue;
        };
        v.push((tid, name, mode.parse().unwrap()));
    }
    v
}

/// Starts `kvmi run --no-isolate ARGS` (its serial output and logs discarded): every VM in
/// this one process, whose threads the tests look at (the split per VM process is checked in
/// the appliance suite's `isolation` tests).
fn spawn_run(args: &[&str]) -> Child {
    Command::new(kvmi_tests::kvmi_bin())
        .args(["run", "--no-isolate"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until `kvmi run` has every thread named in `names` (at least that many of each) and,
/// when `mode` is given, each of them reports it (a thread installs its filter just after it
/// is named). Returns the last view of its threads (the assertions show it).
fn wait_for_threads(
    child: &Child,
    names: &[(&str, usize)],
    mode: Option<u32>,
) -> Vec<(u32, String, u32)> {
    let pid = child.id();
    let mut last = Vec::new();
    wait::within(Duration::from_secs(30), || {
        last = threads(pid);
        names.iter().all(|(n, count)| {
            let named: Vec<_> = last.iter().filter(|(_, name, _)| name == n).collect();
            named.len() >= *count && mode.is_none_or(|m| named.iter().all(|(_, _, s)| *s == m))
        })
    });
    last
}

/// Ctrl-C, then the run's status.
fn interrupt(mut child: Child) -> Option<i32> {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    child.wait().unwrap().code()
}

#[test]
fn kvmi_run_filters_every_vcpu_and_ring_service_thread_but_not_main() {
    if !kvmi_tests::require_kvm("kvmi_run_filters_every_vcpu_and_ring_service_thread_but_not_main")
    {
        return;
    }
    // The main job: the demo target and the appliance VM, one vCPU each, and the ring
    // service of the target's slot.
    let child = spawn_run(&["--timeout", "60"]);
    let pid = child.id();
    let t = wait_for_threads(&child, &[("vcpu0", 2), ("kvmi-rings", 1)], Some(2));
    let status = interrupt(child);
    assert_eq!(
        t.iter().filter(|(_, n, _)| n == "vcpu0").count(),
        2,
        "{t:?}"
    );
    assert!(t.iter().any(|(_, n, _)| n == "kvmi-rings"), "{t:?}");
    for (tid, name, mode) in &t {
        match name.as_str() {
            "vcpu0" | "kvmi-rings" => assert_eq!(*mode, 2, "{name} ({tid}): {t:?}"),
            _ if *tid == pid => assert_eq!(*mode, 0, "main thread: {t:?}"),
            _ => {}
        }
    }
    assert!(t.iter().any(|(tid, _, _)| *tid == pid), "{t:?}");
    // Ctrl-C still ends the filtered run the usual way (no SIGSYS).
    assert_eq!(status, Some(130), "{t:?}");
}

#[test]
fn kvmi_run_filters_the_kvmi_socket_threads() {
    if !kvmi_tests::require_kvm("kvmi_run_filters_the_kvmi_socket_threads") {
        return;
    }
    let socket = std::env::temp_dir().join(format!("kvmi-seccomp-{}.sock", std::process::id()));
    let child = spawn_run(&[
        "--image",
        "test-guest",
        "--cmdline",
        "mode=spin",
        "--vcpus",
        "2",
        "--kvmi-socket",
        socket.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    let pid = child.id();
    let names = [
        ("vcpu0", 1),
        ("vcpu1", 1),
        ("kvmi-socket", 1),
        ("kvmi-tool", 1),
    ];
    let t = wait_for_threads(&child, &names, Some(2));
    let status = interrupt(child);
    for (name, _) in names {
        assert!(t.iter().any(|(_, n, _)| n == name), "no {name}: {t:?}");
    }
    for (tid, name, mode) in &t {
        match name.as_str() {
            "vcpu0" | "vcpu1" | "kvmi-socket" | "kvmi-tool" => {
                assert_eq!(*mode, 2, "{name} ({tid}): {t:?}")
            }
            _ if *tid == pid => assert_eq!(*mode, 0, "main thread: {t:?}"),
            _ => {}
        }
    }
    assert_eq!(status, Some(130), "{t:?}");
    std::fs::remove_file(&socket).ok();
}

#[test]
fn no_seccomp_filters_no_thread() {
    if !kvmi_tests::require_kvm("no_seccomp_filters_no_thread") {
        return;
    }
    let child = spawn_run(&["--no-seccomp", "--timeout", "60"]);
    let t = wait_for_threads(&child, &[("vcpu0", 2), ("kvmi-rings", 1)], None);
    let status = interrupt(child);
    assert_eq!(
        t.iter().filter(|(_, n, _)| n == "vcpu0").count(),
        2,
        "{t:?}"
    );
    assert!(t.iter().all(|(_, _, mode)| *mode == 0), "{t:?}");
    assert_eq!(status, Some(130), "{t:?}");
}

#[test]
fn caps_says_whether_seccomp_is_available_and_on_by_default() {
    if !kvmi_tests::require_kvm("caps_says_whether_seccomp_is_available_and_on_by_default") {
        return;
    }
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(["caps", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // This host filters (the tests above prove it): the probe must say so.
    assert_eq!(caps["seccomp"]["available"], true, "{caps}");
    assert_eq!(caps["seccomp"]["on_by_default"], true, "{caps}");
    let out = Command::new(kvmi_tests::kvmi_bin())
        .arg("caps")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("seccomp filters"))
        .unwrap_or_else(|| panic!("no seccomp row: {table}"));
    let words: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(words[2], "yes", "{row}");
    assert!(row.contains("on by default"), "{row}");
    assert!(row.contains("--no-seccomp"), "{row}");
}
