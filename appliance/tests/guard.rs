//! The guard's plan from the real demo-target profile, and its decisions on events.

use appliance::agent::{EventContext, EventHandler, erased};
use appliance::guard::{Guard, GuardPlan};
use appliance::profile::Profile;
use protocol::event::{EventCommon, EventMsrs, EventPayload};
use protocol::kvm::{KvmRegs, KvmSregs};
use protocol::types::{Access, CpuMode};
use protocol::{Action, Command, Event, ToolMessage, V4, WireProfile};
use serde_json::Value;
use zerocopy::little_endian::U64;

const FIXTURE: &[u8] = include_bytes!("fixtures/demo-target.profile.json");

struct Lines(Vec<Value>);

impl EventContext for Lines {
    fn vcpu(&self) -> u32 {
        0
    }
    fn seq(&self) -> u32 {
        1
    }
    fn emit(&mut self, value: &dyn erased::Json) -> bool {
        self.0
            .push(serde_json::from_slice(&value.to_json().unwrap()).unwrap());
        true
    }
}

fn event(cpl: u16, payload: EventPayload) -> Event {
    let mut sregs = KvmSregs {
        cr3: U64::new(0x20_3000),
        ..Default::default()
    };
    sregs.cs.selector.set(if cpl == 3 { 0x1b } else { 0x08 });
    let mut regs = KvmRegs {
        rip: U64::new(0x8000_1234),
        ..Default::default()
    };
    regs.rdi.set(0x11_2233);
    regs.rsi.set(8);
    regs.rdx.set(1);
    Event {
        common: EventCommon {
            vcpu: 1,
            mode: CpuMode::Bits64,
            regs,
            sregs,
            msrs: EventMsrs::default(),
        },
        payload,
    }
}

#[test]
fn plan_comes_from_the_profile_and_encodes_as_commands() {
    let raw: Value = serde_json::from_slice(FIXTURE).unwrap();
    let profile = Profile::from_json(FIXTURE).unwrap();
    let plan = GuardPlan::from_profile(&profile).unwrap();
    let text = &raw["ranges"]["kernel_text"];
    let table = &raw["ranges"]["task_table"];
    let pages = |r: &Value| {
        (r["end"].as_u64().unwrap().div_ceil(4096) - r["start"].as_u64().unwrap() / 4096) as usize
    };
    assert_eq!(plan.pages.len(), pages(text) + pages(table));
    assert!(
        plan.pages
            .iter()
            .all(|p| p.access.contains(Access::R) && !p.access.contains(Access::W))
    );
    assert_eq!(plan.pages[0].gpa, text["start"].as_u64().unwrap() & !0xfff);
    assert_eq!(
        plan.task_create,
        raw["symbols"]["task_create"].as_u64().unwrap()
    );
    let commands = plan.setup_commands(2);
    assert_eq!(commands.len(), 4);
    let mut buf = vec![0u8; 4096];
    for command in &commands {
        let n = V4::encode_command(9, command, &mut buf).unwrap();
        let frame = V4::parse_frame(&buf[..n]).unwrap();
        let ToolMessage::Command {
            command: decoded, ..
        } = V4::decode_tool_message(frame).unwrap()
        else {
            panic!()
        };
        assert_eq!(&decoded, command);
    }
    assert!(matches!(
        commands[3],
        Command::ControlBreakpoint { enable: true, .. }
    ));

    let mut json: Value = serde_json::from_slice(FIXTURE).unwrap();
    json["ranges"].as_object_mut().unwrap().remove("task_table");
    let broken = Profile::from_json(json.to_string().as_bytes()).unwrap();
    assert!(GuardPlan::from_profile(&broken).is_err());
}

#[test]
fn user_writes_to_protected_pages_are_skipped_and_reported() {
    let profile = Profile::from_json(FIXTURE).unwrap();
    let plan = GuardPlan::from_profile(&profile).unwrap();
    let table = profile.range("task_table").unwrap().start;
    let text = profile.range("kernel_text").unwrap().start;
    let task_create = plan.task_create;
    let mut guard = Guard::new(plan);
    let mut lines = Lines(Vec::new());
    let pf = |gpa: u64, mode: u32| EventPayload::PageFault {
        gva: gpa,
        gpa,
        mode,
    };
    let cases = [
        (event(3, pf(table + 0x58, 2)), Action::Skip),
        (event(3, pf(text + 0x10, 2)), Action::Skip),
        (event(0, pf(table + 0x58, 2)), Action::Continue),
        (event(3, pf(table + 0x58, 1)), Action::Continue),
        (event(3, pf(0x80_0000, 2)), Action::Continue),
        (
            event(0, EventPayload::Breakpoint { gpa: task_create }),
            Action::Continue,
        ),
        (
            event(0, EventPayload::Breakpoint { gpa: 0x1234 }),
            Action::Continue,
        ),
    ];
    let mut out = vec![0u8; 1024];
    for (i, (ev, action)) in cases.iter().enumerate() {
        let reply = guard.on_event(&mut lines, ev);
        assert_eq!(reply.action, *action, "case {i}");
        V4::encode_event_reply(1, &reply, &mut out).unwrap();
    }
    let stats = guard.stats();
    assert_eq!(
        (
            stats.writes_denied,
            stats.kernel_writes,
            stats.tasks_created,
            stats.other
        ),
        (2, 1, 1, 3)
    );
    assert_eq!(lines.0.len(), 3);
    assert_eq!(lines.0[0]["finding"], "write_denied");
    assert_eq!(lines.0[0]["range"], "task_table");
    assert_eq!(lines.0[0]["gpa"], table + 0x58);
    assert_eq!(lines.0[1]["range"], "kernel_text");
    assert_eq!(lines.0[2]["finding"], "task_create");
    assert_eq!(lines.0[2]["name_len"], 8);
    assert_eq!(lines.0[2]["parent"], 1);
}
