//! The agent at CPL3: opens the rings and the map window, sets up the guard on the target
//! (events, write protection, the `task_create` breakpoint) over the command ring, then
//! loops: answer events, re-list the task table every `scan_ms`, print a summary every
//! `summary_ms`. Everything it finds goes out as JSON lines on the log ring.

use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;

use appliance::agent::{Agent, AgentError, CommandError};
use appliance::guard::GuardPlan;
use appliance::memory::CachedMemory;
use appliance::profile::{Profile, ProfileError};
use appliance::tasks::TaskLayout;
use appliance_image::watch::Rate;
use appliance_vm::fleet::{Fleet, FleetError};
pub(crate) use appliance_vm::link::{Client, Link, Notifier, Wait, Window};
use appliance_vm::link::{LinkError, open_slot};
pub(crate) use appliance_vm::rdtsc;
use guest_driver::port::{GuestMemory, PauseWaiter, PortHypercalls};
use guest_driver::{Discovery, DriverError};
use hypercall::boot::BootInfo;
use hypercall::ring::RingError;
use serde::Serialize;

use crate::handler::MainJob;
use crate::tokens::SharedTokens;
use guest_runtime::println;

/// The demo target's profile (`kvmi profile --image demo-target`), checked against the
/// embedded demo-target by host-shim's tests.
pub(crate) const PROFILE: &str =
    include_str!("../../../appliance/tests/fixtures/demo-target.profile.json");

/// TSC frequency assumed when the shim does not report the target's.
pub(crate) const FALLBACK_TSC_HZ: u64 = 2_000_000_000;

/// Exit status: a command-line key is not a number.
pub const BAD_COMMAND_LINE: u32 = guest_runtime::status::BAD_COMMAND_LINE;
/// Exit status: the ring region or the map window could not be opened.
pub const BAD_REGION: u32 = 11;
/// Exit status: the embedded profile is unusable.
pub const BAD_PROFILE: u32 = 12;
/// Exit status: the policy the shim handed over is unusable.
pub const BAD_POLICY: u32 = 14;
/// Exit status: the channel to the shim failed (a ring corrupted, a command unanswerable).
pub const CHANNEL_FAILED: u32 = 13;

pub(crate) type Job =
    MainJob<PortHypercalls, GuestMemory, SharedTokens<GuestMemory, PauseWaiter, Notifier>>;

/// Why the agent stopped.
pub(crate) enum Fail {
    Args(&'static str),
    Open(DriverError),
    Profile(ProfileError),
    /// The policy in the directory is unusable.
    Policy(appliance::policy::PolicyError),
    Agent(AgentError),
    Ring(RingError),
    Command(CommandError),
    /// A benchmark's set-up command was refused (command name, error).
    Refused(&'static str, alloc::string::String),
}

impl Fail {
    fn status(&self) -> u32 {
        match self {
            Fail::Args(_) => BAD_COMMAND_LINE,
            Fail::Open(_) => BAD_REGION,
            Fail::Profile(_) => BAD_PROFILE,
            Fail::Policy(_) => BAD_POLICY,
            Fail::Agent(_) | Fail::Ring(_) | Fail::Command(_) | Fail::Refused(..) => CHANNEL_FAILED,
        }
    }
}

impl From<LinkError> for Fail {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Open(e) => Fail::Open(e),
            LinkError::Ring(e) => Fail::Ring(e),
        }
    }
}

impl From<FleetError> for Fail {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::NoDirectory => Fail::Args("directory"),
            FleetError::Directory(hypercall::directory::DirectoryError::Policy) => {
                Fail::Args("policy bytes outside the directory")
            }
            FleetError::Directory(_) => Fail::Args("directory"),
            FleetError::Policy(e) => Fail::Policy(e),
            FleetError::Link(e) => e.into(),
            FleetError::Agent(e) => Fail::Agent(e),
            FleetError::Command(e) => Fail::Command(e),
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Args(key) => write!(f, "bad command line: {key}= is not a number"),
            Fail::Open(e) => write!(f, "cannot open the ring region or map window: {e}"),
            Fail::Profile(e) => write!(f, "embedded demo-target profile: {e}"),
            Fail::Policy(e) => write!(f, "policy: {e}"),
            Fail::Agent(e) => write!(f, "agent: {e}"),
            Fail::Ring(e) => write!(f, "ring: {e}"),
            Fail::Command(e) => write!(f, "command: {e}"),
            Fail::Refused(command, e) => write!(f, "{command} refused: {e}"),
        }
    }
}

/// Command-line options (see images/README.md).
pub(crate) struct Options {
    pub events: Option<u64>,
    pub secs: Option<u64>,
    pub scan_ms: u64,
    pub summary_ms: u64,
    pub cache: usize,
}

impl Options {
    fn parse(info: &BootInfo) -> Result<Self, Fail> {
        let num = |key: &'static str| -> Result<Option<u64>, Fail> {
            match info.cmdline_value(key) {
                None => Ok(None),
                Some(text) => guest_runtime::entry::parse_u64(text)
                    .map(Some)
                    .ok_or(Fail::Args(key)),
            }
        };
        Ok(Options {
            events: num("events")?,
            secs: num("secs")?,
            scan_ms: num("scan_ms")?.unwrap_or(50).max(1),
            summary_ms: num("summary_ms")?.unwrap_or(1000).max(1),
            cache: num("cache")?.unwrap_or(64).clamp(8, 4096) as usize,
        })
    }
}

/// The agent at CPL3 (run by `appliance_vm::entry!`): its exit status.
pub fn agent_main(info: &'static BootInfo) -> u32 {
    match run(info) {
        Ok(()) => guest_runtime::status::SUCCESS,
        Err(fail) => {
            println!("appliance: {fail}");
            fail.status()
        }
    }
}

#[derive(Serialize)]
pub(crate) struct Start {
    pub finding: &'static str,
    pub profile: &'static str,
    pub target_vcpus: u32,
    pub ring_bytes: u64,
    pub window_pages: u64,
    pub cache_pages: usize,
    pub tsc_hz: u64,
}

#[derive(Serialize)]
struct GuardLine {
    finding: &'static str,
    protected: Vec<Protected>,
    protected_pages: usize,
    task_create: u64,
}

#[derive(Serialize)]
struct Protected {
    range: alloc::string::String,
    start: u64,
    end: u64,
}

#[derive(Serialize)]
struct ErrorLine {
    finding: &'static str,
    during: &'static str,
    command: &'static str,
    error: alloc::string::String,
}

#[derive(Serialize)]
pub(crate) struct Summary {
    finding: &'static str,
    #[serde(rename = "final")]
    last: bool,
    uptime_ms: u64,
    events: u64,
    events_per_sec: u64,
    replies: u64,
    bad_messages: u64,
    writes_denied: u64,
    kernel_writes: u64,
    tasks_created: u64,
    tasks_live: usize,
    task_scans: u64,
    pages_mapped: u64,
    cache_hits: u64,
    cache_misses: u64,
    cache_evictions: u64,
    log_lines: u64,
    log_dropped: u64,
    heap_bytes: usize,
    /// Fleet only: the most events of other targets handled between two turns of this
    /// target that found events waiting (bounded by the budget per turn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_others_between_turns: Option<u64>,
}

fn run(info: &'static BootInfo) -> Result<(), Fail> {
    let options = Options::parse(info)?;
    let bench = crate::bench::Mode::parse(info)?;
    if bench.is_none() {
        match Fleet::open(info) {
            // A fleet appliance: every target the directory lists, as they come and go.
            Ok(fleet) => return crate::fleet::run(&fleet, &options),
            Err(FleetError::NoDirectory) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let link = open_link(info)?;
    match bench {
        Some(mode) => crate::bench::run(mode, &link),
        None => main_job(&link, &options),
    }
}

/// Opens the ring region and the map window named by the boot info (slot 0).
fn open_link(info: &'static BootInfo) -> Result<Link, Fail> {
    Ok(open_slot(
        Discovery::from_boot_info(info).map_err(Fail::Open)?,
        0,
    )?)
}

/// The main job: guard the demo target, list its tasks, report.
fn main_job(link: &Link, options: &Options) -> Result<(), Fail> {
    let Link {
        discovery,
        region,
        window,
        waiting,
        commands,
        client,
    } = link;
    let (window, waiting, commands, client) = (*window, *waiting, *commands, *client);
    let profile = Profile::from_json(PROFILE.as_bytes()).map_err(Fail::Profile)?;
    let plan = GuardPlan::from_profile(&profile).map_err(Fail::Profile)?;
    let layout = TaskLayout::from_profile(&profile).map_err(Fail::Profile)?;
    let cache_pages = options.cache.min(window.slot_count());
    let mem = CachedMemory::new(window, SharedTokens::new(client, commands), cache_pages);
    let vcpus = region.params().vcpu_count;
    let mut agent: Agent<_, Job, _, _> = Agent::new(
        region,
        MainJob::new(plan.clone(), layout, mem),
        waiting.clone(),
    )
    .map_err(Fail::Agent)?;

    let tsc_hz = link
        .tsc_hz()
        .map_err(Fail::Command)?
        .unwrap_or(FALLBACK_TSC_HZ);
    agent.log().emit(&Start {
        finding: "start",
        profile: "demo-target",
        target_vcpus: vcpus,
        ring_bytes: discovery.ring_size,
        window_pages: discovery.window_slots(),
        cache_pages,
        tsc_hz,
    });
    emit_scan(&mut agent);
    set_up_guard(&mut agent, &plan, vcpus, client, commands)?;
    agent.flush_log().map_err(Fail::Agent)?;
    serve(&mut agent, window, options, tsc_hz)
}

/// Sends the guard's set-up commands; a refused one is reported and the rest still sent.
pub(crate) fn set_up_guard(
    agent: &mut Agent<GuestMemory, Job, PauseWaiter, Notifier>,
    plan: &GuardPlan,
    vcpus: u32,
    client: &RefCell<Client>,
    waiting: &Wait,
) -> Result<(), Fail> {
    let vcpus = u16::try_from(vcpus).unwrap_or(u16::MAX);
    let mut failed = 0;
    for command in plan.setup_commands(vcpus) {
        let reply = client
            .borrow_mut()
            .call(&command, waiting)
            .map_err(Fail::Command)?;
        let error = match reply.decode() {
            Ok(Ok(_)) => continue,
            Ok(Err(code)) => alloc::format!("{code:?}"),
            Err(e) => alloc::format!("{e}"),
        };
        failed += 1;
        agent.log().emit(&ErrorLine {
            finding: "error",
            during: "setup",
            command: command.kind().name(),
            error,
        });
    }
    if failed == 0 {
        agent.log().emit(&GuardLine {
            finding: "guard",
            protected: plan
                .ranges
                .iter()
                .map(|(range, r)| Protected {
                    range: range.clone(),
                    start: r.start,
                    end: r.end,
                })
                .collect(),
            protected_pages: plan.pages.len(),
            task_create: plan.task_create,
        });
    }
    Ok(())
}

/// Lists the task table and emits a line per change.
pub(crate) fn emit_scan(agent: &mut Agent<GuestMemory, Job, PauseWaiter, Notifier>) {
    let lines = agent.handler_mut().scan();
    for line in &lines {
        agent.log().emit(line);
    }
}

/// The event loop with the periodic task list and summary, until `events=`/`secs=`.
fn serve(
    agent: &mut Agent<GuestMemory, Job, PauseWaiter, Notifier>,
    window: &'static Window,
    options: &Options,
    tsc_hz: u64,
) -> Result<(), Fail> {
    let start = rdtsc();
    let ms = tsc_hz / 1000;
    let mut rate = Rate::new(tsc_hz, start, 0);
    let mut next_scan = start + options.scan_ms * ms;
    let mut next_summary = start + options.summary_ms * ms;
    let deadline = options
        .secs
        .map(|s| start.saturating_add(s.saturating_mul(tsc_hz)));
    loop {
        let handled = agent.poll().map_err(Fail::Agent)?;
        let now = rdtsc();
        if now >= next_scan {
            emit_scan(agent);
            next_scan = now + options.scan_ms * ms;
        }
        let done = options.events.is_some_and(|n| agent.stats().events >= n)
            || deadline.is_some_and(|d| now >= d);
        if now >= next_summary || done {
            let summary = summary(agent, window, &mut rate, now, now - start, done);
            agent.log().emit(&summary);
            next_summary = now + options.summary_ms * ms;
        }
        agent.flush_log().map_err(Fail::Agent)?;
        if done {
            return Ok(());
        }
        if handled == 0 {
            agent.wait_for_events().map_err(Fail::Agent)?;
        }
    }
}

pub(crate) fn summary(
    agent: &mut Agent<GuestMemory, Job, PauseWaiter, Notifier>,
    window: &Window,
    rate: &mut Rate,
    now: u64,
    uptime: u64,
    last: bool,
) -> Summary {
    let stats = agent.stats();
    let job = agent.handler();
    let guard = job.guard_stats();
    let cache = job.cache_stats();
    let tasks_live = job.live_tasks();
    let task_scans = job.scan_stats().scans;
    let log_lines = agent.log().lines();
    let log_dropped = agent.log().dropped();
    Summary {
        finding: "summary",
        last,
        uptime_ms: rate.millis(uptime),
        events: stats.events,
        events_per_sec: rate.sample(now, stats.events),
        replies: stats.replies,
        bad_messages: stats.bad_messages,
        writes_denied: guard.writes_denied,
        kernel_writes: guard.kernel_writes,
        tasks_created: guard.tasks_created,
        tasks_live,
        task_scans,
        pages_mapped: window.stats().pages_mapped,
        cache_hits: cache.hits,
        cache_misses: cache.misses,
        cache_evictions: cache.evictions,
        log_lines,
        log_dropped,
        heap_bytes: appliance_vm::heap_stats().in_use,
        max_others_between_turns: None,
    }
}
