//! The appliance side of the hypercall ABI ([`hypercall`]): what the agent needs to find its
//! rings and map window, issue hypercalls, and read target pages the host maps for it.
//!
//! # How the pieces fit
//! - [`Discovery`] validates the [`BootInfo`](hypercall::boot::BootInfo) fields
//!   `ring_region_gpa/size` and `map_window_gpa/size`, then [`Discovery::open_region`] opens
//!   the ring region ([`hypercall::ring::Region::open`]) and checks that its header names the
//!   same window.
//! - [`Hypercalls`] issues one call (number + 5 argument registers → RAX);
//!   [`HypercallsExt`] adds the typed calls (MEM_MAP, MEM_UNMAP, MAP_RANGE, REVOKE_ALL,
//!   VERSION, FEATURES, NOTIFY) with RAX decoded into [`HcError`](hypercall::HcError).
//!   Backends: [`port::PortHypercalls`] (inside the appliance VM: `out 0xe4, eax`, usable at
//!   CPL3; x86-64 only) and `host::HostHypercalls` (feature `std`: a unix socket stands in for
//!   the port, memfds for the ring region and window; the protocol is documented in `host`).
//! - [`MapWindow`] hands out window slots: [`MapWindow::map`] → [`Page`],
//!   [`MapWindow::map_range`] → [`PageRange`]; both unmap on drop; [`MapWindow::revoke_all`].
//!   Mapped pages are the target's live memory: handles copy bytes out, never lend references.
//!
//! Tokens come from the KVMI channel (GET_MAP_TOKEN on the command ring); each is single use.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

extern crate alloc;

mod call;
mod checksum;
mod discovery;
mod error;
#[cfg(feature = "std")]
pub mod host;
#[cfg(target_arch = "x86_64")]
pub mod port;
mod window;

pub use call::{HypercallNotify, Hypercalls, HypercallsExt};
pub use checksum::content_checksum;
pub use discovery::{Discovery, PAGE};
pub use error::DriverError;
pub use window::{MapWindow, Page, PageRange, WindowStats, read_unaligned};
