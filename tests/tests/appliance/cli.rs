//! `kvmi run` with no image — the main job: the demo target watched by the appliance VM — as
//! a user runs it (real KVM, the real binary): stdout carries only the appliance's JSON lines,
//! the serial output goes to stderr, the summary is reported.

use std::process::Command;

use serde_json::Value;

#[test]
fn kvmi_with_no_arguments_runs_the_main_job_until_ctrl_c() {
    if !kvmi_tests::require_kvm("kvmi_with_no_arguments_runs_the_main_job_until_ctrl_c") {
        return;
    }
    use std::process::Stdio;
    let mut child = Command::new(kvmi_tests::kvmi_bin())
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kvmi starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let rx = kvmi_tests::wait::line_channel(stdout);
    // The main job's first findings: the agent starts, then puts its guard in place.
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !seen.iter().any(|f: &Value| f["finding"] == "guard") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(serde_json::from_str(&line).expect("stdout is JSON lines")),
            Err(_) => {
                let _ = child.kill();
                panic!("no guard finding from `kvmi` within 60 s; saw {seen:?}");
            }
        }
    }
    assert_eq!(seen[0]["finding"], "start", "{seen:?}");
    assert_eq!(seen[0]["profile"], "demo-target", "{seen:?}");
    // Every line names the target it is about.
    assert!(
        seen.iter()
            .all(|f| f["target"] == 1 && f["target_name"] == "demo-target"),
        "{seen:?}"
    );
    // Ctrl-C stops it with the documented status, after the agent's final summary.
    // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().expect("kvmi ends");
    assert_eq!(status.code(), Some(130), "Ctrl-C status");
    // The reader thread ends at EOF: everything printed is in the channel now.
    seen.extend(
        rx.iter()
            .map(|l| serde_json::from_str::<Value>(&l).expect("JSON lines")),
    );
    let finals: Vec<&Value> = seen
        .iter()
        .filter(|f| f["finding"] == "summary" && f["final"] == true)
        .collect();
    assert_eq!(finals.len(), 1, "one final summary after Ctrl-C: {seen:?}");
    assert_eq!(finals[0]["target"], 1, "{seen:?}");
    assert_eq!(finals[0]["events"], finals[0]["replies"], "{seen:?}");
    let last = seen.last().unwrap();
    assert!(
        last["finding"] == "summary" && last["final"] == true,
        "the final summary is the last line: {seen:?}"
    );
}

#[test]
fn kvmi_run_main_job_prints_json_findings_on_stdout() {
    if !kvmi_tests::require_kvm("kvmi_run_appliance_prints_json_findings_on_stdout") {
        return;
    }
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(["run", "--cmdline", "rounds=6", "--timeout", "120"])
        .current_dir(std::env::temp_dir())
        .output()
        .expect("kvmi runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "6 rounds, then exit 0: {stderr}"
    );
    let findings: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    assert!(
        findings
            .iter()
            .any(|f| f["finding"] == "task" && f["name"] == "init"),
        "{stdout}"
    );
    assert!(
        findings.iter().any(|f| f["finding"] == "write_denied"),
        "{stdout}"
    );
    assert!(
        stderr.contains("heartbeat"),
        "serial output on stderr: {stderr}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f["finding"] == "task_create" && f["name"] == "worker-1" && f["parent"] == 1),
        "task creation traced by the breakpoint: {stdout}"
    );
    // The target started only once the agent's guard was in place: even the boot's first
    // task creation was traced.
    assert!(
        findings
            .iter()
            .any(|f| f["finding"] == "task_create" && f["name"] == "init" && f["parent"] == 0),
        "the boot's task creations traced: {stdout}"
    );
    assert!(
        stderr.contains("kvmi: target 1 (demo-target): guest exited with status 0"),
        "{stderr}"
    );
}

#[test]
fn kvmi_run_restarts_an_appliance_that_ends_and_refuses_orphan_appliance_options() {
    if !kvmi_tests::require_kvm("kvmi_run_restarts_an_appliance_that_ends") {
        return;
    }
    // Each agent stops after 40 events; one restart, then the target (300 rounds) runs on.
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args([
            "run",
            "--cmdline",
            "rounds=300",
            "--appliance-cmdline",
            "events=40",
            "--appliance-restarts",
            "1",
            "--timeout",
            "120",
        ])
        .current_dir(std::env::temp_dir())
        .output()
        .expect("kvmi runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let starts = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|f| f["finding"] == "start")
        .count();
    assert_eq!(starts, 2, "two agents, one after the other: {stdout}");
    assert!(
        stderr.contains("started appliance #1 for 1 targets"),
        "{stderr}"
    );
    assert!(stderr.contains("the targets run on, unhooked"), "{stderr}");
    assert!(stderr.contains("restarts 1\n"), "{stderr}");

    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(["run", "--no-appliance", "--appliance-restarts", "1"])
        .output()
        .expect("kvmi runs");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--appliance-restarts needs an appliance VM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_malformed_policy_is_refused_with_its_line_and_field_before_any_vm_starts() {
    // No KVM needed: the policy is checked before a VM is built.
    let dir = tempfile_dir("bad-policy");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "format = 1\n[[guard]]\nprofile = \"demo-target\"\n[[guard.protect]]\n\
         range = \"task_table\"\nallow = \"rx\"\non_violation = \"deni\"\n",
    )
    .unwrap();
    refused_before_any_vm(
        &["run", "--timeout", "30", "--policy"],
        &path,
        "bad.toml:7: guard[0].protect[0].on_violation: unknown value \"deni\"",
    );
}

#[test]
fn a_pause_rule_pauses_the_target_for_analysis_and_it_runs_on() {
    if !kvmi_tests::require_kvm("a_pause_rule_pauses_the_target_for_analysis_and_it_runs_on") {
        return;
    }
    let dir = tempfile_dir("pause-policy");
    let path = dir.join("pause.toml");
    let demo = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/demo.toml"),
    )
    .unwrap();
    std::fs::write(
        &path,
        demo.replace("on_violation = \"deny\"", "on_violation = \"pause\""),
    )
    .unwrap();
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args([
            "run",
            "--cmdline",
            "rounds=200",
            "--timeout",
            "120",
            "--policy",
        ])
        .arg(&path)
        .output()
        .expect("kvmi runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The target paused for each analysis and resumed: it ran its 200 rounds to the end.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let findings: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    let paused: Vec<&Value> = findings
        .iter()
        .filter(|f| f["finding"] == "paused_for_analysis")
        .collect();
    let analyses: Vec<&Value> = findings
        .iter()
        .filter(|f| f["finding"] == "pause_analysis")
        .collect();
    assert!(
        !paused.is_empty(),
        "the rootkit's writes hit the pause rule: {stdout}"
    );
    assert!(
        paused
            .iter()
            .all(|f| f["range"] == "task_table" && f["action"] == "pause")
    );
    assert_eq!(
        analyses.len(),
        paused.len(),
        "one analysis per pause: {stdout}"
    );
    for a in &analyses {
        assert_eq!(a["vcpus_paused"], 1, "{a}");
        assert!(
            a["tasks_live"].as_u64().unwrap() >= 4,
            "the task list was read: {a}"
        );
    }
    // No write_denied: this policy pauses instead.
    assert!(
        !findings.iter().any(|f| f["finding"] == "write_denied"),
        "{stdout}"
    );
}

#[test]
fn the_example_agent_written_out_by_kvmi_image_guards_two_targets() {
    if !kvmi_tests::require_kvm("the_example_agent_written_out_by_kvmi_image_guards_two_targets") {
        return;
    }
    // As the README's "Write your own agent" runs it: the embedded example agent, written to
    // a file, as the appliance of two demo targets that end by themselves after 100 rounds.
    let dir = tempfile_dir("example-agent");
    let elf = dir.join("agent.elf");
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(["image", "example-agent", "--output"])
        .arg(&elf)
        .output()
        .expect("kvmi runs");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&elf).unwrap().starts_with(b"\x7fELF"));
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(["run", "--appliance"])
        .arg(&elf)
        .args([
            "--targets",
            "2",
            "--cmdline",
            "rounds=100",
            "--timeout",
            "120",
        ])
        .current_dir(std::env::temp_dir())
        .output()
        .expect("kvmi runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let findings: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    // Every line is the example's, labelled by the shim with the target it is about.
    assert!(
        !findings.is_empty() && findings.iter().all(|f| f["finding"] == "example"),
        "{stdout}"
    );
    for target in [1, 2] {
        let name = format!("demo-target-{target}");
        let lines: Vec<&Value> = findings.iter().filter(|f| f["target"] == target).collect();
        assert!(
            lines.iter().all(|f| f["target_name"] == name.as_str()),
            "{stdout}"
        );
        // The policy's watch was set up (write protection, the task_create breakpoint) and
        // its events counted and answered: the target ran its 100 rounds to the end.
        let last = lines
            .last()
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"));
        let events = last["events"].as_u64().unwrap();
        assert!(events > 0, "{last}");
        assert!(last["page_faults"].as_u64().unwrap() > 0, "{last}");
        assert!(last["breakpoints"].as_u64().unwrap() > 0, "{last}");
        assert!(
            stderr.contains(&format!(
                "kvmi: target {target} ({name}) ended: guest exited with status 0"
            )),
            "{stderr}"
        );
    }
}

/// `kvmi ARGS FILE` exits 125 naming `want` on stderr, and nothing started: no finding on
/// stdout, no serial output (the demo target's banner).
fn refused_before_any_vm(args: &[&str], file: &std::path::Path, want: &str) {
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(args)
        .arg(file)
        .output()
        .expect("kvmi runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("demo-target: vcpus="), "{stderr}");
}

/// A fresh directory for a test's files.
fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmi-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_config_file_runs_different_targets_and_one_joins_later() {
    if !kvmi_tests::require_kvm("a_config_file_runs_different_targets_and_one_joins_later") {
        return;
    }
    let dir = tempfile_dir("fleet-config");
    let path = dir.join("fleet.toml");
    std::fs::write(
        &path,
        "[[target]]\nname = \"web\"\nimage = \"demo-target\"\ncmdline = \"rounds=150\"\n\n\
         [[target]]\nname = \"probe\"\nimage = \"test-guest\"\nvcpus = 2\nmemory_mib = 32\n\
         cmdline = \"mode=smp\"\n\n\
         [[target]]\nname = \"late\"\nimage = \"demo-target\"\ncmdline = \"rounds=150\"\n\
         start_after_ms = 1000\n",
    )
    .unwrap();
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(["run", "--timeout", "120", "--config"])
        .arg(&path)
        .output()
        .expect("kvmi runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The first target's status: its 150 rounds done.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let findings: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    let named = |name: &str, kind: &str| {
        findings
            .iter()
            .filter(|f| f["target_name"] == name && f["finding"] == kind)
            .count()
    };
    for name in ["web", "late"] {
        assert_eq!(named(name, "guard"), 1, "{name}: {stdout}");
        assert!(named(name, "write_denied") >= 1, "{name}: {stdout}");
        assert!(named(name, "task_create") >= 3, "{name}: {stdout}");
        // Each ended by itself and still got its final summary.
        assert!(
            findings.iter().any(|f| f["target_name"] == name
                && f["finding"] == "summary"
                && f["final"] == true),
            "{name}: {stdout}"
        );
    }
    // The test guest has no rules in the demo policy: served (its 2 vCPUs started and
    // ended) but not guarded.
    assert_eq!(named("probe", "guard"), 1, "{stdout}");
    assert_eq!(named("probe", "write_denied"), 0, "{stdout}");
    let ids: Vec<u64> = ["web", "probe", "late"]
        .iter()
        .map(|n| {
            findings
                .iter()
                .find(|f| f["target_name"] == *n)
                .and_then(|f| f["target"].as_u64())
                .unwrap_or_else(|| panic!("{n}: {stdout}"))
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3], "{stdout}");
    assert!(
        stderr.contains("kvmi: target 3 (late) joined the appliance"),
        "{stderr}"
    );
    assert!(
        stderr.contains("all 2 vcpus up"),
        "the probe's 2 vCPUs ran: {stderr}"
    );
    assert!(
        stderr.contains("kvmi: target 2 (probe): guest exited with status 0"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_config_is_refused_with_its_line_and_field_before_any_vm_starts() {
    let dir = tempfile_dir("bad-config");
    let path = dir.join("fleet.toml");
    std::fs::write(
        &path,
        "[[target]]\nname = \"a\"\nimage = \"demo-target\"\n[[target]]\nname = \"b\"\n\
         image = \"demo-target\"\nvcpus = 0\n",
    )
    .unwrap();
    refused_before_any_vm(
        &["run", "--config"],
        &path,
        "fleet.toml:7: target[1].vcpus: 0: 1..=64 vCPUs",
    );
}
