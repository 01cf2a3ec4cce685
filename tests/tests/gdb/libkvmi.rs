//! `kvmi gdb --libkvmi-listen SOCK` against the demo target run with `kvmi run --kvmi-dialect
//! libkvmi --kvmi-connect SOCK`: the stub listens, the VM connects and does the kvmi-v7
//! handshake, and GDB sees the same VM as over `--socket`. Hardware breakpoints, which
//! kvmi-v7 cannot set, are refused with an error and the session goes on.

use kvmi_tests::gdb::libkvmi_session;
use kvmi_tests::socket_target::Target;
use kvmi_tests::wait;

use crate::{SERIAL_WAIT, cmds, demo_libkvmi, heartbeats, in_range};

/// Asserts that the demo prints at least `more` further heartbeats and its process runs.
fn assert_heartbeats_continue(target: &mut Target, more: usize) {
    let before = heartbeats(target);
    wait::until(SERIAL_WAIT, "further heartbeats after the session", || {
        heartbeats(target) >= before + more
    });
    assert!(
        target.running(),
        "the VM ended; stderr: {}",
        target.stderr()
    );
}

/// Over libkvmi: attach; `info registers rip cr3` shows a RIP in the image's text and a
/// page-aligned CR3; `break task_create` by symbol and `continue` stop at the profile's
/// `sym.task_create` with the new task's name (`worker-N`) at `x/s $rdi`; `detach` leaves the
/// VM running (heartbeats keep coming).
#[test]
fn libkvmi_attach_registers_break_on_task_create_and_detach() {
    let test = "libkvmi_attach_registers_break_on_task_create_and_detach";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((mut target, elf)) = demo_libkvmi(test) else {
        return;
    };
    let task_create = target.sym("task_create");
    let out = libkvmi_session(
        &target,
        &elf,
        &cmds(&[
            "info registers rip cr3",
            "break task_create",
            "continue",
            r#"printf "PC=%#lx PARENT=%lu\n", (unsigned long)$pc, (unsigned long)$rdx"#,
            "x/s $rdi",
            "delete",
            "detach",
        ]),
    );
    let rip = out.register_lines("rip");
    let cr3 = out.register_lines("cr3");
    assert_eq!((rip.len(), cr3.len()), (1, 1), "{out}");
    assert!(
        in_range(&target, "kernel_text", rip[0]) || in_range(&target, "user_text", rip[0]),
        "rip {:#x} is outside the image's text{out}",
        rip[0]
    );
    assert_eq!(rip[0], out.attach_pc(), "{out}");
    assert!(
        cr3[0] != 0 && cr3[0] & 0xfff == 0 && cr3[0] < 1 << 32,
        "CR3 {:#x} is no page-table root{out}",
        cr3[0]
    );
    assert!(
        out.text
            .contains(&format!("Breakpoint 1 at {task_create:#x}")),
        "GDB did not put the breakpoint at sym.task_create {task_create:#x}{out}"
    );
    assert_eq!(out.breakpoint_hits(), vec![(1, task_create)], "{out}");
    assert_eq!(out.value("PC"), task_create, "{out}");
    assert_eq!(out.value("PARENT"), 1, "{out}");
    let name = out
        .first_string()
        .unwrap_or_else(|| panic!("no x/s line{out}"));
    assert!(
        name.strip_prefix("worker-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        "task name {name:?} is not worker-N{out}"
    );
    assert!(out.text.contains("detached"), "no detach report{out}");
    let logged = format!("name={name} parent=1 ");
    assert!(
        target.wait_serial(&logged, SERIAL_WAIT),
        "the kernel never logged `{logged}` after the detach; serial: {}",
        target.serial()
    );
    assert_heartbeats_continue(&mut target, 5);
}

/// Over libkvmi `hbreak` cannot be inserted (kvmi-v7 has no way to set a breakpoint or the
/// debug registers): GDB reports it at `continue` and the session goes on, still stopped where
/// it attached; a single step works (SINGLESTEP); after `detach` the VM runs on.
#[test]
fn libkvmi_hbreak_is_refused_and_the_session_goes_on() {
    let test = "libkvmi_hbreak_is_refused_and_the_session_goes_on";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((mut target, elf)) = demo_libkvmi(test) else {
        return;
    };
    let out = libkvmi_session(
        &target,
        &elf,
        &cmds(&[
            "hbreak task_create",
            "continue",
            r#"printf "AFTER_PC=%#lx\n", (unsigned long)$pc"#,
            "delete",
            "stepi",
            r#"printf "STEPPED=%#lx\n", (unsigned long)$pc"#,
            "detach",
        ]),
    );
    assert!(
        out.text.contains("Cannot insert hardware breakpoint 1"),
        "GDB did not report the refused hardware breakpoint{out}"
    );
    assert_eq!(
        out.value("AFTER_PC"),
        out.attach_pc(),
        "the VM should stay stopped where it attached{out}"
    );
    let stepped = out.value("STEPPED");
    assert!(
        stepped != out.attach_pc() || out.text.contains("cannot single-step"),
        "stepi did not move the pc{out}"
    );
    assert!(out.text.contains("detached"), "no detach report{out}");
    assert_heartbeats_continue(&mut target, 5);
}
