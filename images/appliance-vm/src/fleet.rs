//! The loop serving every target of the directory (one appliance, many targets).
//!
//! [`Fleet::run`] re-reads the directory whenever its generation changes: a slot that turns
//! live (or live with another target id) gets its link opened ([`open_slot`]), a handler
//! from [`Job::handler`], an [`Agent`] over its rings and a state from [`Job::start`], all
//! before the agent answers the target's first event; a slot that turns ending (the target
//! ended, its rings still run) gets [`Job::finish`] and is dropped; one that turns gone or
//! empty is dropped. Each pass polls every target's agent with a budget of [`BUDGET`] events, so an
//! event of one target waits for at most `BUDGET` events of every other target however hard
//! they flood, then calls [`Job::tick`] for every target and flushes its log. When the shim
//! sets the directory's stop word (Ctrl-C, a timeout) or [`Job::done`] says so, every target
//! gets [`Job::finish`] (its final report) and the loop returns.
//!
//! Every log line a target's agent writes goes to that target's log ring: the shim labels it
//! with the target's id and name (`"target"`, `"target_name"`).

use alloc::boxed::Box;
use alloc::vec::Vec;

use appliance::agent::{Agent, AgentError, CommandError, EventHandler};
use appliance::policy::{CompiledPolicy, PolicyError};
use guest_driver::Discovery;
use guest_driver::port::{GuestMemory, PauseWaiter};
use hypercall::boot::BootInfo;
use hypercall::directory::{Directory, DirectoryError, Slot, SlotState};
use hypercall::ring::SharedRegion;

use crate::link::{Link, LinkError, Notifier, open_slot};

/// Events of one target handled per pass before the next target's turn.
pub const BUDGET: usize = 16;

/// The directory as the agent sees it.
pub type Dir = Directory<SharedRegion<()>>;

/// The event loop of one target.
pub type TargetAgent<H> = Agent<GuestMemory, H, PauseWaiter, Notifier>;

/// Why the loop (or opening a target) failed.
#[derive(Debug)]
pub enum FleetError {
    /// The appliance has no target directory (booted for one target without a fleet).
    NoDirectory,
    /// The directory is unusable.
    Directory(DirectoryError),
    /// The policy in the directory is unusable.
    Policy(PolicyError),
    /// A slot's rings or window do not open.
    Link(LinkError),
    /// A target's rings failed (corrupted by the peer).
    Agent(AgentError),
    /// A command failed or was refused.
    Command(CommandError),
}

impl core::fmt::Display for FleetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FleetError::NoDirectory => write!(f, "no target directory in the boot info"),
            FleetError::Directory(e) => write!(f, "directory: {e}"),
            FleetError::Policy(e) => write!(f, "policy: {e}"),
            FleetError::Link(e) => write!(f, "{e}"),
            FleetError::Agent(e) => write!(f, "agent: {e}"),
            FleetError::Command(e) => write!(f, "command: {e}"),
        }
    }
}

macro_rules! from {
    ($($variant:ident($error:ty)),*) => {$(
        impl From<$error> for FleetError {
            fn from(e: $error) -> Self {
                FleetError::$variant(e)
            }
        }
    )*};
}
from!(
    Directory(DirectoryError),
    Policy(PolicyError),
    Link(LinkError),
    Agent(AgentError),
    Command(CommandError)
);

/// One target being served: its directory entry, its link and its agent (which owns the
/// job's handler: `target.agent.handler()`).
pub struct Target<H> {
    /// The slot as read when the target joined (id, name, profile, vCPUs, areas).
    pub slot: Slot,
    /// The slot's rings, window and command client.
    pub link: Link,
    /// The target's event loop; its log writer (`agent.log()`) reaches the shim.
    pub agent: TargetAgent<H>,
    /// The most events of other targets handled between two turns of this target that
    /// found events waiting (the fairness it got; at most [`BUDGET`] per other target).
    pub max_others_between_turns: u64,
    /// The loop's handled-events count when this target's last turn ended (`None` before
    /// its first turn).
    turn_end: Option<u64>,
}

/// What an agent does with each target. Only [`handler`](Job::handler) and
/// [`start`](Job::start) are required.
pub trait Job {
    /// The event handler of one target.
    type Handler: EventHandler;
    /// Whatever else the job keeps per target (timers, counters outside the handler).
    type State;
    /// The job's error; the loop's own errors convert into it.
    type Error: From<FleetError> + core::fmt::Display;

    /// A target joined: its handler. The link is open, so set-up commands (events to
    /// enable, pages to protect) may be sent here; no event is answered before this returns.
    fn handler(&mut self, slot: &Slot, link: &Link) -> Result<Self::Handler, Self::Error>;

    /// The target's agent exists (e.g. emit a start line): its state.
    fn start(&mut self, target: &mut Target<Self::Handler>) -> Result<Self::State, Self::Error>;

    /// After every pass (`now`: this vCPU's TSC): periodic work. Default: nothing.
    fn tick(
        &mut self,
        target: &mut Target<Self::Handler>,
        state: &mut Self::State,
        now: u64,
    ) -> Result<(), Self::Error> {
        let _ = (target, state, now);
        Ok(())
    }

    /// The loop stops (the shim's stop word, or [`done`](Job::done)): the final report.
    /// Default: nothing.
    fn finish(
        &mut self,
        target: &mut Target<Self::Handler>,
        state: &mut Self::State,
        now: u64,
    ) -> Result<(), Self::Error> {
        let _ = (target, state, now);
        Ok(())
    }

    /// Whether to stop besides the stop word, given the events the current targets' agents
    /// handled in total and the TSC. Default: never.
    fn done(&mut self, events: u64, now: u64) -> bool {
        let _ = (events, now);
        false
    }
}

/// Why a target could not be opened, and its link if that was opened.
type Unopened<J> = Box<(<J as Job>::Error, Option<Link>)>;

/// A target being served, with the job's state for it.
type Served<J> = (Target<<J as Job>::Handler>, <J as Job>::State);

/// A view of the directory the kernel mapped (each view reads the same shared words).
fn open_directory() -> Result<Dir, FleetError> {
    let (start, len) = crate::kernel::directory().ok_or(FleetError::NoDirectory)?;
    let len = usize::try_from(len).map_err(|_| FleetError::NoDirectory)?;
    // SAFETY: the kernel checked this area and mapped it virtual = physical, user-readable,
    // for the rest of the program; it is only read through atomic word loads.
    let region = unsafe { SharedRegion::new((), start as *mut u8, len) }
        .map_err(|_| FleetError::NoDirectory)?;
    Ok(Directory::open(region)?)
}

/// Whether target `id` still holds slot `index` (live, or ending: its rings still run). A
/// slot read mid-rewrite counts as held (the next look decides).
fn holds_slot(dir: &Dir, index: u32, id: u64) -> bool {
    match dir.slot(index) {
        Ok(slot) => {
            slot.target_id == id && matches!(slot.state, SlotState::Live | SlotState::Ending)
        }
        Err(_) => true,
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> alloc::string::String {
    use core::fmt::Write;
    let mut out = alloc::string::String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The target directory of a fleet appliance, opened.
pub struct Fleet {
    info: &'static BootInfo,
    dir: Dir,
}

impl Fleet {
    /// Opens the directory the kernel mapped ([`FleetError::NoDirectory`] when the shim gave
    /// none).
    pub fn open(info: &'static BootInfo) -> Result<Fleet, FleetError> {
        Ok(Fleet {
            info,
            dir: open_directory()?,
        })
    }

    /// The directory.
    pub fn directory(&self) -> &Dir {
        &self.dir
    }

    /// The compiled policy the shim handed over (`kvmi run --policy`), if any.
    pub fn policy(&self) -> Result<Option<CompiledPolicy>, FleetError> {
        let mut bytes = Vec::new();
        self.dir.policy(&mut bytes)?;
        if bytes.is_empty() {
            return Ok(None);
        }
        Ok(Some(CompiledPolicy::from_json(&bytes)?))
    }

    /// Serves every target with `job` until the stop word or [`Job::done`].
    pub fn run<J: Job>(&self, job: &mut J) -> Result<(), J::Error> {
        let count = self.dir.slot_count() as usize;
        let mut targets: Vec<Option<Served<J>>> = (0..count).map(|_| None).collect();
        let mut seen = None;
        // Events handled over all targets (for the fairness figure).
        let mut total = 0u64;
        loop {
            let generation = self.dir.generation();
            if seen != Some(generation) {
                seen = Some(generation);
                self.refresh(job, &mut targets)?;
            }
            let mut handled = 0;
            // Always in slot order: between two turns of a target every other target gets
            // exactly one turn, so its events wait for at most BUDGET events of each other.
            // A target whose rings or calls fail is dropped; the others are served on.
            for entry in targets.iter_mut() {
                let Some((target, _)) = entry.as_mut() else {
                    continue;
                };
                let mine = match target.agent.poll_at_most(BUDGET) {
                    Ok(mine) => mine as u64,
                    Err(e) => {
                        drop_target(entry, &J::Error::from(FleetError::from(e)));
                        continue;
                    }
                };
                if mine > 0
                    && let Some(end) = target.turn_end
                {
                    target.max_others_between_turns =
                        target.max_others_between_turns.max(total - end);
                }
                total += mine;
                target.turn_end = Some(total);
                handled += mine;
            }
            let now = crate::rdtsc();
            let events = targets
                .iter()
                .flatten()
                .map(|(t, _)| t.agent.stats().events)
                .sum();
            let done = self.dir.stop_requested() || job.done(events, now);
            for entry in targets.iter_mut() {
                let Some((target, state)) = entry.as_mut() else {
                    continue;
                };
                let worked = if done {
                    job.finish(target, state, now)
                } else {
                    job.tick(target, state, now)
                };
                let flushed = worked.and_then(|()| {
                    target
                        .agent
                        .flush_log()
                        .map_err(|e| J::Error::from(FleetError::from(e)))
                });
                if let Err(e) = flushed {
                    drop_target(entry, &e);
                }
            }
            if done {
                return Ok(());
            }
            if handled == 0 {
                // One hint per idle pass: a pass is itself a poll of every ring, and a longer
                // burst (a `pause` costs up to ~140 cycles) would only delay the next event.
                core::hint::spin_loop();
            }
        }
    }

    /// Re-reads the directory: new or replaced live slots are opened, gone ones dropped.
    fn refresh<J: Job>(
        &self,
        job: &mut J,
        targets: &mut [Option<Served<J>>],
    ) -> Result<(), J::Error> {
        for (i, entry) in targets.iter_mut().enumerate() {
            let Ok(slot) = self.dir.slot(i as u32) else {
                // Mid-rewrite or invalid: look again at the next generation.
                continue;
            };
            let current = entry.as_ref().map(|(t, _)| t.slot.target_id);
            match slot.state {
                SlotState::Live if current == Some(slot.target_id) => {}
                SlotState::Live => {
                    *entry = None;
                    // A target that cannot be opened (it went during set-up, or refused it)
                    // is left alone; the others are served on.
                    match self.open_target(job, slot) {
                        Ok(served) => *entry = Some(served),
                        Err(failure) => report_unopened(failure.1.as_ref(), &failure.0),
                    }
                }
                SlotState::Ending => {
                    // The target ended and its rings still run: its final report, then drop.
                    if let Some((mut target, mut state)) = entry.take() {
                        // Best effort: the target is gone either way.
                        let _ = job.finish(&mut target, &mut state, crate::rdtsc());
                        let _ = target.agent.flush_log();
                    }
                }
                SlotState::Gone | SlotState::Empty => *entry = None,
            }
        }
        Ok(())
    }

    /// Opens the live `slot`: link, handler, agent, state. On failure: why, and the link if
    /// it was opened (to report on the slot's log ring).
    fn open_target<J: Job>(&self, job: &mut J, slot: Slot) -> Result<Served<J>, Unopened<J>> {
        let discovery = Discovery {
            ring_gpa: slot.ring_gpa,
            ring_size: slot.ring_size,
            window_gpa: slot.window_gpa,
            window_size: slot.window_size,
            vcpu_count: self.info.vcpu_count,
        };
        let failed = |e: FleetError| Box::new((J::Error::from(e), None));
        let link = open_slot(discovery, slot.index).map_err(|e| failed(e.into()))?;
        // A target that goes while a command waits for its reply (its process died) ends the
        // wait: the call fails and the target is dropped, the others are served on.
        let watch = open_directory().map_err(failed)?;
        let (index, id) = (slot.index, slot.target_id);
        link.client
            .borrow_mut()
            .set_liveness(Box::new(move || holds_slot(&watch, index, id)));
        let handler = match job.handler(&slot, &link) {
            Ok(handler) => handler,
            Err(e) => return Err(Box::new((e, Some(link)))),
        };
        let agent = match Agent::new(&link.region, handler, link.waiting.clone()) {
            Ok(agent) => agent,
            Err(e) => return Err(Box::new((FleetError::from(e).into(), Some(link)))),
        };
        let mut target = Target {
            slot,
            link,
            agent,
            max_others_between_turns: 0,
            turn_end: None,
        };
        match job.start(&mut target) {
            Ok(state) => {
                // A log that cannot be flushed shows on the next pass (the target is dropped
                // then).
                let _ = target.agent.flush_log();
                Ok((target, state))
            }
            Err(e) => {
                drop_target(&mut Some((target, ())), &e);
                Err(Box::new((e, None)))
            }
        }
    }
}

/// The log line of a target dropped after `error`.
fn dropped_line(error: &impl core::fmt::Display) -> alloc::string::String {
    alloc::format!(
        "{{\"finding\":\"target_dropped\",\"error\":{}}}",
        json_string(&alloc::format!("{error}"))
    )
}

/// Drops the served target of `entry` after `error`, saying so on its log ring (the shim
/// labels the line with the target).
fn drop_target<H: EventHandler, S>(
    entry: &mut Option<(Target<H>, S)>,
    error: &impl core::fmt::Display,
) {
    if let Some((target, _)) = entry.as_mut() {
        target.agent.log().emit_json(dropped_line(error).as_bytes());
        let _ = target.agent.flush_log();
    }
    *entry = None;
}

/// Says on the slot's log ring (when its link was opened) that its target could not be
/// opened.
fn report_unopened(link: Option<&Link>, error: &impl core::fmt::Display) {
    let Some(link) = link else {
        return;
    };
    let Ok(ring) = link
        .region
        .producer_for(hypercall::discovery::RingKind::Log, 0)
    else {
        return;
    };
    let mut log = appliance::agent::LogWriter::new(ring);
    log.emit_json(dropped_line(error).as_bytes());
    let _ = log.flush(&link.waiting.notify);
}
