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

/// `kvmi run` of test-guest `mode=pattern` (16 MiB area) with `vcpus` vCPUs and an API.
fn pattern_guest(tag: &str, vcpus: u32) -> Run {
    Run::start(
        tag,
        &[
            "--no-appliance",
            "--image",
            "test-guest",
            "--cmdline",
            "mode=pattern mib=16",
            "--memory",
            &RAM_MIB.to_string(),
            "--vcpus",
            &vcpus.to_string(),
        ],
    )
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
    let run = pattern_guest("dump", 2);
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
    let held = kvmi_dump(&run, &a, "raw", false);
    assert_eq!(
        held["pause_ms"], 0.0,
        "the dump added no pause of its own: {held}"
    );
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

/// `gdb -batch -c CORE` with `commands`: what it printed.
fn gdb_on_core(core: &Path, commands: &[String]) -> String {
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-batch", "-c"]).arg(core);
    for c in commands {
        cmd.arg("-ex").arg(c);
    }
    let out = cmd
        .output()
        .expect("gdb runs (gdb 13 is on every machine and in CI)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn sha1_hex(bytes: &[u8]) -> String {
    use sha1::Digest as _;
    sha1::Sha1::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn gdb_and_volatility_read_the_dumps_as_the_raw_image_says() {
    if !kvmi_tests::require_kvm("gdb_and_volatility_read_the_dumps_as_the_raw_image_says") {
        return;
    }
    let run = pattern_guest("readers", 1);
    let area = pattern_area(&run);
    // Paused: the three files hold the same memory.
    run.ok("PUT", "/vm/pause", None, 200);
    let files: Vec<(&str, PathBuf)> = ["raw", "lime", "elf"]
        .into_iter()
        .map(|f| (f, out_path(&format!("readers.{f}"))))
        .collect();
    for (format, path) in &files {
        kvmi_dump(&run, path, format, false);
    }
    run.ok("PUT", "/vm/resume", None, 200);
    assert_eq!(run.interrupt(), Some(130));
    let raw = std::fs::read(&files[0].1).unwrap();
    let state = pattern::check(&raw, area).expect("the paused dump is consistent");
    let word = |at: u64| u64::from_le_bytes(raw[at as usize..][..8].try_into().unwrap());

    // gdb opens the ELF core: the vCPU is a thread whose rip is the NT_PRSTATUS one, and
    // memory reads (the kernel's identity map: virtual = physical) give the raw image's words.
    let elf = std::fs::read(&files[2].1).unwrap();
    let rips = kvmi_tests::dump_file::prstatus_rips(&elf);
    assert_eq!(rips.len(), 1, "{rips:?}");
    let printed = gdb_on_core(
        &files[2].1,
        &["info registers rip".into(), format!("x/3gx {area:#x}")],
    );
    let rip_line = printed
        .lines()
        .find(|l| l.starts_with("rip"))
        .unwrap_or_else(|| panic!("gdb printed no rip: {printed}"));
    assert!(
        rip_line.contains(&format!("{:#x}", rips[0].1)),
        "gdb's rip {rip_line:?} is the note's {:#x}",
        rips[0].1
    );
    let words = format!("{:#018x}\t{:#018x}", word(area), word(area + 8));
    assert!(
        printed.contains(&words),
        "gdb's x/3gx shows seq and magic {words:?}: {printed}"
    );
    assert_eq!(word(area), state.seq);

    // Volatility 3 stacks its LiME and ELF layers on the files and reads the same pages.
    if kvmi_tests::require_python_module(
        "gdb_and_volatility_read_the_dumps_as_the_raw_image_says",
        "volatility3",
    ) {
        let last = (RAM_MIB << 20) - 4096;
        let pages = [0x10_0000, area, area + 7 * 4096, last];
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/volatility_read.py");
        for (format, path) in &files[1..] {
            let out = Command::new("python3")
                .arg(script)
                .arg(path)
                .arg(format)
                .args(pages.iter().map(|p| format!("{p:#x}")))
                .output()
                .expect("python3 runs");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "volatility on {format}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains(&format!("max {:#x}", (RAM_MIB << 20) - 1)),
                "{format}: {text}"
            );
            for p in pages {
                let expected = sha1_hex(&raw[p as usize..][..4096]);
                assert!(
                    text.contains(&format!("page {p:#x} {expected}")),
                    "{format}: volatility's page {p:#x} differs from the raw image: {text}"
                );
            }
        }
    }
    for (_, path) in files {
        let _ = std::fs::remove_file(path);
    }
}
