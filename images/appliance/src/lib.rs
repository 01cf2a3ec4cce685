//! The parts of the appliance image that do not need the VM, kept in a library so they are
//! unit-tested on the host (`cargo test -p appliance-image --lib --target
//! x86_64-unknown-linux-gnu` in `images/`):
//!
//! - [`heap`]: the size-class heap behind the image's global allocator;
//! - [`identity`]: how the ring region and the map window are cut into 2 MiB and 4 KiB pages;
//! - [`watch`]: the live task list (changes between two listings) and the periodic summary.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod heap;
pub mod identity;
pub mod watch;
