//! Guest RAM: one memfd mapped `MAP_SHARED`, exposed as a vm-memory `GuestMemoryMmap` and
//! registered as a KVM memslot.
//!
//! Backing RAM by a memfd (rather than anonymous memory) is what makes zero-copy sharing
//! possible: another mapping of the same file (in this process or another one, after passing
//! the fd) sees the guest's bytes, and a page of it can be mapped with `mmap(MAP_FIXED)` over a
//! window of a second VM. [`GuestRam::memfd`] and [`GuestRam::host_range`] are the hooks for that.
//!
//! The mapping is advised `MADV_HUGEPAGE`: where the host enables transparent huge pages for
//! shmem (`shmem_enabled` = `advise` or wider), RAM is allocated in 2 MiB folios, which KVM
//! maps with 2 MiB entries and a map window can share with one PMD ([`crate::window`]).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::dirty::SoftDirty;
use crate::error::VmError;

/// Host page size assumed for alignment checks.
pub const PAGE_SIZE: u64 = 4096;

/// A guest's RAM: `size` bytes at guest-physical address 0, backed by a memfd.
#[derive(Debug)]
pub struct GuestRam {
    memfd: Arc<File>,
    memory: GuestMemoryMmap,
    host_base: usize,
    size: u64,
    /// Host writes, recorded while a dirty log is active ([`crate::dirty`]).
    soft_dirty: Arc<SoftDirty>,
    /// The memslot this RAM was registered as: `slot << 32 | flags`, or [`NO_SLOT`].
    memslot: AtomicU64,
    /// The guest-physical address of that memslot.
    slot_gpa: AtomicU64,
}

/// [`GuestRam::memslot`] before registration.
const NO_SLOT: u64 = u64::MAX;

impl GuestRam {
    /// Creates a zero-filled memfd of `size` bytes (a multiple of 4 KiB) named `name`, seals
    /// its size (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and maps it shared. The memory is not yet visible to any VM: see [`GuestRam::register`].
    pub fn new(name: &str, size: u64) -> Result<Self, VmError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(VmError::Config(format!(
                "guest RAM size {size:#x} must be a non-zero multiple of 4 KiB"
            )));
        }
        let cname = CString::new(name)
            .map_err(|_| VmError::Config("memfd name contains a NUL".to_string()))?;
        // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(VmError::mem("memfd_create")(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create, is valid and owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(VmError::mem("ftruncate memfd"))?;
        // The size is fixed for good: a process this memfd is passed to (the appliance process
        // maps a target's RAM) can rely on every page staying there (no SIGBUS on access).
        // SAFETY: F_ADD_SEALS on a descriptor we own; no pointer arguments.
        let sealed = unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if sealed < 0 {
            return Err(VmError::mem("sealing the memfd's size")(
                io::Error::last_os_error(),
            ));
        }
        Self::from_file(file, size)
    }

    /// Maps the first `size` bytes (a multiple of 4 KiB) of an existing memory file shared —
    /// e.g. a memfd received from another process, whose bytes both processes then see. The
    /// file must be at least `size` bytes long and open for reading and writing; its contents
    /// are kept. The memory is not yet visible to any VM: see [`GuestRam::register`].
    pub fn from_file(file: File, size: u64) -> Result<Self, VmError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(VmError::Config(format!(
                "guest RAM size {size:#x} must be a non-zero multiple of 4 KiB"
            )));
        }
        let len = usize::try_from(size)
            .map_err(|_| VmError::Config(format!("guest RAM size {size:#x} too large")))?;
        let file_len = file
            .metadata()
            .map_err(VmError::mem("fstat guest RAM file"))?
            .len();
        if file_len < size {
            return Err(VmError::Config(format!(
                "guest RAM file holds {file_len:#x} bytes, {size:#x} needed"
            )));
        }
        let memfd = Arc::new(file);
        let region = MmapRegion::<()>::from_file(FileOffset::from_arc(memfd.clone(), 0), len)
            .map_err(|e| VmError::mem("mmap guest RAM")(io::Error::other(e.to_string())))?;
        let host_base = region.as_ptr() as usize;
        crate::window::advise_huge(region.as_ptr().cast(), size);
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VmError::Config("guest RAM region overflows".to_string()))?;
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| VmError::Config(format!("guest memory: {e}")))?;
        Ok(GuestRam {
            memfd,
            memory,
            host_base,
            size,
            soft_dirty: Arc::new(SoftDirty::new(size)),
            memslot: AtomicU64::new(NO_SLOT),
            slot_gpa: AtomicU64::new(0),
        })
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd backing guest RAM (file offset = guest-physical address).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The memfd as a shareable file handle (e.g. to send it to another process).
    pub fn memfd_file(&self) -> &Arc<File> {
        &self.memfd
    }

    /// The vm-memory view of guest RAM (for loaders and `Bytes` accesses).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Host virtual address of guest-physical address 0.
    pub fn host_base(&self) -> *mut u8 {
        self.host_base as *mut u8
    }

    /// Checks that `gpa..gpa+len` lies inside RAM and returns its host address.
    ///
    /// The pointer stays valid as long as `self` lives; pages may be remapped under it with
    /// `mmap(MAP_FIXED)` (the address range stays mapped).
    pub fn host_range(&self, gpa: u64, len: u64) -> Result<*mut u8, VmError> {
        let end = gpa.checked_add(len);
        match end {
            Some(end) if end <= self.size => Ok((self.host_base + gpa as usize) as *mut u8),
            _ => Err(VmError::OutOfRange {
                gpa,
                len,
                ram_size: self.size,
            }),
        }
    }

    /// Copies `bytes` into guest RAM at `gpa` (recorded in the software dirty log, see
    /// [`crate::dirty`]).
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VmError> {
        self.host_range(gpa, bytes.len() as u64)?;
        let r = self
            .memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| VmError::mem("write guest RAM")(io::Error::other(e.to_string())));
        self.soft_dirty.mark(gpa, bytes.len() as u64);
        r
    }

    /// The software dirty log of host writes: every host path that writes this RAM other
    /// than [`GuestRam::write`] (e.g. through a second mapping of the memfd) must call
    /// [`SoftDirty::mark`] after its copy.
    pub fn soft_dirty(&self) -> &Arc<SoftDirty> {
        &self.soft_dirty
    }

    /// The memslot id, flags and guest-physical address this RAM was last registered with,
    /// if any.
    pub fn memslot(&self) -> Option<(u32, u32, u64)> {
        match self.memslot.load(Ordering::SeqCst) {
            NO_SLOT => None,
            v => Some((
                (v >> 32) as u32,
                v as u32,
                self.slot_gpa.load(Ordering::SeqCst),
            )),
        }
    }

    fn record_slot(&self, slot: u32, flags: u32, gpa: u64) {
        self.slot_gpa.store(gpa, Ordering::SeqCst);
        self.memslot
            .store(u64::from(slot) << 32 | u64::from(flags), Ordering::SeqCst);
    }

    /// Copies guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.host_range(gpa, buf.len() as u64)?;
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| VmError::mem("read guest RAM")(io::Error::other(e.to_string())))
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, VmError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Registers all of RAM as memslot `slot` at guest-physical 0 of `vm` (flags 0).
    pub fn register(&self, vm: &VmFd, slot: u32) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_base as u64,
        };
        // SAFETY: the region describes our own live shared mapping of `size` bytes. The VM that
        // gets it must not outlive `self`: every owner (Vm, probe VMs) drops its VmFd first.
        unsafe { vm.set_user_memory_region(region) }.map_err(VmError::kvm("set memslot"))?;
        self.record_slot(slot, 0, 0);
        Ok(())
    }

    /// Changes host protection of the pages covering `gpa..gpa+len` (page-aligned): the
    /// trap mechanism for page-access tracking (`PROT_READ` traps writes, `PROT_NONE` reads).
    pub fn protect(&self, gpa: u64, len: u64, prot: libc::c_int) -> Result<(), VmError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(VmError::Config(format!(
                "protect range {gpa:#x}+{len:#x} is not page-aligned"
            )));
        }
        let addr = self.host_range(gpa, len)?;
        // Raw mprotect: a sub-range of vm-memory's mapping of RAM (memmap2 only changes the
        // protection of a whole mapping it owns, and only to read-only/executable/writable).
        // SAFETY: the range lies inside our own mapping (checked above) and is page-aligned;
        // changing its protection cannot invalidate Rust references (all guest RAM accesses
        // go through volatile copies that check bounds, never long-lived references).
        let rc = unsafe { libc::mprotect(addr.cast(), len as usize, prot) };
        if rc != 0 {
            return Err(VmError::mem("mprotect")(io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl GuestRam {
    /// Registers `len` bytes of this memfd region as memslot `slot` at guest-physical `gpa`
    /// (used for extra regions such as the appliance's ring region; `flags` e.g.
    /// `KVM_MEM_READONLY`).
    pub fn register_at(&self, vm: &VmFd, slot: u32, gpa: u64, flags: u32) -> Result<(), VmError> {
        // SAFETY: the region is our own live mapping of `size` bytes; owners drop the VM
        // before the GuestRam.
        unsafe { register_slot(vm, slot, gpa, self.host_base(), self.size, flags) }?;
        self.record_slot(slot, flags, gpa);
        Ok(())
    }

    /// Replaces the guest pages `gpa..gpa+len` of this RAM by `len` bytes of another memfd
    /// (`src_fd` at `src_offset`, e.g. another VM's RAM), shared and zero-copy, with
    /// `mmap(MAP_FIXED)`. No KVM ioctl is needed: the MMU notifier drops the old translation.
    pub fn share_from(
        &self,
        gpa: u64,
        src_fd: BorrowedFd<'_>,
        src_offset: u64,
        len: u64,
    ) -> Result<(), VmError> {
        self.map_fixed(gpa, src_fd, src_offset, len)
    }

    /// Undoes [`GuestRam::share_from`]: maps this RAM's own memfd pages back at `gpa`.
    pub fn unshare(&self, gpa: u64, len: u64) -> Result<(), VmError> {
        let fd = self.memfd.as_fd();
        self.map_fixed(gpa, fd, gpa, len)
    }

    fn map_fixed(
        &self,
        gpa: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), VmError> {
        use std::os::fd::AsRawFd;
        if len == 0
            || !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || !offset.is_multiple_of(PAGE_SIZE)
        {
            return Err(VmError::Config(format!(
                "shared range {gpa:#x}+{len:#x} (file offset {offset:#x}) is not page-aligned"
            )));
        }
        let at = self.host_range(gpa, len)?;
        // Raw mmap: MAP_FIXED over part of the existing RAM mapping (memmap2 cannot map at a
        // fixed address).
        // SAFETY: MAP_FIXED replaces only pages inside our own RAM mapping (bounds checked);
        // guest RAM is only accessed through bounds-checked copies, never long-lived
        // references, so no Rust reference is invalidated.
        let p = unsafe {
            libc::mmap(
                at.cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmError::mem("mmap MAP_FIXED into guest RAM")(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Registers `len` bytes of host memory at `host` as memslot `slot` at `gpa` with `flags`
/// (e.g. `KVM_MEM_READONLY`).
///
/// # Safety
/// `host..host+len` must be a live mapping that outlives the memslot (or the VM).
pub unsafe fn register_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    host: *mut u8,
    len: u64,
    flags: u32,
) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host as u64,
    };
    // SAFETY: the caller guarantees the mapping outlives the slot.
    unsafe { vm.set_user_memory_region(region) }.map_err(VmError::kvm("set memslot"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second open of `ram`'s memfd through `/proc/self/fd`, as a process that received it
    /// would hold it (`write` opens it read-write).
    fn reopen(ram: &GuestRam, write: bool) -> File {
        let path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&ram.memfd())
        );
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap()
    }

    #[test]
    fn from_file_maps_the_same_bytes_both_ways() {
        let ram = GuestRam::new("kvmi-ram-from-file", 2 * PAGE_SIZE).unwrap();
        ram.write(0x1008, b"before").unwrap();
        let other = GuestRam::from_file(reopen(&ram, true), 2 * PAGE_SIZE).unwrap();
        let mut buf = [0u8; 6];
        other.read(0x1008, &mut buf).unwrap();
        assert_eq!(&buf, b"before", "contents are kept");
        other.write(0x10, b"after").unwrap();
        let mut buf = [0u8; 5];
        ram.read(0x10, &mut buf).unwrap();
        assert_eq!(
            &buf, b"after",
            "a write through one mapping is seen by the other"
        );
        assert_ne!(ram.host_base(), other.host_base());
        // The link names the file by its memfd name: it is the same file.
        let name = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&other.memfd())
        ))
        .unwrap();
        assert_eq!(
            name.to_string_lossy(),
            "/memfd:kvmi-ram-from-file (deleted)"
        );
    }

    #[test]
    fn the_size_of_guest_ram_is_sealed() {
        let ram = GuestRam::new("kvmi-ram-sealed", 2 * PAGE_SIZE).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&ram.memfd());
        // SAFETY: F_GET_SEALS on a descriptor `ram` owns.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        );
        assert!(ram.memfd_file().set_len(PAGE_SIZE).is_err(), "shrinking");
        assert!(ram.memfd_file().set_len(4 * PAGE_SIZE).is_err(), "growing");
        ram.write(PAGE_SIZE, b"still writable").unwrap();
    }

    #[test]
    fn from_file_refuses_a_short_file_a_read_only_file_and_a_bad_size() {
        let ram = GuestRam::new("kvmi-ram-short", PAGE_SIZE).unwrap();
        let err = GuestRam::from_file(reopen(&ram, true), 2 * PAGE_SIZE).unwrap_err();
        assert!(err.to_string().contains("0x1000 bytes"), "{err}");
        assert!(GuestRam::from_file(reopen(&ram, false), PAGE_SIZE).is_err());
        assert!(GuestRam::from_file(reopen(&ram, true), 100).is_err());
        assert!(GuestRam::from_file(reopen(&ram, true), 0).is_err());
    }
}
