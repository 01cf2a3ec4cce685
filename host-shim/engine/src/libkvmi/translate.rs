//! Pure translations between the engine's semantic messages and the libkvmi dialect's bytes:
//! events out, command results out, event replies in. No state, no I/O.

use protocol::event::{Event, EventKind, EventPayload};
use protocol::event_reply::{Action, EventReply, EventReplyData, PageFaultReply};
use protocol::kvm::KvmMsrEntry;
use protocol::reply::{CommandResult, Reply};
use protocol::wire::libkvmi::event_layout::{
    BreakpointEvent, CrEvent, DescriptorEvent, EVENT_COMMON_SIZE, EventCommon, EventMsrs, MsrEvent,
    PfEvent, SinglestepEvent, TrapEvent,
};
use protocol::wire::libkvmi::frame::{new_val_reply, pf_reply};
use protocol::wire::libkvmi::layout::{
    GetCpuidReply, GetGuestInfoReply, GetRegistersReply, GetVersionReply, U64Wire,
};
use protocol::wire::libkvmi::{KVMI_VERSION, actions, events, host, ids};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

/// The libkvmi event ID of an engine event (the two numberings agree for 1–11).
pub(crate) const fn event_id(kind: EventKind) -> u8 {
    kind.number()
}

/// The engine event kind of a libkvmi event ID (`None`: UNHOOK, CMD_ERROR, CPUID and unknown
/// IDs, which the engine never raises).
pub(crate) fn event_kind(id: u8) -> Option<EventKind> {
    EventKind::from_number(id)
}

/// The 544-byte common part of a libkvmi event from the engine's event state. UNHOOK passes
/// `None`: vCPU 0 and a zeroed architecture part.
pub(crate) fn event_common(event: Option<&Event>, id: u8) -> EventCommon {
    let mut c = EventCommon::new_zeroed();
    c.size = U16::new(EVENT_COMMON_SIZE as u16);
    c.event = id;
    if let Some(e) = event {
        let s = &e.common;
        c.vcpu = U16::new(s.vcpu);
        c.mode = s.mode.bytes();
        c.regs = s.regs;
        c.sregs = s.sregs;
        c.msrs = EventMsrs {
            sysenter_cs: U64::new(s.msrs.sysenter_cs),
            sysenter_esp: U64::new(s.msrs.sysenter_esp),
            sysenter_eip: U64::new(s.msrs.sysenter_eip),
            efer: U64::new(s.msrs.efer),
            star: U64::new(s.msrs.star),
            lstar: U64::new(s.msrs.lstar),
            cstar: U64::new(s.msrs.cstar),
            pat: U64::new(s.msrs.pat),
            // Not shadowed by the engine (swapgs changes it without an exit): 0. Tools read
            // MSR 0xc0000102 with GET_REGISTERS.
            shadow_gs: U64::new(0),
        };
    }
    c
}

/// The event-specific data of `payload`, exactly the size its libkvmi event ID calls for.
pub(crate) fn event_data(payload: &EventPayload) -> Vec<u8> {
    match *payload {
        EventPayload::Cr {
            cr,
            old_value,
            new_value,
        } => CrEvent {
            cr: U16::new(cr),
            padding: [U16::new(0); 3],
            old_value: U64::new(old_value),
            new_value: U64::new(new_value),
        }
        .as_bytes()
        .to_vec(),
        EventPayload::Msr {
            msr,
            old_value,
            new_value,
        } => MsrEvent {
            msr: U32::new(msr),
            padding: U32::new(0),
            old_value: U64::new(old_value),
            new_value: U64::new(new_value),
        }
        .as_bytes()
        .to_vec(),
        // Breakpoints reach a libkvmi tool only as INT3 (one byte).
        EventPayload::Breakpoint { gpa } => BreakpointEvent {
            gpa: U64::new(gpa),
            insn_len: 1,
            padding: [0; 7],
        }
        .as_bytes()
        .to_vec(),
        EventPayload::PageFault { gva, gpa, mode } => PfEvent {
            gva: U64::new(gva),
            gpa: U64::new(gpa),
            access: (mode & 7) as u8,
            padding1: 0,
            view: U16::new(0),
            padding2: U32::new(0),
        }
        .as_bytes()
        .to_vec(),
        EventPayload::Trap {
            vector,
            error_code,
            cr2,
            ..
        } => TrapEvent {
            vector: vector as u8,
            padding1: 0,
            padding2: U16::new(0),
            error_code: U32::new(error_code),
            cr2: U64::new(cr2),
        }
        .as_bytes()
        .to_vec(),
        EventPayload::Descriptor {
            descriptor, write, ..
        } => DescriptorEvent {
            descriptor: descriptor.value(),
            write: write.into(),
            padding: [0; 6],
        }
        .as_bytes()
        .to_vec(),
        EventPayload::Singlestep => SinglestepEvent {
            failed: 0,
            padding: [0; 7],
        }
        .as_bytes()
        .to_vec(),
        EventPayload::PauseVcpu
        | EventPayload::Xsetbv
        | EventPayload::Hypercall
        | EventPayload::CreateVcpu => Vec::new(),
    }
}

/// A whole libkvmi event message (header included) for an engine event.
pub(crate) fn encode_event(seq: u32, event: &Event) -> Vec<u8> {
    let id = event_id(event.kind());
    encode_event_parts(
        seq,
        &event_common(Some(event), id),
        &event_data(&event.payload),
    )
}

/// The UNHOOK event (vCPU 0, zeroed architecture part, no data).
pub(crate) fn encode_unhook(seq: u32) -> Vec<u8> {
    encode_event_parts(seq, &event_common(None, events::UNHOOK), &[])
}

fn encode_event_parts(seq: u32, common: &EventCommon, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + EVENT_COMMON_SIZE + data.len()];
    match host::encode_event(seq, common, data, &mut buf) {
        Ok(n) => buf.truncate(n),
        // Unreachable: every payload above has its ID's exact size.
        Err(e) => tracing::error!("cannot encode libkvmi event {}: {e}", common.event),
    }
    buf
}

/// An error-only reply to message `id`.
pub(crate) fn error_reply(id: u16, seq: u32, code: i32) -> Vec<u8> {
    let mut buf = vec![0u8; 16];
    let n = host::encode_error_reply(id, seq, code, &mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

/// A successful reply to message `id` carrying `data`.
pub(crate) fn data_reply(id: u16, seq: u32, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 16 + data.len()];
    match host::encode_reply(id, seq, data, &mut buf) {
        Ok(n) => buf.truncate(n),
        Err(e) => {
            tracing::error!("cannot encode the reply to libkvmi command {id}: {e}");
            return error_reply(id, seq, protocol::wire::libkvmi::errors::ENOMEM);
        }
    }
    buf
}

/// The `GET_VERSION` reply: version 1, no SPP, VMFUNC, EPTP switching or #VE.
pub(crate) fn version_reply(seq: u32) -> Vec<u8> {
    let mut r = GetVersionReply::new_zeroed();
    r.version = U32::new(KVMI_VERSION);
    data_reply(ids::GET_VERSION, seq, r.as_bytes())
}

/// A `u64` reply (GET_MAX_GFN, GET_VCPU_INFO, VCPU_TRANSLATE_GVA…).
pub(crate) fn u64_reply(id: u16, seq: u32, value: u64) -> Vec<u8> {
    data_reply(
        id,
        seq,
        U64Wire {
            value: U64::new(value),
        }
        .as_bytes(),
    )
}

/// The libkvmi reply to message `id` for the engine's `result`. The caller picked `id` to
/// match the engine command that produced `result`; a result whose shape does not fit `id`
/// is answered `-KVM_EINVAL` (never reached: the engine validates its own replies).
pub(crate) fn command_reply(id: u16, seq: u32, result: &CommandResult<'_>) -> Vec<u8> {
    let reply = match result {
        Err(code) => return error_reply(id, seq, code.value()),
        Ok(r) => r,
    };
    match (id, reply) {
        (_, Reply::Empty) => data_reply(id, seq, &[]),
        (ids::GET_GUEST_INFO, Reply::GuestInfo(g)) => {
            let mut r = GetGuestInfoReply::new_zeroed();
            r.vcpu_count = U32::new(u32::from(g.vcpu_count));
            data_reply(id, seq, r.as_bytes())
        }
        (ids::GET_VCPU_INFO, Reply::GuestInfo(g)) => u64_reply(id, seq, g.tsc_speed),
        (ids::GET_REGISTERS, Reply::Registers(r)) => {
            let mut fixed = GetRegistersReply::new_zeroed();
            fixed.mode = U32::new(u32::from(r.mode.bytes()));
            fixed.regs = r.regs;
            fixed.sregs = r.sregs;
            let entries: Vec<KvmMsrEntry> = r
                .msrs
                .iter()
                .map(|m| KvmMsrEntry {
                    index: U32::new(m.index),
                    reserved: U32::new(0),
                    data: U64::new(m.data),
                })
                .collect();
            let mut buf = vec![0u8; 16 + size_of::<GetRegistersReply>() + 16 * entries.len()];
            match host::encode_get_registers_reply(seq, &fixed, &entries, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    buf
                }
                Err(_) => error_reply(id, seq, protocol::wire::libkvmi::errors::E2BIG),
            }
        }
        (ids::GET_CPUID, Reply::Cpuid(c)) => {
            let r = GetCpuidReply {
                eax: U32::new(c.eax),
                ebx: U32::new(c.ebx),
                ecx: U32::new(c.ecx),
                edx: U32::new(c.edx),
            };
            data_reply(id, seq, r.as_bytes())
        }
        (ids::READ_PHYSICAL, Reply::Physical(bytes)) | (ids::GET_XSAVE, Reply::Xsave(bytes)) => {
            data_reply(id, seq, bytes)
        }
        (ids::GET_PAGE_ACCESS, Reply::PageAccess(list)) => {
            let bytes: Vec<u8> = list.iter().map(|a| a.bits()).collect();
            data_reply(id, seq, &bytes)
        }
        _ => {
            tracing::error!("engine reply {reply:?} does not fit libkvmi command {id}");
            error_reply(id, seq, protocol::wire::libkvmi::errors::EINVAL)
        }
    }
}

/// What an event awaiting its reply needs for the reply's translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outstanding {
    /// The event's `seq`.
    pub(crate) seq: u32,
    /// Its libkvmi event ID.
    pub(crate) id: u8,
    /// For PF events, the faulting gva (to place the reply's context data).
    pub(crate) gva: u64,
}

/// The engine's action for a libkvmi action value (checked by
/// [`protocol::wire::libkvmi::frame::check_event_reply`] first).
pub(crate) fn action(value: u8) -> Action {
    match value {
        actions::RETRY => Action::Retry,
        actions::CRASH => Action::Crash,
        _ => Action::Continue,
    }
}

/// The engine's event reply for a libkvmi reply (already checked against the event).
///
/// PF: the read sees `ctx_data` from offset `gva − ctx_addr` when the faulting gva lies in
/// `[ctx_addr, ctx_addr + ctx_size)`; otherwise memory. `singlestep` and `rep_complete` are
/// accepted and have no effect (each trapped access is completed on its own here).
pub(crate) fn event_reply<'a>(
    pending: &Outstanding,
    kind: EventKind,
    action_value: u8,
    data: &'a [u8],
    ctx: &'a mut [u8; protocol::wire::libkvmi::event_layout::PF_CTX_MAX],
) -> EventReply<'a> {
    let data = match kind {
        EventKind::Cr => EventReplyData::Cr {
            new_val: new_val_reply(data),
        },
        EventKind::Msr => EventReplyData::Msr {
            new_val: new_val_reply(data),
        },
        EventKind::PageFault => {
            let r = pf_reply(data);
            let size = u64::from(r.ctx_size.get()).min(ctx.len() as u64);
            let start = pending.gva.wrapping_sub(r.ctx_addr.get());
            let ctx_data: &[u8] = if size > 0 && start < size {
                let (from, to) = (start as usize, size as usize);
                let n = to - from;
                ctx[..n].copy_from_slice(&r.ctx_data[from..to]);
                &ctx[..n]
            } else {
                &[]
            };
            EventReplyData::PageFault(PageFaultReply {
                trap_access: false,
                ctx_data,
            })
        }
        _ => EventReplyData::None,
    };
    EventReply {
        event: kind,
        action: action(action_value),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::event::EventCommon as Common;
    use protocol::event::EventMsrs as Msrs;
    use protocol::kvm::{KvmRegs, KvmSregs};
    use protocol::reply::{GuestInfo, Registers};
    use protocol::types::{CpuMode, MsrEntry};
    use protocol::wire::libkvmi::event_layout::PF_CTX_MAX;
    use protocol::wire::libkvmi::host::{decode_event, decode_reply};

    fn event(payload: EventPayload) -> Event {
        let mut regs = KvmRegs::new_zeroed();
        regs.rip = U64::new(0x1234);
        let mut sregs = KvmSregs::new_zeroed();
        sregs.cr3 = U64::new(0x9000);
        Event {
            common: Common {
                vcpu: 1,
                mode: CpuMode::Bits64,
                regs,
                sregs,
                msrs: Msrs {
                    efer: 0xd01,
                    ..Msrs::default()
                },
            },
            payload,
        }
    }

    #[test]
    fn events_have_the_libkvmi_layout_and_read_back_as_libkvmi_reads_them() {
        let msg = encode_event(
            7,
            &event(EventPayload::PageFault {
                gva: 0x4000_0010,
                gpa: 0x20_0010,
                mode: 2,
            }),
        );
        assert_eq!(msg.len(), 8 + 544 + 24);
        assert_eq!(&msg[..2], &ids::EVENT.to_le_bytes());
        assert_eq!(&msg[2..4], &(544u16 + 24).to_le_bytes());
        assert_eq!(&msg[4..8], &7u32.to_le_bytes());
        let (common, data) = decode_event(&msg[8..]).unwrap();
        assert_eq!(common.vcpu.get(), 1);
        assert_eq!(common.event, events::PF);
        assert_eq!(common.mode, 8);
        assert_eq!(common.regs.rip.get(), 0x1234);
        assert_eq!(common.sregs.cr3.get(), 0x9000);
        assert_eq!(common.msrs.efer.get(), 0xd01);
        assert_eq!(common.msrs.shadow_gs.get(), 0);
        assert_eq!(&data[..8], &0x4000_0010u64.to_le_bytes());
        assert_eq!(&data[8..16], &0x20_0010u64.to_le_bytes());
        assert_eq!(data[16], 2, "access W");

        let bp = encode_event(1, &event(EventPayload::Breakpoint { gpa: 0x5000 }));
        let (common, data) = decode_event(&bp[8..]).unwrap();
        assert_eq!(common.event, events::BREAKPOINT);
        assert_eq!(data.len(), 16);
        assert_eq!(&data[..8], &0x5000u64.to_le_bytes());
        assert_eq!(data[8], 1, "insn_len of INT3");

        for (payload, id, len) in [
            (EventPayload::PauseVcpu, events::PAUSE_VCPU, 0),
            (EventPayload::Singlestep, events::SINGLESTEP, 8),
            (EventPayload::CreateVcpu, events::CREATE_VCPU, 0),
            (EventPayload::Hypercall, events::HYPERCALL, 0),
            (
                EventPayload::Msr {
                    msr: 0x174,
                    old_value: 1,
                    new_value: 2,
                },
                events::MSR,
                24,
            ),
            (
                EventPayload::Trap {
                    vector: 14,
                    kind: 3,
                    error_code: 2,
                    cr2: 0xdead,
                },
                events::TRAP,
                16,
            ),
        ] {
            let m = encode_event(3, &event(payload));
            let (common, data) = decode_event(&m[8..]).unwrap();
            assert_eq!((common.event, data.len()), (id, len), "{payload:?}");
        }

        let unhook = encode_unhook(9);
        let (common, data) = decode_event(&unhook[8..]).unwrap();
        assert_eq!(
            (common.event, common.vcpu.get(), common.regs.rip.get()),
            (0, 0, 0)
        );
        assert!(data.is_empty());
    }

    #[test]
    fn get_registers_replies_are_exactly_472_plus_16_per_msr() {
        let msrs = [
            MsrEntry {
                index: 0x174,
                data: 0x10,
            },
            MsrEntry {
                index: 0xc000_0080,
                data: 0xd01,
            },
        ];
        let result: CommandResult<'_> = Ok(Reply::Registers(Registers {
            mode: CpuMode::Bits64,
            regs: KvmRegs::new_zeroed(),
            sregs: KvmSregs::new_zeroed(),
            msrs: protocol::list::List::from_slice(&msrs),
        }));
        let msg = command_reply(ids::GET_REGISTERS, 5, &result);
        let r = decode_reply(&msg[8..]).unwrap();
        assert_eq!(r.err, 0);
        assert_eq!(r.data.len(), 472 + 16 * 2);
        assert_eq!(&r.data[..4], &8u32.to_le_bytes(), "mode");
        assert_eq!(&r.data[464..468], &2u32.to_le_bytes(), "nmsrs");
        assert_eq!(&r.data[472..476], &0x174u32.to_le_bytes());
        assert_eq!(&r.data[496..504], &0xd01u64.to_le_bytes());
    }

    #[test]
    fn guest_info_serves_two_commands_and_errors_keep_their_code() {
        let g: CommandResult<'_> = Ok(Reply::GuestInfo(GuestInfo {
            vcpu_count: 2,
            tsc_speed: 2_000_000_000,
        }));
        let m = command_reply(ids::GET_GUEST_INFO, 1, &g);
        let r = decode_reply(&m[8..]).unwrap();
        assert_eq!(r.data.len(), 16);
        assert_eq!(&r.data[..4], &2u32.to_le_bytes());
        let m = command_reply(ids::GET_VCPU_INFO, 2, &g);
        assert_eq!(
            decode_reply(&m[8..]).unwrap().data,
            &2_000_000_000u64.to_le_bytes()
        );
        let e: CommandResult<'_> = Err(protocol::error::ErrorCode::Busy);
        let m = command_reply(ids::PAUSE_VCPU, 3, &e);
        let r = decode_reply(&m[8..]).unwrap();
        assert_eq!((r.err, r.data.len()), (-16, 0));
        assert_eq!(&m[..2], &ids::PAUSE_VCPU.to_le_bytes());
    }

    #[test]
    fn pf_context_is_placed_at_the_faulting_address() {
        let pending = Outstanding {
            seq: 1,
            id: events::PF,
            gva: 0x1004,
        };
        let mut data = vec![0u8; 272];
        data[..8].copy_from_slice(&0x1000u64.to_le_bytes());
        data[8..12].copy_from_slice(&8u32.to_le_bytes());
        data[16..24].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut ctx = [0u8; PF_CTX_MAX];
        let r = event_reply(&pending, EventKind::PageFault, 0, &data, &mut ctx);
        assert_eq!(r.action, Action::Continue);
        let EventReplyData::PageFault(pf) = r.data else {
            panic!("{r:?}")
        };
        assert_eq!(pf.ctx_data, &[5, 6, 7, 8]);
        // Outside the context window: memory.
        let pending = Outstanding {
            gva: 0x2000,
            ..pending
        };
        let r = event_reply(&pending, EventKind::PageFault, 1, &data, &mut ctx);
        assert_eq!(r.action, Action::Retry);
        assert_eq!(r.data, EventReplyData::PageFault(PageFaultReply::default()));
        // A short (16-byte) PF reply is zero-filled: no context.
        let r = event_reply(&pending, EventKind::PageFault, 0, &[], &mut ctx);
        assert_eq!(r.data, EventReplyData::PageFault(PageFaultReply::default()));
        let mut ctx = [0u8; PF_CTX_MAX];
        let new_val = 0x55u64.to_le_bytes();
        let r = event_reply(
            &Outstanding {
                seq: 2,
                id: events::MSR,
                gva: 0,
            },
            EventKind::Msr,
            2,
            &new_val,
            &mut ctx,
        );
        assert_eq!(r.action, Action::Crash);
        assert_eq!(r.data, EventReplyData::Msr { new_val: 0x55 });
    }
}
