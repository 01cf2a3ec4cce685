//! The host shim: a VMM on stock KVM (rust-vmm crates) that boots the project's freestanding
//! guest images, plus the capability probe and image profiles the introspector builds on.
//!
//! - [`Vm`] builds a VM (memfd-backed [`GuestRam`], ELF image, boot state of
//!   `hypercall::boot`, vCPUs) and runs it on one thread per vCPU ([`RunningVm`],
//!   [`VmHandle`]), ending with a [`RunOutcome`].
//! - Every exit goes through one dispatcher; an [`ExitHook`] sees PIO, MMIO, debug, MSR,
//!   memory-fault and emulation-failure exits first (the introspector's entry point).
//! - [`probe::probe_capabilities`] runs tiny probe VMs to learn what this host's KVM delivers.
//! - [`profile`] turns an image's `kvmi_profile.*` ELF symbols into its JSON profile;
//!   [`images`] holds the embedded demo and test images.
#![deny(missing_docs)]

pub mod devices;
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
pub mod sync;
pub mod vcpu;
pub mod vm;
pub mod window;

pub use devices::{SerialSink, SharedBuffer, UnknownIoPolicy};
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
