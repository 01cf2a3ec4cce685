//! `kvmi run --no-seccomp`: the seccomp allow-lists of the VMM's threads.

/// The seccomp flag of `kvmi run`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct SeccompRunArgs {
    /// Do not install the seccomp allow-lists on vCPU and service threads (for debugging,
    /// e.g. under strace or with an experimental hook); they are on by default and a syscall
    /// outside them kills the process with SIGSYS.
    #[arg(long)]
    pub no_seccomp: bool,
}

impl SeccompRunArgs {
    /// Applies the flag to every VMM thread started afterwards.
    pub fn apply(self) {
        vmm::seccomp::set_enabled(!self.no_seccomp);
        if self.no_seccomp {
            tracing::warn!("seccomp filtering is off (--no-seccomp)");
        }
    }
}
