//! The `kvmi` command: the command line ([`app`]), the guest images embedded at build time
//! and their profiles, the `kvmi run` flag groups, and the appliance benchmarks. The binary
//! (`src/main.rs`) is [`app::main`]; the end-to-end tests use this library for the images and
//! build the same command as an example.
#![deny(missing_docs)]

pub mod api;
pub mod app;
pub mod args;
pub mod bench;
mod cli;
pub mod gdb;
pub mod images;
pub mod isolate;
pub mod profile;
