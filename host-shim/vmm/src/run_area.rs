//! Typed access to a vCPU's `kvm_run` page: exit decoding and sync_regs.
//!
//! With `kvm_valid_regs = REGS|SREGS|EVENTS`, KVM copies the register state into `kvm_run` on
//! every exit and reloads what we mark dirty on the next entry, so exit handlers read and edit
//! registers without the ~5 µs GET/SET_REGS ioctls (see docs/platform.md).

use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{
    KVM_EXIT_DEBUG, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR,
    KVM_EXIT_IO, KVM_EXIT_IO_OUT, KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT, KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events,
};
use kvm_ioctls::VcpuFd;

/// One decoded exit, with the metadata copied out of `kvm_run` (data stays in the page, see
/// [`RunArea::io_data`] and [`RunArea::mmio_data`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Port I/O: `size` bytes × `count` (string I/O) at `data_offset` in the run area.
    Io {
        /// Port number.
        port: u16,
        /// `out` (true) or `in` (false).
        out: bool,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
        /// Repeat count (> 1 for `rep outs`/`rep ins`).
        count: u32,
        /// Offset of the data in the run area.
        data_offset: u64,
    },
    /// MMIO access (also: a write to a read-only slot or an mprotect'ed page on PVM).
    Mmio {
        /// Guest-physical address.
        addr: u64,
        /// Write (true) or read (false).
        write: bool,
        /// Length in bytes (≤ 8).
        len: u32,
    },
    /// KVM_EXIT_DEBUG.
    Debug {
        /// Exception vector (1 = #DB, 3 = #BP).
        exception: u32,
        /// Guest rip of the event.
        pc: u64,
        /// DR6 at the event.
        dr6: u64,
        /// DR7 at the event.
        dr7: u64,
    },
    /// The guest executed `hlt`.
    Hlt,
    /// Triple fault or other shutdown.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR, suberror 1 (emulation failure), with the instruction bytes if
    /// KVM reported them.
    EmulationFailure {
        /// Instruction bytes (first `insn_len` valid).
        insn: [u8; 15],
        /// Number of valid bytes in `insn` (0 when not reported).
        insn_len: u8,
    },
    /// KVM_EXIT_INTERNAL_ERROR with another suberror.
    InternalError {
        /// The suberror.
        suberror: u32,
        /// First data word, if any.
        data0: u64,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM_EXIT_X86_RDMSR (user-space MSR exits).
    Rdmsr {
        /// MSR index.
        index: u32,
        /// KVM_MSR_EXIT_REASON_*.
        reason: u32,
    },
    /// KVM_EXIT_X86_WRMSR (user-space MSR exits).
    Wrmsr {
        /// MSR index.
        index: u32,
        /// KVM_MSR_EXIT_REASON_*.
        reason: u32,
        /// Value the guest writes.
        data: u64,
    },
    /// KVM_EXIT_MEMORY_FAULT (upstream: an access KVM could not resolve, e.g. a host
    /// permission fault).
    MemoryFault {
        /// Guest-physical address.
        gpa: u64,
        /// Size of the faulting range.
        size: u64,
        /// KVM_MEMORY_EXIT_FLAG_*.
        flags: u64,
    },
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent {
        /// KVM_SYSTEM_EVENT_*.
        kind: u32,
    },
    /// KVM_RUN returned EINTR/EAGAIN or KVM_EXIT_INTR: a kick.
    Interrupted,
    /// Any other exit reason.
    Other(u32),
}

/// A vCPU's mapped `kvm_run` area.
#[derive(Debug)]
pub struct RunArea {
    run: *mut kvm_run,
    size: usize,
    /// A hook asked for [`crate::hook::ExitHook::io_completed`] once KVM has completed the
    /// pending I/O (see [`crate::hook::ExitContext::complete_then_call_back`]).
    io_callback: bool,
}

// SAFETY: the pointer refers to the vCPU's kvm_run mapping, which lives as long as the VcpuFd;
// a RunArea is moved to the vCPU thread together with its VcpuFd.
unsafe impl Send for RunArea {}

impl RunArea {
    /// Wraps the `kvm_run` mapping of `vcpu` (`size` = `VmFd::run_size()`).
    ///
    /// # Safety
    /// The returned value must not be used after `vcpu` is dropped, and `size` must be the
    /// real size of the mapping.
    pub unsafe fn new(vcpu: &mut VcpuFd, size: usize) -> Self {
        RunArea {
            run: vcpu.get_kvm_run() as *mut kvm_run,
            size,
            io_callback: false,
        }
    }

    fn run(&self) -> &kvm_run {
        // SAFETY: the mapping is valid (constructor contract) and only the owning thread
        // creates references into it.
        unsafe { &*self.run }
    }

    fn run_mut(&mut self) -> &mut kvm_run {
        // SAFETY: as in `run`; `&mut self` makes the reference unique on our side.
        unsafe { &mut *self.run }
    }

    /// Address of `kvm_run.immediate_exit` (for [`crate::kick::VcpuControl::register`]).
    pub fn immediate_exit_ptr(&self) -> *mut u8 {
        // SAFETY: computing a field address inside the valid mapping; no reference is created.
        unsafe { &raw mut (*self.run).immediate_exit }
    }

    /// Clears `immediate_exit` (atomically: a kicker may set it concurrently).
    pub fn clear_immediate_exit(&self) {
        // SAFETY: the byte is inside the live mapping; all concurrent accesses are atomic.
        unsafe { AtomicU8::from_ptr(self.immediate_exit_ptr()) }.store(0, Ordering::SeqCst);
    }

    /// Sets `immediate_exit` (atomically, like a kicker): the next `KVM_RUN` completes any
    /// pending I/O and returns `EINTR` without entering the guest.
    pub fn set_immediate_exit(&self) {
        // SAFETY: the byte is inside the live mapping; all concurrent accesses are atomic.
        unsafe { AtomicU8::from_ptr(self.immediate_exit_ptr()) }.store(1, Ordering::SeqCst);
    }

    /// Asks the vCPU loop to complete the pending I/O with an immediate-exit `KVM_RUN` and
    /// call [`crate::hook::ExitHook::io_completed`] before the guest runs again.
    pub fn request_io_callback(&mut self) {
        self.io_callback = true;
    }

    /// Whether [`RunArea::request_io_callback`] is in force (not yet called back).
    pub fn io_callback_requested(&self) -> bool {
        self.io_callback
    }

    /// Ends the request of [`RunArea::request_io_callback`] (the loop calls back now).
    pub(crate) fn clear_io_callback(&mut self) {
        self.io_callback = false;
    }

    /// Asks KVM to sync REGS, SREGS and EVENTS into the run area on every exit.
    pub fn enable_sync_regs(&mut self) {
        self.run_mut().kvm_valid_regs =
            u64::from(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS);
    }

    /// Whether edits of (regs, sregs) are pending: marked dirty, loaded on the next entry.
    pub fn pending_edits(&self) -> (bool, bool) {
        let dirty = self.run().kvm_dirty_regs;
        (
            dirty & u64::from(KVM_SYNC_X86_REGS) != 0,
            dirty & u64::from(KVM_SYNC_X86_SREGS) != 0,
        )
    }

    /// General-purpose registers at the last exit.
    pub fn regs(&self) -> &kvm_regs {
        // SAFETY: `s.regs` is the x86 sync-regs member, the only one KVM uses here.
        unsafe { &self.run().s.regs.regs }
    }

    /// Mutable general-purpose registers; the edit is loaded on the next entry.
    pub fn regs_mut(&mut self) -> &mut kvm_regs {
        let run = self.run_mut();
        run.kvm_dirty_regs |= u64::from(KVM_SYNC_X86_REGS);
        // SAFETY: `s.regs` is the sync-regs member KVM fills when kvm_valid_regs is set.
        unsafe { &mut run.s.regs.regs }
    }

    /// System registers at the last exit.
    pub fn sregs(&self) -> &kvm_sregs {
        // SAFETY: `s.regs` is the x86 sync-regs member, the only one KVM uses here.
        unsafe { &self.run().s.regs.sregs }
    }

    /// Mutable system registers; the edit is loaded on the next entry.
    pub fn sregs_mut(&mut self) -> &mut kvm_sregs {
        let run = self.run_mut();
        run.kvm_dirty_regs |= u64::from(KVM_SYNC_X86_SREGS);
        // SAFETY: `s.regs` is the x86 sync-regs member, the only one KVM uses here.
        unsafe { &mut run.s.regs.sregs }
    }

    /// Pending-event state at the last exit.
    pub fn events(&self) -> &kvm_vcpu_events {
        // SAFETY: `s.regs` is the x86 sync-regs member, the only one KVM uses here.
        unsafe { &self.run().s.regs.events }
    }

    /// The data buffer of a PIO exit, bounds-checked against the mapping.
    pub fn io_data(&mut self, data_offset: u64, len: usize) -> Option<&mut [u8]> {
        let off = usize::try_from(data_offset).ok()?;
        if off < std::mem::size_of::<kvm_run>() || off.checked_add(len)? > self.size {
            return None;
        }
        // SAFETY: off..off+len lies inside the mapping (checked) and past the kvm_run struct,
        // so it aliases no other reference we hand out.
        Some(unsafe { std::slice::from_raw_parts_mut(self.run.cast::<u8>().add(off), len) })
    }

    /// The data bytes of an MMIO exit (`len` clamped to 8).
    pub fn mmio_data(&mut self, len: u32) -> &mut [u8] {
        // SAFETY: only called for KVM_EXIT_MMIO, where `mmio` is the active union member.
        let mmio = unsafe { &mut self.run_mut().__bindgen_anon_1.mmio };
        let len = (len as usize).min(mmio.data.len());
        &mut mmio.data[..len]
    }

    /// The MSR exit's `(error, data)` fields: set `error` to 1 to inject #GP, `data` is the
    /// value returned by an rdmsr.
    pub fn msr_reply(&mut self) -> (&mut u8, &mut u64) {
        // SAFETY: only called for KVM_EXIT_X86_RDMSR/WRMSR, where `msr` is the active member.
        let msr = unsafe { &mut self.run_mut().__bindgen_anon_1.msr };
        (&mut msr.error, &mut msr.data)
    }

    /// Decodes the exit KVM just reported (call only after `KVM_RUN` returned 0, or -EFAULT
    /// with KVM_EXIT_MEMORY_FAULT).
    pub fn decode(&self) -> Exit {
        let run = self.run();
        let u = &run.__bindgen_anon_1;
        // SAFETY (for every union read below): `exit_reason` names the active member.
        match run.exit_reason {
            KVM_EXIT_IO => {
                // SAFETY: see above.
                let io = unsafe { u.io };
                Exit::Io {
                    port: io.port,
                    out: u32::from(io.direction) == KVM_EXIT_IO_OUT,
                    size: io.size,
                    count: io.count,
                    data_offset: io.data_offset,
                }
            }
            KVM_EXIT_MMIO => {
                // SAFETY: see above.
                let m = unsafe { u.mmio };
                Exit::Mmio {
                    addr: m.phys_addr,
                    write: m.is_write != 0,
                    len: m.len,
                }
            }
            KVM_EXIT_DEBUG => {
                // SAFETY: see above.
                let d = unsafe { u.debug }.arch;
                Exit::Debug {
                    exception: d.exception,
                    pc: d.pc,
                    dr6: d.dr6,
                    dr7: d.dr7,
                }
            }
            KVM_EXIT_HLT => Exit::Hlt,
            KVM_EXIT_SHUTDOWN => Exit::Shutdown,
            KVM_EXIT_INTR => Exit::Interrupted,
            KVM_EXIT_INTERNAL_ERROR => {
                // SAFETY: see above.
                let e = unsafe { u.emulation_failure };
                if e.suberror == KVM_INTERNAL_ERROR_EMULATION {
                    let mut insn = [0u8; 15];
                    let mut insn_len = 0;
                    if e.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
                    {
                        // SAFETY: the flag says the instruction-bytes member is valid.
                        let b = unsafe { e.__bindgen_anon_1.__bindgen_anon_1 };
                        insn_len = b.insn_size.min(15);
                        insn = b.insn_bytes;
                    }
                    Exit::EmulationFailure { insn, insn_len }
                } else {
                    // SAFETY: see above.
                    let i = unsafe { u.internal };
                    Exit::InternalError {
                        suberror: i.suberror,
                        data0: if i.ndata > 0 { i.data[0] } else { 0 },
                    }
                }
            }
            KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: see above.
                let f = unsafe { u.fail_entry };
                Exit::FailEntry {
                    reason: f.hardware_entry_failure_reason,
                    cpu: f.cpu,
                }
            }
            KVM_EXIT_X86_RDMSR => {
                // SAFETY: see above.
                let m = unsafe { u.msr };
                Exit::Rdmsr {
                    index: m.index,
                    reason: m.reason,
                }
            }
            KVM_EXIT_X86_WRMSR => {
                // SAFETY: see above.
                let m = unsafe { u.msr };
                Exit::Wrmsr {
                    index: m.index,
                    reason: m.reason,
                    data: m.data,
                }
            }
            KVM_EXIT_MEMORY_FAULT => {
                // SAFETY: see above.
                let m = unsafe { u.memory_fault };
                Exit::MemoryFault {
                    gpa: m.gpa,
                    size: m.size,
                    flags: m.flags,
                }
            }
            KVM_EXIT_SYSTEM_EVENT => {
                // SAFETY: see above.
                let s = unsafe { u.system_event };
                Exit::SystemEvent { kind: s.type_ }
            }
            other => Exit::Other(other),
        }
    }
}

/// Runs `vcpu` once and decodes the exit. EINTR/EAGAIN become [`Exit::Interrupted`]; other
/// errors (e.g. upstream's -EFAULT on a host permission fault) are returned.
pub fn run_once(vcpu: &mut VcpuFd, area: &RunArea) -> Result<Exit, kvm_ioctls::Error> {
    match vcpu.run() {
        Ok(_) => Ok(area.decode()),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Exit::Interrupted),
        // Upstream reports a host permission fault on guest RAM as -EFAULT with
        // KVM_EXIT_MEMORY_FAULT filled in (KVM_CAP_MEMORY_FAULT_INFO).
        // Without that information (PVM: a native CPL3 write to a write-protected page) the
        // gpa is unknown: reported as u64::MAX for the hook to work out from the instruction.
        Err(e) if e.errno() == libc::EFAULT => match area.decode() {
            exit @ Exit::MemoryFault { .. } => Ok(exit),
            _ => Ok(Exit::MemoryFault {
                gpa: u64::MAX,
                size: 0,
                flags: 0,
            }),
        },
        Err(e) => Err(e),
    }
}
