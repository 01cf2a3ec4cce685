//! `appliance`: the appliance VM image. vCPU 0 builds one address space (the image, a heap,
//! the ring region and the map window, all reachable from CPL3), then runs the introspection
//! agent at CPL3, where code runs natively; the kernel only builds page tables and waits for
//! the agent's exit. Other vCPUs halt. See images/README.md ("appliance").
#![no_std]
#![no_main]

extern crate alloc;

mod bench;
mod fleet;
mod handler;
mod job;
mod kernel;
mod tokens;

use guest_runtime::{Boot, entry};

entry!(main);

fn main(boot: Boot) -> ! {
    if boot.vcpu != 0 {
        kernel::halt_forever()
    }
    kernel::start(boot)
}
