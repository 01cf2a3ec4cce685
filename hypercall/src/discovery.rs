//! The discovery record: the header at offset 0 of the ring region, which the appliance reads
//! to find every ring and its map window.
//!
//! # Region layout
//! ```text
//! 0                 RegionHeader (64 B)
//! 64                RingDescriptor[ring_count] (32 B each), padded to 64 B
//! header_size       for each ring, in table order:
//!                     RingControl (128 B: producer line, consumer line)
//!                     data area (data_size B, a power of two)
//! region_size       end
//! ```
//! Every offset and size is a multiple of [`CACHE_LINE`]. The ring table has a canonical order
//! (see [`RingKind`]): for each vCPU its event ring then its event-reply ring, then the command
//! ring, the command-reply ring and the log ring, so ring `i` is found without searching.
//! [`RegionHeader::validate`] and [`RingDescriptor::validate`] check every field against the
//! region length; the ring module refuses a region that fails them.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Cache-line size every offset and size in the region is aligned to.
pub const CACHE_LINE: u64 = 64;
/// [`RegionHeader::magic`]: "KVMIRING" in little-endian byte order.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"KVMIRING");
/// The ABI version this crate speaks (returned by [`Hypercall::Version`]).
///
/// [`Hypercall::Version`]: crate::call::Hypercall::Version
pub const ABI_VERSION: u32 = 1;
/// The most vCPUs a region describes.
pub const MAX_VCPUS: u32 = 256;
/// Smallest ring data area in bytes.
pub const MIN_RING_SIZE: u64 = 256;
/// Largest ring data area in bytes.
pub const MAX_RING_SIZE: u64 = 1 << 30;
/// Size of a ring's control block.
pub const CONTROL_SIZE: u64 = 128;

/// Feature bits (returned by [`Hypercall::Features`] and stored in the header).
///
/// [`Hypercall::Features`]: crate::call::Hypercall::Features
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(pub u64);

impl Features {
    /// [`Hypercall::MapRange`](crate::call::Hypercall::MapRange) is served.
    pub const MAP_RANGE: Features = Features(1 << 0);
    /// [`Hypercall::RevokeAll`](crate::call::Hypercall::RevokeAll) is served.
    pub const REVOKE_ALL: Features = Features(1 << 1);
    /// [`Hypercall::Notify`](crate::call::Hypercall::Notify) is served.
    pub const NOTIFY: Features = Features(1 << 2);
    /// Tokens may grant read-write mappings (otherwise mappings are read-only).
    pub const WRITABLE_MAPS: Features = Features(1 << 3);
    /// The rings honour the wake-up words of their control blocks.
    pub const RING_WAKE_FLAGS: Features = Features(1 << 4);
    /// Every bit this version defines.
    pub const KNOWN: Features = Features(0x1f);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two sets.
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
}

/// The region header at offset 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegionHeader {
    /// Always [`REGION_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the writer.
    pub abi_version: u32,
    /// Bytes from the region start to the first ring control block (header + ring table).
    pub header_size: u32,
    /// Total size of the region in bytes.
    pub region_size: u64,
    /// [`Features`] bits the shim serves.
    pub features: u64,
    /// Guest-physical base of the appliance's map window (0 = none).
    pub map_window_gpa: u64,
    /// Size of the map window in bytes.
    pub map_window_size: u64,
    /// Number of vCPUs of the introspected target (one event ring and one reply ring each).
    pub vcpu_count: u32,
    /// Number of entries in the ring table (`2 * vcpu_count + 3`).
    pub ring_count: u32,
    /// Reserved, zero.
    pub reserved: u64,
}

/// What a ring carries and who produces it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingKind {
    /// Events of one vCPU; the shim produces, the appliance consumes.
    Event = 1,
    /// Replies to one vCPU's events; the appliance produces, the shim consumes.
    EventReply = 2,
    /// Commands; the appliance produces, the shim consumes.
    Command = 3,
    /// Command replies; the shim produces, the appliance consumes.
    CommandReply = 4,
    /// The appliance's log/output lines; the appliance produces, the shim consumes.
    Log = 5,
}

impl RingKind {
    /// Whether the shim (host) is this ring's producer.
    pub const fn host_produces(self) -> bool {
        matches!(self, RingKind::Event | RingKind::CommandReply)
    }
}

impl TryFrom<u32> for RingKind {
    type Error = DiscoveryError;

    fn try_from(v: u32) -> Result<Self, DiscoveryError> {
        Ok(match v {
            1 => RingKind::Event,
            2 => RingKind::EventReply,
            3 => RingKind::Command,
            4 => RingKind::CommandReply,
            5 => RingKind::Log,
            _ => return Err(DiscoveryError::BadRingKind(v)),
        })
    }
}

/// [`RingDescriptor::vcpu`] of a ring that belongs to no vCPU.
pub const NO_VCPU: u32 = u32::MAX;

/// One entry of the ring table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RingDescriptor {
    /// A [`RingKind`] value.
    pub kind: u32,
    /// The vCPU index for event and event-reply rings, [`NO_VCPU`] otherwise.
    pub vcpu: u32,
    /// Offset of the ring's [`RingControl`] block in the region.
    pub control_offset: u64,
    /// Offset of the ring's data area in the region.
    pub data_offset: u64,
    /// Size of the data area in bytes (a power of two).
    pub data_size: u64,
}

/// The control block of one ring: the only words both sides write, one cache line per writer.
///
/// Positions are byte counts since the ring was created (monotonic, multiples of 8); the data
/// offset of position `p` is `p & (data_size - 1)`. A wake word is 0 when its owner is awake,
/// or [`WAKE_ARMED`]` | p` when its owner sleeps until the peer's position passes `p`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RingControl {
    /// Producer's published position (written by the producer only).
    pub producer_pos: u64,
    /// Producer's wake word: it sleeps until the consumer frees space past this position.
    pub producer_wake: u64,
    /// Pads the producer's line.
    pub producer_pad: [u64; 6],
    /// Consumer's released position (written by the consumer only).
    pub consumer_pos: u64,
    /// Consumer's wake word: it sleeps until the producer publishes past this position.
    pub consumer_wake: u64,
    /// Pads the consumer's line.
    pub consumer_pad: [u64; 6],
}

/// Bit 63 of a wake word: its owner is (about to be) asleep.
pub const WAKE_ARMED: u64 = 1 << 63;

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<RegionHeader>() == 64);
    assert!(offset_of!(RegionHeader, region_size) == 16);
    assert!(offset_of!(RegionHeader, map_window_gpa) == 32);
    assert!(offset_of!(RegionHeader, vcpu_count) == 48);
    assert!(offset_of!(RegionHeader, ring_count) == 52);
    assert!(size_of::<RingDescriptor>() == 32);
    assert!(offset_of!(RingDescriptor, control_offset) == 8);
    assert!(offset_of!(RingDescriptor, data_size) == 24);
    assert!(size_of::<RingControl>() as u64 == CONTROL_SIZE);
    assert!(offset_of!(RingControl, producer_wake) == 8);
    assert!(offset_of!(RingControl, consumer_pos) as u64 == CACHE_LINE);
    assert!(offset_of!(RingControl, consumer_wake) == 72);
    assert!(MIN_RING_SIZE.is_power_of_two() && MAX_RING_SIZE.is_power_of_two());
};

/// Why a region header or ring table is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The magic is not [`REGION_MAGIC`].
    #[error("bad region magic {0:#x}")]
    BadMagic(u64),
    /// The ABI version is not [`ABI_VERSION`].
    #[error("unsupported ABI version {0}")]
    BadVersion(u32),
    /// The header's region size disagrees with the mapping's length.
    #[error("header says the region has {header} bytes, the mapping has {actual}")]
    SizeMismatch {
        /// Size in the header.
        header: u64,
        /// Length of the mapping.
        actual: u64,
    },
    /// The vCPU count is zero or above [`MAX_VCPUS`], or the ring count does not match it.
    #[error("bad ring table shape: {vcpus} vCPUs, {rings} rings")]
    BadShape {
        /// vCPU count in the header.
        vcpus: u32,
        /// Ring count in the header.
        rings: u32,
    },
    /// The header size cannot hold the ring table, or is misaligned.
    #[error("bad header size {0}")]
    BadHeaderSize(u32),
    /// The map window is not page-aligned or wraps around the address space.
    #[error("bad map window")]
    BadWindow,
    /// A reserved field is not zero.
    #[error("reserved field not zero")]
    ReservedNotZero,
    /// A feature bit this version does not know is set.
    #[error("unknown feature bits {0:#x}")]
    UnknownFeatures(u64),
    /// A ring descriptor holds an unknown kind.
    #[error("bad ring kind {0}")]
    BadRingKind(u32),
    /// Ring `index` is not the kind (or vCPU) the canonical order puts there.
    #[error("ring {index} is out of canonical order")]
    RingOrder {
        /// Index in the ring table.
        index: u32,
    },
    /// Ring `index` has a misaligned, overlapping or out-of-region offset, or a bad size.
    #[error("ring {index} has a bad offset or size")]
    RingBounds {
        /// Index in the ring table.
        index: u32,
    },
}

impl RegionHeader {
    /// The number of rings a region for `vcpus` vCPUs has.
    pub const fn ring_count_for(vcpus: u32) -> u32 {
        vcpus.saturating_mul(2).saturating_add(3)
    }

    /// The header size (header + ring table, rounded up to a cache line) for `rings` rings.
    pub const fn header_size_for(rings: u32) -> u64 {
        let raw = 64 + 32 * rings as u64;
        raw.div_ceil(CACHE_LINE) * CACHE_LINE
    }

    /// Checks the header against the length of the mapping it was read from.
    pub fn validate(&self, region_len: u64) -> Result<(), DiscoveryError> {
        if self.magic != REGION_MAGIC {
            return Err(DiscoveryError::BadMagic(self.magic));
        }
        if self.abi_version != ABI_VERSION {
            return Err(DiscoveryError::BadVersion(self.abi_version));
        }
        if self.region_size != region_len {
            return Err(DiscoveryError::SizeMismatch {
                header: self.region_size,
                actual: region_len,
            });
        }
        if self.vcpu_count == 0
            || self.vcpu_count > MAX_VCPUS
            || self.ring_count != Self::ring_count_for(self.vcpu_count)
        {
            return Err(DiscoveryError::BadShape {
                vcpus: self.vcpu_count,
                rings: self.ring_count,
            });
        }
        if u64::from(self.header_size) != Self::header_size_for(self.ring_count)
            || u64::from(self.header_size) > region_len
        {
            return Err(DiscoveryError::BadHeaderSize(self.header_size));
        }
        if !self.map_window_gpa.is_multiple_of(4096)
            || !self.map_window_size.is_multiple_of(4096)
            || self
                .map_window_gpa
                .checked_add(self.map_window_size)
                .is_none()
        {
            return Err(DiscoveryError::BadWindow);
        }
        if self.reserved != 0 {
            return Err(DiscoveryError::ReservedNotZero);
        }
        if self.features & !Features::KNOWN.0 != 0 {
            return Err(DiscoveryError::UnknownFeatures(
                self.features & !Features::KNOWN.0,
            ));
        }
        Ok(())
    }

    /// The canonical kind and vCPU of ring `index` in a region for this many vCPUs.
    pub fn canonical_ring(&self, index: u32) -> Option<(RingKind, u32)> {
        canonical_ring(self.vcpu_count, index)
    }
}

/// The canonical kind and vCPU of ring `index` for `vcpus` vCPUs.
pub const fn canonical_ring(vcpus: u32, index: u32) -> Option<(RingKind, u32)> {
    let per_vcpu = vcpus.saturating_mul(2);
    if index < per_vcpu {
        let kind = if index.is_multiple_of(2) {
            RingKind::Event
        } else {
            RingKind::EventReply
        };
        return Some((kind, index / 2));
    }
    match index - per_vcpu {
        0 => Some((RingKind::Command, NO_VCPU)),
        1 => Some((RingKind::CommandReply, NO_VCPU)),
        2 => Some((RingKind::Log, NO_VCPU)),
        _ => None,
    }
}

impl RingDescriptor {
    /// Checks ring `index` of the table: canonical kind and vCPU, alignment, power-of-two size,
    /// and that its control block and data area lie in `min_offset..region_len`. Returns the
    /// end of its data area (the next ring's minimum offset).
    pub fn validate(
        &self,
        header: &RegionHeader,
        index: u32,
        min_offset: u64,
        region_len: u64,
    ) -> Result<u64, DiscoveryError> {
        let kind = RingKind::try_from(self.kind)?;
        if header.canonical_ring(index) != Some((kind, self.vcpu)) {
            return Err(DiscoveryError::RingOrder { index });
        }
        let bad = DiscoveryError::RingBounds { index };
        let aligned = |v: u64| v.is_multiple_of(CACHE_LINE);
        if !aligned(self.control_offset)
            || !aligned(self.data_offset)
            || !self.data_size.is_power_of_two()
            || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&self.data_size)
            || self.control_offset < min_offset
        {
            return Err(bad);
        }
        let control_end = self.control_offset.checked_add(CONTROL_SIZE).ok_or(bad)?;
        let data_end = self.data_offset.checked_add(self.data_size).ok_or(bad)?;
        if self.data_offset < control_end || data_end > region_len {
            return Err(bad);
        }
        Ok(data_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(vcpus: u32, size: u64) -> RegionHeader {
        let rings = RegionHeader::ring_count_for(vcpus);
        RegionHeader {
            magic: REGION_MAGIC,
            abi_version: ABI_VERSION,
            header_size: RegionHeader::header_size_for(rings) as u32,
            region_size: size,
            features: Features::NOTIFY.0,
            map_window_gpa: 0,
            map_window_size: 0,
            vcpu_count: vcpus,
            ring_count: rings,
            reserved: 0,
        }
    }

    #[test]
    fn header_checks_each_field() {
        let good = header(2, 1 << 20);
        assert_eq!(good.validate(1 << 20), Ok(()));
        assert_eq!(
            good.validate(4096),
            Err(DiscoveryError::SizeMismatch {
                header: 1 << 20,
                actual: 4096
            })
        );
        let mut h = good;
        h.magic = 0;
        assert_eq!(h.validate(1 << 20), Err(DiscoveryError::BadMagic(0)));
        h = good;
        h.abi_version = 2;
        assert_eq!(h.validate(1 << 20), Err(DiscoveryError::BadVersion(2)));
        h = good;
        h.ring_count = 6;
        assert_eq!(
            h.validate(1 << 20),
            Err(DiscoveryError::BadShape { vcpus: 2, rings: 6 })
        );
        h = good;
        h.vcpu_count = 0;
        h.ring_count = 3;
        assert!(matches!(
            h.validate(1 << 20),
            Err(DiscoveryError::BadShape { .. })
        ));
        h = good;
        h.header_size = 64;
        assert_eq!(h.validate(1 << 20), Err(DiscoveryError::BadHeaderSize(64)));
        h = good;
        h.features = 1 << 40;
        assert_eq!(
            h.validate(1 << 20),
            Err(DiscoveryError::UnknownFeatures(1 << 40))
        );
        h = good;
        h.reserved = 1;
        assert_eq!(h.validate(1 << 20), Err(DiscoveryError::ReservedNotZero));
    }

    #[test]
    fn canonical_order() {
        assert_eq!(canonical_ring(2, 0), Some((RingKind::Event, 0)));
        assert_eq!(canonical_ring(2, 3), Some((RingKind::EventReply, 1)));
        assert_eq!(canonical_ring(2, 4), Some((RingKind::Command, NO_VCPU)));
        assert_eq!(canonical_ring(2, 6), Some((RingKind::Log, NO_VCPU)));
        assert_eq!(canonical_ring(2, 7), None);
        assert_eq!(RegionHeader::header_size_for(7), 320);
    }

    #[test]
    fn descriptor_bounds() {
        let h = header(1, 8192);
        let d = RingDescriptor {
            kind: 1,
            vcpu: 0,
            control_offset: 256,
            data_offset: 384,
            data_size: 4096,
        };
        assert_eq!(d.validate(&h, 0, 256, 8192), Ok(4480));
        let bad = DiscoveryError::RingBounds { index: 0 };
        assert_eq!(
            d.validate(&h, 0, 320, 8192),
            Err(bad),
            "overlaps the previous ring"
        );
        assert_eq!(d.validate(&h, 0, 256, 4400), Err(bad), "past the end");
        let odd = RingDescriptor {
            data_size: 3000,
            ..d
        };
        assert_eq!(odd.validate(&h, 0, 256, 8192), Err(bad));
        let unaligned = RingDescriptor {
            data_offset: 390,
            ..d
        };
        assert_eq!(unaligned.validate(&h, 0, 256, 8192), Err(bad));
        let huge = RingDescriptor {
            data_offset: u64::MAX - 63,
            ..d
        };
        assert_eq!(huge.validate(&h, 0, 256, 8192), Err(bad));
        let wrong_kind = RingDescriptor { kind: 2, ..d };
        assert_eq!(
            wrong_kind.validate(&h, 0, 256, 8192),
            Err(DiscoveryError::RingOrder { index: 0 })
        );
        let unknown = RingDescriptor { kind: 9, ..d };
        assert_eq!(
            unknown.validate(&h, 0, 256, 8192),
            Err(DiscoveryError::BadRingKind(9))
        );
    }
}
