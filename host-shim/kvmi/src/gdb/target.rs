//! The gdbstub target: a VM seen through its KVMI channel, one gdb thread per vCPU.
//!
//! All-stop: while gdb looks, every vCPU waits in a KVMI event the stub holds (a PAUSE_VCPU
//! event, or the BREAKPOINT / PAGE_FAULT / SINGLESTEP event it stopped on). Resuming answers
//! the held events; stopping pauses the vCPUs still running and collects their events.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint as GdbSwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use kvmi_client::{ClientError, KvmiClient, ReceivedEvent, RegisterState, neutral_data};
use protocol::event::EventSet;
use protocol::types::{Access, PageAccessEntry};
use protocol::{Action, ErrorCode, EventKind, EventPayload};

use super::breakpoints::{Bookkeeping, SwBreakpoint, Watch, WatchKind, page_of};
use super::events::{StopKind, Verdict, classify};
use super::memory::{AddressSpace, Mapping, PhysReader, WalkError, page_pieces, walk};
use super::regs::{GdbRegisters, KvmiX86_64, apply_write, fill_fpu, to_gdb};

/// How long stopping waits for a vCPU's pause event.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A command sent this often keeps held events from hitting the host's reply timeout.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// The same silent page fault this many times in a row on a vCPU means the host cannot
/// step the instruction through the restriction (on PVM, e.g. a CPL3 `lock inc` on a page
/// without read access): the page is lifted for [`LIFT_WINDOW`] so it can run.
const REPEATS_BEFORE_LIFT: u32 = 64;
/// How long such a page stays lifted.
const LIFT_WINDOW: Duration = Duration::from_millis(2);
/// Hardware breakpoint slots of the engine.
const HW_SLOTS: usize = 4;

/// Why the debugging session failed.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    /// A KVMI command failed or the channel closed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A vCPU did not pause in time.
    #[error("vCPU {0} did not pause within {STOP_TIMEOUT:?}")]
    PauseTimeout(u16),
    /// The VM has no vCPU.
    #[error("the VM reports no vCPU")]
    NoVcpu,
}

/// What gdb asked a vCPU to do at the next resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResumeAction {
    Continue,
    Step,
}

/// A vCPU's event the stub is holding (the vCPU waits for its reply).
#[derive(Clone, Copy, Debug)]
struct Held {
    event: ReceivedEvent,
    stop: StopKind,
    /// A stop gdb has not heard of (another vCPU's stop was reported): on resume it is
    /// answered RETRY where that makes the vCPU hit it again.
    unreported: bool,
}

#[derive(Debug, Default)]
struct Vcpu {
    held: Option<Held>,
    /// A PAUSE_VCPU was asked and its event not seen yet.
    pause_pending: bool,
    /// Resumed for one step (SINGLESTEP events on).
    stepping: bool,
    action: Option<ResumeAction>,
    /// Registers read since the vCPU stopped (and written by gdb).
    regs: Option<RegisterState>,
    /// The XSAVE area read since the vCPU stopped (empty: not available).
    xsave: Option<Vec<u8>>,
}

/// The VM as a gdbstub multi-thread target.
pub struct KvmiTarget {
    client: KvmiClient,
    vcpus: Vec<Vcpu>,
    hw: BTreeSet<u64>,
    book: Bookkeeping,
    /// `monitor cr3 VALUE`.
    cr3_override: Option<u64>,
    /// `monitor phys`.
    physical: bool,
    /// The vCPU gdb last addressed (breakpoints are translated in its address space).
    current: u16,
    /// vCPUs gdb gave no action continue (false: scheduler locking, they stay stopped).
    default_continue: bool,
    last_command: Instant,
    /// The last silent page fault `(vcpu, rip, gpa, mode)` and how often it came in a row.
    repeat: Option<((u16, u64, u64, u32), u32)>,
    /// Pages lifted for a stuck instruction, and since when.
    lifted: Vec<(u64, Instant)>,
    /// vCPUs whose step was not carried out (CPL3): reported as stepped at the next poll.
    pending_stops: Vec<u16>,
}

fn base_events() -> EventSet {
    [EventKind::Breakpoint, EventKind::PageFault]
        .into_iter()
        .collect()
}

fn tid(vcpu: u16) -> Tid {
    NonZeroUsize::new(usize::from(vcpu) + 1).unwrap_or(NonZeroUsize::MIN)
}

fn vcpu_of(tid: Tid) -> u16 {
    u16::try_from(tid.get() - 1).unwrap_or(u16::MAX)
}

/// Page-table entries read with READ_PHYSICAL.
struct ClientPhys<'a>(&'a KvmiClient);

impl PhysReader for ClientPhys<'_> {
    type Error = ClientError;
    fn read_u64(&mut self, gpa: u64) -> Result<u64, ClientError> {
        let bytes = self.0.read_physical(gpa, 8)?;
        let arr: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ClientError::Invalid("short READ_PHYSICAL reply".into()))?;
        Ok(u64::from_le_bytes(arr))
    }
}

fn nonfatal<T>(what: &str, e: impl std::fmt::Display) -> TargetResult<T, KvmiTarget> {
    tracing::info!("{what}: {e}");
    Err(TargetError::NonFatal)
}

impl KvmiTarget {
    /// Attaches: enables the events the stub needs and pauses every vCPU.
    pub fn attach(client: KvmiClient) -> Result<KvmiTarget, GdbError> {
        let count = client.get_guest_info()?.vcpu_count;
        if count == 0 {
            return Err(GdbError::NoVcpu);
        }
        let mut target = KvmiTarget {
            client,
            vcpus: (0..count).map(|_| Vcpu::default()).collect(),
            hw: BTreeSet::new(),
            book: Bookkeeping::default(),
            cr3_override: None,
            physical: false,
            current: 0,
            default_continue: true,
            repeat: None,
            lifted: Vec::new(),
            pending_stops: Vec::new(),
            last_command: Instant::now(),
        };
        for vcpu in 0..count {
            target.client.control_events(vcpu, base_events())?;
        }
        target.stop_all()?;
        tracing::info!("attached: {count} vCPUs paused");
        Ok(target)
    }

    /// Closes the KVMI channel: the host lifts every restriction and breakpoint and the
    /// paused vCPUs run on.
    pub fn detach(self) {
        self.client.close();
    }

    /// Sends a harmless command if none went out lately: the host waits for the replies to
    /// held events only a reply timeout after the tool's last message.
    pub fn keepalive(&mut self) {
        if self.last_command.elapsed() >= KEEPALIVE && self.client.closed().is_none() {
            if let Err(e) = self.client.get_version() {
                tracing::debug!("keepalive: {e}");
            }
            self.last_command = Instant::now();
        }
    }

    fn touch(&mut self) {
        self.last_command = Instant::now();
    }

    fn count(&self) -> u16 {
        self.vcpus.len() as u16
    }

    fn vcpu_index(&self, tid: Tid) -> Option<u16> {
        let v = vcpu_of(tid);
        (v < self.count()).then_some(v)
    }

    fn registers(&mut self, vcpu: u16) -> Result<RegisterState, ClientError> {
        if let Some(r) = &self.vcpus[usize::from(vcpu)].regs {
            return Ok(r.clone());
        }
        self.touch();
        let r = self.client.get_registers(vcpu, &[])?;
        self.vcpus[usize::from(vcpu)].regs = Some(r.clone());
        Ok(r)
    }

    /// The registers as gdb sees them (x87/SSE from GET_XSAVE where the host allows it).
    fn view(&mut self, vcpu: u16) -> Result<(RegisterState, GdbRegisters), ClientError> {
        let state = self.registers(vcpu)?;
        let mut view = to_gdb(&state.regs, &state.sregs);
        let i = usize::from(vcpu);
        if self.vcpus[i].xsave.is_none() {
            self.touch();
            let area = self.client.get_xsave(vcpu).unwrap_or_else(|e| {
                tracing::debug!("GET_XSAVE: {e}");
                Vec::new()
            });
            self.vcpus[i].xsave = Some(area);
        }
        if let Some(area) = &self.vcpus[i].xsave {
            fill_fpu(&mut view, area);
        }
        Ok((state, view))
    }

    fn space(&mut self, vcpu: u16) -> Result<AddressSpace, String> {
        if self.physical {
            return Ok(AddressSpace::Physical);
        }
        let r = self.registers(vcpu).map_err(|e| e.to_string())?;
        let s = &r.sregs;
        AddressSpace::of_vcpu::<ClientError>(
            s.cr0.get(),
            s.cr3.get(),
            s.cr4.get(),
            s.efer.get(),
            self.cr3_override,
        )
        .map_err(|e| e.to_string())
    }

    /// Translates `gva` for `vcpu` (`Ok(None)`: unmapped).
    fn translate(&mut self, vcpu: u16, gva: u64) -> Result<Option<u64>, String> {
        Ok(self.mapping(vcpu, gva)?.map(|m| m.gpa))
    }

    /// Translates `gva` for `vcpu`, with the mapping's user bit.
    fn mapping(&mut self, vcpu: u16, gva: u64) -> Result<Option<Mapping>, String> {
        let space = self.space(vcpu)?;
        self.touch();
        walk(&mut ClientPhys(&self.client), space, gva).map_err(|e| match e {
            WalkError::Read { gpa, source } => format!("page walk at {gpa:#x}: {source}"),
            other => other.to_string(),
        })
    }

    fn apply_access(&mut self, changes: &[(u64, Access)]) -> Result<(), ClientError> {
        if changes.is_empty() {
            return Ok(());
        }
        let entries: Vec<PageAccessEntry> = changes
            .iter()
            .map(|&(gpa, access)| PageAccessEntry { gpa, access })
            .collect();
        self.touch();
        self.client.set_page_access(0, &entries)
    }

    /// Pauses every vCPU not held yet and holds the event each one stops in.
    fn stop_all(&mut self) -> Result<(), GdbError> {
        for vcpu in 0..self.count() {
            let v = &mut self.vcpus[usize::from(vcpu)];
            if v.held.is_some() || v.pause_pending {
                continue;
            }
            match self.client.pause_vcpu(vcpu) {
                Ok(()) => {}
                Err(e) if e.kvm_code() == Some(ErrorCode::Busy) => {}
                Err(e) => return Err(e.into()),
            }
            self.vcpus[usize::from(vcpu)].pause_pending = true;
        }
        self.touch();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while let Some(waiting) = self.vcpus.iter().position(|v| v.held.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(ev) = self
                .client
                .next_event(left.min(Duration::from_millis(200)))?
            else {
                if Instant::now() >= deadline {
                    return Err(GdbError::PauseTimeout(waiting as u16));
                }
                self.keepalive();
                continue;
            };
            let vcpu = ev.event.common.vcpu;
            let Some(v) = self.vcpus.get_mut(usize::from(vcpu)) else {
                self.client.reply_continue(&ev)?;
                continue;
            };
            if v.held.is_some() {
                // Cannot happen (a held vCPU sends nothing); answer rather than hang it.
                self.client.reply_continue(&ev)?;
                continue;
            }
            let is_pause = ev.event.payload.kind() == EventKind::PauseVcpu;
            match classify(&ev.event, &self.book, &self.hw, v.stepping) {
                Verdict::Stop(stop) => {
                    if is_pause {
                        v.pause_pending = false;
                    }
                    v.held = Some(Held {
                        event: ev,
                        stop,
                        unreported: stop != StopKind::Paused,
                    });
                }
                Verdict::Silent => self.answer_silent(&ev)?,
            }
        }
        self.restore_lifted(true)
    }

    /// Waits up to `timeout` for a stop while vCPUs run; answers the events that are not one.
    pub fn poll(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<MultiThreadStopReason<u64>>, GdbError> {
        if self.client.closed().is_some() {
            return Ok(Some(MultiThreadStopReason::Exited(0)));
        }
        self.restore_lifted(false)?;
        if let Some(vcpu) = self.pending_stops.pop() {
            self.pending_stops.clear();
            self.stop_all()?;
            self.current = vcpu;
            return Ok(Some(self.stop_reason(vcpu, StopKind::Step)));
        }
        let timeout = if self.lifted.is_empty() {
            timeout
        } else {
            timeout.min(LIFT_WINDOW)
        };
        let ev = match self.client.next_event(timeout) {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                self.keepalive();
                return Ok(None);
            }
            Err(ClientError::Closed(reason)) => {
                tracing::info!("KVMI channel closed: {reason}");
                return Ok(Some(MultiThreadStopReason::Exited(0)));
            }
            Err(e) => return Err(e.into()),
        };
        let vcpu = ev.event.common.vcpu;
        tracing::debug!(
            vcpu,
            event = ?ev.event.payload,
            rip = format_args!("{:#x}", ev.event.common.regs.rip.get()),
            "event"
        );
        let Some(v) = self.vcpus.get_mut(usize::from(vcpu)) else {
            self.client.reply_continue(&ev)?;
            return Ok(None);
        };
        if ev.event.payload.kind() == EventKind::PauseVcpu {
            // A pause asked during an earlier stop, delivered once the vCPU was resumed.
            v.pause_pending = false;
            self.client.reply_continue(&ev)?;
            return Ok(None);
        }
        let stop = match classify(&ev.event, &self.book, &self.hw, v.stepping) {
            Verdict::Silent => {
                self.answer_silent(&ev)?;
                return Ok(None);
            }
            Verdict::Stop(stop) => stop,
        };
        self.repeat = None;
        let held_event = match stop {
            StopKind::Watch { .. } => self.complete_access(vcpu, &ev)?,
            _ => ev,
        };
        self.vcpus[usize::from(vcpu)].held = Some(Held {
            event: held_event,
            stop,
            unreported: false,
        });
        self.stop_all()?;
        self.current = vcpu;
        Ok(Some(self.stop_reason(vcpu, stop)))
    }

    /// Answers an event that is no stop: CONTINUE, unless the same page fault keeps coming
    /// back (the host cannot step that instruction through the restriction): then the page
    /// is lifted for a moment and the instruction re-entered (RETRY).
    fn answer_silent(&mut self, ev: &ReceivedEvent) -> Result<(), GdbError> {
        let EventPayload::PageFault { gpa, mode, .. } = ev.event.payload else {
            self.repeat = None;
            return Ok(self.client.reply_continue(ev)?);
        };
        let key = (
            ev.event.common.vcpu,
            ev.event.common.regs.rip.get(),
            gpa,
            mode,
        );
        // Only native CPL3 code gets stuck (the host emulates CPL0 accesses).
        let user = ev.event.common.sregs.cs.dpl == 3;
        let count = match self.repeat {
            Some((k, n)) if k == key && user => n + 1,
            _ => 1,
        };
        self.repeat = Some((key, count));
        if count < REPEATS_BEFORE_LIFT {
            return Ok(self.client.reply_continue(ev)?);
        }
        let page = page_of(gpa);
        tracing::warn!(
            vcpu = key.0,
            rip = format_args!("{:#x}", key.1),
            "the host cannot step this instruction through the page's restriction: page \
             {page:#x} lifted for {LIFT_WINDOW:?} (accesses meanwhile are not watched)"
        );
        self.repeat = None;
        self.lift(ev)?;
        self.client.reply(ev, Action::Retry, neutral_data(ev))?;
        Ok(())
    }

    /// Puts back the restrictions of lifted pages (all of them with `now`, else those whose
    /// window passed).
    fn restore_lifted(&mut self, now: bool) -> Result<(), GdbError> {
        let due: Vec<u64> = self
            .lifted
            .iter()
            .filter(|(_, at)| now || at.elapsed() >= LIFT_WINDOW)
            .map(|(p, _)| *p)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        self.lifted.retain(|(p, _)| !due.contains(p));
        let changes: Vec<(u64, Access)> = due
            .into_iter()
            .map(|p| (p, self.book.access_for(p)))
            .filter(|(_, a)| *a != Access::RWX)
            .collect();
        Ok(self.apply_access(&changes)?)
    }

    /// Lets a watched access complete (gdb compares the value after it) and holds the vCPU
    /// after it: CPL0 code by a single step ([`Self::step_past_access`]), CPL3 code (which
    /// cannot be stepped here) by a pause asked before the reply. Where the host cannot step
    /// a CPL3 instruction through the restriction (the pause finds it still at the access),
    /// the page is lifted and the vCPU run until a second pause: it stops a few
    /// instructions after the access.
    fn complete_access(
        &mut self,
        vcpu: u16,
        ev: &ReceivedEvent,
    ) -> Result<ReceivedEvent, GdbError> {
        if ev.event.common.sregs.cs.dpl != 3 {
            return self.step_past_access(vcpu, ev);
        }
        self.pause(vcpu)?;
        self.client.reply_continue(ev)?;
        let rip = ev.event.common.regs.rip;
        // A CPL3 access is reported at its instruction: a pause still there means it did
        // not run (the host could not step it through the restriction).
        let user = ev.event.common.sregs.cs.dpl == 3;
        let mut lifted = false;
        let mut delay = Duration::from_micros(100);
        loop {
            let next = self
                .client
                .next_event_matching(STOP_TIMEOUT, |e| e.event.common.vcpu == vcpu)?
                .ok_or(GdbError::PauseTimeout(vcpu))?;
            let stuck = user && next.event.common.regs.rip == rip;
            match next.event.payload {
                EventPayload::PauseVcpu if stuck && delay < Duration::from_millis(100) => {
                    if !lifted {
                        tracing::info!(
                            vcpu,
                            "the host cannot step the watched access through; lifting its page"
                        );
                        self.lift(ev)?;
                        lifted = true;
                    }
                    // Let it run a moment (a pause right away would stop it before the
                    // instruction), then pause again.
                    self.client.reply_continue(&next)?;
                    std::thread::sleep(delay);
                    delay *= 2;
                    self.pause(vcpu)?;
                }
                EventPayload::PauseVcpu => {
                    self.vcpus[usize::from(vcpu)].pause_pending = false;
                    if lifted {
                        self.restore_lifted(true)?;
                    }
                    return Ok(next);
                }
                _ => self.client.reply_continue(&next)?,
            }
        }
    }

    /// CPL0 code (which the host can single-step): CONTINUE the access with SINGLESTEP on
    /// and hold the vCPU in the SINGLESTEP event after the instruction (where the host
    /// reports the access with rip already past it, one instruction later).
    fn step_past_access(
        &mut self,
        vcpu: u16,
        ev: &ReceivedEvent,
    ) -> Result<ReceivedEvent, GdbError> {
        let i = usize::from(vcpu);
        let was_stepping = self.vcpus[i].stepping;
        if !was_stepping {
            self.client
                .control_events(vcpu, base_events().with(EventKind::Singlestep))?;
        }
        self.client.reply_continue(ev)?;
        loop {
            let next = self
                .client
                .next_event_matching(STOP_TIMEOUT, |e| e.event.common.vcpu == vcpu)?
                .ok_or(GdbError::PauseTimeout(vcpu))?;
            match next.event.payload {
                EventPayload::Singlestep => {
                    if !was_stepping {
                        self.client.control_events(vcpu, base_events())?;
                    }
                    return Ok(next);
                }
                EventPayload::PauseVcpu => {
                    self.vcpus[i].pause_pending = false;
                    self.client.reply_continue(&next)?;
                }
                _ => self.client.reply_continue(&next)?,
            }
        }
    }

    /// Lifts the restriction of the page `ev` (a page fault) hit, until `restore_lifted`.
    fn lift(&mut self, ev: &ReceivedEvent) -> Result<(), GdbError> {
        if let EventPayload::PageFault { gpa, .. } = ev.event.payload {
            let page = page_of(gpa);
            self.apply_access(&[(page, Access::RWX)])?;
            self.lifted.push((page, Instant::now()));
        }
        Ok(())
    }

    /// PAUSE_VCPU (a pause already pending is fine).
    fn pause(&mut self, vcpu: u16) -> Result<(), GdbError> {
        self.touch();
        match self.client.pause_vcpu(vcpu) {
            Ok(()) => Ok(()),
            Err(e) if e.kvm_code() == Some(ErrorCode::Busy) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn stop_reason(&self, vcpu: u16, stop: StopKind) -> MultiThreadStopReason<u64> {
        let tid = tid(vcpu);
        match stop {
            StopKind::Step => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            },
            StopKind::HwBreak => MultiThreadStopReason::HwBreak(tid),
            StopKind::SwBreak => MultiThreadStopReason::SwBreak(tid),
            StopKind::Watch { kind, addr } => MultiThreadStopReason::Watch {
                tid,
                kind: match kind {
                    WatchKind::Write => GdbWatchKind::Write,
                    WatchKind::Read => GdbWatchKind::Read,
                    WatchKind::Access => GdbWatchKind::ReadWrite,
                },
                addr,
            },
            StopKind::Paused => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGINT,
            },
        }
    }

    /// gdb's interrupt (Ctrl-C): pause every vCPU, report SIGINT on the first.
    pub fn interrupt(&mut self) -> Result<MultiThreadStopReason<u64>, GdbError> {
        self.stop_all()?;
        let vcpu = self.current.min(self.count() - 1);
        Ok(self.stop_reason(vcpu, StopKind::Paused))
    }

    /// Whether `vcpu` (held) runs at CPL3.
    fn at_cpl3(&mut self, vcpu: u16) -> bool {
        let held = self.vcpus[usize::from(vcpu)].held;
        held.map(|h| h.event.event.common.sregs.cs.dpl == 3)
            .or_else(|| self.registers(vcpu).ok().map(|r| r.sregs.cs.dpl == 3))
            .unwrap_or(false)
    }

    fn do_resume(&mut self) -> Result<(), GdbError> {
        for vcpu in 0..self.count() {
            let i = usize::from(vcpu);
            let action = self.vcpus[i].action.take();
            let default = self.default_continue.then_some(ResumeAction::Continue);
            let Some(action) = action.or(default) else {
                continue;
            };
            let stepping = action == ResumeAction::Step;
            if stepping && self.at_cpl3(vcpu) {
                // On this host a single step of native CPL3 code reaches the guest as #DB
                // (and kills the task): the vCPU stays where it is and the step "completes".
                tracing::warn!(
                    vcpu,
                    "cannot single-step CPL3 code here (the guest would take #DB): not stepped"
                );
                self.pending_stops.push(vcpu);
                continue;
            }
            let Some(held) = self.vcpus[i].held.take() else {
                continue;
            };
            if stepping != self.vcpus[i].stepping {
                let events = if stepping {
                    base_events().with(EventKind::Singlestep)
                } else {
                    base_events()
                };
                self.client.control_events(vcpu, events)?;
            }
            self.vcpus[i].stepping = stepping;
            self.vcpus[i].regs = None;
            self.vcpus[i].xsave = None;
            let kind = held.event.event.payload.kind();
            // A breakpoint gdb did not hear of is met again by re-entering at rip.
            let retry =
                held.unreported && matches!(held.stop, StopKind::HwBreak | StopKind::SwBreak);
            let action = if retry && kind != EventKind::PauseVcpu {
                Action::Retry
            } else {
                Action::Continue
            };
            tracing::debug!(vcpu, ?action, stepping, event = ?kind, "resuming");
            self.client
                .reply(&held.event, action, neutral_data(&held.event))?;
        }
        self.touch();
        Ok(())
    }
}

impl Target for KvmiTarget {
    type Arch = KvmiX86_64;
    type Error = GdbError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_extended_mode(
        &mut self,
    ) -> Option<gdbstub::target::ext::extended_mode::ExtendedModeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for KvmiTarget {
    fn read_registers(&mut self, regs: &mut GdbRegisters, tid: Tid) -> TargetResult<(), Self> {
        let Some(vcpu) = self.vcpu_index(tid) else {
            return Err(TargetError::NonFatal);
        };
        self.current = vcpu;
        match self.view(vcpu) {
            Ok((_, view)) => {
                *regs = view;
                Ok(())
            }
            Err(e) => nonfatal("reading registers", e),
        }
    }

    fn write_registers(&mut self, regs: &GdbRegisters, tid: Tid) -> TargetResult<(), Self> {
        let Some(vcpu) = self.vcpu_index(tid) else {
            return Err(TargetError::NonFatal);
        };
        let (state, current) = match self.view(vcpu) {
            Ok(v) => v,
            Err(e) => return nonfatal("reading registers", e),
        };
        let new = match apply_write(&state.regs, &current, regs) {
            Ok(n) => n,
            Err(e) => return nonfatal("writing registers", e),
        };
        self.touch();
        if let Err(e) = self.client.set_registers(vcpu, &new) {
            return nonfatal("SET_REGISTERS", e);
        }
        if let Some(r) = &mut self.vcpus[usize::from(vcpu)].regs {
            r.regs = new;
        }
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let vcpu = self.vcpu_index(tid).unwrap_or(self.current);
        let mut done = 0;
        for (addr, len) in page_pieces(start, data.len()) {
            let gpa = match self.translate(vcpu, addr) {
                Ok(Some(gpa)) => gpa,
                Ok(None) => break,
                Err(e) => {
                    tracing::info!("reading {addr:#x}: {e}");
                    break;
                }
            };
            self.touch();
            match self.client.read_physical(gpa, len as u64) {
                Ok(bytes) if bytes.len() == len => {
                    data[done..done + len].copy_from_slice(&bytes);
                    done += len;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::info!("READ_PHYSICAL {gpa:#x}: {e}");
                    break;
                }
            }
        }
        if done == 0 && !data.is_empty() {
            return Err(TargetError::Errno(14));
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self.vcpu_index(tid).unwrap_or(self.current);
        let mut done = 0;
        for (addr, len) in page_pieces(start, data.len()) {
            let gpa = match self.translate(vcpu, addr) {
                Ok(Some(gpa)) => gpa,
                Ok(None) => return Err(TargetError::Errno(14)),
                Err(e) => return nonfatal("writing memory", e),
            };
            self.touch();
            if let Err(e) = self.client.write_physical(gpa, &data[done..done + len]) {
                return nonfatal("WRITE_PHYSICAL", e);
            }
            done += len;
        }
        Ok(())
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), GdbError> {
        for vcpu in 0..self.count() {
            thread_is_active(tid(vcpu));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl ThreadExtraInfo for KvmiTarget {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, GdbError> {
        let text = format!("vCPU {}", vcpu_of(tid));
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

impl MultiThreadResume for KvmiTarget {
    fn resume(&mut self) -> Result<(), GdbError> {
        if let Some(reason) = self.client.closed() {
            // The VM is gone: the next poll reports its exit.
            tracing::info!("not resuming: {reason}");
            return Ok(());
        }
        self.do_resume()
    }

    fn clear_resume_actions(&mut self) -> Result<(), GdbError> {
        for v in &mut self.vcpus {
            v.action = None;
        }
        self.default_continue = true;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), GdbError> {
        if let Some(vcpu) = self.vcpu_index(tid) {
            self.vcpus[usize::from(vcpu)].action = Some(ResumeAction::Continue);
        }
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for KvmiTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), GdbError> {
        self.default_continue = false;
        Ok(())
    }
}

impl MultiThreadSingleStep for KvmiTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), GdbError> {
        if let Some(vcpu) = self.vcpu_index(tid) {
            self.vcpus[usize::from(vcpu)].action = Some(ResumeAction::Step);
        }
        Ok(())
    }
}

impl Breakpoints for KvmiTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl GdbSwBreakpoint for KvmiTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.book.sw_at(addr, None).is_some() {
            return Ok(true);
        }
        let gpa = match self.mapping(self.current, addr) {
            Ok(Some(Mapping { user: true, .. })) => {
                // On PVM the host cannot step CPL3 code through a no-exec page: the guest
                // would take a #DB at every instruction stepped there.
                tracing::warn!(
                    "no software breakpoint at {addr:#x}: the page is user-accessible (on this \
                     host CPL3 code can neither be stepped through a no-exec page nor \
                     hardware-breakpointed)"
                );
                return Ok(false);
            }
            Ok(Some(m)) => m.gpa,
            Ok(None) => return Ok(false),
            Err(e) => return nonfatal("breakpoint address", e),
        };
        let changes = self.book.add_sw(SwBreakpoint { gva: addr, gpa });
        if let Err(e) = self.apply_access(&changes) {
            tracing::warn!("software breakpoint at {addr:#x} (gpa {gpa:#x}): {e}");
            self.book.remove_sw(addr);
            return Ok(false);
        }
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(changes) = self.book.remove_sw(addr) else {
            return Ok(false);
        };
        if let Err(e) = self.apply_access(&changes) {
            return nonfatal("restoring page access", e);
        }
        Ok(true)
    }
}

impl HwBreakpoint for KvmiTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.hw.contains(&addr) {
            return Ok(true);
        }
        if self.hw.len() >= HW_SLOTS {
            return Ok(false);
        }
        self.touch();
        match self.client.control_breakpoint(None, addr, true) {
            Ok(()) => {
                self.hw.insert(addr);
                Ok(true)
            }
            Err(e) => {
                tracing::warn!("hardware breakpoint at {addr:#x}: {e}");
                Ok(false)
            }
        }
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if !self.hw.remove(&addr) {
            return Ok(false);
        }
        self.touch();
        match self.client.control_breakpoint(None, addr, false) {
            Ok(()) => Ok(true),
            Err(e) => nonfatal("clearing a hardware breakpoint", e),
        }
    }
}

fn watch_kind(kind: GdbWatchKind) -> WatchKind {
    match kind {
        GdbWatchKind::Write => WatchKind::Write,
        GdbWatchKind::Read => WatchKind::Read,
        GdbWatchKind::ReadWrite => WatchKind::Access,
    }
}

impl HwWatchpoint for KvmiTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let Ok(n) = usize::try_from(len) else {
            return Ok(false);
        };
        if n == 0 || n > 1 << 20 {
            return Ok(false);
        }
        let mut pieces = Vec::new();
        for (gva, piece) in page_pieces(addr, n) {
            match self.translate(self.current, gva) {
                Ok(Some(gpa)) => pieces.push((gpa, piece as u64)),
                Ok(None) => return Ok(false),
                Err(e) => return nonfatal("watchpoint address", e),
            }
        }
        let kind = watch_kind(kind);
        let changes = self.book.add_watch(Watch {
            gva: addr,
            len,
            kind,
            pieces,
        });
        if let Err(e) = self.apply_access(&changes) {
            tracing::warn!("watchpoint at {addr:#x}: {e}");
            if let Some(undo) = self.book.remove_watch(addr, len, kind) {
                let _ = self.apply_access(&undo);
            }
            return Ok(false);
        }
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let Some(changes) = self.book.remove_watch(addr, len, watch_kind(kind)) else {
            return Ok(false);
        };
        if let Err(e) = self.apply_access(&changes) {
            return nonfatal("restoring page access", e);
        }
        Ok(true)
    }
}

/// `monitor help`.
pub const MONITOR_HELP: &str = "\
kvmi gdb monitor commands:
  monitor cr3 VALUE   translate memory accesses through this page-table root
  monitor cr3 auto    use the current thread's CR3 again (the default)
  monitor phys        memory addresses are guest-physical
  monitor virt        memory addresses are virtual again (the default)
  monitor pages       the pages breakpoints and watchpoints restrict
  monitor help        this list";

impl MonitorCmd for KvmiTarget {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), GdbError> {
        let text = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["cr3", "auto"] => {
                self.cr3_override = None;
                gdbstub::outputln!(out, "memory: through the current thread's CR3");
            }
            ["cr3", value] => match crate::cli::parse_number(value) {
                Ok(cr3) => {
                    self.cr3_override = Some(cr3);
                    gdbstub::outputln!(out, "memory: through CR3 {cr3:#x}");
                }
                Err(e) => gdbstub::outputln!(out, "{e}"),
            },
            ["phys"] => {
                self.physical = true;
                gdbstub::outputln!(out, "memory: guest-physical addresses");
            }
            ["virt"] => {
                self.physical = false;
                gdbstub::outputln!(out, "memory: virtual addresses");
            }
            ["pages"] => {
                for (gpa, access) in self.book.restricted_pages() {
                    let access = kvmi_client::access_string(access);
                    gdbstub::outputln!(out, "page {gpa:#x}: {access}");
                }
                let hw = self.hw.len();
                let sw = self.book.sw_count();
                gdbstub::outputln!(out, "{sw} software, {hw} hardware breakpoints");
            }
            ["help"] | [] => gdbstub::outputln!(out, "{MONITOR_HELP}"),
            _ => gdbstub::outputln!(out, "unknown monitor command `{text}`\n{MONITOR_HELP}"),
        }
        Ok(())
    }
}
