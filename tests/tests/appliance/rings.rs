//! The ring transport end to end (real KVM, a real target, a real memfd ring region): the
//! target's introspector serves an appliance over the rings exactly as over the socket. The
//! appliance side is this test, on the same shared memory (`Region::open`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance_link::hook::SERVED_FEATURES;
use appliance_link::rings::{RingMemory, RingService, create_region};
use hypercall::discovery::RingKind;
use hypercall::ring::{Consumer, LayoutParams, Region, RingSizes};
use kvmi::images::Image;
use kvmi_engine::{Introspector, IntrospectorConfig};
use kvmi_tests::wait;
use protocol::V4;
use protocol::command::{Command, CommandKind};
use protocol::event::EventKind;
use protocol::event_reply::{Action, EventReply, EventReplyData};
use protocol::wire::{HostMessage, WireProfile};
use vmm::{GuestRam, RunLimits, RunningVm, SerialSink, SharedBuffer, Vm, VmConfig};

/// The ring layout of a one-vCPU slot with a 1 MiB map window (every slot test uses it).
pub(crate) fn slot_params() -> LayoutParams {
    LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes::default(),
        features: SERVED_FEATURES,
        map_window_gpa: 0xC100_0000,
        map_window_size: 1 << 20,
    }
}

/// A memfd named `name` sized for `params`' ring region.
pub(crate) fn slot_ring(name: &str, params: &LayoutParams) -> Arc<GuestRam> {
    Arc::new(GuestRam::new(name, params.region_size().next_multiple_of(4096)).unwrap())
}

/// Pops one record within 10 s.
fn pop(c: &mut Consumer<RingMemory>) -> Vec<u8> {
    let mut buf = vec![0u8; c.max_payload()];
    let n = wait::until_some(Duration::from_secs(10), "a record", || {
        c.try_pop(&mut buf).expect("ring intact")
    });
    let _ = c.release().unwrap();
    buf[..n].to_vec()
}

/// A running test-guest target (`cmdline`) with an introspector (`intro_config`) serving a
/// ring region of one vCPU through a started [`RingService`] whose log lines go to `log`.
struct RingTarget {
    running: RunningVm,
    intro: Arc<Introspector>,
    region: Region<RingMemory>,
    service: RingService,
    serial: SharedBuffer,
}

fn ring_target(
    name: &str,
    cmdline: &str,
    intro_config: IntrospectorConfig,
    log: appliance_link::rings::LogSink,
) -> RingTarget {
    ring_target_log(name, cmdline, intro_config, Some(log))
}

/// [`ring_target`]; `log: None` starts the service of a target process (no log ring).
fn ring_target_log(
    name: &str,
    cmdline: &str,
    intro_config: IntrospectorConfig,
    log: Option<appliance_link::rings::LogSink>,
) -> RingTarget {
    let caps = vmm::probe::cached_capabilities().expect("probe");
    let config = VmConfig {
        name: name.into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: cmdline.into(),
        unknown_io: vmm::UnknownIoPolicy::Ignore,
    };
    let mut target = Vm::new(config, kvmi_tests::common::elf(Image::TestGuest)).unwrap();
    let serial = SharedBuffer::new();
    target.set_serial(SerialSink::Buffer(serial.clone()));
    let intro = Introspector::install(&mut target, caps, intro_config).unwrap();
    let params = slot_params();
    let region = create_region(slot_ring(name, &params), &params).unwrap();
    let running = target.start().unwrap();
    intro.set_handle(running.handle());
    let service = match log {
        Some(log) => RingService::start(intro.clone(), &region, log, Duration::from_secs(5)),
        None => RingService::start_without_log(intro.clone(), &region, Duration::from_secs(5)),
    }
    .unwrap();
    RingTarget {
        running,
        intro,
        region,
        service,
        serial,
    }
}

#[test]
fn events_commands_and_log_lines_travel_over_the_rings() {
    if !kvmi_tests::require_kvm("events_commands_and_log_lines_travel_over_the_rings") {
        return;
    }
    let lines: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = lines.clone();
    let RingTarget {
        running,
        intro,
        region,
        service,
        serial,
    } = ring_target(
        "rings-target",
        "mode=hello",
        IntrospectorConfig {
            wait_for_tool: true,
            ..IntrospectorConfig::default()
        },
        Box::new(move |r: &[u8]| sink.lock().unwrap().push(r.to_vec())),
    );

    // The appliance's side of the same memory.
    let app = Region::open(region.memory().clone()).unwrap();
    let mut events = app.consumer_for(RingKind::Event, 0).unwrap();
    let mut replies = app.producer_for(RingKind::EventReply, 0).unwrap();
    let mut commands = app.producer_for(RingKind::Command, 0).unwrap();
    let mut command_replies = app.consumer_for(RingKind::CommandReply, 0).unwrap();
    let mut log = app.producer_for(RingKind::Log, 0).unwrap();

    // The vCPU waits for its CREATE_VCPU event to be answered.
    let record = pop(&mut events);
    let frame = V4::parse_frame(&record).unwrap();
    let HostMessage::Event { seq, event } = V4::decode_host_message(frame).unwrap() else {
        panic!("an event on the event ring");
    };
    assert_eq!(event.payload.kind(), EventKind::CreateVcpu);
    assert_eq!(event.common.vcpu, 0);
    let reply = EventReply {
        event: EventKind::CreateVcpu,
        action: Action::Continue,
        data: EventReplyData::None,
    };
    let mut buf = vec![0u8; V4::MAX_MSG_SIZE];
    let n = V4::encode_event_reply(seq, &reply, &mut buf).unwrap();
    replies.try_push(&buf[..n]).unwrap();
    let _ = replies.publish().unwrap();

    // A command and its reply.
    let n = V4::encode_command(77, &Command::GetVersion, &mut buf).unwrap();
    commands.try_push(&buf[..n]).unwrap();
    let _ = commands.publish().unwrap();
    let record = pop(&mut command_replies);
    let frame = V4::parse_frame(&record).unwrap();
    match V4::decode_host_message(frame).unwrap() {
        HostMessage::Reply { seq, command, .. } => {
            assert_eq!((seq, command), (77, CommandKind::GetVersion));
        }
        other => panic!("expected the GET_VERSION reply, got {other:?}"),
    }

    // A log line.
    log.try_push(b"{\"finding\":\"hello\"}\n").unwrap();
    let _ = log.publish().unwrap();

    let report = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(20)),
        interrupt: None,
    });
    assert!(
        report.outcome.is_success(),
        "{:?}: {}",
        report.outcome,
        serial.text()
    );
    wait::until(Duration::from_secs(5), "the log line", || {
        !lines.lock().unwrap().is_empty()
    });
    assert_eq!(
        *lines.lock().unwrap(),
        vec![b"{\"finding\":\"hello\"}\n".to_vec()]
    );
    // The command went through the service (the event reply too, unless the waiting vCPU
    // collected it itself from its reply ring, as it does when the reply comes quickly).
    let served = service
        .stats()
        .messages
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=2).contains(&served), "{served} messages served");
    assert!(
        intro.is_attached(),
        "a well-behaved appliance stays attached"
    );
    assert_eq!(service.stop(), appliance_link::rings::ServiceEnd::Stopped);
}

#[test]
fn an_appliance_that_stops_answering_is_detached_and_the_target_runs_on() {
    if !kvmi_tests::require_kvm(
        "an_appliance_that_stops_answering_is_detached_and_the_target_runs_on",
    ) {
        return;
    }
    let RingTarget {
        running,
        intro,
        region,
        service,
        serial,
    } = ring_target(
        "silent-target",
        "mode=hello",
        IntrospectorConfig {
            wait_for_tool: true,
            reply_timeout: Some(Duration::from_millis(500)),
            ..IntrospectorConfig::default()
        },
        Box::new(|_| {}),
    );
    // The appliance sees the CREATE_VCPU event but never answers.
    let app = Region::open(region.memory().clone()).unwrap();
    let mut events = app.consumer_for(RingKind::Event, 0).unwrap();
    let record = pop(&mut events);
    assert_eq!(
        V4::parse_frame(&record).unwrap().header.id,
        V4::EVENT_ID,
        "an event was delivered"
    );
    let report = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(20)),
        interrupt: None,
    });
    assert!(
        report.outcome.is_success(),
        "the target ran to its end unhooked: {:?}: {}",
        report.outcome,
        serial.text()
    );
    assert!(!intro.is_attached(), "the silent appliance was detached");
    assert!(
        matches!(
            service.stop(),
            appliance_link::rings::ServiceEnd::Detached(_)
        ),
        "the service reports the detach"
    );
}

#[test]
fn a_notify_for_the_command_ring_serves_it_on_the_callers_thread() {
    if !kvmi_tests::require_kvm("a_notify_for_the_command_ring_serves_it_on_the_callers_thread") {
        return;
    }
    let RingTarget {
        running,
        intro,
        region,
        service,
        ..
    } = ring_target(
        "notify-target",
        "mode=spin gate=1",
        IntrospectorConfig::default(),
        Box::new(|_| {}),
    );
    let waker = service.waker();
    // No service thread from here on: whatever serves the commands is the NOTIFY itself.
    assert_eq!(service.stop(), appliance_link::rings::ServiceEnd::Stopped);
    assert!(intro.is_attached());

    let app = Region::open(region.memory().clone()).unwrap();
    let mut commands = app.producer_for(RingKind::Command, 0).unwrap();
    let mut replies = app.consumer_for(RingKind::CommandReply, 0).unwrap();
    let command_ring = u64::from(app.ring_index(RingKind::Command, 0).unwrap());
    let mut buf = vec![0u8; V4::MAX_MSG_SIZE];
    let mut record = vec![0u8; replies.max_payload()];
    for (seq, ring) in [
        (1, command_ring),
        (2, command_ring),
        (3, hypercall::call::NOTIFY_ALL_RINGS),
    ] {
        let n = V4::encode_command(seq, &Command::GetVersion, &mut buf).unwrap();
        commands.try_push(&buf[..n]).unwrap();
        assert!(
            commands.publish().unwrap(),
            "command {seq}: the shim keeps the command ring's wake word armed"
        );
        waker.notify(ring);
        // Served before `notify` returned: the reply is there without waiting.
        let n = replies
            .try_pop(&mut record)
            .unwrap()
            .unwrap_or_else(|| panic!("no reply to command {seq} after its NOTIFY"));
        let _ = replies.release().unwrap();
        match V4::decode_host_message(V4::parse_frame(&record[..n]).unwrap()).unwrap() {
            HostMessage::Reply {
                seq: got, command, ..
            } => assert_eq!((got, command), (seq, CommandKind::GetVersion)),
            other => panic!("expected the GET_VERSION reply, got {other:?}"),
        }
    }
    assert_eq!(
        service
            .stats()
            .messages
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    running.handle().stop();
    let _ = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
}

/// Sends GET_VERSION `seq` on the command ring, rings `doorbell` (as the appliance process
/// does for NOTIFY) and waits for the reply.
fn command_through_the_doorbell(
    commands: &mut hypercall::ring::Producer<RingMemory>,
    replies: &mut Consumer<RingMemory>,
    doorbell: &std::fs::File,
    seq: u32,
) {
    use std::io::Write;
    let mut buf = vec![0u8; V4::MAX_MSG_SIZE];
    let n = V4::encode_command(seq, &Command::GetVersion, &mut buf).unwrap();
    commands.try_push(&buf[..n]).unwrap();
    assert!(
        commands.publish().unwrap(),
        "the command ring's wake word is armed"
    );
    (&*doorbell).write_all(&1u64.to_ne_bytes()).unwrap();
    let record = pop(replies);
    match V4::decode_host_message(V4::parse_frame(&record).unwrap()).unwrap() {
        HostMessage::Reply {
            seq: got, command, ..
        } => assert_eq!((got, command), (seq, CommandKind::GetVersion)),
        other => panic!("expected the GET_VERSION reply, got {other:?}"),
    }
}

#[test]
fn a_target_process_service_leaves_the_log_ring_and_is_woken_by_the_doorbell() {
    if !kvmi_tests::require_kvm(
        "a_target_process_service_leaves_the_log_ring_and_is_woken_by_the_doorbell",
    ) {
        return;
    }
    use appliance_link::kick::{KickEnd, KickForwarder};
    use std::os::fd::FromRawFd;
    let RingTarget {
        running,
        intro,
        region,
        service,
        ..
    } = ring_target_log(
        "doorbell-target",
        "mode=spin gate=1",
        IntrospectorConfig::default(),
        None,
    );
    // The doorbell as the vhost-user link makes it (non-blocking eventfd), one end each.
    // SAFETY: eventfd has no pointer arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nobody else.
    let doorbell = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut forwarder =
        KickForwarder::start(doorbell.try_clone().unwrap(), service.waker()).unwrap();

    let app = Region::open(region.memory().clone()).unwrap();
    let mut commands = app.producer_for(RingKind::Command, 0).unwrap();
    let mut replies = app.consumer_for(RingKind::CommandReply, 0).unwrap();
    let mut log = app.producer_for(RingKind::Log, 0).unwrap();
    let mut log_reader = app.consumer_for(RingKind::Log, 0).unwrap();

    // A log line stays in the ring for the appliance process: the target does not read it.
    log.try_push(b"{\"finding\":\"stays\"}\n").unwrap();
    let _ = log.publish().unwrap();
    command_through_the_doorbell(&mut commands, &mut replies, &doorbell, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(pop(&mut log_reader), b"{\"finding\":\"stays\"}\n".to_vec());
    let stats = service.stats();
    assert_eq!(
        stats.log_records.load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // Without the service thread, the doorbell alone serves the command ring.
    assert_eq!(service.stop(), appliance_link::rings::ServiceEnd::Stopped);
    let before = forwarder.wakeups();
    command_through_the_doorbell(&mut commands, &mut replies, &doorbell, 2);
    assert!(
        forwarder.wakeups() > before,
        "the reply came through the doorbell"
    );
    assert_eq!(stats.messages.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert!(intro.is_attached());
    assert_eq!(forwarder.stop(), KickEnd::Stopped);
    running.handle().stop();
    let _ = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
}

/// Publishes `message` on vCPU 0's reply ring, as a confused or hostile appliance would.
fn scribble_reply_ring(region: &Region<RingMemory>, message: &[u8]) {
    let app = Region::open(region.memory().clone()).unwrap();
    let mut replies = app.producer_for(RingKind::EventReply, 0).unwrap();
    replies.try_push(message).unwrap();
    let _ = replies.publish().unwrap();
}

/// Waits (less than the 2 s a vCPU command waits for its vCPU: the stall this replaces) for
/// the appliance to be detached, and returns the reason its service reports.
fn detached_promptly(intro: &Introspector, service: &RingService, what: &str) -> String {
    let start = std::time::Instant::now();
    let detached = wait::within(kvmi_engine::VCPU_COMMAND_TIMEOUT, || !intro.is_attached());
    assert!(
        detached,
        "{what}: still attached after {:?}",
        start.elapsed()
    );
    match service.stop() {
        appliance_link::rings::ServiceEnd::Detached(reason) => reason,
        other => panic!("{what}: the service ended {other:?}"),
    }
}

#[test]
fn anything_but_an_event_reply_on_a_reply_ring_detaches_the_appliance_at_once() {
    if !kvmi_tests::require_kvm(
        "anything_but_an_event_reply_on_a_reply_ring_detaches_the_appliance_at_once",
    ) {
        return;
    }
    let mut buf = vec![0u8; V4::MAX_MSG_SIZE];

    // No event outstanding: the service thread reads the ring and finds a command there.
    let RingTarget {
        running,
        intro,
        region,
        service,
        serial,
    } = ring_target(
        "reply-ring-idle",
        "mode=cycle every=100",
        IntrospectorConfig::default(),
        Box::new(|_| {}),
    );
    wait::until(Duration::from_secs(20), "the guest to run", || {
        serial.text().contains("cycle i=")
    });
    let n = V4::encode_command(5, &Command::GetVersion, &mut buf).unwrap();
    scribble_reply_ring(&region, &buf[..n]);
    let reason = detached_promptly(&intro, &service, "a GET_VERSION on the reply ring");
    assert_eq!(
        reason,
        "reply ring of vCPU 0: a GetVersion command (id 1) where only event replies belong"
    );
    // The target runs on, unhooked: its serial output keeps growing.
    let len = serial.text().len();
    wait::until(Duration::from_secs(20), "the serial output to grow", || {
        serial.text().len() > len
    });
    running.handle().stop();
    let _ = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });

    // A vCPU waiting for its event reply (it polls its own reply ring): a vCPU command for
    // that very vCPU there used to be queued by that vCPU for itself, stalling it 2 s.
    let RingTarget {
        running,
        intro,
        region,
        service,
        serial,
    } = ring_target(
        "reply-ring-waiting",
        "mode=hello",
        IntrospectorConfig {
            wait_for_tool: true,
            ..IntrospectorConfig::default()
        },
        Box::new(|_| {}),
    );
    let app = Region::open(region.memory().clone()).unwrap();
    let mut events = app.consumer_for(RingKind::Event, 0).unwrap();
    let record = pop(&mut events);
    assert_eq!(V4::parse_frame(&record).unwrap().header.id, V4::EVENT_ID);
    let command = Command::GetRegisters {
        vcpu: 0,
        msrs: protocol::list::List::from_slice(&[]),
    };
    let n = V4::encode_command(6, &command, &mut buf).unwrap();
    scribble_reply_ring(&region, &buf[..n]);
    let reason = detached_promptly(&intro, &service, "a GET_REGISTERS on the reply ring");
    assert_eq!(
        reason,
        "reply ring of vCPU 0: a GetRegisters command (id 6) where only event replies belong"
    );
    // The vCPU's wait ended with the detach: the guest runs to its end.
    let report = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(20)),
        interrupt: None,
    });
    assert!(
        report.outcome.is_success(),
        "{:?}: {}",
        report.outcome,
        serial.text()
    );
    assert!(
        serial.text().contains("hello from vcpu 0"),
        "{}",
        serial.text()
    );
}

#[test]
fn a_target_slot_over_the_link_serves_the_appliance_and_runs_on_when_the_link_closes() {
    if !kvmi_tests::require_kvm(
        "a_target_slot_over_the_link_serves_the_appliance_and_runs_on_when_the_link_closes",
    ) {
        return;
    }
    use appliance_link::remote::TargetSlot;
    use appliance_link::vhost_link::ApplianceLink;
    use std::os::unix::net::UnixStream;

    // The target process's half: its VM (RAM memfd kvmi-ram-NAME) and introspector.
    let caps = vmm::probe::cached_capabilities().expect("probe");
    let config = VmConfig {
        name: "kvmi-ram-linked".into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: "mode=spin".into(),
        unknown_io: vmm::UnknownIoPolicy::Ignore,
    };
    let mut target = Vm::new(config, kvmi_tests::common::elf(Image::TestGuest)).unwrap();
    let intro = Introspector::install(
        &mut target,
        caps,
        IntrospectorConfig {
            wait_for_tool: true,
            ..IntrospectorConfig::default()
        },
    )
    .unwrap();
    let ram = target.ram().clone();

    // The appliance process's half: the slot's ring region, laid out for one vCPU.
    let params = slot_params();
    let ring = slot_ring("kvmi-ring-slot0", &params);
    let app = create_region(ring.clone(), &params).unwrap();

    let (appliance_end, target_end) = UnixStream::pair().unwrap();
    let attaching = {
        let (intro, ram) = (intro.clone(), ram.clone());
        std::thread::spawn(move || {
            TargetSlot::attach(target_end, intro, &ram, Duration::from_secs(5))
        })
    };
    let (link, got) = ApplianceLink::connect(
        appliance_end,
        &**ring.memfd_file(),
        0xC000_0000,
        ring.host_base() as u64,
        ring.size(),
    )
    .unwrap();
    let slot = attaching
        .join()
        .unwrap()
        .expect("the target's slot attaches");
    assert_eq!(got.len, 64 << 20, "the target's RAM went to the appliance");
    assert!(intro.is_attached());
    let running = target.start().unwrap();
    intro.set_handle(running.handle());

    // The vCPU waits for its CREATE_VCPU event to be answered through the shared region.
    let mut events = app.consumer_for(RingKind::Event, 0).unwrap();
    let mut replies = app.producer_for(RingKind::EventReply, 0).unwrap();
    let record = pop(&mut events);
    let HostMessage::Event { seq, event } =
        V4::decode_host_message(V4::parse_frame(&record).unwrap()).unwrap()
    else {
        panic!("an event on the event ring");
    };
    assert_eq!(event.payload.kind(), EventKind::CreateVcpu);
    let mut buf = vec![0u8; V4::MAX_MSG_SIZE];
    let reply = EventReply {
        event: EventKind::CreateVcpu,
        action: Action::Continue,
        data: EventReplyData::None,
    };
    let n = V4::encode_event_reply(seq, &reply, &mut buf).unwrap();
    replies.try_push(&buf[..n]).unwrap();
    let _ = replies.publish().unwrap();

    // A command, and NOTIFY as the appliance process makes it: the link's doorbell.
    let mut commands = app.producer_for(RingKind::Command, 0).unwrap();
    let mut command_replies = app.consumer_for(RingKind::CommandReply, 0).unwrap();
    let n = V4::encode_command(9, &Command::GetVersion, &mut buf).unwrap();
    commands.try_push(&buf[..n]).unwrap();
    assert!(
        commands.publish().unwrap(),
        "the command ring's wake word is armed"
    );
    link.notify();
    let record = pop(&mut command_replies);
    match V4::decode_host_message(V4::parse_frame(&record).unwrap()).unwrap() {
        HostMessage::Reply { seq, command, .. } => {
            assert_eq!((seq, command), (9, CommandKind::GetVersion));
        }
        other => panic!("expected the GET_VERSION reply, got {other:?}"),
    }
    wait::until(Duration::from_secs(5), "the doorbell's wake-up", || {
        slot.doorbell_wakeups() >= 1
    });

    // The appliance process goes: its end of the link closes. The target is unhooked and
    // runs on.
    drop(link);
    wait::until(Duration::from_secs(5), "the detach", || {
        !intro.is_attached()
    });
    // The link thread ends right after its detach.
    wait::until(Duration::from_secs(5), "the link thread's end", || {
        slot.link_closed()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !running.handle().has_ended(),
        "the target runs on, unhooked"
    );
    let end = slot.stop(&intro);
    assert!(end.link_lost, "{end:?}");
    assert!(
        matches!(end.service, appliance_link::rings::ServiceEnd::Detached(_)),
        "{end:?}"
    );
    running.handle().stop();
    let _ = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
}

#[test]
fn both_ends_of_a_slot_across_the_link_map_by_token_label_the_log_and_free_the_slot() {
    if !kvmi_tests::require_kvm(
        "both_ends_of_a_slot_across_the_link_map_by_token_label_the_log_and_free_the_slot",
    ) {
        return;
    }
    use appliance_link::remote::{ApplianceSlot, SlotSetup, TargetSlot};
    use hypercall::call::Request;
    use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenPage, TokenVerifier};
    use std::os::unix::net::UnixStream;

    // The supervisor: one key and one token page for the target (each side maps the page on
    // its own: the verifier's is a second open of the memfd).
    const TARGET_ID: u64 = 0x5107;
    let key = TargetKey::random_bytes().unwrap();
    let page = Arc::new(TokenPage::create("kvmi-tokens-slot").unwrap());
    let reopened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(page.file())
        ))
        .unwrap();
    let appliance_page = Arc::new(TokenPage::from_file(reopened).unwrap());

    // The target process: its VM, its introspector issuing under the supervisor's key.
    let caps = vmm::probe::cached_capabilities().expect("probe");
    let config = VmConfig {
        name: "kvmi-ram-both".into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: "mode=spin".into(),
        unknown_io: vmm::UnknownIoPolicy::Ignore,
    };
    let mut target = Vm::new(config, kvmi_tests::common::elf(Image::TestGuest)).unwrap();
    let intro = Introspector::install(&mut target, caps, IntrospectorConfig::default()).unwrap();
    intro.tokens().rekey(TargetKey::from_bytes_on_page(
        TARGET_ID,
        DEFAULT_TTL,
        &key,
        page.clone(),
    ));
    let ram = target.ram().clone();
    ram.write(0x3000, b"target page").unwrap();

    // The appliance process: the slot's ring memory and window, the verifier.
    let params = slot_params();
    let ring = slot_ring("kvmi-ring-slot0", &params);
    let window = Arc::new(vmm::window::RemapWindow::new(1 << 20).unwrap());
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    let (appliance_end, target_end) = UnixStream::pair().unwrap();
    let attaching = {
        let (intro, ram) = (intro.clone(), ram.clone());
        std::thread::spawn(move || {
            TargetSlot::attach(target_end, intro, &ram, Duration::from_secs(5))
        })
    };
    let slot = ApplianceSlot::connect(
        appliance_end,
        SlotSetup {
            ring: ring.clone(),
            ring_gpa: 0xC000_0000,
            params,
            verifier: Arc::new(TokenVerifier::new(TargetKey::from_bytes_on_page(
                TARGET_ID,
                DEFAULT_TTL,
                &key,
                appliance_page,
            ))),
            window: window.clone(),
            window_gpa: 0xC100_0000,
            target: (3, "web".into()),
            sink: Box::new(move |line: &[u8]| {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(line).into_owned())
            }),
        },
    )
    .unwrap();
    let target_slot = attaching
        .join()
        .unwrap()
        .expect("the target's end attaches");
    let running = target.start().unwrap();
    intro.set_handle(running.handle());

    // The agent's side (this test) on the appliance's ring memory.
    let app = Region::open(Arc::new(
        // SAFETY: the ring memory's mapping lives as long as `ring`, which the region owns.
        unsafe {
            hypercall::ring::SharedRegion::new(ring.clone(), ring.host_base(), ring.size() as usize)
        }
        .unwrap(),
    ))
    .unwrap();
    // A command, and NOTIFY through the route's waker (the doorbell): answered.
    let mut commands = app.producer_for(RingKind::Command, 0).unwrap();
    let mut command_replies = app.consumer_for(RingKind::CommandReply, 0).unwrap();
    let mut buf = vec![0u8; V4::MAX_MSG_SIZE];
    let n = V4::encode_command(4, &Command::GetVersion, &mut buf).unwrap();
    commands.try_push(&buf[..n]).unwrap();
    let _ = commands.publish().unwrap();
    slot.waker().notify(hypercall::call::NOTIFY_ALL_RINGS);
    let record = pop(&mut command_replies);
    assert!(matches!(
        V4::decode_host_message(V4::parse_frame(&record).unwrap()).unwrap(),
        HostMessage::Reply { seq: 4, .. }
    ));
    wait::until(Duration::from_secs(5), "the doorbell", || {
        target_slot.doorbell_wakeups() >= 1
    });

    // A log line comes out labelled with the target.
    let mut log = app.producer_for(RingKind::Log, 0).unwrap();
    log.try_push(b"{\"finding\":\"probe\"}").unwrap();
    let _ = log.publish().unwrap();
    wait::until(Duration::from_secs(5), "the labelled line", || {
        !lines.lock().unwrap().is_empty()
    });
    assert_eq!(
        lines.lock().unwrap()[0],
        "{\"target\":3,\"target_name\":\"web\",\"finding\":\"probe\"}"
    );

    // A token the target's engine issued maps its page, read-only and zero-copy.
    let caller = GuestRam::new("agent-ram", 4096).unwrap();
    caller
        .write(0, &intro.tokens().issue().unwrap().to_bytes())
        .unwrap();
    let map = Request::MemMap {
        token_gpa: 0,
        target_gpa: 0x3000,
        window_gpa: 0xC100_0000,
    };
    assert_eq!(slot.pager().serve(&map, &caller), Ok(0));
    let mut seen = [0u8; 11];
    // SAFETY: the window's first page is mapped for as long as `window` lives.
    unsafe { std::ptr::copy_nonoverlapping(window.host_base(), seen.as_mut_ptr(), 11) };
    assert_eq!(&seen, b"target page");

    // The target's engine revokes its tokens (as a detach or REVOKE does): the appliance's
    // verifier sees the new epoch through the token page at once.
    let pending = intro.tokens().issue().unwrap();
    intro.tokens().revoke_all();
    caller.write(0, &pending.to_bytes()).unwrap();
    let again = Request::MemMap {
        token_gpa: 0,
        target_gpa: 0x3000,
        window_gpa: 0xC100_0000 + 4096,
    };
    assert_eq!(
        slot.pager().serve(&again, &caller),
        Err(hypercall::error::HcError::BadToken)
    );
    // The target's end of the link closes: the appliance frees the slot and, after the
    // agent's grace for a final summary (none comes here), revokes the page.
    let end = target_slot.stop(&intro);
    assert!(!end.link_lost);
    wait::until(Duration::from_secs(5), "the slot to be freed", || {
        slot.is_gone()
    });
    wait::until(Duration::from_secs(5), "the page to be revoked", || {
        slot.pager().mapped_pages() == 0
    });
    assert_eq!(slot.close(), 1, "one log record printed");
    running.handle().stop();
    let _ = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
}
