//! Unit tests of the v4 codec: numbering, and one test per validation rule.

use zerocopy::IntoBytes;
use zerocopy::little_endian::{U32, U64};

use super::event_layout::EventReplyWire;
use super::*;
use crate::error::{EncodeError, ErrorCode, ProtocolError};
use crate::event::{EventCommon, EventMsrs, EventPayload};
use crate::event_reply::{EventReplyData, PageFaultReply};
use crate::kvm::{KvmRegs, KvmSregs};
use crate::list::List;
use crate::reply::Reply;
use crate::types::{Access, CpuMode, PageAccessEntry, VcpuSelector};

const EINVAL: i32 = -22;

fn encode_cmd(cmd: &Command<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; V4::command_len(cmd).unwrap()];
    V4::encode_command(1, cmd, &mut buf).unwrap();
    buf
}

fn decode_cmd(buf: &[u8]) -> Result<Command<'_>, ProtocolError> {
    let frame = V4::parse_frame(buf)?;
    V4::decode_command(frame.header.id, frame.payload)
}

fn cmd_err(buf: &[u8]) -> i32 {
    decode_cmd(buf).unwrap_err().code()
}

#[test]
fn command_ids_are_unique_fit_the_mask_and_round_trip() {
    for (i, a) in CommandKind::ALL.iter().enumerate() {
        let id = command_id(*a);
        assert!(
            (1..=32).contains(&id),
            "{a:?} id {id} does not fit the u32 mask"
        );
        assert_ne!(id, ids::EVENT);
        assert_ne!(id, ids::EVENT_REPLY);
        assert_eq!(command_kind(id), Some(*a));
        for b in &CommandKind::ALL[i + 1..] {
            assert_ne!(id, command_id(*b), "{a:?} and {b:?}");
        }
    }
    assert_eq!(command_id(CommandKind::GetVersion), 1);
    assert_eq!(command_id(CommandKind::GetXsave), 26);
    assert_eq!(command_id(CommandKind::ControlVe), 20);
    assert_eq!(command_id(CommandKind::ControlBreakpoint), 21);
}

#[test]
fn event_bits_are_unique_single_bits_and_round_trip() {
    for (i, a) in EventKind::ALL.iter().enumerate() {
        let bit = event_bit(*a);
        assert_eq!(bit.count_ones(), 1);
        assert_eq!(event_kind(bit), Ok(*a));
        for b in &EventKind::ALL[i + 1..] {
            assert_ne!(bit, event_bit(*b), "{a:?} and {b:?}");
        }
    }
    assert_eq!(event_bit(EventKind::PauseVcpu), 1 << 10);
    assert_eq!(event_bit(EventKind::Singlestep), 1 << 11);
    assert_eq!(event_bit(EventKind::Descriptor), 1 << 8);
    assert_eq!(event_bit(EventKind::CreateVcpu), 1 << 9);
}

#[test]
fn action_bits_are_unique() {
    let bits: Vec<u32> = Action::ALL.iter().map(|a| action_bit(*a)).collect();
    assert_eq!(bits, [1, 2, 4, 8]);
    for a in Action::ALL {
        assert_eq!(action_from_bits(action_bit(a)), Ok(a));
    }
}

#[test]
fn error_codes_are_negated_kvm_values() {
    let values: Vec<i32> = ErrorCode::ALL.iter().map(|c| c.wire()).collect();
    assert_eq!(values, [-1000, -14, -7, -1, -95, -11, -16, -22, -2, -12]);
    for c in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_wire(c.wire()), Some(c));
    }
    assert_eq!(ErrorCode::from_wire(22), None);
    assert_eq!(ErrorCode::from_wire(0), None);
}

#[test]
fn unknown_command_is_enosys_and_event_ids_are_not_commands() {
    let mut buf = encode_cmd(&Command::GetVersion);
    for id in [0u16, 4, 5, 8, 16, 22, 27, 0xffff] {
        buf[0..2].copy_from_slice(&id.to_le_bytes());
        assert_eq!(cmd_err(&buf), -1000, "id {id}");
    }
    buf[0..2].copy_from_slice(&ids::EVENT.to_le_bytes());
    assert_eq!(cmd_err(&buf), EINVAL);
}

#[test]
fn nonzero_padding_is_einval() {
    // PAUSE_VCPU {u16 vcpu; u16 padding[3]}: every padding byte.
    let good = encode_cmd(&Command::PauseVcpu { vcpu: 3 });
    assert_eq!(decode_cmd(&good), Ok(Command::PauseVcpu { vcpu: 3 }));
    for i in 10..16 {
        let mut bad = good.clone();
        bad[i] = 1;
        assert_eq!(
            decode_cmd(&bad),
            Err(ProtocolError::NonZeroPadding("vcpu request"))
        );
    }
    // CONTROL_BREAKPOINT padding1 and padding2.
    let good = encode_cmd(&Command::ControlBreakpoint {
        vcpus: VcpuSelector::All,
        enable: true,
        gva: 0x1000,
    });
    for i in [8 + 3, 8 + 4, 8 + 7] {
        let mut bad = good.clone();
        bad[i] = 0x80;
        assert_eq!(cmd_err(&bad), EINVAL, "byte {i}");
    }
}

#[test]
fn size_mismatches_are_einval() {
    let mut long = encode_cmd(&Command::PauseVcpu { vcpu: 0 });
    long.push(0);
    long[2] = 9;
    assert!(matches!(
        decode_cmd(&long),
        Err(ProtocolError::SizeMismatch { .. })
    ));
    let short = [ids::PAUSE_VCPU as u8, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert!(matches!(
        decode_cmd(&short),
        Err(ProtocolError::Truncated { .. })
    ));
    // GET_VERSION carries no payload.
    let with_payload = [1u8, 0, 1, 0, 0, 0, 0, 0, 0];
    assert_eq!(cmd_err(&with_payload), EINVAL);
}

#[test]
fn array_counts_that_overrun_are_einval() {
    let gpas = [1u64, 2, 3];
    let good = encode_cmd(&Command::GetPageAccess {
        vcpu: 0,
        view: 0,
        gpas: List::from_slice(&gpas),
    });
    let mut bad = good.clone();
    bad[8 + 2] = 4; // count 4, 3 present
    assert_eq!(
        decode_cmd(&bad),
        Err(ProtocolError::CountOverrun {
            what: "gpa",
            count: 4
        })
    );
    let mut fewer = good.clone();
    fewer[8 + 2] = 2; // count 2, 3 present: trailing bytes
    assert!(matches!(
        decode_cmd(&fewer),
        Err(ProtocolError::SizeMismatch { .. })
    ));
    // WRITE_PHYSICAL size larger than the data.
    let mut w = encode_cmd(&Command::WritePhysical {
        gpa: 0,
        data: &[1, 2, 3],
    });
    w[8 + 8] = 4;
    assert_eq!(cmd_err(&w), EINVAL);
}

#[test]
fn get_registers_count_too_big_is_e2big() {
    let msrs = vec![0u32; super::command_codec::MAX_GET_REGISTERS_MSRS + 1];
    let cmd = Command::GetRegisters {
        vcpu: 0,
        msrs: List::from_slice(&msrs),
    };
    assert!(matches!(
        V4::command_len(&cmd),
        Err(EncodeError::Invalid(ProtocolError::CountTooBig { .. }))
    ));
    // Build it by hand.
    let n = msrs.len();
    let mut buf = vec![0u8; 16 + 4 * n];
    buf[0..2].copy_from_slice(&ids::GET_REGISTERS.to_le_bytes());
    buf[2..4].copy_from_slice(&((8 + 4 * n) as u16).to_le_bytes());
    buf[10..12].copy_from_slice(&(n as u16).to_le_bytes());
    assert_eq!(cmd_err(&buf), -7);
    let ok = vec![0u32; super::command_codec::MAX_GET_REGISTERS_MSRS];
    let cmd = Command::GetRegisters {
        vcpu: 0,
        msrs: List::from_slice(&ok),
    };
    assert_eq!(decode_cmd(&encode_cmd(&cmd)), Ok(cmd));
}

#[test]
fn control_cr_accepts_only_cr0_cr3_cr4() {
    let good = encode_cmd(&Command::ControlCr {
        vcpu: 1,
        enable: true,
        cr: 3,
    });
    for cr in 0u32..9 {
        let mut buf = good.clone();
        buf[12..16].copy_from_slice(&cr.to_le_bytes());
        assert_eq!(decode_cmd(&buf).is_ok(), [0, 3, 4].contains(&cr), "cr{cr}");
    }
    let bad = Command::ControlCr {
        vcpu: 1,
        enable: true,
        cr: 8,
    };
    assert!(matches!(
        V4::command_len(&bad),
        Err(EncodeError::Invalid(_))
    ));
    let mut enable2 = good;
    enable2[10] = 2;
    assert_eq!(cmd_err(&enable2), EINVAL);
}

#[test]
fn control_msr_accepts_only_bitmap_ranges() {
    let good = encode_cmd(&Command::ControlMsr {
        vcpu: 0,
        enable: false,
        msr: 0x10,
    });
    for (msr, ok) in [
        (0u32, true),
        (0x1fff, true),
        (0x2000, false),
        (0x4000_0000, false),
        (0xc000_0080, true),
        (0xc000_1fff, true),
        (0xc000_2000, false),
        (u32::MAX, false),
    ] {
        let mut buf = good.clone();
        buf[12..16].copy_from_slice(&msr.to_le_bytes());
        assert_eq!(decode_cmd(&buf).is_ok(), ok, "msr {msr:#x}");
    }
}

#[test]
fn physical_access_must_stay_in_one_page() {
    let read = |gpa: u64, size: u64| {
        let mut buf = vec![0u8; 24];
        buf[0..2].copy_from_slice(&ids::READ_PHYSICAL.to_le_bytes());
        buf[2] = 16;
        buf[8..16].copy_from_slice(&gpa.to_le_bytes());
        buf[16..24].copy_from_slice(&size.to_le_bytes());
        decode_cmd(&buf).map(|_| ()).map_err(|e| e.code())
    };
    assert_eq!(read(0x1000, 4096), Ok(()));
    assert_eq!(read(0x1ff0, 16), Ok(()));
    assert_eq!(read(0x1000, 0), Err(EINVAL));
    assert_eq!(read(0x1ff0, 17), Err(EINVAL));
    assert_eq!(read(0, u64::MAX), Err(EINVAL));
    let data = [0u8; 2];
    let cross = Command::WritePhysical {
        gpa: 0xfff,
        data: &data,
    };
    assert!(V4::command_len(&cross).is_err());
    let empty = Command::WritePhysical { gpa: 0, data: &[] };
    assert!(V4::command_len(&empty).is_err());
}

#[test]
fn access_bytes_with_unknown_bits_are_einval() {
    let entries = [PageAccessEntry {
        gpa: 0x1000,
        access: Access::R,
    }];
    let good = encode_cmd(&Command::SetPageAccess {
        vcpu: 0,
        view: 0,
        entries: List::from_slice(&entries),
    });
    assert!(decode_cmd(&good).is_ok());
    let mut bad = good.clone();
    bad[16 + 8] = 0x8;
    assert_eq!(
        decode_cmd(&bad),
        Err(ProtocolError::InvalidValue {
            field: "access",
            value: 8
        })
    );
    let mut pad = good;
    pad[16 + 15] = 1;
    assert_eq!(cmd_err(&pad), EINVAL);
    // GET_PAGE_ACCESS reply.
    let reply = [0u8, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0x10];
    assert_eq!(
        V4::decode_reply(CommandKind::GetPageAccess, &reply),
        Err(ProtocolError::InvalidValue {
            field: "access",
            value: 0x10
        })
    );
    assert!(V4::decode_reply(CommandKind::GetPageAccess, &reply[..10]).is_ok());
}

#[test]
fn control_events_rejects_unknown_bits() {
    let good = encode_cmd(&Command::ControlEvents {
        vcpu: 0,
        events: EventSet::ALL,
    });
    assert!(decode_cmd(&good).is_ok());
    for bit in [0u32, 12, 31] {
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&(1u32 << bit).to_le_bytes());
        assert_eq!(cmd_err(&bad), EINVAL, "bit {bit}");
    }
}

#[test]
fn inject_exception_fields() {
    let good = encode_cmd(&Command::InjectException {
        vcpu: 0,
        vector: 14,
        error_code: None,
        address: 0xdead_0000,
    });
    assert!(decode_cmd(&good).is_ok());
    let mut vec32 = good.clone();
    vec32[10] = 32;
    assert_eq!(cmd_err(&vec32), EINVAL);
    let mut has2 = good.clone();
    has2[11] = 2;
    assert_eq!(cmd_err(&has2), EINVAL);
    let mut stray_code = good;
    stray_code[12] = 1;
    assert_eq!(cmd_err(&stray_code), EINVAL);
}

#[test]
fn get_guest_info_vcpu_must_be_zero() {
    let mut buf = encode_cmd(&Command::GetGuestInfo);
    assert!(decode_cmd(&buf).is_ok());
    buf[8] = 1;
    assert_eq!(cmd_err(&buf), EINVAL);
}

#[test]
fn control_breakpoint_layout_and_selector() {
    let buf = encode_cmd(&Command::ControlBreakpoint {
        vcpus: VcpuSelector::All,
        enable: true,
        gva: 0x40_1000,
    });
    assert_eq!(buf.len(), 8 + 16);
    assert_eq!(&buf[8..10], &[0xff, 0xff]);
    assert_eq!(buf[10], 1);
    assert_eq!(&buf[16..24], &0x40_1000u64.to_le_bytes());
    let one = Command::ControlBreakpoint {
        vcpus: VcpuSelector::One(0xffff),
        enable: true,
        gva: 0,
    };
    assert!(V4::command_len(&one).is_err());
}

fn sample_event(payload: EventPayload) -> Event {
    Event {
        common: EventCommon {
            vcpu: 2,
            mode: CpuMode::Bits64,
            regs: KvmRegs {
                rip: U64::new(0x1234),
                ..Default::default()
            },
            sregs: KvmSregs {
                cr3: U64::new(0x9000),
                ..Default::default()
            },
            msrs: EventMsrs {
                lstar: 0xffff_8000_0000_0000,
                pat: 0x0007_0406_0007_0406,
                ..Default::default()
            },
        },
        payload,
    }
}

fn encode_event(ev: &Event) -> Vec<u8> {
    let mut buf = vec![0u8; V4::event_len(ev)];
    V4::encode_event(5, ev, &mut buf).unwrap();
    buf
}

#[test]
fn event_layout_matches_the_reference() {
    let buf = encode_event(&sample_event(EventPayload::Breakpoint { gpa: 0xabc }));
    assert_eq!(buf.len(), 8 + 528 + 8);
    assert_eq!(&buf[0..2], &ids::EVENT.to_le_bytes());
    let p = &buf[8..];
    assert_eq!(&p[0..4], &(1u32 << 4).to_le_bytes());
    assert_eq!(&p[4..6], &2u16.to_le_bytes());
    assert_eq!(p[6], 8);
    assert_eq!(&p[136..144], &0x1234u64.to_le_bytes()); // rip @ 8 + 128
    assert_eq!(&p[152 + 240..152 + 248], &0x9000u64.to_le_bytes()); // cr3
    assert_eq!(&p[504..512], &0xffff_8000_0000_0000u64.to_le_bytes()); // lstar
    assert_eq!(&p[520..528], &0x0007_0406_0007_0406u64.to_le_bytes()); // pat
    assert_eq!(&p[528..536], &0xabcu64.to_le_bytes());
}

#[test]
fn event_validation() {
    let good = encode_event(&sample_event(EventPayload::Xsetbv));
    let decode = |b: &[u8]| V4::decode_event(&b[8..]).map_err(|e| e.code());
    assert!(decode(&good).is_ok());
    let set_event = |bits: u32| {
        let mut b = good.clone();
        b[8..12].copy_from_slice(&bits.to_le_bytes());
        b
    };
    assert_eq!(decode(&set_event(0)), Err(-1000));
    assert_eq!(decode(&set_event(1 << 20)), Err(-1000));
    assert_eq!(decode(&set_event(1 << 3 | 1 << 10)), Err(EINVAL));
    let mut mode3 = good.clone();
    mode3[8 + 6] = 3;
    assert_eq!(decode(&mode3), Err(EINVAL));
    let mut pad = good.clone();
    pad[8 + 7] = 1;
    assert_eq!(decode(&pad), Err(EINVAL));
    // XSETBV has no payload; a CR event without its payload is truncated.
    assert_eq!(decode(&set_event(1 << 1)), Err(EINVAL));
    let cr = encode_event(&sample_event(EventPayload::Cr {
        cr: 4,
        old_value: 1,
        new_value: 2,
    }));
    let mut cr5 = cr.clone();
    cr5[8 + 528] = 5;
    assert_eq!(decode(&cr5), Err(EINVAL));
    let desc = encode_event(&sample_event(EventPayload::Descriptor {
        arch: [1, 2],
        descriptor: crate::event::DescriptorTable::Gdtr,
        write: true,
    }));
    let mut desc0 = desc.clone();
    desc0[8 + 528 + 16] = 0;
    assert_eq!(decode(&desc0), Err(EINVAL));
}

fn reply_payload(action: u32, data: &[u8]) -> Vec<u8> {
    let mut p = EventReplyWire {
        action: action.into(),
        padding: U32::ZERO,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(data);
    p
}

#[test]
fn event_reply_actions() {
    let val = 7u64.to_le_bytes();
    let payload = reply_payload(actions::CONTINUE, &val);
    let ok = V4::decode_event_reply(EventKind::Cr, &payload);
    assert_eq!(
        ok,
        Ok(EventReply {
            event: EventKind::Cr,
            action: Action::Continue,
            data: EventReplyData::Cr { new_val: 7 }
        })
    );
    let err = |kind, action, data: &[u8]| {
        V4::decode_event_reply(kind, &reply_payload(action, data))
            .map(|_| ())
            .map_err(|e| e.code())
    };
    assert_eq!(err(EventKind::Cr, 0, &val), Err(EINVAL)); // no action bit
    assert_eq!(err(EventKind::Cr, 3, &val), Err(EINVAL)); // two bits
    assert_eq!(err(EventKind::Cr, 1 << 4, &val), Err(EINVAL)); // unknown bit
    assert_eq!(err(EventKind::Cr, actions::RETRY, &val), Err(EINVAL)); // not accepted
    assert_eq!(err(EventKind::Cr, actions::CONTINUE, &[]), Err(EINVAL)); // missing new_val
    assert_eq!(err(EventKind::Trap, actions::CONTINUE, &val), Err(EINVAL)); // extra bytes
    assert_eq!(err(EventKind::Breakpoint, actions::SKIP, &[]), Ok(()));
    let mut padded = reply_payload(actions::CRASH, &[]);
    padded[5] = 1;
    assert_eq!(
        V4::decode_event_reply(EventKind::Trap, &padded)
            .unwrap_err()
            .code(),
        EINVAL
    );
}

#[test]
fn page_fault_reply_layout_and_limits() {
    let ctx = [0xaau8; 5];
    let reply = EventReply {
        event: EventKind::PageFault,
        action: Action::Continue,
        data: EventReplyData::PageFault(PageFaultReply {
            trap_access: true,
            ctx_data: &ctx,
        }),
    };
    let mut buf = vec![0u8; V4::event_reply_len(&reply).unwrap()];
    V4::encode_event_reply(9, &reply, &mut buf).unwrap();
    assert_eq!(buf.len(), 8 + 8 + 264);
    let p = &buf[16..];
    assert_eq!(p[0], 1);
    assert_eq!(&p[4..8], &5u32.to_le_bytes());
    assert_eq!(&p[8..13], &ctx);
    assert_eq!(
        V4::decode_event_reply(EventKind::PageFault, &buf[8..]),
        Ok(reply)
    );
    let mut big = buf.clone();
    big[16 + 4..16 + 8].copy_from_slice(&257u32.to_le_bytes());
    assert_eq!(
        V4::decode_event_reply(EventKind::PageFault, &big[8..])
            .unwrap_err()
            .code(),
        EINVAL
    );
    let mut trap2 = buf;
    trap2[16] = 2;
    assert_eq!(
        V4::decode_event_reply(EventKind::PageFault, &trap2[8..])
            .unwrap_err()
            .code(),
        EINVAL
    );
}

#[test]
fn reply_error_codes_and_mismatches() {
    let mut buf = [0u8; 16];
    let n = V4::encode_reply(
        CommandKind::ReadPhysical,
        3,
        &Err(ErrorCode::Fault),
        &mut buf,
    )
    .unwrap();
    assert_eq!(n, 16);
    assert_eq!(&buf[8..12], &(-14i32).to_le_bytes());
    assert_eq!(
        V4::decode_reply(CommandKind::ReadPhysical, &buf[8..16]),
        Ok(Err(ErrorCode::Fault))
    );
    // An error reply carries no data; an unknown code is rejected.
    let mut with_data = buf.to_vec();
    with_data.push(0);
    assert!(V4::decode_reply(CommandKind::ReadPhysical, &with_data[8..]).is_err());
    let unknown = [0xfbu8, 0xff, 0xff, 0xff, 0, 0, 0, 0]; // -5
    assert!(V4::decode_reply(CommandKind::PauseVcpu, &unknown).is_err());
    // Reply shape must match the command.
    assert_eq!(
        V4::reply_len(CommandKind::PauseVcpu, &Ok(Reply::Physical(&[1]))),
        Err(EncodeError::ReplyMismatch(CommandKind::PauseVcpu))
    );
    assert_eq!(
        V4::reply_len(CommandKind::GetVersion, &Ok(Reply::Empty)),
        Err(EncodeError::ReplyMismatch(CommandKind::GetVersion))
    );
    // READ_PHYSICAL success with no data, XSAVE with a partial u32.
    let zero = [0u8; 8];
    assert!(V4::decode_reply(CommandKind::ReadPhysical, &zero).is_err());
    let xsave = [0u8; 8 + 6];
    assert!(V4::decode_reply(CommandKind::GetXsave, &xsave).is_err());
}

#[test]
fn get_registers_reply_layout() {
    let mut payload = vec![0u8; 8 + 472 + 16];
    payload[8..12].copy_from_slice(&4u32.to_le_bytes()); // mode
    payload[8 + 8 + 128..8 + 8 + 136].copy_from_slice(&0x777u64.to_le_bytes()); // rip
    payload[8 + 464..8 + 468].copy_from_slice(&1u32.to_le_bytes()); // nmsrs
    payload[8 + 472..8 + 476].copy_from_slice(&0xc000_0080u32.to_le_bytes());
    payload[8 + 480..8 + 488].copy_from_slice(&0xd01u64.to_le_bytes());
    let Ok(Ok(Reply::Registers(r))) = V4::decode_reply(CommandKind::GetRegisters, &payload) else {
        panic!("registers reply did not decode")
    };
    assert_eq!(r.mode, CpuMode::Bits32);
    assert_eq!(r.regs.rip.get(), 0x777);
    assert_eq!(
        r.msrs.get(0),
        Some(crate::types::MsrEntry {
            index: 0xc000_0080,
            data: 0xd01
        })
    );
    let mut reserved = payload.clone();
    reserved[8 + 476] = 1;
    assert!(V4::decode_reply(CommandKind::GetRegisters, &reserved).is_err());
    let mut count2 = payload;
    count2[8 + 464] = 2;
    assert!(V4::decode_reply(CommandKind::GetRegisters, &count2).is_err());
}

#[test]
fn encode_reports_small_buffers() {
    let mut buf = [0u8; 15];
    assert_eq!(
        V4::encode_command(0, &Command::PauseVcpu { vcpu: 0 }, &mut buf),
        Err(EncodeError::BufferTooSmall {
            needed: 16,
            available: 15
        })
    );
    assert_eq!(
        V4::encode_command(0, &Command::PauseVcpu { vcpu: 0 }, &mut [0u8; 64]),
        Ok(16)
    );
}

#[test]
fn tool_and_host_messages_are_classified() {
    let buf = encode_cmd(&Command::GetVersion);
    let frame = V4::parse_frame(&buf).unwrap();
    assert_eq!(
        V4::decode_tool_message(frame),
        Ok(crate::wire::ToolMessage::Command {
            seq: 1,
            command: Command::GetVersion
        })
    );
    assert_eq!(
        V4::decode_host_message(frame),
        Ok(crate::wire::HostMessage::Reply {
            seq: 1,
            command: CommandKind::GetVersion,
            payload: &[]
        })
    );
    let ev = encode_event(&sample_event(EventPayload::Hypercall));
    let frame = V4::parse_frame(&ev).unwrap();
    assert_eq!(V4::decode_tool_message(frame).unwrap_err().code(), EINVAL);
    let unknown = [99u8, 0, 0, 0, 0, 0, 0, 0];
    let frame = V4::parse_frame(&unknown).unwrap();
    assert_eq!(V4::decode_host_message(frame).unwrap_err().code(), -1000);
    assert_eq!(V4::decode_tool_message(frame).unwrap_err().code(), -1000);
}

#[test]
fn unaligned_views_work_at_any_offset() {
    let mut buf = [0u8; 3 + 8 + 16];
    let cmd = Command::GetCpuid {
        vcpu: 1,
        function: 0xd,
        index: 1,
    };
    let n = V4::encode_command(77, &cmd, &mut buf[3..]).unwrap();
    assert_eq!(decode_cmd(&buf[3..3 + n]), Ok(cmd));
}

#[test]
fn error_reply_under_an_unknown_id() {
    let req = [99u8, 0, 0, 0, 5, 0, 0, 0];
    let frame = V4::parse_frame(&req).unwrap();
    let err = V4::decode_tool_message(frame).unwrap_err();
    let mut buf = [0u8; 16];
    let n = V4::encode_error_reply(
        frame.header.id,
        frame.header.seq,
        err.error_code(),
        &mut buf,
    );
    assert_eq!(n, Ok(16));
    assert_eq!(
        buf,
        [99, 0, 8, 0, 5, 0, 0, 0, 0x18, 0xfc, 0xff, 0xff, 0, 0, 0, 0]
    );
    // Under a known ID it decodes as that command's error reply.
    V4::encode_error_reply(ids::PAUSE_VCPU, 6, ErrorCode::Busy, &mut buf).unwrap();
    assert_eq!(
        V4::decode_reply(CommandKind::PauseVcpu, &buf[8..]),
        Ok(Err(ErrorCode::Busy))
    );
}

#[test]
fn names_are_unique_and_round_trip() {
    for k in CommandKind::ALL {
        assert_eq!(CommandKind::from_name(k.name()), Some(k));
        assert_eq!(
            CommandKind::ALL
                .iter()
                .filter(|o| o.name() == k.name())
                .count(),
            1
        );
    }
    for k in EventKind::ALL {
        assert_eq!(EventKind::from_name(k.name()), Some(k));
        assert_eq!(
            EventKind::ALL
                .iter()
                .filter(|o| o.name() == k.name())
                .count(),
            1
        );
    }
    assert_eq!(CommandKind::from_name("GET_REGISTERS"), None);
    assert_eq!(EventKind::from_name("pf"), None);
}
