//! The compiled policy: decoding untrusted JSON, target selection, and a guard driven by
//! rules other than the demo's (actions, accessors, string arguments, page sharing).

use appliance::agent::{EventContext, EventHandler, erased};
use appliance::guard::{Guard, GuardPlan, PAGES_PER_COMMAND, PauseRequest, TargetMemory};
use appliance::policy::{
    AccessBits, ArgKind, CompiledPolicy, Item, PolicyError, Problem, ProtectRule, Reg, TargetRules,
    TraceArg, TraceRule, Violation, Who, demo_rules,
};
use appliance::profile::Profile;
use protocol::event::{EventCommon, EventMsrs, EventPayload};
use protocol::kvm::{KvmRegs, KvmSregs};
use protocol::types::{Access, CpuMode};
use protocol::{Action, Command, Event, V4, WireProfile};
use serde_json::{Value, json};
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
    regs.rdi.set(0x1000);
    regs.rsi.set(100);
    regs.rdx.set(0x1_0000_0007);
    regs.rcx.set(0x2000);
    regs.r8.set(0x3000);
    Event {
        common: EventCommon {
            vcpu: 2,
            mode: CpuMode::Bits64,
            regs,
            sregs,
            msrs: EventMsrs::default(),
        },
        payload,
    }
}

fn pf(gpa: u64, mode: u32) -> EventPayload {
    EventPayload::PageFault {
        gva: u64::MAX,
        gpa,
        mode,
    }
}

fn rule(
    name: &str,
    start: u64,
    end: u64,
    allow: &str,
    from: Who,
    action: Violation,
) -> ProtectRule {
    ProtectRule {
        name: name.into(),
        start,
        end,
        allow: AccessBits::parse(allow).unwrap(),
        from,
        action,
    }
}

fn rules() -> TargetRules {
    TargetRules {
        profile: "demo-target".into(),
        targets: vec![],
        scan_ms: 50,
        protect: vec![
            rule(
                "deny",
                0x10_0000,
                0x10_1000,
                "rx",
                Who::Any,
                Violation::Deny,
            ),
            rule("log", 0x20_0000, 0x20_0800, "r", Who::User, Violation::Log),
            // Shares a page with "log": the page keeps only what both allow.
            rule(
                "pause",
                0x20_0800,
                0x20_1000,
                "rw",
                Who::Kernel,
                Violation::Pause,
            ),
            rule(
                "crash",
                0x30_0000,
                0x30_1000,
                "",
                Who::Any,
                Violation::Crash,
            ),
        ],
        trace: vec![TraceRule {
            function: "open".into(),
            addr: 0x40_0000,
            args: vec![
                TraceArg {
                    reg: Reg::Rdi,
                    name: "path".into(),
                    kind: ArgKind::CStr { max_len: 16 },
                },
                TraceArg {
                    reg: Reg::Rcx,
                    name: "buf".into(),
                    kind: ArgKind::Str {
                        len_reg: Reg::Rsi,
                        max_len: 4,
                    },
                },
                TraceArg {
                    reg: Reg::R8,
                    name: "missing".into(),
                    kind: ArgKind::CStr { max_len: 8 },
                },
                TraceArg {
                    reg: Reg::Rdx,
                    name: "flags".into(),
                    kind: ArgKind::U32,
                },
                TraceArg {
                    reg: Reg::Rdx,
                    name: "raw".into(),
                    kind: ArgKind::Int,
                },
            ],
        }],
    }
}

/// Target memory: "/etc/passwd\0" at 0x1000, "abcdefgh" at 0x2000, nothing elsewhere.
struct Fake;

impl TargetMemory for Fake {
    fn read_virt(&mut self, cr3: u64, gva: u64, buf: &mut [u8]) -> usize {
        assert_eq!(cr3, 0x20_3000);
        let data: &[u8] = match gva {
            0x1000 => b"/etc/passwd\0garbage-garbage",
            0x2000 => b"abcdefgh",
            _ => return 0,
        };
        let n = buf.len().min(data.len());
        buf[..n].copy_from_slice(&data[..n]);
        n
    }
}

#[test]
fn actions_accessors_and_shared_pages() {
    let plan = GuardPlan::from_rules(&rules()).unwrap();
    let access = |gpa: u64| plan.pages.iter().find(|p| p.gpa == gpa).unwrap().access;
    assert_eq!(plan.pages.len(), 3);
    assert_eq!(access(0x10_0000), Access::R.union(Access::X));
    assert_eq!(access(0x20_0000), Access::R);
    assert_eq!(access(0x30_0000), Access::NONE);
    assert_eq!(plan.breakpoints, vec![0x40_0000]);
    assert_eq!(plan.task_create, 0);

    let mut guard = Guard::new(plan);
    let mut lines = Lines(Vec::new());
    let cases = [
        (event(0, pf(0x10_0010, 2)), Action::Skip), // deny write, kernel too (any)
        (event(3, pf(0x10_0010, 4)), Action::Continue), // exec allowed: other
        (event(3, pf(0x20_0010, 2)), Action::Continue), // log (user)
        (event(0, pf(0x20_0010, 2)), Action::Continue), // log rule skips the kernel: exempt
        (event(0, pf(0x20_0810, 4)), Action::Skip), // pause (kernel exec)
        (event(0, pf(0x20_0820, 4)), Action::Skip), // pause again: first request kept
        (event(3, pf(0x30_0000, 1)), Action::Crash), // crash
    ];
    for (i, (ev, action)) in cases.iter().enumerate() {
        assert_eq!(guard.on_event(&mut lines, ev).action, *action, "case {i}");
    }
    let stats = guard.stats();
    assert_eq!(
        (
            stats.denied,
            stats.writes_denied,
            stats.logged,
            stats.paused,
            stats.crashed
        ),
        (1, 1, 1, 2, 1)
    );
    assert_eq!((stats.exempt, stats.kernel_writes, stats.other), (1, 1, 1));
    let findings: Vec<&str> = lines
        .0
        .iter()
        .map(|l| l["finding"].as_str().unwrap())
        .collect();
    assert_eq!(
        findings,
        [
            "write_denied",
            "access_logged",
            "paused_for_analysis",
            "paused_for_analysis",
            "target_crashed"
        ]
    );
    assert_eq!(lines.0[0]["action"], "deny");
    assert_eq!(lines.0[0]["access"], "w");
    assert_eq!(lines.0[0]["gva"], Value::Null);
    assert_eq!(lines.0[0]["range"], "deny");
    assert_eq!(lines.0[2]["range"], "pause");
    assert_eq!(lines.0[4]["access"], "r");
    assert_eq!(
        guard.take_pause_request(),
        Some(PauseRequest {
            rule: "pause".into(),
            vcpu: 2,
            gpa: 0x20_0810,
            rip: 0x8000_1234
        })
    );
    assert_eq!(guard.take_pause_request(), None);

    // Traced call: strings through the memory, numbers from registers.
    let mut lines = Lines(Vec::new());
    let bp = event(3, EventPayload::Breakpoint { gpa: 0x40_0000 });
    assert_eq!(
        guard.trace(&mut lines, &bp, 0x40_0000, &mut Fake).action,
        Action::Continue
    );
    let line = &lines.0[0];
    assert_eq!(line["finding"], "open");
    assert_eq!(line["vcpu"], 2);
    assert_eq!(line["cr3"], 0x20_3000);
    assert_eq!(line["path"], "/etc/passwd");
    assert_eq!(line["buf"], "abcd", "clamped to max_len");
    assert_eq!(line["missing"], Value::Null);
    assert_eq!(line["flags"], 7);
    assert_eq!(line["raw"], 0x1_0000_0007u64);
    assert_eq!(guard.stats().traced, 1);
    assert_eq!(guard.stats().tasks_created, 0);
}

#[test]
fn big_ranges_split_into_several_set_page_access() {
    let mut r = rules();
    r.protect = vec![rule("big", 0, 16 << 20, "rx", Who::User, Violation::Deny)];
    r.trace.clear();
    let plan = GuardPlan::from_rules(&r).unwrap();
    assert_eq!(plan.pages.len(), 4096);
    let commands = plan.setup_commands(1);
    assert_eq!(commands.len(), 1 + 4096 / PAGES_PER_COMMAND);
    let mut buf = vec![0u8; V4::MAX_MSG_SIZE];
    for command in &commands {
        V4::encode_command(1, command, &mut buf).unwrap();
    }
    assert!(matches!(commands[0], Command::ControlEvents { events, .. }
        if events.contains(protocol::EventKind::PageFault)
            && !events.contains(protocol::EventKind::Breakpoint)));
}

#[test]
fn the_demo_rules_round_trip_and_select_targets() {
    let profile = Profile::from_json(FIXTURE).unwrap();
    let demo = demo_rules(&profile).unwrap();
    let mut web = rules();
    web.targets = vec!["web-1".into()];
    let policy = CompiledPolicy {
        format: 1,
        guards: vec![demo.clone(), web.clone()],
    };
    let json = policy.to_json();
    let back = CompiledPolicy::from_json(&json).unwrap();
    assert_eq!(back, policy);
    assert_eq!(back.for_target("web-1", "demo-target"), Some(&web));
    assert_eq!(back.for_target("web-2", "demo-target"), Some(&demo));
    assert_eq!(back.for_target("db", "other-image"), None);
    let value: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(value["guards"][0]["protect"][0]["allow"], "rx");
    assert_eq!(
        value["guards"][0]["trace"][0]["args"][3]["kind"]["str"]["len_reg"],
        "rsi"
    );
}

fn refused(json: Value) -> PolicyError {
    CompiledPolicy::from_json(json.to_string().as_bytes()).unwrap_err()
}

fn invalid(json: Value) -> (String, Problem) {
    match refused(json) {
        PolicyError::Invalid { at, problem } => (at.to_string(), problem),
        other => panic!("not Invalid: {other}"),
    }
}

#[test]
fn hostile_compiled_policies_are_refused_with_typed_errors() {
    let profile = Profile::from_json(FIXTURE).unwrap();
    let good = serde_json::to_value(CompiledPolicy {
        format: 1,
        guards: vec![demo_rules(&profile).unwrap()],
    })
    .unwrap();
    let with = |path: &str, value: Value| {
        let mut json = good.clone();
        *json.pointer_mut(path).unwrap() = value;
        json
    };
    assert!(CompiledPolicy::from_json(good.to_string().as_bytes()).is_ok());
    assert!(matches!(
        refused(with("/format", json!(2))),
        PolicyError::Format(2)
    ));
    assert!(matches!(
        refused(json!({"format": 1})),
        PolicyError::Json(_)
    ));
    let mut unknown = good.clone();
    unknown["guards"][0]["protect"][0]["evil"] = json!(1);
    assert!(matches!(refused(unknown), PolicyError::Json(_)));
    assert!(matches!(
        refused(with("/guards/0/protect/0/allow", json!("rwz"))),
        PolicyError::Json(_)
    ));
    assert!(matches!(
        refused(with("/guards/0/trace/0/args/0/reg", json!("rip"))),
        PolicyError::Json(_)
    ));
    assert!(matches!(
        CompiledPolicy::from_json(&vec![b' '; (1 << 20) + 1]),
        Err(PolicyError::TooLarge(_))
    ));
    assert_eq!(
        invalid(with("/guards", json!([]))),
        ("guards".into(), Problem::NoGuards)
    );
    assert_eq!(
        invalid(with("/guards/0/protect/1/end", json!(1110016))),
        ("guards[0].protect[1].end".into(), Problem::EmptyRange)
    );
    assert_eq!(
        invalid(with("/guards/0/protect/1/end", json!(0))),
        ("guards[0].protect[1].end".into(), Problem::InvertedRange)
    );
    assert_eq!(
        invalid(with(
            "/guards/0/protect/0/end",
            json!(1048576u64 + (16 << 20) + 1)
        ))
        .1,
        Problem::RangeTooLarge {
            bytes: (16 << 20) + 1
        }
    );
    assert_eq!(
        invalid(with("/guards/0/protect/0/start", json!(1u64 << 60))).1,
        Problem::AddressTooHigh(1 << 60)
    );
    assert_eq!(
        invalid(with("/guards/0/protect/0/allow", json!("rwx"))),
        ("guards[0].protect[0].allow".into(), Problem::DeniesNothing)
    );
    assert!(matches!(
        invalid(with("/guards/0/protect/0/allow", json!("w"))).1,
        Problem::WriteWithoutRead(_)
    ));
    let many: Vec<Value> = (0..65)
        .map(|i| {
            json!({"name": format!("r{i}"), "start": i * 4096, "end": i * 4096 + 1,
                        "allow": "r", "from": "any", "action": "log"})
        })
        .collect();
    assert_eq!(
        invalid(with("/guards/0/protect", Value::Array(many))),
        ("guards[0].protect".into(), Problem::TooMany { max: 64 })
    );
    assert_eq!(
        invalid(with(
            "/guards/0/trace/0/args/3/kind/str/max_len",
            json!(257)
        )),
        (
            "guards[0].trace[0].args[3].max_len".into(),
            Problem::MaxLen(257)
        )
    );
    assert_eq!(
        invalid(with("/guards/0/trace/0/args/3/kind/str/max_len", json!(0))).1,
        Problem::MaxLen(0)
    );
    assert_eq!(
        invalid(with("/guards/0/trace/0/args/1/name", json!("vcpu"))).1,
        Problem::ReservedName("vcpu".into())
    );
    assert_eq!(
        invalid(with("/guards/0/trace/0/args/1/name", json!("name_ptr"))).1,
        Problem::Duplicate("name_ptr".into())
    );
    assert_eq!(
        invalid(with("/guards/0/trace/0/args/1/name", json!("a\"b"))).1,
        Problem::BadArgName("a\"b".into())
    );
    assert_eq!(
        invalid(with("/guards/0/protect/1/name", json!("kernel_text"))).1,
        Problem::Duplicate("kernel_text".into())
    );
    assert_eq!(
        invalid(with("/guards/0/scan_ms", json!(0))),
        ("guards[0].scan_ms".into(), Problem::ScanMs(0))
    );
    assert_eq!(
        invalid(with("/guards/0/scan_ms", json!(60001))).1,
        Problem::ScanMs(60001)
    );
    let twice = with("/guards", json!([good["guards"][0], good["guards"][0]]));
    assert!(matches!(invalid(twice).1, Problem::Shadowed(_)));
    // A plan refuses bad rules too (they may be built by hand).
    let mut bad = rules();
    bad.protect[0].end = bad.protect[0].start;
    let Err(PolicyError::Invalid { at, .. }) = GuardPlan::from_rules(&bad) else {
        panic!()
    };
    assert_eq!(at.item, Some(Item::Protect(0)));
    assert_eq!(at.to_string(), "protect[0].end");
}
