//! The one lock type of the shim's crates: a mutex with a rank in a global lock order,
//! checked in debug builds, and one decision about poisoned locks.
//!
//! # Lock order
//! Every [`RankedMutex`] has a [`Rank`]. A thread may take a lock only when its rank is
//! higher than the rank of every ranked lock the thread already holds; debug builds keep the
//! held ranks per thread and panic, naming both locks, on the first acquisition out of order
//! (so every test run checks the order; release builds pay nothing). The ranks of the
//! introspection engine and the appliance link are listed in one table,
//! `kvmi_engine::lock_order`; the VMM core's own locks rank above them ([`VMM_LEAF`] and
//! up, listed in [`vmm_ranks`]): while one is held, only a higher VMM lock may be taken.
//!
//! # Poisoned locks
//! A lock is poisoned when a thread panicked while holding it: a bug, since no input may make
//! the shim panic. The data is used anyway, because a VMM must keep serving the guest's other
//! vCPUs (a cascade of panics would freeze or kill the guest), and the poisoning is logged as
//! an error, once per lock. Every state guarded here is updated so that a reader never needs
//! more than the fields it reads to be consistent.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

/// A lock's place in the lock order (higher ranks are taken later) and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    /// Position in the order.
    pub order: u16,
    /// The lock's name, for diagnostics.
    pub name: &'static str,
}

impl Rank {
    /// A rank.
    pub const fn new(order: u16, name: &'static str) -> Rank {
        Rank { order, name }
    }
}

/// The lowest rank of the VMM core's own locks (leaves of the order).
pub const VMM_LEAF: u16 = 1000;

/// The ranks of the VMM core's locks, in order (a vCPU kick holds its target while it wakes a
/// parked vCPU; the serial device holds itself while it writes to a shared buffer).
pub mod vmm_ranks {
    use super::{Rank, VMM_LEAF};

    /// The capability probe's watchdog (it stops a hung probe vCPU while holding it).
    pub const PROBE_WATCHDOG: Rank = Rank::new(VMM_LEAF, "vmm.probe_watchdog");
    /// A vCPU's kick target (`kick::VcpuControl`).
    pub const KICK_TARGET: Rank = Rank::new(VMM_LEAF + 1, "vmm.kick_target");
    /// A vCPU's pause state (`kick::VcpuControl`).
    pub const PAUSE: Rank = Rank::new(VMM_LEAF + 2, "vmm.pause");
    /// The run's outcome (`running::RunShared`).
    pub const OUTCOME: Rank = Rank::new(VMM_LEAF + 3, "vmm.outcome");
    /// The serial device.
    pub const SERIAL: Rank = Rank::new(VMM_LEAF + 4, "vmm.serial");
    /// A shared serial buffer (`devices::SharedBuffer`).
    pub const SERIAL_BUFFER: Rank = Rank::new(VMM_LEAF + 5, "vmm.serial_buffer");
    /// A paused vCPU's captured registers (`kick::VcpuControl`).
    pub const VCPU_STATE: Rank = Rank::new(VMM_LEAF + 6, "vmm.vcpu_state");
}

#[cfg(debug_assertions)]
mod held {
    use std::cell::RefCell;

    use super::Rank;

    thread_local! {
        static HELD: RefCell<Vec<Rank>> = const { RefCell::new(Vec::new()) };
    }

    /// Records that this thread takes `rank`; panics if that breaks the order.
    pub(super) fn acquire(rank: Rank) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(top) = h.iter().max_by_key(|r| r.order)
                && top.order >= rank.order
            {
                let (top, held) = (*top, h.clone());
                drop(h);
                panic!(
                    "lock order violated: taking {} (rank {}) while holding {} (rank {}); held: {:?}",
                    rank.name,
                    rank.order,
                    top.name,
                    top.order,
                    held.iter().map(|r| r.name).collect::<Vec<_>>()
                );
            }
            h.push(rank);
        });
    }

    /// Records that this thread released `rank`.
    pub(super) fn release(rank: Rank) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|r| *r == rank) {
                h.remove(i);
            }
        });
    }
}

#[cfg(not(debug_assertions))]
mod held {
    use super::Rank;

    #[inline(always)]
    pub(super) fn acquire(_rank: Rank) {}

    #[inline(always)]
    pub(super) fn release(_rank: Rank) {}
}

/// A mutex with a [`Rank`] (see the module docs for the order and the poisoning rule).
#[derive(Debug)]
pub struct RankedMutex<T> {
    rank: Rank,
    poison_logged: AtomicBool,
    inner: Mutex<T>,
}

impl<T> RankedMutex<T> {
    /// A mutex of `rank` holding `value`.
    pub const fn new(rank: Rank, value: T) -> RankedMutex<T> {
        RankedMutex {
            rank,
            poison_logged: AtomicBool::new(false),
            inner: Mutex::new(value),
        }
    }

    /// The lock's rank.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    fn recovered<'a>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        if !self.poison_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                lock = self.rank.name,
                "a thread panicked holding this lock (a bug); its data is used as left"
            );
        }
        guard
    }

    /// Takes the lock (blocking).
    pub fn lock(&self) -> RankedGuard<'_, T> {
        held::acquire(self.rank);
        let guard = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => self.recovered(p.into_inner()),
        };
        RankedGuard {
            rank: self.rank,
            guard: Some(guard),
        }
    }

    /// Takes the lock if it is free right now.
    pub fn try_lock(&self) -> Option<RankedGuard<'_, T>> {
        let guard = match self.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => self.recovered(p.into_inner()),
            Err(TryLockError::WouldBlock) => return None,
        };
        // A try-lock cannot deadlock, but holding locks out of order still must not happen.
        held::acquire(self.rank);
        Some(RankedGuard {
            rank: self.rank,
            guard: Some(guard),
        })
    }

    /// Consumes the mutex and returns its value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// The guard of a [`RankedMutex`]; releases the lock (and its rank) when dropped.
#[derive(Debug)]
pub struct RankedGuard<'a, T> {
    rank: Rank,
    guard: Option<MutexGuard<'a, T>>,
}

impl<'a, T> RankedGuard<'a, T> {
    /// Waits on `condvar` for at most `timeout` with the lock released meanwhile; returns the
    /// guard and whether the wait timed out. The thread keeps the lock's rank while it waits
    /// (it takes no other lock then).
    pub fn wait_timeout(mut self, condvar: &Condvar, timeout: Duration) -> (Self, bool) {
        let guard = self
            .guard
            .take()
            .expect("a live guard holds its MutexGuard");
        let (guard, result) = condvar
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|p| p.into_inner());
        self.guard = Some(guard);
        (self, result.timed_out())
    }

    /// Waits on `condvar` while `condition` holds, for at most `timeout`; returns the guard
    /// and whether the wait timed out (with `condition` still true).
    pub fn wait_timeout_while(
        mut self,
        condvar: &Condvar,
        timeout: Duration,
        condition: impl FnMut(&mut T) -> bool,
    ) -> (Self, bool) {
        let guard = self
            .guard
            .take()
            .expect("a live guard holds its MutexGuard");
        let (guard, result) = condvar
            .wait_timeout_while(guard, timeout, condition)
            .unwrap_or_else(|p| p.into_inner());
        self.guard = Some(guard);
        (self, result.timed_out())
    }

    /// Waits on `condvar` (no time limit) with the lock released meanwhile.
    pub fn wait(mut self, condvar: &Condvar) -> Self {
        let guard = self
            .guard
            .take()
            .expect("a live guard holds its MutexGuard");
        self.guard = Some(condvar.wait(guard).unwrap_or_else(|p| p.into_inner()));
        self
    }
}

impl<T> Deref for RankedGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.guard
            .as_ref()
            .expect("a live guard holds its MutexGuard")
    }
}

impl<T> DerefMut for RankedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard
            .as_mut()
            .expect("a live guard holds its MutexGuard")
    }
}

impl<T> Drop for RankedGuard<'_, T> {
    fn drop(&mut self) {
        self.guard.take();
        held::release(self.rank);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: Rank = Rank::new(1, "low");
    const HIGH: Rank = Rank::new(2, "high");

    #[test]
    fn in_order_nesting_and_release_in_any_order_work() {
        let low = RankedMutex::new(LOW, 1);
        let high = RankedMutex::new(HIGH, 2);
        let a = low.lock();
        let b = high.lock();
        assert_eq!(*a + *b, 3);
        drop(a);
        drop(b);
        // Both released: the order starts afresh.
        let b = high.lock();
        drop(b);
        let _a = low.lock();
    }

    #[test]
    #[cfg(debug_assertions)]
    fn out_of_order_acquisition_panics_naming_both_locks() {
        let low = RankedMutex::new(LOW, ());
        let high = RankedMutex::new(HIGH, ());
        let result = std::thread::spawn(move || {
            let _h = high.lock();
            let _l = low.lock();
        })
        .join();
        let message = *result
            .expect_err("taking low under high must panic")
            .downcast::<String>()
            .expect("a formatted message");
        assert!(message.contains("taking low"), "{message}");
        assert!(message.contains("holding high"), "{message}");
    }

    #[test]
    fn a_poisoned_lock_keeps_its_data() {
        let m = std::sync::Arc::new(RankedMutex::new(LOW, 7));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock();
            *g = 8;
            panic!("poison it");
        })
        .join();
        assert_eq!(*m.lock(), 8);
        assert_eq!(m.try_lock().map(|g| *g), Some(8));
    }

    #[test]
    fn wait_timeout_releases_and_retakes_the_lock() {
        let m = RankedMutex::new(LOW, 0);
        let cv = Condvar::new();
        let g = m.lock();
        let (g, timed_out) = g.wait_timeout(&cv, Duration::from_millis(1));
        assert!(timed_out);
        drop(g);
        assert!(m.try_lock().is_some());
    }
}
