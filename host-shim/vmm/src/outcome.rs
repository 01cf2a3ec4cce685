//! How a VM run ended, and the process exit status each ending maps to.

use std::fmt;
use std::time::Duration;

/// Exit status when the wall-clock limit (`--timeout`) stopped the VM (as `timeout(1)`).
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status for a VMM-side failure: KVM error, unknown I/O in `error` mode, FAIL_ENTRY,
/// an unexpected exit, a bad image or configuration.
pub const EXIT_VMM_ERROR: u8 = 125;
/// Exit status when KVM could not emulate a guest instruction (or another internal error).
pub const EXIT_EMULATION_FAILURE: u8 = 126;
/// Exit status when the guest shut down (triple fault).
pub const EXIT_SHUTDOWN: u8 = 127;
/// Exit status when every vCPU halted (`hlt` with nothing to wake it) without a debug exit.
pub const EXIT_ALL_HALTED: u8 = 123;
/// Exit status when the run was interrupted (Ctrl-C), as 128 + SIGINT.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Which kind of I/O access was not claimed by any device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Port I/O.
    Pio {
        /// Port number.
        port: u16,
        /// `out` (true) or `in`.
        write: bool,
        /// Access size in bytes.
        size: u8,
    },
    /// Memory-mapped I/O.
    Mmio {
        /// Guest-physical address.
        addr: u64,
        /// Write (true) or read.
        write: bool,
        /// Access size in bytes.
        len: u32,
    },
}

impl fmt::Display for IoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IoKind::Pio { port, write, size } => {
                let dir = if write { "out" } else { "in" };
                write!(f, "{size}-byte `{dir}` to port {port:#x}")
            }
            IoKind::Mmio { addr, write, len } => {
                let dir = if write { "write" } else { "read" };
                write!(f, "{len}-byte MMIO {dir} at {addr:#x}")
            }
        }
    }
}

/// The end of a VM run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote its status to the debug-exit port.
    GuestExit {
        /// The value written (0 = success).
        status: u32,
        /// The vCPU that wrote it.
        vcpu: u32,
    },
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    Shutdown {
        /// The vCPU.
        vcpu: u32,
        /// Its rip at the exit.
        rip: u64,
    },
    /// KVM could not emulate an instruction.
    EmulationFailure {
        /// The vCPU.
        vcpu: u32,
        /// rip of the instruction.
        rip: u64,
        /// Its bytes as reported by KVM (may be empty).
        insn: Vec<u8>,
    },
    /// KVM_EXIT_INTERNAL_ERROR with a suberror other than emulation.
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// rip at the exit.
        rip: u64,
        /// The suberror.
        suberror: u32,
    },
    /// Every vCPU executed `hlt` (no interrupt can wake it) without a debug exit.
    AllHalted,
    /// The wall-clock limit passed.
    TimedOut {
        /// The limit.
        after: Duration,
    },
    /// Stopped from outside (Ctrl-C or [`crate::VmHandle::stop`]).
    Interrupted,
    /// An I/O access no device claimed, with the unknown-I/O policy `error`.
    UnhandledIo {
        /// The vCPU.
        vcpu: u32,
        /// rip at the exit (the access instruction, or the next one if KVM already completed it).
        rip: u64,
        /// The access.
        access: IoKind,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// The vCPU.
        vcpu: u32,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// An exit the VMM does not handle (or an exit hook asked to stop).
    Stopped {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
    /// A vCPU ioctl failed.
    VcpuError {
        /// The vCPU.
        vcpu: u32,
        /// The error.
        error: String,
    },
}

impl RunOutcome {
    /// The process exit status for this ending (see the `EXIT_*` constants; a guest status
    /// above 255 clamps to 255).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunOutcome::GuestExit { status, .. } => (*status).min(255) as u8,
            RunOutcome::Shutdown { .. } => EXIT_SHUTDOWN,
            RunOutcome::EmulationFailure { .. } | RunOutcome::InternalError { .. } => {
                EXIT_EMULATION_FAILURE
            }
            RunOutcome::AllHalted => EXIT_ALL_HALTED,
            RunOutcome::TimedOut { .. } => EXIT_TIMEOUT,
            RunOutcome::Interrupted => EXIT_INTERRUPTED,
            RunOutcome::UnhandledIo { .. }
            | RunOutcome::FailEntry { .. }
            | RunOutcome::Stopped { .. }
            | RunOutcome::VcpuError { .. } => EXIT_VMM_ERROR,
        }
    }

    /// True when the guest itself reported success (debug exit with status 0).
    pub fn is_success(&self) -> bool {
        matches!(self, RunOutcome::GuestExit { status: 0, .. })
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunOutcome::GuestExit { status, vcpu } => {
                write!(f, "guest exited with status {status} (vCPU {vcpu})")
            }
            RunOutcome::Shutdown { vcpu, rip } => {
                write!(
                    f,
                    "guest shut down (triple fault) on vCPU {vcpu} at rip {rip:#x}"
                )
            }
            RunOutcome::EmulationFailure { vcpu, rip, insn } => write!(
                f,
                "emulation failure on vCPU {vcpu} at rip {rip:#x}, instruction bytes [{}]",
                hex_bytes(insn)
            ),
            RunOutcome::InternalError {
                vcpu,
                rip,
                suberror,
            } => write!(
                f,
                "KVM internal error (suberror {suberror}) on vCPU {vcpu} at rip {rip:#x}"
            ),
            RunOutcome::AllHalted => write!(f, "every vCPU halted without a debug exit"),
            RunOutcome::TimedOut { after } => {
                write!(f, "timed out after {:.1} s", after.as_secs_f64())
            }
            RunOutcome::Interrupted => write!(f, "interrupted"),
            RunOutcome::UnhandledIo { vcpu, rip, access } => {
                write!(f, "unhandled {access} on vCPU {vcpu} (rip {rip:#x})")
            }
            RunOutcome::FailEntry { vcpu, reason } => {
                write!(f, "KVM entry failure on vCPU {vcpu}, reason {reason:#x}")
            }
            RunOutcome::Stopped { vcpu, reason } => write!(f, "stopped on vCPU {vcpu}: {reason}"),
            RunOutcome::VcpuError { vcpu, error } => write!(f, "vCPU {vcpu} failed: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_status_clamps_and_vmm_endings_are_distinct() {
        assert_eq!(RunOutcome::GuestExit { status: 7, vcpu: 0 }.exit_code(), 7);
        assert_eq!(
            RunOutcome::GuestExit {
                status: 4096,
                vcpu: 0
            }
            .exit_code(),
            255
        );
        let codes = [
            EXIT_TIMEOUT,
            EXIT_VMM_ERROR,
            EXIT_EMULATION_FAILURE,
            EXIT_SHUTDOWN,
            EXIT_ALL_HALTED,
            EXIT_INTERRUPTED,
        ];
        for (i, a) in codes.iter().enumerate() {
            for b in &codes[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn unhandled_port_names_the_port() {
        let o = RunOutcome::UnhandledIo {
            vcpu: 0,
            rip: 0x1234,
            access: IoKind::Pio {
                port: 0x99,
                write: true,
                size: 1,
            },
        };
        assert!(o.to_string().contains("port 0x99"), "{o}");
    }
}
