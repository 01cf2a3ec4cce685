//! Commands a tool sends to the host, independent of any wire numbering.

use crate::error::ProtocolError;
use crate::event::EventSet;
use crate::kvm::KvmRegs;
use crate::list::List;
use crate::types::{
    PageAccessEntry, VcpuSelector, fits_one_page, is_controllable_cr, is_controllable_msr,
};

/// Which command a message is, or which command a reply answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `KVMI_GET_VERSION`.
    GetVersion,
    /// `KVMI_GET_GUEST_INFO`.
    GetGuestInfo,
    /// `KVMI_PAUSE_VCPU`.
    PauseVcpu,
    /// `KVMI_GET_REGISTERS`.
    GetRegisters,
    /// `KVMI_SET_REGISTERS`.
    SetRegisters,
    /// `KVMI_GET_CPUID`.
    GetCpuid,
    /// `KVMI_GET_PAGE_ACCESS`.
    GetPageAccess,
    /// `KVMI_SET_PAGE_ACCESS`.
    SetPageAccess,
    /// `KVMI_INJECT_EXCEPTION`.
    InjectException,
    /// `KVMI_READ_PHYSICAL`.
    ReadPhysical,
    /// `KVMI_WRITE_PHYSICAL`.
    WritePhysical,
    /// `KVMI_CONTROL_EVENTS`.
    ControlEvents,
    /// `KVMI_CONTROL_CR`.
    ControlCr,
    /// `KVMI_CONTROL_MSR`.
    ControlMsr,
    /// `KVMI_CONTROL_VE`.
    ControlVe,
    /// `KVMI_GET_MAP_TOKEN`.
    GetMapToken,
    /// `KVMI_GET_XSAVE`.
    GetXsave,
    /// `KVMI_CONTROL_BREAKPOINT` (this project's extension).
    ControlBreakpoint,
}

impl CommandKind {
    /// The command's name as the reference spells it, in lower case without the `KVMI_`
    /// prefix (`get_registers`, `set_page_access`, ...): the name operators and tools use.
    pub const fn name(self) -> &'static str {
        match self {
            Self::GetVersion => "get_version",
            Self::GetGuestInfo => "get_guest_info",
            Self::PauseVcpu => "pause_vcpu",
            Self::GetRegisters => "get_registers",
            Self::SetRegisters => "set_registers",
            Self::GetCpuid => "get_cpuid",
            Self::GetPageAccess => "get_page_access",
            Self::SetPageAccess => "set_page_access",
            Self::InjectException => "inject_exception",
            Self::ReadPhysical => "read_physical",
            Self::WritePhysical => "write_physical",
            Self::ControlEvents => "control_events",
            Self::ControlCr => "control_cr",
            Self::ControlMsr => "control_msr",
            Self::ControlVe => "control_ve",
            Self::GetMapToken => "get_map_token",
            Self::GetXsave => "get_xsave",
            Self::ControlBreakpoint => "control_breakpoint",
        }
    }

    /// The command kind whose [`name`](Self::name) is `name` (exact, lower case).
    pub fn from_name(name: &str) -> Option<CommandKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
    /// Every command kind.
    pub const ALL: [CommandKind; 18] = [
        Self::GetVersion,
        Self::GetGuestInfo,
        Self::PauseVcpu,
        Self::GetRegisters,
        Self::SetRegisters,
        Self::GetCpuid,
        Self::GetPageAccess,
        Self::SetPageAccess,
        Self::InjectException,
        Self::ReadPhysical,
        Self::WritePhysical,
        Self::ControlEvents,
        Self::ControlCr,
        Self::ControlMsr,
        Self::ControlVe,
        Self::GetMapToken,
        Self::GetXsave,
        Self::ControlBreakpoint,
    ];

    /// Whether the reply to this command carries data after the error code.
    pub const fn has_reply_data(self) -> bool {
        matches!(
            self,
            Self::GetVersion
                | Self::GetGuestInfo
                | Self::GetRegisters
                | Self::GetCpuid
                | Self::GetPageAccess
                | Self::ReadPhysical
                | Self::GetMapToken
                | Self::GetXsave
        )
    }

    /// The vCPU-independent commands: those that carry no vCPU index.
    pub const fn is_vm_command(self) -> bool {
        matches!(
            self,
            Self::GetVersion
                | Self::GetGuestInfo
                | Self::ReadPhysical
                | Self::WritePhysical
                | Self::GetMapToken
                | Self::ControlBreakpoint
        )
    }
}

/// A command from a tool, with its arguments. Arrays and data borrow the receive buffer (or
/// the sender's slices); nothing is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Ask for the protocol version and the allowed command/event masks.
    GetVersion,
    /// Ask for the number of vCPUs and the TSC frequency.
    GetGuestInfo,
    /// Ask a vCPU to pause; it answers with a `PAUSE_VCPU` event.
    PauseVcpu {
        /// The vCPU.
        vcpu: u16,
    },
    /// Read a vCPU's registers and the listed MSRs.
    GetRegisters {
        /// The vCPU.
        vcpu: u16,
        /// MSR indices to read.
        msrs: List<'a, u32>,
    },
    /// Set a vCPU's general-purpose registers (only while it is in an event).
    SetRegisters {
        /// The vCPU.
        vcpu: u16,
        /// The new registers.
        regs: KvmRegs,
    },
    /// Read a CPUID leaf as the guest sees it.
    GetCpuid {
        /// The vCPU.
        vcpu: u16,
        /// Leaf (EAX).
        function: u32,
        /// Sub-leaf (ECX).
        index: u32,
    },
    /// Read the access rights of guest-physical pages.
    GetPageAccess {
        /// The vCPU.
        vcpu: u16,
        /// EPT view (0 = the default).
        view: u16,
        /// Guest-physical addresses.
        gpas: List<'a, u64>,
    },
    /// Set the access rights of guest-physical pages, in order, not stopping on errors.
    SetPageAccess {
        /// The vCPU.
        vcpu: u16,
        /// EPT view (0 = the default).
        view: u16,
        /// Addresses and rights.
        entries: List<'a, PageAccessEntry>,
    },
    /// Inject an exception into a vCPU.
    InjectException {
        /// The vCPU.
        vcpu: u16,
        /// Exception vector (0–31).
        vector: u8,
        /// Error code to push, if the exception has one.
        error_code: Option<u16>,
        /// For #PF, the faulting GVA (CR2).
        address: u64,
    },
    /// Read guest-physical memory (within one page).
    ReadPhysical {
        /// Start address.
        gpa: u64,
        /// Bytes to read (1..=4096, not crossing a page).
        size: u64,
    },
    /// Write guest-physical memory (within one page).
    WritePhysical {
        /// Start address.
        gpa: u64,
        /// Bytes to write (1..=4096, not crossing a page).
        data: &'a [u8],
    },
    /// Replace a vCPU's enabled-event set.
    ControlEvents {
        /// The vCPU.
        vcpu: u16,
        /// The events to enable; every other event is disabled.
        events: EventSet,
    },
    /// Enable or disable interception of writes to a control register.
    ControlCr {
        /// The vCPU.
        vcpu: u16,
        /// Enable (true) or disable.
        enable: bool,
        /// CR0, CR3 or CR4.
        cr: u32,
    },
    /// Enable or disable interception of writes to an MSR.
    ControlMsr {
        /// The vCPU.
        vcpu: u16,
        /// Enable (true) or disable.
        enable: bool,
        /// The MSR (0–0x1fff or 0xc0000000–0xc0001fff).
        msr: u32,
    },
    /// Set or clear the suppress-#VE bit of guest-physical pages.
    ControlVe {
        /// The vCPU.
        vcpu: u16,
        /// Set (true) or clear.
        enable: bool,
        /// Guest-physical addresses.
        gpas: List<'a, u64>,
    },
    /// Ask for a token that lets another VM map a page of this guest.
    GetMapToken,
    /// Read a vCPU's XSAVE area.
    GetXsave {
        /// The vCPU.
        vcpu: u16,
    },
    /// Set or clear a host-implemented execution breakpoint (this project's extension).
    ControlBreakpoint {
        /// The vCPUs it applies to.
        vcpus: VcpuSelector,
        /// Set (true) or clear.
        enable: bool,
        /// Guest-virtual address of the instruction.
        gva: u64,
    },
}

impl Command<'_> {
    /// The kind of this command.
    pub const fn kind(&self) -> CommandKind {
        match self {
            Self::GetVersion => CommandKind::GetVersion,
            Self::GetGuestInfo => CommandKind::GetGuestInfo,
            Self::PauseVcpu { .. } => CommandKind::PauseVcpu,
            Self::GetRegisters { .. } => CommandKind::GetRegisters,
            Self::SetRegisters { .. } => CommandKind::SetRegisters,
            Self::GetCpuid { .. } => CommandKind::GetCpuid,
            Self::GetPageAccess { .. } => CommandKind::GetPageAccess,
            Self::SetPageAccess { .. } => CommandKind::SetPageAccess,
            Self::InjectException { .. } => CommandKind::InjectException,
            Self::ReadPhysical { .. } => CommandKind::ReadPhysical,
            Self::WritePhysical { .. } => CommandKind::WritePhysical,
            Self::ControlEvents { .. } => CommandKind::ControlEvents,
            Self::ControlCr { .. } => CommandKind::ControlCr,
            Self::ControlMsr { .. } => CommandKind::ControlMsr,
            Self::ControlVe { .. } => CommandKind::ControlVe,
            Self::GetMapToken => CommandKind::GetMapToken,
            Self::GetXsave { .. } => CommandKind::GetXsave,
            Self::ControlBreakpoint { .. } => CommandKind::ControlBreakpoint,
        }
    }

    /// The vCPU this command targets, for vCPU commands.
    pub const fn vcpu(&self) -> Option<u16> {
        match *self {
            Self::PauseVcpu { vcpu }
            | Self::GetRegisters { vcpu, .. }
            | Self::SetRegisters { vcpu, .. }
            | Self::GetCpuid { vcpu, .. }
            | Self::GetPageAccess { vcpu, .. }
            | Self::SetPageAccess { vcpu, .. }
            | Self::InjectException { vcpu, .. }
            | Self::ControlEvents { vcpu, .. }
            | Self::ControlCr { vcpu, .. }
            | Self::ControlMsr { vcpu, .. }
            | Self::ControlVe { vcpu, .. }
            | Self::GetXsave { vcpu } => Some(vcpu),
            _ => None,
        }
    }

    /// Check the field values every wire profile requires (array sizes and padding are the
    /// codec's job): CR in {0, 3, 4}, MSR in the interceptable ranges, physical accesses
    /// within one page, exception vectors below 32, known event bits, a valid vCPU selector.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |field, value| Err(ProtocolError::InvalidValue { field, value });
        match *self {
            Self::ControlCr { cr, .. } if !is_controllable_cr(cr) => invalid("cr", cr.into()),
            Self::ControlMsr { msr, .. } if !is_controllable_msr(msr) => invalid("msr", msr.into()),
            Self::ReadPhysical { gpa, size } if !fits_one_page(gpa, size) => invalid("size", size),
            Self::WritePhysical { gpa, data } if !fits_one_page(gpa, data.len() as u64) => {
                invalid("size", data.len() as u64)
            }
            Self::InjectException { vector, .. } if vector >= 32 => {
                invalid("vector", vector.into())
            }
            Self::ControlEvents { events, .. } if !events.is_known() => {
                invalid("events", events.bits().into())
            }
            Self::ControlBreakpoint {
                vcpus: VcpuSelector::One(u16::MAX),
                ..
            } => invalid("vcpu", u16::MAX.into()),
            _ => Ok(()),
        }
    }
}
