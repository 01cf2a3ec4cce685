//! The appliance benchmarks of `kvmi appliance-bench`, each a ratio between paths measured in
//! the same run: event round trips (raw exit floor, rings, socket) and target-memory reads
//! (map window against `READ_PHYSICAL`), and one appliance's aggregate event throughput over
//! many targets against the sum of their floors. `dump` is `kvmi dump-bench`: the memory dump
//! against `dd`, READ_PHYSICAL, and live against stop-and-copy pauses.

pub mod dump;
pub mod events;
pub mod fleet;
mod remote_rings;
mod vms;
pub mod window;
