//! v4 events (`kvmi_event` + payload) and event replies (`kvmi_event_reply` + data).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::event_layout::{
    EventBreakpointWire, EventCrWire, EventDescriptorWire, EventMsrWire, EventMsrsWire,
    EventNewValReply, EventPageFaultReplyWire, EventPageFaultWire, EventReplyWire, EventTrapWire,
    EventWire,
};
use super::{MAX_MSG_SIZE, action_bit, action_from_bits, event_bit, event_kind, ids};
use crate::error::{EncodeError, ProtocolError};
use crate::event::{DescriptorTable, Event, EventCommon, EventKind, EventMsrs, EventPayload};
use crate::event_reply::{
    EventReply, EventReplyData, PF_CTX_DATA_SIZE, PageFaultReply, check_action,
};
use crate::types::CpuMode;
use crate::wire::codec::{Reader, Writer, encode_message, flag, message_len, zero_padding};

/// Decode and validate an event payload.
pub(super) fn decode_event(payload: &[u8]) -> Result<Event, ProtocolError> {
    let mut r = Reader::new(payload, "event");
    let ev = r.take::<EventWire>()?;
    let kind = event_kind(ev.event.get())?;
    zero_padding(&[ev.padding], "kvmi_event")?;
    let mode = CpuMode::from_bytes(ev.mode.into()).ok_or(ProtocolError::InvalidValue {
        field: "mode",
        value: ev.mode.into(),
    })?;
    let m = &ev.msrs;
    let common = EventCommon {
        vcpu: ev.vcpu.get(),
        mode,
        regs: ev.regs,
        sregs: ev.sregs,
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
    };
    let payload = match kind {
        EventKind::PauseVcpu => EventPayload::PauseVcpu,
        EventKind::Xsetbv => EventPayload::Xsetbv,
        EventKind::Hypercall => EventPayload::Hypercall,
        EventKind::CreateVcpu => EventPayload::CreateVcpu,
        EventKind::Singlestep => EventPayload::Singlestep,
        EventKind::Cr => {
            let c = r.take::<EventCrWire>()?;
            zero_padding(c.padding.as_bytes(), "event_cr")?;
            EventPayload::Cr {
                cr: c.cr.get(),
                old_value: c.old_value.get(),
                new_value: c.new_value.get(),
            }
        }
        EventKind::Msr => {
            let c = r.take::<EventMsrWire>()?;
            zero_padding(c.padding.as_bytes(), "event_msr")?;
            EventPayload::Msr {
                msr: c.msr.get(),
                old_value: c.old_value.get(),
                new_value: c.new_value.get(),
            }
        }
        EventKind::Breakpoint => EventPayload::Breakpoint {
            gpa: r.take::<EventBreakpointWire>()?.gpa.get(),
        },
        EventKind::PageFault => {
            let p = r.take::<EventPageFaultWire>()?;
            zero_padding(p.padding.as_bytes(), "event_page_fault")?;
            EventPayload::PageFault {
                gva: p.gva.get(),
                gpa: p.gpa.get(),
                mode: p.mode.get(),
            }
        }
        EventKind::Trap => {
            let t = r.take::<EventTrapWire>()?;
            zero_padding(t.padding.as_bytes(), "event_trap")?;
            EventPayload::Trap {
                vector: t.vector.get(),
                kind: t.type_.get(),
                error_code: t.error_code.get(),
                cr2: t.cr2.get(),
            }
        }
        EventKind::Descriptor => {
            let d = r.take::<EventDescriptorWire>()?;
            zero_padding(&d.padding, "event_descriptor")?;
            let descriptor =
                DescriptorTable::from_value(d.descriptor).ok_or(ProtocolError::InvalidValue {
                    field: "descriptor",
                    value: d.descriptor.into(),
                })?;
            EventPayload::Descriptor {
                arch: [d.arch[0].get(), d.arch[1].get()],
                descriptor,
                write: flag(d.write, "write")?,
            }
        }
    };
    r.finish()?;
    payload.validate()?;
    Ok(Event { common, payload })
}

fn event_payload_len(kind: EventKind) -> usize {
    match kind {
        EventKind::PauseVcpu
        | EventKind::Xsetbv
        | EventKind::Hypercall
        | EventKind::CreateVcpu
        | EventKind::Singlestep => 0,
        EventKind::Cr => size_of::<EventCrWire>(),
        EventKind::Msr => size_of::<EventMsrWire>(),
        EventKind::Breakpoint => size_of::<EventBreakpointWire>(),
        EventKind::PageFault => size_of::<EventPageFaultWire>(),
        EventKind::Trap => size_of::<EventTrapWire>(),
        EventKind::Descriptor => size_of::<EventDescriptorWire>(),
    }
}

/// Encoded length of an event message.
pub(super) fn event_len(event: &Event) -> usize {
    crate::frame::HEADER_SIZE + size_of::<EventWire>() + event_payload_len(event.kind())
}

/// Encode an event message.
pub(super) fn encode_event(seq: u32, event: &Event, buf: &mut [u8]) -> Result<usize, EncodeError> {
    event.payload.validate()?;
    let len = size_of::<EventWire>() + event_payload_len(event.kind());
    encode_message(
        ids::EVENT,
        seq,
        len,
        MAX_MSG_SIZE,
        buf,
        |w: &mut Writer<'_>| {
            let c = &event.common;
            let m = &c.msrs;
            w.put(&EventWire {
                event: event_bit(event.kind()).into(),
                vcpu: c.vcpu.into(),
                mode: c.mode.bytes(),
                padding: 0,
                regs: c.regs,
                sregs: c.sregs,
                msrs: EventMsrsWire {
                    sysenter_cs: m.sysenter_cs.into(),
                    sysenter_esp: m.sysenter_esp.into(),
                    sysenter_eip: m.sysenter_eip.into(),
                    efer: m.efer.into(),
                    star: m.star.into(),
                    lstar: m.lstar.into(),
                    cstar: m.cstar.into(),
                    pat: m.pat.into(),
                },
            });
            match event.payload {
                EventPayload::PauseVcpu
                | EventPayload::Xsetbv
                | EventPayload::Hypercall
                | EventPayload::CreateVcpu
                | EventPayload::Singlestep => {}
                EventPayload::Cr {
                    cr,
                    old_value,
                    new_value,
                } => w.put(&EventCrWire {
                    cr: cr.into(),
                    padding: [U16::ZERO; 3],
                    old_value: old_value.into(),
                    new_value: new_value.into(),
                }),
                EventPayload::Msr {
                    msr,
                    old_value,
                    new_value,
                } => w.put(&EventMsrWire {
                    msr: msr.into(),
                    padding: U32::ZERO,
                    old_value: old_value.into(),
                    new_value: new_value.into(),
                }),
                EventPayload::Breakpoint { gpa } => w.put(&EventBreakpointWire { gpa: gpa.into() }),
                EventPayload::PageFault { gva, gpa, mode } => w.put(&EventPageFaultWire {
                    gva: gva.into(),
                    gpa: gpa.into(),
                    mode: mode.into(),
                    padding: U32::ZERO,
                }),
                EventPayload::Trap {
                    vector,
                    kind,
                    error_code,
                    cr2,
                } => w.put(&EventTrapWire {
                    vector: vector.into(),
                    type_: kind.into(),
                    error_code: error_code.into(),
                    padding: U32::ZERO,
                    cr2: cr2.into(),
                }),
                EventPayload::Descriptor {
                    arch,
                    descriptor,
                    write,
                } => w.put(&EventDescriptorWire {
                    arch: [U64::new(arch[0]), U64::new(arch[1])],
                    descriptor: descriptor.value(),
                    write: write.into(),
                    padding: [0; 6],
                }),
            }
        },
    )
}

/// Decode and validate the reply payload to an event of kind `event`.
pub(super) fn decode_reply(
    event: EventKind,
    payload: &[u8],
) -> Result<EventReply<'_>, ProtocolError> {
    let mut r = Reader::new(payload, "event reply");
    let hdr = r.take::<EventReplyWire>()?;
    zero_padding(hdr.padding.as_bytes(), "event_reply")?;
    let action = action_from_bits(hdr.action.get())?;
    check_action(event, action)?;
    let data = match event {
        EventKind::Cr => EventReplyData::Cr {
            new_val: r.take::<EventNewValReply>()?.new_val.get(),
        },
        EventKind::Msr => EventReplyData::Msr {
            new_val: r.take::<EventNewValReply>()?.new_val.get(),
        },
        EventKind::PageFault => {
            let p = r.take::<EventPageFaultReplyWire>()?;
            zero_padding(&p.padding, "event_page_fault_reply")?;
            let ctx_size = p.ctx_size.get();
            let ctx_data = usize::try_from(ctx_size)
                .ok()
                .and_then(|n| p.ctx_data.get(..n))
                .ok_or(ProtocolError::InvalidValue {
                    field: "ctx_size",
                    value: ctx_size.into(),
                })?;
            EventReplyData::PageFault(PageFaultReply {
                trap_access: flag(p.trap_access, "trap_access")?,
                ctx_data,
            })
        }
        _ => EventReplyData::None,
    };
    r.finish()?;
    let reply = EventReply {
        event,
        action,
        data,
    };
    reply.validate()?;
    Ok(reply)
}

fn reply_payload_len(reply: &EventReply<'_>) -> usize {
    size_of::<EventReplyWire>()
        + match reply.data {
            EventReplyData::None => 0,
            EventReplyData::Cr { .. } | EventReplyData::Msr { .. } => size_of::<EventNewValReply>(),
            EventReplyData::PageFault(_) => size_of::<EventPageFaultReplyWire>(),
        }
}

/// Encoded length of an event-reply message.
pub(super) fn reply_len(reply: &EventReply<'_>) -> Result<usize, EncodeError> {
    reply.validate()?;
    message_len(reply_payload_len(reply), MAX_MSG_SIZE)
}

/// Encode an event-reply message.
pub(super) fn encode_reply(
    seq: u32,
    reply: &EventReply<'_>,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    reply.validate()?;
    let len = reply_payload_len(reply);
    encode_message(
        ids::EVENT_REPLY,
        seq,
        len,
        MAX_MSG_SIZE,
        buf,
        |w: &mut Writer<'_>| {
            w.put(&EventReplyWire {
                action: action_bit(reply.action).into(),
                padding: U32::ZERO,
            });
            match reply.data {
                EventReplyData::None => {}
                EventReplyData::Cr { new_val } | EventReplyData::Msr { new_val } => {
                    w.put(&EventNewValReply {
                        new_val: new_val.into(),
                    })
                }
                EventReplyData::PageFault(pf) => {
                    let mut wire = EventPageFaultReplyWire::new_zeroed();
                    wire.trap_access = pf.trap_access.into();
                    wire.ctx_size = U32::new(pf.ctx_data.len() as u32);
                    if let Some(dst) = wire.ctx_data.get_mut(..pf.ctx_data.len()) {
                        dst.copy_from_slice(pf.ctx_data);
                    }
                    w.put(&wire);
                }
            }
        },
    )
}

const _: () = assert!(PF_CTX_DATA_SIZE == 256);
