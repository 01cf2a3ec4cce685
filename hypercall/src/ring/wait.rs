//! Waiting for a ring: spin, back off, then sleep with notification suppression.
//!
//! # Strategy
//! A side that finds its ring empty (consumer) or full (producer) waits in three phases:
//! 1. **Spin**: re-check up to [`WaitStrategy::spins`] times (an adaptive budget: see
//!    `wait_until`) with one `spin_loop` hint between
//!    checks. A peer that is actively producing answers within a few hundred nanoseconds, and
//!    checking costs no exit and no system call.
//! 2. **Back off**: [`WaitStrategy::backoff_rounds`] more checks, the pause before each doubling
//!    (1, 2, 4, … `spin_loop` hints, capped at `2^max_backoff_shift`), so a busy peer on the
//!    same core gets cycles.
//! 3. **Yield**: [`WaitStrategy::yields`] more checks, each after [`Waiter::relax`] (a
//!    scheduler yield on a host thread), so a peer waiting for a CPU gets it.
//! 4. **Sleep**: arm the wake word at the last position seen, fence, re-check (so a publish
//!    that raced with arming is never missed; if the peer moved but we are still not ready,
//!    re-arm at the new position), and only then sleep in the user's [`Waiter`]; after every
//!    wake-up, disarm and re-check. The peer notifies exactly once per arming, through its
//!    [`Notify`].
//!
//! The waiter may return early or spuriously (a timeout is a good idea against a dead peer);
//! the loop simply re-checks.

use super::RingError;

/// Wakes the peer of a ring: a `NOTIFY` hypercall from a guest, an eventfd write, a futex wake
/// or a thread unpark on the host.
pub trait Notify {
    /// Wakes the peer (it may already be awake; the call must be cheap and idempotent).
    fn notify(&self);
}

/// Sleeps until the peer notifies (or a timeout or spurious wake-up).
pub trait Waiter {
    /// Blocks until notified; may return early.
    fn wait(&self);

    /// Gives the CPU away briefly without sleeping (the yield phase): `sched_yield` on a
    /// host thread. The default is a spin-loop hint (no scheduler in a bare guest).
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// A [`Notify`] that does nothing, for sides whose peer polls.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoNotify;

impl Notify for NoNotify {
    fn notify(&self) {}
}

impl<T: Notify + ?Sized> Notify for &T {
    fn notify(&self) {
        (**self).notify();
    }
}

impl<T: Waiter + ?Sized> Waiter for &T {
    fn wait(&self) {
        (**self).wait();
    }
    fn relax(&self) {
        (**self).relax();
    }
}

/// How long to spin and back off before sleeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitStrategy {
    /// Checks with a single `spin_loop` hint between them.
    pub spins: u32,
    /// Checks with an exponentially growing pause between them.
    pub backoff_rounds: u32,
    /// Cap of the pause: at most `2^max_backoff_shift` hints.
    pub max_backoff_shift: u32,
    /// Checks with a [`Waiter::relax`] (a scheduler yield on hosts) between them.
    pub yields: u32,
}

impl Default for WaitStrategy {
    /// 256 spins, then 6 back-off rounds (1..=32 hints), then 50 yields, then sleep: a peer
    /// that answers within a few microseconds is caught without a system call, and a waiter
    /// on an oversubscribed host soon yields the CPU its peer may need.
    fn default() -> Self {
        WaitStrategy {
            spins: 256,
            backoff_rounds: 6,
            max_backoff_shift: 5,
            yields: 50,
        }
    }
}

impl WaitStrategy {
    /// Sleep at once (after the armed re-check): for peers known to be slow, like a VM that
    /// needs an exit to run.
    pub const SLEEP: WaitStrategy = WaitStrategy {
        spins: 0,
        backoff_rounds: 0,
        max_backoff_shift: 0,
        yields: 0,
    };
}

/// Fewest spins an adaptive budget shrinks to.
const MIN_SPINS: u32 = 16;

/// Waits until `poll` yields a value, following `strategy`. `prepare(state)` arms the wake
/// word, fences and re-checks: it returns `true` when the caller may sleep (still not ready,
/// armed at the position last observed), `false` when it became ready (and disarmed);
/// `disarm(state)` clears the wake word after a sleep.
///
/// `budget(state)` is the handle's adaptive spin budget: when spinning pays off (the peer
/// answered after some spins) it doubles up to `strategy.spins`; when a wait reaches the
/// yield phase it drops to a quarter (at least [`MIN_SPINS`]), and the back-off phase runs
/// only at a full budget. So on an oversubscribed host, where the peer is often not running,
/// a waiter soon stops burning the time slice the peer needs.
pub(super) fn wait_until<S, T>(
    state: &mut S,
    strategy: &WaitStrategy,
    waiter: &impl Waiter,
    budget: impl Fn(&mut S) -> &mut u32,
    mut poll: impl FnMut(&mut S) -> Result<Option<T>, RingError>,
    mut prepare: impl FnMut(&mut S) -> Result<bool, RingError>,
    mut disarm: impl FnMut(&mut S) -> Result<(), RingError>,
) -> Result<T, RingError> {
    let full = strategy.spins;
    let floor = MIN_SPINS.min(full);
    let spins = (*budget(state)).clamp(floor, full);
    for i in 0..spins {
        if let Some(value) = poll(state)? {
            if i > 0 {
                *budget(state) = spins.saturating_mul(2).min(full);
            }
            return Ok(value);
        }
        core::hint::spin_loop();
    }
    if spins == full {
        for round in 0..strategy.backoff_rounds {
            for _ in 0..1u32 << round.min(strategy.max_backoff_shift).min(31) {
                core::hint::spin_loop();
            }
            if let Some(value) = poll(state)? {
                return Ok(value);
            }
        }
    }
    *budget(state) = (spins / 4).max(floor);
    for _ in 0..strategy.yields {
        waiter.relax();
        if let Some(value) = poll(state)? {
            return Ok(value);
        }
    }
    loop {
        if prepare(state)? {
            waiter.wait();
            disarm(state)?;
        }
        if let Some(value) = poll(state)? {
            return Ok(value);
        }
    }
}
