//! The appliance side of the shim (docs/architecture.md): a security VM in the same process as
//! its target, served over shared-memory rings, with target pages mapped zero-copy into its
//! map window by token and hypercall.
//!
//! - [`rings`]: the ring region laid out in the appliance's ring-region RAM, the
//!   introspector's [`Channel`](kvmi_engine::Channel) over it ([`rings::RingChannel`])
//!   and the service thread ([`rings::RingService`]). One introspector, two transports: the
//!   appliance sees exactly the messages a socket tool sees.
//! - [`pager`]: MEM_MAP / MEM_UNMAP / MAP_RANGE / REVOKE_ALL, checked (token, target, window,
//!   alignment) and served with `mmap(MAP_FIXED)` of the target's memfd over the window.
//! - [`hook`]: the appliance VM's doorbell (VERSION, FEATURES, NOTIFY and the page calls).
//! - [`fleet`]: one appliance guarding many targets, which come and go ([`fleet::Fleet`]).
//! - [`kick`]: the appliance's NOTIFY as a doorbell eventfd, for a target in another process.
//! - [`remote`]: a target's end of its slot when the appliance runs in another process.
//! - [`launch`]: boots the target and the appliance together ([`launch::start_with_appliance`]).
//!
//! Process boundary: the ring region and the target RAM are memfds
//! ([`vmm::GuestRam::memfd_file`]), so an appliance VMM in another process could receive
//! them by `SCM_RIGHTS`; this shim runs both VMs in one process.

pub mod fleet;
pub mod hook;
pub mod host_socket;
pub mod kick;
pub mod launch;
pub mod pager;
pub mod remote;
pub mod remote_fleet;
pub mod rings;
pub mod vhost_link;

pub use hook::ApplianceHook;
pub use launch::{ApplianceConfig, ApplianceReport, ApplianceRun, start_with_appliance};
pub use pager::{Pager, PagerStats};
pub use rings::{RingChannel, RingService};
