//! The appliance benchmarks of `kvmi appliance-bench`, each a ratio between paths measured in
//! the same run: event round trips (raw exit floor, rings, socket) and target-memory reads
//! (map window against `READ_PHYSICAL`).

pub mod events;
mod vms;
pub mod window;
