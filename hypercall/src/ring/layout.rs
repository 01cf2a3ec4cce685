//! Computing, writing and opening the ring region layout.

use zerocopy::{FromBytes, IntoBytes};

use super::memory::SharedMemory;
use super::{Consumer, Producer, RingError};
use crate::discovery::{
    ABI_VERSION, CACHE_LINE, CONTROL_SIZE, DiscoveryError, Features, MAX_RING_SIZE, MAX_VCPUS,
    MIN_RING_SIZE, REGION_MAGIC, RegionHeader, RingDescriptor, RingKind, canonical_ring,
};

/// Granularity of the region size (a page, so the region maps as whole pages).
const REGION_GRANULE: u64 = 4096;

/// Where one ring lives in the region, in 64-bit words. Copied into each handle at creation
/// and never re-read from shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    /// Word index of the ring's control block.
    pub control: usize,
    /// Word index of the data area.
    pub data: usize,
    /// Data area size in bytes (a power of two).
    pub size: u64,
}

impl RingGeometry {
    /// Word offset of the producer position inside the control block.
    pub(super) const PRODUCER_POS: usize = 0;
    /// Word offset of the producer wake word.
    pub(super) const PRODUCER_WAKE: usize = 1;
    /// Word offset of the consumer position.
    pub(super) const CONSUMER_POS: usize = 8;
    /// Word offset of the consumer wake word.
    pub(super) const CONSUMER_WAKE: usize = 9;

    /// The geometry of a (validated) descriptor.
    pub fn from_descriptor(d: &RingDescriptor) -> Self {
        RingGeometry {
            control: (d.control_offset / 8) as usize,
            data: (d.data_offset / 8) as usize,
            size: d.data_size,
        }
    }
}

/// Data-area sizes of each ring kind, in bytes (powers of two between
/// [`MIN_RING_SIZE`] and [`MAX_RING_SIZE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSizes {
    /// Each vCPU's event ring.
    pub event: u64,
    /// Each vCPU's event-reply ring.
    pub event_reply: u64,
    /// The command ring.
    pub command: u64,
    /// The command-reply ring (large: replies carry memory and register dumps).
    pub command_reply: u64,
    /// The log ring.
    pub log: u64,
}

impl Default for RingSizes {
    fn default() -> Self {
        RingSizes {
            event: 64 << 10,
            event_reply: 16 << 10,
            command: 64 << 10,
            command_reply: 256 << 10,
            log: 64 << 10,
        }
    }
}

/// Everything that determines a region's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutParams {
    /// Number of target vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpu_count: u32,
    /// Ring sizes.
    pub sizes: RingSizes,
    /// Features announced in the header.
    pub features: Features,
    /// Guest-physical base of the appliance's map window (page-aligned, 0 = none).
    pub map_window_gpa: u64,
    /// Size of the map window (page multiple).
    pub map_window_size: u64,
}

impl LayoutParams {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), RingError> {
        let s = &self.sizes;
        let size_ok = |v: u64| v.is_power_of_two() && (MIN_RING_SIZE..=MAX_RING_SIZE).contains(&v);
        let sizes_ok = [s.event, s.event_reply, s.command, s.command_reply, s.log]
            .into_iter()
            .all(size_ok);
        let window_ok = self.map_window_gpa.is_multiple_of(REGION_GRANULE)
            && self.map_window_size.is_multiple_of(REGION_GRANULE)
            && self
                .map_window_gpa
                .checked_add(self.map_window_size)
                .is_some();
        if (1..=MAX_VCPUS).contains(&self.vcpu_count)
            && sizes_ok
            && window_ok
            && Features::KNOWN.contains(self.features)
        {
            Ok(())
        } else {
            Err(RingError::BadParams)
        }
    }

    /// Number of rings.
    pub fn ring_count(&self) -> u32 {
        RegionHeader::ring_count_for(self.vcpu_count)
    }

    fn header_size(&self) -> u64 {
        RegionHeader::header_size_for(self.ring_count())
    }

    fn size_of_kind(&self, kind: RingKind) -> u64 {
        match kind {
            RingKind::Event => self.sizes.event,
            RingKind::EventReply => self.sizes.event_reply,
            RingKind::Command => self.sizes.command,
            RingKind::CommandReply => self.sizes.command_reply,
            RingKind::Log => self.sizes.log,
        }
    }

    /// Offset of ring `index`'s control block (`index` may be `ring_count`: the end).
    /// Saturating, so unvalidated sizes read from a hostile header cannot overflow: they give
    /// offsets that fail the comparison with the table instead.
    fn ring_offset(&self, index: u32) -> u64 {
        let s = &self.sizes;
        let pair = (2 * CONTROL_SIZE)
            .saturating_add(s.event)
            .saturating_add(s.event_reply);
        let v = self.vcpu_count.saturating_mul(2);
        let pairs = u64::from(index.min(v) / 2);
        let mut offset = self
            .header_size()
            .saturating_add(pairs.saturating_mul(pair));
        if index < v {
            if index % 2 == 1 {
                offset = offset.saturating_add(CONTROL_SIZE + s.event.min(u64::MAX / 2));
            }
            return offset;
        }
        let tail = [s.command, s.command_reply, s.log];
        for size in tail.iter().take((index - v) as usize) {
            offset = offset.saturating_add(CONTROL_SIZE).saturating_add(*size);
        }
        offset
    }

    /// Size of the whole region in bytes (a page multiple).
    pub fn region_size(&self) -> u64 {
        self.ring_offset(self.ring_count())
            .next_multiple_of(REGION_GRANULE)
    }

    /// The descriptor of ring `index`.
    pub fn descriptor(&self, index: u32) -> Option<RingDescriptor> {
        let (kind, vcpu) = canonical_ring(self.vcpu_count, index)?;
        let control_offset = self.ring_offset(index);
        Some(RingDescriptor {
            kind: kind as u32,
            vcpu,
            control_offset,
            data_offset: control_offset.saturating_add(CONTROL_SIZE),
            data_size: self.size_of_kind(kind),
        })
    }

    /// The header of a region with this layout.
    pub fn header(&self) -> RegionHeader {
        RegionHeader {
            magic: REGION_MAGIC,
            abi_version: ABI_VERSION,
            header_size: self.header_size() as u32,
            region_size: self.region_size(),
            features: self.features.0,
            map_window_gpa: self.map_window_gpa,
            map_window_size: self.map_window_size,
            vcpu_count: self.vcpu_count,
            ring_count: self.ring_count(),
            reserved: 0,
        }
    }

    /// Index of the ring of `kind` (for `vcpu` when it is an event or event-reply ring).
    pub fn ring_index(&self, kind: RingKind, vcpu: u32) -> Option<u32> {
        let v = self.vcpu_count;
        let per_vcpu = |k: u32| (vcpu < v).then_some(2 * vcpu + k);
        match kind {
            RingKind::Event => per_vcpu(0),
            RingKind::EventReply => per_vcpu(1),
            RingKind::Command => (2 * u64::from(v)).try_into().ok(),
            RingKind::CommandReply => (2 * u64::from(v) + 1).try_into().ok(),
            RingKind::Log => (2 * u64::from(v) + 2).try_into().ok(),
        }
    }
}

/// A ring region: the validated layout plus the memory. Hands out one [`Producer`] or
/// [`Consumer`] per ring end. Creating two handles for the same end breaks the SPSC contract:
/// the ring then reports corruption errors, but memory safety is unaffected.
#[derive(Debug)]
pub struct Region<M> {
    mem: M,
    params: LayoutParams,
}

impl<M: SharedMemory> Region<M> {
    /// Host side: lays out a fresh region in `mem` (whose length must be exactly
    /// [`LayoutParams::region_size`]): writes the header and ring table and zeroes every
    /// control block.
    pub fn create(mem: M, params: &LayoutParams) -> Result<Self, RingError> {
        params.validate()?;
        check_len(&mem, params.region_size())?;
        let header = params.header();
        mem.write_bytes(0, header.as_bytes())
            .ok_or(RingError::OutOfBounds)?;
        for index in 0..params.ring_count() {
            let d = params
                .descriptor(index)
                .ok_or(RingError::NoSuchRing(index))?;
            let word = 8 + 4 * index as usize;
            mem.write_bytes(word, d.as_bytes())
                .ok_or(RingError::OutOfBounds)?;
            let control = (d.control_offset / 8) as usize;
            mem.write_bytes(control, &[0u8; CONTROL_SIZE as usize])
                .ok_or(RingError::OutOfBounds)?;
        }
        Ok(Region {
            mem,
            params: *params,
        })
    }

    /// Guest side: opens a region written by [`Region::create`], validating the header and
    /// every ring descriptor against the region's length. The layout is read once; later
    /// changes to the header by the peer are ignored.
    pub fn open(mem: M) -> Result<Self, RingError> {
        let len = (mem.word_count() as u64) * 8;
        let mut bytes = [0u8; 64];
        mem.read_bytes(0, &mut bytes)
            .ok_or(DiscoveryError::SizeMismatch {
                header: 64,
                actual: len,
            })?;
        let header = RegionHeader::read_from_bytes(&bytes).map_err(|_| RingError::OutOfBounds)?;
        header.validate(len)?;
        let descriptors_at = |index: u32| -> Result<RingDescriptor, RingError> {
            let mut raw = [0u8; 32];
            mem.read_bytes(8 + 4 * index as usize, &mut raw)
                .ok_or(RingError::OutOfBounds)?;
            RingDescriptor::read_from_bytes(&raw).map_err(|_| RingError::OutOfBounds)
        };
        let v = header.vcpu_count;
        let size_at = |d: Result<RingDescriptor, RingError>| d.map(|d| d.data_size);
        let params = LayoutParams {
            vcpu_count: v,
            sizes: RingSizes {
                event: size_at(descriptors_at(0))?,
                event_reply: size_at(descriptors_at(1))?,
                command: size_at(descriptors_at(2 * v))?,
                command_reply: size_at(descriptors_at(2 * v + 1))?,
                log: size_at(descriptors_at(2 * v + 2))?,
            },
            features: Features(header.features),
            map_window_gpa: header.map_window_gpa,
            map_window_size: header.map_window_size,
        };
        let mut min_offset = u64::from(header.header_size);
        for index in 0..header.ring_count {
            let d = descriptors_at(index)?;
            min_offset = d.validate(&header, index, min_offset, len)?;
            if params.descriptor(index) != Some(d) {
                return Err(DiscoveryError::RingBounds { index }.into());
            }
        }
        params.validate()?;
        if params.header() != header {
            return Err(DiscoveryError::SizeMismatch {
                header: header.region_size,
                actual: params.region_size(),
            }
            .into());
        }
        Ok(Region { mem, params })
    }

    /// The layout.
    pub fn params(&self) -> &LayoutParams {
        &self.params
    }

    /// The header (as computed from the validated layout, not re-read).
    pub fn header(&self) -> RegionHeader {
        self.params.header()
    }

    /// The memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The geometry of ring `index`.
    pub fn geometry(&self, index: u32) -> Result<RingGeometry, RingError> {
        let d = self
            .params
            .descriptor(index)
            .ok_or(RingError::NoSuchRing(index))?;
        Ok(RingGeometry::from_descriptor(&d))
    }

    /// The index of the ring of `kind` (and `vcpu` for per-vCPU rings; ignored otherwise).
    pub fn ring_index(&self, kind: RingKind, vcpu: u32) -> Result<u32, RingError> {
        self.params
            .ring_index(kind, vcpu)
            .ok_or(RingError::NoSuchRing(vcpu))
    }
}

impl<M: SharedMemory + Clone> Region<M> {
    /// The producer end of ring `index`.
    pub fn producer(&self, index: u32) -> Result<Producer<M>, RingError> {
        Producer::new(self.mem.clone(), self.geometry(index)?)
    }

    /// The consumer end of ring `index`.
    pub fn consumer(&self, index: u32) -> Result<Consumer<M>, RingError> {
        Consumer::new(self.mem.clone(), self.geometry(index)?)
    }

    /// The producer end of the ring of `kind` (for `vcpu`, or [`NO_VCPU`](crate::discovery::NO_VCPU)).
    pub fn producer_for(&self, kind: RingKind, vcpu: u32) -> Result<Producer<M>, RingError> {
        self.producer(self.ring_index(kind, vcpu)?)
    }

    /// The consumer end of the ring of `kind` (for `vcpu`, or [`NO_VCPU`](crate::discovery::NO_VCPU)).
    pub fn consumer_for(&self, kind: RingKind, vcpu: u32) -> Result<Consumer<M>, RingError> {
        self.consumer(self.ring_index(kind, vcpu)?)
    }
}

fn check_len<M: SharedMemory>(mem: &M, want: u64) -> Result<(), RingError> {
    let actual = (mem.word_count() as u64) * 8;
    if actual != want {
        return Err(DiscoveryError::SizeMismatch {
            header: want,
            actual,
        }
        .into());
    }
    debug_assert!(want.is_multiple_of(CACHE_LINE));
    Ok(())
}
