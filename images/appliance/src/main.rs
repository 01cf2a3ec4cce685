//! `appliance`: the appliance VM image, the main job. The runtime (`appliance-vm`) builds the
//! address space (the image, a heap, the directory, every slot's ring region and map window,
//! all reachable from CPL3) and runs [`job::agent_main`] at CPL3, where code runs natively.
//! See images/README.md ("appliance").
#![no_std]
#![no_main]

extern crate alloc;

mod bench;
mod fleet;
mod handler;
mod job;
mod tokens;

appliance_vm::entry!(job::agent_main);
