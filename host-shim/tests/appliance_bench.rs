//! Smoke test of `kvmi appliance-bench` (real KVM): every figure is measured (no timing
//! assertion: speed is judged by the ratios the benchmark prints, not by tests).

mod common;

use host_shim::images::Image;

#[test]
fn the_appliance_bench_measures_every_figure() {
    if common::skip("the_appliance_bench_measures_every_figure") {
        return;
    }
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
