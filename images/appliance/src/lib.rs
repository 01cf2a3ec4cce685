//! The parts of the appliance image that do not need the VM, kept in a library so they are
//! unit-tested on the host (`cargo test -p appliance-image --lib --target
//! x86_64-unknown-linux-gnu` in `images/`):
//!
//! - [`watch`]: the live task list (changes between two listings) and the periodic summary.
//!
//! The heap and the identity mapping moved to the runtime, `appliance-vm`.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod watch;
