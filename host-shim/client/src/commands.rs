//! One typed method per KVMI command, returning owned reply data.

use std::time::Duration;

use protocol::event::EventSet;
use protocol::kvm::{KvmRegs, KvmSregs};
use protocol::list::List;
use protocol::reply::{CpuidLeaf, GuestInfo, VersionInfo};
use protocol::types::{Access, CpuMode, MapToken, MsrEntry, PageAccessEntry, VcpuSelector};
use protocol::{Command, CommandKind, EventKind, Reply, V4, WireProfile};

use super::{ClientError, KvmiClient, ReceivedEvent};

/// A vCPU's registers as `GET_REGISTERS` returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterState {
    /// Operating mode.
    pub mode: CpuMode,
    /// General-purpose registers.
    pub regs: KvmRegs,
    /// Segment and control registers.
    pub sregs: KvmSregs,
    /// The MSRs asked for, in request order.
    pub msrs: Vec<MsrEntry>,
}

impl KvmiClient {
    /// Sends `command` and decodes the reply data with `take`.
    fn typed<T>(
        &self,
        command: &Command<'_>,
        take: impl FnOnce(Reply<'_>) -> Option<T>,
    ) -> Result<T, ClientError> {
        let kind = command.kind();
        if self.libkvmi.is_some() {
            let owned = self.lk_exec(command)?;
            return take(owned.reply()).ok_or(ClientError::UnexpectedReply(kind));
        }
        let raw = self.call(command)?;
        match V4::decode_reply(kind, &raw.payload)? {
            Ok(reply) => take(reply).ok_or(ClientError::UnexpectedReply(kind)),
            Err(code) => Err(ClientError::Kvm {
                command: kind,
                code,
            }),
        }
    }

    fn empty(&self, command: &Command<'_>) -> Result<(), ClientError> {
        self.typed(command, |r| matches!(r, Reply::Empty).then_some(()))
    }

    /// `GET_VERSION`: the protocol version and the allowed command/event masks.
    pub fn get_version(&self) -> Result<VersionInfo, ClientError> {
        self.typed(&Command::GetVersion, |r| match r {
            Reply::Version(v) => Some(v),
            _ => None,
        })
    }

    /// `GET_GUEST_INFO`: vCPU count and TSC frequency.
    pub fn get_guest_info(&self) -> Result<GuestInfo, ClientError> {
        self.typed(&Command::GetGuestInfo, |r| match r {
            Reply::GuestInfo(g) => Some(g),
            _ => None,
        })
    }

    /// `PAUSE_VCPU`: the vCPU stops and sends a `PAUSE_VCPU` event; it stays paused until
    /// that event is answered.
    pub fn pause_vcpu(&self, vcpu: u16) -> Result<(), ClientError> {
        self.empty(&Command::PauseVcpu { vcpu })
    }

    /// Pauses every vCPU: `PAUSE_VCPU` to each, then waits for each one's `PAUSE_VCPU`
    /// event (other events stay queued). Answer the returned events (e.g. with
    /// [`KvmiClient::resume`]) to let the vCPUs run again.
    pub fn pause_all(&self, timeout: Duration) -> Result<Vec<ReceivedEvent>, ClientError> {
        let count = self.get_guest_info()?.vcpu_count;
        for vcpu in 0..count {
            self.pause_vcpu(vcpu)?;
        }
        let mut paused = Vec::with_capacity(count.into());
        for _ in 0..count {
            let ev = self
                .next_event_matching(timeout, |e| {
                    e.event.payload.kind() == EventKind::PauseVcpu
                        && !paused
                            .iter()
                            .any(|p: &ReceivedEvent| p.event.common.vcpu == e.event.common.vcpu)
                })?
                .ok_or(ClientError::Timeout {
                    command: CommandKind::PauseVcpu,
                    seq: 0,
                    millis: timeout.as_millis(),
                })?;
            paused.push(ev);
        }
        paused.sort_by_key(|e| e.event.common.vcpu);
        Ok(paused)
    }

    /// Answers pause events with `CONTINUE`.
    pub fn resume(&self, paused: &[ReceivedEvent]) -> Result<(), ClientError> {
        for ev in paused {
            self.reply_continue(ev)?;
        }
        Ok(())
    }

    /// `GET_REGISTERS`: registers, mode and the listed MSRs.
    pub fn get_registers(&self, vcpu: u16, msrs: &[u32]) -> Result<RegisterState, ClientError> {
        self.typed(
            &Command::GetRegisters {
                vcpu,
                msrs: List::from_slice(msrs),
            },
            |r| match r {
                Reply::Registers(r) => Some(RegisterState {
                    mode: r.mode,
                    regs: r.regs,
                    sregs: r.sregs,
                    msrs: r.msrs.iter().collect(),
                }),
                _ => None,
            },
        )
    }

    /// `SET_REGISTERS`: only while `vcpu` is in an event; applied when the event is answered.
    pub fn set_registers(&self, vcpu: u16, regs: &KvmRegs) -> Result<(), ClientError> {
        self.empty(&Command::SetRegisters { vcpu, regs: *regs })
    }

    /// `GET_CPUID`: a CPUID leaf as the guest sees it.
    pub fn get_cpuid(
        &self,
        vcpu: u16,
        function: u32,
        index: u32,
    ) -> Result<CpuidLeaf, ClientError> {
        self.typed(
            &Command::GetCpuid {
                vcpu,
                function,
                index,
            },
            |r| match r {
                Reply::Cpuid(c) => Some(c),
                _ => None,
            },
        )
    }

    /// `GET_XSAVE`: the vCPU's XSAVE area.
    pub fn get_xsave(&self, vcpu: u16) -> Result<Vec<u8>, ClientError> {
        self.typed(&Command::GetXsave { vcpu }, |r| match r {
            Reply::Xsave(x) => Some(x.to_vec()),
            _ => None,
        })
    }

    /// `READ_PHYSICAL`: `size` bytes at `gpa` (within one page).
    pub fn read_physical(&self, gpa: u64, size: u64) -> Result<Vec<u8>, ClientError> {
        self.typed(&Command::ReadPhysical { gpa, size }, |r| match r {
            Reply::Physical(d) => Some(d.to_vec()),
            _ => None,
        })
    }

    /// Reads `len` bytes at `gpa`, any length, one `READ_PHYSICAL` per page piece.
    pub fn read_physical_range(&self, gpa: u64, len: u64) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::with_capacity(len.min(1 << 24) as usize);
        let mut at = gpa;
        let end = gpa
            .checked_add(len)
            .ok_or_else(|| ClientError::Invalid(format!("{gpa:#x}+{len:#x} overflows")))?;
        while at < end {
            let piece = (4096 - (at & 4095)).min(end - at);
            out.extend(self.read_physical(at, piece)?);
            at += piece;
        }
        Ok(out)
    }

    /// `WRITE_PHYSICAL`: `data` at `gpa` (within one page).
    pub fn write_physical(&self, gpa: u64, data: &[u8]) -> Result<(), ClientError> {
        self.empty(&Command::WritePhysical { gpa, data })
    }

    /// `GET_PAGE_ACCESS`: the rights of each page, in order.
    pub fn get_page_access(&self, vcpu: u16, gpas: &[u64]) -> Result<Vec<Access>, ClientError> {
        self.typed(
            &Command::GetPageAccess {
                vcpu,
                view: 0,
                gpas: List::from_slice(gpas),
            },
            |r| match r {
                Reply::PageAccess(list) => Some(list.iter().collect()),
                _ => None,
            },
        )
    }

    /// `SET_PAGE_ACCESS`: set the rights of many pages (`Access::RWX` lifts a restriction).
    pub fn set_page_access(
        &self,
        vcpu: u16,
        entries: &[PageAccessEntry],
    ) -> Result<(), ClientError> {
        self.empty(&Command::SetPageAccess {
            vcpu,
            view: 0,
            entries: List::from_slice(entries),
        })
    }

    /// `INJECT_EXCEPTION`: deliver exception `vector` to `vcpu`.
    pub fn inject_exception(
        &self,
        vcpu: u16,
        vector: u8,
        error_code: Option<u16>,
        address: u64,
    ) -> Result<(), ClientError> {
        self.empty(&Command::InjectException {
            vcpu,
            vector,
            error_code,
            address,
        })
    }

    /// `CONTROL_EVENTS`: replace `vcpu`'s enabled-event set.
    pub fn control_events(&self, vcpu: u16, events: EventSet) -> Result<(), ClientError> {
        self.empty(&Command::ControlEvents { vcpu, events })
    }

    /// `CONTROL_EVENTS` on every vCPU.
    pub fn control_events_all(&self, events: EventSet) -> Result<(), ClientError> {
        let count = self.get_guest_info()?.vcpu_count;
        (0..count).try_for_each(|vcpu| self.control_events(vcpu, events))
    }

    /// `CONTROL_MSR`: intercept (or stop intercepting) writes to `msr`.
    pub fn control_msr(&self, vcpu: u16, msr: u32, enable: bool) -> Result<(), ClientError> {
        self.empty(&Command::ControlMsr { vcpu, enable, msr })
    }

    /// `CONTROL_CR`: intercept writes to CR0/3/4 (stock KVM cannot: expect an error).
    pub fn control_cr(&self, vcpu: u16, cr: u32, enable: bool) -> Result<(), ClientError> {
        self.empty(&Command::ControlCr { vcpu, enable, cr })
    }

    /// `CONTROL_VE`: set or clear suppress-#VE (stock KVM cannot: expect an error).
    pub fn control_ve(&self, vcpu: u16, gpas: &[u64], enable: bool) -> Result<(), ClientError> {
        self.empty(&Command::ControlVe {
            vcpu,
            enable,
            gpas: List::from_slice(gpas),
        })
    }

    /// `CONTROL_BREAKPOINT`: set or clear an execution breakpoint at `gva` (`None`: every vCPU).
    pub fn control_breakpoint(
        &self,
        vcpu: Option<u16>,
        gva: u64,
        enable: bool,
    ) -> Result<(), ClientError> {
        let vcpus = vcpu.map_or(VcpuSelector::All, VcpuSelector::One);
        self.empty(&Command::ControlBreakpoint { vcpus, enable, gva })
    }

    /// `GET_MAP_TOKEN`: a single-use token for mapping this guest's memory elsewhere.
    pub fn get_map_token(&self) -> Result<MapToken, ClientError> {
        self.typed(&Command::GetMapToken, |r| match r {
            Reply::MapToken(t) => Some(t),
            _ => None,
        })
    }
}
