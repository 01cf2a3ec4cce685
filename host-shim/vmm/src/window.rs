//! Map windows: host address space backing a guest memslot whose pages are replaced by pages
//! of another VM's memfd with `mmap(MAP_FIXED)` (zero-copy sharing) and revoked again.
//!
//! Huge pages: the window starts on a 2 MiB boundary and every shared mapping is advised
//! `MADV_HUGEPAGE`. When the host allows transparent huge pages for shmem
//! (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = `advise`, `within_size` or
//! `always`) and the target's RAM is in huge folios (see [`crate::memory`]), a 2 MiB-aligned
//! grant of 512 pages is mapped with one PMD, and KVM maps it into the appliance with one
//! 2 MiB entry: the appliance's first touch costs one fault per 2 MiB instead of one per
//! page. A PMD only ever covers a whole 2 MiB inside one grant, so nothing outside a grant
//! becomes visible; smaller or unaligned grants use 4 KiB pages as before.
//!
//! Raw `mmap`/`munmap` rather than memmap2: the window is an address range that this type
//! edits page by page (trimmed to a 2 MiB boundary, pages replaced with `MAP_FIXED` and put
//! back), which memmap2's mappings, always whole and at an address of the kernel's choosing,
//! cannot express.

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
        let reserve = len + HUGE_PAGE;
        // Raw mmap: memmap2's `map_anon().no_reserve_swap()` would make the same mapping, but
        // it unmaps all of it on drop, and the head and tail are given back just below.
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice; no existing
        // memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmError::mem("mmap window")(io::Error::last_os_error()));
        }
        // Keep the 2 MiB-aligned `len` bytes inside the reservation; give back the rest.
        let start = p as usize;
        let base = start.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (base - start, start + reserve - (base + len));
        for (at, n) in [(start, head), (base + len, tail)] {
            if n > 0 {
                // SAFETY: `at..at+n` is part of the reservation just made, outside the kept
                // window; nothing refers to it.
                unsafe { libc::munmap(at as *mut libc::c_void, n) };
            }
        }
        Ok(RemapWindow { base, len })
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
        self.map_fixed(
            offset,
            fd,
            file_offset,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
        )
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
        self.map_fixed(offset, fd, file_offset, len, libc::PROT_READ)
    }

    /// `mmap(MAP_SHARED | MAP_FIXED, prot)` of `fd` over the window at `offset`, advised for
    /// huge pages.
    fn map_fixed(
        &self,
        offset: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: u64,
        prot: libc::c_int,
    ) -> Result<(), VmError> {
        use std::os::fd::AsRawFd;
        let at = self.check(offset, len)?;
        // Raw mmap: MAP_FIXED over part of an existing mapping (memmap2 has no fixed address).
        // SAFETY: MAP_FIXED replaces only pages inside our own window (checked above), which
        // no Rust reference points into.
        let p = unsafe {
            libc::mmap(
                at,
                len as usize,
                prot,
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
        advise_huge(at, len);
        Ok(())
    }

    /// Puts the zeroed placeholder back over `offset..offset+len` (revokes a share).
    pub fn revoke(&self, offset: u64, len: u64) -> Result<(), VmError> {
        let at = self.check(offset, len)?;
        // Raw mmap: MAP_FIXED over part of an existing mapping, as in `map_fixed`.
        // SAFETY: as in `map_fixed`: only pages of our own window are replaced.
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

/// Bytes of a huge page (PMD) on x86-64.
pub const HUGE_PAGE: usize = 2 << 20;

/// The host's transparent-huge-page mode for shmem (the bracketed word of
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled`), if the kernel has THP.
pub fn shmem_thp_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").ok()?;
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(text[start..start + len].to_string())
}

/// Asks for huge pages on a shared mapping (a hint: the host's shmem THP setting decides; a
/// refusal only means 4 KiB pages).
pub(crate) fn advise_huge(at: *mut libc::c_void, len: u64) {
    static SHMEM_THP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let usable = *SHMEM_THP.get_or_init(|| {
        matches!(
            shmem_thp_mode().as_deref(),
            Some("advise" | "within_size" | "always" | "force")
        )
    });
    // Without shmem THP the hint buys nothing and costs time on every map.
    if !usable || len < HUGE_PAGE as u64 {
        return;
    }
    // Raw madvise: `at` is a sub-range of a window or of vm-memory's RAM mapping, which no
    // memmap2 value owns.
    // SAFETY: `at..at+len` is a mapping this process owns; MADV_HUGEPAGE only sets a flag on
    // it and never changes its contents.
    if unsafe { libc::madvise(at, len as usize, libc::MADV_HUGEPAGE) } != 0 {
        tracing::debug!(
            "madvise(MADV_HUGEPAGE): {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for RemapWindow {
    fn drop(&mut self) {
        // Raw munmap of the kept window (its pages may by now be other files' mappings).
        // SAFETY: we own this mapping; nothing references it after drop (memslots using it
        // belong to VMs that the owner drops first).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_on_a_huge_page_boundary_and_read_as_zero() {
        for len in [PAGE_SIZE, 3 * PAGE_SIZE, 2 << 20, 6 << 20] {
            let w = RemapWindow::new(len).unwrap();
            assert_eq!(w.host_base() as usize % HUGE_PAGE, 0, "len {len:#x}");
            assert_eq!(w.len(), len);
            // SAFETY: the window is `len` readable bytes while `w` lives.
            let bytes = unsafe { std::slice::from_raw_parts(w.host_base(), len as usize) };
            assert!(bytes.iter().all(|&b| b == 0));
        }
        assert!(RemapWindow::new(0).is_err());
        assert!(RemapWindow::new(100).is_err());
    }

    #[test]
    fn the_shmem_thp_mode_is_one_of_the_kernels_words() {
        if let Some(mode) = shmem_thp_mode() {
            assert!(
                ["always", "within_size", "advise", "never", "deny", "force"]
                    .contains(&mode.as_str()),
                "{mode}"
            );
        }
    }
}
