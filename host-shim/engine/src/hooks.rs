//! The introspector as the VM's [`ExitHook`]: every exit it cares about becomes an event
//! (when the tool enabled it), and the tool's action is carried out before re-entry.

use kvm_bindings::KVM_MSR_EXIT_REASON_FILTER;
use protocol::Action;
use protocol::event::EventPayload;

use super::Introspector;
use super::access::{AccessKind, PAGE, prot_for};
use super::alias::translate;
use super::decode::{MemOperand, cpl_neutral, mem_operand};
use super::fault::{
    DataOutcome, StepOutcome, data_outcome, step_outcome, step_prot, upstream_access,
};
use super::msr::SHADOWED;
use super::slot::{Life, OneStep, PendingRead, UserMode};
use super::vcpu_side::{Answer, DR6_BS, read_msr, update_shadow, write_msr};
use super::walked;
use vmm::hook::{DebugEvent, ExitContext, ExitHook, HookResult, MmioAccess, MsrAccess};

/// An unknown guest-virtual address in a PF event.
const NO_GVA: u64 = u64::MAX;
/// The longest x86 instruction.
const MAX_INSN: u64 = 15;
/// RFLAGS.AC (lets CPL0 access user pages under SMAP).
const RFLAGS_AC: u64 = 1 << 18;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const READ_WRITE: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// The base of segment override `segment` of a decoded operand (4 = FS, 5 = GS).
fn segment_base(ctx: &ExitContext<'_>, segment: u8) -> u64 {
    match segment {
        4 => ctx.sregs().fs.base,
        5 => ctx.sregs().gs.base,
        _ => 0,
    }
}

/// Puts a CPL3 vCPU at CPL0 for one emulated, single-stepped instruction (CS and SS with
/// DPL 0 and RPL 0, same descriptors otherwise; RFLAGS.AC set under SMAP so the user page
/// stays accessible). Returns what to put back.
fn enter_privileged_step(ctx: &mut ExitContext<'_>) -> UserMode {
    let rip = ctx.regs().rip;
    let s = ctx.sregs_mut();
    let saved = (s.cs, s.ss);
    s.cs.dpl = 0;
    s.cs.selector &= !3;
    s.ss.dpl = 0;
    s.ss.selector &= !3;
    let smap = s.cr4 & CR4_SMAP != 0;
    let regs = ctx.regs_mut();
    let set_ac = smap && regs.rflags & RFLAGS_AC == 0;
    if set_ac {
        regs.rflags |= RFLAGS_AC;
    }
    UserMode {
        cs: saved.0,
        ss: saved.1,
        set_ac,
        rip,
    }
}

/// Gives a vCPU back the CPL3 state of [`enter_privileged_step`].
fn leave_privileged_step(ctx: &mut ExitContext<'_>, user: &UserMode) {
    let s = ctx.sregs_mut();
    s.cs = user.cs;
    s.ss = user.ss;
    if user.set_ac {
        ctx.regs_mut().rflags &= !RFLAGS_AC;
    }
}

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

    /// Lifts the protection of `pages` for one single-stepped instruction (never below what
    /// their restriction allows now). `privileged` (the instruction's length, from
    /// [`Introspector::privileged_step`]): the vCPU is at CPL3 on a host that single-steps
    /// only CPL0 code, and the instruction is stepped at CPL0.
    fn step_through(
        &self,
        ctx: &mut ExitContext<'_>,
        pages: &[u64],
        kind: AccessKind,
        privileged: Option<usize>,
    ) {
        let i = ctx.vcpu_index() as usize;
        let mut lifted = Vec::with_capacity(pages.len());
        {
            // Under the table lock: a detach or SET_PAGE_ACCESS in between is not undone.
            let table = self.access.lock();
            for &page in pages {
                let prot = step_prot(kind) | prot_for(table.get(page));
                match self.ram.protect(page, PAGE, prot) {
                    Ok(()) => lifted.push(page),
                    Err(e) => tracing::error!("step-through unprotect {page:#x}: {e}"),
                }
            }
            self.prot_epoch
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let user_mode = privileged.map(|_| enter_privileged_step(ctx));
        let mut overflow = Vec::new();
        {
            let mut s = self.slots[i].lock();
            for page in lifted {
                if !s.step.lift(page) {
                    overflow.push(page);
                }
            }
            if user_mode.is_some() {
                s.step.user_mode = user_mode;
            }
            s.debug_dirty = true;
        }
        if !overflow.is_empty() {
            tracing::error!(vcpu = i, "more than two pages lifted for one step");
            self.end_step_through(overflow.into_iter());
        }
    }

    /// Re-protects the pages of a completed step-through with their current restriction
    /// (under the table lock, so a restriction cleared meanwhile stays cleared).
    fn end_step_through(&self, pages: impl Iterator<Item = u64>) {
        let table = self.access.lock();
        for page in pages {
            let prot = prot_for(table.get(page));
            if let Err(e) = self.ram.protect(page, PAGE, prot) {
                tracing::error!("step-through re-protect {page:#x}: {e}");
            }
        }
        self.prot_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The instruction's length if the CPL3 instruction at rip can be stepped at CPL0
    /// instead (PVM runs CPL3 code natively and does not single-step it: the trap of a step
    /// goes to the guest as #DB). Only where it behaves the same: a
    /// [`cpl_neutral`](super::decode::cpl_neutral) instruction, no SMEP (its fetch is from a
    /// user page), its bytes and every location it accesses in pages the guest gives CPL3
    /// (writable where it writes): a supervisor page would be open to it at CPL0.
    fn privileged_step(&self, ctx: &ExitContext<'_>) -> Option<usize> {
        let s = ctx.sregs();
        if !self.software_mmu || s.cs.dpl != 3 || s.cr4 & CR4_SMEP != 0 {
            return None;
        }
        let insn = self.insn_at_rip(ctx)?;
        let step = cpl_neutral(&insn, ctx.regs())?;
        let view = super::slot::VcpuView::of(s);
        let read = |gpa: u64, buf: &mut [u8]| self.alias.read(gpa, buf);
        let user = |la: u64, len: usize, write: bool| {
            [la, la.wrapping_add(len.max(1) as u64 - 1)]
                .iter()
                .all(|&a| {
                    walked::translate(&read, &view, a)
                        .is_some_and(|t| t.user && (!write || t.writable))
                })
        };
        let rip = ctx.regs().rip;
        let ok = user(rip, step.len, false)
            && step.accesses.iter().all(|a| {
                user(
                    a.ea.wrapping_add(segment_base(ctx, a.segment)),
                    a.size,
                    a.write,
                )
            });
        ok.then_some(step.len)
    }

    /// (Un)protects every tracked page: `true` restores each page's protection, `false`
    /// makes them all read-write.
    fn protect_all_tracked(&self, restore: bool) {
        let table = self.access.lock();
        for (page, access) in table.pages() {
            let prot = if restore {
                prot_for(access)
            } else {
                READ_WRITE
            };
            if let Err(e) = self.ram.protect(page, PAGE, prot) {
                tracing::error!("protect {page:#x}: {e}");
            }
        }
        self.prot_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// An exit no restriction explains (an emulation failure or fault on a page that is not
    /// restricted, or an undecodable one): it may come from a protection lifted or cleared
    /// (detach) between the access and its handling, so it is retried once per protection
    /// epoch; the same exit again in the same epoch is the guest's own. Without any
    /// protection ever set, nothing is retried.
    fn unexplained(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let epoch = self.prot_epoch.load(std::sync::atomic::Ordering::SeqCst);
        if epoch == 0 {
            return HookResult::Unhandled;
        }
        let rip = ctx.regs().rip;
        {
            let mut s = self.slots[ctx.vcpu_index() as usize].lock();
            if s.unexplained == Some((rip, epoch)) {
                return HookResult::Unhandled;
            }
            s.unexplained = Some((rip, epoch));
        }
        tracing::debug!(
            vcpu = ctx.vcpu_index(),
            rip,
            "retrying an unexplained exit once"
        );
        self.finish(ctx)
    }

    /// Whether an instruction fetch from `page` traps (R or X removed: `PROT_NONE`).
    fn fetch_blocked(&self, page: u64) -> bool {
        prot_for(self.access.lock().get(page)) == libc::PROT_NONE
    }

    /// A fetch from a no-exec page (`gva` in page `gpa`): a PF exec event (unless X is
    /// allowed and only R removed), then CONTINUE steps the instruction with `lift` lifted
    /// (a CPL3 one at CPL0 where [`Introspector::privileged_step`] allows it).
    fn exec_fault(
        &self,
        ctx: &mut ExitContext<'_>,
        gva: u64,
        gpa: u64,
        lift: &[u64],
    ) -> HookResult {
        let allowed = self.access.lock().get(gpa);
        let action = if allowed.contains(protocol::types::Access::X) {
            None
        } else {
            let payload = EventPayload::PageFault {
                gva,
                gpa,
                mode: u32::from(AccessKind::Exec.bit().bits()),
            };
            action_of(&self.raise(ctx, payload, false))
        };
        match step_outcome(action) {
            StepOutcome::Crash => return self.crash(ctx, "PF"),
            StepOutcome::StepThrough => {
                // Decided on the state the tool left (it may have changed registers).
                let privileged = self.privileged_step(ctx);
                self.step_through(ctx, lift, AccessKind::Exec, privileged);
            }
            StepOutcome::Reenter => {}
        }
        self.finish(ctx)
    }

    /// A fetch at rip that failed in a restricted page: rip's own page, or the next one when
    /// the instruction runs into it (`crosses`; None: unknown, it may if it starts within 15
    /// bytes of the page end) and rip's page is not what blocks it. `step`: the step in
    /// flight. Returns the fetch's (gva, gpa, pages to lift), or None when no fetch is
    /// blocked.
    fn blocked_fetch(
        &self,
        ctx: &ExitContext<'_>,
        step: &OneStep,
        crosses: Option<bool>,
    ) -> Option<(u64, u64, Vec<u64>)> {
        let rip = ctx.regs().rip;
        let gpa = self.gva_to_gpa(ctx, rip)?;
        let page = gpa & !(PAGE - 1);
        let rip_blocked = self.fetch_blocked(page);
        if rip_blocked && !step.lifts(page) {
            return Some((rip, gpa, vec![page]));
        }
        let left = PAGE - (rip & (PAGE - 1));
        if left >= MAX_INSN || crosses == Some(false) {
            return None;
        }
        let next_gva = rip.wrapping_add(left);
        let next = self.gva_to_gpa(ctx, next_gva)?;
        let next_page = next & !(PAGE - 1);
        if !self.fetch_blocked(next_page) || step.lifts(next_page) {
            return None;
        }
        let mut lift = vec![next_page];
        if rip_blocked {
            lift.insert(0, page);
        }
        Some((next_gva, next, lift))
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

    /// An instruction KVM could not emulate outside any no-exec page: if pages are tracked,
    /// it may be a data access the emulator cannot complete on a protected page (PVM cannot
    /// emulate e.g. `lock inc` as MMIO). Step it once with every tracked page unprotected
    /// (no event: the address is unknown); a second failure is the guest's own.
    fn emulation_fallback(&self, ctx: &mut ExitContext<'_>, insn: &[u8]) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        let tracked = !self.access.lock().is_empty();
        if !tracked || self.slots[i].lock().step.all_pages {
            return self.unexplained(ctx);
        }
        if let Some(op) = mem_operand(insn, ctx.regs()) {
            let gva = op.ea.wrapping_add(segment_base(ctx, op.segment));
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
    /// a fault reported without a gpa, with the decoded instruction.
    fn fault_gpa_from_instruction(&self, ctx: &ExitContext<'_>) -> Option<(u64, MemOperand)> {
        let insn = self.insn_at_rip(ctx)?;
        let op = mem_operand(&insn, ctx.regs())?;
        self.gva_to_gpa(ctx, op.ea.wrapping_add(segment_base(ctx, op.segment)))
            .map(|g| (g, op))
    }

    /// A native (CPL3) access that failed on a protected page: on PVM `KVM_RUN` fails with
    /// EFAULT and no exit information. A fetch from a no-exec page (rip's, or the next one
    /// for an instruction running into it) is an exec fault; otherwise the instruction at
    /// rip is decoded for its data address. CONTINUE steps the instruction at CPL0 where it
    /// behaves the same ([`Introspector::privileged_step`]), natively otherwise.
    fn native_fault(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        let step = self.slots[i].lock().step;
        let decoded = self.fault_gpa_from_instruction(ctx);
        let op = decoded.as_ref().map(|(_, op)| op);
        let rip = ctx.regs().rip;
        let crosses = op.map(|o| o.len as u64 > PAGE - (rip & (PAGE - 1)));
        if let Some((gva, gpa, lift)) = self.blocked_fetch(ctx, &step, crosses) {
            return self.exec_fault(ctx, gva, gpa, &lift);
        }
        let Some((gpa, op)) = decoded.filter(|(gpa, _)| self.alias.contains(*gpa, 1)) else {
            return self.native_fallback(ctx);
        };
        let page = gpa & !(PAGE - 1);
        let allowed = self.access.lock().get(page);
        let Some(kind) = upstream_access(allowed, false) else {
            if allowed == protocol::types::Access::RWX {
                // Not this page (an instruction with another operand on a restricted page)
                // or no restriction any more (a detach since): lift every tracked page.
                return self.native_fallback(ctx);
            }
            // Not restricted for this access (e.g. a write to an rw- page): step it through.
            let p = self.privileged_step(ctx);
            self.step_through(ctx, &[page], AccessKind::Write, p);
            return self.finish(ctx);
        };
        let payload = EventPayload::PageFault {
            gva: NO_GVA,
            gpa,
            mode: u32::from(kind.bit().bits()),
        };
        let action = action_of(&self.raise(ctx, payload, false));
        if action == Some(Action::Skip) {
            let regs = ctx.regs_mut();
            regs.rip = next_rip(regs.rip, op.len);
            return self.finish(ctx);
        }
        match step_outcome(action) {
            StepOutcome::Crash => return self.crash(ctx, "PF"),
            StepOutcome::StepThrough => {
                let privileged = self.privileged_step(ctx);
                self.step_through(ctx, &[page], kind, privileged);
            }
            StepOutcome::Reenter => {}
        }
        self.finish(ctx)
    }

    /// A native fault the decoded address does not explain (undecodable, or a page with no
    /// restriction): every tracked page is lifted for one native step (no event: the address
    /// is unknown), like [`Self::emulation_fallback`]; with nothing tracked, or that step
    /// already done, it is [`Self::unexplained`].
    fn native_fallback(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        let tracked = !self.access.lock().is_empty();
        if !tracked || self.slots[i].lock().step.all_pages {
            return self.unexplained(ctx);
        }
        {
            let mut s = self.slots[i].lock();
            s.step.all_pages = true;
            s.debug_dirty = true;
        }
        tracing::debug!(
            vcpu = i,
            rip = ctx.regs().rip,
            "stepping an undecoded native access"
        );
        self.protect_all_tracked(false);
        self.finish(ctx)
    }

    /// The (up to 15) instruction bytes at rip, read through the alias; fewer where the
    /// next page is not mapped.
    fn insn_at_rip(&self, ctx: &ExitContext<'_>) -> Option<Vec<u8>> {
        let rip = ctx.regs().rip;
        let mut insn = Vec::with_capacity(MAX_INSN as usize);
        for k in 0..MAX_INSN {
            let Some(g) = self.gva_to_gpa(ctx, rip.wrapping_add(k)) else {
                break;
            };
            let mut one = [0u8; 1];
            if !self.alias.read(g, &mut one) {
                break;
            }
            insn.push(one[0]);
        }
        (!insn.is_empty()).then_some(insn)
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

    /// A guest INT3 with rip at the int3: upstream `USE_SW_BP` (`emulated` false), or on PVM
    /// an INT3 in CPL0 code, which the emulator cannot run (`emulated` true). CONTINUE
    /// re-injects #BP for the guest's own handler (on PVM with rip moved past the int3 first,
    /// as the CPU leaves it for a trap); RETRY/SKIP re-enter at rip as the tool left it.
    fn software_breakpoint(
        &self,
        ctx: &mut ExitContext<'_>,
        rip: u64,
        emulated: bool,
    ) -> HookResult {
        let gpa = self.gva_to_gpa(ctx, rip).unwrap_or(u64::MAX);
        let answer = self.raise(ctx, EventPayload::Breakpoint { gpa }, false);
        match action_of(&answer).unwrap_or(Action::Continue) {
            Action::Crash => return self.crash(ctx, "BREAKPOINT"),
            Action::Continue => {
                if emulated && ctx.regs().rip == rip {
                    let regs = ctx.regs_mut();
                    regs.rip = next_rip(regs.rip, 1);
                }
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

    /// Whether the instruction at rip (as the failed emulation fetched it, else as read from
    /// guest memory) is INT3.
    fn int3_at_rip(&self, ctx: &ExitContext<'_>, insn: &[u8]) -> bool {
        if let Some(&first) = insn.first() {
            return first == 0xcc;
        }
        let mut b = [0u8; 1];
        self.gva_to_gpa(ctx, ctx.regs().rip)
            .is_some_and(|gpa| self.alias.read(gpa, &mut b) && b[0] == 0xcc)
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
        let mode = super::convert::cpu_mode(ctx.sregs());
        if !is_agent_call(ctx.regs(), mode) {
            return HookResult::Unhandled;
        }
        let answer = self.raise(ctx, EventPayload::Hypercall, false);
        match answer {
            Answer::NotSent => {}
            Answer::Reply(ref r) if r.action == Action::Crash => {
                return self.crash(ctx, "HYPERCALL");
            }
            // 0 once the event was delivered and answered; with no event sent (no tool, or
            // the event not enabled) RAX is left as the guest set it.
            Answer::Reply(_) => ctx.regs_mut().rax = 0,
        }
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
        let i = ctx.vcpu_index() as usize;
        let outcome = if restricted {
            if !io.write {
                // KVM completes the read on the next entry: SET_REGISTERS waits for that. A
                // second access of an instruction whose first one is still pending keeps
                // what the first event recorded.
                let mut s = self.slots[i].lock();
                if s.pending_read.is_none() {
                    s.pending_read = Some(PendingRead {
                        at_event: *ctx.regs(),
                        tool: None,
                    });
                }
            }
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
            self.slots[i].lock().pending_read = None;
            return self.crash(ctx, "PF");
        }
        self.complete_data(io, &outcome);
        let verdict = self.finish(ctx);
        // Registers the tool set during the event are merged in once KVM has completed
        // the read (`io_completed`); without any the read completes as it is.
        let set = {
            let mut s = self.slots[i].lock();
            let set = s.pending_read.is_some_and(|p| p.tool.is_some());
            if !set {
                s.pending_read = None;
            }
            set
        };
        if set {
            ctx.complete_then_call_back();
        }
        verdict
    }

    fn debug(&self, ctx: &mut ExitContext<'_>, ev: &DebugEvent) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        if ev.exception == 3 && self.sw_breakpoints {
            return self.software_breakpoint(ctx, ev.pc, false);
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
            if let Some(user) = &step.user_mode {
                // Still on the CS the step got (a branch may have moved rip anywhere): put
                // CPL3 back. A new CS means the instruction took an exception and the guest's
                // kernel runs its handler, which must stay at CPL0.
                let s = ctx.sregs();
                if s.cs.selector == user.cs.selector & !3 && s.cs.dpl == 0 {
                    leave_privileged_step(ctx, user);
                } else {
                    tracing::warn!(
                        vcpu = i,
                        at = user.rip,
                        rip = ctx.regs().rip,
                        "a CPL3 instruction stepped at CPL0 took an exception; the guest \
                         kernel handles it"
                    );
                }
            }
            self.end_step_through(step.pages());
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
        if gpa == u64::MAX {
            return self.native_fault(ctx);
        }
        // Upstream (KVM_EXIT_MEMORY_FAULT names the gpa; hardware single-steps CPL3 too).
        if !self.alias.contains(gpa, 1) {
            return HookResult::Unhandled;
        }
        let page = gpa & !(PAGE - 1);
        let allowed = self.access.lock().get(page);
        let rip = ctx.regs().rip;
        let rip_page = self.gva_to_gpa(ctx, rip).map(|g| g & !(PAGE - 1));
        let Some(kind) = upstream_access(allowed, rip_page == Some(page)) else {
            if allowed == protocol::types::Access::RWX {
                // No restriction (any more): the protection that trapped is gone.
                return self.unexplained(ctx);
            }
            // Not restricted for this access: step it through the protection.
            let kind = if rip_page == Some(page) {
                AccessKind::Exec
            } else {
                AccessKind::Write
            };
            self.step_through(ctx, &[page], kind, None);
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
        let action = action_of(&self.raise(ctx, payload, false));
        match step_outcome(action) {
            StepOutcome::Crash => return self.crash(ctx, "PF"),
            StepOutcome::StepThrough => self.step_through(ctx, &[page], kind, None),
            StepOutcome::Reenter => {}
        }
        self.finish(ctx)
    }

    fn emulation_failure(&self, ctx: &mut ExitContext<'_>, insn: &[u8]) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        let step = self.slots[i].lock().step;
        if let Some(user) = &step.user_mode {
            // KVM cannot emulate this CPL3 instruction at CPL0: step it natively (on PVM its
            // single-step trap then reaches the guest as #DB, see `fault`).
            tracing::warn!(
                vcpu = i,
                rip = ctx.regs().rip,
                "a CPL3 instruction could not be stepped at CPL0; stepping it natively"
            );
            leave_privileged_step(ctx, user);
            self.slots[i].lock().step.user_mode = None;
            return self.finish(ctx);
        }
        // PVM cannot emulate INT: an INT3 in CPL0 code (e.g. one a tool wrote) ends here.
        if self.int3_at_rip(ctx, insn) && self.enabled(ctx, protocol::EventKind::Breakpoint) {
            let rip = ctx.regs().rip;
            return self.software_breakpoint(ctx, rip, true);
        }
        // The emulator fetched `insn` before it failed: up to the page end means the fetch
        // failed in the next page.
        let crosses = (!insn.is_empty()).then(|| {
            let left = PAGE - (ctx.regs().rip & (PAGE - 1));
            insn.len() as u64 >= left
        });
        if let Some((gva, gpa, lift)) = self.blocked_fetch(ctx, &step, crosses) {
            return self.exec_fault(ctx, gva, gpa, &lift);
        }
        self.emulation_fallback(ctx, insn)
    }

    fn kicked(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        self.finish(ctx)
    }

    /// KVM completed a PF read (destination written, rip past the instruction) during whose
    /// event the tool sent SET_REGISTERS: its registers are loaded now, merged with what
    /// the completion wrote (`PendingRead::merge`).
    fn io_completed(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let i = ctx.vcpu_index() as usize;
        let Some(read) = self.slots[i].lock().pending_read.take() else {
            return HookResult::Handled;
        };
        let merged = read.merge(ctx.regs());
        tracing::debug!(
            vcpu = i,
            rip = merged.rip,
            "loading the tool's registers after the read completed"
        );
        *ctx.regs_mut() = merged;
        HookResult::Handled
    }
}

/// Whether the doorbell call in `r` is KVMI's agent call (`KVM_HC_XEN_HVM_OP` = 34 with Xen's
/// guest-request sub-function), in the convention of the vCPU's `mode`: 64-bit RAX = 34,
/// RDI = 24, RSI = 0; otherwise Xen's 32-bit registers, truncated to 32 bits: EAX = 34,
/// EBX = 24, ECX = 0.
fn is_agent_call(r: &kvm_bindings::kvm_regs, mode: protocol::types::CpuMode) -> bool {
    use hypercall::call::{AGENT_GUEST_REQUEST, AGENT_GUEST_REQUEST_ARG, Hypercall};
    let (nr, sub, arg) = match mode {
        protocol::types::CpuMode::Bits64 => (r.rax, r.rdi, r.rsi),
        _ => (
            r.rax & 0xffff_ffff,
            r.rbx & 0xffff_ffff,
            r.rcx & 0xffff_ffff,
        ),
    };
    nr == Hypercall::Agent as u64 && sub == AGENT_GUEST_REQUEST && arg == AGENT_GUEST_REQUEST_ARG
}

#[cfg(test)]
mod tests {
    use super::{is_agent_call, next_rip};
    use protocol::types::CpuMode;

    #[test]
    fn the_agent_call_follows_the_mode_s_convention() {
        let regs = |rax, rbx, rcx, rsi, rdi| kvm_bindings::kvm_regs {
            rax,
            rbx,
            rcx,
            rsi,
            rdi,
            ..Default::default()
        };
        // 64-bit: RAX = 34, RDI = 24, RSI = 0.
        assert!(is_agent_call(&regs(34, 0, 0, 0, 24), CpuMode::Bits64));
        assert!(!is_agent_call(&regs(34, 0, 0, 1, 24), CpuMode::Bits64));
        assert!(!is_agent_call(&regs(34, 24, 0, 0, 0), CpuMode::Bits64));
        assert!(!is_agent_call(
            &regs(34 | 1 << 32, 0, 0, 0, 24),
            CpuMode::Bits64
        ));
        // 32-bit: EAX = 34, EBX = 24, ECX = 0; the upper halves do not count.
        let high = 0xdead_beef_0000_0000;
        assert!(is_agent_call(&regs(34, 24, 0, 0, 0), CpuMode::Bits32));
        assert!(is_agent_call(
            &regs(high | 34, high | 24, high, 5, 7),
            CpuMode::Bits32
        ));
        assert!(!is_agent_call(&regs(34, 0, 0, 0, 24), CpuMode::Bits32));
        assert!(!is_agent_call(&regs(34, 24, 1, 0, 0), CpuMode::Bits32));
    }

    #[test]
    fn skipping_an_instruction_at_the_top_of_the_address_space_wraps() {
        assert_eq!(next_rip(0x1000, 8), 0x1008);
        assert_eq!(next_rip(u64::MAX - 1, 3), 1);
        assert_eq!(next_rip(u64::MAX, 15), 14);
        assert_eq!(next_rip(u64::MAX - 14, 15), 0);
    }
}
