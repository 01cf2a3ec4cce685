//! gdb's Z/z packets: hardware breakpoints with CONTROL_BREAKPOINT (v4 only; refused with an
//! error reply over libkvmi), software breakpoints and watchpoints as page-access
//! restrictions (the bookkeeping is [`super::breakpoints`]).

use gdbstub::target::TargetResult;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint as GdbSwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};

use protocol::CommandKind;

use super::breakpoints::{SwBreakpoint, Watch, WatchKind};
use super::memory::{Mapping, page_pieces};
use super::target::{HW_SLOTS, KvmiTarget, nonfatal};

impl Breakpoints for KvmiTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl GdbSwBreakpoint for KvmiTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.book.sw_at(addr, None).is_some() {
            return Ok(true);
        }
        let gpa = match self.mapping(self.current, addr) {
            Ok(Some(Mapping { user: true, .. })) => {
                // On PVM the host cannot step CPL3 code through a no-exec page: the guest
                // would take a #DB at every instruction stepped there.
                tracing::warn!(
                    "no software breakpoint at {addr:#x}: the page is user-accessible (on this \
                     host CPL3 code can neither be stepped through a no-exec page nor \
                     hardware-breakpointed)"
                );
                return Ok(false);
            }
            Ok(Some(m)) => m.gpa,
            Ok(None) => return Ok(false),
            Err(e) => return nonfatal("breakpoint address", e),
        };
        let changes = self.book.add_sw(SwBreakpoint { gva: addr, gpa });
        if let Err(e) = self.apply_access(&changes) {
            tracing::warn!("software breakpoint at {addr:#x} (gpa {gpa:#x}): {e}");
            self.book.remove_sw(addr);
            return Ok(false);
        }
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(changes) = self.book.remove_sw(addr) else {
            return Ok(false);
        };
        if let Err(e) = self.apply_access(&changes) {
            return nonfatal("restoring page access", e);
        }
        Ok(true)
    }
}

impl HwBreakpoint for KvmiTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.hw.contains(&addr) {
            return Ok(true);
        }
        if self.hw.len() >= HW_SLOTS {
            return Ok(false);
        }
        if !self.client.supports(CommandKind::ControlBreakpoint) {
            // gdb gets an error reply ("Cannot insert hardware breakpoint").
            tracing::warn!(
                "no hardware breakpoint at {addr:#x}: the {} dialect cannot set one (use \
                 `break`, an execute trap)",
                self.client.dialect().name()
            );
            return Ok(false);
        }
        self.touch();
        match self.client.control_breakpoint(None, addr, true) {
            Ok(()) => {
                self.hw.insert(addr);
                Ok(true)
            }
            Err(e) => {
                tracing::warn!("hardware breakpoint at {addr:#x}: {e}");
                Ok(false)
            }
        }
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if !self.hw.remove(&addr) {
            return Ok(false);
        }
        self.touch();
        match self.client.control_breakpoint(None, addr, false) {
            Ok(()) => Ok(true),
            Err(e) => nonfatal("clearing a hardware breakpoint", e),
        }
    }
}

fn watch_kind(kind: GdbWatchKind) -> WatchKind {
    match kind {
        GdbWatchKind::Write => WatchKind::Write,
        GdbWatchKind::Read => WatchKind::Read,
        GdbWatchKind::ReadWrite => WatchKind::Access,
    }
}

impl HwWatchpoint for KvmiTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let Ok(n) = usize::try_from(len) else {
            return Ok(false);
        };
        if n == 0 || n > 1 << 20 {
            return Ok(false);
        }
        let mut pieces = Vec::new();
        for (gva, piece) in page_pieces(addr, n) {
            match self.translate(self.current, gva) {
                Ok(Some(gpa)) => pieces.push((gpa, piece as u64)),
                Ok(None) => return Ok(false),
                Err(e) => return nonfatal("watchpoint address", e),
            }
        }
        let kind = watch_kind(kind);
        let changes = self.book.add_watch(Watch {
            gva: addr,
            len,
            kind,
            pieces,
        });
        if let Err(e) = self.apply_access(&changes) {
            tracing::warn!("watchpoint at {addr:#x}: {e}");
            if let Some(undo) = self.book.remove_watch(addr, len, kind) {
                let _ = self.apply_access(&undo);
            }
            return Ok(false);
        }
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let Some(changes) = self.book.remove_watch(addr, len, watch_kind(kind)) else {
            return Ok(false);
        };
        if let Err(e) = self.apply_access(&changes) {
            return nonfatal("restoring page access", e);
        }
        Ok(true)
    }
}
