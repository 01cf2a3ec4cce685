//! End-to-end tests of the appliance link: the appliance VM (or a host-process agent) served
//! over the shared-memory rings, token-checked page grants into its map window, the main job
//! of `kvmi run`, and the appliance benchmarks' checks.

mod api;
mod bench;
mod cli;
mod dump;
mod fleet;
mod host_socket;
mod image;
mod isolation;
mod main_job;
mod rings;
mod security;
