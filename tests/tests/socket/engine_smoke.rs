//! The introspection engine in-process (`start_introspected`), on real VMs: a read trap
//! answered with ctx_data, an exec trap stepped through, and the library API's lifecycle.

use std::time::{Duration, Instant};

use kvmi::images::Image;
use kvmi_client::KvmiClient;
use kvmi_engine::{
    Endpoint, IntrospectedVm, IntrospectorConfig, start_introspected, temp_socket_path,
};
use protocol::Action;
use protocol::event::{EventKind, EventPayload, EventSet};
use protocol::event_reply::{EventReplyData, PageFaultReply};
use protocol::types::{Access, PageAccessEntry};
use vmm::{RunLimits, SerialSink, SharedBuffer, Vm, VmConfig};

const WAIT: Duration = Duration::from_secs(20);
const LIMITS: RunLimits = RunLimits {
    timeout: Some(Duration::from_secs(60)),
    interrupt: None,
};

fn start(cmdline: &str) -> (IntrospectedVm, KvmiClient, SharedBuffer) {
    let config = VmConfig {
        name: "engine-smoke".into(),
        memory_bytes: 32 << 20,
        cmdline: cmdline.into(),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(config, kvmi_tests::common::elf(Image::TestGuest)).unwrap();
    let serial = SharedBuffer::new();
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    let socket = temp_socket_path("engine-smoke");
    let ivm = start_introspected(
        vm,
        IntrospectorConfig {
            wait_for_tool: true,
            ..IntrospectorConfig::default()
        },
        Endpoint::Listen(socket),
    )
    .unwrap();
    let client = KvmiClient::connect_retry(ivm.socket(), WAIT).unwrap();
    (ivm, client, serial)
}

/// Takes the CREATE_VCPU event of vCPU 0 (the vCPU waits in it until answered).
fn created(c: &KvmiClient) -> kvmi_client::ReceivedEvent {
    let ev = c.next_event(WAIT).unwrap().expect("CREATE_VCPU event");
    assert_eq!(ev.event.kind(), EventKind::CreateVcpu);
    assert_eq!(ev.event.common.vcpu, 0);
    ev
}

#[test]
fn read_trap_returns_ctx_data_to_the_guest() {
    if !kvmi_tests::require_kvm("read_trap_returns_ctx_data_to_the_guest") {
        return;
    }
    let scratch = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("scratch_page")
        .unwrap();
    let (ivm, c, serial) = start("mode=mem-read n=4");
    let ev = created(&c);
    // Executable, not readable (write without read, `-wx`, is refused): every load of the
    // page is an event.
    let access = Access::X;
    c.set_page_access(
        0,
        &[PageAccessEntry {
            gpa: scratch,
            access,
        }],
    )
    .unwrap();
    c.control_events(0, EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    c.reply_continue(&ev).unwrap();
    let mut gpas = Vec::new();
    for i in 0..4u64 {
        let ev = c.next_event(WAIT).unwrap().expect("PF event");
        let EventPayload::PageFault { gpa, mode, .. } = ev.event.payload else {
            panic!("unexpected {:?}", ev.event.payload);
        };
        assert_eq!(mode, 1, "a read");
        gpas.push(gpa);
        let value = (0x100 * (i + 1)).to_le_bytes();
        let data = EventReplyData::PageFault(PageFaultReply {
            trap_access: false,
            ctx_data: &value,
        });
        c.reply(&ev, Action::Continue, data).unwrap();
    }
    assert_eq!(gpas, (0..4).map(|i| scratch + 8 * i).collect::<Vec<_>>());
    let report = ivm.wait(LIMITS);
    assert!(report.outcome.is_success(), "{}", report.outcome);
    // The guest summed what the tool supplied, not memory (all zero).
    assert!(
        serial.text().contains("mem-read n=4 sum=0xa00"),
        "{}",
        serial.text()
    );
}

#[test]
fn exec_trap_reports_the_rip_and_continue_steps_through() {
    if !kvmi_tests::require_kvm("exec_trap_reports_the_rip_and_continue_steps_through") {
        return;
    }
    let target = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("breakpoint_target")
        .unwrap();
    let (ivm, c, serial) = start("mode=breakpoint n=2");
    let ev = created(&c);
    let page = target & !0xfff;
    let access = Access::R.union(Access::W);
    c.set_page_access(0, &[PageAccessEntry { gpa: page, access }])
        .unwrap();
    c.control_events(0, EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    c.reply_continue(&ev).unwrap();
    let mut rips = Vec::new();
    // Until the guest reports both calls (not until a quiet spell: a loaded host can pause
    // the guest for seconds mid-stream).
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let ev = match c.next_event(Duration::from_millis(200)) {
            Ok(Some(ev)) => ev,
            Ok(None) if serial.text().contains("breakpoint calls=2") => break,
            Ok(None) => continue,
            Err(_) => break,
        };
        let EventPayload::PageFault { gva, gpa, mode } = ev.event.payload else {
            panic!("unexpected {:?}", ev.event.payload);
        };
        assert_eq!(mode, 4, "a fetch");
        assert_eq!(gva, ev.event.common.regs.rip.get());
        assert_eq!(gpa & !0xfff, page);
        rips.push(gva);
        c.reply_continue(&ev).unwrap();
    }
    // Every instruction fetched from the page traps once (stepped through), in program
    // order; the function is entered once per call.
    assert_eq!(
        rips.iter().filter(|r| **r == target).count(),
        2,
        "{rips:x?}"
    );
    assert!(rips.iter().all(|r| r & !0xfff == page), "{rips:x?}");
    let report = ivm.wait(LIMITS);
    assert!(report.outcome.is_success(), "{}", report.outcome);
    assert!(
        serial.text().contains("breakpoint calls=2"),
        "{}",
        serial.text()
    );
}

#[test]
fn guest_info_then_detach_and_the_socket_is_removed_at_the_end() {
    if !kvmi_tests::require_kvm("guest_info_then_detach_and_the_socket_is_removed_at_the_end") {
        return;
    }
    let config = VmConfig {
        name: "engine-smoke".into(),
        memory_bytes: 32 << 20,
        cmdline: "mode=mem-write n=8 gate=1".into(),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(config, kvmi_tests::common::elf(Image::TestGuest)).unwrap();
    let serial = SharedBuffer::new();
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    let socket = temp_socket_path("engine-smoke");
    let ivm = start_introspected(
        vm,
        IntrospectorConfig::default(),
        Endpoint::Listen(socket.clone()),
    )
    .unwrap();
    assert!(socket.exists());
    assert!(!ivm.introspector.is_attached());
    let c = KvmiClient::connect_retry(ivm.socket(), WAIT).unwrap();
    let info = c.get_guest_info().unwrap();
    assert_eq!(info.vcpu_count, 1);
    assert!(info.tsc_speed > 1_000_000, "tsc {} Hz", info.tsc_speed);
    let gate = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("gate")
        .unwrap();
    c.write_physical(gate, &1u64.to_le_bytes()).unwrap();
    c.close();
    let report = ivm.wait(LIMITS);
    assert!(report.outcome.is_success(), "{}", report.outcome);
    assert!(serial.text().contains("mem-write n=8"), "{}", serial.text());
    assert!(!socket.exists());
}
