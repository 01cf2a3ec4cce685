//! The in-VM backend: the doorbell port.
//!
//! A hypercall is `out 0xe4, eax` ([`hypercall::ports::HYPERCALL_DOORBELL`]) with RAX = the
//! number and RBX, RCX, RDX, RSI, RDI = the arguments; the VMM writes the result to RAX before
//! the instruction retires. The guest runtime allows ports 0xe4..=0xe7 through the TSS I/O
//! permission bitmap, so the agent issues it at CPL3 without a system call. RBX is reserved by
//! the compiler, so the sequence swaps it with a scratch register around the `out`.
//!
//! Map calls pass the token by guest-physical address: [`PortHypercalls`] owns a 32-byte
//! token buffer in the appliance's RAM and is told its guest-physical address (the image
//! knows how its user memory maps to physical memory).

use core::sync::atomic::{AtomicU64, Ordering};

use hypercall::token::MapToken;

use crate::{DriverError, Hypercalls};

/// The doorbell backend, for the agent running inside the appliance VM (x86-64 only).
#[derive(Debug)]
pub struct PortHypercalls {
    token: &'static [AtomicU64; 4],
    token_gpa: u64,
}

impl PortHypercalls {
    /// A backend whose map calls stage tokens in `token` (guest-physical address
    /// `token_gpa`, 8-byte aligned). The buffer is written with atomic stores, so the VMM
    /// reading it at the exit is no data race.
    pub fn new(token: &'static [AtomicU64; 4], token_gpa: u64) -> Result<Self, DriverError> {
        if !token_gpa.is_multiple_of(8) {
            return Err(DriverError::BadBootInfo(
                "token buffer address not 8-byte aligned",
            ));
        }
        Ok(PortHypercalls { token, token_gpa })
    }
}

impl Hypercalls for PortHypercalls {
    fn raw_call(&self, nr: u64, args: [u64; 5]) -> Result<u64, DriverError> {
        Ok(doorbell(nr, args))
    }

    fn stage_token(&self, token: &MapToken) -> Result<u64, DriverError> {
        for (word, value) in self.token.iter().zip(token.words) {
            word.store(value, Ordering::Relaxed);
        }
        // The `out` that follows is the release point: the VMM reads the buffer at the exit.
        core::sync::atomic::fence(Ordering::SeqCst);
        Ok(self.token_gpa)
    }
}

/// Issues one hypercall through the doorbell port and returns RAX.
///
/// Only meaningful inside a VM whose VMM decodes port 0xe4 (on a host the `out` faults).
pub fn doorbell(nr: u64, args: [u64; 5]) -> u64 {
    let mut rax = nr;
    // SAFETY: the sequence writes no memory and uses no stack; RBX (reserved by LLVM) is
    // swapped with a scratch register and restored before the block ends; every other
    // register it touches is declared. The VMM may change memory (it maps pages into the
    // window) during the exit, so the block is not `nomem`: the compiler assumes memory
    // changed. The `out` is allowed at CPL3 by the guest runtime's TSS I/O bitmap.
    unsafe {
        core::arch::asm!(
            "xchg {a0}, rbx",
            "out 0xe4, eax",
            "xchg {a0}, rbx",
            a0 = inout(reg) args[0] => _,
            inout("rax") rax,
            in("rcx") args[1],
            in("rdx") args[2],
            in("rsi") args[3],
            in("rdi") args[4],
            options(nostack, preserves_flags),
        );
    }
    rax
}

/// Memory of the in-VM backend: an identity- or user-mapped area, shared through an `Arc`.
pub type GuestMemory = alloc::sync::Arc<hypercall::ring::SharedRegion<()>>;

/// Opens the ring region and the map window inside the appliance VM.
///
/// `ring` and `window` are the virtual addresses at which the image mapped the guest-physical
/// areas `discovery` names (read-write; at CPL3 for a user-mode agent).
///
/// # Safety
/// `ring..ring + discovery.ring_size` and `window..window + discovery.window_size` must be
/// mapped read-write for the rest of the program, to exactly those guest-physical areas, and
/// must not be accessed other than through the returned handles.
pub unsafe fn open_in_vm(
    discovery: &crate::Discovery,
    ring: *mut u8,
    window: *mut u8,
    calls: PortHypercalls,
) -> Result<
    (
        hypercall::ring::Region<GuestMemory>,
        crate::MapWindow<PortHypercalls, GuestMemory>,
    ),
    DriverError,
> {
    let ring_len = usize::try_from(discovery.ring_size)
        .map_err(|_| DriverError::BadBootInfo("ring region size"))?;
    let window_len = usize::try_from(discovery.window_size)
        .map_err(|_| DriverError::BadBootInfo("map window size"))?;
    // SAFETY: forwarded to the caller: the ring area is mapped read-write for the rest of the
    // program and only accessed through this region.
    let ring = unsafe { hypercall::ring::SharedRegion::new((), ring, ring_len) }?;
    // SAFETY: as above, for the window area.
    let window = unsafe { hypercall::ring::SharedRegion::new((), window, window_len) }?;
    let region = discovery.open_region(alloc::sync::Arc::new(ring))?;
    let window = crate::MapWindow::new(calls, alloc::sync::Arc::new(window), discovery.window_gpa)?;
    Ok((region, window))
}

/// A [`Waiter`](hypercall::ring::Waiter) for a guest without a scheduler: "sleeping" is a
/// bounded burst of `pause` hints, after which the ring is checked again (the shim's NOTIFY
/// is not needed to wake it).
#[derive(Clone, Copy, Debug)]
pub struct PauseWaiter {
    /// `pause` hints per wait.
    pub pauses: u32,
}

impl hypercall::ring::Waiter for PauseWaiter {
    fn wait(&self) {
        for _ in 0..self.pauses {
            core::hint::spin_loop();
        }
    }
}
