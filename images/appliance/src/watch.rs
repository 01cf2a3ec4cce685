//! The live task list and the periodic summary.
//!
//! [`TaskWatch`] keeps the last listing of the target's task table and turns each new
//! listing into changes (a task appeared, changed state, was renamed, left its slot), each
//! printed as one JSON line ([`TaskLine`]). [`Rate`] turns counters sampled with the TSC into
//! per-second figures for the summary line.

use alloc::vec::Vec;

use appliance::tasks::{TaskInfo, TaskState};
use serde::Serialize;

/// What happened to a task between two listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Present in the first listing.
    Listed,
    /// A new task in a slot (free before, or held by another pid).
    New,
    /// The task's state changed (e.g. `ready` → `exited`).
    State,
    /// The task's name changed.
    Renamed,
    /// The slot was freed or taken by another pid.
    Gone,
}

/// One JSON line about a task: `{"finding":"task","change":…,"slot":…,"pid":…,"name":…,
/// "state":…,"parent":…,"cpu":…,"cr3":…}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskLine {
    /// Always `"task"`.
    pub finding: &'static str,
    /// What happened.
    pub change: Change,
    /// The task (for [`Change::Gone`], as last seen).
    #[serde(flatten)]
    pub task: TaskInfo,
}

/// The last listing and the differences to the next one.
#[derive(Clone, Debug, Default)]
pub struct TaskWatch {
    known: Option<Vec<TaskInfo>>,
}

impl TaskWatch {
    /// A watch that has seen no listing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tasks of the last listing.
    pub fn tasks(&self) -> &[TaskInfo] {
        self.known.as_deref().unwrap_or(&[])
    }

    /// Live tasks (ready or running) in the last listing.
    pub fn live(&self) -> usize {
        self.tasks()
            .iter()
            .filter(|t| matches!(t.state, TaskState::Ready | TaskState::Running))
            .count()
    }

    /// Records `now` and returns what changed since the last listing (the first listing
    /// reports every task as [`Change::Listed`]). Running ↔ ready flips are not reported
    /// (every context switch makes one).
    pub fn update(&mut self, now: Vec<TaskInfo>) -> Vec<TaskLine> {
        let line = |change, task: &TaskInfo| TaskLine {
            finding: "task",
            change,
            task: task.clone(),
        };
        let mut lines = Vec::new();
        match &self.known {
            None => lines.extend(now.iter().map(|t| line(Change::Listed, t))),
            Some(before) => {
                for old in before {
                    let same = now.iter().find(|t| t.slot == old.slot && t.pid == old.pid);
                    if same.is_none() {
                        lines.push(line(Change::Gone, old));
                    }
                }
                for task in &now {
                    let old = before
                        .iter()
                        .find(|t| t.slot == task.slot && t.pid == task.pid);
                    match old {
                        None => lines.push(line(Change::New, task)),
                        Some(old) if old.name != task.name => {
                            lines.push(line(Change::Renamed, task))
                        }
                        Some(old) if old.state != task.state && !scheduling(old, task) => {
                            lines.push(line(Change::State, task))
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        self.known = Some(now);
        lines
    }
}

/// Whether the change from `old` to `new` is only the scheduler's ready ↔ running.
fn scheduling(old: &TaskInfo, new: &TaskInfo) -> bool {
    use TaskState::{Ready, Running};
    matches!((old.state, new.state), (Ready, Running) | (Running, Ready))
}

/// A per-second rate from counter samples taken with the TSC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    tsc_hz: u64,
    last_tsc: u64,
    last_count: u64,
}

impl Rate {
    /// A rate starting at `tsc` with `count`, for a TSC ticking `tsc_hz` times a second.
    pub fn new(tsc_hz: u64, tsc: u64, count: u64) -> Self {
        Rate {
            tsc_hz,
            last_tsc: tsc,
            last_count: count,
        }
    }

    /// The rate since the last sample (0 when no time passed or the TSC went back), and
    /// starts a new interval.
    pub fn sample(&mut self, tsc: u64, count: u64) -> u64 {
        let ticks = tsc.saturating_sub(self.last_tsc);
        let delta = count.saturating_sub(self.last_count);
        self.last_tsc = tsc;
        self.last_count = count;
        if ticks == 0 {
            return 0;
        }
        (u128::from(delta) * u128::from(self.tsc_hz) / u128::from(ticks))
            .try_into()
            .unwrap_or(u64::MAX)
    }

    /// Milliseconds in `ticks` TSC ticks.
    pub fn millis(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1000 / u128::from(self.tsc_hz.max(1)))
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    fn task(slot: u32, pid: u32, name: &str, state: TaskState) -> TaskInfo {
        TaskInfo {
            slot,
            pid,
            name: String::from(name),
            state,
            parent: 1,
            cpu: 0,
            cr3: 0x20_0000 + u64::from(pid) * 0x1000,
        }
    }

    fn changes(lines: &[TaskLine]) -> Vec<(Change, u32)> {
        lines.iter().map(|l| (l.change, l.task.pid)).collect()
    }

    #[test]
    fn first_listing_lists_every_task_then_only_changes_are_reported() {
        let mut watch = TaskWatch::new();
        let first = vec![
            task(0, 1, "init", TaskState::Running),
            task(1, 2, "monitor", TaskState::Ready),
            task(2, 7, "worker-1", TaskState::Ready),
        ];
        let lines = watch.update(first.clone());
        assert_eq!(
            changes(&lines),
            [
                (Change::Listed, 1),
                (Change::Listed, 2),
                (Change::Listed, 7)
            ]
        );
        assert_eq!(watch.live(), 3);
        // Scheduling flips only: nothing to say.
        let mut flipped = first.clone();
        flipped[0].state = TaskState::Ready;
        flipped[1].state = TaskState::Running;
        assert!(watch.update(flipped).is_empty());
        // Worker exits, monitor renamed, slot 2 reused by pid 9, new task in slot 5.
        let next = vec![
            task(0, 1, "init", TaskState::Ready),
            task(1, 2, "kworker/0", TaskState::Ready),
            task(2, 9, "worker-2", TaskState::Ready),
            task(5, 10, "worker-3", TaskState::Ready),
        ];
        let lines = watch.update(next);
        assert_eq!(
            changes(&lines),
            [
                (Change::Gone, 7),
                (Change::Renamed, 2),
                (Change::New, 9),
                (Change::New, 10)
            ]
        );
        let exited = vec![task(0, 1, "init", TaskState::Exited)];
        let lines = watch.update(exited);
        assert_eq!(lines[lines.len() - 1].change, Change::State);
        assert_eq!(watch.live(), 0);
    }

    #[test]
    fn task_lines_are_flat_json() {
        let line = TaskLine {
            finding: "task",
            change: Change::New,
            task: task(3, 8, "worker-1", TaskState::Ready),
        };
        let json: serde_json::Value = serde_json::to_value(&line).unwrap();
        assert_eq!(json["finding"], "task");
        assert_eq!(json["change"], "new");
        assert_eq!(json["pid"], 8);
        assert_eq!(json["name"], "worker-1");
        assert_eq!(json["state"], "ready");
        assert_eq!(json["cr3"], 0x20_8000);
    }

    #[test]
    fn rates_scale_with_the_tsc_frequency() {
        let mut rate = Rate::new(2_000_000_000, 1_000, 0);
        // 500 events in 0.25 s.
        assert_eq!(rate.sample(1_000 + 500_000_000, 500), 2000);
        assert_eq!(rate.sample(1_000 + 500_000_000, 900), 0);
        assert_eq!(rate.millis(3_000_000_000), 1500);
    }
}
