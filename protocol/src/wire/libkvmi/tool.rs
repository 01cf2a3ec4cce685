//! The tool's side of the libkvmi dialect in the semantic types: the kvmi-v7 encodings of
//! the requests whose payload is a list (`GET_REGISTERS`, `SET_PAGE_ACCESS`) and of event
//! replies, and the readers of events and of the `GET_REGISTERS` reply into
//! [`Event`] and its parts. Fixed-size requests are
//! [`super::frame::encode_request`]'s.
//!
//! Readers follow libkvmi's rules (§5.1 of the dialect's description): the common event part
//! says its own size, short event data is zero-filled, longer is cut; an unknown event ID is
//! an error. Nothing here panics on any input.

use core::mem::size_of;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::event_layout::{
    BreakpointEvent, CrEvent, DescriptorEvent, EventCommon as WireCommon, EventReplyHdr, MsrEvent,
    PF_CTX_MAX, PfEvent, PfReply, TrapEvent,
};
use super::frame::FrameError;
use super::layout::{GetRegistersReply, GetRegistersRequest, SetPageAccessRequest, VcpuHdr};
use super::{MSG_SIZE, actions, events, host, ids};
use crate::error::EncodeError;
use crate::event::{DescriptorTable, Event, EventCommon, EventKind, EventMsrs, EventPayload};
use crate::event_reply::{Action, EventReply, EventReplyData};
use crate::frame::{HEADER_SIZE, Header};
use crate::kvm::{KvmMsrEntry, KvmRegs, KvmSregs};
use crate::types::{CpuMode, PageAccessEntry};

/// Most `SET_PAGE_ACCESS` entries one message carries (`(8184 − 8) / 16`).
pub const SET_PAGE_ACCESS_MAX_ENTRIES: usize =
    (MSG_SIZE - size_of::<SetPageAccessRequest>()) / size_of::<super::layout::PageAccessEntry>();

/// Most MSRs one `GET_REGISTERS` request asks for (its reply must fit a `u16` size).
pub const GET_REGISTERS_MAX_MSRS: usize =
    (host::MAX_REPLY_PAYLOAD - 8 - size_of::<GetRegistersReply>()) / super::layout::MSR_ENTRY_SIZE;

/// Why a tool-side encoding or reading failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// The VMM's message is malformed (libkvmi's own reading rules).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// An event ID the semantic events have no kind for (`CMD_ERROR`, `CPUID`).
    #[error("event {0} has no semantic equivalent")]
    UnsupportedEvent(u8),
    /// An action kvmi-v7 has no value for (`SKIP`).
    #[error("action {0:?} has no kvmi-v7 value")]
    UnsupportedAction(Action),
    /// A field of the VMM's message outside its domain.
    #[error("invalid {field} {value} from the VMM")]
    Value {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The event reply data does not belong to the event (e.g. MSR data for a PF event), or
    /// its context data is longer than 256 bytes.
    #[error("reply data does not fit event {0:?}")]
    ReplyData(EventKind),
}

/// What one `KVMI_EVENT` message holds, read as a tool reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "no allocation in no_std: an event is carried by value, once per message"
)]
pub enum HostEvent {
    /// A vCPU (or VM) event the tool answers.
    Event(Event),
    /// `UNHOOK`: the VMM is about to unhook; the tool should close (no reply).
    Unhook,
}

struct Out<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> Out<'b> {
    fn new(buf: &'b mut [u8]) -> Result<Self, EncodeError> {
        let mut out = Out { buf, len: 0 };
        out.put(&[0; HEADER_SIZE])?;
        Ok(out)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let end = self.len + bytes.len();
        let available = self.buf.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(EncodeError::BufferTooSmall {
                needed: end,
                available,
            })?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// Writes the header of message `id` with `seq`; returns the message length.
    fn finish(self, id: u16, seq: u32) -> Result<usize, EncodeError> {
        let size = self.len - HEADER_SIZE;
        if size > MSG_SIZE {
            return Err(EncodeError::TooLarge {
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
        self.buf[..HEADER_SIZE].copy_from_slice(hdr.as_bytes());
        Ok(self.len)
    }
}

fn vh(vcpu: u16) -> VcpuHdr {
    VcpuHdr {
        vcpu: U16::new(vcpu),
        padding1: U16::new(0),
        padding2: U32::new(0),
    }
}

/// Encodes `GET_REGISTERS` for `vcpu` asking for `msrs` (in this order).
pub fn encode_get_registers(
    seq: u32,
    vcpu: u16,
    msrs: &[u32],
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    if msrs.len() > GET_REGISTERS_MAX_MSRS {
        return Err(EncodeError::TooLarge {
            size: msrs.len(),
            max: GET_REGISTERS_MAX_MSRS,
        });
    }
    let mut out = Out::new(buf)?;
    out.put(vh(vcpu).as_bytes())?;
    out.put(
        GetRegistersRequest {
            nmsrs: U16::new(msrs.len() as u16),
            padding1: U16::new(0),
            padding2: U32::new(0),
        }
        .as_bytes(),
    )?;
    for &msr in msrs {
        out.put(&msr.to_le_bytes())?;
    }
    out.finish(ids::GET_REGISTERS, seq)
}

/// Encodes `SET_PAGE_ACCESS` in EPT view `view` (at most [`SET_PAGE_ACCESS_MAX_ENTRIES`]
/// entries; split longer lists).
pub fn encode_set_page_access(
    seq: u32,
    view: u16,
    entries: &[PageAccessEntry],
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    if entries.len() > SET_PAGE_ACCESS_MAX_ENTRIES {
        return Err(EncodeError::TooLarge {
            size: entries.len(),
            max: SET_PAGE_ACCESS_MAX_ENTRIES,
        });
    }
    let mut out = Out::new(buf)?;
    out.put(
        SetPageAccessRequest {
            view: U16::new(view),
            count: U16::new(entries.len() as u16),
            padding: U32::new(0),
        }
        .as_bytes(),
    )?;
    for e in entries {
        out.put(
            super::layout::PageAccessEntry {
                gpa: U64::new(e.gpa),
                access: e.access.bits(),
                padding1: 0,
                padding2: U16::new(0),
                padding3: U32::new(0),
            }
            .as_bytes(),
        )?;
    }
    out.finish(ids::SET_PAGE_ACCESS, seq)
}

/// The kvmi-v7 action value of `action` (`SKIP` has none).
pub const fn action_value(action: Action) -> Result<u8, ToolError> {
    match action {
        Action::Continue => Ok(actions::CONTINUE),
        Action::Retry => Ok(actions::RETRY),
        Action::Crash => Ok(actions::CRASH),
        Action::Skip => Err(ToolError::UnsupportedAction(action)),
    }
}

/// Encodes the reply to the event with `seq` raised on `vcpu`: the vCPU header, the action
/// and the echoed event ID, then the event's reply data as libkvmi sends it (CR/MSR: 8-byte
/// `new_val`; PF: the 272-byte struct, its context placed at `pf_gva`, the faulting address;
/// others: nothing). `trap_access` becomes `rep_complete`.
pub fn encode_event_reply(
    seq: u32,
    vcpu: u16,
    reply: &EventReply<'_>,
    pf_gva: u64,
    buf: &mut [u8],
) -> Result<usize, ToolError> {
    let action = action_value(reply.action)?;
    if !reply.data.fits(reply.event) {
        return Err(ToolError::ReplyData(reply.event));
    }
    let mut out = Out::new(buf)?;
    out.put(vh(vcpu).as_bytes())?;
    out.put(
        EventReplyHdr {
            action,
            event: reply.event.number(),
            padding1: U16::new(0),
            padding2: U32::new(0),
        }
        .as_bytes(),
    )?;
    match reply.data {
        EventReplyData::None => {}
        EventReplyData::Cr { new_val } | EventReplyData::Msr { new_val } => {
            out.put(&new_val.to_le_bytes())?;
        }
        EventReplyData::PageFault(pf) => {
            if pf.ctx_data.len() > PF_CTX_MAX {
                return Err(ToolError::ReplyData(reply.event));
            }
            let mut r = PfReply::new_zeroed();
            if !pf.ctx_data.is_empty() {
                r.ctx_addr = U64::new(pf_gva);
                r.ctx_size = U32::new(pf.ctx_data.len() as u32);
                r.ctx_data[..pf.ctx_data.len()].copy_from_slice(pf.ctx_data);
            }
            r.rep_complete = pf.trap_access.into();
            out.put(r.as_bytes())?;
        }
    }
    Ok(out.finish(ids::EVENT_REPLY, seq)?)
}

/// `T` from `data`, zero-filled when `data` is shorter and cut when longer (libkvmi's rule
/// for event data and reply structs).
pub fn read_padded<T: FromBytes + IntoBytes + FromZeros>(data: &[u8]) -> T {
    let mut v = T::new_zeroed();
    let dst = v.as_mut_bytes();
    let n = data.len().min(dst.len());
    dst[..n].copy_from_slice(&data[..n]);
    v
}

/// Reads a `KVMI_EVENT` payload (after the header) into the semantic event.
pub fn decode_event(payload: &[u8]) -> Result<HostEvent, ToolError> {
    if payload.len() > MSG_SIZE {
        return Err(FrameError::TooLarge(payload.len()).into());
    }
    let (c, data) = host::decode_event(payload)?;
    if c.event == events::UNHOOK {
        return Ok(HostEvent::Unhook);
    }
    let kind = EventKind::from_number(c.event).ok_or(ToolError::UnsupportedEvent(c.event))?;
    let payload = event_payload(kind, data)?;
    payload.validate().map_err(|_| ToolError::Value {
        field: "event data",
        value: c.event.into(),
    })?;
    Ok(HostEvent::Event(Event {
        common: common(&c)?,
        payload,
    }))
}

fn common(c: &WireCommon) -> Result<EventCommon, ToolError> {
    let mode = CpuMode::from_bytes(c.mode.into()).ok_or(ToolError::Value {
        field: "cpu mode",
        value: c.mode.into(),
    })?;
    let m = &c.msrs;
    Ok(EventCommon {
        vcpu: c.vcpu.get(),
        mode,
        regs: c.regs,
        sregs: c.sregs,
        msrs: EventMsrs {
            sysenter_cs: m.sysenter_cs.get(),
            sysenter_esp: m.sysenter_esp.get(),
            sysenter_eip: m.sysenter_eip.get(),
            efer: m.efer.get(),
            star: m.star.get(),
            lstar: m.lstar.get(),
            cstar: m.cstar.get(),
            pat: m.pat.get(),
        },
    })
}

fn event_payload(kind: EventKind, data: &[u8]) -> Result<EventPayload, ToolError> {
    Ok(match kind {
        EventKind::PauseVcpu => EventPayload::PauseVcpu,
        EventKind::Xsetbv => EventPayload::Xsetbv,
        EventKind::Hypercall => EventPayload::Hypercall,
        EventKind::CreateVcpu => EventPayload::CreateVcpu,
        EventKind::Singlestep => EventPayload::Singlestep,
        EventKind::Cr => {
            let e: CrEvent = read_padded(data);
            EventPayload::Cr {
                cr: e.cr.get(),
                old_value: e.old_value.get(),
                new_value: e.new_value.get(),
            }
        }
        EventKind::Msr => {
            let e: MsrEvent = read_padded(data);
            EventPayload::Msr {
                msr: e.msr.get(),
                old_value: e.old_value.get(),
                new_value: e.new_value.get(),
            }
        }
        EventKind::Breakpoint => {
            let e: BreakpointEvent = read_padded(data);
            EventPayload::Breakpoint { gpa: e.gpa.get() }
        }
        EventKind::PageFault => {
            let e: PfEvent = read_padded(data);
            EventPayload::PageFault {
                gva: e.gva.get(),
                gpa: e.gpa.get(),
                mode: e.access.into(),
            }
        }
        EventKind::Trap => {
            let e: TrapEvent = read_padded(data);
            EventPayload::Trap {
                vector: e.vector.into(),
                // kvmi-v7 does not say how the exception was raised.
                kind: 0,
                error_code: e.error_code.get(),
                cr2: e.cr2.get(),
            }
        }
        EventKind::Descriptor => {
            let e: DescriptorEvent = read_padded(data);
            EventPayload::Descriptor {
                arch: [0; 2],
                descriptor: DescriptorTable::from_value(e.descriptor).ok_or(ToolError::Value {
                    field: "descriptor",
                    value: e.descriptor.into(),
                })?,
                write: e.write != 0,
            }
        }
    })
}

/// The `GET_REGISTERS` reply data, as read by a tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistersReply<'a> {
    /// The vCPU's mode.
    pub mode: CpuMode,
    /// General-purpose registers.
    pub regs: KvmRegs,
    /// Segment and control registers.
    pub sregs: KvmSregs,
    /// The MSR entries, in request order.
    pub msrs: &'a [KvmMsrEntry],
}

/// Reads the `GET_REGISTERS` reply data (after the error code) to a request for `nmsrs`
/// MSRs: exactly `472 + 16·nmsrs` bytes, as libkvmi requires, with `nmsrs` echoed.
pub fn decode_registers(data: &[u8], nmsrs: usize) -> Result<RegistersReply<'_>, ToolError> {
    let expected = size_of::<GetRegistersReply>() + nmsrs * size_of::<KvmMsrEntry>();
    let size = FrameError::Size {
        id: ids::GET_REGISTERS,
        expected,
        got: data.len(),
    };
    if data.len() != expected {
        return Err(size.into());
    }
    let (fixed, rest) = GetRegistersReply::read_from_prefix(data).map_err(|_| size)?;
    let msrs = <[KvmMsrEntry]>::ref_from_bytes(rest).map_err(|_| size)?;
    if fixed.nmsrs.get() as usize != nmsrs {
        return Err(ToolError::Value {
            field: "nmsrs",
            value: fixed.nmsrs.get().into(),
        });
    }
    let mode = CpuMode::from_bytes(fixed.mode.get()).ok_or(ToolError::Value {
        field: "cpu mode",
        value: fixed.mode.get().into(),
    })?;
    Ok(RegistersReply {
        mode,
        regs: fixed.regs,
        sregs: fixed.sregs,
        msrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_reply::PageFaultReply;
    use crate::types::Access;

    #[test]
    fn get_registers_and_set_page_access_have_the_reference_layout() {
        let mut buf = [0u8; 64];
        let n = encode_get_registers(5, 1, &[0x174, 0xc000_0080], &mut buf).unwrap();
        let want: &[u8] = &[
            13, 0, 24, 0, 5, 0, 0, 0, // hdr {id 13, size 8 + 8 + 2·4, seq 5}
            1, 0, 0, 0, 0, 0, 0, 0, // vh {vcpu 1}
            2, 0, 0, 0, 0, 0, 0, 0, // {nmsrs 2}
            0x74, 1, 0, 0, 0x80, 0, 0, 0xc0,
        ];
        assert_eq!(&buf[..n], want);

        let entries = [PageAccessEntry {
            gpa: 0x1234_5000,
            access: Access::from_bits(3).unwrap(),
        }];
        let n = encode_set_page_access(9, 0, &entries, &mut buf).unwrap();
        let want: &[u8] = &[
            21, 0, 24, 0, 9, 0, 0, 0, // hdr {id 21, size 8 + 16, seq 9}
            0, 0, 1, 0, 0, 0, 0, 0, // {view 0, count 1}
            0, 0x50, 0x34, 0x12, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&buf[..n], want);
        let many = [entries[0]; SET_PAGE_ACCESS_MAX_ENTRIES + 1];
        let mut big = [0u8; 9000];
        assert!(encode_set_page_access(1, 0, &many, &mut big).is_err());
        let n = encode_set_page_access(1, 0, &many[1..], &mut big).unwrap();
        assert!(n <= HEADER_SIZE + MSG_SIZE);
    }

    #[test]
    fn event_replies_have_the_reference_layout() {
        let mut buf = [0u8; 512];
        let r = EventReply {
            event: EventKind::PauseVcpu,
            action: Action::Continue,
            data: EventReplyData::None,
        };
        let n = encode_event_reply(77, 2, &r, 0, &mut buf).unwrap();
        let want: &[u8] = &[
            0, 0, 16, 0, 77, 0, 0, 0, // hdr {id 0, size 16, seq 77}
            2, 0, 0, 0, 0, 0, 0, 0, // vh {vcpu 2}
            0, 10, 0, 0, 0, 0, 0, 0, // {action CONTINUE, event PAUSE_VCPU}
        ];
        assert_eq!(&buf[..n], want);

        let r = EventReply {
            event: EventKind::Msr,
            action: Action::Crash,
            data: EventReplyData::Msr { new_val: 0x55 },
        };
        let n = encode_event_reply(3, 0, &r, 0, &mut buf).unwrap();
        assert_eq!(&buf[..8], &[0, 0, 24, 0, 3, 0, 0, 0]);
        assert_eq!(&buf[16..18], &[2, 2], "CRASH, MSR");
        assert_eq!(&buf[24..n], &0x55u64.to_le_bytes());

        let ctx = [0xaa, 0xbb];
        let r = EventReply {
            event: EventKind::PageFault,
            action: Action::Retry,
            data: EventReplyData::PageFault(PageFaultReply {
                trap_access: false,
                ctx_data: &ctx,
            }),
        };
        let n = encode_event_reply(4, 1, &r, 0x7000, &mut buf).unwrap();
        assert_eq!(n, 8 + 16 + 272, "libkvmi's 288-byte PF reply");
        assert_eq!(&buf[16..18], &[1, 6], "RETRY, PF");
        assert_eq!(&buf[24..32], &0x7000u64.to_le_bytes(), "ctx_addr");
        assert_eq!(&buf[32..36], &2u32.to_le_bytes(), "ctx_size");
        assert_eq!(&buf[36..40], &[0, 0, 0, 0], "singlestep, rep_complete, pad");
        assert_eq!(&buf[40..42], &ctx);

        let skip = EventReply {
            action: Action::Skip,
            ..r
        };
        assert_eq!(
            encode_event_reply(4, 1, &skip, 0, &mut buf),
            Err(ToolError::UnsupportedAction(Action::Skip))
        );
        let wrong = EventReply {
            event: EventKind::PageFault,
            action: Action::Continue,
            data: EventReplyData::Msr { new_val: 1 },
        };
        assert!(encode_event_reply(4, 1, &wrong, 0, &mut buf).is_err());
    }

    fn wire_event(id: u8, data: &[u8]) -> ([u8; 1024], usize) {
        let mut c = WireCommon::new_zeroed();
        c.vcpu = U16::new(1);
        c.event = id;
        c.mode = 8;
        c.regs.rip = U64::new(0xffff_8000_0000_1000);
        c.sregs.cr3 = U64::new(0x9000);
        c.msrs.efer = U64::new(0xd01);
        let mut buf = [0u8; 1024];
        let n = host::encode_event(1, &c, data, &mut buf).unwrap();
        (buf, n)
    }

    #[test]
    fn events_read_into_semantic_events() {
        let mut pf = [0u8; 24];
        pf[..8].copy_from_slice(&0x4000_0010u64.to_le_bytes());
        pf[8..16].copy_from_slice(&0x20_0010u64.to_le_bytes());
        pf[16] = 4;
        let (buf, n) = wire_event(events::PF, &pf);
        let HostEvent::Event(e) = decode_event(&buf[8..n]).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(e.common.vcpu, 1);
        assert_eq!(e.common.mode, CpuMode::Bits64);
        assert_eq!(e.common.regs.rip.get(), 0xffff_8000_0000_1000);
        assert_eq!(e.common.sregs.cr3.get(), 0x9000);
        assert_eq!(e.common.msrs.efer, 0xd01);
        assert_eq!(
            e.payload,
            EventPayload::PageFault {
                gva: 0x4000_0010,
                gpa: 0x20_0010,
                mode: 4
            }
        );
        let (buf, n) = wire_event(events::PAUSE_VCPU, &[]);
        assert!(matches!(
            decode_event(&buf[8..n]),
            Ok(HostEvent::Event(Event {
                payload: EventPayload::PauseVcpu,
                ..
            }))
        ));
        let (buf, n) = wire_event(events::SINGLESTEP, &[0; 8]);
        assert!(matches!(
            decode_event(&buf[8..n]),
            Ok(HostEvent::Event(Event {
                payload: EventPayload::Singlestep,
                ..
            }))
        ));
        let (buf, n) = wire_event(events::UNHOOK, &[]);
        assert_eq!(decode_event(&buf[8..n]), Ok(HostEvent::Unhook));
        let (buf, n) = wire_event(events::CPUID, &[0; 16]);
        assert_eq!(
            decode_event(&buf[8..n]),
            Err(ToolError::UnsupportedEvent(events::CPUID))
        );
        // Bad bytes: typed errors, never a panic.
        let (mut buf, n) = wire_event(events::PF, &pf);
        buf[8 + 8] = 3; // mode 3
        assert!(matches!(
            decode_event(&buf[8..n]),
            Err(ToolError::Value { .. })
        ));
        buf[8 + 4] = 99; // unknown ID
        assert!(decode_event(&buf[8..n]).is_err());
        for len in 0..40 {
            let _ = decode_event(&buf[8..8 + len]);
        }
    }

    #[test]
    fn registers_replies_must_be_exact() {
        let mut data = [0u8; 472 + 16];
        data[..4].copy_from_slice(&8u32.to_le_bytes());
        data[8 + 128..8 + 136].copy_from_slice(&0x1234u64.to_le_bytes()); // rip
        data[152 + 240..152 + 248].copy_from_slice(&0x9000u64.to_le_bytes()); // cr3
        data[464..468].copy_from_slice(&1u32.to_le_bytes());
        data[472..476].copy_from_slice(&0x174u32.to_le_bytes());
        data[480..488].copy_from_slice(&0x10u64.to_le_bytes());
        let r = decode_registers(&data, 1).unwrap();
        assert_eq!(r.mode, CpuMode::Bits64);
        assert_eq!(r.regs.rip.get(), 0x1234);
        assert_eq!(r.sregs.cr3.get(), 0x9000);
        assert_eq!((r.msrs[0].index.get(), r.msrs[0].data.get()), (0x174, 0x10));
        assert!(decode_registers(&data[..472], 1).is_err());
        assert!(decode_registers(&data, 0).is_err());
        data[464] = 2;
        assert!(decode_registers(&data, 1).is_err());
    }
}
