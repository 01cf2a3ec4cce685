//! The main job end to end (real KVM): the demo target and the appliance image in one shim,
//! wired by `start_with_appliance`. The agent in the appliance VM lists the target's tasks
//! through the map window, write-protects the kernel text and task table (the demo's rootkit
//! task is denied), traces task creation, and reports a summary — all as JSON lines on the
//! log ring, which this test collects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance_link::launch::DEFAULT_WINDOW_SIZE;
use appliance_link::rings::DEFAULT_FULL_TIMEOUT;
use appliance_link::{ApplianceConfig, start_with_appliance};
use hypercall::ring::RingSizes;
use kvmi::images::Image;
use kvmi_engine::IntrospectorConfig;
use kvmi_tests::wait;
use serde_json::Value;
use vmm::{RunLimits, SerialSink, SharedBuffer, UnknownIoPolicy, Vm, VmConfig};

fn config(name: &str, cmdline: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: cmdline.into(),
        unknown_io: UnknownIoPolicy::Ignore,
    }
}

/// The appliance image with `cmdline`, its log lines collected in `lines`.
fn appliance_config(
    elf: &[u8],
    cmdline: &str,
    lines: &Arc<Mutex<Vec<String>>>,
    restarts: u32,
) -> ApplianceConfig {
    let sink = lines.clone();
    ApplianceConfig {
        vm: config("main-job-appliance", cmdline),
        image: elf.to_vec(),
        serial: SerialSink::Buffer(SharedBuffer::new()),
        log: Box::new(move |r: &[u8]| {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(r).trim_end().to_string())
        }),
        window_size: DEFAULT_WINDOW_SIZE,
        sizes: RingSizes::default(),
        full_timeout: DEFAULT_FULL_TIMEOUT,
        restarts,
    }
}

/// A target of `image` with `cmdline`, its serial console collected.
fn target(name: &str, image: Image, cmdline: &str) -> (Vm, SharedBuffer) {
    let mut vm = Vm::new(config(name, cmdline), kvmi_tests::common::elf(image)).unwrap();
    let serial = SharedBuffer::new();
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    (vm, serial)
}

/// The log lines as JSON values (every line must be one).
fn findings(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect()
}

/// The findings of one kind.
fn of<'a>(findings: &'a [Value], kind: &str) -> Vec<&'a Value> {
    findings.iter().filter(|f| f["finding"] == kind).collect()
}

/// The log lines that parse as JSON (the wait loop's view: a line that does not parse fails
/// the test later, in [`findings`]).
fn parsed(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The traced task creations that name the task.
fn named_creations(findings: &[Value]) -> usize {
    of(findings, "task_create")
        .iter()
        .filter(|f| f["name"].as_str().is_some_and(|n| !n.is_empty()))
        .count()
}

/// Task creations the test waits to see traced (the demo target creates a worker every
/// three rounds, a round taking about 14 ms).
const CREATIONS: usize = 3;

#[test]
fn the_appliance_lists_tasks_denies_rootkit_writes_and_traces_task_creation() {
    if !kvmi_tests::require_kvm(
        "the_appliance_lists_tasks_denies_rootkit_writes_and_traces_task_creation",
    ) {
        return;
    }
    let appliance_elf = kvmi_tests::common::elf(Image::Appliance);
    // The main job as `kvmi run` (no flags) sets it up: the demo target with the embedded
    // appliance, configured by the same code from the command line's defaults.
    let (kvmi_flags, appliance_flags) =
        kvmi::args::appliance::parse_flags(["--appliance"]).expect("kvmi run's flags");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    let (intro, appliance) = appliance_flags
        .setup(
            &kvmi_flags,
            appliance_elf.to_vec(),
            SerialSink::Buffer(SharedBuffer::new()),
            Box::new(move |r: &[u8]| {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(r).trim_end().to_string())
            }),
        )
        .expect("the main job's configuration");
    assert!(
        intro.wait_for_tool,
        "kvmi run gates the target's start on the agent"
    );
    let (target, target_serial) = target("kvmi-demo-target", Image::DemoTarget, "");
    let run = start_with_appliance(target, intro, appliance).unwrap();
    // Run until every kind of finding has shown up (at most 60 s on a loaded host), then
    // stop the target.
    let complete = |f: &[Value]| {
        !of(f, "guard").is_empty()
            && !of(f, "write_denied").is_empty()
            && !of(f, "summary").is_empty()
            && of(f, "task").iter().any(|t| t["name"] == "rootkit")
            && named_creations(f) >= CREATIONS
    };
    let seen_all = wait::within(Duration::from_secs(60), || {
        complete(&parsed(&lines.lock().unwrap()))
    });
    run.target.handle().stop();
    let report = run.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
    let lines = lines.lock().unwrap().clone();
    let all = lines.join("\n");
    assert!(seen_all, "not every kind of finding within 60 s:\n{all}");
    let findings = findings(&lines);
    let of = |kind: &str| of(&findings, kind);
    assert_eq!(findings[0]["finding"], "start", "{all}");
    // The guard is in place before the target runs: the agent's first listing (before its
    // guard) finds no task, and nothing the target does precedes the guard line.
    let first = |kind: &str| findings.iter().position(|f| f["finding"] == kind);
    let guard_at = first("guard").unwrap_or_else(|| panic!("a guard line:\n{all}"));
    for kind in ["task", "task_create", "write_denied"] {
        let at = first(kind).unwrap_or_else(|| panic!("a {kind} line:\n{all}"));
        assert!(
            guard_at < at,
            "the guard (line {guard_at}) comes before any {kind} (line {at}):\n{all}"
        );
    }
    let names: Vec<&str> = of("task")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for name in ["init", "monitor", "secret-reader", "rootkit"] {
        assert!(names.contains(&name), "task {name} listed:\n{all}");
    }
    let guard = of("guard");
    assert_eq!(guard.len(), 1, "{all}");
    assert!(guard[0]["protected_pages"].as_u64().unwrap() > 0);
    let denied = of("write_denied");
    assert!(!denied.is_empty(), "rootkit writes denied:\n{all}");
    assert!(denied.iter().all(|d| d["range"] == "task_table"), "{all}");
    assert!(
        named_creations(&findings) >= CREATIONS,
        "at least {CREATIONS} named task creations traced:\n{all}"
    );
    let summary = of("summary");
    let last = summary
        .last()
        .unwrap_or_else(|| panic!("a summary:\n{all}"));
    assert!(last["events"].as_u64().unwrap() > 0);
    assert!(last["pages_mapped"].as_u64().unwrap() > 0);
    // The shim's side agrees: pages were mapped zero-copy and revoked when the target ended.
    assert!(report.pages.pages_mapped > 0);
    assert_eq!(report.pages.refused, 0);
    assert_eq!(
        report.pages.pages_unmapped, report.pages.pages_mapped,
        "all revoked"
    );
    // The target ran undisturbed by the denied writes until we stopped it.
    let text = target_serial.text();
    assert!(text.contains("read the secret buffer"), "{text}");
}

#[test]
fn an_appliance_that_ends_is_replaced_while_restarts_remain() {
    if !kvmi_tests::require_kvm("an_appliance_that_ends_is_replaced_while_restarts_remain") {
        return;
    }
    let appliance_elf = kvmi_tests::common::elf(Image::Appliance);
    let mut target = Vm::new(
        config("restart-target", ""),
        kvmi_tests::common::elf(Image::DemoTarget),
    )
    .unwrap();
    let target_serial = SharedBuffer::new();
    target.set_serial(SerialSink::Buffer(target_serial.clone()));
    // Each agent stops by itself after 30 events; two restarts make three agents in turn.
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let appliance = appliance_config(appliance_elf, "events=30", &lines, 2);
    let run = start_with_appliance(target, IntrospectorConfig::default(), appliance).unwrap();
    wait::until(
        Duration::from_secs(60),
        "the third appliance to end",
        || run.appliance_gone(),
    );
    assert_eq!(run.restarts(), 2);
    // Unhooked now, the target keeps running: its heartbeat goes on.
    let beats = |text: &str| text.matches("heartbeat").count();
    let before = beats(&target_serial.text());
    wait::until(
        Duration::from_secs(30),
        "the target's next heartbeat",
        || beats(&target_serial.text()) > before,
    );
    run.target.handle().stop();
    let report = run.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
    assert_eq!(report.restarts, 2);
    let last = report.appliance.expect("an appliance ran");
    assert!(
        last.outcome.is_success(),
        "the last agent exited by itself: {}",
        last.outcome
    );
    let lines = lines.lock().unwrap().clone();
    let all = lines.join("\n");
    let findings = findings(&lines);
    let of = |kind: &str| of(&findings, kind);
    assert_eq!(of("start").len(), 3, "three agents started:\n{all}");
    assert_eq!(of("guard").len(), 3, "each set up its guard again:\n{all}");
    let finals: Vec<&Value> = of("summary")
        .into_iter()
        .filter(|s| s["final"] == true)
        .collect();
    assert_eq!(finals.len(), 3, "three final summaries:\n{all}");
    assert!(
        finals.iter().all(|s| s["events"].as_u64().unwrap() >= 30),
        "each handled its 30 events:\n{all}"
    );
    // Every agent's grants were revoked when it ended.
    assert!(report.pages.pages_mapped > 0);
    assert_eq!(report.pages.refused, 0);
    assert_eq!(report.pages.pages_unmapped, report.pages.pages_mapped);
    assert_eq!(
        report.revoked_at_end, 0,
        "nothing was left mapped at the end"
    );
}

#[test]
fn a_hung_appliance_is_detached_stopped_and_replaced() {
    if !kvmi_tests::require_kvm("a_hung_appliance_is_detached_stopped_and_replaced") {
        return;
    }
    // The "appliance" spins without ever reading its rings (test-guest `mode=spin`): the
    // target's first event (CREATE_VCPU, the target waits for its tool) times out, the
    // appliance is detached and stopped, and a fresh one takes its place.
    let (target, target_serial) = target("hung-target", Image::TestGuest, "mode=spin");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let appliance = appliance_config(
        kvmi_tests::common::elf(Image::TestGuest),
        "mode=spin",
        &lines,
        1,
    );
    let intro = IntrospectorConfig {
        wait_for_tool: true,
        reply_timeout: Some(Duration::from_millis(300)),
        ..IntrospectorConfig::default()
    };
    let run = start_with_appliance(target, intro, appliance).unwrap();
    wait::until(
        Duration::from_secs(20),
        "the hung appliance's replacement",
        || run.restarts() != 0,
    );
    assert_eq!(run.restarts(), 1, "the hung appliance was replaced");
    // Unhooked by the timeout, the target got past its start and spins.
    let spinning = wait::within(Duration::from_secs(10), || {
        target_serial.text().contains("spinning")
    });
    assert!(spinning, "{}", target_serial.text());
    assert!(
        !run.appliance_gone(),
        "the replacement is attached and running"
    );
    run.target.handle().stop();
    let report = run.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
    assert_eq!(report.restarts, 1);
    assert!(
        lines.lock().unwrap().is_empty(),
        "no agent ever wrote a log line"
    );
}
