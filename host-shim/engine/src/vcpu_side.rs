//! The vCPU-thread side: sending an event and waiting for its reply while serving queued
//! commands, running vCPU-scope commands with the vCPU's own fd and synced registers, and
//! loading the guest-debug state (breakpoints, single step).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_guest_debug, kvm_msr_entry,
};
use protocol::V4;
use protocol::error::ErrorCode;
use protocol::event::{Event, EventCommon, EventKind, EventMsrs, EventPayload};
use protocol::list::List;
use protocol::reply::{CommandResult, CpuidLeaf, Registers, Reply};
use protocol::types::MsrEntry;
use protocol::wire::WireProfile;
use zerocopy::IntoBytes;

use super::convert::{cpu_mode, regs_from_wire, regs_to_wire, sregs_to_wire};
use super::engine::{HW_BREAKPOINTS, Introspector, encode_result};
use super::msr::SHADOWED;
use super::slot::{AppliedDebug, Exchange, OwnedReply, PendingTrap, Slot, VcpuCommand};
use super::transport::{Channel, ReplyWait};
use vmm::hook::ExitContext;

/// How long a vCPU waiting for its event reply collects it itself from a polling transport
/// (the rings) before it sleeps on its slot. A tool answering within this budget costs no
/// thread hand-off.
const REPLY_POLL: Duration = Duration::from_micros(200);

/// Tells the channel when a vCPU's wait for its event reply ends, however it ends.
struct WaitDone(Arc<dyn Channel>, u32);

impl Drop for WaitDone {
    fn drop(&mut self) {
        self.0.reply_wait(self.1, ReplyWait::Done);
    }
}

/// DR6 bit of a completed single step.
pub(crate) const DR6_BS: u64 = 1 << 14;

fn read_msrs(ctx: &ExitContext<'_>, indices: &[u32]) -> Option<Vec<u64>> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).ok()?;
    let n = ctx.vcpu_fd().get_msrs(&mut msrs).ok()?;
    (n == indices.len()).then(|| msrs.as_slice().iter().map(|e| e.data).collect())
}

/// Writes one MSR with KVM_SET_MSRS; false if KVM refused the value.
pub(crate) fn write_msr(ctx: &ExitContext<'_>, index: u32, data: u64) -> bool {
    let entry = kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[entry])
        .ok()
        .and_then(|m| ctx.vcpu_fd().set_msrs(&m).ok())
        == Some(1)
}

/// Reads one MSR with KVM_GET_MSRS.
pub(crate) fn read_msr(ctx: &ExitContext<'_>, index: u32) -> Option<u64> {
    read_msrs(ctx, &[index]).map(|v| v[0])
}

fn shadow_from(values: &[u64], efer: u64) -> EventMsrs {
    EventMsrs {
        sysenter_cs: values[0],
        sysenter_esp: values[1],
        sysenter_eip: values[2],
        efer,
        star: values[3],
        lstar: values[4],
        cstar: values[5],
        pat: values[6],
    }
}

/// Updates a shadow after a write to one of the [`SHADOWED`] MSRs.
pub(crate) fn update_shadow(shadow: &mut EventMsrs, index: u32, value: u64) {
    match index {
        0x174 => shadow.sysenter_cs = value,
        0x175 => shadow.sysenter_esp = value,
        0x176 => shadow.sysenter_eip = value,
        0x277 => shadow.pat = value,
        0xc000_0081 => shadow.star = value,
        0xc000_0082 => shadow.lstar = value,
        0xc000_0083 => shadow.cstar = value,
        _ => {}
    }
}

/// How an event wait ended.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The tool answered.
    Reply(OwnedReply),
    /// No tool, the event is not enabled, or the tool went away: carry on as CONTINUE.
    NotSent,
}

impl Introspector {
    fn slot_index(ctx: &ExitContext<'_>) -> usize {
        ctx.vcpu_index() as usize
    }

    /// Whether `kind` is enabled for this vCPU (and allowed), with a tool attached.
    pub(crate) fn enabled(&self, ctx: &ExitContext<'_>, kind: EventKind) -> bool {
        self.is_attached()
            && self.masks.allows_event(kind)
            && self.slots[Self::slot_index(ctx)]
                .lock()
                .events
                .contains(kind)
    }

    fn event_common(&self, ctx: &ExitContext<'_>) -> EventCommon {
        let i = Self::slot_index(ctx);
        let shadow = self.slots[i].lock().msr_shadow;
        let sregs = ctx.sregs();
        let msrs = match shadow {
            Some(mut s) => {
                s.efer = sregs.efer;
                s
            }
            None => {
                let values = read_msrs(ctx, &SHADOWED).unwrap_or_else(|| vec![0; 7]);
                let s = shadow_from(&values, sregs.efer);
                self.slots[i].lock().msr_shadow = Some(s);
                s
            }
        };
        EventCommon {
            vcpu: ctx.vcpu_index() as u16,
            mode: cpu_mode(sregs),
            regs: regs_to_wire(ctx.regs()),
            sregs: sregs_to_wire(sregs),
            msrs,
        }
    }

    /// Sends `payload` as an event of this vCPU if the tool enabled it (`force`: send even
    /// if not enabled per vCPU, e.g. PAUSE_VCPU, CREATE_VCPU), then waits for the reply,
    /// serving queued commands meanwhile.
    pub(crate) fn raise(
        &self,
        ctx: &mut ExitContext<'_>,
        payload: EventPayload,
        force: bool,
    ) -> Answer {
        let kind = payload.kind();
        let allowed = if force {
            self.is_attached() && self.masks.allows_event(kind)
        } else {
            self.enabled(ctx, kind)
        };
        if !allowed {
            return Answer::NotSent;
        }
        let generation = self.current_generation();
        let event = Event {
            common: self.event_common(ctx),
            payload,
        };
        let seq = self
            .event_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut buf = vec![0u8; V4::event_len(&event)];
        let n = match V4::encode_event(seq, &event, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("cannot encode {kind:?} event: {e}");
                return Answer::NotSent;
            }
        };
        let i = Self::slot_index(ctx);
        {
            let mut s = self.slots[i].lock();
            s.exchange = Exchange::Sent { seq, kind };
            // The state the event shows is the vCPU's current one while it waits.
            s.note_view(ctx.sregs());
            if std::mem::take(&mut s.view_wanted) {
                self.slots[i].changed.notify_all();
            }
        }
        if !self.send_event(generation, seq, &event, &buf[..n], i as u32) {
            self.slots[i].lock().exchange = Exchange::Idle;
            return Answer::NotSent;
        }
        self.events_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let exempt = kind == EventKind::PauseVcpu;
        let answer = self.wait_reply(ctx, generation, exempt);
        self.slots[i].lock().exchange = Exchange::Idle;
        answer
    }

    fn wait_reply(&self, ctx: &mut ExitContext<'_>, generation: u64, exempt: bool) -> Answer {
        let i = Self::slot_index(ctx);
        let slot = &self.slots[i];
        let timeout = self.config.reply_timeout;
        let mut deadline = Instant::now() + timeout.unwrap_or(Duration::from_secs(3600));
        // On the rings this thread collects its own reply for a while (no hand-off through
        // the transport's service thread), then sleeps on the slot like a socket waiter.
        let mut polling = self
            .channel_of(generation)
            .filter(|channel| channel.polls_replies());
        let _done = polling.clone().map(|channel| {
            channel.reply_wait(i as u32, ReplyWait::Polling);
            WaitDone(channel, i as u32)
        });
        let poll_until = Instant::now() + REPLY_POLL;
        let mut s = slot.lock();
        let answer = loop {
            if matches!(s.exchange, Exchange::Answered(_))
                && let Exchange::Answered(r) = std::mem::take(&mut s.exchange)
            {
                break Answer::Reply(r);
            }
            if self.current_generation() != generation {
                break Answer::NotSent;
            }
            if let Some(cmd) = s.mailbox.start() {
                drop(s);
                let msg = self.run_vcpu_command(ctx, cmd.seq, &cmd.command);
                s = slot.lock();
                s.mailbox.finish(cmd.ticket, msg);
                slot.changed.notify_all();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                if exempt || timeout.is_none() {
                    deadline = now + Duration::from_secs(3600);
                    continue;
                }
                // A tool still talking (answering commands) keeps its vCPUs waiting, but only
                // for the reply timeout counted from its last message.
                if let Some(heard) = timeout.zip(self.last_heard()).map(|(t, at)| at + t)
                    && heard > now
                {
                    deadline = heard;
                    continue;
                }
                drop(s);
                tracing::warn!(
                    vcpu = i,
                    "the tool did not answer an event within {timeout:?}"
                );
                self.detach(generation, "event reply timeout");
                return Answer::NotSent;
            }
            if let Some(channel) = &polling {
                if now < poll_until {
                    drop(s);
                    if self.collect_replies(channel.as_ref(), generation, i) == 0 {
                        std::hint::spin_loop();
                    }
                    s = slot.lock();
                    continue;
                }
                // Slow tool: the transport's service thread delivers the reply from now on.
                channel.reply_wait(i as u32, ReplyWait::Blocked);
                polling = None;
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            s = slot.wait(s, wait).0;
        };
        drop(s);
        answer
    }

    /// Feeds the messages waiting on vCPU `i`'s reply ring to the engine (on this vCPU's
    /// thread); a bad ring or message detaches the tool. Returns how many were handled.
    fn collect_replies(&self, channel: &dyn Channel, generation: u64, i: usize) -> usize {
        let mut failure = None;
        let collected = channel.poll_replies(i as u32, &mut |message| {
            if failure.is_none()
                && let Err(e) = self.handle_message(generation, message)
            {
                failure = Some(e.to_string());
            }
        });
        match (collected, failure) {
            (Err(e), _) => {
                self.detach(generation, &format!("reply ring of vCPU {i}: {e}"));
                0
            }
            (Ok(_), Some(reason)) => {
                self.detach(generation, &reason);
                0
            }
            (Ok(n), None) => n,
        }
    }

    /// Runs everything pending for this vCPU before it re-enters the guest: a queued command,
    /// a requested pause (PAUSE_VCPU event), a TRAP event. `Err` = the tool answered CRASH.
    pub(crate) fn service(&self, ctx: &mut ExitContext<'_>) -> Result<(), String> {
        let i = Self::slot_index(ctx);
        loop {
            let (cmd, pause, trap) = {
                let mut s = self.slots[i].lock();
                s.note_view(ctx.sregs());
                if std::mem::take(&mut s.view_wanted) {
                    self.slots[i].changed.notify_all();
                }
                let pause = std::mem::take(&mut s.pause_pending);
                (s.mailbox.start(), pause, s.pending_trap.take())
            };
            if cmd.is_none() && !pause && trap.is_none() {
                break;
            }
            if let Some(cmd) = cmd {
                let msg = self.run_vcpu_command(ctx, cmd.seq, &cmd.command);
                self.slots[i].lock().mailbox.finish(cmd.ticket, msg);
                self.slots[i].changed.notify_all();
            }
            if let Some(t) = trap {
                let payload = EventPayload::Trap {
                    vector: t.vector,
                    kind: 3,
                    error_code: t.error_code,
                    cr2: t.cr2,
                };
                if let Answer::Reply(r) = self.raise(ctx, payload, false)
                    && r.action == protocol::Action::Crash
                {
                    return Err(format!("tool answered CRASH to a TRAP event on vCPU {i}"));
                }
            }
            if pause
                && let Answer::Reply(r) = self.raise(ctx, EventPayload::PauseVcpu, true)
                && r.action == protocol::Action::Crash
            {
                return Err(format!(
                    "tool answered CRASH to a PAUSE_VCPU event on vCPU {i}"
                ));
            }
        }
        self.sync_debug(ctx);
        Ok(())
    }

    /// Runs a vCPU-scope command (decoded by the reader thread) on this vCPU's thread;
    /// returns the reply message, under `seq`.
    pub(crate) fn run_vcpu_command(
        &self,
        ctx: &mut ExitContext<'_>,
        seq: u32,
        command: &VcpuCommand,
    ) -> Vec<u8> {
        let kind = command.kind();
        let encode = |result: &CommandResult<'_>| encode_result(kind, seq, result);
        match command {
            VcpuCommand::GetRegisters { msrs: indices } => {
                let values = if indices.is_empty() {
                    Some(Vec::new())
                } else {
                    read_msrs(ctx, indices)
                };
                let Some(values) = values else {
                    return encode(&Err(ErrorCode::Inval));
                };
                let entries: Vec<MsrEntry> = indices
                    .iter()
                    .zip(values)
                    .map(|(&index, data)| MsrEntry { index, data })
                    .collect();
                // Inside a read event the tool sees the registers it set, not yet loaded.
                let set = self.slots[Self::slot_index(ctx)]
                    .lock()
                    .pending_read
                    .and_then(|p| p.tool);
                encode(&Ok(Reply::Registers(Registers {
                    mode: cpu_mode(ctx.sregs()),
                    regs: regs_to_wire(set.as_ref().unwrap_or(ctx.regs())),
                    sregs: sregs_to_wire(ctx.sregs()),
                    msrs: List::from_slice(&entries),
                })))
            }
            VcpuCommand::SetRegisters { regs } => {
                let mut s = self.slots[Self::slot_index(ctx)].lock();
                if !s.exchange.in_event() {
                    return encode(&Err(ErrorCode::Again));
                }
                match s.pending_read.as_mut() {
                    // A read KVM has yet to complete: loaded once it has (merged with it).
                    Some(read) => read.tool = Some(regs_from_wire(regs)),
                    None => {
                        drop(s);
                        *ctx.regs_mut() = regs_from_wire(regs);
                    }
                }
                encode(&Ok(Reply::Empty))
            }
            VcpuCommand::GetXsave => match ctx.vcpu_fd().get_xsave() {
                Ok(x) => encode(&Ok(Reply::Xsave(x.region.as_bytes()))),
                Err(_) => encode(&Err(ErrorCode::NoMem)),
            },
            &VcpuCommand::GetCpuid { function, index } => {
                match ctx.vcpu_fd().get_cpuid2(KVM_MAX_CPUID_ENTRIES) {
                    Ok(cpuid) => {
                        let leaf = cpuid.as_slice().iter().find(|e| {
                            e.function == function
                                && (e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0
                                    || e.index == index)
                        });
                        match leaf {
                            Some(e) => encode(&Ok(Reply::Cpuid(CpuidLeaf {
                                eax: e.eax,
                                ebx: e.ebx,
                                ecx: e.ecx,
                                edx: e.edx,
                            }))),
                            None => encode(&Err(ErrorCode::NoEnt)),
                        }
                    }
                    Err(_) => encode(&Err(ErrorCode::NoMem)),
                }
            }
            &VcpuCommand::InjectException {
                vector,
                error_code,
                address,
            } => encode(&self.inject(ctx, vector, error_code, address)),
            &VcpuCommand::ControlEvents { events } => {
                let i = Self::slot_index(ctx);
                {
                    let mut s = self.slots[i].lock();
                    s.events = events;
                    s.debug_dirty = true;
                }
                self.sync_debug(ctx);
                encode(&Ok(Reply::Empty))
            }
        }
    }

    fn inject(
        &self,
        ctx: &mut ExitContext<'_>,
        vector: u8,
        error_code: Option<u16>,
        address: u64,
    ) -> CommandResult<'static> {
        let fd = ctx.vcpu_fd();
        let mut ev = fd.get_vcpu_events().map_err(|_| ErrorCode::Inval)?;
        if ev.exception.injected != 0 || ev.exception.pending != 0 {
            return Err(ErrorCode::Busy);
        }
        ev.exception.injected = 1;
        ev.exception.nr = vector;
        ev.exception.has_error_code = u8::from(error_code.is_some());
        ev.exception.error_code = u32::from(error_code.unwrap_or(0));
        ev.flags = 0;
        if vector == 14 {
            ctx.sregs_mut().cr2 = address;
        }
        ctx.vcpu_fd()
            .set_vcpu_events(&ev)
            .map_err(|_| ErrorCode::Inval)?;
        let i = Self::slot_index(ctx);
        self.slots[i].lock().pending_trap = Some(PendingTrap {
            vector: u32::from(vector),
            error_code: u32::from(error_code.unwrap_or(0)),
            cr2: address,
        });
        Ok(Reply::Empty)
    }

    /// The guest-debug state this vCPU should have now.
    pub(crate) fn wanted_debug(&self, s: &Slot) -> AppliedDebug {
        let mut d = AppliedDebug::default();
        let bps_on = s.events.contains(EventKind::Breakpoint)
            && self.masks.allows_event(EventKind::Breakpoint)
            && !s.step.over_breakpoint;
        if bps_on {
            let bps = self.breakpoints.lock();
            let mut dr7 = 0u64;
            for (n, gva) in bps.gvas.iter().enumerate().take(HW_BREAKPOINTS) {
                if let Some(gva) = gva {
                    d.debugreg[n] = *gva;
                    dr7 |= 1 << (2 * n);
                }
            }
            if dr7 != 0 {
                d.debugreg[7] = dr7 | 0x400;
                d.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            }
        }
        if self.sw_breakpoints
            && s.events.contains(EventKind::Breakpoint)
            && self.masks.allows_event(EventKind::Breakpoint)
        {
            d.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        let stepping = (s.events.contains(EventKind::Singlestep)
            && self.masks.allows_event(EventKind::Singlestep))
            || s.step.active();
        if stepping {
            d.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        d
    }

    /// Loads the guest-debug state if it changed (one KVM_SET_GUEST_DEBUG).
    pub(crate) fn sync_debug(&self, ctx: &mut ExitContext<'_>) {
        let i = Self::slot_index(ctx);
        let mut s = self.slots[i].lock();
        if !s.debug_dirty {
            return;
        }
        s.debug_dirty = false;
        let want = self.wanted_debug(&s);
        if want == s.applied {
            return;
        }
        let mut dbg = kvm_guest_debug {
            control: want.control,
            ..Default::default()
        };
        dbg.arch.debugreg = want.debugreg;
        match ctx.vcpu_fd().set_guest_debug(&dbg) {
            Ok(()) => s.applied = want,
            Err(e) => tracing::error!(vcpu = i, "KVM_SET_GUEST_DEBUG: {e}"),
        }
    }
}
