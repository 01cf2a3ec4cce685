//! KVMI wire protocol (docs being written).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod command;
pub mod error;
pub mod event;
pub mod event_reply;
pub mod frame;
pub mod kvm;
pub mod list;
pub mod masks;
pub mod reply;
pub mod types;
pub mod wire;
