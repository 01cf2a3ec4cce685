//! End-to-end: restrictions a hostile tool set that used to kill the demo target (exit 126
//! at detach after an execute restriction, triple faults from a write restriction on a trap
//! stack and from a read restriction on a page table). After each attack the guest must still
//! make progress (its heartbeat line advances) and a fresh tool must be served.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kvmi::images::Image;
use kvmi_client::KvmiClient;
use kvmi_tests::socket_target::{Target, read_u64};
use kvmi_tests::wait;
use protocol::event::EventSet;
use protocol::types::{Access, PageAccessEntry};
use protocol::{ErrorCode, EventKind};

/// How long the guest gets to show progress.
const PROGRESS_WAIT: Duration = Duration::from_secs(60);

/// The last `heartbeat round=N tasks=M` the demo target printed: (N, M), (0, 0) before any.
fn heartbeat(t: &Target) -> (u64, u64) {
    t.serial()
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat round="))
        .filter_map(|rest| {
            let (round, tasks) = rest.split_once(" tasks=")?;
            Some((round.parse().ok()?, tasks.trim().parse().ok()?))
        })
        .next_back()
        .unwrap_or((0, 0))
}

/// Waits until the heartbeat advanced by `more` rounds; panics with the VM's output if not.
#[track_caller]
fn assert_heartbeats(t: &mut Target, more: u64, what: &str) -> u64 {
    let from = heartbeat(t).0;
    let ok = wait::within(PROGRESS_WAIT, || heartbeat(t).0 >= from + more);
    assert!(
        ok,
        "{what}: the heartbeat stayed at {:?} (from round {from}); running: {}; stderr: {}",
        heartbeat(t),
        t.running(),
        t.stderr()
    );
    heartbeat(t).0
}

/// A fresh tool attaches, is answered, and sees the guest progress.
#[track_caller]
fn assert_fresh_tool_served(t: &mut Target) {
    assert!(t.running(), "the VM died; stderr: {}", t.stderr());
    let c = t.attach();
    assert_eq!(c.get_guest_info().expect("GET_GUEST_INFO").vcpu_count, 1);
    let table = t.sym("task_table");
    assert_eq!(c.read_physical(table, 8).expect("READ_PHYSICAL").len(), 8);
    assert_heartbeats(t, 2, "with a fresh tool attached");
    c.close();
}

fn demo() -> (Target, KvmiClient) {
    let mut t = Target::start(Image::DemoTarget, "", &[]);
    let c = t.attach();
    assert_heartbeats(&mut t, 2, "before the attack");
    (t, c)
}

fn pages(start: u64, count: u64, access: Access) -> Vec<PageAccessEntry> {
    (0..count)
        .map(|k| PageAccessEntry {
            gpa: (start & !0xfff) + k * 4096,
            access,
        })
        .collect()
}

/// Answers every event with CONTINUE on a thread until `stop`; counts them (and the
/// events from CPL3 in `cpl3`).
fn answer_all<'a>(
    scope: &'a std::thread::Scope<'a, '_>,
    c: &'a KvmiClient,
    stop: &'a AtomicBool,
    seen: &'a AtomicU64,
    cpl3: &'a AtomicU64,
) {
    scope.spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match c.next_event(Duration::from_millis(50)) {
                Ok(Some(ev)) => {
                    seen.fetch_add(1, Ordering::Relaxed);
                    if ev.event.common.sregs.cs.dpl == 3 {
                        cpl3.fetch_add(1, Ordering::Relaxed);
                    }
                    if c.reply_continue(&ev).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
    });
}

#[test]
fn exec_restriction_on_two_text_pages_progresses_and_detach_leaves_the_guest_running() {
    if !kvmi_tests::require_kvm(
        "exec_restriction_on_two_text_pages_progresses_and_detach_leaves_the_guest_running",
    ) {
        return;
    }
    let (mut t, c) = demo();
    let text = t.profile.range("kernel_text").expect("range.kernel_text");
    // The first two pages of kernel text, events off: the scheduler's loop runs there, and
    // (in this build) an instruction straddles the two pages.
    c.set_page_access(0, &pages(text.start, 2, Access::R.union(Access::W)))
        .expect("SET_PAGE_ACCESS rw-");
    assert_heartbeats(&mut t, 1, "while the text pages are not executable");
    c.close();
    assert_heartbeats(&mut t, 3, "after the tool detached");
    assert_fresh_tool_served(&mut t);
}

#[test]
fn exec_events_answered_continue_progress_and_a_detach_mid_event_leaves_the_guest_running() {
    if !kvmi_tests::require_kvm(
        "exec_events_answered_continue_progress_and_a_detach_mid_event_leaves_the_guest_running",
    ) {
        return;
    }
    let (mut t, c) = demo();
    let text = t.profile.range("kernel_text").expect("range.kernel_text");
    c.control_events_all(EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    let (stop, seen, cpl3) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        answer_all(s, &c, &stop, &seen, &cpl3);
        c.set_page_access(0, &pages(text.start, 2, Access::R.union(Access::W)))
            .expect("SET_PAGE_ACCESS rw-");
        assert_heartbeats(&mut t, 1, "while every fetch there is an event");
        stop.store(true, Ordering::Relaxed);
    });
    assert!(seen.load(Ordering::Relaxed) > 0, "no exec event");
    // An event is outstanding or about to be: the tool goes away without answering it.
    c.close();
    assert_heartbeats(&mut t, 3, "after the tool detached mid-event");
    assert_fresh_tool_served(&mut t);
}

/// The page holding the frame an `int3` from CPL3 pushes (below TSS.RSP0), read through
/// GET_REGISTERS (TR's base) and the TSS (kernel addresses are identity-mapped).
fn trap_frame_page(c: &KvmiClient) -> u64 {
    let regs = c.get_registers(0, &[]).expect("GET_REGISTERS");
    let tss = regs.sregs.tr.base.get();
    let rsp0 = read_u64(c, tss + 4);
    assert_ne!(rsp0, 0, "TSS.RSP0 not set");
    ((rsp0 & !0xf) - 48) & !0xfff
}

#[test]
fn write_restriction_on_the_cpl3_trap_stack_is_refused_and_the_guest_runs_on() {
    if !kvmi_tests::require_kvm(
        "write_restriction_on_the_cpl3_trap_stack_is_refused_and_the_guest_runs_on",
    ) {
        return;
    }
    let (mut t, c) = demo();
    c.control_events_all(EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    // The page of the task-table lock: the saved user contexts, where TSS.RSP0 points while
    // a task runs, share it.
    let page = trap_frame_page(&c);
    let err = c
        .set_page_access(0, &pages(page, 1, Access::R.union(Access::X)))
        .expect_err("a write restriction on a trap stack was accepted");
    assert_eq!(err.kvm_code(), Some(ErrorCode::Inval), "{err}");
    assert_eq!(
        c.get_page_access(0, &[page]).unwrap(),
        vec![Access::RWX],
        "the refused restriction was recorded"
    );
    assert!(t.stderr().contains("trap frame"), "{}", t.stderr());
    assert_heartbeats(&mut t, 3, "after the refused restriction");
    c.close();
    assert_fresh_tool_served(&mut t);
}

#[test]
fn cpl3_locked_writes_to_a_write_restricted_page_complete_on_continue() {
    if !kvmi_tests::require_kvm(
        "cpl3_locked_writes_to_a_write_restricted_page_complete_on_continue",
    ) {
        return;
    }
    let (mut t, c) = demo();
    // The user-writable stats page: CPL3 tasks bump `user_writes` with `lock xadd`.
    let stats = t.sym("kernel_stats");
    let user_writes = stats
        + t.profile
            .field("kernel_stats", "user_writes")
            .expect("struct.kernel_stats.user_writes");
    let serial_before = t.serial().len();
    let tasks = heartbeat(&t).1;
    c.control_events_all(EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    let (stop, seen, cpl3) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        answer_all(s, &c, &stop, &seen, &cpl3);
        let before = read_u64(&c, user_writes);
        c.set_page_access(0, &pages(stats, 1, Access::R.union(Access::X)))
            .expect("SET_PAGE_ACCESS r-x");
        assert_heartbeats(&mut t, 3, "with the stats page write-restricted");
        wait::until(PROGRESS_WAIT, "CPL3 write events", || {
            cpl3.load(Ordering::Relaxed) >= 4
        });
        assert!(
            read_u64(&c, user_writes) >= before + 2,
            "the CPL3 lock xadd did not complete"
        );
        stop.store(true, Ordering::Relaxed);
    });
    // No task was hit by a stray exception (e.g. a single-step #DB reaching the guest).
    let after = &t.serial()[serial_before..];
    assert!(!after.contains("EXCEPTION"), "{after}");
    assert_eq!(heartbeat(&t).1, tasks, "tasks were lost: {after}");
    c.close();
    assert_fresh_tool_served(&mut t);
}

#[test]
fn read_restrictions_on_page_tables_and_the_idt_are_refused_and_the_guest_runs_on() {
    if !kvmi_tests::require_kvm(
        "read_restrictions_on_page_tables_and_the_idt_are_refused_and_the_guest_runs_on",
    ) {
        return;
    }
    let (mut t, c) = demo();
    c.control_events_all(EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    let regs = c.get_registers(0, &[]).expect("GET_REGISTERS");
    let cr3 = regs.sregs.cr3.get() & !0xfff;
    let idt = regs.sregs.idt.base.get() & !0xfff;
    // The root (whichever task runs by now: the root the tool read is refused too), the
    // kernel's own next level, and the IDT.
    let kernel_pdpt = read_u64(&c, cr3) & 0x000f_ffff_ffff_f000;
    for (what, page, access) in [
        ("the CR3 root", cr3, Access::NONE),
        ("the CR3 root", cr3, Access::R.union(Access::W)),
        ("the kernel PDPT", kernel_pdpt, Access::NONE),
        ("the IDT", idt, Access::NONE),
    ] {
        let err = c
            .set_page_access(0, &pages(page, 1, access))
            .expect_err(what);
        assert_eq!(err.kvm_code(), Some(ErrorCode::Inval), "{what}: {err}");
        assert_eq!(c.get_page_access(0, &[page]).unwrap(), vec![Access::RWX]);
    }
    // With another page in the same command: that one is applied.
    let other = t.sym("kernel_stats");
    let mut both = pages(cr3, 1, Access::NONE);
    both.extend(pages(other, 1, Access::R.union(Access::X)));
    assert!(c.set_page_access(0, &both).is_err());
    assert_eq!(
        c.get_page_access(0, &[cr3, other]).unwrap(),
        vec![Access::RWX, Access::R.union(Access::X)]
    );
    c.set_page_access(0, &pages(other, 1, Access::RWX)).unwrap();
    assert!(t.stderr().contains("page table"), "{}", t.stderr());
    // Removing only W from the root still works: the walker only reads it.
    c.set_page_access(0, &pages(cr3, 1, Access::R.union(Access::X)))
        .expect("r-x on the CR3 root");
    assert_heartbeats(&mut t, 3, "after the refused restrictions");
    c.close();
    assert_fresh_tool_served(&mut t);
}
