//! Finding the ring region and the map window from the boot-info record.
//!
//! The VMM writes [`BootInfo`] at [`hypercall::boot::BOOT_INFO_ADDR`]; for the appliance its
//! `ring_region_gpa`/`ring_region_size` locate the ring region and
//! `map_window_gpa`/`map_window_size` the map window. [`Discovery::from_boot_info`] checks
//! them (nothing from the host is trusted), and [`Discovery::open_region`] opens the rings
//! and cross-checks the window the region header announces against the boot info.

use hypercall::boot::{BOOT_MAGIC, BOOT_VERSION, BootInfo};
use hypercall::ring::{Region, SharedMemory};

use crate::DriverError;

/// Page size of the map window.
pub const PAGE: u64 = 4096;

/// The validated locations of the ring region and the map window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// Guest-physical base of the ring region.
    pub ring_gpa: u64,
    /// Ring region size in bytes.
    pub ring_size: u64,
    /// Guest-physical base of the map window.
    pub window_gpa: u64,
    /// Map window size in bytes.
    pub window_size: u64,
    /// vCPUs of the appliance itself.
    pub vcpu_count: u32,
}

impl Discovery {
    /// Validates the boot info: magic and version, both areas present, page-aligned, not
    /// wrapping the address space, not overlapping each other or guest RAM.
    pub fn from_boot_info(info: &BootInfo) -> Result<Self, DriverError> {
        if info.magic != BOOT_MAGIC {
            return Err(DriverError::BadBootInfo("magic"));
        }
        if info.version != BOOT_VERSION {
            return Err(DriverError::BadBootInfo("version"));
        }
        let area = |gpa: u64, size: u64, what| -> Result<(u64, u64), DriverError> {
            let end = gpa.checked_add(size);
            match end {
                _ if size == 0 || gpa == 0 => Err(DriverError::BadBootInfo(what)),
                _ if !gpa.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) => {
                    Err(DriverError::BadBootInfo(what))
                }
                Some(end) => Ok((gpa, end)),
                None => Err(DriverError::BadBootInfo(what)),
            }
        };
        let (ring, ring_end) = area(info.ring_region_gpa, info.ring_region_size, "ring region")?;
        let (window, window_end) = area(info.map_window_gpa, info.map_window_size, "map window")?;
        if ring < window_end && window < ring_end {
            return Err(DriverError::BadBootInfo(
                "ring region overlaps the map window",
            ));
        }
        if ring < info.ram_size || window < info.ram_size {
            return Err(DriverError::BadBootInfo(
                "ring region or map window overlaps RAM",
            ));
        }
        if usize::try_from(info.ring_region_size).is_err() {
            return Err(DriverError::BadBootInfo("ring region size"));
        }
        Ok(Discovery {
            ring_gpa: info.ring_region_gpa,
            ring_size: info.ring_region_size,
            window_gpa: info.map_window_gpa,
            window_size: info.map_window_size,
            vcpu_count: info.vcpu_count,
        })
    }

    /// Reads a boot-info record from its bytes (e.g. copied from
    /// [`hypercall::boot::BOOT_INFO_ADDR`]).
    pub fn parse_boot_info(bytes: &[u8]) -> Result<BootInfo, DriverError> {
        use zerocopy::FromBytes;
        BootInfo::read_from_prefix(bytes)
            .map(|(info, _)| info)
            .map_err(|_| DriverError::BadBootInfo("record too short"))
    }

    /// Number of page slots in the map window.
    pub fn window_slots(&self) -> u64 {
        self.window_size / PAGE
    }

    /// Opens the ring region in `mem` (the `ring_size` bytes at `ring_gpa`), validating the
    /// header and every ring, and checks that the header names the same map window.
    pub fn open_region<M: SharedMemory>(&self, mem: M) -> Result<Region<M>, DriverError> {
        if (mem.word_count() as u64).checked_mul(8) != Some(self.ring_size) {
            return Err(DriverError::BadBootInfo(
                "ring mapping length differs from boot info",
            ));
        }
        let region = Region::open(mem)?;
        let header = region.header();
        if header.map_window_gpa != self.window_gpa || header.map_window_size != self.window_size {
            return Err(DriverError::BadBootInfo(
                "region header names another map window",
            ));
        }
        Ok(region)
    }
}
