//! Registers, single steps and threads: `info registers` at a hardware breakpoint, `stepi`
//! against GDB's own disassembly, `info threads` on two vCPUs.

use kvmi_tests::gdb::session;

use crate::{cmds, demo, in_range, task_cr3s};

/// `hbreak task_switch`, two hits, `info registers rip cr3 cs` at each: RIP is
/// `sym.task_switch` (kernel text), CS is a CPL0 selector, and CR3 is non-zero, page-aligned
/// and the page-table root of a task the kernel created (its `task created ... cr3=` lines:
/// at `task_switch`'s entry the previous task's space is still loaded). On one vCPU only
/// `task_switch` changes CR3, so the CR3 at the second hit is the `cr3` field
/// (`struct.task.cr3`) of the task the first hit switched to, read through GDB's memory
/// access at `$rdi`. (The stub holds the KVMI connection, so GET_REGISTERS from a second tool
/// at the same instant is not available; the kernel's own log stands in for it.)
#[test]
fn info_registers_at_a_hardware_breakpoint_shows_rip_and_the_task_cr3() {
    let test = "info_registers_at_a_hardware_breakpoint_shows_rip_and_the_task_cr3";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let task_switch = target.sym("task_switch");
    let cr3_field = target.profile.field("task", "cr3").unwrap();
    let next_cr3 = format!(r#"printf "NEXT_CR3=%#lx\n", *(unsigned long *)($rdi + {cr3_field})"#);
    let out = session(
        &target,
        &elf,
        &cmds(&[
            "hbreak task_switch",
            "continue",
            "info registers rip cr3 cs",
            &next_cr3,
            "continue",
            "info registers rip cr3 cs",
            "delete",
            "detach",
        ]),
    );
    assert!(
        out.text.contains(&format!(
            "Hardware assisted breakpoint 1 at {task_switch:#x}"
        )),
        "{out}"
    );
    assert_eq!(
        out.breakpoint_hits(),
        vec![(1, task_switch), (1, task_switch)],
        "{out}"
    );
    let rips = out.register_lines("rip");
    assert_eq!(rips, vec![task_switch, task_switch], "{out}");
    assert!(in_range(&target, "kernel_text", rips[0]));
    for cs in out.register_lines("cs") {
        assert_eq!(cs & 3, 0, "CS {cs:#x} is not CPL0 at a kernel rip{out}");
    }
    let cr3s = out.register_lines("cr3");
    assert_eq!(cr3s.len(), 2, "{out}");
    let known = task_cr3s(&target);
    for &cr3 in &cr3s {
        assert!(
            cr3 != 0 && cr3 & 0xfff == 0,
            "CR3 {cr3:#x} is not a page address{out}"
        );
        assert!(
            known.contains(&cr3),
            "CR3 {cr3:#x} is not a task's ({known:x?}){out}"
        );
    }
    assert_eq!(
        cr3s[1],
        out.value("NEXT_CR3"),
        "CR3 at the second hit is not the cr3 of the task switched to at the first{out}"
    );
}

/// `break task_switch`, `continue`, `x/3i $pc`, then two `stepi`: each step moves RIP by the
/// length of the instruction GDB disassembled there (to the next address of the listing), and
/// the second step executed `task_switch`'s `mov %rax,%cr3`, so CR3 now equals RAX.
#[test]
fn stepi_advances_rip_by_the_disassembled_instruction_length() {
    let test = "stepi_advances_rip_by_the_disassembled_instruction_length";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let task_switch = target.sym("task_switch");
    let out = session(
        &target,
        &elf,
        &cmds(&[
            "break task_switch",
            "continue",
            "x/3i $pc",
            r#"printf "STEP0=%#lx\n", (unsigned long)$pc"#,
            "stepi",
            r#"printf "STEP1=%#lx\n", (unsigned long)$pc"#,
            "stepi",
            r#"printf "STEP2=%#lx CR3=%#lx RAX=%#lx\n", (unsigned long)$pc, (unsigned long)$cr3, (unsigned long)$rax"#,
            "delete",
            "detach",
        ]),
    );
    assert_eq!(out.breakpoint_hits(), vec![(1, task_switch)], "{out}");
    let insns = out.instructions();
    assert_eq!(insns.len(), 3, "x/3i listing{out}");
    assert_eq!(insns[0].0, task_switch, "{out}");
    let steps = [out.value("STEP0"), out.value("STEP1"), out.value("STEP2")];
    for k in 0..3 {
        assert_eq!(
            steps[k], insns[k].0,
            "after {k} stepi RIP should be the listing's instruction {k}{out}"
        );
    }
    for k in 0..2 {
        let len = steps[k + 1] - steps[k];
        assert!(
            (1..=15).contains(&len),
            "`{}` is {len} bytes long?{out}",
            insns[k].1
        );
    }
    assert!(
        insns[1].1.starts_with("mov") && insns[1].1.ends_with(",%cr3"),
        "task_switch's second instruction should load CR3 (update the test if the demo \
         changed){out}"
    );
    assert_eq!(
        out.value("CR3"),
        out.value("RAX"),
        "the stepped `mov %rax,%cr3` is not reflected in $cr3{out}"
    );
}

/// `kvmi run --vcpus 2`: `info threads` lists two threads (ids 1 and 2, one per vCPU), and
/// `thread N` selects each with its own RIP inside the image's text.
#[test]
fn info_threads_lists_one_thread_per_vcpu() {
    let test = "info_threads_lists_one_thread_per_vcpu";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((target, elf)) = demo(test, "", &["--vcpus", "2"]) else {
        return;
    };
    let out = session(
        &target,
        &elf,
        &cmds(&[
            "info threads",
            "thread 2",
            r#"printf "T2_PC=%#lx\n", (unsigned long)$pc"#,
            "thread 1",
            r#"printf "T1_PC=%#lx\n", (unsigned long)$pc"#,
            "detach",
        ]),
    );
    // Rows of `info threads`: `* 1    Thread 1.1 ... 0x... in ...` / `  2    Thread ...`.
    let ids: Vec<u32> = out
        .text
        .lines()
        .filter_map(|l| {
            let row = l.trim_start().trim_start_matches('*').trim_start();
            let (id, rest) = row.split_once(char::is_whitespace)?;
            rest.trim_start()
                .starts_with("Thread ")
                .then(|| id.parse().ok())
                .flatten()
        })
        .collect();
    assert_eq!(ids, vec![1, 2], "two threads{out}");
    for key in ["T1_PC", "T2_PC"] {
        let pc = out.value(key);
        assert!(
            in_range(&target, "kernel_text", pc) || in_range(&target, "user_text", pc),
            "{key} {pc:#x} is outside the image's text{out}"
        );
    }
}
