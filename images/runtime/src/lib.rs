//! Runtime for the freestanding guest images (`x86_64-unknown-none`).
//!
//! - [`entry`]: `_start`, per-vCPU stacks, the [`entry!`] macro and the [`Boot`] handed to
//!   the image's `main`;
//! - [`serial`] and [`print!`]/[`println!`]: polled COM1 output;
//! - [`port`]: port I/O and [`port::exit`] (debug exit);
//! - [`sync`]: a [`SpinLock`] that works at CPL0 and CPL3;
//! - [`cpu`]: per-vCPU GDT, TSS, per-CPU block, MSR and CR helpers;
//! - [`trap`]: the IDT, exception reports, [`trap::run_user`] (enter CPL3 and come back on
//!   `syscall`, `int 0x80` or an exception) and [`trap::UserContext`];
//! - [`doorbell`]: hypercalls through the doorbell port, at CPL0 and CPL3;
//! - [`paging`]: frame allocator, address spaces (4 KiB / 2 MiB pages), the kernel map;
//! - [`user`]: helpers for CPL3 code (system calls, serial output, exit);
//! - [`status`]: the exit statuses the runtime uses.
#![cfg_attr(not(test), no_std)]
// Host unit tests leave the boot-only code (entry, descriptor tables, kernel map) unused.
#![cfg_attr(test, allow(dead_code, unused_imports))]
#![deny(missing_docs)]

pub mod cpu;
pub mod doorbell;
pub mod entry;
pub mod paging;
#[cfg(not(test))]
mod panic;
pub mod port;
pub mod serial;
pub mod status;
pub mod sync;
pub mod trap;
pub mod user;

pub use entry::Boot;
pub use sync::SpinLock;

/// Most vCPUs an image supports (each gets a kernel stack, a TSS and a GDT slot).
pub const MAX_CPUS: usize = 8;
