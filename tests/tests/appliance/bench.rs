//! Smoke test of `kvmi appliance-bench` (real KVM): every figure is measured (no timing
//! assertion: speed is judged by the ratios the benchmark prints, not by tests).

use std::sync::Mutex;

use kvmi::images::Image;
use serde_json::Value;

/// The benchmarks run one at a time (they measure; two at once on 2 cores starve each other).
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn the_appliance_bench_measures_every_figure() {
    if !kvmi_tests::require_kvm("the_appliance_bench_measures_every_figure") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (guest, appliance) = (
        kvmi_tests::common::elf(Image::TestGuest),
        kvmi_tests::common::elf(Image::Appliance),
    );
    let f = kvmi::bench::window::run(guest, appliance, 4).expect("bench runs");
    assert_eq!(f.bytes, 4 << 20);
    // The pattern starts after the image and covers the rest: every reader (the appliance
    // VM through its window, the shim's window mapping, READ_PHYSICAL) checksummed the same
    // non-zero bytes, or `run` would have failed.
    assert!(f.from >= 1 << 20 && f.from < f.bytes, "{f:?}");
    assert_ne!(f.checksum, 0);
    assert_eq!(f.vm_map_calls, 4 * 256 / 512);
    for (name, d) in [
        ("vm_map", f.vm_map),
        ("vm_tokens", f.vm_tokens),
        ("vm_read", f.vm_read),
        ("vm_reread", f.vm_reread),
        ("window_map", f.window_map),
        ("window_read", f.window_read),
        ("read_physical", f.read_physical),
        ("single_map_per_page", f.single_map_per_page),
        ("batched_map_per_page", f.batched_map_per_page),
    ] {
        assert!(!d.is_zero(), "{name} measured");
    }
    assert!(f.vm_tokens <= f.vm_map, "{f:?}");
    let table = f.table();
    assert!(table.contains("read 4 MiB"), "{table}");
    assert!(f.window_speedup().is_finite() && f.batching_speedup().is_finite());
    assert!(kvmi::bench::window::run(guest, appliance, 0).is_err());
}

#[test]
fn the_event_bench_measures_floor_appliance_rings_and_socket() {
    if !kvmi_tests::require_kvm("the_event_bench_measures_floor_appliance_rings_and_socket") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let profile = kvmi_tests::common::profile(Image::TestGuest);
    let page = profile.symbol("scratch_page").expect("sym.scratch_page");
    let gate = profile.symbol("gate").expect("sym.gate");
    // `run` fails unless the appliance VM's agent answered exactly 20 events and the
    // target made exactly 20 write exits on each path.
    let f = kvmi::bench::events::run(
        kvmi_tests::common::elf(Image::TestGuest),
        kvmi_tests::common::elf(Image::Appliance),
        &kvmi_tests::kvmi_bin(),
        20,
        page,
        gate,
    )
    .expect("event bench runs");
    assert_eq!(f.samples, 3 * 20);
    for (name, d) in [
        ("floor", f.floor),
        ("appliance", f.appliance),
        ("appliance_mean", f.appliance_mean),
        ("rings", f.rings),
        ("rings_across", f.rings_across),
        ("socket", f.socket),
        ("libkvmi", f.libkvmi),
        ("v4_tool", f.v4_tool),
    ] {
        assert!(!d.is_zero(), "{name} measured: {f:?}");
    }
    assert!(f.table().contains("socket / rings (appliance VM)"));
    assert!(f.table().contains("rings across processes / in one"));
    assert!(f.json_line().contains("\"rings_across_over_in_process\""));
    assert!(f.table().contains("libkvmi / socket (v4)"));
    assert!(f.table().contains("libkvmi / v4, same tool loop"));
    assert!(f.json_line().contains("\"libkvmi_over_socket\""));
    assert!(f.json_line().contains("\"libkvmi_over_v4_tool\""));
}

#[test]
fn the_fleet_bench_answers_every_event_of_every_target_and_measures_the_aggregate() {
    if !kvmi_tests::require_kvm(
        "the_fleet_bench_answers_every_event_of_every_target_and_measures_the_aggregate",
    ) {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let profile = kvmi_tests::common::profile(Image::TestGuest);
    let page = profile.symbol("scratch_page").expect("sym.scratch_page");
    let gate = profile.symbol("gate").expect("sym.gate");
    let policy = kvmi::bench::fleet::bench_policy(&profile.to_json()).expect("bench policy");
    // `run` fails unless each target made exactly 2 × 300 write exits, and the agent's final
    // summary and the shim both count 602 events answered (with 2 CREATE_VCPU) per target.
    let f = kvmi::bench::fleet::run(
        kvmi_tests::common::elf(Image::TestGuest),
        kvmi_tests::common::elf(Image::Appliance),
        policy,
        kvmi::bench::fleet::FleetShape {
            targets: 2,
            vcpus: 2,
            writes: 300,
            page,
            gate,
        },
    )
    .expect("fleet bench runs");
    assert_eq!((f.targets, f.vcpus, f.events_per_target), (2, 2, 600));
    assert_eq!(f.answered, vec![602, 602], "none lost: {f:?}");
    assert_eq!(f.replies, vec![602, 602], "{f:?}");
    assert_eq!(f.floors.len(), 2);
    assert!(f.floors.iter().all(|r| *r > 0.0), "{f:?}");
    assert!(f.rates.iter().all(|r| *r > 0.0), "{f:?}");
    assert!(f.aggregate > 0.0 && f.ratio() > 0.0, "{f:?}");
    let shares: f64 = f.shares().iter().sum();
    assert!(
        (shares - 2.0).abs() < 1e-6,
        "shares of an even 1.0 each sum to 2: {f:?}"
    );
    // The agent's turns: between two turns of a target at most one budget (16) of the
    // other target's events.
    assert!(f.max_others_between_turns.iter().all(|m| *m <= 16), "{f:?}");
    let line: Value = serde_json::from_str(&f.json_line()).unwrap();
    assert_eq!(line["fleet"]["answered"], serde_json::json!([602, 602]));
}
