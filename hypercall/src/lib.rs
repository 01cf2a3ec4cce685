//! The appliance ABI shared by the host shim, the guest images and the appliance agent.
//!
//! `no_std`, no I/O. Every struct that crosses the guest/host boundary is a zerocopy type with
//! compile-time size and offset assertions.
//!
//! - [`boot`]: the boot contract between the VMM and a freestanding guest image (entry state,
//!   memory layout, the boot-info record).
//! - [`ports`]: the I/O ports every guest may use (serial console, debug exit, hypercall doorbell).
//! - [`call`]: hypercall numbers and the register convention; [`error`]: their results.
//! - [`token`]: the 32-byte map token.
//! - [`discovery`]: the header of the ring region that the appliance reads.
//! - [`directory`]: the appliance's target directory (one slot per guarded target, the policy).
//! - [`ring`]: the lock-free shared-memory rings (the only `unsafe` code is `ring::shm`).
//!
//! Features: `alloc` (regions shared through `Arc`), `std` (host waiters; implies `alloc`).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod boot;
pub mod call;
pub mod directory;
pub mod discovery;
pub mod error;
pub mod ports;
pub mod ring;
pub mod token;

pub use call::Hypercall;
pub use error::HcError;
pub use token::MapToken;
