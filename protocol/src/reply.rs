//! Replies to commands, independent of any wire numbering.
//!
//! A reply starts with an error code; data follows only on success. A reply carries no
//! command ID of its own that says how to decode it (it reuses the command's ID and `seq`),
//! so the receiver decodes it knowing which command it answers.

use crate::command::CommandKind;
use crate::error::{ErrorCode, ProtocolError};
use crate::kvm::{KvmRegs, KvmSregs};
use crate::list::List;
use crate::masks::AllowedMasks;
use crate::types::{Access, CpuMode, MapToken, MsrEntry, PAGE_SIZE};

/// The outcome of a command: the reply data, or the error code the host returned.
pub type CommandResult<'a> = Result<Reply<'a>, ErrorCode>;

/// `GET_VERSION` reply data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    /// Protocol version (`KVMI_VERSION`, 1).
    pub version: u32,
    /// What this host allows and supports.
    pub allowed: AllowedMasks,
}

/// `GET_GUEST_INFO` reply data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestInfo {
    /// Number of online vCPUs.
    pub vcpu_count: u16,
    /// TSC frequency in Hz (0 if unknown).
    pub tsc_speed: u64,
}

/// `GET_REGISTERS` reply data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registers<'a> {
    /// The vCPU's operating mode.
    pub mode: CpuMode,
    /// General-purpose registers.
    pub regs: KvmRegs,
    /// Segment and control registers.
    pub sregs: KvmSregs,
    /// The requested MSRs, in request order.
    pub msrs: List<'a, MsrEntry>,
}

/// `GET_CPUID` reply data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[allow(missing_docs)] // register names are self-describing
pub struct CpuidLeaf {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The data of a successful reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "no allocation in no_std: the registers are carried by value, once per reply"
)]
pub enum Reply<'a> {
    /// Success of a command whose reply carries no data.
    Empty,
    /// `GET_VERSION`.
    Version(VersionInfo),
    /// `GET_GUEST_INFO`.
    GuestInfo(GuestInfo),
    /// `GET_REGISTERS`.
    Registers(Registers<'a>),
    /// `GET_CPUID`.
    Cpuid(CpuidLeaf),
    /// `GET_PAGE_ACCESS`: the rights of each requested page, in order.
    PageAccess(List<'a, Access>),
    /// `READ_PHYSICAL`: the bytes read.
    Physical(&'a [u8]),
    /// `GET_MAP_TOKEN`.
    MapToken(MapToken),
    /// `GET_XSAVE`: the XSAVE area (a whole number of `u32`s).
    Xsave(&'a [u8]),
}

impl Reply<'_> {
    /// Whether this is the reply shape of `kind`.
    pub const fn fits(&self, kind: CommandKind) -> bool {
        match self {
            Self::Empty => !kind.has_reply_data(),
            Self::Version(_) => matches!(kind, CommandKind::GetVersion),
            Self::GuestInfo(_) => matches!(kind, CommandKind::GetGuestInfo),
            Self::Registers(_) => matches!(kind, CommandKind::GetRegisters),
            Self::Cpuid(_) => matches!(kind, CommandKind::GetCpuid),
            Self::PageAccess(_) => matches!(kind, CommandKind::GetPageAccess),
            Self::Physical(_) => matches!(kind, CommandKind::ReadPhysical),
            Self::MapToken(_) => matches!(kind, CommandKind::GetMapToken),
            Self::Xsave(_) => matches!(kind, CommandKind::GetXsave),
        }
    }

    /// Field checks every wire profile requires: `READ_PHYSICAL` data of 1–4096 bytes,
    /// `GET_XSAVE` data a whole number of `u32`s.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match *self {
            Self::Physical(data) if data.is_empty() || data.len() as u64 > PAGE_SIZE => {
                Err(ProtocolError::InvalidValue {
                    field: "read_physical size",
                    value: data.len() as u64,
                })
            }
            Self::Xsave(data) if data.len() % 4 != 0 => Err(ProtocolError::InvalidValue {
                field: "xsave size",
                value: data.len() as u64,
            }),
            _ => Ok(()),
        }
    }
}
