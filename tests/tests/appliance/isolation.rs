//! `kvmi run --isolate` (docs/isolation.md): the supervisor and its VM processes, as a user
//! runs them (real KVM, the real binary, real processes and signals).

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Starts `kvmi run --isolate WORDS` with stdout piped into a channel of lines.
fn start(words: &[&str]) -> (Child, Receiver<String>) {
    let mut child = Command::new(kvmi_tests::kvmi_bin())
        .current_dir(std::env::temp_dir())
        .arg("run")
        .arg("--isolate")
        .args(words)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvmi starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let rx = kvmi_tests::wait::line_channel(stdout);
    (child, rx)
}

/// Waits for a finding of kind `kind` (60 s at most).
fn wait_for(rx: &Receiver<String>, kind: &str, child: &mut Child) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|f: &Value| f["finding"] == kind) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(serde_json::from_str(&line).expect("stdout is JSON lines")),
            Err(_) => {
                let _ = child.kill();
                panic!("no {kind} finding within 60 s; saw {seen:?}");
            }
        }
    }
    seen
}

/// The children of `pid` (from /proc/PID/task/*/children).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let path = task.expect("task entry").path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|w| w.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// A field of /proc/PID/status, if the process exists.
fn status_field(pid: u32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Whether `pid` is gone or a zombie.
fn is_dead(pid: u32) -> bool {
    status_field(pid, "State").is_none_or(|s| s.starts_with('Z') || s.starts_with('X'))
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of a process this test started and a valid signal number
    // has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn the_vms_run_in_a_child_process_that_dies_with_the_supervisor() {
    if !kvmi_tests::require_kvm("the_vms_run_in_a_child_process_that_dies_with_the_supervisor") {
        return;
    }
    let (mut child, rx) = start(&[]);
    let seen = wait_for(&rx, "guard", &mut child);
    assert!(
        seen.iter().all(|f| f["target_name"] == "demo-target"),
        "{seen:?}"
    );
    let vms = children(child.id());
    assert_eq!(vms.len(), 1, "one VM process under the supervisor: {vms:?}");
    let vm = vms[0];
    assert_eq!(
        status_field(vm, "PPid").as_deref(),
        Some(child.id().to_string().as_str())
    );
    // The supervisor holds no VM: no KVM descriptor and no guest memory in it.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .expect("the supervisor's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        fds.iter()
            .all(|p| !p.contains("kvm") && !p.contains("memfd")),
        "the supervisor holds no VM: {fds:?}"
    );
    let vm_fds: Vec<String> = std::fs::read_dir(format!("/proc/{vm}/fd"))
        .expect("the VM process's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(vm_fds.iter().any(|p| p.contains("kvm-vm")), "{vm_fds:?}");
    // SIGKILL of the supervisor: the VM process goes too (PR_SET_PDEATHSIG).
    kill(child.id(), libc::SIGKILL);
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !is_dead(vm) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        is_dead(vm),
        "VM process {vm} outlived its supervisor by 2 s"
    );
}

#[test]
fn a_killed_vm_process_is_reported_by_pid_and_signal() {
    if !kvmi_tests::require_kvm("a_killed_vm_process_is_reported_by_pid_and_signal") {
        return;
    }
    let (mut child, rx) = start(&[]);
    wait_for(&rx, "guard", &mut child);
    let vms = children(child.id());
    assert_eq!(vms.len(), 1, "{vms:?}");
    kill(vms[0], libc::SIGKILL);
    let out = child.wait_with_output().expect("the supervisor ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {}) killed by signal 9 SIGKILL", vms[0])),
        "{stderr}"
    );
}

#[test]
fn a_timeout_ends_the_isolated_run_with_the_usual_status_and_summaries() {
    if !kvmi_tests::require_kvm(
        "a_timeout_ends_the_isolated_run_with_the_usual_status_and_summaries",
    ) {
        return;
    }
    let (child, rx) = start(&["--timeout", "3"]);
    let out = child.wait_with_output().expect("kvmi ends");
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<Value> = rx
        .iter()
        .map(|l| serde_json::from_str(&l).expect("JSON lines"))
        .collect();
    let finals = seen
        .iter()
        .filter(|f| f["finding"] == "summary" && f["final"] == true)
        .count();
    assert_eq!(finals, 1, "{seen:?}");
}
