//! The VMM core: a userspace VMM on stock KVM (rust-vmm crates) that boots the project's
//! freestanding guest images and hands every vCPU exit to one dispatcher.
//!
//! What it owns:
//! - [`Vm`] builds a VM (memfd-backed [`GuestRam`], ELF image, boot state of
//!   `hypercall::boot`, vCPUs) and runs it on one thread per vCPU ([`RunningVm`],
//!   [`VmHandle`]: stop, kick, pause, resume), ending with a [`RunOutcome`].
//! - Every exit goes through one dispatcher: an [`ExitHook`] sees PIO, hypercall-doorbell,
//!   MMIO, debug, MSR, memory-fault and emulation-failure exits first, then come the built-in
//!   [`devices`] (COM1 serial, debug exit) and the unknown-I/O policy.
//! - Extra memory: [`Vm::add_shared_region`] and [`Vm::add_remap_window`]
//!   ([`window::RemapWindow`]: another VM's memfd pages mapped in zero-copy and revoked),
//!   announced to the guest with [`Vm::update_boot_info`].
//! - [`probe::probe_capabilities`] runs tiny probe VMs to learn what this host's KVM delivers.
//!
//! What it never does: anything of introspection, tools, rings or appliance VMs. Those layers
//! (`kvmi-engine`, `appliance-link`) build on the generic hook and region API above; image
//! profiles and the embedded images belong to the `kvmi` crate. Guest behaviour never panics
//! or hangs the VMM: anything unexpected ends the run with a descriptive [`RunOutcome`].
#![deny(missing_docs)]

pub mod devices;
pub mod dirty;
mod dispatch;
pub mod error;
pub mod hook;
pub mod kick;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod outcome;
pub mod probe;
pub mod run_area;
pub mod running;
pub mod seccomp;
pub mod sync;
pub mod vcpu;
pub mod vm;
pub mod window;

pub use devices::{SerialSink, SharedBuffer, UnknownIoPolicy};
pub use dirty::{DirtyBitmap, DirtyLog, SoftDirty};
pub use error::VmError;
pub use hook::{
    DebugEvent, ExitContext, ExitHook, HookResult, MmioAccess, MsrAccess, NoHook, PioAccess,
};
pub use memory::GuestRam;
pub use outcome::RunOutcome;
pub use probe::{Capabilities, probe_capabilities};
pub use running::{RunningVm, VmHandle};
pub use vm::{RunLimits, RunReport, Vm, VmConfig, run_image};

/// True when `/dev/kvm` exists and can be opened read-write (tests skip otherwise).
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
