//! The process-level requests of gdb: the VM is "attached", cannot be killed, started or
//! restarted from gdb. gdbstub's extended-mode hooks carry `kill` (`vKill`), so it is
//! refused with an error reply (gdb: "Can't kill process") instead of a disconnect.

use gdbstub::common::Pid;
use gdbstub::target::TargetResult;
use gdbstub::target::ext::extended_mode::{Args, AttachKind, ExtendedMode, ShouldTerminate};

use super::target::{GdbError, KvmiTarget};

/// errno EPERM, the error reply of a refused request.
const EPERM: u8 = 1;

impl ExtendedMode for KvmiTarget {
    fn run(&mut self, _filename: Option<&[u8]>, _args: Args<'_, '_>) -> TargetResult<Pid, Self> {
        tracing::warn!("gdb asked to run a program: refused (the stub attaches to a running VM)");
        Err(gdbstub::target::TargetError::Errno(EPERM))
    }

    fn attach(&mut self, _pid: Pid) -> TargetResult<(), Self> {
        tracing::warn!("gdb asked to attach to another process: refused (there is one VM)");
        Err(gdbstub::target::TargetError::Errno(EPERM))
    }

    fn query_if_attached(&mut self, _pid: Pid) -> TargetResult<AttachKind, Self> {
        // Attached: gdb's `quit` then detaches (the VM runs on) instead of killing.
        Ok(AttachKind::Attach)
    }

    fn kill(&mut self, _pid: Option<Pid>) -> TargetResult<ShouldTerminate, Self> {
        tracing::warn!("gdb asked to kill the VM: refused (use `detach`; the VM runs on)");
        Err(gdbstub::target::TargetError::Errno(EPERM))
    }

    fn restart(&mut self) -> Result<(), GdbError> {
        tracing::warn!("gdb asked to restart the VM: ignored");
        Ok(())
    }
}
