//! v4 command replies: `kvmi_error_code`, then the command's reply data on success.

use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::command_codec::MAX_GET_REGISTERS_MSRS;
use super::layout::{
    ErrorCodeWire, GetCpuidReply, GetGuestInfoReply, GetRegistersReply, GetVersionReply,
    MapMemToken,
};
use super::{MAX_MSG_SIZE, command_id};
use crate::command::CommandKind;
use crate::error::{EncodeError, ErrorCode, ProtocolError};
use crate::kvm::KvmMsrEntry;
use crate::list::List;
use crate::masks::AllowedMasks;
use crate::reply::{CommandResult, CpuidLeaf, GuestInfo, Registers, Reply, VersionInfo};
use crate::types::{Access, CpuMode, MapToken, MsrEntry};
use crate::wire::codec::{Reader, Writer, encode_message, message_len, zero_padding};

fn read_msr_entry(b: &[u8]) -> MsrEntry {
    let e = KvmMsrEntry::read_from_bytes(b).unwrap_or_default();
    MsrEntry {
        index: e.index.get(),
        data: e.data.get(),
    }
}

fn read_access(b: &[u8]) -> Access {
    b.first()
        .and_then(|a| Access::from_bits(*a))
        .unwrap_or(Access::NONE)
}

/// Decode a reply payload to a command of kind `kind`.
pub(super) fn decode(
    kind: CommandKind,
    payload: &[u8],
) -> Result<CommandResult<'_>, ProtocolError> {
    let mut r = Reader::new(payload, "reply");
    let ec = r.take::<ErrorCodeWire>()?;
    zero_padding(ec.padding.as_bytes(), "error_code")?;
    let err = ec.err.get();
    if err != 0 {
        let code = ErrorCode::from_wire(err).ok_or(ProtocolError::InvalidValue {
            field: "err",
            value: u64::from(err as u32),
        })?;
        r.finish()?;
        return Ok(Err(code));
    }
    let reply = match kind {
        CommandKind::GetVersion => {
            let v = r.take::<GetVersionReply>()?;
            zero_padding(v.padding.as_bytes(), "get_version_reply")?;
            Reply::Version(VersionInfo {
                version: v.version.get(),
                allowed: AllowedMasks {
                    commands: v.commands.get(),
                    events: v.events.get(),
                },
            })
        }
        CommandKind::GetGuestInfo => {
            let g = r.take::<GetGuestInfoReply>()?;
            zero_padding(g.padding.as_bytes(), "get_guest_info_reply")?;
            Reply::GuestInfo(GuestInfo {
                vcpu_count: g.vcpu_count.get(),
                tsc_speed: g.tsc_speed.get(),
            })
        }
        CommandKind::GetRegisters => {
            let g = r.take::<GetRegistersReply>()?;
            zero_padding(g.padding.as_bytes(), "get_registers_reply")?;
            zero_padding(g.msrs_pad.as_bytes(), "kvm_msrs")?;
            let mode = CpuMode::from_bytes(g.mode.get()).ok_or(ProtocolError::InvalidValue {
                field: "mode",
                value: g.mode.get().into(),
            })?;
            let count = usize::try_from(g.nmsrs.get()).unwrap_or(usize::MAX);
            let bytes = r.take_array("kvm_msrs", count, 16)?;
            if count > MAX_GET_REGISTERS_MSRS {
                return Err(ProtocolError::CountTooBig {
                    what: "kvm_msrs",
                    count,
                    max: MAX_GET_REGISTERS_MSRS,
                });
            }
            let entries = <[KvmMsrEntry]>::ref_from_bytes(bytes).map_err(|_| {
                ProtocolError::CountOverrun {
                    what: "kvm_msrs",
                    count,
                }
            })?;
            for e in entries {
                zero_padding(e.reserved.as_bytes(), "kvm_msr_entry")?;
            }
            Reply::Registers(Registers {
                mode,
                regs: g.regs,
                sregs: g.sregs,
                msrs: List::encoded(bytes, 16, read_msr_entry),
            })
        }
        CommandKind::GetCpuid => {
            let c = r.take::<GetCpuidReply>()?;
            Reply::Cpuid(CpuidLeaf {
                eax: c.eax.get(),
                ebx: c.ebx.get(),
                ecx: c.ecx.get(),
                edx: c.edx.get(),
            })
        }
        CommandKind::GetPageAccess => {
            let bytes = r.rest();
            if let Some(bad) = bytes.iter().find(|a| Access::from_bits(**a).is_none()) {
                return Err(ProtocolError::InvalidValue {
                    field: "access",
                    value: (*bad).into(),
                });
            }
            r = Reader::new(&[], "reply");
            Reply::PageAccess(List::encoded(bytes, 1, read_access))
        }
        CommandKind::ReadPhysical => {
            let data = r.rest();
            r = Reader::new(&[], "reply");
            Reply::Physical(data)
        }
        CommandKind::GetXsave => {
            let data = r.rest();
            r = Reader::new(&[], "reply");
            Reply::Xsave(data)
        }
        CommandKind::GetMapToken => {
            let t = r.take::<MapMemToken>()?;
            let mut token = [0u8; 32];
            token.copy_from_slice(t.as_bytes());
            Reply::MapToken(MapToken(token))
        }
        CommandKind::PauseVcpu
        | CommandKind::SetRegisters
        | CommandKind::SetPageAccess
        | CommandKind::InjectException
        | CommandKind::WritePhysical
        | CommandKind::ControlEvents
        | CommandKind::ControlCr
        | CommandKind::ControlMsr
        | CommandKind::ControlVe
        | CommandKind::ControlBreakpoint => Reply::Empty,
    };
    r.finish()?;
    reply.validate()?;
    Ok(Ok(reply))
}

fn payload_len(result: &CommandResult<'_>) -> usize {
    let data = match result {
        Err(_) => 0,
        Ok(reply) => match reply {
            Reply::Empty => 0,
            Reply::Version(_) => size_of::<GetVersionReply>(),
            Reply::GuestInfo(_) => size_of::<GetGuestInfoReply>(),
            Reply::Registers(r) => size_of::<GetRegistersReply>() + 16 * r.msrs.len(),
            Reply::Cpuid(_) => size_of::<GetCpuidReply>(),
            Reply::PageAccess(list) => list.len(),
            Reply::Physical(data) | Reply::Xsave(data) => data.len(),
            Reply::MapToken(_) => size_of::<MapMemToken>(),
        },
    };
    size_of::<ErrorCodeWire>() + data
}

fn check(kind: CommandKind, result: &CommandResult<'_>) -> Result<(), EncodeError> {
    if let Ok(reply) = result {
        if !reply.fits(kind) {
            return Err(EncodeError::ReplyMismatch(kind));
        }
        reply.validate()?;
    }
    Ok(())
}

/// Encoded length of a reply message.
pub(super) fn encoded_len(
    kind: CommandKind,
    result: &CommandResult<'_>,
) -> Result<usize, EncodeError> {
    check(kind, result)?;
    message_len(payload_len(result), MAX_MSG_SIZE)
}

/// Encode a reply message.
pub(super) fn encode(
    kind: CommandKind,
    seq: u32,
    result: &CommandResult<'_>,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    check(kind, result)?;
    let len = payload_len(result);
    encode_message(
        command_id(kind),
        seq,
        len,
        MAX_MSG_SIZE,
        buf,
        |w: &mut Writer<'_>| {
            let err = match result {
                Ok(_) => 0,
                Err(code) => code.wire(),
            };
            w.put(&ErrorCodeWire {
                err: I32::new(err),
                padding: U32::ZERO,
            });
            let Ok(reply) = result else { return };
            match *reply {
                Reply::Empty => {}
                Reply::Version(v) => w.put(&GetVersionReply {
                    version: v.version.into(),
                    commands: v.allowed.commands.into(),
                    events: v.allowed.events.into(),
                    padding: U32::ZERO,
                }),
                Reply::GuestInfo(g) => w.put(&GetGuestInfoReply {
                    vcpu_count: g.vcpu_count.into(),
                    padding: [U16::ZERO; 3],
                    tsc_speed: g.tsc_speed.into(),
                }),
                Reply::Registers(r) => {
                    w.put(&GetRegistersReply {
                        mode: U32::new(r.mode.bytes().into()),
                        padding: U32::ZERO,
                        regs: r.regs,
                        sregs: r.sregs,
                        nmsrs: U32::new(r.msrs.len() as u32),
                        msrs_pad: U32::ZERO,
                    });
                    r.msrs.iter().for_each(|m| {
                        w.put(&KvmMsrEntry {
                            index: m.index.into(),
                            reserved: U32::ZERO,
                            data: U64::new(m.data),
                        })
                    });
                }
                Reply::Cpuid(c) => w.put(&GetCpuidReply {
                    eax: c.eax.into(),
                    ebx: c.ebx.into(),
                    ecx: c.ecx.into(),
                    edx: c.edx.into(),
                }),
                Reply::PageAccess(list) => list.iter().for_each(|a| w.put_bytes(&[a.bits()])),
                Reply::Physical(data) | Reply::Xsave(data) => w.put_bytes(data),
                Reply::MapToken(token) => w.put_bytes(&token.0),
            }
        },
    )
}

/// Encode an error-only reply under any message ID.
pub(super) fn encode_error(
    id: u16,
    seq: u32,
    code: ErrorCode,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    let len = size_of::<ErrorCodeWire>();
    encode_message(id, seq, len, MAX_MSG_SIZE, buf, |w: &mut Writer<'_>| {
        w.put(&ErrorCodeWire {
            err: I32::new(code.wire()),
            padding: U32::ZERO,
        })
    })
}
