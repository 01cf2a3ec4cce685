//! Software breakpoints (`break`): by symbol on `task_create`, and ten at once on kernel
//! functions every scheduler round runs (more than the four debug registers).

use std::collections::BTreeSet;

use kvmi_tests::gdb::{function_address, session};

use crate::{SERIAL_WAIT, cmds, demo};

/// `break task_create` (GDB resolves the symbol from the ELF), `continue`: the stop is at the
/// profile's `sym.task_create`, and the arguments are those of `sched::spawn` creating a
/// worker for `init` (the initial tasks exist before the first heartbeat, so the next call is
/// a `SPAWN` from `init`, every 3rd round): RDI points at the name `worker-N` (a 16-byte
/// NUL-padded buffer, so `x/s` stops at the NUL), RSI is its length (`const.task_name_len`),
/// RDX the parent pid (1, `init`), R8 the vCPU (0). The kernel then logs that very worker.
#[test]
fn break_on_task_create_stops_at_its_profile_address_with_the_name_in_rdi() {
    let test = "break_on_task_create_stops_at_its_profile_address_with_the_name_in_rdi";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let task_create = target.sym("task_create");
    let out = session(
        &target,
        &elf,
        &cmds(&[
            "break task_create",
            "continue",
            r#"printf "PC=%#lx NAME_LEN=%lu PARENT=%lu VCPU=%lu\n", (unsigned long)$pc, (unsigned long)$rsi, (unsigned long)$rdx, (unsigned long)$r8"#,
            "x/s $rdi",
            "delete",
            "detach",
        ]),
    );
    assert!(
        out.text
            .contains(&format!("Breakpoint 1 at {task_create:#x}")),
        "GDB did not put the breakpoint at sym.task_create {task_create:#x}{out}"
    );
    assert_eq!(out.breakpoint_hits(), vec![(1, task_create)], "{out}");
    assert_eq!(out.value("PC"), task_create, "{out}");
    assert_eq!(
        out.value("NAME_LEN"),
        target.profile.constant("task_name_len").unwrap(),
        "{out}"
    );
    assert_eq!(out.value("PARENT"), 1, "{out}");
    assert_eq!(out.value("VCPU"), 0, "{out}");
    // `0xADDR:\t"worker-N"`
    let name = out
        .first_string()
        .unwrap_or_else(|| panic!("no x/s line{out}"));
    let number = name
        .strip_prefix("worker-")
        .unwrap_or_else(|| panic!("task name {name:?} is not worker-N{out}"));
    assert!(
        !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()),
        "task name {name:?}{out}"
    );
    let logged = format!("name={name} parent=1 ");
    assert!(
        target.wait_serial(&logged, SERIAL_WAIT),
        "the kernel never logged `{logged}` after the detach; serial: {}",
        target.serial()
    );
}

/// Picks a symbol by its (possibly mangled) ELF name.
type SymbolMatch = fn(&str) -> bool;

/// Ten kernel functions that run in every scheduler round, by their ELF symbols: five on
/// every task turn (`task_switch`, then `trap::run_user` → `run_user_asm` → the task's
/// system call → `trap_common` → `return_to_kernel`) and five in the heartbeat's `println!`
/// (`serial::print_args` → `core::fmt::write` → `Display for u64` → `pad_integral` →
/// `Serial::write_str`).
const EVERY_ROUND: [(&str, SymbolMatch); 10] = [
    ("task_switch", |n| n == "task_switch"),
    ("guest_runtime::trap::run_user", |n| {
        n.contains("13guest_runtime4trap8run_user")
    }),
    ("run_user_asm", |n| n == "run_user_asm"),
    ("trap_common", |n| n == "trap_common"),
    ("return_to_kernel", |n| n == "return_to_kernel"),
    ("guest_runtime::serial::print_args", |n| {
        n.contains("13guest_runtime6serial10print_args")
    }),
    ("core::fmt::write", |n| n.ends_with("4core3fmt5write")),
    ("<u64 as Display>::fmt", |n| {
        n.contains("3fmt3num3impy") && n.ends_with("7Display3fmt")
    }),
    ("Formatter::pad_integral", |n| {
        n.ends_with("Formatter12pad_integral")
    }),
    ("<Serial as fmt::Write>::write_str", |n| {
        n.contains("serial..Serial$u20$as$u20$core..fmt..Write$GT$9write_str")
    }),
];

/// How many times the test continues.
const CONTINUES: usize = 100;

/// Ten `break *ADDR` at once, then 100 `continue`s: every stop is at one of the ten addresses
/// (and reports that breakpoint's number), and all ten are hit. Why all ten within 100 stops:
/// every round runs all ten (see [`EVERY_ROUND`]), and a round is about 51 hits of them
/// (measured with `kvmi break` per address: 6 task turns × 5 task-path functions ≈ 32, the
/// heartbeat ≈ 12, `task created`/`exited` lines every third round the rest), so 100
/// consecutive stops cover at least one whole round whatever the point GDB attached at. GDB
/// must set them with `Z0` packets (the stub's execute traps), never by writing an `int3` into
/// guest memory (`M`/`X` packets at those addresses), as the session's remote-protocol log
/// shows.
#[test]
fn ten_software_breakpoints_at_once_all_hit_and_nothing_else_stops() {
    let test = "ten_software_breakpoints_at_once_all_hit_and_nothing_else_stops";
    if !kvmi_tests::require_kvm(test) {
        return;
    }
    let Some((target, elf)) = demo(test, "", &[]) else {
        return;
    };
    let image = std::fs::read(&elf).expect("read the ELF");
    let addrs: Vec<u64> = EVERY_ROUND
        .iter()
        .map(|(what, matches)| function_address(&image, what, matches))
        .collect();
    let text = target.profile.range("kernel_text").unwrap();
    for (addr, (what, _)) in addrs.iter().zip(EVERY_ROUND) {
        assert!(
            (text.start..text.end).contains(addr),
            "{what} at {addr:#x} is outside kernel_text"
        );
    }
    assert_eq!(
        addrs.iter().collect::<BTreeSet<_>>().len(),
        10,
        "ten distinct addresses: {addrs:x?}"
    );
    let mut commands: Vec<String> = addrs.iter().map(|a| format!("break *{a:#x}")).collect();
    commands.extend((0..CONTINUES).map(|_| "continue".to_string()));
    commands.push("delete".into());
    commands.push("detach".into());
    let out = session(&target, &elf, &commands);
    for (k, addr) in addrs.iter().enumerate() {
        let set = format!("Breakpoint {} at {addr:#x}", k + 1);
        assert!(out.text.contains(&set), "no `{set}`{out}");
        let z0 = format!("$Z0,{addr:x},");
        assert!(
            out.remote_log.contains(&z0),
            "GDB sent no {z0}: {}{out}",
            out.remote_log
        );
        for write in [format!("$M{addr:x},"), format!("$X{addr:x},")] {
            assert!(
                !out.remote_log.contains(&write),
                "GDB patched guest memory ({write}){out}"
            );
        }
    }
    let hits = out.breakpoint_hits();
    assert_eq!(hits.len(), CONTINUES, "one stop per continue{out}");
    for &(number, addr) in &hits {
        let expected = addrs.get(number as usize - 1).copied();
        assert_eq!(
            expected,
            Some(addr),
            "breakpoint {number} reported at {addr:#x}{out}"
        );
    }
    let distinct: BTreeSet<u64> = hits.iter().map(|&(_, a)| a).collect();
    let missing: Vec<&str> = addrs
        .iter()
        .zip(EVERY_ROUND)
        .filter(|(a, _)| !distinct.contains(a))
        .map(|(_, (what, _))| what)
        .collect();
    assert!(
        missing.is_empty(),
        "never hit in {CONTINUES} stops: {missing:?}{out}"
    );
}
