//! The main job of a fleet appliance: guard every target the directory lists, each in its
//! own slot (rings, map window, command client, guard, task list, summary), on the runtime's
//! loop (`appliance_vm::fleet`: slots opened and dropped as the directory changes, every
//! target polled in turn with a budget of `appliance_vm::fleet::BUDGET` events, final
//! summaries on the stop word). This module says what happens per target: the guard is set
//! up before the agent answers the target's first event; the task list is re-read every
//! `scan_ms` and a summary printed every `summary_ms`; a `pause` rule that fired pauses the
//! target for an analysis.

use alloc::vec::Vec;

use appliance::guard::{GuardPlan, PauseRequest};
use appliance::memory::CachedMemory;
use appliance::policy::{CompiledPolicy, TargetRules};
use appliance::profile::Profile;
use appliance::tasks::TaskLayout;
use appliance_image::watch::Rate;
use appliance_vm::fleet::{Fleet, Job as FleetJob, Target};
use appliance_vm::link::Link;
use hypercall::directory::Slot;
use protocol::{Command, Reply};
use serde::Serialize;

use crate::handler::MainJob;
use crate::job::{
    FALLBACK_TSC_HZ, Fail, Job, Options, PROFILE, Start, emit_scan, rdtsc, set_up_guard, summary,
};
use crate::tokens::SharedTokens;

/// The main job over the whole fleet.
struct MainFleet<'a> {
    profile: Profile,
    policy: Option<CompiledPolicy>,
    options: &'a Options,
    /// The TSC when `secs=` stops the agent.
    deadline: Option<u64>,
    /// The guard of the target being opened (from `handler` to `start`).
    opening: Option<(GuardPlan, u64, bool)>,
}

/// What the main job keeps per target besides its handler.
struct TargetState {
    vcpus: u32,
    scan_ms: u64,
    rate: Rate,
    tsc_hz: u64,
    started: u64,
    next_scan: u64,
    next_summary: u64,
    /// Whether the task list is read (the demo target's layout: the only profile here).
    scans: bool,
}

/// The fleet's main job: until the stop word, `events=` (in total) or `secs=`.
pub fn run(fleet: &Fleet, options: &Options) -> Result<(), Fail> {
    let start = rdtsc();
    let mut job = MainFleet {
        profile: Profile::from_json(PROFILE.as_bytes()).map_err(Fail::Profile)?,
        policy: fleet.policy()?,
        options,
        deadline: options
            .secs
            .map(|s| start.saturating_add(s.saturating_mul(FALLBACK_TSC_HZ))),
        opening: None,
    };
    fleet.run(&mut job)
}

impl MainFleet<'_> {
    /// The guard plan and scan period for the target in `slot`: the policy's rules for it (none
    /// for it: guard nothing, its events are answered CONTINUE); no policy at all: the demo
    /// guard for the demo target.
    fn plan(&self, slot: &Slot, demo: bool) -> Result<(GuardPlan, u64), Fail> {
        let none = TargetRules {
            profile: slot.profile().into(),
            targets: Vec::new(),
            scan_ms: self.options.scan_ms.clamp(1, 60_000),
            protect: Vec::new(),
            trace: Vec::new(),
        };
        Ok(match &self.policy {
            Some(policy) => {
                let rules = policy
                    .for_target(slot.name(), slot.profile())
                    .unwrap_or(&none);
                (
                    GuardPlan::from_rules(rules).map_err(Fail::Policy)?,
                    rules.scan_ms,
                )
            }
            None if demo => (
                GuardPlan::from_profile(&self.profile).map_err(Fail::Profile)?,
                self.options.scan_ms,
            ),
            None => (
                GuardPlan::from_rules(&none).map_err(Fail::Policy)?,
                self.options.scan_ms,
            ),
        })
    }
}

impl FleetJob for MainFleet<'_> {
    type Handler = Job;
    type State = TargetState;
    type Error = Fail;

    fn handler(&mut self, slot: &Slot, link: &Link) -> Result<Job, Fail> {
        let demo = slot.profile() == "demo-target";
        let (plan, scan_ms) = self.plan(slot, demo)?;
        let layout = TaskLayout::from_profile(&self.profile).map_err(Fail::Profile)?;
        let cache_pages = self.options.cache.min(link.window.slot_count());
        let mem = CachedMemory::new(
            link.window,
            SharedTokens::new(link.client, link.commands),
            cache_pages,
        );
        self.opening = Some((plan.clone(), scan_ms, demo));
        Ok(MainJob::new(plan, layout, mem))
    }

    /// Emits the start line and the first task list, then sets up the guard over the
    /// target's command ring.
    fn start(&mut self, target: &mut Target<Job>) -> Result<TargetState, Fail> {
        let (plan, scan_ms, demo) = self.opening.take().ok_or(Fail::Args("directory"))?;
        let link = &target.link;
        let vcpus = link.region.params().vcpu_count;
        let tsc_hz = link
            .tsc_hz()
            .map_err(Fail::Command)?
            .unwrap_or(FALLBACK_TSC_HZ);
        target.agent.log().emit(&Start {
            finding: "start",
            profile: "demo-target",
            target_vcpus: vcpus,
            ring_bytes: target.slot.ring_size,
            window_pages: link.discovery.window_slots(),
            cache_pages: self.options.cache.min(link.window.slot_count()),
            tsc_hz,
        });
        emit_scan(&mut target.agent);
        set_up_guard(&mut target.agent, &plan, vcpus, link.client, link.commands)?;
        let now = rdtsc();
        let ms = tsc_hz / 1000;
        Ok(TargetState {
            vcpus,
            scan_ms,
            rate: Rate::new(tsc_hz, now, 0),
            tsc_hz,
            started: now,
            next_scan: now + scan_ms * ms,
            next_summary: now + self.options.summary_ms * ms,
            scans: demo,
        })
    }

    fn tick(
        &mut self,
        target: &mut Target<Job>,
        state: &mut TargetState,
        now: u64,
    ) -> Result<(), Fail> {
        if let Some(request) = target.agent.handler_mut().take_pause_request() {
            pause_for_analysis(target, state, request)?;
        }
        self.periodic(target, state, now, false);
        Ok(())
    }

    fn finish(
        &mut self,
        target: &mut Target<Job>,
        state: &mut TargetState,
        now: u64,
    ) -> Result<(), Fail> {
        self.periodic(target, state, now, true);
        Ok(())
    }

    fn done(&mut self, events: u64, now: u64) -> bool {
        self.options.events.is_some_and(|n| events >= n) || self.deadline.is_some_and(|d| now >= d)
    }
}

impl MainFleet<'_> {
    /// A target's task scan and summary when they are due (the final summary when `last`).
    fn periodic(&self, target: &mut Target<Job>, state: &mut TargetState, now: u64, last: bool) {
        let ms = state.tsc_hz / 1000;
        if state.scans && now >= state.next_scan {
            emit_scan(&mut target.agent);
            state.next_scan = now + state.scan_ms * ms;
        }
        if now >= state.next_summary || last {
            let mut line = summary(
                &mut target.agent,
                target.link.window,
                &mut state.rate,
                now,
                now - state.started,
                last,
            );
            line.max_others_between_turns = Some(target.max_others_between_turns);
            target.agent.log().emit(&line);
            state.next_summary = now + self.options.summary_ms * ms;
        }
    }
}

#[derive(Serialize)]
struct PauseLine<'a> {
    finding: &'static str,
    rule: &'a str,
    vcpu: u16,
    gpa: u64,
    rip: u64,
    vcpus_paused: u32,
    tasks_live: usize,
}

/// A `pause` rule fired (its access was denied): every vCPU of the target is asked to pause
/// (PAUSE_VCPU; each then waits in its PAUSE event; `vcpus_paused` counts the vCPUs paused or
/// with a pause still pending from an earlier violation), the agent lists the target's tasks while
/// it stands still and reports, and the PAUSE events are answered CONTINUE as the agent polls
/// them next: the target resumes.
fn pause_for_analysis(
    target: &mut Target<Job>,
    state: &TargetState,
    request: PauseRequest,
) -> Result<(), Fail> {
    let mut paused = 0;
    for vcpu in 0..u16::try_from(state.vcpus).unwrap_or(u16::MAX) {
        let reply = target
            .link
            .call(&Command::PauseVcpu { vcpu })
            .map_err(Fail::Command)?;
        // Busy: a pause asked for by an earlier violation is still pending (the vCPU pauses
        // at its next exit): it counts as paused.
        if matches!(
            reply.decode(),
            Ok(Ok(Reply::Empty)) | Ok(Err(protocol::ErrorCode::Busy))
        ) {
            paused += 1;
        }
    }
    if state.scans {
        emit_scan(&mut target.agent);
    }
    let tasks_live = target.agent.handler().live_tasks();
    target.agent.log().emit(&PauseLine {
        finding: "pause_analysis",
        rule: &request.rule,
        vcpu: request.vcpu,
        gpa: request.gpa,
        rip: request.rip,
        vcpus_paused: paused,
        tasks_live,
    });
    Ok(())
}
