//! Running and stopping the VM: resuming held vCPUs as gdb's vCont asks, waiting for the
//! event that is a stop, pausing the other vCPUs (all-stop), and the events the stub answers
//! by itself.

use std::time::{Duration, Instant};

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadResume, MultiThreadSchedulerLocking, MultiThreadSchedulerLockingOps,
    MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::WatchKind as GdbWatchKind;
use kvmi_client::{ClientError, ReceivedEvent, neutral_data};
use protocol::types::Access;
use protocol::{Action, ErrorCode, EventKind, EventPayload};

use super::breakpoints::{WatchKind, page_of};
use super::events::{StopKind, Verdict, classify};
use super::target::{
    GdbError, Held, KvmiTarget, LIFT_WINDOW, REPEATS_BEFORE_LIFT, ResumeAction, STOP_TIMEOUT,
    base_events, tid,
};

impl KvmiTarget {
    /// Pauses every vCPU not held yet and holds the event each one stops in.
    pub(super) fn stop_all(&mut self) -> Result<(), GdbError> {
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
