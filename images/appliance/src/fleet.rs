//! The main job of a fleet appliance: guard every target the directory lists, each in its
//! own slot (rings, map window, command client, guard, task list, summary), served in turn.
//!
//! Fairness: each pass over the targets, always in slot order, handles at most [`BUDGET`]
//! events of each, so an event of one target waits for at most `BUDGET` events of every other
//! target before the agent gets to it, however hard the others flood (the shim measures what
//! it got: `appliance_link`'s `max_others_waited`).
//!
//! The directory is re-read when its generation changes: a slot that turns live (or live with
//! another target id) gets a fresh job, whose guard is set up before the agent answers the
//! target's first event; a slot that turns gone drops its job. When the shim sets the
//! directory's stop word (Ctrl-C, a timeout) every job emits its final summary and the agent
//! ends.

use alloc::vec::Vec;
use core::cell::RefCell;

use appliance::agent::Agent;
use appliance::guard::{GuardPlan, PauseRequest};
use appliance::memory::CachedMemory;
use appliance::policy::{CompiledPolicy, TargetRules};
use appliance::profile::Profile;
use appliance::tasks::TaskLayout;
use appliance_image::watch::Rate;
use guest_driver::Discovery;
use guest_driver::port::{GuestMemory, PauseWaiter};
use hypercall::boot::BootInfo;
use hypercall::directory::{Directory, Slot, SlotState};
use hypercall::ring::SharedRegion;
use protocol::{Command, Reply};
use serde::Serialize;

use crate::handler::MainJob;
use crate::job::{
    Client, FALLBACK_TSC_HZ, Fail, Job, Options, PROFILE, Start, Wait, Window, emit_scan,
    guest_tsc_hz, rdtsc, set_up_guard, summary,
};
use crate::tokens::SharedTokens;

/// Events of one target handled per pass before the next target's turn.
pub const BUDGET: usize = 16;

/// The directory as the agent sees it.
type Dir = Directory<SharedRegion<()>>;

/// One guarded target.
struct TargetJob {
    id: u64,
    client: &'static RefCell<Client>,
    commands: &'static Wait,
    vcpus: u32,
    scan_ms: u64,
    agent: Agent<GuestMemory, Job, PauseWaiter, crate::job::Notifier>,
    window: &'static Window,
    rate: Rate,
    tsc_hz: u64,
    /// The fleet's handled-events count when this target's last turn ended.
    turn_end: u64,
    /// The most other targets' events handled between two turns that found events here.
    max_others: u64,
    started: u64,
    next_scan: u64,
    next_summary: u64,
    scans: bool,
}

/// Opens the directory named by the boot info, if there is one.
pub fn open_directory(info: &BootInfo) -> Option<Dir> {
    if info.directory_gpa == 0 || info.directory_size == 0 {
        return None;
    }
    let len = usize::try_from(info.directory_size).ok()?;
    // SAFETY: the kernel mapped the directory virtual = physical, user-readable, for the rest
    // of the program (it checked the area before mapping it); it is only read through atomic
    // word loads.
    let region = unsafe { SharedRegion::new((), info.directory_gpa as *mut u8, len) }.ok()?;
    Directory::open(region).ok()
}

/// Builds the job of the target in `slot` (live): opens its rings and window, sets up its
/// guard over its command ring and emits its start line. The window, client and waiters are
/// leaked (a few KiB per target that ever joined: the page cache borrows them for good).
fn open_job(
    info: &'static BootInfo,
    slot: &Slot,
    profile: &Profile,
    policy: Option<&CompiledPolicy>,
    options: &Options,
) -> Result<TargetJob, Fail> {
    let discovery = Discovery {
        ring_gpa: slot.ring_gpa,
        ring_size: slot.ring_size,
        window_gpa: slot.window_gpa,
        window_size: slot.window_size,
        vcpu_count: info.vcpu_count,
    };
    let index = slot.index;
    let crate::job::Link {
        region,
        window,
        waiting,
        commands,
        client,
        ..
    } = crate::job::open_slot(discovery, index)?;
    // The policy's rules for this target; none for it: guard nothing (its events are
    // answered CONTINUE). No policy at all: the demo guard for the demo target.
    let demo = slot.profile() == "demo-target";
    let (plan, scan_ms) = match policy {
        Some(policy) => {
            let none = TargetRules {
                profile: slot.profile().into(),
                targets: Vec::new(),
                scan_ms: options.scan_ms.clamp(1, 60_000),
                protect: Vec::new(),
                trace: Vec::new(),
            };
            let rules = policy
                .for_target(slot.name(), slot.profile())
                .unwrap_or(&none);
            (
                GuardPlan::from_rules(rules).map_err(Fail::Policy)?,
                rules.scan_ms,
            )
        }
        None if demo => (
            GuardPlan::from_profile(profile).map_err(Fail::Profile)?,
            options.scan_ms,
        ),
        None => (
            GuardPlan::from_rules(&TargetRules {
                profile: slot.profile().into(),
                targets: Vec::new(),
                scan_ms: options.scan_ms.clamp(1, 60_000),
                protect: Vec::new(),
                trace: Vec::new(),
            })
            .map_err(Fail::Policy)?,
            options.scan_ms,
        ),
    };
    let layout = TaskLayout::from_profile(profile).map_err(Fail::Profile)?;
    let cache_pages = options.cache.min(window.slot_count());
    let mem = CachedMemory::new(window, SharedTokens::new(client, commands), cache_pages);
    let vcpus = region.params().vcpu_count;
    let mut agent: Agent<_, Job, _, _> = Agent::new(
        &region,
        MainJob::new(plan.clone(), layout, mem),
        waiting.clone(),
    )
    .map_err(Fail::Agent)?;
    let tsc_hz = guest_tsc_hz(client, commands)?.unwrap_or(FALLBACK_TSC_HZ);
    agent.log().emit(&Start {
        finding: "start",
        profile: "demo-target",
        target_vcpus: vcpus,
        ring_bytes: slot.ring_size,
        window_pages: discovery.window_slots(),
        cache_pages,
        tsc_hz,
    });
    emit_scan(&mut agent);
    set_up_guard(&mut agent, &plan, vcpus, client, commands)?;
    agent.flush_log().map_err(Fail::Agent)?;
    let now = rdtsc();
    let ms = tsc_hz / 1000;
    Ok(TargetJob {
        id: slot.target_id,
        client,
        commands,
        vcpus,
        scan_ms,
        agent,
        window,
        rate: Rate::new(tsc_hz, now, 0),
        tsc_hz,
        // No turn yet: the first one counts nothing.
        turn_end: u64::MAX,
        max_others: 0,
        started: now,
        next_scan: now + scan_ms * ms,
        next_summary: now + options.summary_ms * ms,
        // The task list needs the demo target's layout (the only profile in this image).
        scans: demo,
    })
}

/// The fleet's main job: until the stop word, `events=` (in total) or `secs=`.
pub fn run(info: &'static BootInfo, dir: &Dir, options: &Options) -> Result<(), Fail> {
    let profile = Profile::from_json(PROFILE.as_bytes()).map_err(Fail::Profile)?;
    let mut bytes = Vec::new();
    dir.policy(&mut bytes)
        .map_err(|e| Fail::Args(directory_error(e)))?;
    let policy = if bytes.is_empty() {
        None
    } else {
        Some(CompiledPolicy::from_json(&bytes).map_err(Fail::Policy)?)
    };
    let mut jobs: Vec<Option<TargetJob>> = (0..dir.slot_count()).map(|_| None).collect();
    let mut seen = None;
    // Events handled over all targets (for the fairness figure).
    let mut total_handled = 0u64;
    let tsc_hz = FALLBACK_TSC_HZ;
    let start = rdtsc();
    let deadline = options
        .secs
        .map(|s| start.saturating_add(s.saturating_mul(tsc_hz)));
    loop {
        let generation = dir.generation();
        if seen != Some(generation) {
            seen = Some(generation);
            refresh(info, dir, &profile, policy.as_ref(), options, &mut jobs)?;
        }
        let mut handled = 0;
        // Always the same order: between two turns of a target every other target gets
        // exactly one turn, so its events wait for at most BUDGET events of each other.
        for job in jobs.iter_mut() {
            if let Some(job) = job.as_mut() {
                let others = total_handled.saturating_sub(job.turn_end);
                let mine = job.agent.poll_at_most(BUDGET).map_err(Fail::Agent)? as u64;
                if mine > 0 {
                    job.max_others = job.max_others.max(others);
                }
                total_handled += mine;
                job.turn_end = total_handled;
                handled += mine;
                if let Some(request) = job.agent.handler_mut().take_pause_request() {
                    pause_for_analysis(job, request)?;
                }
            }
        }
        let now = rdtsc();
        let total: u64 = jobs.iter().flatten().map(|j| j.agent.stats().events).sum();
        let stop = dir.stop_requested();
        let done = stop
            || options.events.is_some_and(|n| total >= n)
            || deadline.is_some_and(|d| now >= d);
        for job in jobs.iter_mut().flatten() {
            periodic(job, options, now, done)?;
        }
        if done {
            return Ok(());
        }
        if handled == 0 {
            for _ in 0..64 {
                core::hint::spin_loop();
            }
        }
    }
}

/// Re-reads the directory: new or replaced live slots get a job, gone ones lose theirs.
fn refresh(
    info: &'static BootInfo,
    dir: &Dir,
    profile: &Profile,
    policy: Option<&CompiledPolicy>,
    options: &Options,
    jobs: &mut [Option<TargetJob>],
) -> Result<(), Fail> {
    for (i, job) in jobs.iter_mut().enumerate() {
        let Ok(slot) = dir.slot(i as u32) else {
            // Mid-rewrite or invalid: look again at the next generation.
            continue;
        };
        let current = job.as_ref().map(|j| j.id);
        match slot.state {
            SlotState::Live if current == Some(slot.target_id) => {}
            SlotState::Live => {
                *job = None;
                *job = Some(open_job(info, &slot, profile, policy, options)?);
            }
            SlotState::Ending => {
                // The target ended, its rings still run: its final summary, then drop it.
                if let Some(mut ending) = job.take() {
                    periodic(&mut ending, options, rdtsc(), true)?;
                }
            }
            SlotState::Gone | SlotState::Empty => *job = None,
        }
    }
    Ok(())
}

/// A job's task scan and summary when they are due (the final summary when `done`).
fn periodic(job: &mut TargetJob, options: &Options, now: u64, done: bool) -> Result<(), Fail> {
    let ms = job.tsc_hz / 1000;
    if job.scans && now >= job.next_scan {
        emit_scan(&mut job.agent);
        job.next_scan = now + job.scan_ms * ms;
    }
    if now >= job.next_summary || done {
        let mut line = summary(
            &mut job.agent,
            job.window,
            &mut job.rate,
            now,
            now - job.started,
            done,
        );
        line.max_others_between_turns = Some(job.max_others);
        job.agent.log().emit(&line);
        job.next_summary = now + options.summary_ms * ms;
    }
    job.agent.flush_log().map_err(Fail::Agent)
}

/// A directory error as a one-word reason (the agent's exit message).
fn directory_error(e: hypercall::directory::DirectoryError) -> &'static str {
    match e {
        hypercall::directory::DirectoryError::Policy => "policy bytes outside the directory",
        _ => "directory",
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
fn pause_for_analysis(job: &mut TargetJob, request: PauseRequest) -> Result<(), Fail> {
    let mut paused = 0;
    for vcpu in 0..u16::try_from(job.vcpus).unwrap_or(u16::MAX) {
        let reply = job
            .client
            .borrow_mut()
            .call(&Command::PauseVcpu { vcpu }, job.commands)
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
    if job.scans {
        emit_scan(&mut job.agent);
    }
    let tasks_live = job.agent.handler().live_tasks();
    job.agent.log().emit(&PauseLine {
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
