//! Runs the built `kvmi` binary: exit statuses, serial file, Ctrl-C, profiles and `caps`.

use std::process::{Command, Stdio};
use std::time::Duration;

use kvmi_tests::wait;

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

#[test]
fn run_exit_statuses_follow_the_guest_and_the_vmm() {
    if !kvmi_tests::require_kvm("run_exit_statuses_follow_the_guest_and_the_vmm") {
        return;
    }
    let (code, out, _) = kvmi(&["run", "--image", "test-guest", "--cmdline", "mode=hello"]);
    assert_eq!(code, 0);
    assert_eq!(out, "hello from vcpu 0\n");
    let (code, _, _) = kvmi(&[
        "run",
        "--image",
        "test-guest",
        "--cmdline",
        "mode=user-exit status=0x42",
    ]);
    assert_eq!(code, 0x42);
    let (code, _, err) = kvmi(&[
        "run",
        "--image",
        "test-guest",
        "--cmdline",
        "mode=bad-port",
        "--unknown-io",
        "error",
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("port 0x99"), "{err}");
    let (code, _, err) = kvmi(&[
        "run",
        "--image",
        "test-guest",
        "--cmdline",
        "mode=triple-fault",
    ]);
    assert_eq!(code, 127, "{err}");
    let (code, _, err) = kvmi(&[
        "run",
        "--image",
        "test-guest",
        "--cmdline",
        "mode=spin",
        "--timeout",
        "0.5",
    ]);
    assert_eq!(code, 124, "{err}");
    let (code, _, err) = kvmi(&["run", "--image", "/nonexistent/image"]);
    assert_eq!(code, 125);
    assert!(err.contains("no file"), "{err}");
}

#[test]
fn serial_goes_to_a_file_and_ctrl_c_stops_cleanly() {
    if !kvmi_tests::require_kvm("serial_goes_to_a_file_and_ctrl_c_stops_cleanly") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvmi-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let serial = dir.join("serial.txt");
    let mut child = Command::new(kvmi_tests::kvmi_bin())
        .args([
            "run",
            "--image",
            "test-guest",
            "--cmdline",
            "mode=spin",
            "--serial",
        ])
        .arg(&serial)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait::until(Duration::from_secs(20), "the guest to print", || {
        std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("spinning")
    });
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(stdout.is_empty(), "serial went to stdout: {stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn profile_of_an_image_file_matches_the_embedded_one() {
    let dir = std::env::temp_dir().join(format!("kvmi-prof-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("test-guest");
    std::fs::write(
        &file,
        kvmi_tests::common::elf(kvmi::images::Image::TestGuest),
    )
    .unwrap();
    let (code, out, err) = kvmi(&["profile", "--image", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let from_file = kvmi::profile::Profile::from_json(&out).unwrap();
    let embedded = kvmi_tests::common::profile(kvmi::images::Image::TestGuest);
    assert_eq!(from_file, embedded);
    assert!(from_file.symbol("bad_insn").is_some());
    let (code, _, err) = kvmi(&["profile", "--image", "/etc/hostname"]);
    assert_eq!(code, 125);
    assert!(err.contains("ELF"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn caps_reports_what_this_host_delivers() {
    if !kvmi_tests::require_kvm("caps_reports_what_this_host_delivers") {
        return;
    }
    let (code, out, err) = kvmi(&["caps", "--json"]);
    assert_eq!(code, 0, "{err}");
    let caps: vmm::Capabilities = serde_json::from_str(&out).unwrap();
    assert_eq!(caps.hw_breakpoints, 4, "{out}");
    assert!(caps.single_step, "{out}");
    assert!(caps.msr_write_filter, "{out}");
    assert!(caps.ro_slot_write_trap, "{out}");
    assert!(caps.memfd_remap, "{out}");
    assert_eq!(caps.sync_regs, 7);
    // The host's shmem huge-page mode, as the kernel names it.
    assert_eq!(
        caps.shmem_huge_pages,
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .ok()
            .and_then(|t| Some(t[t.find('[')? + 1..t.find(']')?].to_string())),
        "{out}"
    );
    if caps.pvm_module {
        // docs/platform.md: PVM cannot emulate int3 at CPL0, and traps mprotect'ed writes as
        // MMIO; CPL0 is emulated.
        assert!(!caps.sw_breakpoints, "{out}");
        assert_eq!(caps.mprotect_write_trap, vmm::probe::MprotectMode::MmioExit);
        assert!(caps.cpl0_emulated, "{out}");
    }
    let (code, table, _) = kvmi(&["caps"]);
    assert_eq!(code, 0);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}: {table}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(row("hardware exec breakpoints").starts_with("hardware exec breakpoints 4"));
    assert!(row("single step").starts_with("single step yes"));
    assert!(row("MSR write filter").starts_with("MSR write filter yes"));
    assert!(row("read-only slot write trap").starts_with("read-only slot write trap yes"));
    assert!(row("memfd remap").starts_with("memfd remap between VMs yes"));
    if caps.pvm_module {
        assert!(row("software breakpoints").starts_with("software breakpoints (int3) no"));
    }
}

#[test]
fn help_documents_the_exit_statuses() {
    let (code, out, _) = kvmi(&["run", "--help"]);
    assert_eq!(code, 0);
    for s in [
        "124",
        "125",
        "126",
        "127",
        "130",
        "--timeout",
        "--unknown-io",
        "--cmdline",
    ] {
        assert!(out.contains(s), "help lacks {s}: {out}");
    }
}

#[test]
fn run_refuses_more_memory_than_the_host_has_and_keeps_small_values_working() {
    if !kvmi_tests::require_kvm(
        "run_refuses_more_memory_than_the_host_has_and_keeps_small_values_working",
    ) {
        return;
    }
    // 4000000 MiB (3.8 TiB), or more on a host with more RAM + swap than that.
    let host_mib = vmm::vm::host_memory_bytes().expect("sysinfo") >> 20;
    let mib = (host_mib + 1).max(4_000_000).to_string();
    let (code, out, err) = kvmi(&[
        "run",
        "--image",
        "test-guest",
        "--cmdline",
        "mode=hello",
        "--memory",
        &mib,
    ]);
    assert_eq!(code, 125, "{err}");
    assert_eq!(out, "", "the guest ran");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("kvmi: error: ")
            && err.contains(&format!(
                "guest RAM of {mib} MiB is more than this host's RAM + swap ({host_mib} MiB)"
            )),
        "{err}"
    );
    // The default and small values still boot.
    for memory in [None, Some("4"), Some("256")] {
        let mut args = vec!["run", "--image", "test-guest", "--cmdline", "mode=hello"];
        args.extend(memory.iter().flat_map(|m| ["--memory", m]));
        let (code, out, err) = kvmi(&args);
        assert_eq!(
            (code, out.as_str()),
            (0, "hello from vcpu 0\n"),
            "{memory:?}: {err}"
        );
    }
}
