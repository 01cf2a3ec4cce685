//! The gdbstub target: a VM seen through its KVMI channel, one gdb thread per vCPU.
//!
//! All-stop: while gdb looks, every vCPU waits in a KVMI event the stub holds (a PAUSE_VCPU
//! event, or the BREAKPOINT / PAGE_FAULT / SINGLESTEP event it stopped on). Resuming answers
//! the held events; stopping pauses the vCPUs still running and collects their events.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use gdbstub::common::Tid;
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{MultiThreadBase, MultiThreadResumeOps};
use gdbstub::target::ext::breakpoints::BreakpointsOps;
use gdbstub::target::ext::monitor_cmd::MonitorCmdOps;
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use kvmi_client::{ClientError, KvmiClient, ReceivedEvent, RegisterState};
use protocol::EventKind;
use protocol::event::EventSet;
use protocol::types::{Access, PageAccessEntry};

use super::breakpoints::Bookkeeping;
use super::events::StopKind;
use super::memory::{AddressSpace, Mapping, PhysReader, WalkError, page_pieces, walk};
use super::regs::{GdbRegisters, KvmiX86_64, apply_write, fill_fpu, to_gdb};

/// How long stopping waits for a vCPU's pause event.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A command sent this often keeps held events from hitting the host's reply timeout.
pub(super) const KEEPALIVE: Duration = Duration::from_secs(2);
/// The same silent page fault this many times in a row on a vCPU means the host cannot
/// step the instruction through the restriction (on PVM, e.g. a CPL3 `lock inc` on a page
/// without read access): the page is lifted for [`LIFT_WINDOW`] so it can run.
pub(super) const REPEATS_BEFORE_LIFT: u32 = 64;
/// How long such a page stays lifted.
pub(super) const LIFT_WINDOW: Duration = Duration::from_millis(2);
/// Hardware breakpoint slots of the engine.
pub(super) const HW_SLOTS: usize = 4;

/// Why the debugging session failed.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    /// A KVMI command failed or the channel closed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A vCPU did not pause in time.
    #[error("vCPU {0} did not pause within {STOP_TIMEOUT:?}")]
    PauseTimeout(u16),
    /// The VM has no vCPU.
    #[error("the VM reports no vCPU")]
    NoVcpu,
}

/// What gdb asked a vCPU to do at the next resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResumeAction {
    Continue,
    Step,
}

/// A vCPU's event the stub is holding (the vCPU waits for its reply).
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pub(super) event: ReceivedEvent,
    pub(super) stop: StopKind,
    /// A stop gdb has not heard of (another vCPU's stop was reported): on resume it is
    /// answered RETRY where that makes the vCPU hit it again.
    pub(super) unreported: bool,
}

#[derive(Debug, Default)]
pub(super) struct Vcpu {
    pub(super) held: Option<Held>,
    /// A PAUSE_VCPU was asked and its event not seen yet.
    pub(super) pause_pending: bool,
    /// Resumed for one step (SINGLESTEP events on).
    pub(super) stepping: bool,
    pub(super) action: Option<ResumeAction>,
    /// Registers read since the vCPU stopped (and written by gdb).
    pub(super) regs: Option<RegisterState>,
    /// The XSAVE area read since the vCPU stopped (empty: not available).
    pub(super) xsave: Option<Vec<u8>>,
}

/// The VM as a gdbstub multi-thread target.
pub struct KvmiTarget {
    pub(super) client: KvmiClient,
    pub(super) vcpus: Vec<Vcpu>,
    pub(super) hw: BTreeSet<u64>,
    pub(super) book: Bookkeeping,
    /// `monitor cr3 VALUE`.
    pub(super) cr3_override: Option<u64>,
    /// `monitor phys`.
    pub(super) physical: bool,
    /// The vCPU gdb last addressed (breakpoints are translated in its address space).
    pub(super) current: u16,
    /// vCPUs gdb gave no action continue (false: scheduler locking, they stay stopped).
    pub(super) default_continue: bool,
    pub(super) last_command: Instant,
    /// The last silent page fault `(vcpu, rip, gpa, mode)` and how often it came in a row.
    pub(super) repeat: Option<((u16, u64, u64, u32), u32)>,
    /// Pages lifted for a stuck instruction, and since when.
    pub(super) lifted: Vec<(u64, Instant)>,
    /// vCPUs whose step was not carried out (CPL3): reported as stepped at the next poll.
    pub(super) pending_stops: Vec<u16>,
}

pub(super) fn base_events() -> EventSet {
    [EventKind::Breakpoint, EventKind::PageFault]
        .into_iter()
        .collect()
}

pub(super) fn tid(vcpu: u16) -> Tid {
    NonZeroUsize::new(usize::from(vcpu) + 1).unwrap_or(NonZeroUsize::MIN)
}

fn vcpu_of(tid: Tid) -> u16 {
    u16::try_from(tid.get() - 1).unwrap_or(u16::MAX)
}

/// Page-table entries read with READ_PHYSICAL.
struct ClientPhys<'a>(&'a KvmiClient);

impl PhysReader for ClientPhys<'_> {
    type Error = ClientError;
    fn read_u64(&mut self, gpa: u64) -> Result<u64, ClientError> {
        let bytes = self.0.read_physical(gpa, 8)?;
        let arr: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ClientError::Invalid("short READ_PHYSICAL reply".into()))?;
        Ok(u64::from_le_bytes(arr))
    }
}

pub(super) fn nonfatal<T>(what: &str, e: impl std::fmt::Display) -> TargetResult<T, KvmiTarget> {
    tracing::info!("{what}: {e}");
    Err(TargetError::NonFatal)
}

impl KvmiTarget {
    /// Attaches: enables the events the stub needs and pauses every vCPU.
    pub fn attach(client: KvmiClient) -> Result<KvmiTarget, GdbError> {
        let count = client.get_guest_info()?.vcpu_count;
        if count == 0 {
            return Err(GdbError::NoVcpu);
        }
        let mut target = KvmiTarget {
            client,
            vcpus: (0..count).map(|_| Vcpu::default()).collect(),
            hw: BTreeSet::new(),
            book: Bookkeeping::default(),
            cr3_override: None,
            physical: false,
            current: 0,
            default_continue: true,
            repeat: None,
            lifted: Vec::new(),
            pending_stops: Vec::new(),
            last_command: Instant::now(),
        };
        for vcpu in 0..count {
            target.client.control_events(vcpu, base_events())?;
        }
        target.stop_all()?;
        tracing::info!("attached: {count} vCPUs paused");
        Ok(target)
    }

    /// Closes the KVMI channel: the host lifts every restriction and breakpoint and the
    /// paused vCPUs run on.
    pub fn detach(self) {
        self.client.close();
    }

    /// Sends a harmless command if none went out lately: the host waits for the replies to
    /// held events only a reply timeout after the tool's last message.
    pub fn keepalive(&mut self) {
        if self.last_command.elapsed() >= KEEPALIVE && self.client.closed().is_none() {
            if let Err(e) = self.client.get_version() {
                tracing::debug!("keepalive: {e}");
            }
            self.last_command = Instant::now();
        }
    }

    pub(super) fn touch(&mut self) {
        self.last_command = Instant::now();
    }

    pub(super) fn count(&self) -> u16 {
        self.vcpus.len() as u16
    }

    pub(super) fn vcpu_index(&self, tid: Tid) -> Option<u16> {
        let v = vcpu_of(tid);
        (v < self.count()).then_some(v)
    }

    pub(super) fn registers(&mut self, vcpu: u16) -> Result<RegisterState, ClientError> {
        if let Some(r) = &self.vcpus[usize::from(vcpu)].regs {
            return Ok(r.clone());
        }
        self.touch();
        let r = self.client.get_registers(vcpu, &[])?;
        self.vcpus[usize::from(vcpu)].regs = Some(r.clone());
        Ok(r)
    }

    /// The registers as gdb sees them (x87/SSE from GET_XSAVE where the host allows it).
    pub(super) fn view(&mut self, vcpu: u16) -> Result<(RegisterState, GdbRegisters), ClientError> {
        let state = self.registers(vcpu)?;
        let mut view = to_gdb(&state.regs, &state.sregs);
        let i = usize::from(vcpu);
        if self.vcpus[i].xsave.is_none() {
            self.touch();
            let area = self.client.get_xsave(vcpu).unwrap_or_else(|e| {
                tracing::debug!("GET_XSAVE: {e}");
                Vec::new()
            });
            self.vcpus[i].xsave = Some(area);
        }
        if let Some(area) = &self.vcpus[i].xsave {
            fill_fpu(&mut view, area);
        }
        Ok((state, view))
    }

    pub(super) fn space(&mut self, vcpu: u16) -> Result<AddressSpace, String> {
        if self.physical {
            return Ok(AddressSpace::Physical);
        }
        let r = self.registers(vcpu).map_err(|e| e.to_string())?;
        let s = &r.sregs;
        AddressSpace::of_vcpu::<ClientError>(
            s.cr0.get(),
            s.cr3.get(),
            s.cr4.get(),
            s.efer.get(),
            self.cr3_override,
        )
        .map_err(|e| e.to_string())
    }

    /// Translates `gva` for `vcpu` (`Ok(None)`: unmapped).
    pub(super) fn translate(&mut self, vcpu: u16, gva: u64) -> Result<Option<u64>, String> {
        Ok(self.mapping(vcpu, gva)?.map(|m| m.gpa))
    }

    /// Translates `gva` for `vcpu`, with the mapping's user bit.
    pub(super) fn mapping(&mut self, vcpu: u16, gva: u64) -> Result<Option<Mapping>, String> {
        let space = self.space(vcpu)?;
        self.touch();
        walk(&mut ClientPhys(&self.client), space, gva).map_err(|e| match e {
            WalkError::Read { gpa, source } => format!("page walk at {gpa:#x}: {source}"),
            other => other.to_string(),
        })
    }

    pub(super) fn apply_access(&mut self, changes: &[(u64, Access)]) -> Result<(), ClientError> {
        if changes.is_empty() {
            return Ok(());
        }
        let entries: Vec<PageAccessEntry> = changes
            .iter()
            .map(|&(gpa, access)| PageAccessEntry { gpa, access })
            .collect();
        self.touch();
        self.client.set_page_access(0, &entries)
    }
}

impl Target for KvmiTarget {
    type Arch = KvmiX86_64;
    type Error = GdbError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_extended_mode(
        &mut self,
    ) -> Option<gdbstub::target::ext::extended_mode::ExtendedModeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for KvmiTarget {
    fn read_registers(&mut self, regs: &mut GdbRegisters, tid: Tid) -> TargetResult<(), Self> {
        let Some(vcpu) = self.vcpu_index(tid) else {
            return Err(TargetError::NonFatal);
        };
        self.current = vcpu;
        match self.view(vcpu) {
            Ok((_, view)) => {
                *regs = view;
                Ok(())
            }
            Err(e) => nonfatal("reading registers", e),
        }
    }

    fn write_registers(&mut self, regs: &GdbRegisters, tid: Tid) -> TargetResult<(), Self> {
        let Some(vcpu) = self.vcpu_index(tid) else {
            return Err(TargetError::NonFatal);
        };
        let (state, current) = match self.view(vcpu) {
            Ok(v) => v,
            Err(e) => return nonfatal("reading registers", e),
        };
        let new = match apply_write(&state.regs, &current, regs) {
            Ok(n) => n,
            Err(e) => return nonfatal("writing registers", e),
        };
        self.touch();
        if let Err(e) = self.client.set_registers(vcpu, &new) {
            return nonfatal("SET_REGISTERS", e);
        }
        if let Some(r) = &mut self.vcpus[usize::from(vcpu)].regs {
            r.regs = new;
        }
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let vcpu = self.vcpu_index(tid).unwrap_or(self.current);
        let mut done = 0;
        for (addr, len) in page_pieces(start, data.len()) {
            let gpa = match self.translate(vcpu, addr) {
                Ok(Some(gpa)) => gpa,
                Ok(None) => break,
                Err(e) => {
                    tracing::info!("reading {addr:#x}: {e}");
                    break;
                }
            };
            self.touch();
            match self.client.read_physical(gpa, len as u64) {
                Ok(bytes) if bytes.len() == len => {
                    data[done..done + len].copy_from_slice(&bytes);
                    done += len;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::info!("READ_PHYSICAL {gpa:#x}: {e}");
                    break;
                }
            }
        }
        if done == 0 && !data.is_empty() {
            return Err(TargetError::Errno(14));
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self.vcpu_index(tid).unwrap_or(self.current);
        let mut done = 0;
        for (addr, len) in page_pieces(start, data.len()) {
            let gpa = match self.translate(vcpu, addr) {
                Ok(Some(gpa)) => gpa,
                Ok(None) => return Err(TargetError::Errno(14)),
                Err(e) => return nonfatal("writing memory", e),
            };
            self.touch();
            if let Err(e) = self.client.write_physical(gpa, &data[done..done + len]) {
                return nonfatal("WRITE_PHYSICAL", e);
            }
            done += len;
        }
        Ok(())
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), GdbError> {
        for vcpu in 0..self.count() {
            thread_is_active(tid(vcpu));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl ThreadExtraInfo for KvmiTarget {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, GdbError> {
        let text = format!("vCPU {}", vcpu_of(tid));
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}
