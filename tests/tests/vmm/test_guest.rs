//! Runs the test-guest modes through the library API and checks each ending.

use std::time::{Duration, Instant};

use kvmi::images::Image;
use vmm::outcome::IoKind;
use vmm::{RunOutcome, UnknownIoPolicy};

#[test]
fn hello_on_one_and_two_vcpus() {
    if !kvmi_tests::require_kvm("hello_on_one_and_two_vcpus") {
        return;
    }
    for vcpus in [1u32, 2] {
        let (report, serial) = kvmi_tests::common::run(
            Image::TestGuest,
            "mode=hello",
            vcpus,
            UnknownIoPolicy::Ignore,
            Duration::from_secs(20),
        );
        assert!(report.outcome.is_success(), "{}: {serial}", report.outcome);
        for v in 0..vcpus {
            assert!(
                serial.contains(&format!("hello from vcpu {v}\n")),
                "{serial}"
            );
        }
        assert_eq!(serial.matches("hello from vcpu").count() as u32, vcpus);
        assert_eq!(report.exits.len() as u32, vcpus);
    }
}

#[test]
fn smp_checks_in_every_vcpu() {
    if !kvmi_tests::require_kvm("smp_checks_in_every_vcpu") {
        return;
    }
    let (report, serial) = kvmi_tests::common::run(
        Image::TestGuest,
        "mode=smp",
        2,
        UnknownIoPolicy::Ignore,
        Duration::from_secs(20),
    );
    assert!(report.outcome.is_success(), "{}: {serial}", report.outcome);
    assert!(
        serial.contains("vcpu 0 up") && serial.contains("vcpu 1 up"),
        "{serial}"
    );
    assert!(serial.contains("all 2 vcpus up"), "{serial}");
}

#[test]
fn triple_fault_is_a_shutdown() {
    if !kvmi_tests::require_kvm("triple_fault_is_a_shutdown") {
        return;
    }
    let (report, serial) = kvmi_tests::common::test_guest("triple-fault");
    let text = kvmi_tests::common::profile(Image::TestGuest).range("kernel_text");
    match report.outcome {
        RunOutcome::Shutdown { vcpu: 0, rip } => {
            if let Some(r) = text {
                assert!(
                    (r.start..r.end).contains(&rip),
                    "rip {rip:#x} outside kernel text"
                );
            }
        }
        other => panic!("expected a shutdown, got {other}: {serial}"),
    }
    assert_eq!(report.outcome.exit_code(), vmm::outcome::EXIT_SHUTDOWN);
    assert!(serial.contains("triple fault next"));
}

#[test]
fn bad_insn_names_rip_and_bytes() {
    if !kvmi_tests::require_kvm("bad_insn_names_rip_and_bytes") {
        return;
    }
    let expected_rip = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("bad_insn")
        .expect("profile has sym.bad_insn");
    let caps = vmm::probe::cached_capabilities().expect("capability probe");
    let (report, serial) = kvmi_tests::common::test_guest("bad-insn");
    assert!(serial.contains("bad instruction next"), "{serial}");
    if caps.cpl0_emulated {
        // PVM: the CPL0 emulator cannot emulate popcnt; the VM stops with an emulation
        // failure naming the instruction's rip and bytes.
        let RunOutcome::EmulationFailure { vcpu: 0, rip, insn } = &report.outcome else {
            panic!(
                "CPL0 is emulated here: expected an emulation failure, got {}: {serial}",
                report.outcome
            );
        };
        assert_eq!(*rip, expected_rip);
        // popcnt: F3 (REX) 0F B8.
        assert_eq!(insn.first(), Some(&0xf3), "{insn:02x?}");
        let pos = insn.windows(2).position(|w| w == [0x0f, 0xb8]);
        assert!(matches!(pos, Some(1 | 2)), "{insn:02x?}");
        let msg = report.outcome.to_string();
        assert!(msg.contains(&format!("{expected_rip:#x}")), "{msg}");
        assert!(msg.contains("f3"), "{msg}");
        assert!(!serial.contains("bad instruction executed"), "{serial}");
    } else {
        // CPL0 runs natively: popcnt executes (0xff has 8 bits set) and the guest reports
        // that it survived (exit 3).
        assert!(
            matches!(report.outcome, RunOutcome::GuestExit { status: 3, .. }),
            "CPL0 is native here: expected guest exit 3, got {}: {serial}",
            report.outcome
        );
        assert!(
            serial.contains("bad instruction executed, popcnt=8"),
            "{serial}"
        );
    }
}

#[test]
fn bad_port_ignored_lets_the_guest_continue() {
    if !kvmi_tests::require_kvm("bad_port_ignored_lets_the_guest_continue") {
        return;
    }
    let (report, serial) = kvmi_tests::common::test_guest("bad-port");
    assert!(report.outcome.is_success(), "{}", report.outcome);
    assert!(serial.contains("survived bad port"), "{serial}");
}

#[test]
fn bad_port_error_stops_naming_port_0x99() {
    if !kvmi_tests::require_kvm("bad_port_error_stops_naming_port_0x99") {
        return;
    }
    let (report, serial) = kvmi_tests::common::run(
        Image::TestGuest,
        "mode=bad-port",
        1,
        UnknownIoPolicy::Error,
        Duration::from_secs(20),
    );
    match report.outcome {
        RunOutcome::UnhandledIo {
            vcpu: 0,
            access:
                IoKind::Pio {
                    port: 0x99,
                    write: true,
                    ..
                },
            ..
        } => {}
        ref other => panic!("expected an unhandled port 0x99, got {other}"),
    }
    assert!(report.outcome.to_string().contains("port 0x99"));
    assert_eq!(report.outcome.exit_code(), vmm::outcome::EXIT_VMM_ERROR);
    assert!(!serial.contains("survived bad port"), "{serial}");
}

#[test]
fn timeout_stops_a_guest_that_never_exits() {
    if !kvmi_tests::require_kvm("timeout_stops_a_guest_that_never_exits") {
        return;
    }
    let limit = Duration::from_millis(800);
    let t = Instant::now();
    let (report, serial) = kvmi_tests::common::run(
        Image::TestGuest,
        "mode=spin",
        2,
        UnknownIoPolicy::Ignore,
        limit,
    );
    let took = t.elapsed();
    assert_eq!(
        report.outcome,
        RunOutcome::TimedOut { after: limit },
        "{serial}"
    );
    assert_eq!(report.stuck_vcpus, 0);
    assert!(serial.contains("spinning"), "{serial}");
    assert!(took >= limit, "{took:?}");
    assert_eq!(report.outcome.exit_code(), vmm::outcome::EXIT_TIMEOUT);
}

#[test]
fn user_mode_round_trips() {
    if !kvmi_tests::require_kvm("user_mode_round_trips") {
        return;
    }
    let (report, serial) = kvmi_tests::common::test_guest("user");
    assert!(report.outcome.is_success(), "{}: {serial}", report.outcome);
    for line in [
        "syscall ping via=int3 arg=3 cpl=3",
        "syscall ping via=int3 arg=4 cpl=3",
        "user exit arg=5 via=int3",
        "user mode ok",
    ] {
        assert!(serial.contains(line), "missing {line:?} in {serial}");
    }
}

#[test]
fn fault_user_reports_the_page_fault() {
    if !kvmi_tests::require_kvm("fault_user_reports_the_page_fault") {
        return;
    }
    let target = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("fault_user_target")
        .expect("profile has sym.fault_user_target");
    let (report, serial) = kvmi_tests::common::test_guest("fault-user");
    assert_eq!(
        report.outcome,
        RunOutcome::GuestExit {
            status: 0x10e,
            vcpu: 0
        },
        "{serial}"
    );
    assert_eq!(report.outcome.exit_code(), 255, "status above 255 clamps");
    let line = serial
        .lines()
        .find(|l| l.starts_with("EXCEPTION vector=14"))
        .unwrap_or_else(|| panic!("no page-fault report: {serial}"));
    assert!(line.contains(&format!("cr2={target:#x}")), "{line}");
    assert!(line.ends_with("cpl=3"), "{line}");
}
