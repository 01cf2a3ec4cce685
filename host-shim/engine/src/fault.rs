//! Page-access violations: what a trapped access was, and what each action does with it.
//!
//! Two platforms deliver a violation differently:
//! - **PVM** (`mprotect` traps, measured): a write to a `PROT_READ` page arrives as an MMIO
//!   write exit with the data already decoded and rip already past the instruction; a read of
//!   a `PROT_NONE` page as an MMIO read exit (we supply the value); an instruction fetch from
//!   a `PROT_NONE` page as an emulation failure with rip in the page. That is for CPL0 code,
//!   which PVM emulates. Native CPL3 code that touches a protected page (data or fetch) makes
//!   `KVM_RUN` fail with `EFAULT` and no exit information: the engine looks for a blocked
//!   fetch at rip first, then decodes the instruction at rip for its data address.
//! - **Upstream KVM**: `KVM_RUN` fails with `EFAULT` and `KVM_EXIT_MEMORY_FAULT` (gpa, size;
//!   no access type, nothing emulated). The access is inferred from the page's restriction
//!   and rip, and ALLOW is carried out by unprotecting the page, single-stepping the
//!   instruction and protecting it again.
//!
//! # Stepping an instruction through a protection (CONTINUE of what KVM did not emulate)
//! The page is lifted for one single-stepped instruction (never below what its restriction
//! allows at that moment) and re-protected, with the restriction then in force, at the
//! single-step exit. Both happen under the access table's lock, so a detach or a
//! SET_PAGE_ACCESS in between is never undone. Cases, all measured on PVM:
//! - **An instruction that straddles two pages** (e.g. a 7-byte `mov` at 0xfff of a page):
//!   the fetch of its second part fails with the first page lifted (an emulation failure at
//!   the same rip, the bytes fetched reaching the page end). The second page then gets its
//!   own exec event (gva = its first byte) and the step runs with both pages lifted. Before,
//!   only rip's page was ever lifted: the vCPU retried forever and made no progress.
//! - **Locked and other read-modify-write instructions.** At CPL0 PVM emulates a plain write
//!   to a `PROT_READ` page as MMIO, but not `xchg` or a `lock`ed operation: that is an
//!   emulation failure outside a no-exec page, which steps the instruction with every tracked
//!   page lifted (no event for a page the decoder cannot name, one for a decoded address).
//!   At CPL3 a locked write (`lock xadd` on the demo target's stats page) is an `EFAULT`
//!   like any other write and is decoded, reported, and on CONTINUE stepped.
//! - **CPL3 instructions: PVM does not single-step native code.** With
//!   `KVM_GUESTDBG_SINGLESTEP` the trap after a CPL3 instruction is delivered to the guest
//!   as #DB (the demo target killed the task); hardware breakpoints on CPL3 code do not fire
//!   at all. So on PVM a CPL3 instruction is stepped **at CPL0**: CS and SS get DPL 0 (RPL
//!   cleared, same descriptors; RFLAGS.AC set under SMAP), KVM emulates the one instruction
//!   and the single-step exit puts the CPL3 state back. That is done only where it changes
//!   nothing but privilege ([`crate::decode::cpl_neutral`]: not privileged or
//!   IOPL-sensitive, no far transfer, interrupt, `iret`, segment load, flags image, `div`,
//!   `rep`), with no SMEP, and when the instruction's bytes and every location it accesses
//!   (stack slots included) lie in pages the guest's tables give CPL3 (writable where it
//!   writes) — otherwise CPL0 would reach memory CPL3 cannot. If the instruction faults
//!   anyway, the exception is the guest kernel's and the CPL3 state is not put back (the
//!   new CS shows it). Any other CPL3 instruction, or one KVM cannot emulate at CPL0 (SSE,
//!   `cmpxchg16b`), is stepped natively, and **the guest then sees a #DB after it**: a known
//!   limitation on PVM (upstream single-steps CPL3 itself).
//! - **An exit caused by a protection that is gone** (the tool detached, or another vCPU's
//!   step lifted the page between the access and its handling) finds no restriction to
//!   explain it. Every change of a host protection bumps an epoch; such an exit is retried
//!   once per epoch, and only the same exit again in the same epoch is the guest's own
//!   (before, a detach during an exec restriction ended the run with exit 126). A step in
//!   flight at detach still ends normally: its pages become read-write, its CPL3 state comes
//!   back.
//!
//! # What the host walks cannot be restricted (PVM)
//! The host reads page tables and descriptor tables and writes exception frames through the
//! same mapping, with no exit; SET_PAGE_ACCESS refuses restrictions that would break those
//! (`-KVM_EINVAL`, see [`crate::walked`]). Found with the demo target: `r-x` on the page of
//! its task-table lock triple-faulted it not because of the lock (taken with `xchg` at CPL0,
//! stepped as above) but because the saved user contexts on that page are where `TSS.RSP0`
//! points while a task runs: the first `int3` system call from CPL3 pushed its frame onto
//! the write-protected page and the delivery failed. `---` on the CR3 root, the kernel's
//! PDPT or the IDT page triple-faulted within microseconds; `---` on a task's user PDPT gave
//! that task spurious page faults (`err=0x6`). None of that reaches the engine as an exit.

use protocol::Action;
use protocol::types::Access;

use super::access::AccessKind;

/// What to do with a trapped PVM data access after the tool's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// Write the decoded data to guest memory (through the RW alias).
    WriteThrough,
    /// Drop the write: memory is unchanged (the instruction has already retired).
    DropWrite,
    /// Complete the read with guest memory.
    ReadMemory,
    /// Complete the read with these bytes (the reply's `ctx_data`, then memory for the
    /// rest of the access).
    ReadContext(Vec<u8>),
    /// Complete the read with zeros (SKIP without ctx_data: the tool emulated the load).
    ReadZeros,
    /// Stop the VM.
    Crash,
}

/// The PVM data-access semantics (`action` = None: no tool answer, e.g. event not enabled
/// or tool detached, which behaves as CONTINUE).
pub fn data_outcome(write: bool, action: Option<Action>, ctx_data: &[u8]) -> DataOutcome {
    match (action.unwrap_or(Action::Continue), write) {
        (Action::Crash, _) => DataOutcome::Crash,
        (Action::Continue, true) => DataOutcome::WriteThrough,
        (Action::Skip | Action::Retry, true) => DataOutcome::DropWrite,
        (Action::Continue, false) if !ctx_data.is_empty() => {
            DataOutcome::ReadContext(ctx_data.to_vec())
        }
        (Action::Continue | Action::Retry, false) => DataOutcome::ReadMemory,
        (Action::Skip, false) if !ctx_data.is_empty() => {
            DataOutcome::ReadContext(ctx_data.to_vec())
        }
        (Action::Skip, false) => DataOutcome::ReadZeros,
    }
}

/// What to do with an instruction fetch from a no-exec page (PVM emulation failure) or an
/// upstream memory fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// Lift the protection, single-step one instruction, protect the page again.
    StepThrough,
    /// Re-enter the guest as it is (the tool moved rip or changed the page's access;
    /// otherwise the access traps again).
    Reenter,
    /// Stop the VM.
    Crash,
}

/// The semantics for accesses KVM did not emulate (exec on PVM, everything upstream).
/// SKIP cannot drop an instruction whose length is unknown, so it re-enters like RETRY
/// (the tool that emulated the instruction has moved rip).
pub fn step_outcome(action: Option<Action>) -> StepOutcome {
    match action.unwrap_or(Action::Continue) {
        Action::Continue => StepOutcome::StepThrough,
        Action::Retry | Action::Skip => StepOutcome::Reenter,
        Action::Crash => StepOutcome::Crash,
    }
}

/// Infers the access of an upstream `KVM_EXIT_MEMORY_FAULT` (which carries no access type)
/// from the page's allowed access and whether rip lies in the faulting page: a fetch if
/// execution is restricted and rip is in the page; a write if only writes are restricted;
/// otherwise a read (a write to a page whose reads are also restricted is reported as a read).
pub fn upstream_access(allowed: Access, rip_in_page: bool) -> Option<AccessKind> {
    if allowed == Access::RWX {
        return None;
    }
    if rip_in_page && !allowed.contains(Access::X) {
        Some(AccessKind::Exec)
    } else if allowed.contains(Access::R) && !allowed.contains(Access::W) {
        Some(AccessKind::Write)
    } else if !allowed.contains(Access::R) {
        Some(AccessKind::Read)
    } else {
        // Only X is restricted but rip is elsewhere: the host protection (PROT_NONE) also
        // traps the data access, which is allowed.
        None
    }
}

/// The host protection to use while one instruction steps through a trapped page: enough
/// for the access that was allowed (PVM ignores PROT_EXEC; upstream needs it for a fetch).
pub fn step_prot(kind: AccessKind) -> libc::c_int {
    match kind {
        AccessKind::Read => libc::PROT_READ,
        AccessKind::Write => libc::PROT_READ | libc::PROT_WRITE,
        AccessKind::Exec => libc::PROT_READ | libc::PROT_EXEC,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_write_actions() {
        assert_eq!(
            data_outcome(true, Some(Action::Continue), &[]),
            DataOutcome::WriteThrough
        );
        assert_eq!(data_outcome(true, None, &[]), DataOutcome::WriteThrough);
        assert_eq!(
            data_outcome(true, Some(Action::Skip), &[]),
            DataOutcome::DropWrite
        );
        assert_eq!(
            data_outcome(true, Some(Action::Retry), &[]),
            DataOutcome::DropWrite
        );
        assert_eq!(
            data_outcome(true, Some(Action::Crash), &[]),
            DataOutcome::Crash
        );
    }

    #[test]
    fn pvm_read_actions_and_ctx_data() {
        assert_eq!(
            data_outcome(false, Some(Action::Continue), &[]),
            DataOutcome::ReadMemory
        );
        assert_eq!(
            data_outcome(false, Some(Action::Continue), &[1, 2]),
            DataOutcome::ReadContext(vec![1, 2])
        );
        assert_eq!(
            data_outcome(false, Some(Action::Retry), &[1]),
            DataOutcome::ReadMemory
        );
        assert_eq!(
            data_outcome(false, Some(Action::Skip), &[]),
            DataOutcome::ReadZeros
        );
        assert_eq!(
            data_outcome(false, Some(Action::Skip), &[7]),
            DataOutcome::ReadContext(vec![7])
        );
        assert_eq!(
            data_outcome(false, Some(Action::Crash), &[1]),
            DataOutcome::Crash
        );
    }

    #[test]
    fn upstream_fault_access_inference() {
        let a = |b| Access::from_bits(b).unwrap();
        assert_eq!(upstream_access(Access::RWX, true), None);
        assert_eq!(upstream_access(a(0b011), true), Some(AccessKind::Exec));
        assert_eq!(upstream_access(a(0b011), false), None);
        assert_eq!(upstream_access(a(0b101), false), Some(AccessKind::Write));
        assert_eq!(upstream_access(a(0b101), true), Some(AccessKind::Write));
        assert_eq!(upstream_access(a(0b110), false), Some(AccessKind::Read));
        assert_eq!(upstream_access(Access::NONE, false), Some(AccessKind::Read));
        assert_eq!(upstream_access(Access::NONE, true), Some(AccessKind::Exec));
    }

    #[test]
    fn upstream_and_exec_step_plans() {
        assert_eq!(step_outcome(None), StepOutcome::StepThrough);
        assert_eq!(
            step_outcome(Some(Action::Continue)),
            StepOutcome::StepThrough
        );
        assert_eq!(step_outcome(Some(Action::Retry)), StepOutcome::Reenter);
        assert_eq!(step_outcome(Some(Action::Skip)), StepOutcome::Reenter);
        assert_eq!(step_outcome(Some(Action::Crash)), StepOutcome::Crash);
        assert_eq!(
            step_prot(AccessKind::Write),
            libc::PROT_READ | libc::PROT_WRITE
        );
        assert_eq!(step_prot(AccessKind::Read), libc::PROT_READ);
    }
}
