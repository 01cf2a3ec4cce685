//! `kvmi run --isolate` (docs/isolation.md): the supervisor and its VM processes, as a user
//! runs them (real KVM, the real binary, real processes and signals).

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills supervisor `pid` (its VM processes die with it) when a test ends early on a
/// failed assertion; a supervisor that ended is left alone.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !is_dead(self.0) {
            // SAFETY: kill(2) on the pid of a supervisor this test started (not yet reaped:
            // its /proc entry exists) has no memory effects.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

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

/// The VM processes under supervisor `pid`: (pid, role) with role `vmm-target`,
/// `vmm-appliance` or `vmm-fleet` (from their command lines).
fn vm_processes(pid: u32) -> Vec<(u32, String)> {
    children(pid)
        .into_iter()
        .filter_map(|child| {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).ok()?;
            let role = cmdline
                .split(|&b| b == 0)
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .find(|w| w.starts_with("vmm-"))?;
            Some((child, role))
        })
        .collect()
}

/// The pids of the processes of `role` under supervisor `pid`.
fn with_role(pid: u32, role: &str) -> Vec<u32> {
    vm_processes(pid)
        .into_iter()
        .filter(|(_, r)| r == role)
        .map(|(p, _)| p)
        .collect()
}

/// What the descriptors of `pid` point to (readlink of `/proc/PID/fd/*`).
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The `Seccomp:` mode of every thread of `pid` named `name`.
fn seccomp_of_threads(pid: u32, name: &str) -> Vec<u32> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        if field("Name:").as_deref() == Some(name)
            && let Some(mode) = field("Seccomp:").and_then(|m| m.parse().ok())
        {
            modes.push(mode);
        }
    }
    modes
}

/// Starts `kvmi run --isolate WORDS` with stdout and stderr each piped into a channel of
/// lines.
fn start_both(words: &[&str]) -> (Child, Receiver<String>, Receiver<String>) {
    let (mut child, rx) = start(words);
    let stderr = child.stderr.take().expect("piped stderr");
    (child, rx, kvmi_tests::wait::line_channel(stderr))
}

/// Waits (60 s at most) for a stderr line containing `text`; returns the lines seen.
fn wait_for_err(rx: &Receiver<String>, text: &str, child: &mut Child) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|l: &String| l.contains(text)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no stderr line with {text:?} within 60 s; saw {seen:#?}");
            }
        }
    }
    seen
}

#[test]
fn each_vm_runs_in_its_own_process_under_seccomp_and_all_die_with_the_supervisor() {
    if !kvmi_tests::require_kvm("each_vm_runs_in_its_own_process_under_seccomp") {
        return;
    }
    let (mut child, rx) = start(&["--targets", "2"]);
    let _kill = KillOnDrop(child.id());
    let seen = wait_for(&rx, "guard", &mut child);
    assert!(
        seen.iter()
            .all(|f| f["target_name"] == "demo-target-1" || f["target_name"] == "demo-target-2"),
        "{seen:?}"
    );
    let supervisor = child.id();
    kvmi_tests::wait::until(Duration::from_secs(30), "both targets' vCPUs", || {
        with_role(supervisor, "vmm-target")
            .iter()
            .all(|&t| !seccomp_of_threads(t, "vcpu0").is_empty())
            && with_role(supervisor, "vmm-target").len() == 2
    });
    let appliances = with_role(supervisor, "vmm-appliance");
    let targets = with_role(supervisor, "vmm-target");
    assert_eq!(
        (
            appliances.len(),
            targets.len(),
            vm_processes(supervisor).len()
        ),
        (1, 2, 3),
        "one appliance and one process per target: {:?}",
        vm_processes(supervisor)
    );
    // The supervisor holds no VM: no KVM descriptor and no guest memory (the token pages it
    // hands out are its only memfds).
    let fds = fd_targets(supervisor);
    assert!(
        fds.iter().all(|p| p != "/dev/kvm"
            && !p.starts_with("anon_inode:kvm")
            && (!p.contains("memfd") || p.starts_with("/memfd:kvmi-tokens-"))),
        "the supervisor holds no VM: {fds:?}"
    );
    // Each target process: its VM, and exactly three memfds: its RAM, its slot's ring region
    // and its token page. Nothing of the appliance's (its RAM, the directory, the other
    // slot) and nothing of the other target.
    let memfds = |pid: u32| {
        let mut names: Vec<String> = fd_targets(pid)
            .into_iter()
            .filter_map(|p| {
                Some(
                    p.strip_prefix("/memfd:")?
                        .trim_end_matches(" (deleted)")
                        .to_string(),
                )
            })
            .collect();
        names.sort();
        names
    };
    let mut slots = Vec::new();
    for &t in &targets {
        assert!(fd_targets(t).iter().any(|p| p.contains("kvm-vm")));
        let names = memfds(t);
        let n = if names.contains(&"kvmi-demo-target-1".to_string()) {
            1
        } else {
            2
        };
        let want_ring = names
            .iter()
            .find(|m| m.starts_with("kvmi-ring-region-"))
            .cloned()
            .unwrap_or_default();
        let mut want = vec![
            format!("kvmi-demo-target-{n}"),
            want_ring.clone(),
            format!("kvmi-tokens-demo-target-{n}"),
        ];
        want.sort();
        assert_eq!(
            names, want,
            "target {n}'s process holds only its own memory"
        );
        slots.push(want_ring);
        // Every vCPU and service thread runs under its seccomp filter (mode 2): the vCPU,
        // the ring service, the doorbell and the link threads.
        for thread in ["vcpu0", "kvmi-rings", "kvmi-kick", "kvmi-link"] {
            let modes = seccomp_of_threads(t, thread);
            assert!(
                !modes.is_empty() && modes.iter().all(|&m| m == 2),
                "target {n}'s {thread}: {modes:?}"
            );
        }
        // Its main thread too, once the VM runs (it only waits, stops and prints).
        let main = std::fs::read_to_string(format!("/proc/{t}/task/{t}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Seccomp:"))
                    .map(|m| m.trim().to_string())
            });
        assert_eq!(main.as_deref(), Some("2"), "target {n}'s main thread");
    }
    slots.sort();
    assert_eq!(
        slots,
        ["kvmi-ring-region-0", "kvmi-ring-region-1"],
        "one slot each"
    );
    // The appliance process: its VM and RAM, the directory, both rings, both targets' RAM
    // (read-only, by the link) and their token pages.
    let names = memfds(appliances[0]);
    assert_eq!(
        names,
        [
            "kvmi-appliance",
            "kvmi-demo-target-1",
            "kvmi-demo-target-2",
            "kvmi-directory",
            "kvmi-ring-region-0",
            "kvmi-ring-region-1",
            "kvmi-tokens-demo-target-1",
            "kvmi-tokens-demo-target-2"
        ],
    );
    for thread in ["vcpu0", "kvmi-slot-log", "kvmi-slot-watch"] {
        let modes = seccomp_of_threads(appliances[0], thread);
        assert!(
            !modes.is_empty() && modes.iter().all(|&m| m == 2),
            "the appliance's {thread}: {modes:?}"
        );
    }

    // SIGKILL of the supervisor: every VM process goes too (PR_SET_PDEATHSIG).
    let all: Vec<u32> = vm_processes(supervisor).iter().map(|(p, _)| *p).collect();
    kill(supervisor, libc::SIGKILL);
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !all.iter().all(|&p| is_dead(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive: Vec<&u32> = all.iter().filter(|&&p| !is_dead(p)).collect();
    assert!(
        alive.is_empty(),
        "VM processes {alive:?} outlived their supervisor by 2 s"
    );
}

#[test]
fn without_an_appliance_the_one_vm_runs_in_one_process() {
    if !kvmi_tests::require_kvm("without_an_appliance_the_one_vm_runs_in_one_process") {
        return;
    }
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args([
            "run",
            "--isolate",
            "--no-appliance",
            "--cmdline",
            "rounds=3",
        ])
        .output()
        .expect("kvmi runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("rounds=3"),
        "the demo target's banner: {stdout}"
    );
}

#[test]
fn a_killed_target_process_is_reported_and_the_appliance_and_the_other_target_run_on() {
    if !kvmi_tests::require_kvm("a_killed_target_process_is_reported") {
        return;
    }
    let (mut child, rx, err) = start_both(&["--targets", "2"]);
    let _kill = KillOnDrop(child.id());
    wait_for(&rx, "guard", &mut child);
    let supervisor = child.id();
    kvmi_tests::wait::until(Duration::from_secs(30), "two target processes", || {
        with_role(supervisor, "vmm-target").len() == 2
    });
    // Target 2's process, by the RAM it holds.
    let victim = with_role(supervisor, "vmm-target")
        .into_iter()
        .find(|&t| {
            fd_targets(t)
                .iter()
                .any(|p| p.starts_with("/memfd:kvmi-demo-target-2"))
        })
        .expect("target 2's process");
    let appliance = with_role(supervisor, "vmm-appliance")[0];
    kill(victim, libc::SIGKILL);
    // The supervisor names it; the appliance frees its slot (grants revoked).
    wait_for_err(
        &err,
        &format!("target demo-target-2 (pid {victim}) killed by signal 9 SIGKILL"),
        &mut child,
    );
    // (That the appliance then frees the slot and revokes its pages is checked on the slot
    // ends: `a_target_process_killed_frees_its_slot_in_the_appliance_process`.)
    // Target 1 is still guarded: new findings about it keep coming.
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while after < 3 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            let f: Value = serde_json::from_str(&line).expect("JSON lines");
            if f["target"] == 1 {
                after += 1;
            }
        }
    }
    assert!(after >= 3, "target 1 was not guarded after target 2 died");
    assert!(
        !is_dead(appliance),
        "the appliance process went with the target"
    );
    // Ctrl-C: the run ends as usual, with target 1's status.
    kill(supervisor, libc::SIGINT);
    let status = child.wait().expect("the supervisor ends");
    assert_eq!(status.code(), Some(130));
    let rest: Vec<String> = err.iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("kvmi: target 1 (demo-target-1) ended: interrupted")),
        "{rest:#?}"
    );
}

#[test]
fn a_killed_appliance_process_is_replaced_then_its_target_runs_on_unhooked() {
    if !kvmi_tests::require_kvm("a_killed_appliance_process_is_replaced") {
        return;
    }
    let (mut child, rx, err) = start_both(&[
        "--cmdline",
        "rounds=400",
        "--appliance-restarts",
        "1",
        "--timeout",
        "120",
    ]);
    let _kill = KillOnDrop(child.id());
    wait_for(&rx, "guard", &mut child);
    let supervisor = child.id();
    let target = with_role(supervisor, "vmm-target")[0];
    let first = with_role(supervisor, "vmm-appliance")[0];
    kill(first, libc::SIGKILL);
    wait_for_err(
        &err,
        &format!(
            "the appliance process (pid {first}) killed by signal 9 SIGKILL; started appliance #1 \
             for 1 targets"
        ),
        &mut child,
    );
    // The new appliance guards the same target (a second start and guard).
    let seen = wait_for(&rx, "guard", &mut child);
    assert!(seen.iter().any(|f| f["finding"] == "start"), "{seen:?}");
    let second = kvmi_tests::wait::until_some(Duration::from_secs(10), "the new appliance", || {
        with_role(supervisor, "vmm-appliance").into_iter().next()
    });
    assert_ne!(second, first);
    assert_eq!(
        with_role(supervisor, "vmm-target"),
        vec![target],
        "the same target process"
    );
    // No restart left: the target runs on, unhooked, to its own end.
    kill(second, libc::SIGKILL);
    wait_for_err(&err, "the targets run on, unhooked", &mut child);
    let lines = wait_for_err(&err, "heartbeat round=", &mut child);
    assert!(!lines.is_empty());
    let status = child.wait().expect("the supervisor ends");
    let rest: Vec<String> = err.iter().collect();
    assert_eq!(status.code(), Some(0), "{rest:#?}");
    assert!(
        rest.iter().any(|l| l.contains(
            "kvmi: target 1 (demo-target) ended: guest exited with \
                                        status 0"
        )),
        "{rest:#?}"
    );
    assert!(rest.iter().any(|l| l.ends_with("restarts 1")), "{rest:#?}");
}

#[test]
fn a_killed_target_process_is_reported_by_pid_and_signal_and_its_status_is_the_runs() {
    if !kvmi_tests::require_kvm("a_killed_target_process_is_reported_by_pid_and_signal") {
        return;
    }
    let (mut child, rx) = start(&[]);
    let _kill = KillOnDrop(child.id());
    wait_for(&rx, "guard", &mut child);
    let targets = with_role(child.id(), "vmm-target");
    assert_eq!(targets.len(), 1, "{:?}", vm_processes(child.id()));
    kill(targets[0], libc::SIGKILL);
    let out = child.wait_with_output().expect("the supervisor ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {}) killed by signal 9 SIGKILL", targets[0])),
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
    let _kill = KillOnDrop(child.id());
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

// The split's building blocks across real processes: a target's end of its slot
// (`appliance_link::remote::TargetSlot`) in a child process of this test, the appliance's end
// (`ApplianceSlot`) here, joined by a socket pair as the supervisor will join them.

/// Where the child finds its end of the link.
const LINK_FD: i32 = 3;
/// The environment variable that makes `slot_target_process` run.
const CHILD_ENV: &str = "KVMI_TEST_SLOT_CHILD";

/// The target process of `a_target_process_killed_frees_its_slot_in_the_appliance_process`
/// (run by it as a child; does nothing otherwise): a test-guest target that spins, with its
/// introspector on the slot link at descriptor 3; prints `ready` once attached and running.
#[test]
#[ignore = "a child process of another test"]
fn slot_target_process() {
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream;
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let (target, intro) = spinning_target("kvmi-ram-child");
    // SAFETY: the parent put the link's socket at descriptor 3 for this process alone.
    let stream = unsafe { UnixStream::from_raw_fd(LINK_FD) };
    let ram = target.ram().clone();
    let slot = appliance_link::remote::TargetSlot::attach(
        stream,
        intro.clone(),
        &ram,
        Duration::from_secs(5),
    )
    .unwrap();
    let running = target.start().unwrap();
    intro.set_handle(running.handle());
    println!("ready");
    // Until the parent kills this process (or 60 s).
    std::thread::sleep(Duration::from_secs(60));
    drop(slot);
}

/// A one-vCPU test-guest VM in `mode=spin` named `name` (its RAM memfd's name), built and not
/// started, with its introspector installed.
fn spinning_target(name: &str) -> (vmm::Vm, std::sync::Arc<kvmi_engine::Introspector>) {
    let caps = vmm::probe::cached_capabilities().expect("probe");
    let config = vmm::VmConfig {
        name: name.into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: "mode=spin".into(),
        unknown_io: vmm::UnknownIoPolicy::Ignore,
    };
    let mut target = vmm::Vm::new(
        config,
        kvmi_tests::common::elf(kvmi::images::Image::TestGuest),
    )
    .unwrap();
    target.set_serial(vmm::SerialSink::Null);
    let intro = kvmi_engine::Introspector::install(
        &mut target,
        caps,
        kvmi_engine::IntrospectorConfig::default(),
    )
    .unwrap();
    (target, intro)
}

/// The names of the memfds process `pid` holds (readlink of `/proc/PID/fd/*`).
fn memfds_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with("/memfd:"))
        .collect()
}

/// The appliance's end of a slot whose target's end runs in a child process (a spinning
/// test-guest VM): the child, the slot, the agent's view of the ring region, and the lines the
/// slot's log printed.
struct ChildSlot {
    child: Child,
    slot: appliance_link::remote::ApplianceSlot,
    app: hypercall::ring::Region<appliance_link::rings::RingMemory>,
}

/// Re-runs this test binary as the ignored test `role` (a slot end in a child process), with
/// `link` at [`LINK_FD`] and its stdout piped; `link` is closed here.
fn spawn_role(role: &str, link: std::os::unix::net::UnixStream) -> Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let their_fd = link.as_raw_fd();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            &format!("isolation::{role}"),
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and makes only the
    // async-signal-safe calls dup2 and fcntl.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(their_fd, LINK_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(LINK_FD, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    drop(link);
    child
}

fn spawn_slot_child() -> ChildSlot {
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use appliance_link::remote::{ApplianceSlot, SlotSetup};
    use hypercall::ring::{Region, SharedRegion};
    use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenVerifier};

    let (appliance_end, target_end) = UnixStream::pair().unwrap();
    let mut child = spawn_role("slot_target_process", target_end);

    let params = crate::rings::slot_params();
    let ring = crate::rings::slot_ring("kvmi-ring-slot0", &params);
    let slot = ApplianceSlot::connect(
        appliance_end,
        SlotSetup {
            ring: ring.clone(),
            ring_gpa: 0xC000_0000,
            params,
            verifier: Arc::new(TokenVerifier::new(
                TargetKey::generate(1, DEFAULT_TTL).unwrap(),
            )),
            window: Arc::new(vmm::window::RemapWindow::new(1 << 20).unwrap()),
            window_gpa: 0xC100_0000,
            target: (1, "child".into()),
            sink: Box::new(|_: &[u8]| {}),
        },
    );
    let slot = match slot {
        Ok(slot) => slot,
        Err(e) => {
            let _ = child.kill();
            panic!("the appliance's end of the slot: {e}");
        }
    };
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("the target process ended before it was ready");
        }
    }
    // SAFETY: the ring memory's mapping lives as long as `ring`, which the region owns.
    let memory = unsafe { SharedRegion::new(ring.clone(), ring.host_base(), ring.size() as usize) };
    let app = Region::open(Arc::new(memory.unwrap())).unwrap();
    ChildSlot { child, slot, app }
}

/// Sends `n` GET_VERSION commands one at a time, each followed by `notify`, and waits for
/// each reply; returns the time taken.
fn command_round_trips(
    app: &hypercall::ring::Region<appliance_link::rings::RingMemory>,
    notify: &dyn Fn(),
    n: u32,
) -> Duration {
    use hypercall::discovery::RingKind;
    use protocol::wire::WireProfile;
    let mut commands = app.producer_for(RingKind::Command, 0).unwrap();
    let mut replies = app.consumer_for(RingKind::CommandReply, 0).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut record = vec![0u8; replies.max_payload()];
    let started = Instant::now();
    for seq in 0..n {
        let len =
            protocol::V4::encode_command(seq, &protocol::command::Command::GetVersion, &mut buf)
                .unwrap();
        commands.try_push(&buf[..len]).unwrap();
        let _ = commands.publish().unwrap();
        notify();
        let deadline = Instant::now() + Duration::from_secs(10);
        while replies.try_pop(&mut record).unwrap().is_none() {
            assert!(Instant::now() < deadline, "no reply to command {seq}");
            std::hint::spin_loop();
        }
        let _ = replies.release().unwrap();
    }
    started.elapsed()
}

#[test]
fn a_target_process_killed_frees_its_slot_in_the_appliance_process() {
    if !kvmi_tests::require_kvm("a_target_process_killed_frees_its_slot_in_the_appliance_process") {
        return;
    }
    // What only the appliance process holds: another slot's ring memory and another target's
    // RAM. The target process must see neither.
    let _other_ring = vmm::GuestRam::new("kvmi-ring-slot1", 1 << 16).unwrap();
    let _other_target = vmm::GuestRam::new("kvmi-ram-other", 1 << 16).unwrap();
    let ChildSlot {
        mut child,
        slot,
        app,
    } = spawn_slot_child();

    // A process of its own, holding its RAM and its slot's ring region, nothing else of ours.
    let pid = child.id();
    let names = memfds_of(pid);
    assert!(
        names.iter().any(|n| n.contains("kvmi-ram-child")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("kvmi-ring-slot0")),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.contains("kvmi-ring-slot1") || n.contains("kvmi-ram-other")),
        "the target process holds the appliance's other memory: {names:?}"
    );

    // The appliance's NOTIFY crosses the process boundary: commands are answered.
    let waker = slot.waker();
    command_round_trips(&app, &|| waker.notify(hypercall::call::NOTIFY_ALL_RINGS), 3);

    // SIGKILL of the target process: the appliance frees its slot.
    assert!(!slot.is_gone());
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let _ = child.wait();
    kvmi_tests::wait::until(Duration::from_secs(5), "the slot to be freed", || {
        slot.is_gone()
    });
    assert_eq!(slot.pager().mapped_pages(), 0);
    let _ = slot.close();
}

/// A measurement, not a check (run with `--ignored`): the command round trip (GET_VERSION,
/// NOTIFY, reply) with the target's end in a child process (doorbell eventfd, served on the
/// target's `kvmi-kick` thread) against the in-process ring service (NOTIFY served inline on
/// the caller's thread, as `kvmi run` does today).
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn command_round_trip_across_processes_vs_in_process() {
    if !kvmi_tests::require_kvm("command_round_trip_across_processes_vs_in_process") {
        return;
    }

    use appliance_link::rings::{RingService, create_region};
    use hypercall::ring::Region;
    const N: u32 = 2000;

    // Across processes.
    let ChildSlot {
        mut child,
        slot,
        app,
    } = spawn_slot_child();
    let waker = slot.waker();
    let notify = || waker.notify(hypercall::call::NOTIFY_ALL_RINGS);
    command_round_trips(&app, &notify, 100);
    let across = command_round_trips(&app, &notify, N);
    let _ = child.kill();
    let _ = child.wait();
    drop(slot);

    // In process: the same guest, the ring service started as the fleet starts it.
    let caps = vmm::probe::cached_capabilities().expect("probe");
    let config = vmm::VmConfig {
        name: "kvmi-ram-inproc".into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: "mode=spin".into(),
        unknown_io: vmm::UnknownIoPolicy::Ignore,
    };
    let mut target = vmm::Vm::new(
        config,
        kvmi_tests::common::elf(kvmi::images::Image::TestGuest),
    )
    .unwrap();
    target.set_serial(vmm::SerialSink::Null);
    let intro = kvmi_engine::Introspector::install(
        &mut target,
        caps,
        kvmi_engine::IntrospectorConfig::default(),
    )
    .unwrap();
    let params = crate::rings::slot_params();
    let ring = crate::rings::slot_ring("kvmi-ring-inproc", &params);
    let region = create_region(ring, &params).unwrap();
    let running = target.start().unwrap();
    intro.set_handle(running.handle());
    let service = RingService::start(
        intro.clone(),
        &region,
        Box::new(|_| {}),
        Duration::from_secs(5),
    )
    .unwrap();
    let app = Region::open(region.memory().clone()).unwrap();
    let waker = service.waker();
    let notify = || waker.notify(hypercall::call::NOTIFY_ALL_RINGS);
    command_round_trips(&app, &notify, 100);
    let inline = command_round_trips(&app, &notify, N);
    let _ = service.stop();
    running.handle().stop();
    let _ = running.wait(vmm::RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });

    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(N);
    println!(
        "command round trip over {N}: across processes {:.2} us, in process {:.2} us, ratio {:.2}",
        per(across),
        per(inline),
        per(across) / per(inline)
    );
}

/// The appliance process of `an_appliance_process_killed_leaves_its_target_running` (run by it
/// as a child; does nothing otherwise): the appliance's end of one slot on the link at
/// descriptor 3; prints `ready` once the link is set up.
#[test]
#[ignore = "a child process of another test"]
fn slot_appliance_process() {
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use appliance_link::remote::{ApplianceSlot, SlotSetup};
    use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenVerifier};
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    // SAFETY: the parent put the link's socket at descriptor 3 for this process alone.
    let stream = unsafe { UnixStream::from_raw_fd(LINK_FD) };
    let params = crate::rings::slot_params();
    let ring = crate::rings::slot_ring("kvmi-ring-slot0", &params);
    let slot = ApplianceSlot::connect(
        stream,
        SlotSetup {
            ring,
            ring_gpa: 0xC000_0000,
            params,
            verifier: Arc::new(TokenVerifier::new(
                TargetKey::generate(1, DEFAULT_TTL).unwrap(),
            )),
            window: Arc::new(vmm::window::RemapWindow::new(1 << 20).unwrap()),
            window_gpa: 0xC100_0000,
            target: (1, "parent".into()),
            sink: Box::new(|_: &[u8]| {}),
        },
    )
    .unwrap();
    println!("ready");
    std::thread::sleep(Duration::from_secs(60));
    drop(slot);
}

#[test]
fn an_appliance_process_killed_leaves_its_target_running() {
    if !kvmi_tests::require_kvm("an_appliance_process_killed_leaves_its_target_running") {
        return;
    }
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;

    let (target_end, appliance_end) = UnixStream::pair().unwrap();
    let mut child = spawn_role("slot_appliance_process", appliance_end);

    // The target (this process): a spinning guest, introspected.
    let (target, intro) = spinning_target("kvmi-ram-parent");
    let ram = target.ram().clone();
    let slot = appliance_link::remote::TargetSlot::attach(
        target_end,
        intro.clone(),
        &ram,
        Duration::from_secs(5),
    );
    let slot = match slot {
        Ok(slot) => slot,
        Err(e) => {
            let _ = child.kill();
            panic!("the target's end of the slot: {e}");
        }
    };
    let running = target.start().unwrap();
    intro.set_handle(running.handle());
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("the appliance process ended before it was ready");
        }
    }
    assert!(intro.is_attached());
    // The appliance process holds its ring region and this target's RAM (read-only).
    let names = memfds_of(child.id());
    assert!(
        names.iter().any(|n| n.contains("kvmi-ring-slot0")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("kvmi-ram-parent")),
        "{names:?}"
    );

    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let _ = child.wait();
    kvmi_tests::wait::until(Duration::from_secs(5), "the detach", || {
        !intro.is_attached()
    });
    // The target runs on, unhooked (its VM has not ended 300 ms after the detach).
    std::thread::sleep(Duration::from_millis(300));
    assert!(!running.handle().has_ended(), "the target runs on");
    let end = slot.stop(&intro);
    assert!(end.link_lost, "{end:?}");
    running.handle().stop();
    let _ = running.wait(vmm::RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
}
