//! The exit-dispatch hook: the one place where an introspector (or any device model) sees
//! vCPU exits before the VMM's built-in handling.
//!
//! The vCPU loop decodes every exit once, then calls the matching [`ExitHook`] method with an
//! [`ExitContext`] (the vCPU's synced registers, its fd for rare ioctls, guest RAM). A hook
//! returns [`HookResult::Unhandled`] to fall through to the built-in handling (serial,
//! debug exit, unknown-I/O policy), [`HookResult::Handled`] to resume the guest, or
//! [`HookResult::Stop`] to end the whole run. A hook that must act after KVM has completed
//! an exit's I/O (e.g. change registers around an emulated MMIO read) asks for
//! [`ExitHook::io_completed`] with [`ExitContext::complete_then_call_back`].

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;

use crate::memory::GuestRam;
use crate::run_area::RunArea;

/// A hook's verdict on one exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookResult {
    /// Not this hook's business: the VMM handles the exit as if there were no hook.
    Unhandled,
    /// Done; resume the guest (with any register edits made through the context).
    Handled,
    /// End the run with [`crate::RunOutcome::Stopped`] and this reason.
    Stop(String),
}

/// A port I/O access. For `in`, fill `data` with the value to return.
#[derive(Debug)]
pub struct PioAccess<'a> {
    /// Port number.
    pub port: u16,
    /// `out` (true) or `in` (false).
    pub write: bool,
    /// Access size in bytes (1, 2 or 4).
    pub size: u8,
    /// The data: `size × count` bytes (string I/O has count > 1).
    pub data: &'a mut [u8],
}

/// An MMIO access. For reads, fill `data` with the value to return.
#[derive(Debug)]
pub struct MmioAccess<'a> {
    /// Guest-physical address.
    pub addr: u64,
    /// Write (true) or read (false).
    pub write: bool,
    /// The data (1..=8 bytes).
    pub data: &'a mut [u8],
}

/// A user-space MSR exit (only happens once an MSR filter / USER_SPACE_MSR is enabled).
#[derive(Debug)]
pub struct MsrAccess<'a> {
    /// MSR index.
    pub index: u32,
    /// wrmsr (true) or rdmsr.
    pub write: bool,
    /// KVM_MSR_EXIT_REASON_* (4 = filter).
    pub reason: u32,
    /// The written value, or where to put the value an rdmsr returns.
    pub data: &'a mut u64,
    /// Set to 1 to inject #GP instead of completing the access.
    pub error: &'a mut u8,
}

/// A KVM_EXIT_DEBUG event (single step, hardware breakpoint, software breakpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugEvent {
    /// Exception vector (1 = #DB, 3 = #BP).
    pub exception: u32,
    /// rip of the event.
    pub pc: u64,
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
}

/// The vCPU state an exit hook may read and change.
pub struct ExitContext<'a> {
    pub(crate) index: u32,
    pub(crate) area: &'a mut RunArea,
    pub(crate) fd: &'a VcpuFd,
    pub(crate) ram: &'a GuestRam,
}

impl std::fmt::Debug for ExitContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitContext")
            .field("vcpu", &self.index)
            .field("rip", &self.regs().rip)
            .finish()
    }
}

impl ExitContext<'_> {
    /// The vCPU index (0-based, as passed to the guest in RSI).
    pub fn vcpu_index(&self) -> u32 {
        self.index
    }

    /// General-purpose registers at the exit (from sync_regs, no ioctl).
    pub fn regs(&self) -> &kvm_regs {
        self.area.regs()
    }

    /// Mutable general-purpose registers; loaded into the vCPU on resume.
    pub fn regs_mut(&mut self) -> &mut kvm_regs {
        self.area.regs_mut()
    }

    /// System registers (CR0/CR3/CR4/EFER, segments) at the exit.
    pub fn sregs(&self) -> &kvm_sregs {
        self.area.sregs()
    }

    /// Mutable system registers; loaded into the vCPU on resume.
    pub fn sregs_mut(&mut self) -> &mut kvm_sregs {
        self.area.sregs_mut()
    }

    /// Pending exception/interrupt state at the exit.
    pub fn events(&self) -> &kvm_vcpu_events {
        self.area.events()
    }

    /// The vCPU fd, for ioctls without a sync_regs path (guest debug, MSRs, translate).
    pub fn vcpu_fd(&self) -> &VcpuFd {
        self.fd
    }

    /// This VM's guest RAM.
    pub fn ram(&self) -> &GuestRam {
        self.ram
    }

    /// Asks for [`ExitHook::io_completed`] once KVM has completed the I/O this exit left
    /// pending, before the guest runs again. For an MMIO or PIO read the completion is where
    /// KVM's emulator writes the data (filled in by the hook) to the instruction's
    /// destination and moves rip past it: registers changed with [`ExitContext::regs_mut`]
    /// (or `KVM_SET_REGS`) before that make KVM drop the emulator's register cache, and the
    /// destination never gets the data. A hook that must change registers around a read
    /// does it in `io_completed` instead, on the registers KVM left.
    ///
    /// The vCPU loop runs `KVM_RUN` with `kvm_run.immediate_exit` set (KVM completes pending
    /// I/O before it checks the flag, and returns `EINTR` without entering the guest), then
    /// calls `io_completed` instead of treating the `EINTR` as a kick (a real kick arriving
    /// meanwhile is seen on the next iteration). If that `KVM_RUN` reports another exit (the
    /// instruction needs a second access), the exit is dispatched as usual and the request
    /// stays in force until the completion returns without one. A pause or stop request is
    /// handled first, as for any entry; a stopped vCPU is never called back.
    pub fn complete_then_call_back(&mut self) {
        self.area.request_io_callback();
    }
}

/// Callbacks the vCPU loop makes for exits the introspector may want. Every method has a
/// default that returns [`HookResult::Unhandled`]. Called on the vCPU's own thread; several
/// vCPUs may call concurrently.
pub trait ExitHook: Send + Sync {
    /// Port I/O (called before the built-in serial / debug-exit / doorbell handling).
    fn pio(&self, _ctx: &mut ExitContext<'_>, _io: &mut PioAccess<'_>) -> HookResult {
        HookResult::Unhandled
    }

    /// A 32-bit `out` to the hypercall doorbell (`hypercall::ports::HYPERCALL_DOORBELL`):
    /// RAX = number, RBX/RCX/RDX/RSI(/RDI) = arguments; write the result to RAX through
    /// `ctx.regs_mut()` and return Handled. Unhandled doorbells are treated as unknown ports.
    fn hypercall(&self, _ctx: &mut ExitContext<'_>) -> HookResult {
        HookResult::Unhandled
    }

    /// MMIO, including writes to read-only slots and (on PVM) mprotect'ed RAM.
    fn mmio(&self, _ctx: &mut ExitContext<'_>, _io: &mut MmioAccess<'_>) -> HookResult {
        HookResult::Unhandled
    }

    /// KVM_EXIT_DEBUG (single step, breakpoints).
    fn debug(&self, _ctx: &mut ExitContext<'_>, _event: &DebugEvent) -> HookResult {
        HookResult::Unhandled
    }

    /// User-space MSR exits.
    fn msr(&self, _ctx: &mut ExitContext<'_>, _msr: &mut MsrAccess<'_>) -> HookResult {
        HookResult::Unhandled
    }

    /// KVM_EXIT_MEMORY_FAULT (upstream's report of a host permission fault on guest RAM).
    fn memory_fault(&self, _ctx: &mut ExitContext<'_>, _gpa: u64, _size: u64) -> HookResult {
        HookResult::Unhandled
    }

    /// An emulation failure (on PVM also the exec trap of a PROT_NONE page). Handled means the
    /// hook fixed the cause (e.g. restored permissions) and the instruction is retried.
    fn emulation_failure(&self, _ctx: &mut ExitContext<'_>, _insn: &[u8]) -> HookResult {
        HookResult::Unhandled
    }

    /// Called once on the vCPU's thread before its first entry (the registers are loaded into
    /// the context). Blocking here keeps the vCPU from starting (e.g. until a tool attaches);
    /// Stop ends the run before the guest ran.
    fn vcpu_start(&self, _ctx: &mut ExitContext<'_>) -> HookResult {
        HookResult::Handled
    }

    /// The vCPU halted for good (no interrupt controller can wake it). Called on its thread
    /// before it leaves; may block (e.g. to keep serving an introspection tool). Stop ends the
    /// run; anything else lets the vCPU halt.
    fn halted(&self, _ctx: &mut ExitContext<'_>) -> HookResult {
        HookResult::Unhandled
    }

    /// Called once when the vCPU's thread leaves its run loop (halted, stopped or ended).
    fn vcpu_exit(&self, _index: u32) {}

    /// The I/O of an exit whose hook called [`ExitContext::complete_then_call_back`] is
    /// complete (the context's registers are as KVM left them: a read's destination written,
    /// rip past the instruction) and the guest has not run since. Register edits made here
    /// are loaded on the next entry. Stop ends the run; anything else resumes the guest.
    fn io_completed(&self, _ctx: &mut ExitContext<'_>) -> HookResult {
        HookResult::Handled
    }

    /// The vCPU thread was kicked and is about to re-enter the guest (pause/stop requests are
    /// handled by the VMM before this is called).
    fn kicked(&self, _ctx: &mut ExitContext<'_>) -> HookResult {
        HookResult::Handled
    }
}

/// A hook that claims nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHook;

impl ExitHook for NoHook {}
