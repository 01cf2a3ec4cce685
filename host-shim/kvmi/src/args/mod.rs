//! The flag groups of `kvmi run`: introspection over a KVMI socket, and the appliance VM.

pub mod appliance;
pub mod introspection;
