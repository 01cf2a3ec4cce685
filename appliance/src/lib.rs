//! The introspection agent of the appliance VM (`no_std + alloc` core; feature `std` for
//! running it as a host process over `guest-driver`'s host backend).
//!
//! # How the pieces fit
//! ```text
//!  event rings (per vCPU) ──► agent::Agent ──► EventHandler::on_* ──► EventReply ──► reply rings
//!                                  │                     │
//!                                  │                     └─► LogWriter: JSON lines ──► log ring
//!  command ring ◄── agent::CommandClient (GET_MAP_TOKEN, …; replies matched by seq)
//!                                  │ tokens
//!  map window ◄── memory::CachedMemory (LRU of mapped pages) ◄── paging::translate / read_virt
//!                                                           ◄── tasks::TaskLayout::list
//!                                                                 (offsets from profile::Profile)
//! ```
//! - [`memory`]: [`PhysicalMemory`](memory::PhysicalMemory) over the map window
//!   ([`CachedMemory`](memory::CachedMemory)) or a buffer ([`BufferMemory`](memory::BufferMemory)).
//! - [`paging`]: x86-64 4-level walks from any CR3 (4 KiB / 2 MiB / 1 GiB pages, permissions),
//!   virtual reads with partial results.
//! - [`profile`] and [`tasks`]: OS awareness from the image profile (the demo target's task
//!   table: pid, name, state, parent, CPU, CR3).
//! - [`agent`]: the event loop, handlers, the command client and the JSON-line output.
//! - [`policy`]: the compiled guard policy the host hands over (what to protect, how to
//!   answer violations, which functions to trace), decoded and checked as untrusted bytes.
//! - [`guard`]: the guard driven by a target's rules from the policy (the demo policy:
//!   write-protect kernel text and the task table, deny user writes with SKIP, trace
//!   `task_create`).
//!
//! Everything read from the target or the shim is validated: the target can rewrite its
//! memory while we read it, the shim's ring records are decoded by `protocol`.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod agent;
pub mod guard;
pub mod memory;
pub mod paging;
pub mod policy;
pub mod profile;
pub mod tasks;
