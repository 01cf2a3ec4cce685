//! Watchpoints (the stub's page-access events) on the task table.

use kvmi_tests::gdb::session;

use crate::{cmds, demo, in_range};

/// `watch *(unsigned int *)ADDR` on the `state` field of task-table slot 0 (`sym.task_table` +
/// `struct.task.state`; slot 0 is `init`, pid 1, which never exits), two `continue`s: every
/// round the kernel's `claim` sets it READY → RUNNING and `release` RUNNING → READY, so GDB
/// reports two changes, one of those and then its reverse (`Old value` / `New value`, the
/// `const.task_state_*` values), each stopped in kernel text.
#[test]
fn watchpoint_on_a_task_state_reports_the_kernels_writes() {
    let test = "watchpoint_on_a_task_state_reports_the_kernels_writes";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let table = target.sym("task_table");
    let state = table + target.profile.field("task", "state").unwrap();
    let ready = target.profile.constant("task_state_ready").unwrap();
    let running = target.profile.constant("task_state_running").unwrap();
    let watch = format!("watch *(unsigned int *){state:#x}");
    let slot0_pid = format!(r#"printf "SLOT0_PID=%u\n", *(unsigned int *){table:#x}"#);
    let out = session(
        &target,
        &elf,
        &cmds(&[
            &slot0_pid,
            &watch,
            "continue",
            r#"printf "WATCH_PC=%#lx\n", (unsigned long)$pc"#,
            "continue",
            r#"printf "WATCH_PC=%#lx\n", (unsigned long)$pc"#,
            "delete",
            "detach",
        ]),
    );
    assert_eq!(out.value("SLOT0_PID"), 1, "slot 0 should be init{out}");
    let set = format!("Hardware watchpoint 1: *(unsigned int *){state:#x}");
    assert!(out.text.contains(&set), "no `{set}`{out}");
    let changes = out.watch_changes();
    assert_eq!(changes.len(), 2, "two reported changes{out}");
    assert!(
        changes[0] == (ready, running) || changes[0] == (running, ready),
        "first change {:?} is not READY ({ready}) <-> RUNNING ({running}){out}",
        changes[0]
    );
    assert_eq!(
        changes[1],
        (changes[0].1, changes[0].0),
        "the second change should undo the first{out}"
    );
    let pcs = out.values("WATCH_PC");
    assert_eq!(pcs.len(), 2, "{out}");
    for pc in pcs {
        assert!(
            in_range(&target, "kernel_text", pc),
            "the write at {pc:#x} is not the kernel's{out}"
        );
    }
}
