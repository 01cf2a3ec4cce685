//! Errors of the VMM library.

use std::io;

/// Everything that can go wrong while building or running a VM (not guest behaviour: a guest's
/// ending, however bad, is a [`crate::RunOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation failed.
        what: &'static str,
        /// The errno from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A host memory operation (memfd, mmap, mprotect) failed.
    #[error("guest memory: {what}: {source}")]
    Memory {
        /// Which operation failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A guest-physical range lies outside guest RAM.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest RAM ({ram_size:#x} bytes)")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
        /// Size of guest RAM.
        ram_size: u64,
    },
    /// The configuration is invalid (message says why).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The guest image is not a loadable ELF for this boot contract.
    #[error("bad guest image: {0}")]
    Image(String),
    /// A thread could not be spawned or signalled.
    #[error("thread: {0}")]
    Thread(#[source] io::Error),
    /// An exclusive facility (e.g. dirty logging) is already in use.
    #[error("busy: {0}")]
    Busy(&'static str),
}

impl VmError {
    /// Wraps a KVM errno with the name of the operation.
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| VmError::Kvm { what, source }
    }

    /// Wraps an OS error with the name of the operation.
    pub(crate) fn mem(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| VmError::Memory { what, source }
    }
}
