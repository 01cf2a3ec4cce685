//! The in-VM backend: the doorbell port.
//!
//! A hypercall is `out 0xe4, eax` ([`hypercall::ports::HYPERCALL_DOORBELL`]) with RAX = the
//! number and RBX, RCX, RDX, RSI, RDI = the arguments; the VMM writes the result to RAX before
//! the instruction retires. The guest runtime allows ports 0xe4..=0xe7 through the TSS I/O
//! permission bitmap, so the agent issues it at CPL3 without a system call. The sequence is a
//! small position-independent routine ([`doorbell_code`]) so that tests run the very same bytes
//! in a real VM.
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

// The doorbell routine: SysV ABI, RDI = number, RSI = address of the five arguments.
// Position-independent (registers and [rsi] only), so tests can copy its bytes into a VM and
// run exactly what the agent runs. RBX is callee-saved (and reserved by LLVM), hence the
// push/pop; RCX, RDX, RSI and RDI are caller-saved.
core::arch::global_asm!(
    ".pushsection .text.guest_driver_doorbell,\"ax\",@progbits",
    ".globl guest_driver_doorbell",
    ".globl guest_driver_doorbell_end",
    "guest_driver_doorbell:",
    "push rbx",
    "mov rax, rdi",
    "mov rbx, [rsi]",
    "mov rcx, [rsi + 8]",
    "mov rdx, [rsi + 16]",
    "mov rdi, [rsi + 32]",
    "mov rsi, [rsi + 24]",
    "out 0xe4, eax",
    "pop rbx",
    "ret",
    "guest_driver_doorbell_end:",
    ".popsection",
);

unsafe extern "sysv64" {
    fn guest_driver_doorbell(nr: u64, args: *const [u64; 5]) -> u64;
    static guest_driver_doorbell_end: u8;
}

/// Issues one hypercall through the doorbell port and returns RAX.
///
/// Only meaningful inside a VM whose VMM decodes port 0xe4 (on a host the `out` faults).
pub fn doorbell(nr: u64, args: [u64; 5]) -> u64 {
    // SAFETY: the routine reads the five words at `args` (a live array), loads the argument
    // registers, executes `out 0xe4, eax` (allowed at CPL3 by the guest runtime's TSS I/O
    // bitmap) and returns RAX, restoring RBX and touching no other memory than its stack
    // slot. The VMM may remap window pages during the exit; the call is opaque to the
    // compiler, so it assumes memory changed.
    unsafe { guest_driver_doorbell(nr, &args) }
}

/// The machine code of the doorbell routine (SysV: RDI = number, RSI = address of the five
/// argument words; returns RAX), position-independent: for tests that run the exact
/// sequence in a VM.
pub fn doorbell_code() -> &'static [u8] {
    let start = guest_driver_doorbell as *const u8;
    // Only the address of the end label is taken, never its contents.
    let end = &raw const guest_driver_doorbell_end;
    let len = (end as usize).saturating_sub(start as usize);
    // SAFETY: `start..end` is the routine's code in this image's text section, mapped
    // readable for the life of the program and never written.
    unsafe { core::slice::from_raw_parts(start, len) }
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
