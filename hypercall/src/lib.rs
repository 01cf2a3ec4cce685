//! The appliance ABI shared by the host shim, the guest images and the appliance agent.
//!
//! `no_std`, no I/O. Every struct that crosses the guest/host boundary is a zerocopy type with
//! compile-time size and offset assertions.
//!
//! - [`boot`]: the boot contract between the VMM and a freestanding guest image (entry state,
//!   memory layout, the boot-info record).
//! - [`ports`]: the I/O ports every guest may use (serial console, debug exit, hypercall doorbell).
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

pub mod boot;
pub mod ports;
