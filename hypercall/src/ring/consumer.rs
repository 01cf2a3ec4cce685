//! The consumer end of a ring.

use core::sync::atomic::Ordering::{Acquire, Relaxed};

use super::layout::RingGeometry;
use super::memory::SharedMemory;
use super::producer::{advance, geometry_fits, max_payload};
use super::wait::{self, Notify, WaitStrategy, Waiter};
use super::{POS_LIMIT, RingError, TAG_RECORD, TAG_WRAP, record_size};
use crate::discovery::WAKE_ARMED;

/// The consumer end of one ring. Copies records out with [`try_pop`](Self::try_pop) or
/// [`drain`](Self::drain) and frees their space with [`release`](Self::release). Every
/// position and header read from the producer is validated first.
#[derive(Debug)]
pub struct Consumer<M> {
    mem: M,
    geo: RingGeometry,
    /// Position last stored to the shared consumer word.
    released: u64,
    /// Position after the records copied out so far.
    read: u64,
    /// Last validated producer position.
    producer: u64,
    /// Adaptive spin budget of the wait helpers.
    spin_budget: u32,
}

impl<M: SharedMemory> Consumer<M> {
    /// Takes over the consumer end of the ring at `geo`, resuming from the positions in its
    /// control block (validated).
    pub fn new(mem: M, geo: RingGeometry) -> Result<Self, RingError> {
        if !geometry_fits(&geo, mem.word_count()) {
            return Err(RingError::OutOfBounds);
        }
        let control = |w| {
            mem.load(geo.control + w, Acquire)
                .ok_or(RingError::OutOfBounds)
        };
        let cons = control(RingGeometry::CONSUMER_POS)?;
        let prod = control(RingGeometry::PRODUCER_POS)?;
        if cons % 8 != 0 || cons > POS_LIMIT {
            return Err(RingError::BadConsumerPosition { pos: cons });
        }
        if prod % 8 != 0 || prod < cons || prod - cons > geo.size {
            return Err(RingError::BadProducerPosition { pos: prod });
        }
        Ok(Consumer {
            mem,
            geo,
            released: cons,
            read: cons,
            producer: prod,
            spin_budget: u32::MAX,
        })
    }

    /// The data area size in bytes.
    pub fn capacity(&self) -> u64 {
        self.geo.size
    }

    /// The largest payload a record may carry; a buffer this large takes any record.
    pub fn max_payload(&self) -> usize {
        max_payload(self.geo.size)
    }

    /// Loads and validates the producer's position: 8-aligned, not behind the last value
    /// seen, at most the ring size ahead of what we released.
    fn refresh_producer(&mut self) -> Result<u64, RingError> {
        let word = self.geo.control + RingGeometry::PRODUCER_POS;
        let pos = self.mem.load(word, Acquire).ok_or(RingError::OutOfBounds)?;
        if pos % 8 != 0
            || pos > POS_LIMIT
            || pos < self.producer
            || pos - self.released > self.geo.size
        {
            return Err(RingError::BadProducerPosition { pos });
        }
        self.producer = pos;
        Ok(pos)
    }

    /// Bytes published and not yet read (loads the producer's position).
    pub fn available(&mut self) -> Result<u64, RingError> {
        Ok(self.refresh_producer()? - self.read)
    }

    /// Copies the next record into `dst` and returns its length, or `None` when the ring is
    /// empty. Its space is freed at the next [`release`](Self::release). Loads the producer's
    /// position only when everything seen before has been read (one acquire per batch).
    pub fn try_pop(&mut self, dst: &mut [u8]) -> Result<Option<usize>, RingError> {
        if self.read == self.producer {
            self.refresh_producer()?;
        }
        self.pop_published(dst)
    }

    /// Pops from what is known to be published, without loading the producer's position.
    fn pop_published(&mut self, dst: &mut [u8]) -> Result<Option<usize>, RingError> {
        let size = self.geo.size;
        while self.read < self.producer {
            let pos = self.read;
            let offset = pos & (size - 1);
            let at = self.geo.data + (offset / 8) as usize;
            // Loaded once: every check below is on this local copy (TOCTOU rule).
            let header = self.mem.load(at, Relaxed).ok_or(RingError::OutOfBounds)?;
            let tag = (header >> 32) as u32;
            let len = header & 0xffff_ffff;
            if tag == TAG_WRAP && len == 0 {
                let skip = size - offset;
                if pos + skip > self.producer {
                    return Err(RingError::BadRecordLength { pos, len: skip });
                }
                self.read += skip;
                continue;
            }
            if tag != TAG_RECORD {
                return Err(RingError::BadRecordTag { pos, header });
            }
            let need = record_size(len);
            if len > self.max_payload() as u64 || offset + need > size || pos + need > self.producer
            {
                return Err(RingError::BadRecordLength { pos, len });
            }
            let len = len as usize;
            let out = dst
                .get_mut(..len)
                .ok_or(RingError::BufferTooSmall { need: len })?;
            self.mem
                .read_bytes(at + 1, out)
                .ok_or(RingError::OutOfBounds)?;
            self.read += need;
            return Ok(Some(len));
        }
        Ok(None)
    }

    /// Frees every record read so far with one release store of the consumer position, then
    /// checks the producer's wake word. Returns whether the producer must be notified (it
    /// waits for space this release provides).
    #[must_use = "notify the producer when this returns true"]
    pub fn release(&mut self) -> Result<bool, RingError> {
        if self.read == self.released {
            return Ok(false);
        }
        let notify = advance(
            &self.mem,
            self.geo.control + RingGeometry::CONSUMER_POS,
            self.geo.control + RingGeometry::PRODUCER_WAKE,
            self.released,
            self.read,
        )?;
        self.released = self.read;
        Ok(notify)
    }

    /// [`release`](Self::release), then notify through `notify` if needed.
    pub fn release_and_notify(&mut self, notify: &impl Notify) -> Result<(), RingError> {
        if self.release()? {
            notify.notify();
        }
        Ok(())
    }

    /// Batch consume: loads the producer's position once, copies every record published up to
    /// it into `scratch` in turn and hands the copy to `f`, then releases them all with one
    /// store (notifying the producer through `notify` if it waits). Returns the number of
    /// records. On a corrupt record, the records before it are still delivered and released.
    pub fn drain(
        &mut self,
        scratch: &mut [u8],
        notify: &impl Notify,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, RingError> {
        let mut count = 0;
        let result = self.refresh_producer().and_then(|_| {
            while let Some(len) = self.pop_published(scratch)? {
                f(scratch.get(..len).ok_or(RingError::OutOfBounds)?);
                count += 1;
            }
            Ok(())
        });
        self.release_and_notify(notify)?;
        result.map(|()| count)
    }

    /// Pops the next record, waiting as `strategy` says when the ring is empty: records read
    /// so far are released first (so a producer waiting for space can go on), then it spins,
    /// backs off, and finally arms its wake word and sleeps in `waiter` until the producer
    /// publishes.
    pub fn pop_blocking(
        &mut self,
        dst: &mut [u8],
        strategy: &WaitStrategy,
        waiter: &impl Waiter,
        notify: &impl Notify,
    ) -> Result<usize, RingError> {
        if let Some(len) = self.try_pop(dst)? {
            return Ok(len);
        }
        self.release_and_notify(notify)?;
        let poll = |c: &mut Self| c.try_pop(dst);
        wait::wait_until(
            self,
            strategy,
            waiter,
            |h| &mut h.spin_budget,
            poll,
            Self::arm_wake,
            Self::disarm_wake,
        )
    }

    /// Prepares to sleep (for callers that wait on several rings with one waiter): arms the
    /// wake word, fences, and re-checks. Returns `true` when the ring is still empty, so the
    /// caller may sleep and the producer will notify at its next publish; returns `false` (and
    /// disarms) when records arrived meanwhile. Call [`disarm_wake`](Self::disarm_wake) after
    /// waking.
    pub fn arm_wake(&mut self) -> Result<bool, RingError> {
        self.arm(true)?;
        match self.available() {
            Ok(0) => Ok(true),
            other => {
                self.arm(false)?;
                other.map(|_| false)
            }
        }
    }

    /// Clears the wake word (the consumer is awake again).
    pub fn disarm_wake(&mut self) -> Result<(), RingError> {
        self.arm(false)
    }

    /// Waits until at least one record is published, as `strategy` says; records read so far
    /// are released first (notifying a producer that waits for space). For loops that
    /// [`drain`](Self::drain) and wait in turn.
    pub fn wait_readable(
        &mut self,
        strategy: &WaitStrategy,
        waiter: &impl Waiter,
        notify: &impl Notify,
    ) -> Result<(), RingError> {
        self.release_and_notify(notify)?;
        let ready = |c: &mut Self| c.available().map(|n| (n > 0).then_some(()));
        wait::wait_until(
            self,
            strategy,
            waiter,
            |h| &mut h.spin_budget,
            ready,
            Self::arm_wake,
            Self::disarm_wake,
        )
    }

    /// Arms (`true`) or disarms the consumer wake word at the position read to.
    fn arm(&mut self, on: bool) -> Result<(), RingError> {
        let value = if on { WAKE_ARMED | self.read } else { 0 };
        let word = self.geo.control + RingGeometry::CONSUMER_WAKE;
        self.mem
            .store(word, value, Relaxed)
            .ok_or(RingError::OutOfBounds)?;
        if on {
            self.mem.fence();
        }
        Ok(())
    }
}
