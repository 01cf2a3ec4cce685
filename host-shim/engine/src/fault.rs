//! Page-access violations: what a trapped access was, and what each action does with it.
//!
//! Two platforms deliver a violation differently:
//! - **PVM** (`mprotect` traps, measured): a write to a `PROT_READ` page arrives as an MMIO
//!   write exit with the data already decoded and rip already past the instruction; a read of
//!   a `PROT_NONE` page as an MMIO read exit (we supply the value); an instruction fetch from
//!   a `PROT_NONE` page as an emulation failure with rip in the page.
//! - **Upstream KVM**: `KVM_RUN` fails with `EFAULT` and `KVM_EXIT_MEMORY_FAULT` (gpa, size;
//!   no access type, nothing emulated). The access is inferred from the page's restriction
//!   and rip, and ALLOW is carried out by unprotecting the page, single-stepping the
//!   instruction and protecting it again.

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
