//! The flag groups of `kvmi run`: introspection over a KVMI socket, and the appliance VM
//! (with the `--config` file of its targets).

pub mod appliance;
pub mod fleet_config;
pub mod introspection;
pub mod seccomp;
