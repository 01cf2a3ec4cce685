//! `example-agent`: a whole appliance agent in one file, on the `appliance-vm` runtime.
//!
//! For every target the shim hands it, it turns on what the policy asks to watch (`kvmi run
//! --policy FILE`, by default `policies/demo.toml`: events, write-protected pages,
//! breakpoints), lets every event proceed (CONTINUE: it watches, it never blocks), counts the
//! events by kind and prints one JSON line per target every second, and a final one when the
//! shim stops it:
//!
//! ```text
//! {"finding":"example","final":false,"events":412,"page_faults":401,"breakpoints":11,"target":1,"target_name":"demo-target-1"}
//! ```
//! (the shim adds `target` and `target_name`). See the README, "Write your own agent".
#![no_std]
#![no_main]

use appliance::agent::{EventContext, EventHandler, default_reply};
use appliance::guard::GuardPlan;
use appliance::policy::CompiledPolicy;
use appliance_vm::fleet::{Fleet, FleetError, Job, Target};
use appliance_vm::link::Link;
use hypercall::boot::BootInfo;
use hypercall::directory::Slot;
use protocol::{Event, EventKind, EventReply};
use serde::Serialize;

// The runtime runs `agent_main` at CPL3; its result is the VM's exit status.
appliance_vm::entry!(agent_main);

fn agent_main(info: &'static BootInfo) -> u32 {
    let result = Fleet::open(info).and_then(|fleet| {
        let policy = fleet.policy()?;
        // Serves every target, as they come and go, until the shim asks us to stop.
        fleet.run(&mut Example { policy })
    });
    match result {
        Ok(()) => 0,
        Err(error) => {
            appliance_vm::println!("example-agent: {error}");
            1
        }
    }
}

/// One target's event handler: counts, and answers every event with its default reply
/// (CONTINUE, the access or instruction proceeds).
#[derive(Default)]
struct Counter {
    events: u64,
    page_faults: u64,
    breakpoints: u64,
}

impl EventHandler for Counter {
    fn on_event(&mut self, _ctx: &mut dyn EventContext, event: &Event) -> EventReply<'static> {
        self.events += 1;
        match event.kind() {
            EventKind::PageFault => self.page_faults += 1,
            EventKind::Breakpoint => self.breakpoints += 1,
            _ => {}
        }
        default_reply(event)
    }
}

/// The line this agent prints per target.
#[derive(Serialize)]
struct Report {
    finding: &'static str,
    #[serde(rename = "final")]
    last: bool,
    events: u64,
    page_faults: u64,
    breakpoints: u64,
}

/// When a target's next report is due.
struct Timer {
    period: u64,
    next: u64,
}

/// The job: what to do with each target.
struct Example {
    policy: Option<CompiledPolicy>,
}

impl Job for Example {
    type Handler = Counter;
    type State = Timer;
    type Error = FleetError;

    /// A target joined: enable what the policy says to watch on it, before its first event.
    fn handler(&mut self, slot: &Slot, link: &Link) -> Result<Counter, FleetError> {
        let rules = self.policy.as_ref();
        if let Some(rules) = rules.and_then(|p| p.for_target(slot.name(), slot.profile())) {
            let plan = GuardPlan::from_rules(rules)?;
            let vcpus = u16::try_from(link.region.params().vcpu_count).unwrap_or(u16::MAX);
            for command in plan.setup_commands(vcpus) {
                link.call_ok(&command)?;
            }
        }
        Ok(Counter::default())
    }

    /// Its first report is due in a second (of the target's TSC, which is ours too).
    fn start(&mut self, target: &mut Target<Counter>) -> Result<Timer, FleetError> {
        let period = target.link.tsc_hz()?.unwrap_or(2_000_000_000);
        let next = appliance_vm::rdtsc() + period;
        Ok(Timer { period, next })
    }

    fn tick(
        &mut self,
        target: &mut Target<Counter>,
        timer: &mut Timer,
        now: u64,
    ) -> Result<(), FleetError> {
        if now >= timer.next {
            report(target, false);
            timer.next = now + timer.period;
        }
        Ok(())
    }

    fn finish(
        &mut self,
        target: &mut Target<Counter>,
        _: &mut Timer,
        _: u64,
    ) -> Result<(), FleetError> {
        report(target, true);
        Ok(())
    }
}

/// Writes the target's counts on its log ring (the loop flushes it to the shim).
fn report(target: &mut Target<Counter>, last: bool) {
    let c = target.agent.handler();
    let line = Report {
        finding: "example",
        last,
        events: c.events,
        page_faults: c.page_faults,
        breakpoints: c.breakpoints,
    };
    target.agent.log().emit(&line);
}
