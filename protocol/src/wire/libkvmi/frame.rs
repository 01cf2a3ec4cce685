//! Host-side parsing and validation of what a libkvmi tool sends: its handshake answer, the
//! message framing (header size limit, vCPU header) and the command / event-reply payloads.
//!
//! Nothing here panics on any input. Every failure is a [`FrameError`] whose
//! [`FrameError::disposition`] says what the VMM does about it: answer the command in-band
//! with an error code, or close the socket (the cases KVM closes on, docs/protocol.md).
//! [`encode_request`] is the tool side, so that anything that encodes decodes back to itself.

use core::mem::size_of;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::event_layout::{EVENT_REPLY_MIN_SIZE, EventReplyHdr, PF_CTX_MAX, PfReply};
use super::layout::{
    CheckIdRequest, ControlCmdResponseRequest, ControlCrRequest, ControlEventsRequest,
    ControlMsrRequest, GetCpuidRequest, GetRegistersRequest, InjectExceptionRequest,
    IntrospectorToQemu, PageAccessEntry, PauseVcpuRequest, PhysicalRequest, QemuToIntrospector,
    SetPageAccessRequest, U8Request, U64Wire, VcpuHdr,
};
use super::{MSG_SIZE, actions, errors, events, handshake, ids};
use crate::frame::{HEADER_SIZE, Header};
use crate::kvm::KvmRegs;

const PAGE_SIZE: u64 = 4096;

/// What the VMM does about a [`FrameError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Answer the message (under its ID and `seq`) with this negated `KVM_E*` code.
    Reply(i32),
    /// Close the socket (the VMM then reconnects).
    Close,
}

/// Why a tool's handshake or message was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The handshake answer's `struct_size` is below 24 or above 65 536.
    #[error("handshake struct_size {0} outside 24..=65536")]
    HandshakeSize(u32),
    /// A header `size` above 8184.
    #[error("payload of {0} bytes exceeds 8184")]
    TooLarge(usize),
    /// A buffer said to hold exactly one message does not.
    #[error("message of {got} bytes where the header says {expected}")]
    Length {
        /// Header + `size`.
        expected: usize,
        /// Bytes in the buffer.
        got: usize,
    },
    /// A tool sent a message only the VMM sends (`EVENT`).
    #[error("message {0} is not sent by a tool")]
    UnexpectedMessage(u16),
    /// An ID with no handler.
    #[error("unknown message {0}")]
    UnknownMessage(u16),
    /// A vCPU message too short for its 8-byte vCPU header.
    #[error("message {0}: no room for the vCPU header")]
    NoVcpuHeader(u16),
    /// Non-zero padding in a vCPU header.
    #[error("message {0}: non-zero padding in the vCPU header")]
    VcpuHeaderPadding(u16),
    /// A payload (after the vCPU header, if any) of the wrong size.
    #[error("message {id}: {got} payload bytes, expected {expected}")]
    Size {
        /// Message ID.
        id: u16,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// Non-zero padding answered with `-KVM_EINVAL`.
    #[error("message {0}: non-zero padding")]
    Padding(u16),
    /// Non-zero padding in `PAUSE_VCPU` or `CONTROL_CMD_RESPONSE` (closes the socket).
    #[error("message {0}: non-zero padding (fatal)")]
    FatalPadding(u16),
    /// A field outside its domain (CR, MSR, physical range, event ID, MSR count…).
    #[error("message {id}: invalid {field}")]
    Field {
        /// Message ID.
        id: u16,
        /// The field.
        field: &'static str,
    },
    /// `WRITE_PHYSICAL` whose `size` exceeds the payload (closes the socket).
    #[error("WRITE_PHYSICAL size {size} exceeds the {have} bytes sent")]
    WriteOverrun {
        /// The `size` field.
        size: u64,
        /// Data bytes present.
        have: usize,
    },
    /// An event reply shorter than 16 bytes, with non-zero padding, longer than the event's
    /// reply struct, or with an action the event does not accept.
    #[error("malformed reply to event {event}: {what}")]
    EventReply {
        /// The event ID answered.
        event: u8,
        /// What is wrong.
        what: &'static str,
    },
}

impl FrameError {
    /// Answer in-band or close the socket.
    pub const fn disposition(&self) -> Disposition {
        match self {
            Self::UnknownMessage(_) => Disposition::Reply(-errors::ENOSYS),
            Self::Size { .. } | Self::Padding(_) | Self::Field { .. } | Self::Length { .. } => {
                Disposition::Reply(-errors::EINVAL)
            }
            Self::HandshakeSize(_)
            | Self::TooLarge(_)
            | Self::UnexpectedMessage(_)
            | Self::NoVcpuHeader(_)
            | Self::VcpuHeaderPadding(_)
            | Self::FatalPadding(_)
            | Self::WriteOverrun { .. }
            | Self::EventReply { .. } => Disposition::Close,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handshake

/// Build the 96-byte `qemu2introspector` the VMM sends first. `name` is truncated to 63
/// bytes and NUL-padded.
pub fn vmm_handshake(uuid: [u8; 16], start_time: i64, name: &[u8]) -> QemuToIntrospector {
    let mut n = [0u8; handshake::NAME_SIZE];
    let len = name.len().min(handshake::NAME_SIZE - 1);
    n[..len].copy_from_slice(&name[..len]);
    QemuToIntrospector {
        struct_size: U32::new(handshake::VMM_SIZE as u32),
        uuid,
        padding: U32::new(0),
        start_time: zerocopy::little_endian::I64::new(start_time),
        name: n,
    }
}

/// The `cookie_hash` of the tool's handshake answer (SHA-1 of the shared secret).
pub type CookieHash = [u8; handshake::COOKIE_HASH_SIZE];

/// Take the tool's handshake answer off the start of a stream buffer. `Ok(None)`: more bytes
/// needed; else the cookie hash and the bytes after the answer (`struct_size` bytes are
/// consumed; bytes past the first 24 are ignored).
pub fn split_tool_handshake(buf: &[u8]) -> Result<Option<(CookieHash, &[u8])>, FrameError> {
    let Ok((size, _)) = U32::read_from_prefix(buf) else {
        return Ok(None);
    };
    let size = size.get();
    if !(handshake::TOOL_SIZE..=handshake::VMM_MAX_SIZE).contains(&(size as usize)) {
        return Err(FrameError::HandshakeSize(size));
    }
    let Some(rest) = buf.get(size as usize..) else {
        return Ok(None);
    };
    let Ok((answer, _)) = IntrospectorToQemu::read_from_prefix(buf) else {
        return Ok(None);
    };
    Ok(Some((answer.cookie_hash, rest)))
}

// ---------------------------------------------------------------------------------------
// Framing

/// One message from a tool, its vCPU header (if its ID has one) checked and stripped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolFrame<'a> {
    /// Message ID.
    pub id: u16,
    /// Sequence number.
    pub seq: u32,
    /// The vCPU of a vCPU command or event reply.
    pub vcpu: Option<u16>,
    /// The payload after the vCPU header.
    pub body: &'a [u8],
}

fn check_header(header: &Header) -> Result<(), FrameError> {
    if header.size as usize > MSG_SIZE {
        return Err(FrameError::TooLarge(header.size as usize));
    }
    Ok(())
}

/// Whether an ID is handled at all (numbered IDs without a handler are unknown).
const fn is_known(id: u16) -> bool {
    match id {
        ids::EVENT_REPLY => true,
        ids::CONTROL_VE | ids::GET_PAGE_ACCESS | ids::GET_PAGE_WRITE_BITMAP => false,
        2..=39 | 41..=44 | 60 | 63 => true,
        _ => false,
    }
}

fn classify<'a>(header: Header, payload: &'a [u8]) -> Result<ToolFrame<'a>, FrameError> {
    let id = header.id;
    if id == ids::EVENT {
        return Err(FrameError::UnexpectedMessage(id));
    }
    if !is_known(id) {
        return Err(FrameError::UnknownMessage(id));
    }
    let (vcpu, body) = if ids::has_vcpu_hdr(id) {
        let (vh, body) =
            VcpuHdr::read_from_prefix(payload).map_err(|_| FrameError::NoVcpuHeader(id))?;
        if vh.padding1.get() != 0 || vh.padding2.get() != 0 {
            return Err(FrameError::VcpuHeaderPadding(id));
        }
        (Some(vh.vcpu.get()), body)
    } else {
        (None, payload)
    };
    Ok(ToolFrame {
        id,
        seq: header.seq,
        vcpu,
        body,
    })
}

/// Take the first message off a stream buffer. `Ok(None)`: more bytes needed. The bytes of
/// a message rejected with [`Disposition::Reply`] are consumed: skip `8 + size` and go on.
pub fn split_tool_frame(buf: &[u8]) -> Result<Option<(ToolFrame<'_>, &[u8])>, FrameError> {
    let Ok(header) = Header::parse(buf) else {
        return Ok(None);
    };
    check_header(&header)?;
    let Some(payload) = buf.get(HEADER_SIZE..header.message_len()) else {
        return Ok(None);
    };
    let rest = buf.get(header.message_len()..).unwrap_or(&[]);
    Ok(Some((classify(header, payload)?, rest)))
}

/// Parse a buffer holding exactly one message.
pub fn parse_tool_frame(buf: &[u8]) -> Result<ToolFrame<'_>, FrameError> {
    let header = Header::parse(buf).map_err(|_| FrameError::Length {
        expected: HEADER_SIZE,
        got: buf.len(),
    })?;
    check_header(&header)?;
    if buf.len() != header.message_len() {
        return Err(FrameError::Length {
            expected: header.message_len(),
            got: buf.len(),
        });
    }
    classify(header, buf.get(HEADER_SIZE..).unwrap_or(&[]))
}

// ---------------------------------------------------------------------------------------
// Requests

/// A decoded, validated message from a tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// `GET_VERSION`.
    GetVersion,
    /// `CHECK_COMMAND` (the host answers `-KVM_EINVAL` for unknown IDs).
    CheckCommand(u16),
    /// `CHECK_EVENT` (the host answers `-KVM_EINVAL` for IDs ≥ 14).
    CheckEvent(u16),
    /// `GET_GUEST_INFO`.
    GetGuestInfo,
    /// `GET_VCPU_INFO`.
    GetVcpuInfo {
        /// vCPU.
        vcpu: u16,
    },
    /// `PAUSE_VCPU`.
    PauseVcpu {
        /// vCPU.
        vcpu: u16,
        /// Wait for the kick's acknowledgement.
        wait: bool,
    },
    /// `CONTROL_VM_EVENTS` (UNHOOK or CREATE_VCPU).
    ControlVmEvents {
        /// Event ID.
        event: u8,
        /// Enable.
        enable: bool,
    },
    /// `CONTROL_EVENTS`.
    ControlEvents {
        /// vCPU.
        vcpu: u16,
        /// Event ID (a vCPU-controllable event).
        event: u8,
        /// Enable.
        enable: bool,
    },
    /// `CONTROL_CR`.
    ControlCr {
        /// vCPU.
        vcpu: u16,
        /// 0, 3 or 4.
        cr: u32,
        /// Enable.
        enable: bool,
    },
    /// `CONTROL_MSR`.
    ControlMsr {
        /// vCPU.
        vcpu: u16,
        /// MSR index.
        msr: u32,
        /// Enable.
        enable: bool,
    },
    /// `GET_REGISTERS`; reply data must be exactly `472 + 16·msrs.len()` bytes.
    GetRegisters {
        /// vCPU.
        vcpu: u16,
        /// MSR indices, in request order.
        msrs: &'a [U32],
    },
    /// `SET_REGISTERS`.
    SetRegisters {
        /// vCPU.
        vcpu: u16,
        /// New registers.
        regs: KvmRegs,
    },
    /// `GET_CPUID`.
    GetCpuid {
        /// vCPU.
        vcpu: u16,
        /// Leaf.
        function: u32,
        /// Sub-leaf.
        index: u32,
    },
    /// `GET_XSAVE`.
    GetXsave {
        /// vCPU.
        vcpu: u16,
    },
    /// `READ_PHYSICAL` (1…4096 bytes within one page).
    ReadPhysical {
        /// Address.
        gpa: u64,
        /// Bytes.
        size: u64,
    },
    /// `WRITE_PHYSICAL` (1…4096 bytes within one page).
    WritePhysical {
        /// Address.
        gpa: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// `INJECT_EXCEPTION`.
    InjectException {
        /// vCPU.
        vcpu: u16,
        /// Vector.
        nr: u8,
        /// Error code.
        error_code: u32,
        /// CR2 for #PF.
        address: u64,
    },
    /// `SET_PAGE_ACCESS`.
    SetPageAccess {
        /// EPT view.
        view: u16,
        /// Entries (padding checked, access bits ⊆ R|W|X|SVE).
        entries: &'a [PageAccessEntry],
    },
    /// `GET_MAP_TOKEN`.
    GetMapToken,
    /// `GET_MTRR_TYPE`.
    GetMtrrType {
        /// vCPU.
        vcpu: u16,
        /// Address.
        gpa: u64,
    },
    /// `CONTROL_CMD_RESPONSE`.
    ControlCmdResponse {
        /// Send replies.
        enable: bool,
        /// Applies to this command already.
        now: bool,
        /// Flags (bit 0: CMD_ERROR events).
        flags: u8,
    },
    /// `GET_MAX_GFN`.
    GetMaxGfn,
    /// `GET_NEXT_AVAILABLE_GFN`.
    GetNextAvailableGfn,
    /// `VCPU_TRANSLATE_GVA`.
    TranslateGva {
        /// vCPU.
        vcpu: u16,
        /// Address.
        gva: u64,
    },
    /// `VCPU_GET_XCR`.
    GetXcr {
        /// vCPU.
        vcpu: u16,
        /// XCR index.
        xcr: u8,
    },
    /// `VCPU_CONTROL_SINGLESTEP`.
    ControlSinglestep {
        /// vCPU.
        vcpu: u16,
        /// Enable.
        enable: bool,
    },
    /// An event reply: find the pending event by `seq`, then
    /// [`check_event_reply`] with its ID.
    EventReply {
        /// vCPU (from the vCPU header).
        vcpu: u16,
        /// Action value.
        action: u8,
        /// Echoed event ID.
        event: u8,
        /// Event-specific reply data.
        data: &'a [u8],
    },
    /// A known ID this module does not decode yet (EPT views, SPP, #VE, XSAVE writes,
    /// QUERY_PHYSICAL, GFN allocation); the host answers it as it sees fit (`-KVM_ENOSYS`).
    Other {
        /// Message ID.
        id: u16,
        /// vCPU, for vCPU commands.
        vcpu: Option<u16>,
        /// Payload after the vCPU header.
        body: &'a [u8],
    },
}

fn exact<T: FromBytes>(id: u16, body: &[u8]) -> Result<T, FrameError> {
    T::read_from_bytes(body).map_err(|_| FrameError::Size {
        id,
        expected: size_of::<T>(),
        got: body.len(),
    })
}

fn empty(id: u16, body: &[u8]) -> Result<(), FrameError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(FrameError::Size {
            id,
            expected: 0,
            got: body.len(),
        })
    }
}

fn pad_zero(id: u16, zero: bool) -> Result<(), FrameError> {
    if zero {
        Ok(())
    } else {
        Err(FrameError::Padding(id))
    }
}

fn field(id: u16, ok: bool, field: &'static str) -> Result<(), FrameError> {
    if ok {
        Ok(())
    } else {
        Err(FrameError::Field { id, field })
    }
}

/// A 0/1 flag byte; anything else is `-KVM_EINVAL`.
fn flag(id: u16, v: u8, name: &'static str) -> Result<bool, FrameError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(FrameError::Field { id, field: name }),
    }
}

fn in_one_page(gpa: u64, size: u64) -> bool {
    (1..=PAGE_SIZE).contains(&size) && gpa % PAGE_SIZE + size <= PAGE_SIZE
}

/// Whether an MSR index is one `CONTROL_MSR` accepts.
pub const fn msr_in_range(msr: u32) -> bool {
    msr <= 0x1fff || (msr >= 0xc000_0000 && msr <= 0xc000_1fff)
}

/// Decode and validate the payload of a message from a tool.
pub fn decode_request(frame: ToolFrame<'_>) -> Result<Request<'_>, FrameError> {
    let ToolFrame { id, vcpu, body, .. } = frame;
    let v = vcpu.unwrap_or(0);
    Ok(match id {
        ids::GET_VERSION => empty(id, body).map(|()| Request::GetVersion)?,
        ids::CHECK_COMMAND | ids::CHECK_EVENT => {
            let r: CheckIdRequest = exact(id, body)?;
            pad_zero(id, r.padding1.get() == 0 && r.padding2.get() == 0)?;
            if id == ids::CHECK_COMMAND {
                Request::CheckCommand(r.id.get())
            } else {
                Request::CheckEvent(r.id.get())
            }
        }
        ids::GET_GUEST_INFO => empty(id, body).map(|()| Request::GetGuestInfo)?,
        ids::GET_VCPU_INFO => empty(id, body).map(|()| Request::GetVcpuInfo { vcpu: v })?,
        ids::PAUSE_VCPU => {
            let r: PauseVcpuRequest = exact(id, body)?;
            if r.padding1 != 0 || r.padding2.get() != 0 || r.padding3.get() != 0 {
                return Err(FrameError::FatalPadding(id));
            }
            Request::PauseVcpu {
                vcpu: v,
                wait: flag(id, r.wait, "wait")?,
            }
        }
        ids::CONTROL_VM_EVENTS | ids::CONTROL_EVENTS => {
            let r: ControlEventsRequest = exact(id, body)?;
            pad_zero(id, r.padding1 == 0 && r.padding2.get() == 0)?;
            let ev = r.event_id.get();
            let enable = flag(id, r.enable, "enable")?;
            if id == ids::CONTROL_VM_EVENTS {
                field(id, events::is_vm_controllable(ev), "event_id")?;
                Request::ControlVmEvents {
                    event: ev as u8,
                    enable,
                }
            } else {
                field(id, events::is_vcpu_controllable(ev), "event_id")?;
                Request::ControlEvents {
                    vcpu: v,
                    event: ev as u8,
                    enable,
                }
            }
        }
        ids::CONTROL_CR => {
            let r: ControlCrRequest = exact(id, body)?;
            pad_zero(id, r.padding1 == 0 && r.padding2.get() == 0)?;
            let cr = r.cr.get();
            field(id, matches!(cr, 0 | 3 | 4), "cr")?;
            Request::ControlCr {
                vcpu: v,
                cr,
                enable: flag(id, r.enable, "enable")?,
            }
        }
        ids::CONTROL_MSR => {
            let r: ControlMsrRequest = exact(id, body)?;
            pad_zero(id, r.padding1 == 0 && r.padding2.get() == 0)?;
            let msr = r.msr.get();
            field(id, msr_in_range(msr), "msr")?;
            Request::ControlMsr {
                vcpu: v,
                msr,
                enable: flag(id, r.enable, "enable")?,
            }
        }
        ids::GET_REGISTERS => {
            let (r, rest) =
                GetRegistersRequest::read_from_prefix(body).map_err(|_| FrameError::Size {
                    id,
                    expected: size_of::<GetRegistersRequest>(),
                    got: body.len(),
                })?;
            pad_zero(id, r.padding1.get() == 0 && r.padding2.get() == 0)?;
            let n = r.nmsrs.get() as usize;
            // The payload must hold at least the indices; anything after them is ignored.
            let idx = rest
                .get(..4 * n)
                .ok_or(FrameError::Field { id, field: "nmsrs" })?;
            let msrs = <[U32]>::ref_from_bytes(idx)
                .map_err(|_| FrameError::Field { id, field: "nmsrs" })?;
            Request::GetRegisters { vcpu: v, msrs }
        }
        ids::SET_REGISTERS => Request::SetRegisters {
            vcpu: v,
            regs: exact(id, body)?,
        },
        ids::GET_CPUID => {
            let r: GetCpuidRequest = exact(id, body)?;
            Request::GetCpuid {
                vcpu: v,
                function: r.function.get(),
                index: r.index.get(),
            }
        }
        ids::GET_XSAVE => empty(id, body).map(|()| Request::GetXsave { vcpu: v })?,
        ids::READ_PHYSICAL => {
            let r: PhysicalRequest = exact(id, body)?;
            let (gpa, size) = (r.gpa.get(), r.size.get());
            field(id, in_one_page(gpa, size), "gpa/size")?;
            Request::ReadPhysical { gpa, size }
        }
        ids::WRITE_PHYSICAL => {
            let (r, data) =
                PhysicalRequest::read_from_prefix(body).map_err(|_| FrameError::Size {
                    id,
                    expected: size_of::<PhysicalRequest>(),
                    got: body.len(),
                })?;
            let (gpa, size) = (r.gpa.get(), r.size.get());
            if size > data.len() as u64 {
                return Err(FrameError::WriteOverrun {
                    size,
                    have: data.len(),
                });
            }
            field(id, in_one_page(gpa, size), "gpa/size")?;
            if size != data.len() as u64 {
                return Err(FrameError::Size {
                    id,
                    expected: size_of::<PhysicalRequest>() + size as usize,
                    got: body.len(),
                });
            }
            Request::WritePhysical { gpa, data }
        }
        ids::INJECT_EXCEPTION => {
            let r: InjectExceptionRequest = exact(id, body)?;
            pad_zero(id, r.padding1 == 0 && r.padding2.get() == 0)?;
            field(id, r.nr < 32, "nr")?;
            Request::InjectException {
                vcpu: v,
                nr: r.nr,
                error_code: r.error_code.get(),
                address: r.address.get(),
            }
        }
        ids::SET_PAGE_ACCESS => {
            let (r, rest) =
                SetPageAccessRequest::read_from_prefix(body).map_err(|_| FrameError::Size {
                    id,
                    expected: size_of::<SetPageAccessRequest>(),
                    got: body.len(),
                })?;
            pad_zero(id, r.padding.get() == 0)?;
            let n = r.count.get() as usize;
            let want = size_of::<PageAccessEntry>() * n;
            if rest.len() != want {
                return Err(FrameError::Size {
                    id,
                    expected: size_of::<SetPageAccessRequest>() + want,
                    got: body.len(),
                });
            }
            let entries =
                <[PageAccessEntry]>::ref_from_bytes(rest).map_err(|_| FrameError::Size {
                    id,
                    expected: size_of::<SetPageAccessRequest>() + want,
                    got: body.len(),
                })?;
            for e in entries {
                pad_zero(
                    id,
                    e.padding1 == 0 && e.padding2.get() == 0 && e.padding3.get() == 0,
                )?;
                field(id, e.access & !0xf == 0, "access")?;
            }
            Request::SetPageAccess {
                view: r.view.get(),
                entries,
            }
        }
        ids::GET_MAP_TOKEN => empty(id, body).map(|()| Request::GetMapToken)?,
        ids::GET_MTRR_TYPE => Request::GetMtrrType {
            vcpu: v,
            gpa: exact::<U64Wire>(id, body)?.value.get(),
        },
        ids::CONTROL_CMD_RESPONSE => {
            let r: ControlCmdResponseRequest = exact(id, body)?;
            if r.padding1 != 0 || r.padding2.get() != 0 {
                return Err(FrameError::FatalPadding(id));
            }
            field(id, r.flags & !1 == 0, "flags")?;
            Request::ControlCmdResponse {
                enable: flag(id, r.enable, "enable")?,
                now: flag(id, r.now, "now")?,
                flags: r.flags,
            }
        }
        ids::GET_MAX_GFN => empty(id, body).map(|()| Request::GetMaxGfn)?,
        ids::GET_NEXT_AVAILABLE_GFN => empty(id, body).map(|()| Request::GetNextAvailableGfn)?,
        ids::VCPU_TRANSLATE_GVA => Request::TranslateGva {
            vcpu: v,
            gva: exact::<U64Wire>(id, body)?.value.get(),
        },
        ids::VCPU_GET_XCR => {
            let r: U8Request = exact(id, body)?;
            pad_zero(id, r.padding == [0; 7])?;
            Request::GetXcr {
                vcpu: v,
                xcr: r.value,
            }
        }
        ids::VCPU_CONTROL_SINGLESTEP => {
            let r: U8Request = exact(id, body)?;
            pad_zero(id, r.padding == [0; 7])?;
            Request::ControlSinglestep {
                vcpu: v,
                enable: flag(id, r.value, "enable")?,
            }
        }
        ids::EVENT_REPLY => {
            let Ok((r, data)) = EventReplyHdr::read_from_prefix(body) else {
                return Err(FrameError::EventReply {
                    event: 0xff,
                    what: "shorter than 16 bytes",
                });
            };
            if r.padding1.get() != 0 || r.padding2.get() != 0 {
                return Err(FrameError::EventReply {
                    event: r.event,
                    what: "non-zero padding",
                });
            }
            Request::EventReply {
                vcpu: v,
                action: r.action,
                event: r.event,
                data,
            }
        }
        _ => Request::Other { id, vcpu, body },
    })
}

/// Check an event reply against the ID of the event pending on its vCPU (the caller matched
/// `seq`): the action must be one the event accepts and the data no larger than the event's
/// reply struct (a shorter one is zero-filled by [`pf_reply`]); a PF reply's padding must be
/// zero and its `ctx_size` ≤ 256.
pub fn check_event_reply(pending: u8, action: u8, data: &[u8]) -> Result<(), FrameError> {
    let err = |what| FrameError::EventReply {
        event: pending,
        what,
    };
    let max = events::reply_data_size(pending).ok_or(err("event takes no reply"))?;
    if !actions::accepted(pending, action) {
        return Err(err("action not accepted"));
    }
    if data.len() > max {
        return Err(err("reply data larger than the event's reply struct"));
    }
    if pending == events::PF {
        let r = pf_reply(data);
        if r.padding.get() != 0 {
            return Err(err("non-zero padding"));
        }
        if r.ctx_size.get() as usize > PF_CTX_MAX {
            return Err(err("ctx_size above 256"));
        }
    }
    Ok(())
}

/// The PF reply data, zero-filled when shorter than 272 bytes (longer is cut).
pub fn pf_reply(data: &[u8]) -> PfReply {
    let mut buf = [0u8; size_of::<PfReply>()];
    let n = data.len().min(buf.len());
    buf[..n].copy_from_slice(&data[..n]);
    PfReply::read_from_bytes(&buf).unwrap_or_else(|_| PfReply::new_zeroed())
}

/// The CR / MSR reply's `new_val`, zero-filled when the data is shorter than 8 bytes (as
/// the VMM treats a short reply).
pub fn new_val_reply(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Smallest legal payload for an event reply.
pub const EVENT_REPLY_MIN_PAYLOAD: usize = EVENT_REPLY_MIN_SIZE;

// ---------------------------------------------------------------------------------------
// Tool side: encoding

struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), crate::error::EncodeError> {
        let end = self.len + bytes.len();
        let avail = self.buf.len();
        let dst =
            self.buf
                .get_mut(self.len..end)
                .ok_or(crate::error::EncodeError::BufferTooSmall {
                    needed: end,
                    available: avail,
                })?;
        dst.copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }
}

fn vh(vcpu: u16) -> VcpuHdr {
    VcpuHdr {
        vcpu: U16::new(vcpu),
        padding1: U16::new(0),
        padding2: U32::new(0),
    }
}

/// Encode a request as a tool would (header included); returns the length written. Encodes
/// whatever it is given; [`decode_request`] is the judge of validity.
pub fn encode_request(
    seq: u32,
    req: &Request<'_>,
    buf: &mut [u8],
) -> Result<usize, crate::error::EncodeError> {
    use zerocopy::little_endian::U16 as W16;
    let mut w = Writer { buf, len: 0 };
    w.put(&[0; HEADER_SIZE])?;
    let u64w = |v: u64| U64Wire { value: U64::new(v) };
    let u8r = |v: u8| U8Request {
        value: v,
        padding: [0; 7],
    };
    let ctl = |ev: u8, en: bool| ControlEventsRequest {
        event_id: W16::new(ev.into()),
        enable: en.into(),
        padding1: 0,
        padding2: U32::new(0),
    };
    let id = match *req {
        Request::GetVersion => ids::GET_VERSION,
        Request::CheckCommand(c) | Request::CheckEvent(c) => {
            w.put(
                CheckIdRequest {
                    id: W16::new(c),
                    padding1: W16::new(0),
                    padding2: U32::new(0),
                }
                .as_bytes(),
            )?;
            if matches!(req, Request::CheckCommand(_)) {
                ids::CHECK_COMMAND
            } else {
                ids::CHECK_EVENT
            }
        }
        Request::GetGuestInfo => ids::GET_GUEST_INFO,
        Request::GetVcpuInfo { vcpu } => {
            w.put(vh(vcpu).as_bytes())?;
            ids::GET_VCPU_INFO
        }
        Request::PauseVcpu { vcpu, wait } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(
                PauseVcpuRequest {
                    wait: wait.into(),
                    padding1: 0,
                    padding2: W16::new(0),
                    padding3: U32::new(0),
                }
                .as_bytes(),
            )?;
            ids::PAUSE_VCPU
        }
        Request::ControlVmEvents { event, enable } => {
            w.put(ctl(event, enable).as_bytes())?;
            ids::CONTROL_VM_EVENTS
        }
        Request::ControlEvents {
            vcpu,
            event,
            enable,
        } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(ctl(event, enable).as_bytes())?;
            ids::CONTROL_EVENTS
        }
        Request::ControlCr { vcpu, cr, enable } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(
                ControlCrRequest {
                    enable: enable.into(),
                    padding1: 0,
                    padding2: W16::new(0),
                    cr: U32::new(cr),
                }
                .as_bytes(),
            )?;
            ids::CONTROL_CR
        }
        Request::ControlMsr { vcpu, msr, enable } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(
                ControlMsrRequest {
                    enable: enable.into(),
                    padding1: 0,
                    padding2: W16::new(0),
                    msr: U32::new(msr),
                }
                .as_bytes(),
            )?;
            ids::CONTROL_MSR
        }
        Request::GetRegisters { vcpu, msrs } => {
            w.put(vh(vcpu).as_bytes())?;
            let n = u16::try_from(msrs.len()).map_err(|_| crate::error::EncodeError::TooLarge {
                size: msrs.len(),
                max: u16::MAX as usize,
            })?;
            w.put(
                GetRegistersRequest {
                    nmsrs: W16::new(n),
                    padding1: W16::new(0),
                    padding2: U32::new(0),
                }
                .as_bytes(),
            )?;
            w.put(msrs.as_bytes())?;
            ids::GET_REGISTERS
        }
        Request::SetRegisters { vcpu, regs } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(regs.as_bytes())?;
            ids::SET_REGISTERS
        }
        Request::GetCpuid {
            vcpu,
            function,
            index,
        } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(
                GetCpuidRequest {
                    function: U32::new(function),
                    index: U32::new(index),
                }
                .as_bytes(),
            )?;
            ids::GET_CPUID
        }
        Request::GetXsave { vcpu } => {
            w.put(vh(vcpu).as_bytes())?;
            ids::GET_XSAVE
        }
        Request::ReadPhysical { gpa, size } => {
            w.put(
                PhysicalRequest {
                    gpa: U64::new(gpa),
                    size: U64::new(size),
                }
                .as_bytes(),
            )?;
            ids::READ_PHYSICAL
        }
        Request::WritePhysical { gpa, data } => {
            w.put(
                PhysicalRequest {
                    gpa: U64::new(gpa),
                    size: U64::new(data.len() as u64),
                }
                .as_bytes(),
            )?;
            w.put(data)?;
            ids::WRITE_PHYSICAL
        }
        Request::InjectException {
            vcpu,
            nr,
            error_code,
            address,
        } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(
                InjectExceptionRequest {
                    nr,
                    padding1: 0,
                    padding2: W16::new(0),
                    error_code: U32::new(error_code),
                    address: U64::new(address),
                }
                .as_bytes(),
            )?;
            ids::INJECT_EXCEPTION
        }
        Request::SetPageAccess { view, entries } => {
            let n =
                u16::try_from(entries.len()).map_err(|_| crate::error::EncodeError::TooLarge {
                    size: entries.len(),
                    max: u16::MAX as usize,
                })?;
            w.put(
                SetPageAccessRequest {
                    view: W16::new(view),
                    count: W16::new(n),
                    padding: U32::new(0),
                }
                .as_bytes(),
            )?;
            w.put(entries.as_bytes())?;
            ids::SET_PAGE_ACCESS
        }
        Request::GetMapToken => ids::GET_MAP_TOKEN,
        Request::GetMtrrType { vcpu, gpa } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(u64w(gpa).as_bytes())?;
            ids::GET_MTRR_TYPE
        }
        Request::ControlCmdResponse { enable, now, flags } => {
            w.put(
                ControlCmdResponseRequest {
                    enable: enable.into(),
                    now: now.into(),
                    flags,
                    padding1: 0,
                    padding2: U32::new(0),
                }
                .as_bytes(),
            )?;
            ids::CONTROL_CMD_RESPONSE
        }
        Request::GetMaxGfn => ids::GET_MAX_GFN,
        Request::GetNextAvailableGfn => ids::GET_NEXT_AVAILABLE_GFN,
        Request::TranslateGva { vcpu, gva } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(u64w(gva).as_bytes())?;
            ids::VCPU_TRANSLATE_GVA
        }
        Request::GetXcr { vcpu, xcr } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(u8r(xcr).as_bytes())?;
            ids::VCPU_GET_XCR
        }
        Request::ControlSinglestep { vcpu, enable } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(u8r(enable.into()).as_bytes())?;
            ids::VCPU_CONTROL_SINGLESTEP
        }
        Request::EventReply {
            vcpu,
            action,
            event,
            data,
        } => {
            w.put(vh(vcpu).as_bytes())?;
            w.put(
                EventReplyHdr {
                    action,
                    event,
                    padding1: W16::new(0),
                    padding2: U32::new(0),
                }
                .as_bytes(),
            )?;
            w.put(data)?;
            ids::EVENT_REPLY
        }
        Request::Other { id, vcpu, body } => {
            if let Some(v) = vcpu {
                w.put(vh(v).as_bytes())?;
            }
            w.put(body)?;
            id
        }
    };
    let size = w.len - HEADER_SIZE;
    if size > MSG_SIZE {
        return Err(crate::error::EncodeError::TooLarge {
            size,
            max: MSG_SIZE,
        });
    }
    let hdr = Header {
        id,
        size: size as u16,
        seq,
    }
    .to_wire();
    w.buf[..HEADER_SIZE].copy_from_slice(hdr.as_bytes());
    Ok(w.len)
}
