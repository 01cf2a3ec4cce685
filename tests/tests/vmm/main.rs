//! End-to-end tests of the VMM core and the `kvmi run` command: the embedded guest images on
//! real VMs (statuses, serial output, exits the dispatcher hands to a hook, memory sharing),
//! the capability probe.

mod cli;
mod debug_and_msr_hooks;
mod demo_target;
mod dump;
mod hooks_and_memory;
mod panicking_hook;
mod probe_watchdog;
mod seccomp;
mod test_guest;
