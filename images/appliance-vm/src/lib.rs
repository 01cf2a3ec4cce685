//! The appliance VM runtime: everything an appliance image needs besides its agent's logic.
//!
//! - [`entry!`]: the image's entry point. vCPU 0 checks the BootInfo, builds one address
//!   space (the image, a heap, the target directory and every slot's ring region and map
//!   window, all reachable from CPL3; see [`kernel`]), then runs the agent's
//!   `fn agent_main(info: &'static BootInfo) -> u32` at CPL3, where code runs natively, and
//!   exits the VM with the status it returns. Other vCPUs halt.
//! - [`link`]: a target slot's link to the shim, open (rings, map window, waiters, command
//!   client).
//! - [`fleet`]: the loop serving every target of the directory: a [`fleet::Job`] says what
//!   to do with each target (its event handler, periodic work, a final report on stop).
//! - [`heap`] and [`identity`]: the parts that do not need the VM, unit-tested on the host
//!   (`cargo test -p appliance-vm --lib --target x86_64-unknown-linux-gnu` in `images/`).
//!
//! A whole agent (see `images/example-agent`):
//! ```ignore
//! #![no_std]
//! #![no_main]
//! appliance_vm::entry!(agent_main);
//!
//! fn agent_main(info: &'static hypercall::boot::BootInfo) -> u32 {
//!     match appliance_vm::fleet::Fleet::open(info).and_then(|fleet| fleet.run(&mut MyJob)) {
//!         Ok(()) => 0,
//!         Err(_) => 1,
//!     }
//! }
//! ```
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

#[cfg(target_os = "none")]
pub mod fleet;
pub mod heap;
pub mod identity;
#[cfg(target_os = "none")]
pub mod kernel;
#[cfg(target_os = "none")]
pub mod link;

#[cfg(target_os = "none")]
pub use guest_runtime::{print, println};
#[cfg(target_os = "none")]
pub use kernel::heap_stats;

/// This vCPU's time-stamp counter (the agent's clock; usable at CPL3).
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter (CR4.TSD is clear: allowed at CPL3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// What [`entry!`] expands to needs; not part of the API.
#[cfg(target_os = "none")]
#[doc(hidden)]
pub mod __private {
    pub use guest_runtime;
}

/// Declares the image's entry point: `appliance_vm::entry!(agent_main)` with
/// `fn agent_main(info: &'static hypercall::boot::BootInfo) -> u32`. vCPU 0 builds the
/// address space and runs `agent_main` at CPL3; the VM exits with the status it returns.
#[cfg(target_os = "none")]
#[macro_export]
macro_rules! entry {
    ($agent:path) => {
        $crate::__private::guest_runtime::entry!(__appliance_vm_main);

        fn __appliance_vm_main(boot: $crate::__private::guest_runtime::Boot) -> ! {
            $crate::kernel::boot(boot, __appliance_vm_agent)
        }

        extern "sysv64" fn __appliance_vm_agent(info: u64) -> ! {
            $crate::kernel::run_agent(info, $agent)
        }
    };
}
