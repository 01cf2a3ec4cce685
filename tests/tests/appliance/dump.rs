//! `kvmi dump` end to end against `kvmi run --api-socket`: a guest that never stops writing a
//! checkable pattern (test-guest `mode=pattern`, CPL3) is dumped live and stop-and-copy in
//! every format, and each file must hold the guest's memory as of one instant; a VM paused
//! through the API stays paused across a dump, which then equals a second one byte for byte;
//! a bad output path is refused with no file and the guest writes on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvmi_dump::Format;
use kvmi_tests::dump_file::ram_of;
use kvmi_tests::pattern::{self, PatternState};
use kvmi_tests::wait;
use serde_json::{Value, json};

use crate::api::Run;

const RAM_MIB: u64 = 96;

/// `kvmi dump --api-socket S --output OUT --format F [--live]`: its JSON summary line.
fn kvmi_dump(run: &Run, out: &Path, format: &str, live: bool) -> Value {
    let mut cmd = Command::new(kvmi_tests::kvmi_bin());
    cmd.args(["dump", "--api-socket"])
        .arg(&run.socket)
        .arg("--output")
        .arg(out)
        .args(["--format", format]);
    if live {
        cmd.arg("--live");
    }
    let done = cmd.output().expect("kvmi dump runs");
    assert!(
        done.status.success(),
        "kvmi dump {format} live={live}: {}; run stderr: {:?}",
        String::from_utf8_lossy(&done.stderr),
        run.stderr()
    );
    let stdout = String::from_utf8_lossy(&done.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one summary line: {stdout}");
    serde_json::from_str(lines[0]).expect("the summary is JSON")
}

/// The pattern area's guest-physical address, from the guest's serial line.
fn pattern_area(run: &Run) -> u64 {
    let mut area = None;
    let found = wait::within(Duration::from_secs(30), || {
        area = run.stdout().iter().find_map(|l| {
            let rest = l.strip_prefix("pattern area=0x")?;
            u64::from_str_radix(rest.split_whitespace().next()?, 16).ok()
        });
        area.is_some()
    });
    assert!(found, "no pattern line; stdout {:?}", run.stdout());
    area.unwrap()
}

fn format_of(name: &str) -> Format {
    match name {
        "raw" => Format::Raw,
        "lime" => Format::Lime,
        _ => Format::Elf,
    }
}

/// Reads the dump at `out` and checks its pattern area; removes the file.
fn check_file(out: &Path, format: &str, area: u64) -> (PatternState, Vec<u8>) {
    let file = std::fs::read(out).expect("the dump file exists");
    let _ = std::fs::remove_file(out);
    let ram = ram_of(format_of(format), &file, RAM_MIB << 20);
    let state = pattern::check(&ram, area)
        .unwrap_or_else(|e| panic!("the {format} dump is not one instant of memory: {e}"));
    (state, ram)
}

fn out_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvmi-dump-e2e-{tag}-{}", std::process::id()))
}

#[test]
fn dumps_of_a_guest_that_keeps_writing_are_each_one_instant_of_its_memory() {
    if !kvmi_tests::require_kvm(
        "dumps_of_a_guest_that_keeps_writing_are_each_one_instant_of_its_memory",
    ) {
        return;
    }
    // Two vCPUs: vCPU 1 halts at once (its thread ends), which a dump must take as paused.
    let run = Run::start(
        "dump",
        &[
            "--no-appliance",
            "--image",
            "test-guest",
            "--cmdline",
            "mode=pattern mib=16",
            "--memory",
            &RAM_MIB.to_string(),
            "--vcpus",
            "2",
        ],
    );
    let area = pattern_area(&run);
    let mut last_seq = 0;
    for (format, live) in [
        ("raw", true),
        ("lime", true),
        ("elf", true),
        ("raw", false),
        ("lime", false),
        ("elf", false),
    ] {
        let out = out_path(format);
        let summary = kvmi_dump(&run, &out, format, live);
        assert_eq!(summary["format"], format, "{summary}");
        assert_eq!(
            summary["file_bytes"],
            std::fs::metadata(&out).unwrap().len(),
            "{summary}"
        );
        let passes = summary["passes"].as_u64().expect("passes");
        if live && summary["live"] == true {
            assert!(
                passes >= 2,
                "a live dump re-copies at least once: {summary}"
            );
            assert!(
                summary["recopied_bytes"].as_u64().unwrap() > 0,
                "the writer dirtied pages during the first pass: {summary}"
            );
        } else {
            assert_eq!(passes, 1, "{summary}");
            assert!(
                !live || summary["fallback"].is_string(),
                "a live dump that did not run live says why: {summary}"
            );
        }
        let (state, _) = check_file(&out, format, area);
        assert!(state.pages > 4000, "{state:?}");
        assert!(
            state.seq > last_seq,
            "the guest wrote on between dumps ({format} live={live}): {} after {last_seq}",
            state.seq
        );
        last_seq = state.seq;
    }

    // Paused through the API: the dump keeps the pause, and two dumps are equal.
    run.ok("PUT", "/vm/pause", None, 200);
    let (a, b) = (out_path("paused-a"), out_path("paused-b"));
    kvmi_dump(&run, &a, "raw", false);
    assert_eq!(
        run.vm(1)["state"],
        "paused",
        "a dump does not undo the user's pause"
    );
    kvmi_dump(&run, &b, "raw", true);
    let (first, ram_a) = check_file(&a, "raw", area);
    let (second, ram_b) = check_file(&b, "raw", area);
    assert_eq!(first, second);
    assert!(ram_a == ram_b, "two dumps of a paused VM differ");
    run.ok("PUT", "/vm/resume", Some(json!({"target": 1})), 200);

    // A bad path: a clear error, no file, and the guest writes on.
    let missing = Path::new("/nonexistent-kvmi-dir/ram.lime");
    let r = run.call(
        "PUT",
        "/vm/dump",
        Some(json!({"path": missing, "format": "lime"})),
    );
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("nonexistent-kvmi-dir")
    );
    assert!(!missing.exists());
    let out = out_path("after");
    kvmi_dump(&run, &out, "raw", true);
    let (after, _) = check_file(&out, "raw", area);
    assert!(
        after.seq > second.seq,
        "the guest runs on after the failed dump"
    );
    assert_eq!(run.interrupt(), Some(130));
}
