//! Exit dispatch: the single place that decides what every vCPU exit means.
//!
//! Order for each exit: the [`ExitHook`] first, then the built-in devices, then the
//! unknown-I/O policy or a terminal [`RunOutcome`]. Guest behaviour never panics or hangs the
//! VMM: anything unexpected ends the run with a descriptive outcome.

use std::sync::Arc;

use hypercall::ports::HYPERCALL_DOORBELL;
use kvm_ioctls::VcpuFd;

use crate::devices::{Devices, PortResult, UnknownIoPolicy};
use crate::hook::{
    DebugEvent, ExitContext, ExitHook, HookResult, MmioAccess, MsrAccess, PioAccess,
};
use crate::memory::GuestRam;
use crate::outcome::{IoKind, RunOutcome};
use crate::run_area::{Exit, RunArea};

/// What the vCPU loop does after an exit.
#[derive(Debug)]
pub(crate) enum Flow {
    /// Re-enter the guest.
    Continue,
    /// This vCPU halted for good (no interrupt controller can wake it).
    Halt,
    /// End the whole run.
    End(RunOutcome),
}

/// Everything the dispatcher needs, shared by the vCPU threads of one VM.
pub(crate) struct Dispatcher {
    pub(crate) devices: Devices,
    pub(crate) hook: Arc<dyn ExitHook>,
    pub(crate) policy: UnknownIoPolicy,
    pub(crate) ram: Arc<GuestRam>,
    /// The unhandled-doorbell warning was logged.
    pub(crate) doorbell_warned: std::sync::atomic::AtomicBool,
}

/// Largest PIO payload handled (a `rep outs` exit carries at most one page).
const MAX_PIO_BYTES: usize = 4096;

impl Dispatcher {
    /// Handles one decoded exit of vCPU `index`.
    pub(crate) fn handle(&self, index: u32, fd: &VcpuFd, area: &mut RunArea, exit: Exit) -> Flow {
        match exit {
            Exit::Io {
                port,
                out,
                size,
                count,
                data_offset,
            } => self.pio(index, fd, area, port, out, size, count, data_offset),
            Exit::Mmio { addr, write, len } => self.mmio(index, fd, area, addr, write, len),
            Exit::Debug {
                exception,
                pc,
                dr6,
                dr7,
            } => {
                let ev = DebugEvent {
                    exception,
                    pc,
                    dr6,
                    dr7,
                };
                let mut ctx = self.ctx(index, fd, area);
                self.verdict(index, self.hook.debug(&mut ctx, &ev), || {
                    format!("unexpected debug exit (exception {exception}, pc {pc:#x})")
                })
            }
            Exit::Rdmsr { index: msr, reason } => self.msr(index, fd, area, msr, false, reason),
            Exit::Wrmsr {
                index: msr, reason, ..
            } => self.msr(index, fd, area, msr, true, reason),
            Exit::MemoryFault { gpa, size, flags } => {
                let mut ctx = self.ctx(index, fd, area);
                self.verdict(index, self.hook.memory_fault(&mut ctx, gpa, size), || {
                    format!("memory fault at gpa {gpa:#x} (size {size:#x}, flags {flags:#x})")
                })
            }
            Exit::EmulationFailure { insn, insn_len } => {
                let bytes = &insn[..usize::from(insn_len)];
                let mut ctx = self.ctx(index, fd, area);
                match self.hook.emulation_failure(&mut ctx, bytes) {
                    HookResult::Handled => Flow::Continue,
                    HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                        vcpu: index,
                        reason,
                    }),
                    HookResult::Unhandled => Flow::End(RunOutcome::EmulationFailure {
                        vcpu: index,
                        rip: area.regs().rip,
                        insn: bytes.to_vec(),
                    }),
                }
            }
            Exit::InternalError { suberror, .. } => Flow::End(RunOutcome::InternalError {
                vcpu: index,
                rip: area.regs().rip,
                suberror,
            }),
            Exit::Hlt => {
                tracing::debug!(vcpu = index, rip = area.regs().rip, "vCPU halted");
                let mut ctx = self.ctx(index, fd, area);
                match self.hook.halted(&mut ctx) {
                    HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                        vcpu: index,
                        reason,
                    }),
                    _ => Flow::Halt,
                }
            }
            Exit::Shutdown => Flow::End(RunOutcome::Shutdown {
                vcpu: index,
                rip: area.regs().rip,
            }),
            Exit::FailEntry { reason, .. } => Flow::End(RunOutcome::FailEntry {
                vcpu: index,
                reason,
            }),
            Exit::Interrupted => self.kicked(index, fd, area),
            Exit::SystemEvent { kind } => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason: format!("system event {kind}"),
            }),
            Exit::Other(reason) => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason: format!("unexpected exit reason {reason}"),
            }),
        }
    }

    /// The vCPU was kicked (an interrupted `KVM_RUN`, or a nudge seen before an entry): the
    /// hook's `kicked` runs before the guest does.
    pub(crate) fn kicked(&self, index: u32, fd: &VcpuFd, area: &mut RunArea) -> Flow {
        let mut ctx = self.ctx(index, fd, area);
        match self.hook.kicked(&mut ctx) {
            HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason,
            }),
            _ => Flow::Continue,
        }
    }

    /// The I/O a hook asked to be called back for is complete (an immediate-exit `KVM_RUN`
    /// returned without entering the guest): the hook's `io_completed` runs.
    pub(crate) fn io_completed(&self, index: u32, fd: &VcpuFd, area: &mut RunArea) -> Flow {
        let mut ctx = self.ctx(index, fd, area);
        match self.hook.io_completed(&mut ctx) {
            HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason,
            }),
            _ => Flow::Continue,
        }
    }

    /// Runs the hook's `vcpu_start` with the vCPU's registers loaded into the run area (they
    /// are marked dirty, so KVM reloads the same values on the first entry).
    pub(crate) fn start(&self, index: u32, fd: &VcpuFd, area: &mut RunArea) -> Flow {
        match (fd.get_regs(), fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                *area.regs_mut() = regs;
                *area.sregs_mut() = sregs;
            }
            (Err(e), _) | (_, Err(e)) => {
                return Flow::End(RunOutcome::VcpuError {
                    vcpu: index,
                    error: format!("reading the boot registers: {e}"),
                });
            }
        }
        let mut ctx = self.ctx(index, fd, area);
        match self.hook.vcpu_start(&mut ctx) {
            HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason,
            }),
            _ => Flow::Continue,
        }
    }

    fn ctx<'a>(&'a self, index: u32, fd: &'a VcpuFd, area: &'a mut RunArea) -> ExitContext<'a> {
        ExitContext {
            index,
            area,
            fd,
            ram: &self.ram,
        }
    }

    fn verdict(&self, index: u32, r: HookResult, unhandled: impl FnOnce() -> String) -> Flow {
        match r {
            HookResult::Handled => Flow::Continue,
            HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason,
            }),
            HookResult::Unhandled => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason: unhandled(),
            }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn pio(
        &self,
        index: u32,
        fd: &VcpuFd,
        area: &mut RunArea,
        port: u16,
        out: bool,
        size: u8,
        count: u32,
        data_offset: u64,
    ) -> Flow {
        let len = usize::from(size).saturating_mul(count as usize);
        if len == 0 || len > MAX_PIO_BYTES {
            return Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason: format!("malformed PIO exit ({size} bytes × {count}) on port {port:#x}"),
            });
        }
        let mut buf = [0u8; MAX_PIO_BYTES];
        let data = &mut buf[..len];
        match area.io_data(data_offset, len) {
            Some(src) => data.copy_from_slice(src),
            None => {
                return Flow::End(RunOutcome::Stopped {
                    vcpu: index,
                    reason: format!("PIO data offset {data_offset:#x} outside kvm_run"),
                });
            }
        }
        let mut verdict = {
            let mut ctx = self.ctx(index, fd, area);
            let mut access = PioAccess {
                port,
                write: out,
                size,
                data: &mut *data,
            };
            self.hook.pio(&mut ctx, &mut access)
        };
        if verdict == HookResult::Unhandled && out && port == HYPERCALL_DOORBELL {
            let mut ctx = self.ctx(index, fd, area);
            verdict = self.hook.hypercall(&mut ctx);
            if verdict == HookResult::Unhandled {
                if !self
                    .doorbell_warned
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        vcpu = index,
                        nr = ctx.regs().rax,
                        "hypercall doorbell has no handler; returning u64::MAX (logged once)"
                    );
                }
                ctx.regs_mut().rax = u64::MAX;
            }
        }
        let flow = match verdict {
            HookResult::Handled => Flow::Continue,
            HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason,
            }),
            HookResult::Unhandled => match self.devices.pio(port, out, size, data) {
                PortResult::Done => Flow::Continue,
                PortResult::GuestExit(status) => Flow::End(RunOutcome::GuestExit {
                    status,
                    vcpu: index,
                }),
                PortResult::Unknown => self.unknown_io(
                    index,
                    area,
                    IoKind::Pio {
                        port,
                        write: out,
                        size,
                    },
                    data,
                ),
            },
        };
        if !out && let Some(dst) = area.io_data(data_offset, len) {
            dst.copy_from_slice(data);
        }
        flow
    }

    fn mmio(
        &self,
        index: u32,
        fd: &VcpuFd,
        area: &mut RunArea,
        addr: u64,
        write: bool,
        len: u32,
    ) -> Flow {
        let mut buf = [0u8; 8];
        let n = {
            let src = area.mmio_data(len);
            buf[..src.len()].copy_from_slice(src);
            src.len()
        };
        let data = &mut buf[..n];
        let verdict = {
            let mut ctx = self.ctx(index, fd, area);
            let mut access = MmioAccess {
                addr,
                write,
                data: &mut *data,
            };
            self.hook.mmio(&mut ctx, &mut access)
        };
        let flow = match verdict {
            HookResult::Handled => Flow::Continue,
            HookResult::Stop(reason) => Flow::End(RunOutcome::Stopped {
                vcpu: index,
                reason,
            }),
            HookResult::Unhandled => {
                self.unknown_io(index, area, IoKind::Mmio { addr, write, len }, data)
            }
        };
        if !write {
            area.mmio_data(len).copy_from_slice(data);
        }
        flow
    }

    fn msr(
        &self,
        index: u32,
        fd: &VcpuFd,
        area: &mut RunArea,
        msr: u32,
        write: bool,
        reason: u32,
    ) -> Flow {
        let (mut error, mut data) = {
            let (e, d) = area.msr_reply();
            (*e, *d)
        };
        let verdict = {
            let mut ctx = self.ctx(index, fd, area);
            let mut access = MsrAccess {
                index: msr,
                write,
                reason,
                data: &mut data,
                error: &mut error,
            };
            self.hook.msr(&mut ctx, &mut access)
        };
        let (e, d) = area.msr_reply();
        *e = error;
        *d = data;
        let op = if write { "wrmsr" } else { "rdmsr" };
        self.verdict(index, verdict, || {
            format!("unhandled {op} exit for MSR {msr:#x} (reason {reason})")
        })
    }

    fn unknown_io(&self, index: u32, area: &RunArea, access: IoKind, data: &mut [u8]) -> Flow {
        match self.policy {
            UnknownIoPolicy::Ignore => {
                tracing::debug!(vcpu = index, rip = area.regs().rip, "ignoring {access}");
                let read = match access {
                    IoKind::Pio { write, .. } | IoKind::Mmio { write, .. } => !write,
                };
                if read {
                    data.fill(0xff);
                }
                Flow::Continue
            }
            UnknownIoPolicy::Error => Flow::End(RunOutcome::UnhandledIo {
                vcpu: index,
                rip: area.regs().rip,
                access,
            }),
        }
    }
}
