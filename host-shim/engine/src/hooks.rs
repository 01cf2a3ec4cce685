//! The introspector as the VM's [`ExitHook`]: every exit it cares about becomes an event
//! (when the tool enabled it), and the tool's action is carried out before re-entry.

use kvm_bindings::KVM_MSR_EXIT_REASON_FILTER;
use protocol::Action;
use protocol::event::EventPayload;

use super::Introspector;
use super::access::{AccessKind, PAGE, prot_for};
use super::alias::translate;
use super::decode::mem_operand;
use super::fault::{
    DataOutcome, StepOutcome, data_outcome, step_outcome, step_prot, upstream_access,
};
use super::msr::SHADOWED;
use super::slot::{Life, OneStep};
use super::vcpu_side::{Answer, DR6_BS, read_msr, update_shadow, write_msr};
use vmm::hook::{DebugEvent, ExitContext, ExitHook, HookResult, MmioAccess, MsrAccess};

/// An unknown guest-virtual address in a PF event.
const NO_GVA: u64 = u64::MAX;

/// The rip after an instruction of `len` bytes at `rip` (SKIP of a decoded instruction).
/// rip is guest-controlled: like the CPU, this wraps at the top of the address space.
fn next_rip(rip: u64, len: usize) -> u64 {
    rip.wrapping_add(len as u64)
}

fn action_of(a: &Answer) -> Option<Action> {
    match a {
        Answer::Reply(r) => Some(r.action),
        Answer::NotSent => None,
    }
}

impl Introspector {
    fn finish(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        match self.service(ctx) {
            Ok(()) => HookResult::Handled,
            Err(reason) => HookResult::Stop(reason),
        }
    }

    fn crash(&self, ctx: &ExitContext<'_>, what: &str) -> HookResult {
        HookResult::Stop(format!(
            "introspection tool answered CRASH to a {what} event on vCPU {}",
            ctx.vcpu_index()
        ))
    }

    fn gva_to_gpa(&self, ctx: &ExitContext<'_>, gva: u64) -> Option<u64> {
        let s = ctx.sregs();
        translate(&self.alias, s.cr0, s.cr3, gva)
    }

    /// Lifts the protection of `page` for one single-stepped instruction.
    fn step_through(&self, ctx: &mut ExitContext<'_>, page: u64, kind: AccessKind) {
        if let Err(e) = self.ram.protect(page, PAGE, step_prot(kind)) {
            tracing::error!("step-through unprotect {page:#x}: {e}");
        }
        let mut s = self.slots[ctx.vcpu_index() as usize].lock();
        s.step.through_page = Some(page);
        s.debug_dirty = true;
    }

    /// Re-protects the page of a completed step-through with its current restriction.
    fn end_step_through(&self, page: u64) {
        let prot = prot_for(self.access.lock().get(page));
        if let Err(e) = self.ram.protect(page, PAGE, prot) {
            tracing::error!("step-through re-protect {page:#x}: {e}");
        }
    }

    fn complete_data(&self, io: &mut MmioAccess<'_>, outcome: &DataOutcome) {
        match outcome {
            DataOutcome::WriteThrough => {
                self.alias.write(io.addr, io.data);
            }
            DataOutcome::DropWrite | DataOutcome::Crash => {}
            DataOutcome::ReadMemory => {
                self.alias.read(io.addr, io.data);
            }
            DataOutcome::ReadZeros => io.data.fill(0),
            DataOutcome::ReadContext(bytes) => {
                self.alias.read(io.addr, io.data);
                let n = bytes.len().min(io.data.len());
                io.data[..n].copy_from_slice(&bytes[..n]);
            }
        }
    }

    /// (Un)protects every tracked page: `true` restores each page's protection, `false`
    /// makes them all read-write.
    fn protect_all_tracked(&self, restore: bool) {
        let table = self.access.lock();
        for (page, access) in table.pages() {
            let prot = if restore {
                prot_for(access)
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            if let Err(e) = self.ram.protect(page, PAGE, prot) {
                tracing::error!("protect {page:#x}: {e}");
            }
        }
    }

    /// An instruction KVM could not emulate outside any no-exec page: if pages are tracked,
    /// it may be a data access the emulator cannot complete on a protected page (PVM cannot
    /// emulate e.g. `lock inc` as MMIO). Step it once with every tracked page unprotected
    /// (no event: the address is unknown); a second failure is the guest's own.
    fn emulation_fallback(&self, ctx: &mut ExitContext<'_>, insn: &[u8]) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        let tracked = !self.access.lock().is_empty();
        if !tracked || self.slots[i].lock().step.all_pages {
            return HookResult::Unhandled;
        }
        if let Some(op) = mem_operand(insn, ctx.regs()) {
            let base = match op.segment {
                4 => ctx.sregs().fs.base,
                5 => ctx.sregs().gs.base,
                _ => 0,
            };
            let gva = op.ea.wrapping_add(base);
            let kind = self.gva_to_gpa(ctx, gva).and_then(|gpa| {
                let t = self.access.lock();
                if t.restricts(gpa, AccessKind::Write) {
                    Some((gpa, AccessKind::Write))
                } else if t.restricts(gpa, AccessKind::Read) {
                    Some((gpa, AccessKind::Read))
                } else {
                    None
                }
            });
            if let Some((gpa, kind)) = kind {
                let payload = EventPayload::PageFault {
                    gva,
                    gpa,
                    mode: u32::from(kind.bit().bits()),
                };
                match action_of(&self.raise(ctx, payload, false)) {
                    Some(Action::Crash) => return self.crash(ctx, "PF"),
                    Some(Action::Skip) => {
                        let regs = ctx.regs_mut();
                        regs.rip = next_rip(regs.rip, op.len);
                        return self.finish(ctx);
                    }
                    Some(Action::Retry) => return self.finish(ctx),
                    _ => {}
                }
            }
        }
        {
            let mut s = self.slots[i].lock();
            s.step.all_pages = true;
            s.debug_dirty = true;
        }
        tracing::debug!(
            vcpu = i,
            rip = ctx.regs().rip,
            "stepping an unemulated access"
        );
        self.protect_all_tracked(false);
        self.finish(ctx)
    }

    /// The data address of the instruction at rip (read through the alias and decoded), for
    /// a fault reported without a gpa.
    fn fault_gpa_from_instruction(&self, ctx: &ExitContext<'_>) -> Option<(u64, usize)> {
        let rip = ctx.regs().rip;
        let mut insn = [0u8; 15];
        for (k, b) in insn.iter_mut().enumerate() {
            let g = self.gva_to_gpa(ctx, rip.wrapping_add(k as u64))?;
            let mut one = [0u8; 1];
            if !self.alias.read(g, &mut one) {
                return None;
            }
            *b = one[0];
        }
        let op = mem_operand(&insn, ctx.regs())?;
        let base = match op.segment {
            4 => ctx.sregs().fs.base,
            5 => ctx.sregs().gs.base,
            _ => 0,
        };
        self.gva_to_gpa(ctx, op.ea.wrapping_add(base))
            .map(|g| (g, op.len))
    }

    fn breakpoint_hit(&self, ctx: &mut ExitContext<'_>, rip: u64) -> HookResult {
        let gpa = self.gva_to_gpa(ctx, rip).unwrap_or(u64::MAX);
        let answer = self.raise(ctx, EventPayload::Breakpoint { gpa }, false);
        let action = action_of(&answer).unwrap_or(Action::Continue);
        if action == Action::Crash {
            return self.crash(ctx, "BREAKPOINT");
        }
        let now = ctx.regs().rip;
        let armed = self.breakpoints.lock().gvas.contains(&Some(now));
        if action == Action::Continue && armed {
            let mut s = self.slots[ctx.vcpu_index() as usize].lock();
            s.step.over_breakpoint = true;
            s.debug_dirty = true;
        }
        self.finish(ctx)
    }

    /// A guest INT3 (upstream `USE_SW_BP`: rip at the int3). CONTINUE re-injects #BP for the
    /// guest's own handler; RETRY/SKIP re-enter at rip as the tool left it.
    fn software_breakpoint(&self, ctx: &mut ExitContext<'_>, rip: u64) -> HookResult {
        let gpa = self.gva_to_gpa(ctx, rip).unwrap_or(u64::MAX);
        let answer = self.raise(ctx, EventPayload::Breakpoint { gpa }, false);
        match action_of(&answer).unwrap_or(Action::Continue) {
            Action::Crash => return self.crash(ctx, "BREAKPOINT"),
            Action::Continue => {
                let fd = ctx.vcpu_fd();
                if let Ok(mut ev) = fd.get_vcpu_events() {
                    ev.exception.injected = 1;
                    ev.exception.nr = 3;
                    ev.exception.has_error_code = 0;
                    ev.flags = 0;
                    if let Err(e) = fd.set_vcpu_events(&ev) {
                        tracing::warn!("re-injecting #BP: {e}");
                    }
                }
            }
            Action::Retry | Action::Skip => {}
        }
        self.finish(ctx)
    }

    fn singlestep(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let answer = self.raise(ctx, EventPayload::Singlestep, false);
        if action_of(&answer) == Some(Action::Crash) {
            return self.crash(ctx, "SINGLESTEP");
        }
        self.finish(ctx)
    }
}

impl ExitHook for Introspector {
    fn vcpu_start(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        if self.tsc_khz.load(std::sync::atomic::Ordering::Relaxed) == 0
            && let Ok(khz) = ctx.vcpu_fd().get_tsc_khz()
        {
            self.tsc_khz
                .store(u64::from(khz), std::sync::atomic::Ordering::Relaxed);
        }
        if !self.config.wait_for_tool {
            return HookResult::Handled;
        }
        self.wait_first_attach();
        let answer = self.raise(ctx, EventPayload::CreateVcpu, true);
        if action_of(&answer) == Some(Action::Crash) {
            return self.crash(ctx, "CREATE_VCPU");
        }
        self.finish(ctx)
    }

    fn halted(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        {
            let mut s = self.slots[i].lock();
            if s.life == Life::Live {
                s.life = Life::Halted;
            }
        }
        loop {
            if let Err(reason) = self.service(ctx) {
                return HookResult::Stop(reason);
            }
            let ended = self.handle.get().is_none_or(|h| h.has_ended());
            let all_halted = self.slots.iter().all(|s| s.lock().life != Life::Live);
            if ended || all_halted {
                return HookResult::Unhandled;
            }
            let s = self.slots[i].lock();
            if !s.mailbox.has_queued() && !s.pause_pending {
                drop(self.slots[i].wait(s, std::time::Duration::from_millis(50)));
            }
        }
    }

    fn vcpu_exit(&self, index: u32) {
        if let Some(slot) = self.slots.get(index as usize) {
            slot.lock().life = Life::Ended;
            slot.changed.notify_all();
        }
    }

    fn hypercall(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let r = ctx.regs();
        if r.rax != hypercall::call::Hypercall::Agent as u64
            || r.rdi != hypercall::call::AGENT_GUEST_REQUEST
        {
            return HookResult::Unhandled;
        }
        let answer = self.raise(ctx, EventPayload::Hypercall, false);
        if action_of(&answer) == Some(Action::Crash) {
            return self.crash(ctx, "HYPERCALL");
        }
        ctx.regs_mut().rax = 0;
        self.finish(ctx)
    }

    fn mmio(&self, ctx: &mut ExitContext<'_>, io: &mut MmioAccess<'_>) -> HookResult {
        if !self.alias.contains(io.addr, io.data.len() as u64) {
            return HookResult::Unhandled;
        }
        let kind = if io.write {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        let restricted = self.access.lock().restricts(io.addr, kind);
        let outcome = if restricted {
            let payload = EventPayload::PageFault {
                gva: NO_GVA,
                gpa: io.addr,
                mode: u32::from(kind.bit().bits()),
            };
            let answer = self.raise(ctx, payload, false);
            let ctx_data = match &answer {
                Answer::Reply(r) => r.ctx_data.clone(),
                Answer::NotSent => Vec::new(),
            };
            data_outcome(io.write, action_of(&answer), &ctx_data)
        } else {
            data_outcome(io.write, None, &[])
        };
        if outcome == DataOutcome::Crash {
            return self.crash(ctx, "PF");
        }
        self.complete_data(io, &outcome);
        self.finish(ctx)
    }

    fn debug(&self, ctx: &mut ExitContext<'_>, ev: &DebugEvent) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        if ev.exception == 3 && self.sw_breakpoints {
            return self.software_breakpoint(ctx, ev.pc);
        }
        if ev.exception != 1 {
            return HookResult::Unhandled;
        }
        let (step, stepping_enabled) = {
            let s = self.slots[i].lock();
            (s.step, s.events.contains(protocol::EventKind::Singlestep))
        };
        let stepped = ev.dr6 & DR6_BS != 0;
        if stepped && step.active() {
            {
                let mut s = self.slots[i].lock();
                s.step = OneStep::default();
                s.debug_dirty = true;
            }
            if let Some(page) = step.through_page {
                self.end_step_through(page);
            }
            if step.all_pages {
                self.protect_all_tracked(true);
            }
            if stepping_enabled {
                return self.singlestep(ctx);
            }
            return self.finish(ctx);
        }
        if ev.dr6 & 0xf != 0 {
            return self.breakpoint_hit(ctx, ev.pc);
        }
        if stepped {
            return self.singlestep(ctx);
        }
        // A stale exit (e.g. guest debug changed by a detach): resume.
        self.finish(ctx)
    }

    fn msr(&self, ctx: &mut ExitContext<'_>, m: &mut MsrAccess<'_>) -> HookResult {
        if !m.write || m.reason != KVM_MSR_EXIT_REASON_FILTER {
            return HookResult::Unhandled;
        }
        let i = ctx.vcpu_index() as usize;
        let (index, value) = (m.index, *m.data);
        let wanted = self.slots[i].lock().msrs.contains(&index)
            && self.enabled(ctx, protocol::EventKind::Msr);
        let mut write = Some(value);
        if wanted {
            let old = read_msr(ctx, index).unwrap_or(0);
            let payload = EventPayload::Msr {
                msr: index,
                old_value: old,
                new_value: value,
            };
            match self.raise(ctx, payload, false) {
                Answer::Reply(r) => match r.action {
                    Action::Crash => return self.crash(ctx, "MSR"),
                    Action::Skip | Action::Retry => write = None,
                    Action::Continue => write = Some(r.new_val.unwrap_or(value)),
                },
                Answer::NotSent => {}
            }
        }
        *m.error = 0;
        if let Some(v) = write {
            if write_msr(ctx, index, v) {
                if SHADOWED.contains(&index)
                    && let Some(shadow) = self.slots[i].lock().msr_shadow.as_mut()
                {
                    update_shadow(shadow, index, v);
                }
            } else {
                *m.error = 1;
            }
        }
        self.finish(ctx)
    }

    fn memory_fault(&self, ctx: &mut ExitContext<'_>, gpa: u64, _size: u64) -> HookResult {
        let mut skip_len = None;
        let gpa = if gpa == u64::MAX {
            match self.fault_gpa_from_instruction(ctx) {
                Some((g, len)) => {
                    skip_len = Some(len);
                    g
                }
                None => return HookResult::Unhandled,
            }
        } else {
            gpa
        };
        if !self.alias.contains(gpa, 1) {
            return HookResult::Unhandled;
        }
        let page = gpa & !(PAGE - 1);
        let allowed = self.access.lock().get(page);
        let rip = ctx.regs().rip;
        let rip_page = self.gva_to_gpa(ctx, rip).map(|g| g & !(PAGE - 1));
        let Some(kind) = upstream_access(allowed, rip_page == Some(page)) else {
            // Not (or no longer) restricted for this access: step it through the protection.
            let kind = if rip_page == Some(page) {
                AccessKind::Exec
            } else {
                AccessKind::Write
            };
            self.step_through(ctx, page, kind);
            return self.finish(ctx);
        };
        let gva = if kind == AccessKind::Exec {
            rip
        } else {
            NO_GVA
        };
        let payload = EventPayload::PageFault {
            gva,
            gpa,
            mode: u32::from(kind.bit().bits()),
        };
        let answer = self.raise(ctx, payload, false);
        let action = action_of(&answer);
        if action == Some(Action::Skip)
            && let Some(len) = skip_len
        {
            let regs = ctx.regs_mut();
            regs.rip = next_rip(regs.rip, len);
            return self.finish(ctx);
        }
        match step_outcome(action) {
            StepOutcome::Crash => return self.crash(ctx, "PF"),
            StepOutcome::StepThrough => self.step_through(ctx, page, kind),
            StepOutcome::Reenter => {}
        }
        self.finish(ctx)
    }

    fn emulation_failure(&self, ctx: &mut ExitContext<'_>, insn: &[u8]) -> HookResult {
        let rip = ctx.regs().rip;
        let Some(gpa) = self.gva_to_gpa(ctx, rip) else {
            return self.emulation_fallback(ctx, insn);
        };
        let page = gpa & !(PAGE - 1);
        let allowed = self.access.lock().get(page);
        if prot_for(allowed) != libc::PROT_NONE {
            return self.emulation_fallback(ctx, insn);
        }
        let action = if allowed.contains(protocol::types::Access::X) {
            None
        } else {
            let payload = EventPayload::PageFault {
                gva: rip,
                gpa,
                mode: u32::from(AccessKind::Exec.bit().bits()),
            };
            action_of(&self.raise(ctx, payload, false))
        };
        match step_outcome(action) {
            StepOutcome::Crash => return self.crash(ctx, "PF"),
            StepOutcome::StepThrough => self.step_through(ctx, page, AccessKind::Exec),
            StepOutcome::Reenter => {}
        }
        self.finish(ctx)
    }

    fn kicked(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        self.finish(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::next_rip;

    #[test]
    fn skipping_an_instruction_at_the_top_of_the_address_space_wraps() {
        assert_eq!(next_rip(0x1000, 8), 0x1008);
        assert_eq!(next_rip(u64::MAX - 1, 3), 1);
        assert_eq!(next_rip(u64::MAX, 15), 14);
        assert_eq!(next_rip(u64::MAX - 14, 15), 0);
    }
}
