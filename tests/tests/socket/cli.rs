//! End-to-end: the `kvmi` subcommands on a running VM (`events`, `regs`, `read`, `pause` /
//! `resume`, `protect`, `break`), checking their output against the guest.

use std::process::{Command, Stdio};
use std::time::Duration;

use kvmi::images::Image;
use kvmi_tests::socket_target::Target;
use kvmi_tests::wait;
use serde_json::Value;

fn kvmi(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(kvmi_tests::kvmi_bin())
        .args(args)
        .output()
        .expect("run kvmi");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn hex(v: &Value) -> u64 {
    let s = v.as_str().expect("hex string");
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex")
}

fn spin() -> Target {
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    assert!(t.wait_serial("spinning", Duration::from_secs(30)));
    t
}

#[test]
fn regs_prints_a_kernel_rip_and_read_dumps_guest_memory() {
    if !kvmi_tests::require_kvm("regs_prints_a_kernel_rip_and_read_dumps_guest_memory") {
        return;
    }
    let t = spin();
    let sock = t.socket.to_str().unwrap();
    let (code, out, err) = kvmi(&["regs", "--socket", sock]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    let text = t.profile.range("kernel_text").unwrap();
    let rip = hex(&v["regs"]["rip"]);
    assert!((text.start..text.end).contains(&rip), "{out}");
    assert_eq!(v["mode"], 64);
    // The spin counter is a non-zero little-endian u64 at sym.probe_counter.
    let (code, out, err) = kvmi(&[
        "read",
        "--socket",
        sock,
        "--profile",
        "test-guest",
        "probe_counter",
        "8",
    ]);
    assert_eq!(code, 0, "{err}");
    let addr = t.sym("probe_counter");
    assert!(out.starts_with(&format!("{addr:016x}  ")), "{out}");
    assert!(
        !out.contains("00 00 00 00 00 00 00 00 "),
        "counter is zero: {out}"
    );
    let (code, _, err) = kvmi(&["read", "--socket", sock, "0x10000000000", "8"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("READ_PHYSICAL") || err.contains("ReadPhysical"),
        "{err}"
    );
}

#[test]
fn break_and_protect_print_their_events_as_json_lines() {
    if !kvmi_tests::require_kvm("break_and_protect_print_their_events_as_json_lines") {
        return;
    }
    let t = spin();
    let sock = t.socket.to_str().unwrap();
    let (code, out, err) = kvmi(&["regs", "--socket", sock]);
    assert_eq!(code, 0, "{err}");
    let rip = hex(&serde_json::from_str::<Value>(&out).unwrap()["regs"]["rip"]);
    let addr = format!("{rip:#x}");
    let (code, out, err) = kvmi(&["break", "--socket", sock, &addr, "--count", "3"]);
    assert_eq!(code, 0, "{err}");
    let hits = json_lines(&out);
    assert_eq!(hits.len(), 3, "{out}");
    for h in &hits {
        assert_eq!(h["event"], "breakpoint");
        assert_eq!(hex(&h["rip"]), rip);
    }
    let counter = t.sym("probe_counter");
    let (code, out, err) = kvmi(&[
        "protect",
        "--socket",
        sock,
        "--profile",
        "test-guest",
        "probe_counter",
        "--access",
        "r-x",
        "--count",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let faults = json_lines(&out);
    assert_eq!(faults.len(), 2, "{out}");
    for f in &faults {
        assert_eq!(f["event"], "page_fault");
        assert_eq!(hex(&f["gpa"]), counter);
        assert_eq!(f["access"], "-w-");
    }
}

#[test]
fn events_prints_the_demo_agent_hypercalls() {
    if !kvmi_tests::require_kvm("events_prints_the_demo_agent_hypercalls") {
        return;
    }
    let t = Target::start(Image::DemoTarget, "", &[]);
    let sock = t.socket.to_str().unwrap();
    let (code, out, err) = kvmi(&[
        "attach",
        "--socket",
        sock,
        "--enable",
        "hypercall",
        "--count",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let evs = json_lines(&out);
    assert_eq!(evs.len(), 2, "{out}");
    for e in &evs {
        assert_eq!(e["event"], "hypercall");
        assert_eq!(e["vcpu"], 0);
        // The demo's agent-caller task calls from CPL3 with RAX=34, RDI=24.
        assert_eq!(e["cpl"], 3);
        assert_eq!(hex(&e["rax"]), 34);
        assert_eq!(hex(&e["rdi"]), 24);
    }
}

#[test]
fn pause_holds_the_demo_until_resume() {
    if !kvmi_tests::require_kvm("pause_holds_the_demo_until_resume") {
        return;
    }
    let t = Target::start(Image::DemoTarget, "", &[]);
    assert!(t.wait_serial("heartbeat round=1", Duration::from_secs(30)));
    let sock = t.socket.to_str().unwrap().to_string();
    let mut pause = Command::new(kvmi_tests::kvmi_bin())
        .args(["pause", "--socket", &sock])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = format!("{sock}.paused");
    wait::until(Duration::from_secs(20), "kvmi pause to pause", || {
        std::path::Path::new(&marker).exists()
    });
    let frozen = t.serial().len();
    // Time passes while paused: the guest must not print (shown positively below: it prints
    // again after the resume).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(t.serial().len(), frozen, "the guest printed while paused");
    let (code, _, err) = kvmi(&["resume", "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    let status = pause.wait().unwrap();
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(pause.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(json_lines(&out)[0]["event"], "pause_vcpu");
    assert!(
        t.wait_serial_growth(frozen, Duration::from_secs(10)),
        "no output after resume"
    );
}

#[test]
fn bench_measures_both_exits_against_their_floor() {
    if !kvmi_tests::require_kvm("bench_measures_both_exits_against_their_floor") {
        return;
    }
    let (code, out, err) = kvmi(&["bench", "--iterations", "50", "--json"]);
    assert_eq!(code, 0, "{err}");
    let last = out.lines().last().expect("JSON line");
    let v: Value = serde_json::from_str(last).expect("JSON");
    for kind in ["hw-breakpoint", "page-write"] {
        for side in ["floor", "socket"] {
            assert_eq!(v[kind][side]["samples"], 49, "{kind} {side}: {out}");
            assert!(v[kind][side]["per_sec"].as_f64().unwrap() > 0.0);
        }
        assert!(v[kind]["ratio"]["p50"].as_f64().unwrap() > 0.0);
    }
    assert!(out.contains("ratio socket/floor"), "{out}");
    // The execute restriction answered CONTINUE: every iteration stepped through, measured
    // against the unrestricted loop.
    let exec = &v["exec-step-through"];
    assert!(exec["exec_events"].as_u64().unwrap() >= 50, "{out}");
    assert!(exec["exec_events_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    assert!(exec["ratio"]["slowdown"].as_f64().unwrap() > 1.0, "{out}");
    assert!(out.contains("ratio no-exec/unrestricted"), "{out}");
}

#[test]
fn bench_gdb_measures_the_stop_round_trip_against_the_floor() {
    if !kvmi_tests::require_kvm("bench_gdb_measures_the_stop_round_trip_against_the_floor") {
        return;
    }
    let (code, out, err) = kvmi(&["bench", "--gdb", "--iterations", "40", "--json"]);
    assert_eq!(code, 0, "{err}");
    let last = out.lines().last().expect("JSON line");
    let v: Value = serde_json::from_str(last).expect("JSON");
    assert_eq!(v["hw-breakpoint"]["floor"]["samples"], 39, "{out}");
    // `--gdb` measures the breakpoint only: no page-write or exec figures.
    assert!(v.get("page-write").is_none(), "{out}");
    for kind in ["hbreak", "break"] {
        let row = &v["gdb"][kind];
        // One stop reply per guest iteration: the loop hit the breakpoint 40 times, each
        // seen by the stub's client as a SIGTRAP stop (the bench fails on any other reply,
        // and checks rip at the breakpoint after the last one).
        assert_eq!(row["stops"], 40, "{kind}: {out}");
        assert!(row["per_sec"].as_f64().unwrap() > 0.0, "{kind}: {out}");
        assert!(row["ratio"]["p50"].as_f64().unwrap() > 0.0, "{kind}: {out}");
    }
    assert!(out.contains("ratio gdb hbreak/floor"), "{out}");
    assert!(out.contains("ratio gdb break/floor"), "{out}");
}
