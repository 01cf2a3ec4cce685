//! Aggregate event throughput of one appliance VM guarding N targets
//! (`kvmi appliance-bench --targets N --vcpus M`), against the sum of the same targets' raw
//! exit floors measured in the same run.
//!
//! Every target runs test-guest `mode=mem-write-all n=K gate=1` on M vCPUs: each vCPU writes
//! K words of the scratch page, which the appliance's policy write-protects (kernel writes let
//! through: CONTINUE, no finding line), so every write is one event round trip through the
//! target's rings to the agent in the appliance VM, which serves all targets in turn
//! (`images/appliance/src/fleet.rs`).
//!
//! - **floor**: each target alone, its write exits taken and dropped by an in-process hook
//!   (no introspection), in turn; a target's rate is its exits over the time from its first to
//!   its last; the floor of the fleet is the sum of the targets' rates.
//! - **fleet**: all targets at once, gates opened together once every target's guard is in
//!   place; each target's exits are timed before its introspector sees them. The aggregate is
//!   all events over the time from the first to the last; each target's **share** is its rate
//!   over the sum of the rates (even: 1/N).
//! - **loss**: every target must see exactly M·K exits, and the agent's final summary for it
//!   must count M·K events and as many replies; the shim's own count of replies must agree.
//! - **fairness**: the most events of other targets the agent answered while one event of a
//!   target waited for its reply (`appliance_link`'s `max_others_waited`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance_link::fleet::{Fleet, FleetConfig, MAX_SLOT_WINDOW};
use appliance_link::launch::ApplianceConfig;
use appliance_link::rings::DEFAULT_FULL_TIMEOUT;
use hypercall::ring::RingSizes;
use kvmi_engine::{Introspector, IntrospectorConfig};
use serde_json::Value;
use vmm::devices::{SerialSink, UnknownIoPolicy};
use vmm::vm::{RunLimits, Vm, VmConfig};

use super::events::{EventBenchError, fail};
use super::vms::{self, TimingHook};

/// The policy of the benchmark: test-guest's scratch page read+execute only for user code;
/// the guest's kernel-mode writes are let through (CONTINUE) without a finding.
pub const BENCH_POLICY: &str = r#"format = 1
[[guard]]
profile = "test-guest"
[[guard.protect]]
symbol = "scratch_page"
size = 4096
allow = "rx"
from = "user"
on_violation = "deny"
"#;

/// [`BENCH_POLICY`] compiled against test-guest's `profile` (its JSON, as `kvmi profile`
/// prints it): the bytes the appliance receives.
pub fn bench_policy(profile: &str) -> Result<Vec<u8>, kvmi_policy::PolicyError> {
    let compiled = kvmi_policy::compile_named(
        "bench policy",
        BENCH_POLICY,
        kvmi_policy::Format::Toml,
        &|name| {
            (name == "test-guest")
                .then(|| appliance::profile::Profile::from_json(profile.as_bytes()).ok())
                .flatten()
        },
    )?;
    Ok(compiled.to_json())
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct FleetFigures {
    /// Targets.
    pub targets: u32,
    /// vCPUs per target.
    pub vcpus: u32,
    /// Events per target (vCPUs × writes per vCPU).
    pub events_per_target: u64,
    /// Each target's floor, events per second, measured alone.
    pub floors: Vec<f64>,
    /// Each target's rate in the fleet, events per second.
    pub rates: Vec<f64>,
    /// All targets' events over the fleet's run time, per second.
    pub aggregate: f64,
    /// Events the agent counted per target (its final summaries: the writes and one
    /// CREATE_VCPU per vCPU).
    pub answered: Vec<u64>,
    /// Replies the shim received per target.
    pub replies: Vec<u64>,
    /// Per target, by the shim: the most other targets' events answered while one of its
    /// events waited for its reply to be collected (this includes the time the waiting vCPU
    /// thread spent descheduled: on a host with fewer cores than busy threads it is the
    /// host's scheduling as much as the agent's).
    pub max_others_waited: Vec<u64>,
    /// Per target, by the agent: the most other targets' events it handled between two
    /// turns of this target that found events waiting (its bound: 16 per other target).
    pub max_others_between_turns: Vec<u64>,
}

impl FleetFigures {
    /// The sum of the floors.
    pub fn floor_sum(&self) -> f64 {
        self.floors.iter().sum()
    }

    /// Aggregate ÷ the sum of the floors.
    pub fn ratio(&self) -> f64 {
        self.aggregate / self.floor_sum().max(1e-9)
    }

    /// Each target's share of the fleet's rate ÷ the even share (1.0 = perfectly even).
    pub fn shares(&self) -> Vec<f64> {
        let sum: f64 = self.rates.iter().sum();
        let even = sum / self.rates.len().max(1) as f64;
        self.rates.iter().map(|r| r / even.max(1e-9)).collect()
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "fleet: {} targets x {} vCPUs, {} events each (agent in the appliance VM):\n\
             \x20 sum of the floors        {:>10.0} events/s\n\
             \x20 aggregate through rings  {:>10.0} events/s   {:.2}x the floors\n",
            self.targets,
            self.vcpus,
            self.events_per_target,
            self.floor_sum(),
            self.aggregate,
            self.ratio()
        );
        for (i, share) in self.shares().iter().enumerate() {
            out.push_str(&format!(
                "  target {}: floor {:>8.0}/s, in the fleet {:>8.0}/s, share {:.2}x even, \
                 answered {}/{} (with CREATE_VCPU); others' events between its turns at most \
                 {} (agent), while one of its events waited at most {} (shim)\n",
                i + 1,
                self.floors[i],
                self.rates[i],
                share,
                self.answered[i],
                self.events_per_target + u64::from(self.vcpus),
                self.max_others_between_turns[i],
                self.max_others_waited[i]
            ));
        }
        out
    }

    /// One JSON object.
    pub fn json_line(&self) -> String {
        serde_json::json!({
            "fleet": {
                "targets": self.targets,
                "vcpus": self.vcpus,
                "events_per_target": self.events_per_target,
                "floors": self.floors,
                "floor_sum": self.floor_sum(),
                "rates": self.rates,
                "aggregate": self.aggregate,
                "ratio": self.ratio(),
                "shares": self.shares(),
                "answered": self.answered,
                "replies": self.replies,
                "max_others_waited": self.max_others_waited,
                "max_others_between_turns": self.max_others_between_turns,
            }
        })
        .to_string()
    }
}

fn target_vm(image: &[u8], vcpus: u32, writes: u64, name: &str) -> Result<Vm, EventBenchError> {
    let config = VmConfig {
        name: name.into(),
        memory_bytes: 64 << 20,
        vcpus,
        cmdline: format!("mode=mem-write-all n={writes} gate=1"),
        unknown_io: UnknownIoPolicy::Ignore,
    };
    let mut vm = Vm::new(config, image).map_err(|e| fail("target")(e.to_string()))?;
    vm.set_serial(SerialSink::Null);
    Ok(vm)
}

const LIMITS: RunLimits = RunLimits {
    timeout: Some(Duration::from_secs(300)),
    interrupt: None,
};

/// Events per second from exit times: count over first-to-last.
fn rate(times: &[Instant]) -> f64 {
    match (times.first(), times.last()) {
        (Some(a), Some(b)) if times.len() > 1 => {
            (times.len() - 1) as f64 / (*b - *a).as_secs_f64().max(1e-9)
        }
        _ => 0.0,
    }
}

/// One target alone, its writes dropped by the VMM: its exit times.
fn floor(
    image: &[u8],
    vcpus: u32,
    writes: u64,
    page: u64,
    gate: u64,
) -> Result<Vec<Instant>, EventBenchError> {
    let vm = target_vm(image, vcpus, writes, "fleet-floor")?;
    vms::floor_times(vm, page, gate, LIMITS).map_err(EventBenchError)
}

/// The JSON lines of the log ring whose `finding` is `kind`, by target id.
fn lines_of(lines: &Mutex<Vec<String>>, kind: &str) -> Vec<Value> {
    lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["finding"] == kind)
        .collect()
}

/// The shape of a run.
#[derive(Clone, Copy, Debug)]
pub struct FleetShape {
    /// Targets (1..=8).
    pub targets: u32,
    /// vCPUs per target.
    pub vcpus: u32,
    /// Writes (events) per vCPU.
    pub writes: u64,
    /// test-guest's scratch page.
    pub page: u64,
    /// test-guest's start gate.
    pub gate: u64,
}

/// Runs the benchmark: `shape.targets` test-guest targets (`image`), guarded by the appliance
/// VM (`appliance_image`) under [`BENCH_POLICY`] (`policy`: its compiled JSON, see
/// [`bench_policy`]).
pub fn run(
    image: &[u8],
    appliance_image: &[u8],
    policy: Vec<u8>,
    shape: FleetShape,
) -> Result<FleetFigures, EventBenchError> {
    let FleetShape {
        targets,
        vcpus,
        writes,
        page,
        gate,
    } = shape;
    let expected = u64::from(vcpus) * writes;
    let mut floors = Vec::new();
    for i in 0..targets {
        let times = floor(image, vcpus, writes, page, gate)?;
        if times.len() as u64 != expected {
            return Err(EventBenchError(format!(
                "floor of target {}: {} exits, expected {expected}",
                i + 1,
                times.len()
            )));
        }
        floors.push(rate(&times));
    }
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    let appliance = ApplianceConfig {
        vm: VmConfig {
            name: "fleet-bench-appliance".into(),
            memory_bytes: 64 << 20,
            vcpus: 1,
            // Summaries rarely: the log ring is not what is measured.
            cmdline: "summary_ms=60000".into(),
            unknown_io: UnknownIoPolicy::Ignore,
        },
        image: appliance_image.to_vec(),
        serial: SerialSink::Null,
        log: Box::new(move |r: &[u8]| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(String::from_utf8_lossy(r).trim_end().to_string())
        }),
        window_size: 4 << 20,
        sizes: RingSizes::default(),
        full_timeout: DEFAULT_FULL_TIMEOUT,
        restarts: 0,
    };
    debug_assert!(appliance.window_size <= MAX_SLOT_WINDOW);
    let fleet = Fleet::start(
        FleetConfig {
            appliance,
            slots: targets,
            max_vcpus: vcpus,
            policy,
        },
        Vec::new(),
    )
    .map_err(|e| fail("fleet")(e.to_string()))?;
    let caps = vmm::probe::cached_capabilities().map_err(|e| fail("probe")(e.to_string()))?;
    let mut timings = Vec::new();
    let mut rams = Vec::new();
    for i in 0..targets {
        let mut vm = target_vm(image, vcpus, writes, &format!("fleet-target-{}", i + 1))?;
        let config = IntrospectorConfig {
            wait_for_tool: true,
            ..IntrospectorConfig::default()
        };
        let intro = Introspector::install(&mut vm, caps, config)
            .map_err(|e| fail("introspector")(e.to_string()))?;
        let timing = Arc::new(TimingHook::new(vm.hook(), expected as usize));
        vm.set_hook(timing.clone());
        rams.push(vm.ram().clone());
        fleet
            .add_installed(format!("bench-{}", i + 1), "test-guest".into(), vm, intro)
            .map_err(|e| fail("adding a target")(e.to_string()))?;
        timings.push(timing);
    }
    // Every guard in place, then all gates at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines_of(&lines, "guard").len() < targets as usize {
        if Instant::now() > deadline {
            fleet.wait(RunLimits {
                timeout: Some(Duration::ZERO),
                interrupt: None,
            });
            return Err(EventBenchError(
                "the agent did not set up every target's guard within 60 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for ram in &rams {
        ram.write(gate, &1u64.to_le_bytes())
            .map_err(|e| fail("opening a gate")(e.to_string()))?;
    }
    let deadline = Instant::now() + LIMITS.timeout.unwrap_or_default();
    while !fleet.watch() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = fleet.wait(RunLimits {
        timeout: Some(Duration::ZERO),
        interrupt: None,
    });
    let times: Vec<Vec<Instant>> = timings.iter().map(|t| t.take()).collect();
    let mut rates = Vec::new();
    let mut answered = Vec::new();
    let mut replies = Vec::new();
    let mut max_others = Vec::new();
    let mut between = Vec::new();
    let summaries = lines_of(&lines, "summary");
    for (i, times) in times.iter().enumerate() {
        let id = i as u64 + 1;
        let t = report
            .targets
            .iter()
            .find(|t| t.id == id)
            .ok_or_else(|| EventBenchError(format!("no report for target {id}")))?;
        if !t.run.outcome.is_success() {
            return Err(EventBenchError(format!("target {id}: {}", t.run.outcome)));
        }
        if times.len() as u64 != expected {
            return Err(EventBenchError(format!(
                "target {id}: {} exits, expected {expected}",
                times.len()
            )));
        }
        let last = summaries
            .iter()
            .rev()
            .find(|s| s["target"] == id && s["final"] == true)
            .ok_or_else(|| EventBenchError(format!("no final summary for target {id}")))?;
        // Every write is one event, and every vCPU's CREATE_VCPU event comes first.
        let events_expected = expected + u64::from(vcpus);
        let (events, answers) = (last["events"].as_u64(), last["replies"].as_u64());
        if events != Some(events_expected)
            || answers != Some(events_expected)
            || t.answered != events_expected
        {
            return Err(EventBenchError(format!(
                "target {id}: the agent counted {events:?} events and {answers:?} replies, \
                 the shim received {} replies; expected {events_expected} of each",
                t.answered
            )));
        }
        rates.push(rate(times));
        answered.push(events_expected);
        between.push(
            last["max_others_between_turns"]
                .as_u64()
                .unwrap_or(u64::MAX),
        );
        replies.push(t.answered);
        max_others.push(t.max_others_waited);
    }
    let first = times.iter().filter_map(|t| t.first()).min();
    let last = times.iter().filter_map(|t| t.last()).max();
    let aggregate = match (first, last) {
        (Some(a), Some(b)) => {
            (expected * u64::from(targets)) as f64 / (*b - *a).as_secs_f64().max(1e-9)
        }
        _ => 0.0,
    };
    Ok(FleetFigures {
        targets,
        vcpus,
        events_per_target: expected,
        floors,
        rates,
        aggregate,
        answered,
        replies,
        max_others_waited: max_others,
        max_others_between_turns: between,
    })
}
