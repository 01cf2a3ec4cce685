//! The agent loop over real rings in a real memfd shared by two mappings, with two threads:
//! the test thread plays the shim (pushes events encoded with `protocol`, checks the replies,
//! serves commands, reads the JSON lines), the other runs the agent.

use std::sync::mpsc;
use std::time::Duration;

use appliance::agent::{
    Agent, AgentStats, CommandClient, EventContext, EventHandler, Waiting, reply_with,
};
use guest_driver::host::{Mapping, memfd};
use hypercall::discovery::{Features, NO_VCPU, RingKind};
use hypercall::ring::park::{ParkWaiter, Unparker, park_pair};
use hypercall::ring::{LayoutParams, Region, RingSizes, WaitStrategy};
use protocol::event::{EventCommon, EventMsrs, EventPayload};
use protocol::kvm::{KvmRegs, KvmSregs};
use protocol::reply::Reply;
use protocol::types::{CpuMode, MapToken};
use protocol::{Action, Command, Event, EventReplyData, ToolMessage, V4, WireProfile};
use serde::Serialize;
use serde_json::Value;
use std::os::fd::AsRawFd;
use zerocopy::little_endian::U64;

const VCPUS: u32 = 2;
const ROUNDS: u64 = 150;

fn params() -> LayoutParams {
    LayoutParams {
        vcpu_count: VCPUS,
        sizes: RingSizes::default(),
        features: Features::RING_WAKE_FLAGS,
        map_window_gpa: 0x1_0000_0000,
        map_window_size: 1 << 20,
    }
}

/// Two mappings of one memfd: the shim's and the agent's.
fn regions() -> (
    Region<guest_driver::host::HostMemory>,
    Region<guest_driver::host::HostMemory>,
) {
    let p = params();
    let fd = memfd(c"rings", p.region_size()).unwrap();
    let map = || {
        Mapping::map(fd.as_raw_fd(), p.region_size() as usize)
            .unwrap()
            .into_region()
            .unwrap()
    };
    let shim = Region::create(map(), &p).unwrap();
    let agent = Region::open(map()).unwrap();
    (shim, agent)
}

fn event(vcpu: u16, cpl: u16, payload: EventPayload) -> Event {
    let mut sregs = KvmSregs {
        cr3: U64::new(0x20_1000 + u64::from(vcpu) * 0x1000),
        ..Default::default()
    };
    sregs.cs.selector.set(0x08 | cpl);
    sregs.cs.dpl = cpl as u8;
    Event {
        common: EventCommon {
            vcpu,
            mode: CpuMode::Bits64,
            regs: KvmRegs {
                rip: U64::new(0x10_1000 + u64::from(vcpu)),
                ..Default::default()
            },
            sregs,
            msrs: EventMsrs::default(),
        },
        payload,
    }
}

/// The event of round `i` on `vcpu`, and the action the guard must answer.
fn scripted(vcpu: u16, i: u64) -> (Event, Action) {
    match i % 3 {
        0 => (
            event(vcpu, 0, EventPayload::Breakpoint { gpa: 0x10_1c50 }),
            Action::Continue,
        ),
        1 => {
            // A write (mode bit 1) to the protected task table, from user mode on odd rounds.
            let cpl = if i % 2 == 1 { 3 } else { 0 };
            let pf = EventPayload::PageFault {
                gva: 0x10_f000 + i,
                gpa: 0x10_f000 + i,
                mode: 2,
            };
            (
                event(vcpu, cpl, pf),
                if cpl == 3 {
                    Action::Skip
                } else {
                    Action::Continue
                },
            )
        }
        _ => (
            event(
                vcpu,
                0,
                EventPayload::Cr {
                    cr: 3,
                    old_value: 0x1000,
                    new_value: 0x2000 + i,
                },
            ),
            Action::Continue,
        ),
    }
}

#[derive(Serialize)]
struct Finding {
    finding: &'static str,
    vcpu: u32,
    seq: u32,
    gpa: u64,
}

/// Denies user-mode writes to protected pages and reports breakpoints.
#[derive(Default)]
struct Guard {
    breakpoints: u64,
    denied: u64,
}

impl EventHandler for Guard {
    fn on_breakpoint(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        gpa: u64,
    ) -> protocol::EventReply<'static> {
        self.breakpoints += 1;
        let (vcpu, seq) = (ctx.vcpu(), ctx.seq());
        ctx.emit(&Finding {
            finding: "breakpoint",
            vcpu,
            seq,
            gpa,
        });
        reply_with(event, Action::Continue)
    }

    fn on_page_fault(
        &mut self,
        ctx: &mut dyn EventContext,
        event: &Event,
        _gva: u64,
        gpa: u64,
        mode: u32,
    ) -> protocol::EventReply<'static> {
        let user = event.common.sregs.cs.selector.get() & 3 == 3;
        if user && mode & 2 != 0 {
            self.denied += 1;
            let (vcpu, seq) = (ctx.vcpu(), ctx.seq());
            ctx.emit(&Finding {
                finding: "write_denied",
                vcpu,
                seq,
                gpa,
            });
            return reply_with(event, Action::Skip);
        }
        reply_with(event, Action::Continue)
    }
}

/// The agent's command client on `region`'s command rings.
fn command_client(
    region: &Region<guest_driver::host::HostMemory>,
) -> CommandClient<guest_driver::host::HostMemory> {
    CommandClient::new(
        region.producer_for(RingKind::Command, NO_VCPU).unwrap(),
        region
            .consumer_for(RingKind::CommandReply, NO_VCPU)
            .unwrap(),
    )
}

fn waiting(waiter: ParkWaiter, notify: Unparker) -> Waiting<ParkWaiter, Unparker> {
    Waiting::new(WaitStrategy::default(), waiter, notify)
}

#[test]
fn agent_answers_every_event_serves_commands_and_logs_json_lines() {
    let (shim, agent_region) = regions();
    let (shim_waiter, shim_unparker) = park_pair(Duration::from_millis(20));
    let (tx, rx) = mpsc::channel();
    let total = ROUNDS * u64::from(VCPUS);
    let agent_thread = std::thread::spawn(move || {
        let (waiter, me) = park_pair(Duration::from_millis(20));
        tx.send(me).unwrap();
        let w = waiting(waiter, shim_unparker);
        // Two commands in flight; the shim answers them out of order.
        let mut client = command_client(&agent_region);
        let first = client.send(&Command::GetMapToken, &w).unwrap();
        let second = client.send(&Command::GetMapToken, &w).unwrap();
        let reply_first = client.wait_reply(first, &w).unwrap();
        let reply_second = client.wait_reply(second, &w).unwrap();
        let token_of = |r: &appliance::agent::OwnedReply| match r.decode().unwrap() {
            Ok(Reply::MapToken(t)) => t.0,
            other => panic!("{other:?}"),
        };
        let tokens = (token_of(&reply_first), token_of(&reply_second));
        let stray = client.stray_replies();

        let mut agent = Agent::new(&agent_region, Guard::default(), w).unwrap();
        let stats: AgentStats = agent.run(|s| s.events >= total).unwrap();
        agent.log().emit(&serde_json::json!({ "summary": stats }));
        agent.flush_log().unwrap();
        let guard = agent.handler();
        (stats, guard.breakpoints, guard.denied, tokens, stray)
    });
    let agent_unparker: Unparker = rx.recv().unwrap();
    let w = waiting(shim_waiter, agent_unparker);

    // Commands: read both, answer the second first, plus a reply nobody asked for.
    let mut commands = shim.consumer_for(RingKind::Command, NO_VCPU).unwrap();
    let mut command_replies = shim.producer_for(RingKind::CommandReply, NO_VCPU).unwrap();
    let mut buf = vec![0u8; 70_000];
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        let n = commands
            .pop_blocking(&mut buf, &w.strategy, &w.waiter, &w.notify)
            .unwrap();
        let frame = V4::parse_frame(&buf[..n]).unwrap();
        match V4::decode_tool_message(frame).unwrap() {
            ToolMessage::Command {
                seq,
                command: Command::GetMapToken,
            } => seqs.push(seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    commands.release_and_notify(&w.notify).unwrap();
    let mut out = vec![0u8; 256];
    for (seq, fill) in [(seqs[1], 0xbb), (seqs[1] + 100, 0xcc), (seqs[0], 0xaa)] {
        let token = Reply::MapToken(MapToken([fill; 32]));
        let n = V4::encode_reply(
            protocol::CommandKind::GetMapToken,
            seq,
            &Ok(token),
            &mut out,
        )
        .unwrap();
        command_replies.try_push(&out[..n]).unwrap();
    }
    command_replies.publish_and_notify(&w.notify).unwrap();

    // Events: a garbage record first, then ROUNDS rounds on every vCPU; every reply checked.
    let mut events: Vec<_> = (0..VCPUS)
        .map(|v| shim.producer_for(RingKind::Event, v).unwrap())
        .collect();
    let mut replies: Vec<_> = (0..VCPUS)
        .map(|v| shim.consumer_for(RingKind::EventReply, v).unwrap())
        .collect();
    events[0].try_push(b"not a kvmi message").unwrap();
    let mut seq = 1000u32;
    let mut checked = 0;
    let mut msg = vec![0u8; 1024];
    for i in 0..ROUNDS {
        let mut expected = Vec::new();
        for v in 0..VCPUS {
            let (ev, action) = scripted(v as u16, i);
            seq += 1;
            let n = V4::encode_event(seq, &ev, &mut msg).unwrap();
            events[v as usize].try_push(&msg[..n]).unwrap();
            events[v as usize].publish_and_notify(&w.notify).unwrap();
            expected.push((seq, ev, action));
        }
        for (v, (seq, ev, action)) in expected.into_iter().enumerate() {
            let n = replies[v]
                .pop_blocking(&mut buf, &w.strategy, &w.waiter, &w.notify)
                .unwrap();
            let frame = V4::parse_frame(&buf[..n]).unwrap();
            let ToolMessage::EventReply { seq: got, payload } =
                V4::decode_tool_message(frame).unwrap()
            else {
                panic!("not an event reply")
            };
            assert_eq!(got, seq);
            let reply = V4::decode_event_reply(ev.kind(), payload).unwrap();
            assert_eq!(reply.action, action, "round {i} vcpu {v}");
            if let EventPayload::Cr { new_value, .. } = ev.payload {
                assert_eq!(reply.data, EventReplyData::Cr { new_val: new_value });
            }
            checked += 1;
        }
    }
    assert_eq!(checked, total);
    for r in &mut replies {
        r.release_and_notify(&w.notify).unwrap();
    }

    let (stats, breakpoints, denied, tokens, stray) = agent_thread.join().unwrap();
    assert_eq!(
        tokens,
        ([0xaa; 32], [0xbb; 32]),
        "replies matched by seq, not arrival order"
    );
    assert_eq!(stray, 1);
    assert_eq!(stats.events, total);
    assert_eq!(stats.replies, total);
    assert_eq!(stats.bad_messages, 1);
    assert_eq!(stats.bad_replies, 0);
    let want_bp = (0..ROUNDS).filter(|i| i % 3 == 0).count() as u64 * u64::from(VCPUS);
    let want_denied =
        (0..ROUNDS).filter(|i| i % 3 == 1 && i % 2 == 1).count() as u64 * u64::from(VCPUS);
    assert_eq!((breakpoints, denied), (want_bp, want_denied));

    // The log ring: one JSON object per record, newline-terminated.
    let mut log = shim.consumer_for(RingKind::Log, NO_VCPU).unwrap();
    let mut lines: Vec<Value> = Vec::new();
    while let Some(n) = log.try_pop(&mut buf).unwrap() {
        assert_eq!(buf[n - 1], b'\n');
        lines.push(serde_json::from_slice(&buf[..n - 1]).unwrap());
    }
    let count = |what: &str| lines.iter().filter(|l| l["finding"] == what).count() as u64;
    assert_eq!(count("breakpoint"), want_bp);
    assert_eq!(count("write_denied"), want_denied);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["error"] == "undecodable event")
            .count(),
        1
    );
    let summary = lines.last().unwrap();
    assert_eq!(summary["summary"]["events"], total);
}

#[test]
fn a_corrupted_ring_stops_the_agent_with_an_error() {
    let (shim, agent_region) = regions();
    let (waiter, unparker) = park_pair(Duration::from_millis(5));
    let mut agent = Agent::new(&agent_region, Guard::default(), waiting(waiter, unparker)).unwrap();
    // The "shim" publishes a producer position that is not 8-aligned: hostile.
    let geometry = shim
        .geometry(shim.ring_index(RingKind::Event, 1).unwrap())
        .unwrap();
    use hypercall::ring::SharedMemory;
    shim.memory()
        .store(geometry.control, 12, std::sync::atomic::Ordering::Release)
        .unwrap();
    match agent.poll() {
        Err(appliance::agent::AgentError::Ring { vcpu: 1, source }) => {
            assert!(source.is_corruption())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_command_whose_target_goes_unanswered_is_abandoned_and_a_reply_still_wins() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (shim, agent_region) = regions();
    let (_shim_waiter, shim_unparker) = park_pair(Duration::from_millis(20));
    let (waiter, _me) = park_pair(Duration::from_millis(1));
    let w = waiting(waiter, shim_unparker);
    let mut client = command_client(&agent_region);
    let alive = Arc::new(AtomicBool::new(true));
    let asked = Arc::new(AtomicU64::new(0));
    let (a, n) = (alive.clone(), asked.clone());
    client.set_liveness(Box::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
        a.load(Ordering::SeqCst)
    }));
    // Nobody serves the command ring; the target "goes" after a while.
    let going = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        alive.store(false, Ordering::SeqCst);
    });
    let err = client.call(&Command::GetMapToken, &w).unwrap_err();
    going.join().unwrap();
    assert!(
        matches!(err, appliance::agent::CommandError::Abandoned),
        "{err:?}"
    );
    assert!(
        asked.load(Ordering::SeqCst) > 1,
        "it waited while the target held its slot"
    );
    // The command is still on the ring: the shim takes it now and answers it late. The late
    // reply is a stray (its seq is no longer waited for); a new command gets its own reply
    // even though the liveness check now says gone, because the reply is there first.
    let mut commands = shim.consumer_for(RingKind::Command, NO_VCPU).unwrap();
    let mut replies = shim.producer_for(RingKind::CommandReply, NO_VCPU).unwrap();
    let mut buf = vec![0u8; 4096];
    let answer = |commands: &mut hypercall::ring::Consumer<_>,
                  replies: &mut hypercall::ring::Producer<_>,
                  buf: &mut Vec<u8>| {
        let n = commands
            .try_pop(buf)
            .unwrap()
            .expect("a command on the ring");
        let frame = V4::parse_frame(&buf[..n]).unwrap();
        let mut reply = [0u8; 16];
        let len = V4::encode_error_reply(
            frame.header.id,
            frame.header.seq,
            protocol::ErrorCode::NoEnt,
            &mut reply,
        )
        .unwrap();
        replies.try_push(&reply[..len]).unwrap();
        replies.publish().unwrap();
    };
    answer(&mut commands, &mut replies, &mut buf);
    let seq = client.send(&Command::GetMapToken, &w).unwrap();
    answer(&mut commands, &mut replies, &mut buf);
    let reply = client.wait_reply(seq, &w).unwrap();
    assert_eq!(reply.seq, seq);
    assert_eq!(
        reply.decode().unwrap(),
        Err(protocol::ErrorCode::NoEnt),
        "the refusal a dead slot's responder sends"
    );
    assert_eq!(
        client.stray_replies(),
        1,
        "the late reply to the abandoned command"
    );
}
