//! Waiting for a ring: spin, back off, then sleep with notification suppression.
//!
//! # Strategy
//! A side that finds its ring empty (consumer) or full (producer) waits in three phases:
//! 1. **Spin**: re-check up to [`WaitStrategy::spins`] times with one `spin_loop` hint between
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
    /// 64 spins, then 7 back-off rounds (1..=64 hints: a few microseconds), then 8 yields,
    /// then sleep — short, because on an oversubscribed host a spinning waiter steals the
    /// time slice its peer needs.
    fn default() -> Self {
        WaitStrategy {
            spins: 128,
            backoff_rounds: 8,
            max_backoff_shift: 7,
            yields: 100,
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

/// Waits until `poll` yields a value, following `strategy`. `prepare(state)` arms the wake
/// word, fences and re-checks: it returns `true` when the caller may sleep (still not ready,
/// armed at the position last observed), `false` when it became ready (and disarmed);
/// `disarm(state)` clears the wake word after a sleep.
pub(super) fn wait_until<S, T>(
    state: &mut S,
    strategy: &WaitStrategy,
    waiter: &impl Waiter,
    mut poll: impl FnMut(&mut S) -> Result<Option<T>, RingError>,
    mut prepare: impl FnMut(&mut S) -> Result<bool, RingError>,
    mut disarm: impl FnMut(&mut S) -> Result<(), RingError>,
) -> Result<T, RingError> {
    for _ in 0..strategy.spins {
        if let Some(value) = poll(state)? {
            return Ok(value);
        }
        core::hint::spin_loop();
    }
    for round in 0..strategy.backoff_rounds {
        for _ in 0..1u32 << round.min(strategy.max_backoff_shift).min(31) {
            core::hint::spin_loop();
        }
        if let Some(value) = poll(state)? {
            return Ok(value);
        }
    }
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
