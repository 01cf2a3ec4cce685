//! Boots the demo target OS with 1 and 2 vCPUs and checks what its serial console reports.

use std::time::Duration;

use kvmi::images::Image;
use vmm::{RunOutcome, UnknownIoPolicy};

const BOOT_TASKS: [&str; 6] = [
    "init",
    "monitor",
    "secret-reader",
    "rootkit",
    "agent-caller",
    "busy",
];

/// (pid, name, cpu) of every `task created` line.
fn created(serial: &str) -> Vec<(u32, String, u32)> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("task created "))
        .map(|rest| {
            let field = |k: &str| {
                rest.split(' ')
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} in {rest}"))
                    .to_string()
            };
            (
                field("pid=").parse().unwrap(),
                field("name="),
                field("cpu=").parse().unwrap(),
            )
        })
        .collect()
}

fn heartbeats(serial: &str) -> Vec<u32> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat round="))
        .map(|r| r.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

fn boot_demo(vcpus: u32, rounds: u32) -> String {
    let (report, serial) = kvmi_tests::common::run(
        Image::DemoTarget,
        &format!("rounds={rounds}"),
        vcpus,
        UnknownIoPolicy::Ignore,
        Duration::from_secs(60),
    );
    assert_eq!(
        report.outcome,
        RunOutcome::GuestExit { status: 0, vcpu: 0 },
        "serial:\n{serial}"
    );
    assert!(
        serial.starts_with(&format!("demo-target: vcpus={vcpus} rounds={rounds}\n")),
        "{serial}"
    );
    // Exactly one heartbeat per round, in order.
    assert_eq!(
        heartbeats(&serial),
        (1..=rounds).collect::<Vec<_>>(),
        "{serial}"
    );
    let tasks = created(&serial);
    let boot: Vec<(u32, &str)> = tasks
        .iter()
        .take(6)
        .map(|(p, n, _)| (*p, n.as_str()))
        .collect();
    let expect: Vec<(u32, &str)> = (1..=6).zip(BOOT_TASKS).collect();
    assert_eq!(boot, expect, "{serial}");
    // init asks for a worker every 3 rounds: rounds / 3 workers (the first in round 3).
    let workers = tasks
        .iter()
        .filter(|(_, n, _)| n.starts_with("worker-"))
        .count() as u32;
    assert_eq!(workers, rounds / 3, "{serial}");
    assert!(
        serial.contains("integrity: task pid=4 renamed rootkit -> kworker/0"),
        "{serial}"
    );
    assert!(
        serial.contains("checksum=0x11a2 expected=0x11a2"),
        "{serial}"
    );
    // No hypercall handler yet: the doorbell returns u64::MAX.
    assert!(
        serial.contains("agent hypercall returned rax=0xffffffffffffffff"),
        "{serial}"
    );
    serial
}

#[test]
fn demo_target_one_vcpu() {
    if !kvmi_tests::require_kvm("demo_target_one_vcpu") {
        return;
    }
    let serial = boot_demo(1, 7);
    assert!(
        created(&serial).iter().all(|(_, _, cpu)| *cpu == 0),
        "{serial}"
    );
}

#[test]
fn demo_target_two_vcpus_spreads_tasks() {
    if !kvmi_tests::require_kvm("demo_target_two_vcpus_spreads_tasks") {
        return;
    }
    let serial = boot_demo(2, 7);
    let tasks = created(&serial);
    let busy = tasks.iter().find(|(_, n, _)| n == "busy").unwrap();
    assert_eq!(busy.2, 1, "busy runs on vCPU 1: {serial}");
    assert!(tasks.iter().any(|(_, _, cpu)| *cpu == 0), "{serial}");
}
