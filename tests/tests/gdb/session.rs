//! The session's life: attach pauses the VM, `detach` leaves it running, `kill` is refused,
//! an unmapped address is an error GDB reports, and a VM that exits ends the session.

use kvmi_tests::gdb::session;
use kvmi_tests::socket_target::Target;
use kvmi_tests::wait;

use crate::{SERIAL_WAIT, cmds, demo, heartbeats, in_range};

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

/// The pc GDB read right after attaching: inside the image's text.
fn attached_pc(target: &Target, out: &kvmi_tests::gdb::GdbOutput) -> u64 {
    let pc = out.attach_pc();
    assert!(
        in_range(target, "kernel_text", pc) || in_range(target, "user_text", pc),
        "pc {pc:#x} after attach is outside the image's text{out}"
    );
    pc
}

/// While GDB is attached the VM is paused (its serial output does not grow over half a second,
/// measured from inside the session with `shell stat`); `detach` reports the detach and the
/// VM runs on: its heartbeats keep coming.
#[test]
fn detach_leaves_the_vm_running() {
    let test = "detach_leaves_the_vm_running";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((mut target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let serial = target.dir().join("serial.txt");
    let size = format!("shell stat -c SERIAL_BYTES=%s {}", serial.display());
    let out = session(
        &target,
        &elf,
        &cmds(&[&size, "shell sleep 0.5", &size, "detach"]),
    );
    attached_pc(&target, &out);
    let sizes = out.values("SERIAL_BYTES");
    assert_eq!(sizes.len(), 2, "{out}");
    assert_eq!(
        sizes[0], sizes[1],
        "the guest printed while GDB held it paused{out}"
    );
    assert!(out.text.contains("detached"), "no detach report{out}");
    assert_heartbeats_continue(&mut target, 5);
}

/// `kill` is refused with a message (the VM is not GDB's to kill) and neither GDB's session
/// nor the VM suffers: the registers still read afterwards, GDB does not report the inferior
/// killed, and after `detach` the VM runs on.
#[test]
fn kill_is_refused_and_the_session_and_the_vm_survive() {
    let test = "kill_is_refused_and_the_session_and_the_vm_survive";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((mut target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let out = session(
        &target,
        &elf,
        &cmds(&[
            "kill",
            r#"printf "ALIVE_PC=%#lx\n", (unsigned long)$pc"#,
            "detach",
        ]),
    );
    let pc = attached_pc(&target, &out);
    assert!(
        !out.text.contains("killed]"),
        "GDB reports the inferior killed{out}"
    );
    // Commands are not echoed in batch mode: a line about kill other than GDB's own
    // confirmation query is the refusal (GDB's "Can't kill process" when the stub answers
    // vKill with an error, or the stub's own message).
    let refusal: Vec<&str> = out
        .text
        .lines()
        .filter(|l| l.to_lowercase().contains("kill"))
        .filter(|l| !l.starts_with("Kill the program being debugged?"))
        .collect();
    assert!(
        !refusal.is_empty(),
        "no message about the refused kill{out}"
    );
    assert_eq!(
        out.value("ALIVE_PC"),
        pc,
        "the session should go on, still paused where it attached{out}"
    );
    assert!(out.text.contains("detached"), "no detach report{out}");
    assert_heartbeats_continue(&mut target, 5);
}

/// `x/x 0xdead00000000` (not mapped by the demo's page tables) prints GDB's "Cannot access
/// memory at address 0xdead00000000", and the session goes on: the next read (slot 0's pid in
/// the task table, `sym.task_table`) gives 1.
#[test]
fn reading_an_unmapped_address_is_cannot_access_memory() {
    let test = "reading_an_unmapped_address_is_cannot_access_memory";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((mut target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let table = target.sym("task_table");
    let pid0 = format!(r#"printf "PID0=%u\n", *(unsigned int *){table:#x}"#);
    let out = session(
        &target,
        &elf,
        &cmds(&["x/x 0xdead00000000", &pid0, "detach"]),
    );
    assert!(
        out.text
            .contains("Cannot access memory at address 0xdead00000000"),
        "{out}"
    );
    assert_eq!(out.value("PID0"), 1, "{out}");
    assert_heartbeats_continue(&mut target, 1);
}

/// Rounds the exiting VM runs: about 11 s at the demo's ~180 rounds/s, long enough for GDB to
/// attach after the first heartbeat, short enough for the test.
const EXIT_ROUNDS: u64 = 2000;

/// A demo started with `rounds=2000` exits (status 0) while GDB is in `continue`: the session
/// ends cleanly within the timeout (GDB reports the inferior exited, or the remote connection
/// closed) instead of hanging, and the guest did run to its last round.
#[test]
fn vm_exit_during_continue_ends_the_session() {
    let test = "vm_exit_during_continue_ends_the_session";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((mut target, elf)) = demo(test, &format!("rounds={EXIT_ROUNDS}"), &[]) else {
        return;
    };
    let out = session(&target, &elf, &cmds(&["continue"]));
    attached_pc(&target, &out);
    assert!(
        out.text.contains("exited") || out.text.contains("Remote connection closed"),
        "GDB did not report the end of the VM{out}"
    );
    assert_eq!(
        target.wait_exit(SERIAL_WAIT),
        Some(0),
        "stderr: {}",
        target.stderr()
    );
    assert!(
        target
            .serial()
            .contains(&format!("heartbeat round={EXIT_ROUNDS} ")),
        "serial: {}",
        target.serial()
    );
}
