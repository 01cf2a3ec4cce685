//! One appliance VM guarding several demo targets (real KVM): every target gets its guard,
//! denied writes and traced creations, each finding names its target, a target that ends
//! frees its slot while the others stay guarded, a new target joins the running appliance in
//! the freed slot, and a stop makes the agent print a final summary per target.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance_link::ApplianceConfig;
use appliance_link::fleet::{Fleet, FleetConfig, TargetSpec};
use appliance_link::launch::DEFAULT_WINDOW_SIZE;
use appliance_link::rings::DEFAULT_FULL_TIMEOUT;
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

/// A demo target named `name` with `cmdline`, gated on the agent as `kvmi run` gates it.
fn demo(name: &str, cmdline: &str) -> TargetSpec {
    let mut vm = Vm::new(
        config(name, cmdline),
        kvmi_tests::common::elf(Image::DemoTarget),
    )
    .unwrap();
    vm.set_serial(SerialSink::Buffer(SharedBuffer::new()));
    TargetSpec {
        name: name.into(),
        profile: "demo-target".into(),
        vm,
        introspection: IntrospectorConfig {
            wait_for_tool: true,
            ..IntrospectorConfig::default()
        },
    }
}

/// A fleet of `slots` slots whose log lines land in `lines` (no policy: the demo guard).
fn fleet(slots: u32, targets: Vec<TargetSpec>, lines: &Arc<Mutex<Vec<String>>>) -> Fleet {
    fleet_with(slots, 1, Vec::new(), targets, lines)
}

/// An appliance VM with `cmdline` and `restarts`, its log lines landing in `lines`.
fn appliance(cmdline: &str, restarts: u32, lines: &Arc<Mutex<Vec<String>>>) -> ApplianceConfig {
    let sink = lines.clone();
    ApplianceConfig {
        vm: config("fleet-appliance", cmdline),
        image: kvmi_tests::common::elf(Image::Appliance).to_vec(),
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

/// A fleet of `slots` slots for targets of up to `max_vcpus` vCPUs under `policy`.
fn fleet_with(
    slots: u32,
    max_vcpus: u32,
    policy: Vec<u8>,
    targets: Vec<TargetSpec>,
    lines: &Arc<Mutex<Vec<String>>>,
) -> Fleet {
    let appliance = appliance("", 0, lines);
    Fleet::start(
        FleetConfig {
            appliance,
            slots,
            max_vcpus,
            policy,
        },
        targets,
    )
    .unwrap()
}

fn parsed(lines: &Arc<Mutex<Vec<String>>>) -> Vec<Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect()
}

/// The findings of `kind` about target `id`.
fn of(findings: &[Value], id: u64, kind: &str) -> usize {
    findings
        .iter()
        .filter(|f| f["target"] == id && f["finding"] == kind)
        .count()
}

/// Named task creations traced for target `id`.
fn creations(findings: &[Value], id: u64) -> usize {
    findings
        .iter()
        .filter(|f| f["target"] == id && f["finding"] == "task_create")
        .filter(|f| f["name"].as_str().is_some_and(|n| !n.is_empty()))
        .count()
}

/// Target `id` has its guard, a denied write and three named creations traced.
fn guarded(findings: &[Value], id: u64) -> bool {
    of(findings, id, "guard") == 1
        && of(findings, id, "write_denied") >= 1
        && creations(findings, id) >= 3
}

/// The stop: no time left, so the fleet asks the agent for its final report at once.
const STOP_NOW: RunLimits = RunLimits {
    timeout: Some(Duration::ZERO),
    interrupt: None,
};

#[test]
fn three_targets_each_get_denied_writes_and_traced_creations() {
    if !kvmi_tests::require_kvm("three_targets_each_get_denied_writes_and_traced_creations") {
        return;
    }
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let names = ["alpha", "beta", "gamma"];
    let fleet = fleet(3, names.iter().map(|n| demo(n, "")).collect(), &lines);
    let seen = wait::within(Duration::from_secs(90), || {
        let f = parsed(&lines);
        (1..=3).all(|id| guarded(&f, id))
    });
    let report = fleet.wait(STOP_NOW);
    let findings = parsed(&lines);
    let all = lines.lock().unwrap().join("\n");
    assert!(seen, "every target guarded within 90 s:\n{all}");
    // Every line names its target, by the id and name the shim gave it.
    for f in &findings {
        let id = f["target"]
            .as_u64()
            .unwrap_or_else(|| panic!("no target id: {f}"));
        assert_eq!(f["target_name"], names[id as usize - 1], "{f}");
    }
    for id in 1..=3u64 {
        assert!(guarded(&findings, id), "target {id}:\n{all}");
        // Only the rootkit's user-mode writes to the task table are denied.
        assert!(
            findings
                .iter()
                .filter(|f| f["target"] == id && f["finding"] == "write_denied")
                .all(|f| f["range"] == "task_table")
        );
        // The stop made the agent print a final summary for each target, with its own counts.
        let finals: Vec<&Value> = findings
            .iter()
            .filter(|f| f["target"] == id && f["finding"] == "summary" && f["final"] == true)
            .collect();
        assert_eq!(finals.len(), 1, "one final summary for target {id}:\n{all}");
        assert!(finals[0]["writes_denied"].as_u64().unwrap() >= 1, "{all}");
        assert!(finals[0]["tasks_created"].as_u64().unwrap() >= 3, "{all}");
        assert_eq!(
            finals[0]["events"], finals[0]["replies"],
            "every event answered"
        );
    }
    assert_eq!(report.targets.len(), 3);
    for t in &report.targets {
        assert!(t.pages.pages_mapped > 0, "{t:?}");
        assert_eq!(t.pages.refused, 0, "{t:?}");
        assert_eq!(
            t.pages.pages_unmapped, t.pages.pages_mapped,
            "all revoked: {t:?}"
        );
    }
}

#[test]
fn a_target_that_ends_frees_its_slot_the_others_stay_guarded_and_a_new_one_joins() {
    if !kvmi_tests::require_kvm(
        "a_target_that_ends_frees_its_slot_the_others_stay_guarded_and_a_new_one_joins",
    ) {
        return;
    }
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    // `short` ends by itself after 150 scheduler rounds; `long` runs until stopped.
    let fleet = fleet(
        2,
        vec![demo("short", "rounds=150"), demo("long", "")],
        &lines,
    );
    wait::until(Duration::from_secs(90), "the short target to end", || {
        fleet.watch();
        !fleet.ended().is_empty()
    });
    assert_eq!(fleet.ended(), vec![(1, "short".to_string())]);
    let at_end = parsed(&lines);
    let long_events = |f: &[Value]| {
        f.iter()
            .filter(|l| l["target"] == 2 && l["finding"] == "summary")
            .filter_map(|l| l["events"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let before = long_events(&at_end);
    // The other target is still guarded: its events keep being answered, its creations
    // traced.
    let creations_before = creations(&at_end, 2);
    wait::until(
        Duration::from_secs(60),
        "the long target's next findings",
        || {
            fleet.watch();
            let f = parsed(&lines);
            long_events(&f) > before && creations(&f, 2) > creations_before
        },
    );
    // A new target joins the running appliance, in the slot the short one freed.
    let id = fleet.add_target(demo("late", "")).unwrap();
    assert_eq!(id, 3);
    let seen = wait::within(Duration::from_secs(90), || {
        fleet.watch();
        guarded(&parsed(&lines), 3)
    });
    let report = fleet.wait(STOP_NOW);
    let all = lines.lock().unwrap().join("\n");
    assert!(seen, "the late target guarded within 90 s:\n{all}");
    let findings = parsed(&lines);
    assert!(
        guarded(&findings, 1),
        "the short target was guarded:\n{all}"
    );
    assert!(guarded(&findings, 2), "{all}");
    let short = report.targets.iter().find(|t| t.id == 1).unwrap();
    assert!(short.run.outcome.is_success(), "{short:?}");
    let late = report.targets.iter().find(|t| t.id == 3).unwrap();
    assert_eq!(late.slot, 0, "the late target took the freed slot");
    assert_eq!(report.targets.len(), 3);
    for t in &report.targets {
        assert_eq!(
            t.pages.pages_unmapped, t.pages.pages_mapped,
            "all revoked: {t:?}"
        );
    }
}

#[test]
fn a_flooding_target_does_not_starve_another_beyond_the_agents_budget() {
    if !kvmi_tests::require_kvm(
        "a_flooding_target_does_not_starve_another_beyond_the_agents_budget",
    ) {
        return;
    }
    // The demo policy for the demo target, and test-guest's scratch page guarded too: its
    // kernel-mode writes are events answered CONTINUE (no finding line).
    let policy = format!(
        "{}\n{}",
        kvmi::args::appliance::DEMO_POLICY,
        kvmi::bench::fleet::BENCH_POLICY.replace("format = 1", "")
    );
    let profiles: Vec<(&str, String)> = [Image::DemoTarget, Image::TestGuest]
        .into_iter()
        .map(|i| (i.name(), kvmi_tests::common::profile(i).to_json()))
        .collect();
    let compiled = kvmi_policy::compile_str(&policy, kvmi_policy::Format::Toml, &|name| {
        profiles
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, json)| appliance::profile::Profile::from_json(json.as_bytes()).ok())
    })
    .expect("the policy compiles");
    // The flooder: 2 vCPUs writing the guarded page as fast as they can, 2 x 100000 events.
    let mut vm = Vm::new(
        VmConfig {
            vcpus: 2,
            ..config("flooder", "mode=mem-write-all n=100000")
        },
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    vm.set_serial(SerialSink::Buffer(SharedBuffer::new()));
    let flooder = TargetSpec {
        name: "flooder".into(),
        profile: "test-guest".into(),
        vm,
        introspection: IntrospectorConfig {
            wait_for_tool: true,
            ..IntrospectorConfig::default()
        },
    };
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let fleet = fleet_with(
        2,
        2,
        compiled.to_json(),
        vec![flooder, demo("quiet", "")],
        &lines,
    );
    // The quiet target is guarded while the flood goes on, and the flood has had more than
    // 1000 events answered (its periodic summary says so; how fast depends on the host).
    let flood_so_far = |f: &[Value]| {
        f.iter()
            .filter(|l| l["target"] == 1 && l["finding"] == "summary")
            .filter_map(|l| l["events"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let seen = wait::within(Duration::from_secs(90), || {
        fleet.watch();
        let f = parsed(&lines);
        guarded(&f, 2) && flood_so_far(&f) > 1000
    });
    let flooding = fleet.ended().is_empty();
    let report = fleet.wait(STOP_NOW);
    let all = lines.lock().unwrap().join("\n");
    assert!(
        seen,
        "the quiet target guarded and 1000 flood events within 90 s:\n{all}"
    );
    assert!(
        flooding,
        "the flood still ran when the quiet target was guarded: {report:?}"
    );
    let findings = parsed(&lines);
    let last_summary = |id: u64| {
        findings
            .iter()
            .rev()
            .find(|f| f["target"] == id && f["finding"] == "summary")
            .cloned()
            .unwrap_or_else(|| panic!("a summary of target {id}:\n{all}"))
    };
    let (flood, quiet) = (last_summary(1), last_summary(2));
    // The flood had more than 1000 events answered, and nothing was lost.
    assert!(flood["events"].as_u64().unwrap() > 1000, "{flood}");
    for s in [&flood, &quiet] {
        assert_eq!(s["events"], s["replies"], "every event answered: {s}");
        // The bound: between two turns of a target the agent handles at most its budget (16)
        // of the other target's events.
        let between = s["max_others_between_turns"].as_u64().unwrap();
        assert!(between <= 16, "{s}");
    }
    // The flooder's writes never produce a finding line: only its summaries and start/guard.
    assert!(
        findings
            .iter()
            .filter(|f| f["target"] == 1)
            .all(|f| ["start", "guard", "summary"].contains(&f["finding"].as_str().unwrap())),
        "{all}"
    );
    for t in &report.targets {
        assert_eq!(t.pages.refused, 0, "{t:?}");
    }
    let shim_quiet = report.targets.iter().find(|t| t.id == 2).unwrap();
    assert!(
        shim_quiet.answered >= quiet["replies"].as_u64().unwrap(),
        "{shim_quiet:?}"
    );
}

#[test]
fn an_appliance_that_ends_is_replaced_for_every_target() {
    if !kvmi_tests::require_kvm("an_appliance_that_ends_is_replaced_for_every_target") {
        return;
    }
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    // Each agent stops by itself after 60 events (both targets together); one restart.
    let fleet = Fleet::start(
        FleetConfig {
            appliance: appliance("events=60", 1, &lines),
            slots: 2,
            max_vcpus: 1,
            policy: Vec::new(),
        },
        vec![demo("one", ""), demo("two", "")],
    )
    .unwrap();
    let starts = |f: &[Value], id: u64| of(f, id, "start");
    let replaced = wait::within(Duration::from_secs(90), || {
        fleet.watch();
        let f = parsed(&lines);
        starts(&f, 1) == 2
            && starts(&f, 2) == 2
            && of(&f, 1, "guard") == 2
            && of(&f, 2, "guard") == 2
    });
    // The second agent ends after its 60 events too: then both targets run on, unhooked.
    let report = fleet.wait(RunLimits {
        timeout: Some(Duration::from_secs(5)),
        interrupt: None,
    });
    let all = lines.lock().unwrap().join("\n");
    assert!(replaced, "a second agent guarded both targets:\n{all}");
    assert_eq!(report.restarts, 1, "{report:?}");
    let findings = parsed(&lines);
    for id in [1, 2] {
        assert_eq!(starts(&findings, id), 2, "{all}");
        // Every agent's summary for the target: its events all answered.
        for s in findings
            .iter()
            .filter(|f| f["target"] == id && f["finding"] == "summary")
        {
            assert_eq!(s["events"], s["replies"], "{s}");
        }
    }
    for t in &report.targets {
        // Both targets ran to the end of the run (stopped by the timeout), never crashed.
        assert!(
            matches!(t.run.outcome, vmm::RunOutcome::TimedOut { .. }),
            "{t:?}"
        );
        assert_eq!(
            t.pages.pages_unmapped, t.pages.pages_mapped,
            "all revoked: {t:?}"
        );
    }
}
