//! Smoke test of `kvmi appliance-bench` (real KVM): every figure is measured (no timing
//! assertion: speed is judged by the ratios the benchmark prints, not by tests).

mod common;

use std::sync::Mutex;

use host_shim::images::Image;

/// The benchmarks run one at a time (they measure; two at once on 2 cores starve each other).
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn the_appliance_bench_measures_every_figure() {
    if common::skip("the_appliance_bench_measures_every_figure") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = host_shim::appliance::bench::run(common::elf(Image::TestGuest), "mode=spin", 2)
        .expect("bench runs");
    assert_eq!(f.bytes, 2 << 20);
    for (name, d) in [
        ("window_map", f.window_map),
        ("window_read", f.window_read),
        ("read_physical", f.read_physical),
        ("single_map_per_page", f.single_map_per_page),
        ("batched_map_per_page", f.batched_map_per_page),
    ] {
        assert!(!d.is_zero(), "{name} measured");
    }
    let table = f.table();
    assert!(table.contains("read 2 MiB"), "{table}");
    assert!(f.window_speedup().is_finite() && f.batching_speedup().is_finite());
    assert!(
        host_shim::appliance::bench::run(common::elf(Image::TestGuest), "mode=spin", 0).is_err()
    );
}

#[test]
fn the_event_bench_measures_floor_rings_and_socket() {
    if common::skip("the_event_bench_measures_floor_rings_and_socket") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let profile = common::profile(Image::TestGuest);
    let page = profile.symbol("scratch_page").expect("sym.scratch_page");
    let gate = profile.symbol("gate").expect("sym.gate");
    let f = host_shim::appliance::event_bench::run(common::elf(Image::TestGuest), 20, page, gate)
        .expect("event bench runs");
    assert_eq!(f.samples, 20);
    assert!(
        !f.floor.is_zero() && !f.rings.is_zero() && !f.socket.is_zero(),
        "{f:?}"
    );
    assert!(f.table().contains("socket / rings"));
}
