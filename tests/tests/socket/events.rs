//! End-to-end: every event the introspector delivers, through a real `kvmi run
//! --kvmi-socket` VM and the client, asserting on the payload and on the effect of the reply.

use std::time::Duration;

use kvmi::images::Image;
use kvmi_client::neutral_data;
use kvmi_tests::socket_target::{
    EVENT_WAIT, Target, assert_quiet_while_running, expect_event, read_u64, set_access,
};
use kvmi_tests::wait;
use protocol::event::EventSet;
use protocol::event_reply::{EventReplyData, PageFaultReply};
use protocol::types::Access;
use protocol::{Action, EventKind, EventPayload};
use zerocopy::little_endian::U64;

fn only(kind: EventKind) -> EventSet {
    EventSet::EMPTY.with(kind)
}

const EXIT_WAIT: Duration = Duration::from_secs(30);

#[test]
fn page_fault_event_reports_gpa_and_write_and_skip_drops_while_allow_completes() {
    if !kvmi_tests::require_kvm(
        "page_fault_event_reports_gpa_and_write_and_skip_drops_while_allow_completes",
    ) {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=mem-write n=3 gate=1", &[]);
    let c = t.attach();
    let page = t.sym("scratch_page");
    c.control_events(0, only(EventKind::PageFault)).unwrap();
    set_access(&c, page, Access::R.union(Access::X));
    assert_eq!(
        c.get_page_access(0, &[page]).unwrap(),
        vec![Access::R.union(Access::X)]
    );
    t.open_gate(&c);
    let mut seen = Vec::new();
    for (i, action) in [Action::Skip, Action::Continue, Action::Continue]
        .into_iter()
        .enumerate()
    {
        let ev = expect_event(&c, EventKind::PageFault, &t);
        let EventPayload::PageFault { gpa, mode, .. } = ev.event.payload else {
            unreachable!()
        };
        assert_eq!(gpa, page + 8 * i as u64, "write {i} at the wrong gpa");
        assert_ne!(mode & 2, 0, "access mode {mode:#x} lacks write");
        assert_eq!(mode & 4, 0, "a data write reported as a fetch");
        if i == 2 {
            // SKIP dropped word 0; ALLOW wrote word 1.
            assert_eq!(read_u64(&c, page), 0, "SKIP let the write through");
            assert_eq!(
                read_u64(&c, page + 8),
                0x5ca1_0001,
                "ALLOW did not complete the write"
            );
        }
        seen.push(gpa);
        c.reply(
            &ev,
            action,
            EventReplyData::PageFault(PageFaultReply::default()),
        )
        .unwrap();
    }
    t.assert_clean_exit(EXIT_WAIT, "mem-write n=3 last=0x5ca10002");
    assert_eq!(seen.len(), 3);
}

#[test]
fn page_fault_reply_with_trap_access_is_refused_and_detaches_the_tool() {
    if !kvmi_tests::require_kvm(
        "page_fault_reply_with_trap_access_is_refused_and_detaches_the_tool",
    ) {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=mem-write n=3 gate=1", &[]);
    let c = t.attach();
    let page = t.sym("scratch_page");
    c.control_events(0, only(EventKind::PageFault)).unwrap();
    set_access(&c, page, Access::R.union(Access::X));
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::PageFault, &t);
    // trap_access is not supported on this host: the reply is a protocol error.
    let data = EventReplyData::PageFault(PageFaultReply {
        trap_access: true,
        ctx_data: &[],
    });
    let _ = c.reply(&ev, Action::Continue, data);
    assert!(c.get_version().is_err(), "the tool is still attached");
    // Detached and unhooked: the guest finishes its writes without further events.
    t.assert_clean_exit(EXIT_WAIT, "mem-write n=3 last=0x5ca10002");
}

#[test]
fn msr_event_reports_index_and_values_and_the_reply_value_is_what_the_guest_gets() {
    if !kvmi_tests::require_kvm(
        "msr_event_reports_index_and_values_and_the_reply_value_is_what_the_guest_gets",
    ) {
        return;
    }
    let mut t = Target::start(
        Image::TestGuest,
        "mode=msr msr=0x174 value=0x10 gate=1",
        &[],
    );
    let c = t.attach();
    c.control_msr(0, 0x174, true).unwrap();
    c.control_events(0, only(EventKind::Msr)).unwrap();
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::Msr, &t);
    let EventPayload::Msr {
        msr,
        new_value,
        old_value,
    } = ev.event.payload
    else {
        unreachable!()
    };
    assert_eq!(msr, 0x174);
    assert_eq!(new_value, 0x10);
    assert_eq!(
        old_value, ev.event.common.msrs.sysenter_cs,
        "old value vs event header"
    );
    c.reply(&ev, Action::Continue, EventReplyData::Msr { new_val: 0x23 })
        .unwrap();
    t.assert_clean_exit(EXIT_WAIT, "msr 0x174 wrote 0x10 read 0x23");
}

#[test]
fn breakpoint_event_reports_rip_and_set_registers_changes_what_the_guest_prints() {
    if !kvmi_tests::require_kvm(
        "breakpoint_event_reports_rip_and_set_registers_changes_what_the_guest_prints",
    ) {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=breakpoint n=1 gate=1", &[]);
    let c = t.attach();
    let target = t.sym("breakpoint_target");
    c.control_events(0, only(EventKind::Breakpoint)).unwrap();
    c.control_breakpoint(None, target, true).unwrap();
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::Breakpoint, &t);
    assert_eq!(ev.event.common.regs.rip.get(), target);
    let EventPayload::Breakpoint { gpa } = ev.event.payload else {
        unreachable!()
    };
    assert_eq!(gpa, target, "kernel text is identity mapped");
    // The argument (rdi) is 0; make it 0x41: breakpoint_target returns 0x42 = 66.
    let mut regs = c.get_registers(0, &[]).unwrap().regs;
    assert_eq!(regs.rip.get(), target);
    regs.rdi = U64::new(0x41);
    c.set_registers(0, &regs).unwrap();
    c.reply(&ev, Action::Continue, EventReplyData::None)
        .unwrap();
    t.assert_clean_exit(EXIT_WAIT, "breakpoint calls=1 result=66");
}

#[test]
fn retry_after_moving_rip_past_the_function_skips_its_code() {
    if !kvmi_tests::require_kvm("retry_after_moving_rip_past_the_function_skips_its_code") {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=breakpoint n=1 gate=1", &[]);
    let c = t.attach();
    let target = t.sym("breakpoint_target");
    c.control_events(0, only(EventKind::Breakpoint)).unwrap();
    c.control_breakpoint(None, target, true).unwrap();
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::Breakpoint, &t);
    // Emulate `ret` with rax = 7: rip = [rsp], rsp += 8. The body (counter increment) never runs.
    let mut regs = ev.event.common.regs;
    let ret = read_u64(&c, regs.rsp.get());
    regs.rip = U64::new(ret);
    regs.rsp = U64::new(regs.rsp.get() + 8);
    regs.rax = U64::new(7);
    c.set_registers(0, &regs).unwrap();
    c.reply(&ev, Action::Retry, EventReplyData::None).unwrap();
    t.assert_clean_exit(EXIT_WAIT, "breakpoint calls=0 result=7");
}

#[test]
fn single_step_events_report_rips_in_order() {
    if !kvmi_tests::require_kvm("single_step_events_report_rips_in_order") {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=step n=1 gate=1", &[]);
    let c = t.attach();
    let step = t.sym("step_target");
    c.control_events(0, only(EventKind::Breakpoint)).unwrap();
    c.control_breakpoint(None, step, true).unwrap();
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::Breakpoint, &t);
    assert_eq!(ev.event.common.regs.rip.get(), step);
    let ret = read_u64(&c, ev.event.common.regs.rsp.get());
    c.control_breakpoint(None, step, false).unwrap();
    c.control_events(0, only(EventKind::Singlestep)).unwrap();
    c.reply(&ev, Action::Continue, EventReplyData::None)
        .unwrap();
    let mut rips = Vec::new();
    for _ in 0..5 {
        let s = expect_event(&c, EventKind::Singlestep, &t);
        rips.push(s.event.common.regs.rip.get());
        if rips.len() == 5 {
            c.control_events(0, EventSet::EMPTY).unwrap();
        }
        c.reply(&s, Action::Continue, EventReplyData::None).unwrap();
    }
    assert_eq!(rips, vec![step + 1, step + 2, step + 3, step + 4, ret]);
    t.assert_clean_exit(EXIT_WAIT, "step calls=1");
}

#[test]
fn hypercall_event_carries_the_agent_call_registers_from_cpl0_and_cpl3() {
    if !kvmi_tests::require_kvm(
        "hypercall_event_carries_the_agent_call_registers_from_cpl0_and_cpl3",
    ) {
        return;
    }
    let mut t = Target::start(
        Image::TestGuest,
        "mode=hypercall nr=34 a0=0x1234 gate=1",
        &[],
    );
    let c = t.attach();
    c.control_events(0, only(EventKind::Hypercall)).unwrap();
    t.open_gate(&c);
    let mut cpls = Vec::new();
    for _ in 0..2 {
        let ev = expect_event(&c, EventKind::Hypercall, &t);
        let r = ev.event.common.regs;
        assert_eq!(r.rax.get(), 34, "hypercall number");
        assert_eq!(r.rbx.get(), 0x1234, "first argument");
        cpls.push(ev.event.common.sregs.cs.dpl);
        c.reply(&ev, Action::Continue, EventReplyData::None)
            .unwrap();
    }
    assert_eq!(cpls, vec![0, 3]);
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "stderr: {}", t.stderr());
    // RAX = 0 once the event was answered.
    let serial = t.serial();
    assert!(
        serial.contains("hypercall nr=34 cpl=0 rax=0x0\n"),
        "{serial}"
    );
    assert!(
        serial.contains("hypercall nr=34 cpl=3 rax=0x0\n"),
        "{serial}"
    );
}

#[test]
fn agent_call_without_an_event_leaves_rax_untouched() {
    if !kvmi_tests::require_kvm("agent_call_without_an_event_leaves_rax_untouched") {
        return;
    }
    // No tool attached (no gate), or a tool attached that has not enabled the HYPERCALL
    // event: no event is delivered, so RAX keeps the call number.
    for cmdline in ["mode=hypercall nr=34", "mode=hypercall nr=34 gate=1"] {
        let mut t = Target::start(Image::TestGuest, cmdline, &[]);
        let _tool = cmdline.contains("gate").then(|| {
            let c = t.attach();
            t.open_gate(&c);
            c
        });
        assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "stderr: {}", t.stderr());
        let serial = t.serial();
        assert!(
            serial.contains("hypercall nr=34 cpl=0 rax=0x22\n"),
            "{cmdline}: {serial}"
        );
        assert!(
            serial.contains("hypercall nr=34 cpl=3 rax=0x22\n"),
            "{cmdline}: {serial}"
        );
    }
}

#[test]
fn injected_exception_reaches_the_guest_handler_and_raises_a_trap_event() {
    if !kvmi_tests::require_kvm(
        "injected_exception_reaches_the_guest_handler_and_raises_a_trap_event",
    ) {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    assert!(
        t.wait_serial("spinning", Duration::from_secs(20)),
        "{}",
        t.serial()
    );
    c.control_events(0, only(EventKind::Trap)).unwrap();
    c.inject_exception(0, 14, Some(0x2), 0xdead_b000).unwrap();
    let ev = expect_event(&c, EventKind::Trap, &t);
    let EventPayload::Trap {
        vector,
        error_code,
        cr2,
        ..
    } = ev.event.payload
    else {
        unreachable!()
    };
    assert_eq!((vector, error_code, cr2), (14, 2, 0xdead_b000));
    c.reply(&ev, Action::Continue, EventReplyData::None)
        .unwrap();
    let code = t.wait_exit(EXIT_WAIT);
    let serial = t.serial();
    assert!(
        serial.contains("EXCEPTION vector=14 err=0x2") && serial.contains("cr2=0xdeadb000"),
        "{serial}"
    );
    assert_eq!(
        code,
        Some(255),
        "0x10e clamps to 255; stderr: {}",
        t.stderr()
    );
}

#[test]
fn retry_to_create_vcpu_or_trap_is_a_protocol_error_that_detaches_the_tool() {
    if !kvmi_tests::require_kvm(
        "retry_to_create_vcpu_or_trap_is_a_protocol_error_that_detaches_the_tool",
    ) {
        return;
    }
    // The v4 text: CREATE_VCPU and TRAP accept CONTINUE and CRASH only. The client refuses
    // to encode RETRY for them, so the reply is written raw: header {id 24, size 8, seq},
    // then {action RETRY = 1 << 1, pad}.
    let retry = |seq: u32| {
        let mut b = Vec::new();
        b.extend_from_slice(&24u16.to_le_bytes());
        b.extend_from_slice(&8u16.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    };
    // CREATE_VCPU (--kvmi-wait holds the vCPU until its event is answered).
    let mut t = Target::start(Image::TestGuest, "mode=hello", &["--kvmi-wait"]);
    let c = t.attach();
    let ev = expect_event(&c, EventKind::CreateVcpu, &t);
    c.send_raw(&retry(ev.seq)).unwrap();
    assert!(
        c.wait_closed(Duration::from_secs(10)),
        "RETRY to CREATE_VCPU was accepted"
    );
    // Detached and unhooked: the vCPU starts and runs.
    t.assert_clean_exit(EXIT_WAIT, "hello from vcpu 0");
    // TRAP (after INJECT_EXCEPTION).
    let mut t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    assert!(
        t.wait_serial("spinning", Duration::from_secs(20)),
        "{}",
        t.serial()
    );
    c.control_events(0, only(EventKind::Trap)).unwrap();
    c.inject_exception(0, 14, Some(0x2), 0xdead_b000).unwrap();
    let ev = expect_event(&c, EventKind::Trap, &t);
    c.send_raw(&retry(ev.seq)).unwrap();
    assert!(
        c.wait_closed(Duration::from_secs(10)),
        "RETRY to TRAP was accepted"
    );
    // The guest takes the exception: its handler reports it and exits (0x10e clamps to 255).
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(255), "stderr: {}", t.stderr());
    assert!(
        t.serial().contains("EXCEPTION vector=14 err=0x2"),
        "{}",
        t.serial()
    );
}

#[test]
fn crash_action_ends_the_vm_with_a_clear_status() {
    if !kvmi_tests::require_kvm("crash_action_ends_the_vm_with_a_clear_status") {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=breakpoint n=1 gate=1", &[]);
    let c = t.attach();
    let target = t.sym("breakpoint_target");
    c.control_events(0, only(EventKind::Breakpoint)).unwrap();
    c.control_breakpoint(None, target, true).unwrap();
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::Breakpoint, &t);
    c.reply(&ev, Action::Crash, EventReplyData::None).unwrap();
    let code = t.wait_exit(EXIT_WAIT).expect("the VM ends after CRASH");
    assert_eq!(code, 125, "the VMM-stopped status; stderr: {}", t.stderr());
    assert!(
        !t.serial().contains("breakpoint calls="),
        "the guest went on: {}",
        t.serial()
    );
    assert!(
        t.stderr().contains("CRASH"),
        "stderr does not say why: {}",
        t.stderr()
    );
}

/// The MSR that test-guest's `mode=cycle` writes on every iteration (its default,
/// SYSENTER_CS). Its writes exit to the VMM whenever a tool is attached (the event header
/// shadows it), so whether one raises an event is decided by the tool's interception set
/// alone: a set that survived a detach shows.
const CYCLE_MSR: u32 = 0x174;

/// How long a detach test listens for stale events while the guest cycles on.
const QUIET_WINDOW: Duration = Duration::from_secs(1);

/// Cycle iterations the guest must complete during [`QUIET_WINDOW`] (each one writes the
/// scratch page, writes [`CYCLE_MSR`] and calls `breakpoint_target`).
const QUIET_PROGRESS: u64 = 100;

/// Waits until the guest's serial output grows, i.e. it printed another `cycle i=` line.
fn assert_guest_progresses(t: &Target) {
    let printed = t.serial().len();
    assert!(
        t.wait_serial_growth(printed, EVENT_WAIT),
        "the guest stopped printing after the detach: {}; stderr: {}",
        t.serial(),
        t.stderr()
    );
}

#[test]
fn detach_restores_page_access_breakpoints_and_msr_interception() {
    if !kvmi_tests::require_kvm("detach_restores_page_access_breakpoints_and_msr_interception") {
        return;
    }
    // Every cycle iteration writes the scratch page, writes CYCLE_MSR and calls
    // breakpoint_target: each interception below fires again and again while it is set.
    let mut t = Target::start(Image::TestGuest, "mode=cycle every=10 gate=1", &[]);
    let page = t.sym("scratch_page");
    let function = t.sym("breakpoint_target");
    let watched = EventSet::EMPTY
        .with(EventKind::PageFault)
        .with(EventKind::Breakpoint)
        .with(EventKind::Msr);
    let c = t.attach();
    c.control_events(0, watched).unwrap();
    set_access(&c, page, Access::R.union(Access::X));
    c.control_breakpoint(None, function, true).unwrap();
    c.control_msr(0, CYCLE_MSR, true).unwrap();
    t.open_gate(&c);
    // Each interception works before the detach: at least one event of each kind.
    let (mut writes, mut calls, mut msrs) = (0, 0, 0);
    for _ in 0..100 {
        if writes > 0 && calls > 0 && msrs > 0 {
            break;
        }
        let ev = c
            .next_event(EVENT_WAIT)
            .unwrap()
            .unwrap_or_else(|| panic!("no event; serial: {}", t.serial()));
        match ev.event.payload {
            EventPayload::PageFault { gpa, mode, .. } => {
                assert_eq!(gpa & !0xfff, page, "a write outside the scratch page");
                assert_ne!(mode & 2, 0, "access mode {mode:#x} lacks write");
                writes += 1;
            }
            EventPayload::Breakpoint { gpa } => {
                assert_eq!(gpa, function);
                calls += 1;
            }
            EventPayload::Msr { msr, .. } => {
                assert_eq!(msr, CYCLE_MSR);
                msrs += 1;
            }
            other => panic!("unexpected event {other:?}"),
        }
        c.reply_continue(&ev).unwrap();
    }
    assert!(
        writes > 0 && calls > 0 && msrs > 0,
        "before the detach: {writes} page faults, {calls} breakpoints, {msrs} MSR writes"
    );
    c.close();
    // Detached: the guest cycles on by itself.
    assert_guest_progresses(&t);
    // A fresh tool enables the same events but sets no interception of its own: the first
    // tool's page protection, breakpoint and MSR interception are gone, so the guest's page
    // writes, calls and MSR writes raise nothing while it keeps cycling.
    let c2 = t.attach();
    assert_eq!(c2.get_page_access(0, &[page]).unwrap(), vec![Access::RWX]);
    c2.control_events(0, watched).unwrap();
    assert_quiet_while_running(&mut t, &c2, QUIET_WINDOW, QUIET_PROGRESS);
}

#[test]
fn pause_event_answers_pause_vcpu_and_the_vcpu_waits_for_the_reply() {
    if !kvmi_tests::require_kvm("pause_event_answers_pause_vcpu_and_the_vcpu_waits_for_the_reply") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &["--vcpus", "2"]);
    let c = t.attach();
    assert!(
        t.wait_serial("spinning", Duration::from_secs(20)),
        "{}",
        t.serial()
    );
    let counter = t.sym("probe_counter");
    let paused = c.pause_all(Duration::from_secs(10)).unwrap();
    assert_eq!(paused.len(), 2);
    assert_eq!(
        paused
            .iter()
            .map(|e| e.event.common.vcpu)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    let frozen = read_u64(&c, counter);
    // Time passes while paused: the counter must not move (shown positively below: it moves
    // after the resume).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read_u64(&c, counter), frozen, "counter moved while paused");
    // Commands while the events are pending.
    let regs = c.get_registers(0, &[]).unwrap();
    assert_eq!(regs.regs.rip.get(), paused[0].event.common.regs.rip.get());
    c.resume(&paused).unwrap();
    wait::until(EXIT_WAIT, "progress after the resume", || {
        read_u64(&c, counter) > frozen
    });
    let _ = neutral_data(&paused[0]);
}

#[test]
fn create_vcpu_events_hold_each_vcpu_until_answered_with_kvmi_wait() {
    if !kvmi_tests::require_kvm("create_vcpu_events_hold_each_vcpu_until_answered_with_kvmi_wait") {
        return;
    }
    let mut t = Target::start(
        Image::TestGuest,
        "mode=smp",
        &["--vcpus", "2", "--kvmi-wait"],
    );
    let c = t.attach();
    let mut vcpus = Vec::new();
    let mut held = Vec::new();
    for _ in 0..2 {
        let ev = expect_event(&c, EventKind::CreateVcpu, &t);
        vcpus.push(ev.event.common.vcpu);
        held.push(ev);
    }
    vcpus.sort();
    assert_eq!(vcpus, vec![0, 1]);
    // Time passes with both events unanswered: no vCPU may run (shown positively below: both
    // run once answered).
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !t.serial().contains("up"),
        "a vCPU ran before its CREATE_VCPU reply"
    );
    assert!(t.running(), "the VM ended; stderr: {}", t.stderr());
    for ev in &held {
        c.reply_continue(ev).unwrap();
    }
    t.assert_clean_exit(EXIT_WAIT, "all 2 vcpus up");
}

#[test]
fn detach_restores_msr_interception_and_single_step() {
    if !kvmi_tests::require_kvm("detach_restores_msr_interception_and_single_step") {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=cycle every=10 gate=1", &[]);
    let c = t.attach();
    c.control_msr(0, CYCLE_MSR, true).unwrap();
    c.control_events(0, only(EventKind::Msr)).unwrap();
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::Msr, &t);
    let EventPayload::Msr { msr, .. } = ev.event.payload else {
        unreachable!()
    };
    assert_eq!(msr, CYCLE_MSR);
    // Single-step from this write on: the next event is a step.
    c.control_events(
        0,
        EventSet::EMPTY
            .with(EventKind::Msr)
            .with(EventKind::Singlestep),
    )
    .unwrap();
    c.reply_continue(&ev).unwrap();
    let step = c
        .next_event(EVENT_WAIT)
        .unwrap()
        .unwrap_or_else(|| panic!("no event after the MSR write; serial: {}", t.serial()));
    assert_eq!(step.event.payload.kind(), EventKind::Singlestep);
    // Detach with the step unanswered: the vCPU goes on as if answered CONTINUE.
    c.close();
    assert_guest_progresses(&t);
    // A fresh tool that enables nothing receives nothing: neither the first tool's event
    // set (MSR, single step) nor its MSR interception survived, while the guest keeps
    // writing the MSR on every iteration.
    let c2 = t.attach();
    assert_quiet_while_running(&mut t, &c2, QUIET_WINDOW, QUIET_PROGRESS);
}

#[test]
fn read_restriction_raises_a_read_event_and_allow_returns_the_context_data() {
    if !kvmi_tests::require_kvm(
        "read_restriction_raises_a_read_event_and_allow_returns_the_context_data",
    ) {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=mem-read n=2 gate=1", &[]);
    let c = t.attach();
    let page = t.sym("scratch_page");
    c.write_physical(page, &0x5u64.to_le_bytes()).unwrap();
    c.write_physical(page + 8, &0x7u64.to_le_bytes()).unwrap();
    c.control_events(0, only(EventKind::PageFault)).unwrap();
    set_access(&c, page, Access::NONE);
    t.open_gate(&c);
    // Word 0: ALLOW with context data 0x100 (the guest reads it instead of memory's 5).
    let ev = expect_event(&c, EventKind::PageFault, &t);
    let EventPayload::PageFault { gpa, mode, .. } = ev.event.payload else {
        unreachable!()
    };
    assert_eq!(gpa, page);
    assert_ne!(mode & 1, 0, "access mode {mode:#x} lacks read");
    assert_eq!(mode & 2, 0, "a read reported as a write");
    let ctx = 0x100u64.to_le_bytes();
    let reply = PageFaultReply {
        trap_access: false,
        ctx_data: &ctx,
    };
    c.reply(&ev, Action::Continue, EventReplyData::PageFault(reply))
        .unwrap();
    // Word 1: plain ALLOW reads memory (7).
    let ev = expect_event(&c, EventKind::PageFault, &t);
    let EventPayload::PageFault { gpa, .. } = ev.event.payload else {
        unreachable!()
    };
    assert_eq!(gpa, page + 8);
    c.reply(
        &ev,
        Action::Continue,
        EventReplyData::PageFault(PageFaultReply::default()),
    )
    .unwrap();
    t.assert_clean_exit(EXIT_WAIT, "mem-read n=2 sum=0x107");
}

#[test]
fn set_registers_during_a_read_event_keeps_the_tool_s_changes_and_the_read_s_destination() {
    if !kvmi_tests::require_kvm(
        "set_registers_during_a_read_event_keeps_the_tool_s_changes_and_the_read_s_destination",
    ) {
        return;
    }
    // Each read: R12 = 0, RAX = 0xa1, then `mov rax, [word i]` (the load does not write R12).
    let mut t = Target::start(Image::TestGuest, "mode=mem-read-regs n=5 gate=1", &[]);
    let c = t.attach();
    let page = t.sym("scratch_page");
    for (i, word) in [5u64, 7, 9, 11, 13].into_iter().enumerate() {
        c.write_physical(page + 8 * i as u64, &word.to_le_bytes())
            .unwrap();
    }
    c.control_events(0, only(EventKind::PageFault)).unwrap();
    set_access(&c, page, Access::NONE);
    t.open_gate(&c);
    // `set`: the registers SET_REGISTERS changes before the reply (None: no SET_REGISTERS).
    let answer = |action, set: Option<(Option<u64>, u64)>, ctx: &[u8]| {
        let ev = expect_event(&c, EventKind::PageFault, &t);
        if let Some((rax, r12)) = set {
            let mut regs = c.get_registers(0, &[]).unwrap().regs;
            assert_eq!(regs.rax.get(), 0xa1, "RAX before the load");
            assert_eq!(regs.r12.get(), 0, "R12 before the load");
            if let Some(rax) = rax {
                regs.rax = U64::new(rax);
            }
            regs.r12 = U64::new(r12);
            c.set_registers(0, &regs).unwrap();
            // The event's GET_REGISTERS shows what the tool set (loaded after the read).
            let now = c.get_registers(0, &[]).unwrap().regs;
            assert_eq!(now.r12.get(), r12, "R12 after SET_REGISTERS");
            assert_eq!(
                now.rax.get(),
                rax.unwrap_or(0xa1),
                "RAX after SET_REGISTERS"
            );
        }
        let reply = PageFaultReply {
            trap_access: false,
            ctx_data: ctx,
        };
        c.reply(&ev, action, EventReplyData::PageFault(reply))
            .unwrap();
    };
    // CONTINUE after a SET_REGISTERS that changes only R12: R12 keeps the tool's value, and
    // the load's destination gets memory's 5.
    answer(Action::Continue, Some((None, 0x1234)), &[]);
    // SKIP after setting RAX: the tool's RAX stays; the zeros do not overwrite it.
    answer(Action::Skip, Some((Some(0xbeef), 0x77)), &[]);
    // CONTINUE with ctx_data after setting R12: RAX gets the context data, R12 the tool's.
    answer(Action::Continue, Some((None, 0x88)), &0x42u64.to_le_bytes());
    // CONTINUE after setting RAX: the tool's change of the destination wins over memory's.
    answer(Action::Continue, Some((Some(0xc0de), 0x99)), &[]);
    // Without SET_REGISTERS the load completes as usual (memory's 13).
    answer(Action::Continue, None, &[]);
    t.assert_clean_exit(EXIT_WAIT, "mem-read-regs i=4 ");
    let serial = t.serial();
    for line in [
        "mem-read-regs i=0 rax=0x5 r12=0x1234\n",
        "mem-read-regs i=1 rax=0xbeef r12=0x77\n",
        "mem-read-regs i=2 rax=0x42 r12=0x88\n",
        "mem-read-regs i=3 rax=0xc0de r12=0x99\n",
        "mem-read-regs i=4 rax=0xd r12=0x0\n",
    ] {
        assert!(serial.contains(line), "{line:?} not in {serial}");
    }
}

#[test]
fn exec_restriction_raises_a_fetch_event_at_the_function() {
    if !kvmi_tests::require_kvm("exec_restriction_raises_a_fetch_event_at_the_function") {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=step n=2 gate=1", &[]);
    let c = t.attach();
    let step = t.sym("step_target");
    let page = step & !0xfff;
    c.control_events(0, only(EventKind::PageFault)).unwrap();
    set_access(&c, page, Access::R.union(Access::W));
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::PageFault, &t);
    let EventPayload::PageFault { gpa, mode, .. } = ev.event.payload else {
        unreachable!()
    };
    assert_eq!(gpa & !0xfff, page, "fetch outside the protected page");
    assert_ne!(mode & 4, 0, "access mode {mode:#x} lacks fetch");
    // Lift the restriction and let it go on: no further events, both calls complete.
    set_access(&c, page, Access::RWX);
    c.reply(
        &ev,
        Action::Retry,
        EventReplyData::PageFault(PageFaultReply::default()),
    )
    .unwrap();
    t.assert_clean_exit(EXIT_WAIT, "step calls=2");
}

#[test]
fn retry_after_lifting_the_protection_raises_no_second_event() {
    if !kvmi_tests::require_kvm("retry_after_lifting_the_protection_raises_no_second_event") {
        return;
    }
    // `hold=1`: after its write the guest spins (counting) instead of exiting, so the VM is
    // still there to show no second event follows.
    let mut t = Target::start(Image::TestGuest, "mode=mem-write n=1 gate=1 hold=1", &[]);
    let c = t.attach();
    let page = t.sym("scratch_page");
    c.control_events(0, only(EventKind::PageFault)).unwrap();
    set_access(&c, page, Access::R);
    t.open_gate(&c);
    let ev = expect_event(&c, EventKind::PageFault, &t);
    assert_eq!(read_u64(&c, page), 0, "written before the reply");
    set_access(&c, page, Access::RWX);
    c.reply(
        &ev,
        Action::Retry,
        EventReplyData::PageFault(PageFaultReply::default()),
    )
    .unwrap();
    assert!(
        t.wait_serial("holding", EXIT_WAIT),
        "{}; stderr: {}",
        t.serial(),
        t.stderr()
    );
    assert!(
        t.serial().contains("mem-write n=1 last=0x5ca10000"),
        "{}",
        t.serial()
    );
    // What RETRY does to the trapped write depends on how the host traps it.
    let caps = vmm::probe::cached_capabilities().expect("capability probe");
    let word = read_u64(&c, page);
    match caps.mprotect_write_trap {
        // PVM: KVM emulates the write and exits with it decoded and retired (rip already past
        // the instruction): there is nothing to re-execute, and RETRY drops the write
        // (kvmi_engine::fault::data_outcome). The guest believes it wrote.
        vmm::probe::MprotectMode::MmioExit => {
            assert_eq!(word, 0, "PVM: RETRY drops the retired write")
        }
        // Upstream KVM: the write faulted before it executed; RETRY re-enters and the
        // instruction runs again, now unprotected.
        _ => assert_eq!(word, 0x5ca1_0000, "the retried write landed"),
    }
    // Either way the fault is over: no further event while the guest spins on.
    assert_quiet_while_running(&mut t, &c, Duration::from_millis(300), 1);
}
