//! Map windows: host address space backing a guest memslot whose pages are replaced by pages
//! of another VM's memfd with `mmap(MAP_FIXED)` (zero-copy sharing) and revoked again.

use std::io;
use std::os::fd::BorrowedFd;

use crate::error::VmError;
use crate::memory::PAGE_SIZE;

/// A window of host address space meant to back a guest memslot whose pages are later
/// replaced by pages of another VM's memfd (`mmap(MAP_FIXED)`), and revoked again.
///
/// It starts as a private anonymous placeholder (reads as zero). Remapping needs no KVM ioctl:
/// KVM's MMU notifier picks up both the remap and the revoke.
#[derive(Debug)]
pub struct RemapWindow {
    base: usize,
    len: usize,
}

impl RemapWindow {
    /// Reserves `len` bytes (a multiple of 4 KiB) of zeroed placeholder memory.
    pub fn new(len: u64) -> Result<Self, VmError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(VmError::Config(format!(
                "window size {len:#x} not page-aligned"
            )));
        }
        let len = len as usize;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice; no existing
        // memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmError::mem("mmap window")(io::Error::last_os_error()));
        }
        Ok(RemapWindow {
            base: p as usize,
            len,
        })
    }

    /// Host address of the window.
    pub fn host_base(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Size of the window.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// True for an empty window (never: `new` rejects 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: u64) -> Result<*mut libc::c_void, VmError> {
        let ok = offset.is_multiple_of(PAGE_SIZE)
            && len.is_multiple_of(PAGE_SIZE)
            && len > 0
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.len as u64);
        if !ok {
            return Err(VmError::OutOfRange {
                gpa: offset,
                len,
                ram_size: self.len as u64,
            });
        }
        Ok((self.base + offset as usize) as *mut libc::c_void)
    }

    /// Maps `len` bytes of `fd` at `file_offset` shared over the window at `offset`.
    pub fn map_shared(
        &self,
        offset: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: u64,
    ) -> Result<(), VmError> {
        use std::os::fd::AsRawFd;
        let at = self.check(offset, len)?;
        // SAFETY: MAP_FIXED replaces only pages inside our own window (checked above), which
        // no Rust reference points into.
        let p = unsafe {
            libc::mmap(
                at,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmError::mem("mmap MAP_FIXED over window")(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Like [`RemapWindow::map_shared`], but the host mapping is `PROT_READ` only: KVM then
    /// maps the pages read-only into the guest that uses this window (a guest write exits
    /// instead of reaching the shared page).
    pub fn map_shared_readonly(
        &self,
        offset: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: u64,
    ) -> Result<(), VmError> {
        use std::os::fd::AsRawFd;
        let at = self.check(offset, len)?;
        // SAFETY: as in `map_shared`: MAP_FIXED replaces only pages inside our own window.
        let p = unsafe {
            libc::mmap(
                at,
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmError::mem("mmap MAP_FIXED read-only over window")(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Puts the zeroed placeholder back over `offset..offset+len` (revokes a share).
    pub fn revoke(&self, offset: u64, len: u64) -> Result<(), VmError> {
        let at = self.check(offset, len)?;
        // SAFETY: as in `map_shared`: only pages of our own window are replaced.
        let p = unsafe {
            libc::mmap(
                at,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmError::mem("revoke window pages")(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

impl Drop for RemapWindow {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; nothing references it after drop (memslots using it
        // belong to VMs that the owner drops first).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
