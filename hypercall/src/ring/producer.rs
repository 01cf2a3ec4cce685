//! The producer end of a ring.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::layout::RingGeometry;
use super::memory::SharedMemory;
use super::wait::{self, Notify, WaitStrategy, Waiter};
use super::{POS_LIMIT, RECORD_HEADER, RingError, TAG_RECORD, TAG_WRAP, header_word, record_size};
use crate::discovery::WAKE_ARMED;

/// The producer end of one ring. Stages records with [`try_push`](Self::try_push) and makes
/// them visible with [`publish`](Self::publish). Never trusts the consumer's position.
#[derive(Debug)]
pub struct Producer<M> {
    mem: M,
    geo: RingGeometry,
    /// Position last stored to the shared producer word.
    published: u64,
    /// Position after the staged (written, unpublished) records.
    staged: u64,
    /// Last validated consumer position.
    consumer: u64,
    /// Adaptive spin budget of the wait helpers.
    spin_budget: u32,
}

impl<M: SharedMemory> Producer<M> {
    /// Takes over the producer end of the ring at `geo`, resuming from the positions in its
    /// control block (validated).
    pub fn new(mem: M, geo: RingGeometry) -> Result<Self, RingError> {
        let control = |w| {
            mem.load(geo.control + w, Acquire)
                .ok_or(RingError::OutOfBounds)
        };
        let pos = control(RingGeometry::PRODUCER_POS)?;
        let cons = control(RingGeometry::CONSUMER_POS)?;
        if !geometry_fits(&geo, mem.word_count()) {
            return Err(RingError::OutOfBounds);
        }
        if pos % 8 != 0 || pos > POS_LIMIT {
            return Err(RingError::BadProducerPosition { pos });
        }
        if cons % 8 != 0 || cons > pos || pos - cons > geo.size {
            return Err(RingError::BadConsumerPosition { pos: cons });
        }
        Ok(Producer {
            mem,
            geo,
            published: pos,
            staged: pos,
            consumer: cons,
            spin_budget: u32::MAX,
        })
    }

    /// The data area size in bytes.
    pub fn capacity(&self) -> u64 {
        self.geo.size
    }

    /// The largest payload a record may carry (`size / 2 - 8`).
    pub fn max_payload(&self) -> usize {
        max_payload(self.geo.size)
    }

    /// Bytes staged but not yet published.
    pub fn staged_bytes(&self) -> u64 {
        self.staged - self.published
    }

    /// Loads and validates the consumer's position: 8-aligned, not behind the last value seen,
    /// not past what we published.
    fn refresh_consumer(&mut self) -> Result<u64, RingError> {
        let word = self.geo.control + RingGeometry::CONSUMER_POS;
        let pos = self.mem.load(word, Acquire).ok_or(RingError::OutOfBounds)?;
        if pos % 8 != 0 || pos < self.consumer || pos > self.published {
            return Err(RingError::BadConsumerPosition { pos });
        }
        self.consumer = pos;
        Ok(pos)
    }

    /// Bytes a record of `len` needs now, including the wrap skip before it.
    fn needed(&self, len: u64) -> (u64, u64) {
        let need = record_size(len);
        let offset = self.staged & (self.geo.size - 1);
        let to_end = self.geo.size - offset;
        let skip = if need > to_end { to_end } else { 0 };
        (skip, need)
    }

    /// Whether a record of `len` payload bytes fits now (loads the consumer's position).
    pub fn fits(&mut self, len: usize) -> Result<bool, RingError> {
        let (skip, need) = self.needed(len as u64);
        let cons = self.refresh_consumer()?;
        Ok(self.staged - cons + skip + need <= self.geo.size)
    }

    /// Stages one record (invisible to the consumer until [`publish`](Self::publish)).
    /// Returns [`RingError::Full`] when it does not fit now; nothing is staged then.
    pub fn try_push(&mut self, payload: &[u8]) -> Result<(), RingError> {
        let max = self.max_payload();
        if payload.len() > max {
            return Err(RingError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let len = payload.len() as u64;
        let (skip, need) = self.needed(len);
        if self.staged - self.consumer + skip + need > self.geo.size {
            let cons = self.refresh_consumer()?;
            if self.staged - cons + skip + need > self.geo.size {
                return Err(RingError::Full);
            }
        }
        if skip > 0 {
            self.write_word(self.staged, header_word(TAG_WRAP, 0))?;
            self.staged += skip;
        }
        let at = self.word_of(self.staged) + 1;
        self.mem
            .write_bytes(at, payload)
            .ok_or(RingError::OutOfBounds)?;
        self.write_word(self.staged, header_word(TAG_RECORD, len as u32))?;
        self.staged += need;
        Ok(())
    }

    /// Makes every staged record visible with one release store of the producer position,
    /// then checks the consumer's wake word. Returns whether the consumer must be notified
    /// (it armed its wake word at a position this publish passed).
    #[must_use = "notify the consumer when this returns true"]
    pub fn publish(&mut self) -> Result<bool, RingError> {
        if self.staged == self.published {
            return Ok(false);
        }
        let notify = advance(
            &self.mem,
            self.geo.control + RingGeometry::PRODUCER_POS,
            self.geo.control + RingGeometry::CONSUMER_WAKE,
            self.published,
            self.staged,
        )?;
        self.published = self.staged;
        Ok(notify)
    }

    /// [`publish`](Self::publish), then notify through `notify` if needed.
    pub fn publish_and_notify(&mut self, notify: &impl Notify) -> Result<(), RingError> {
        if self.publish()? {
            notify.notify();
        }
        Ok(())
    }

    /// Stages `payload`, waiting for space as `strategy` says when the ring is full: staged
    /// records are published first (so the consumer can drain), then it spins, backs off, and
    /// finally arms its wake word and sleeps in `waiter` until the consumer frees space.
    /// Does not publish the new record.
    pub fn push_blocking(
        &mut self,
        payload: &[u8],
        strategy: &WaitStrategy,
        waiter: &impl Waiter,
        notify: &impl Notify,
    ) -> Result<(), RingError> {
        match self.try_push(payload) {
            Err(RingError::Full) => {}
            other => return other,
        }
        self.wait_writable(payload.len(), strategy, waiter, notify)?;
        self.try_push(payload)
    }

    /// Waits until a record of `len` payload bytes fits, as `strategy` says; staged records
    /// are published first (notifying the consumer if it sleeps).
    pub fn wait_writable(
        &mut self,
        len: usize,
        strategy: &WaitStrategy,
        waiter: &impl Waiter,
        notify: &impl Notify,
    ) -> Result<(), RingError> {
        if len > self.max_payload() {
            return Err(RingError::TooLarge {
                len,
                max: self.max_payload(),
            });
        }
        self.publish_and_notify(notify)?;
        let fits = |p: &mut Self| p.fits(len).map(|ok| ok.then_some(()));
        let prepare = |p: &mut Self| p.arm_wake(len);
        wait::wait_until(
            self,
            strategy,
            waiter,
            |h| &mut h.spin_budget,
            fits,
            prepare,
            Self::disarm_wake,
        )
    }

    /// Prepares to sleep until a record of `len` bytes fits: arms the wake word at the last
    /// consumer position seen, fences, and re-checks; if the consumer moved but the record
    /// still does not fit, re-arms at the new position (so the consumer's next release is
    /// the one that notifies). Returns `true` when it still does not fit (sleep; the consumer
    /// notifies at its next release), `false` (disarmed) when it fits now. Staged records
    /// should be published first. Call [`disarm_wake`](Self::disarm_wake) after waking.
    pub fn arm_wake(&mut self, len: usize) -> Result<bool, RingError> {
        loop {
            let seen = self.consumer;
            self.arm(true)?;
            match self.fits(len) {
                Ok(false) if self.consumer == seen => return Ok(true),
                Ok(false) => continue,
                other => {
                    self.arm(false)?;
                    return other.map(|_| false);
                }
            }
        }
    }

    /// Clears the wake word (the producer is awake again).
    pub fn disarm_wake(&mut self) -> Result<(), RingError> {
        self.arm(false)
    }

    /// Arms (`true`) or disarms the producer wake word at the consumer position we wait past.
    fn arm(&mut self, on: bool) -> Result<(), RingError> {
        let value = if on { WAKE_ARMED | self.consumer } else { 0 };
        let word = self.geo.control + RingGeometry::PRODUCER_WAKE;
        self.mem
            .store(word, value, Relaxed)
            .ok_or(RingError::OutOfBounds)?;
        if on {
            self.mem.fence();
        }
        Ok(())
    }

    fn word_of(&self, pos: u64) -> usize {
        self.geo.data + ((pos & (self.geo.size - 1)) / 8) as usize
    }

    fn write_word(&self, pos: u64, value: u64) -> Result<(), RingError> {
        self.mem
            .store(self.word_of(pos), value, Relaxed)
            .ok_or(RingError::OutOfBounds)
    }
}

/// The largest payload of a ring of `size` bytes.
pub(super) fn max_payload(size: u64) -> usize {
    (size / 2 - RECORD_HEADER) as usize
}

/// Whether the geometry is sane and its control block and data area lie in `words` words.
pub(super) fn geometry_fits(geo: &RingGeometry, words: usize) -> bool {
    let data_words = usize::try_from(geo.size / 8).ok();
    let data_end = data_words.and_then(|n| geo.data.checked_add(n));
    let control_end = geo.control.checked_add(16);
    geo.size.is_power_of_two()
        && geo.size >= 64
        && data_end.is_some_and(|end| end <= words)
        && control_end.is_some_and(|end| end <= words)
}

/// One side's hand-over: stores its position `new` (was `old`) at word `pos` with release
/// ordering, then — after a full fence, so the peer cannot arm its wake word unseen — reads the
/// peer's wake word at `wake`. True if the peer must be notified.
pub(super) fn advance(
    mem: &impl SharedMemory,
    pos: usize,
    wake: usize,
    old: u64,
    new: u64,
) -> Result<bool, RingError> {
    mem.store(pos, new, Release).ok_or(RingError::OutOfBounds)?;
    mem.fence();
    let armed = mem.load(wake, Relaxed).ok_or(RingError::OutOfBounds)?;
    Ok(wake_crossed(armed, old, new))
}

/// Whether a wake word armed at position `p` asks for a notification when the peer's position
/// moves from `old` to `new` (virtio's `vring_need_event`: `old <= p < new`).
pub(super) fn wake_crossed(wake: u64, old: u64, new: u64) -> bool {
    if wake & WAKE_ARMED == 0 {
        return false;
    }
    let at = wake & !WAKE_ARMED;
    old <= at && at < new
}
