//! Shared-memory fixtures for the integration tests: a memfd mapped `MAP_SHARED` (optionally
//! between guard pages), eventfd notification, and a deterministic record generator.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use hypercall::ring::{Notify, SharedRegion, Waiter};

/// A `MAP_SHARED` mapping of a memfd; unmapped on drop.
pub struct Mapping {
    base: *mut u8,
    len: usize,
    /// Bytes of `PROT_NONE` guard on each side of the usable area.
    guard: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only accessed through
// `SharedRegion`'s atomic operations.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The usable area's base.
    pub fn ptr(&self) -> *mut u8 {
        self.base.wrapping_add(self.guard)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base + len + 2 * guard` is the mapping this value created and owns.
        unsafe { libc::munmap(self.base.cast(), self.len + 2 * self.guard) };
    }
}

/// Creates a memfd of `len` bytes.
pub fn memfd(len: usize) -> OwnedFd {
    // SAFETY: a valid NUL-terminated name; the returned fd is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"ring-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
    fd
}

/// Maps `len` bytes of `fd` shared, with `guard` bytes of inaccessible memory on each side
/// (so any access outside the region faults).
///
/// Raw `mmap` rather than memmap2: the guards are a `PROT_NONE` reservation with the memfd
/// mapped `MAP_FIXED` into its middle, and memmap2 maps neither `PROT_NONE` nor at a fixed
/// address.
pub fn map(fd: &OwnedFd, len: usize, guard: usize) -> Mapping {
    let total = len + 2 * guard;
    // SAFETY: an anonymous PROT_NONE reservation; the result is checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        base,
        libc::MAP_FAILED,
        "mmap reserve: {}",
        std::io::Error::last_os_error()
    );
    let base = base.cast::<u8>();
    // SAFETY: MAP_FIXED over the middle of the reservation we just made and own.
    let area = unsafe {
        libc::mmap(
            base.add(guard).cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        area,
        libc::MAP_FAILED,
        "mmap memfd: {}",
        std::io::Error::last_os_error()
    );
    Mapping { base, len, guard }
}

/// A shared region over a fresh mapping of `fd`.
pub fn region(fd: &OwnedFd, len: usize, guard: usize) -> Arc<SharedRegion<Mapping>> {
    let mapping = map(fd, len, guard);
    let ptr = mapping.ptr();
    // SAFETY: `ptr..ptr + len` is a read-write shared mapping owned by `mapping`, which the
    // region owns, so it stays mapped while the region lives; this process touches it only
    // through the region.
    Arc::new(unsafe { SharedRegion::new(mapping, ptr, len) }.expect("page-aligned mapping"))
}

/// An eventfd used as a doorbell between processes (inherited across fork).
#[derive(Clone)]
pub struct EventFd(Arc<OwnedFd>);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> Self {
        // SAFETY: plain syscall; the fd is checked and then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor we own.
        EventFd(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl Notify for EventFd {
    fn notify(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

impl Waiter for EventFd {
    /// Waits up to 20 ms for the counter to become non-zero, then resets it.
    ///
    /// A plain `poll` of one descriptor: vmm-sys-util offers epoll sets, whose epoll fd
    /// would be shared by the forked processes, and this crate does not otherwise need it.
    fn wait(&self) {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a live u64 (EAGAIN when zero; ignored).
        unsafe { libc::read(self.0.as_raw_fd(), (&raw mut value).cast(), 8) };
    }

    fn relax(&self) {
        std::thread::yield_now();
    }
}

/// xorshift64* step.
pub fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Record `seq` of a stream: 8-byte sequence number, then pseudo-random bytes; length
/// 8..=`max` chosen from the sequence number. Writes into `buf`, returns the length.
pub fn make_record(seq: u64, max: usize, buf: &mut [u8]) -> usize {
    let mut state = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let len = 8 + (next(&mut state) as usize) % (max - 7);
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    for chunk in buf[8..len].chunks_mut(8) {
        let v = next(&mut state).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    len
}

/// An FNV-style checksum over `bytes` taken 8 at a time (the tail zero-padded), folded into
/// `acc`, with the length mixed in.
pub fn checksum(mut acc: u64, bytes: &[u8]) -> u64 {
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        acc = (acc ^ u64::from_le_bytes(word))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(17);
    }
    (acc ^ bytes.len() as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Checksum initial value.
pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;
