//! Host helpers (feature `std`): a thread-park [`Waiter`] and [`Notify`] pair for rings whose
//! two ends are threads of one process, and a sleeping waiter for peers in other processes.

use std::thread::{self, Thread};
use std::time::Duration;

use super::wait::{Notify, Waiter};

/// Sleeps by parking the current thread, with a timeout.
#[derive(Debug)]
pub struct ParkWaiter {
    timeout: Duration,
}

/// Wakes the thread that created the matching [`ParkWaiter`].
#[derive(Clone, Debug)]
pub struct Unparker {
    thread: Thread,
}

/// Creates a waiter for the calling thread and the notifier that wakes it. `timeout` bounds
/// each sleep (a safety net against a peer that dies; the ring re-checks after it).
pub fn park_pair(timeout: Duration) -> (ParkWaiter, Unparker) {
    (
        ParkWaiter { timeout },
        Unparker {
            thread: thread::current(),
        },
    )
}

impl Waiter for ParkWaiter {
    fn wait(&self) {
        thread::park_timeout(self.timeout);
    }
    fn relax(&self) {
        thread::yield_now();
    }
}

impl Notify for Unparker {
    fn notify(&self) {
        self.thread.unpark();
    }
}

/// A waiter that sleeps for a fixed time: for a peer in another process or VM that cannot
/// notify us, so the ring is polled at that period once the spin phases are over.
#[derive(Clone, Copy, Debug)]
pub struct SleepWaiter(pub Duration);

impl Waiter for SleepWaiter {
    fn wait(&self) {
        thread::sleep(self.0);
    }
    fn relax(&self) {
        thread::yield_now();
    }
}
