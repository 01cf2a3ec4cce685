//! v4 command requests: decode with validation, encode.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::layout::{
    ControlBreakpointRequest, ControlEventsRequest, ControlRegRequest, ControlVeRequest,
    GetCpuidRequest, GetRegistersRequest, InjectExceptionRequest, PageAccessEntryWire,
    PageAccessRequest, PhysicalRequest, SetRegistersRequest, VcpuRequest,
};
use super::{MAX_MSG_SIZE, command_id, command_kind, event_set_from_bits, event_set_to_bits, ids};
use crate::command::{Command, CommandKind};
use crate::error::{EncodeError, ProtocolError};
use crate::list::List;
use crate::types::{Access, PageAccessEntry, VcpuSelector};
use crate::wire::codec::{Reader, Writer, encode_message, flag, message_len, zero_padding};

/// Most MSRs one `GET_REGISTERS` may ask for: its reply (error code, 472 bytes, 16 per MSR)
/// must fit a message. More is `-KVM_E2BIG`.
pub const MAX_GET_REGISTERS_MSRS: usize = (u16::MAX as usize - 8 - 472) / 16;

fn read_u32(b: &[u8]) -> u32 {
    U32::read_from_bytes(b).map_or(0, U32::get)
}

fn read_u64(b: &[u8]) -> u64 {
    U64::read_from_bytes(b).map_or(0, U64::get)
}

fn read_page_access_entry(b: &[u8]) -> PageAccessEntry {
    let e = PageAccessEntryWire::read_from_bytes(b).ok();
    PageAccessEntry {
        gpa: e.map_or(0, |e| e.gpa.get()),
        access: e
            .and_then(|e| Access::from_bits(e.access))
            .unwrap_or(Access::NONE),
    }
}

/// Decode and validate a command payload.
pub(super) fn decode(id: u16, payload: &[u8]) -> Result<Command<'_>, ProtocolError> {
    if id == ids::EVENT || id == ids::EVENT_REPLY {
        return Err(ProtocolError::UnexpectedMessage(id));
    }
    let kind = command_kind(id).ok_or(ProtocolError::UnknownMessage(id))?;
    let mut r = Reader::new(payload, "command");
    let command = match kind {
        CommandKind::GetVersion => Command::GetVersion,
        CommandKind::GetMapToken => Command::GetMapToken,
        CommandKind::GetGuestInfo => {
            let vcpu = vcpu_request(&mut r)?;
            if vcpu != 0 {
                return Err(ProtocolError::InvalidValue {
                    field: "vcpu",
                    value: vcpu.into(),
                });
            }
            Command::GetGuestInfo
        }
        CommandKind::PauseVcpu => Command::PauseVcpu {
            vcpu: vcpu_request(&mut r)?,
        },
        CommandKind::GetXsave => Command::GetXsave {
            vcpu: vcpu_request(&mut r)?,
        },
        CommandKind::GetRegisters => {
            let req = r.take::<GetRegistersRequest>()?;
            zero_padding(req.padding.as_bytes(), "get_registers")?;
            let count = usize::from(req.nmsrs.get());
            let msrs = r.take_array("msrs_idx", count, 4)?;
            if count > MAX_GET_REGISTERS_MSRS {
                return Err(ProtocolError::CountTooBig {
                    what: "msrs_idx",
                    count,
                    max: MAX_GET_REGISTERS_MSRS,
                });
            }
            Command::GetRegisters {
                vcpu: req.vcpu.get(),
                msrs: List::encoded(msrs, 4, read_u32),
            }
        }
        CommandKind::SetRegisters => {
            let req = r.take::<SetRegistersRequest>()?;
            zero_padding(req.padding.as_bytes(), "set_registers")?;
            Command::SetRegisters {
                vcpu: req.vcpu.get(),
                regs: req.regs,
            }
        }
        CommandKind::GetCpuid => {
            let req = r.take::<GetCpuidRequest>()?;
            zero_padding(req.padding.as_bytes(), "get_cpuid")?;
            Command::GetCpuid {
                vcpu: req.vcpu.get(),
                function: req.function.get(),
                index: req.index.get(),
            }
        }
        CommandKind::GetPageAccess => {
            let req = r.take::<PageAccessRequest>()?;
            zero_padding(req.padding.as_bytes(), "get_page_access")?;
            let gpas = r.take_array("gpa", req.count.get().into(), 8)?;
            Command::GetPageAccess {
                vcpu: req.vcpu.get(),
                view: req.view.get(),
                gpas: List::encoded(gpas, 8, read_u64),
            }
        }
        CommandKind::SetPageAccess => {
            let req = r.take::<PageAccessRequest>()?;
            zero_padding(req.padding.as_bytes(), "set_page_access")?;
            let bytes = r.take_array("entries", req.count.get().into(), 16)?;
            let entries = <[PageAccessEntryWire]>::ref_from_bytes(bytes).map_err(|_| {
                ProtocolError::CountOverrun {
                    what: "entries",
                    count: req.count.get().into(),
                }
            })?;
            for e in entries {
                zero_padding(&e.padding, "page_access_entry")?;
                Access::from_bits(e.access).ok_or(ProtocolError::InvalidValue {
                    field: "access",
                    value: e.access.into(),
                })?;
            }
            Command::SetPageAccess {
                vcpu: req.vcpu.get(),
                view: req.view.get(),
                entries: List::encoded(bytes, 16, read_page_access_entry),
            }
        }
        CommandKind::InjectException => {
            let req = r.take::<InjectExceptionRequest>()?;
            zero_padding(req.padding.as_bytes(), "inject_exception")?;
            let has_error = flag(req.has_error, "has_error")?;
            let code = req.error_code.get();
            if !has_error && code != 0 {
                return Err(ProtocolError::InvalidValue {
                    field: "error_code without has_error",
                    value: code.into(),
                });
            }
            Command::InjectException {
                vcpu: req.vcpu.get(),
                vector: req.nr,
                error_code: has_error.then_some(code),
                address: req.address.get(),
            }
        }
        CommandKind::ReadPhysical => {
            let req = r.take::<PhysicalRequest>()?;
            Command::ReadPhysical {
                gpa: req.gpa.get(),
                size: req.size.get(),
            }
        }
        CommandKind::WritePhysical => {
            let req = r.take::<PhysicalRequest>()?;
            let size = usize::try_from(req.size.get()).unwrap_or(usize::MAX);
            Command::WritePhysical {
                gpa: req.gpa.get(),
                data: r.take_array("data", size, 1)?,
            }
        }
        CommandKind::ControlEvents => {
            let req = r.take::<ControlEventsRequest>()?;
            zero_padding(req.padding.as_bytes(), "control_events")?;
            Command::ControlEvents {
                vcpu: req.vcpu.get(),
                events: event_set_from_bits(req.events.get())?,
            }
        }
        CommandKind::ControlCr | CommandKind::ControlMsr => {
            let req = r.take::<ControlRegRequest>()?;
            zero_padding(&[req.padding], "control_cr/msr")?;
            let (vcpu, enable) = (req.vcpu.get(), flag(req.enable, "enable")?);
            if kind == CommandKind::ControlCr {
                Command::ControlCr {
                    vcpu,
                    enable,
                    cr: req.reg.get(),
                }
            } else {
                Command::ControlMsr {
                    vcpu,
                    enable,
                    msr: req.reg.get(),
                }
            }
        }
        CommandKind::ControlVe => {
            let req = r.take::<ControlVeRequest>()?;
            zero_padding(&req.padding, "control_ve")?;
            let enable = flag(req.enable, "enable")?;
            let gpas = r.take_array("gpa", req.count.get().into(), 8)?;
            Command::ControlVe {
                vcpu: req.vcpu.get(),
                enable,
                gpas: List::encoded(gpas, 8, read_u64),
            }
        }
        CommandKind::ControlBreakpoint => {
            let req = r.take::<ControlBreakpointRequest>()?;
            zero_padding(&[req.padding1], "control_breakpoint")?;
            zero_padding(req.padding2.as_bytes(), "control_breakpoint")?;
            let vcpus = match req.vcpu.get() {
                u16::MAX => VcpuSelector::All,
                vcpu => VcpuSelector::One(vcpu),
            };
            Command::ControlBreakpoint {
                vcpus,
                enable: flag(req.enable, "enable")?,
                gva: req.gva.get(),
            }
        }
    };
    r.finish()?;
    command.validate()?;
    Ok(command)
}

fn vcpu_request(r: &mut Reader<'_>) -> Result<u16, ProtocolError> {
    let req = r.take::<VcpuRequest>()?;
    zero_padding(req.padding.as_bytes(), "vcpu request")?;
    Ok(req.vcpu.get())
}

fn count16(what: &'static str, count: usize) -> Result<U16, EncodeError> {
    u16::try_from(count).map(U16::new).map_err(|_| {
        EncodeError::Invalid(ProtocolError::CountTooBig {
            what,
            count,
            max: u16::MAX.into(),
        })
    })
}

/// Payload length of a command (unchecked against the maximum).
fn payload_len(command: &Command<'_>) -> usize {
    match command {
        Command::GetVersion | Command::GetMapToken => 0,
        Command::GetGuestInfo
        | Command::PauseVcpu { .. }
        | Command::GetXsave { .. }
        | Command::ControlEvents { .. }
        | Command::ControlCr { .. }
        | Command::ControlMsr { .. } => 8,
        Command::GetRegisters { msrs, .. } => 8 + 4 * msrs.len(),
        Command::SetRegisters { .. } => size_of::<SetRegistersRequest>(),
        Command::GetCpuid { .. }
        | Command::InjectException { .. }
        | Command::ReadPhysical { .. }
        | Command::ControlBreakpoint { .. } => 16,
        Command::GetPageAccess { gpas, .. } | Command::ControlVe { gpas, .. } => 8 + 8 * gpas.len(),
        Command::SetPageAccess { entries, .. } => 8 + 16 * entries.len(),
        Command::WritePhysical { data, .. } => 16 + data.len(),
    }
}

/// Validate a command for encoding (the checks its decoder makes).
fn check(command: &Command<'_>) -> Result<(), EncodeError> {
    command.validate()?;
    match command {
        Command::GetRegisters { msrs, .. } if msrs.len() > MAX_GET_REGISTERS_MSRS => {
            Err(EncodeError::Invalid(ProtocolError::CountTooBig {
                what: "msrs_idx",
                count: msrs.len(),
                max: MAX_GET_REGISTERS_MSRS,
            }))
        }
        Command::GetPageAccess { gpas, .. } | Command::ControlVe { gpas, .. } => {
            count16("gpa", gpas.len()).map(drop)
        }
        Command::SetPageAccess { entries, .. } => count16("entries", entries.len()).map(drop),
        _ => Ok(()),
    }
}

/// Encoded length of a command message.
pub(super) fn encoded_len(command: &Command<'_>) -> Result<usize, EncodeError> {
    check(command)?;
    message_len(payload_len(command), MAX_MSG_SIZE)
}

/// Encode a command message.
pub(super) fn encode(
    seq: u32,
    command: &Command<'_>,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    check(command)?;
    let id = command_id(command.kind());
    let len = payload_len(command);
    let pad3 = [U16::ZERO; 3];
    encode_message(
        id,
        seq,
        len,
        MAX_MSG_SIZE,
        buf,
        |w: &mut Writer<'_>| match *command {
            Command::GetVersion | Command::GetMapToken => {}
            Command::GetGuestInfo => w.put(&VcpuRequest {
                vcpu: U16::ZERO,
                padding: pad3,
            }),
            Command::PauseVcpu { vcpu } | Command::GetXsave { vcpu } => w.put(&VcpuRequest {
                vcpu: vcpu.into(),
                padding: pad3,
            }),
            Command::GetRegisters { vcpu, msrs } => {
                w.put(&GetRegistersRequest {
                    vcpu: vcpu.into(),
                    nmsrs: U16::new(msrs.len() as u16),
                    padding: [U16::ZERO; 2],
                });
                msrs.iter().for_each(|m| w.put(&U32::new(m)));
            }
            Command::SetRegisters { vcpu, regs } => w.put(&SetRegistersRequest {
                vcpu: vcpu.into(),
                padding: pad3,
                regs,
            }),
            Command::GetCpuid {
                vcpu,
                function,
                index,
            } => w.put(&GetCpuidRequest {
                vcpu: vcpu.into(),
                padding: pad3,
                function: function.into(),
                index: index.into(),
            }),
            Command::GetPageAccess { vcpu, view, gpas } => {
                w.put(&PageAccessRequest {
                    vcpu: vcpu.into(),
                    count: U16::new(gpas.len() as u16),
                    view: view.into(),
                    padding: U16::ZERO,
                });
                gpas.iter().for_each(|g| w.put(&U64::new(g)));
            }
            Command::SetPageAccess {
                vcpu,
                view,
                entries,
            } => {
                w.put(&PageAccessRequest {
                    vcpu: vcpu.into(),
                    count: U16::new(entries.len() as u16),
                    view: view.into(),
                    padding: U16::ZERO,
                });
                entries.iter().for_each(|e| {
                    w.put(&PageAccessEntryWire {
                        gpa: e.gpa.into(),
                        access: e.access.bits(),
                        padding: [0; 7],
                    })
                });
            }
            Command::InjectException {
                vcpu,
                vector,
                error_code,
                address,
            } => w.put(&InjectExceptionRequest {
                vcpu: vcpu.into(),
                nr: vector,
                has_error: error_code.is_some().into(),
                error_code: error_code.unwrap_or(0).into(),
                padding: U16::ZERO,
                address: address.into(),
            }),
            Command::ReadPhysical { gpa, size } => w.put(&PhysicalRequest {
                gpa: gpa.into(),
                size: size.into(),
            }),
            Command::WritePhysical { gpa, data } => {
                w.put(&PhysicalRequest {
                    gpa: gpa.into(),
                    size: U64::new(data.len() as u64),
                });
                w.put_bytes(data);
            }
            Command::ControlEvents { vcpu, events } => w.put(&ControlEventsRequest {
                vcpu: vcpu.into(),
                padding: U16::ZERO,
                events: event_set_to_bits(events).into(),
            }),
            Command::ControlCr {
                vcpu,
                enable,
                cr: reg,
            }
            | Command::ControlMsr {
                vcpu,
                enable,
                msr: reg,
            } => w.put(&ControlRegRequest {
                vcpu: vcpu.into(),
                enable: enable.into(),
                padding: 0,
                reg: reg.into(),
            }),
            Command::ControlVe { vcpu, enable, gpas } => {
                w.put(&ControlVeRequest {
                    vcpu: vcpu.into(),
                    count: U16::new(gpas.len() as u16),
                    enable: enable.into(),
                    padding: [0; 3],
                });
                gpas.iter().for_each(|g| w.put(&U64::new(g)));
            }
            Command::ControlBreakpoint { vcpus, enable, gva } => w.put(&ControlBreakpointRequest {
                vcpu: match vcpus {
                    VcpuSelector::All => u16::MAX,
                    VcpuSelector::One(v) => v,
                }
                .into(),
                enable: enable.into(),
                padding1: 0,
                padding2: U32::ZERO,
                gva: gva.into(),
            }),
        },
    )
}
