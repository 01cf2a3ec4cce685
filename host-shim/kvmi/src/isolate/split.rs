//! The supervisor of a split run: one appliance process and one process per target.
//!
//! Per target it makes a vhost-user socket pair, 32 key bytes and a token page; the target's
//! process gets its end of the pair and the page, the appliance process the other end, the
//! page and the key. A target process never receives the appliance's memory or another
//! target's. Targets with a start delay are spawned when it has passed. When the appliance
//! process ends while targets run, `--appliance-restarts` starts a new one and relinks every
//! running target to it (fresh socket pairs and keys); otherwise the targets run on,
//! unhooked. Ctrl-C stops the appliance first (the agent's final report), then the targets.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvmi_engine::tokens::{TargetKey, TokenPage};

use super::control::{KeyBytes, Message, Role};
use super::run::status_of;
use super::supervisor::{Ended, VmProcess};

/// How often the supervisor looks at its processes.
const WATCH_PERIOD: Duration = Duration::from_millis(10);
/// How long the appliance process gets to report and end after a stop, before the targets
/// are stopped too (the agent's grace, the VM's, and margin).
const APPLIANCE_STOP_GRACE: Duration = Duration::from_secs(7);
/// How long after its stop an appliance process that has not ended is killed.
const APPLIANCE_KILL_AFTER: Duration = Duration::from_secs(12);

/// One target of the run, spawned or not.
struct Member {
    /// Its place in the run's target list.
    index: u32,
    id: u64,
    name: String,
    start_after: Duration,
    /// Its token page (the supervisor keeps it to hand to a new appliance process).
    page: TokenPage,
    process: Option<VmProcess>,
    ended: Option<Ended>,
    /// Not spawned: the appliance was gone for good when it was due.
    skipped: bool,
}

impl Member {
    fn running(&self) -> bool {
        self.process.is_some() && self.ended.is_none()
    }

    fn pending(&self) -> bool {
        self.process.is_none() && !self.skipped
    }
}

/// A split run.
pub struct Split {
    words: Vec<String>,
    verbose: u8,
    members: Vec<Member>,
    restarts_left: u32,
    restarts: u32,
}

fn fresh_key() -> Result<KeyBytes> {
    Ok(KeyBytes(
        TargetKey::random_bytes().context("the OS random source")?,
    ))
}

impl Split {
    /// A split run of the `kvmi run` words `words` whose targets are `targets` (index in the
    /// run's list, name, start delay in ms), with `restarts` appliance restarts.
    pub fn new(
        words: Vec<String>,
        verbose: u8,
        targets: Vec<(u32, String, u64)>,
        restarts: u32,
    ) -> Split {
        // Ids as the in-process fleet gives them: the targets that start at once in order,
        // then the late ones by delay.
        let mut order: Vec<_> = targets.into_iter().collect();
        order.sort_by_key(|(_, _, after)| (*after > 0, *after));
        let members = order
            .into_iter()
            .enumerate()
            .filter_map(|(i, (index, name, after))| {
                let page = match TokenPage::create(&format!("kvmi-tokens-{name}")) {
                    Ok(page) => page,
                    Err(e) => {
                        vmm::devices::eprint_line(format_args!(
                            "kvmi: target {name}: no token page: {e}"
                        ));
                        return None;
                    }
                };
                Some(Member {
                    index,
                    id: i as u64 + 1,
                    name,
                    start_after: Duration::from_millis(after),
                    page,
                    process: None,
                    ended: None,
                    skipped: false,
                })
            })
            .collect();
        Split {
            words,
            verbose,
            members,
            restarts_left: restarts,
            restarts: 0,
        }
    }

    fn spawn_appliance(&self) -> Result<VmProcess> {
        VmProcess::spawn(
            "the appliance process".into(),
            Role::Appliance,
            self.verbose,
            &self.words,
            &[],
        )
        .context("starting the appliance process")
    }

    /// Links member `i` to `appliance` over a fresh socket pair with a fresh key: a new
    /// target process (`spawn`) or a running one told to relink.
    fn link(&mut self, i: usize, appliance: &VmProcess, spawn: bool, late: bool) -> Result<()> {
        let (appliance_end, target_end) = UnixStream::pair().context("a link socket pair")?;
        let key = fresh_key()?;
        let m = &mut self.members[i];
        let page = m.page.file().as_raw_fd();
        if spawn {
            m.process = Some(
                VmProcess::spawn(
                    format!("target {}", m.name),
                    Role::Target {
                        index: m.index,
                        id: m.id,
                        key,
                    },
                    self.verbose,
                    &self.words,
                    &[target_end.as_raw_fd(), page],
                )
                .with_context(|| format!("starting target {}", m.name))?,
            );
        } else if let Some(p) = &m.process {
            p.send(&Message::Relink { key }, &[target_end.as_raw_fd()])?;
        }
        appliance.send(
            &Message::Attach {
                index: m.index,
                id: m.id,
                key,
                late,
            },
            &[appliance_end.as_raw_fd(), page],
        )?;
        Ok(())
    }

    /// Runs until every target has ended (then the appliance is stopped), or Ctrl-C. Returns
    /// the run's exit status: the first target's.
    pub fn run(mut self, interrupted: &AtomicBool) -> Result<u8> {
        let started = Instant::now();
        let mut appliance = Some(self.spawn_appliance()?);
        let mut last_appliance = None;
        let mut stopping: Option<Instant> = None;
        let mut targets_stopped = false;
        loop {
            if stopping.is_none() && interrupted.load(Ordering::SeqCst) {
                stopping = Some(Instant::now());
                if let Some(a) = &appliance {
                    a.stop();
                }
            }
            // Targets stop once the appliance has reported (or its grace passed).
            if let Some(since) = stopping
                && !targets_stopped
                && (appliance.is_none() || since.elapsed() >= APPLIANCE_STOP_GRACE)
            {
                targets_stopped = true;
                for m in &self.members {
                    if let Some(p) = &m.process {
                        p.stop();
                    }
                }
            }
            // Targets that are due.
            for i in 0..self.members.len() {
                let m = &self.members[i];
                if !m.pending() || started.elapsed() < m.start_after {
                    continue;
                }
                let late = !m.start_after.is_zero();
                match (&appliance, stopping) {
                    (Some(app), None) => {
                        if let Err(e) = self.link(i, app, true, late) {
                            vmm::devices::eprint_line(format_args!("kvmi: {e:#}"));
                            self.members[i].skipped = true;
                        }
                    }
                    _ => {
                        vmm::devices::eprint_line(format_args!(
                            "kvmi: target {} could not join: no appliance is running",
                            self.members[i].name
                        ));
                        self.members[i].skipped = true;
                    }
                }
            }
            // Targets that ended.
            for m in &mut self.members {
                if m.ended.is_none()
                    && let Some(end) = m.process.as_mut().and_then(VmProcess::poll)
                {
                    m.ended = Some(end);
                    report(&format!("target {}", m.name), m.process.as_ref(), end);
                }
            }
            let targets_done = self.members.iter().all(|m| !m.running() && !m.pending());
            // The appliance.
            if let Some(end) = appliance.as_mut().and_then(VmProcess::poll) {
                report("the appliance process", appliance.as_ref(), end);
                let pid = appliance.as_ref().map_or(0, |a| a.pid);
                appliance = None;
                last_appliance = Some(end);
                if stopping.is_none() && !targets_done {
                    let why = match end {
                        Ended::Exited(_) => "the appliance VM ended".to_string(),
                        Ended::Signal(_) => format!("the appliance process (pid {pid}) {end}"),
                    };
                    appliance = self.replace_appliance(&why);
                }
            }
            if targets_done {
                match appliance.as_mut() {
                    Some(a) if stopping.is_none() => {
                        stopping = Some(Instant::now());
                        a.stop();
                    }
                    None => break,
                    // An appliance process that does not end after its stop is killed: the
                    // supervisor never waits on a stuck VM process.
                    Some(a) if stopping.is_some_and(|s| s.elapsed() >= APPLIANCE_KILL_AFTER) => {
                        vmm::devices::eprint_line(format_args!(
                            "kvmi: the appliance process (pid {}) did not end {} s after its \
                             stop; killing it",
                            a.pid,
                            APPLIANCE_KILL_AFTER.as_secs()
                        ));
                        a.kill();
                    }
                    Some(_) => {}
                }
            }
            std::thread::sleep(WATCH_PERIOD);
        }
        vmm::devices::eprint_line(format_args!(
            "kvmi: appliance process {}, restarts {}",
            last_appliance.map_or("not run".to_string(), |e| e.to_string()),
            self.restarts
        ));
        Ok(self
            .members
            .iter()
            .find(|m| m.id == 1)
            .and_then(|m| m.ended)
            .map_or(vmm::outcome::EXIT_VMM_ERROR, status_of))
    }

    /// After the appliance process ended (`why`): a new one with every running target
    /// relinked, while restarts remain; otherwise the targets run on, unhooked.
    fn replace_appliance(&mut self, why: &str) -> Option<VmProcess> {
        if self.restarts_left == 0 {
            vmm::devices::eprint_line(format_args!("kvmi: {why}; the targets run on, unhooked"));
            return None;
        }
        self.restarts_left -= 1;
        self.restarts += 1;
        let app = match self.spawn_appliance() {
            Ok(app) => app,
            Err(e) => {
                vmm::devices::eprint_line(format_args!(
                    "kvmi: {why}; restarting it failed: {e:#}; the targets run on, unhooked"
                ));
                return None;
            }
        };
        let mut relinked = 0;
        for i in 0..self.members.len() {
            if !self.members[i].running() {
                continue;
            }
            match self.link(i, &app, false, false) {
                Ok(()) => relinked += 1,
                Err(e) => tracing::warn!("relinking target {}: {e:#}", self.members[i].name),
            }
        }
        vmm::devices::eprint_line(format_args!(
            "kvmi: {why}; started appliance #{} for {relinked} targets",
            self.restarts
        ));
        Some(app)
    }
}

/// Says how process `label` ended: a death by a signal on stderr, an exit in the log (the
/// process printed its own reason).
fn report(label: &str, process: Option<&VmProcess>, end: Ended) {
    let pid = process.map_or(0, |p| p.pid);
    match end {
        Ended::Signal(_) => {
            vmm::devices::eprint_line(format_args!("kvmi: {label} (pid {pid}) {end}"))
        }
        Ended::Exited(_) => tracing::info!("{label} (pid {pid}) {end}"),
    }
}
