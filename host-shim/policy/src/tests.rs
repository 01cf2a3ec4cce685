use std::path::Path;

use appliance::guard::GuardPlan;
use appliance::policy::{CompiledPolicy, Problem, demo_rules};
use appliance::profile::Profile;

use super::*;

const FIXTURE: &[u8] = include_bytes!("../../../appliance/tests/fixtures/demo-target.profile.json");
const DEMO: &str = include_str!("../../../policies/demo.toml");

fn profiles(name: &str) -> Option<Profile> {
    (name == "demo-target").then(|| Profile::from_json(FIXTURE).unwrap())
}

fn toml(text: &str) -> Result<CompiledPolicy, PolicyError> {
    compile_named("demo.toml", text, Format::Toml, &profiles)
}

fn json(text: &str) -> Result<CompiledPolicy, PolicyError> {
    compile_named("demo.json", text, Format::Json, &profiles)
}

/// The error's line and field, checked against its Display.
fn error_at(result: Result<CompiledPolicy, PolicyError>) -> (usize, String, ErrorKind) {
    let err = result.expect_err("the policy should be refused");
    let text = err.to_string();
    let PolicyError::At {
        file,
        line,
        column,
        field,
        kind,
    } = err
    else {
        panic!("not an At error: {text}")
    };
    let prefix = match column {
        Some(c) => format!("{file}:{line}:{c}: {field}: "),
        None => format!("{file}:{line}: {field}: "),
    };
    assert!(text.starts_with(&prefix), "{text}");
    (line, field, *kind)
}

#[test]
fn the_demo_policy_gives_todays_plan() {
    let policy = load(Path::new("../../policies/demo.toml"), &profiles).unwrap();
    let profile = profiles("demo-target").unwrap();
    assert_eq!(policy.guards, vec![demo_rules(&profile).unwrap()]);
    let rules = policy.for_target("demo", "demo-target").unwrap();
    let plan = GuardPlan::from_rules(rules).unwrap();
    assert_eq!(plan, GuardPlan::from_profile(&profile).unwrap());
    // kernel_text [0x100000, 0x107000): 7 pages; task_table [0x10f000, 0x110000): 1 page.
    let gpas: Vec<u64> = plan.pages.iter().map(|p| p.gpa).collect();
    let mut expected: Vec<u64> = (0x100..0x107).map(|p| p * 4096).collect();
    expected.push(0x10f000);
    assert_eq!(gpas, expected);
    assert!(plan.pages.iter().all(|p| p.access.bits() == 0b101));
    assert_eq!(plan.breakpoints, vec![1054544]);
    assert_eq!(plan.task_create, 1054544);
    assert_eq!(rules.scan_ms, 50);
    assert_eq!(plan.setup_commands(2).len(), 4);
}

#[test]
fn json_policies_compile_the_same_and_round_trip() {
    let text = r#"{
  "format": 1,
  "guard": [{
    "profile": "demo-target",
    "scan_ms": 50,
    "protect": [
      { "range": "kernel_text", "allow": "rx", "from": "user", "on_violation": "deny" },
      { "start": "0x10f000", "end": 1114112, "name": "task_table", "allow": "rx", "from": "user" }
    ],
    "trace": [{ "function": "task_create", "args": [
      { "reg": "rdi", "name": "name_ptr", "type": "pointer" },
      { "reg": "rsi", "name": "name_len", "type": "int" },
      { "reg": "rdx", "name": "parent", "type": "u32" },
      { "reg": "rdi", "name": "name", "type": "str", "len_reg": "rsi", "max_len": 32 }
    ] }]
  }]
}"#;
    let policy = json(text).unwrap();
    assert_eq!(policy, toml(DEMO).unwrap());
    let bytes = policy.to_json();
    assert_eq!(CompiledPolicy::from_json(&bytes).unwrap(), policy);
}

#[test]
fn symbols_addresses_defaults_and_targets() {
    let policy = toml(
        r#"
format = 1
[[guard]]
profile = "demo-target"
targets = ["web-1"]
[[guard.protect]]
symbol = "secret_buffer"
size = 0x1000
allow = "none"
on_violation = "pause"
[[guard.protect]]
start = 0x200000
end = 0x200010
allow = "r"
from = "kernel"
on_violation = "log"
[[guard.trace]]
function = "my_hook"
addr = 0x10_0040
args = [{ reg = "r9", name = "path", type = "cstr" }]
"#,
    )
    .unwrap();
    let rules = &policy.guards[0];
    assert_eq!(rules.targets, ["web-1"]);
    assert_eq!(rules.scan_ms, DEFAULT_SCAN_MS);
    assert_eq!(rules.protect[0].name, "secret_buffer");
    assert_eq!(
        (rules.protect[0].start, rules.protect[0].end),
        (1089536, 1093632)
    );
    assert_eq!(rules.protect[0].from, Who::Any);
    assert_eq!(rules.protect[0].action, Violation::Pause);
    assert_eq!(rules.protect[1].name, "0x200000-0x200010");
    assert_eq!(rules.trace[0].addr, 0x10_0040);
    assert_eq!(
        rules.trace[0].args[0].kind,
        ArgKind::CStr {
            max_len: DEFAULT_MAX_LEN as u32
        }
    );
    assert!(policy.for_target("web-2", "demo-target").is_none());
}

/// Replaces the first `from` in the demo policy with `to`.
fn demo_with(from: &str, to: &str) -> String {
    assert!(DEMO.contains(from), "{from}");
    DEMO.replacen(from, to, 1)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn malformed_policies_name_the_line_and_field() {
    let cases: Vec<(String, &str, &str, &str)> = vec![
        // (policy, line containing, field, message contains)
        (
            demo_with("on_violation = \"deny\"", "on_violation = \"deni\""),
            "\"deni\"",
            "guard[0].protect[0].on_violation",
            "unknown value \"deni\" (expected deny, log, pause or crash)",
        ),
        (
            demo_with("range = \"kernel_text\"", "range = \"kernel_txt\""),
            "kernel_txt",
            "guard[0].protect[0].range",
            "profile demo-target has no range \"kernel_txt\"",
        ),
        (
            demo_with(
                "range = \"task_table\"",
                "range = \"task_table\"\nalow = \"r\"",
            ),
            "alow",
            "guard[0].protect[1].alow",
            "unknown key \"alow\"",
        ),
        (
            demo_with("profile = \"demo-target\"", "profile = \"demo\""),
            "profile = \"demo\"",
            "guard[0].profile",
            "no profile \"demo\"",
        ),
        (
            demo_with("function = \"task_create\"", "function = \"task_make\""),
            "task_make",
            "guard[0].trace[0].function",
            "profile demo-target has no symbol \"task_make\"",
        ),
        (
            demo_with(
                "allow = \"rx\"\nfrom = \"user\"",
                "allow = \"rwx\"\nfrom = \"user\"",
            ),
            "rwx",
            "guard[0].protect[0].allow",
            "denies nothing",
        ),
        (
            demo_with("allow = \"rx\"", "allow = \"rq\""),
            "rq",
            "guard[0].protect[0].allow",
            "unknown value \"rq\"",
        ),
        (
            demo_with("reg = \"rdx\"", "reg = \"edx\""),
            "edx",
            "guard[0].trace[0].args[2].reg",
            "unknown value \"edx\"",
        ),
        (
            demo_with("max_len = 32", "max_len = 300"),
            "max_len = 300",
            "guard[0].trace[0].args[3].max_len",
            "max_len 300 is outside 1..=256",
        ),
        (
            demo_with("scan_ms = 50", "scan_ms = 0"),
            "scan_ms = 0",
            "guard[0].scan_ms",
            "scan_ms 0 is outside 1..=60000",
        ),
        (
            demo_with("scan_ms = 50", "scan_ms = 60001"),
            "scan_ms = 60001",
            "guard[0].scan_ms",
            "outside",
        ),
        (
            demo_with("type = \"u32\"", "type = \"u16\""),
            "u16",
            "guard[0].trace[0].args[2].type",
            "unknown value \"u16\" (expected int, u32, pointer, cstr or str)",
        ),
        (
            demo_with("range = \"task_table\"", "start = 0x10f000\nend = 0x10f000"),
            "end = 0x10f000",
            "guard[0].protect[1].end",
            "the range is empty",
        ),
        (
            demo_with("range = \"task_table\"", "start = 0x10f000\nend = 0x10e000"),
            "end = 0x10e000",
            "guard[0].protect[1].end",
            "ends before it starts",
        ),
        (
            demo_with("range = \"task_table\"", "start = 0\nend = 0x1000001"),
            "end = 0x1000001",
            "guard[0].protect[1].end",
            "more than 16 MiB",
        ),
        (
            demo_with(
                "range = \"task_table\"",
                "range = \"task_table\"\nsymbol = \"task_table\"",
            ),
            "[[guard.protect]]",
            "guard[0].protect[1]",
            "give exactly one of",
        ),
        (
            demo_with("name = \"parent\"", "name = \"vcpu\""),
            "name = \"vcpu\"",
            "guard[0].trace[0].args[2].name",
            "taken by every trace line",
        ),
        (
            demo_with("from = \"user\"", "from = 3"),
            "from = 3",
            "guard[0].protect[0].from",
            "invalid type",
        ),
        (
            demo_with(", len_reg = \"rsi\"", ""),
            "type = \"str\"",
            "guard[0].trace[0].args[3].len_reg",
            "needs len_reg",
        ),
        (
            demo_with("format = 1", "format = 2"),
            "format = 2",
            "format",
            "unsupported format 2",
        ),
        (
            demo_with("allow = \"rx\"\nfrom = \"user\"", "from = \"user\""),
            "[[guard.protect]]",
            "guard[0].protect[0].allow",
            "missing key \"allow\"",
        ),
        (
            "format = 1\n".to_string(),
            "format = 1",
            "guard",
            "the policy has no guard",
        ),
    ];
    let mut wrong = Vec::new();
    for (text, needle, field, message) in cases {
        let err = toml(&text).unwrap_err();
        let shown = err.to_string();
        let (line, got_field, kind) = error_at(Err(err));
        let want_line = if needle == "[[guard.protect]]" {
            // The protect table: its header.
            let n = if field.contains("protect[0]") { 0 } else { 1 };
            text.lines()
                .enumerate()
                .filter(|(_, l)| l.contains(needle))
                .nth(n)
                .unwrap()
                .0
                + 1
        } else {
            line_of(&text, needle)
        };
        if got_field != field || line != want_line || !kind.to_string().contains(message) {
            wrong.push(format!(
                "want {want_line}: {field}: {message}\n got {shown}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn syntax_errors_have_line_and_column() {
    let text = demo_with("scan_ms = 50", "scan_ms = = 50");
    let (line, field, kind) = error_at(toml(&text));
    assert_eq!(line, line_of(&text, "scan_ms = = 50"));
    assert!(matches!(kind, ErrorKind::Syntax(_)), "{kind}");
    assert!(field.starts_with("guard"), "{field}");

    let (line, _, kind) = error_at(json("{\n  \"format\": 1,\n  \"guard\": [ }\n"));
    assert_eq!(line, 3);
    assert!(matches!(kind, ErrorKind::Syntax(_)));

    let text = "{\n  \"format\": 1,\n  \"guard\": [{\n    \"profile\": \"demo-target\",\n    \"scan\": 5\n  }]\n}";
    let (line, field, kind) = error_at(json(text));
    assert_eq!((line, field.as_str()), (5, "guard[0].scan"));
    assert!(matches!(kind, ErrorKind::UnknownKey { .. }), "{kind}");

    let text = "{\n  \"format\": 1,\n  \"guard\": [{\n    \"profile\": \"demo-target\",\n    \"protect\": [{\"range\": \"kernel_text\", \"allow\": \"rx\",\n      \"on_violation\": \"nope\"}]\n  }]\n}";
    let (line, field, _) = error_at(json(text));
    assert_eq!(
        (line, field.as_str()),
        (6, "guard[0].protect[0].on_violation")
    );

    let text = "{\"format\": 1, \"guard\": [{\"scan_ms\": 5}]}";
    let (_, field, kind) = error_at(json(text));
    assert_eq!(field, "guard[0].profile");
    assert_eq!(kind, ErrorKind::MissingKey("profile".into()));
}

#[test]
fn files_are_read_by_extension() {
    let err = load(Path::new("policy.yaml"), &profiles).unwrap_err();
    assert!(matches!(err, PolicyError::FileType { .. }));
    let err = load(Path::new("/nonexistent/policy.toml"), &profiles).unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/policy.toml: "),
        "{err}"
    );
}

#[test]
fn hostile_compiled_policies_are_refused() {
    let good = toml(DEMO).unwrap().to_json();
    let text = String::from_utf8(good).unwrap();
    let bad = [
        text.replace("\"allow\":\"rx\"", "\"allow\":\"rwx\""),
        text.replace("\"max_len\":32", "\"max_len\":100000"),
        text.replace("\"from\":\"user\"", "\"from\":\"root\""),
        text.replace("\"format\":1", "\"format\":7"),
        text.replace("\"scan_ms\":50", "\"scan_ms\":50,\"extra\":1"),
        text.replace("\"end\":1114112", "\"end\":1"),
    ];
    for (i, b) in bad.iter().enumerate() {
        assert_ne!(b, &text, "case {i}");
        assert!(CompiledPolicy::from_json(b.as_bytes()).is_err(), "case {i}");
    }
    assert!(matches!(
        CompiledPolicy::from_json(
            text.replace("\"allow\":\"rx\"", "\"allow\":\"rwx\"")
                .as_bytes()
        ),
        Err(appliance::policy::PolicyError::Invalid {
            problem: Problem::DeniesNothing,
            ..
        })
    ));
}
