//! Property tests: every message kind survives encode → frame parse → decode unchanged.

use proptest::prelude::*;
use zerocopy::FromBytes;

use super::V4;
use crate::command::{Command, CommandKind};
use crate::error::ErrorCode;
use crate::event::{
    DescriptorTable, Event, EventCommon, EventKind, EventMsrs, EventPayload, EventSet,
};
use crate::event_reply::{Action, EventReply, EventReplyData, PageFaultReply, accepted_actions};
use crate::kvm::{KvmRegs, KvmSregs};
use crate::list::List;
use crate::masks::AllowedMasks;
use crate::reply::{CommandResult, CpuidLeaf, GuestInfo, Registers, Reply, VersionInfo};
use crate::types::{Access, CpuMode, MapToken, MsrEntry, PageAccessEntry, VcpuSelector};
use crate::wire::{HostMessage, ToolMessage, WireProfile};

fn regs() -> impl Strategy<Value = KvmRegs> {
    prop::collection::vec(any::<u8>(), 144).prop_map(|b| KvmRegs::read_from_bytes(&b).unwrap())
}

fn sregs() -> impl Strategy<Value = KvmSregs> {
    prop::collection::vec(any::<u8>(), 312).prop_map(|b| KvmSregs::read_from_bytes(&b).unwrap())
}

fn access() -> impl Strategy<Value = Access> {
    (0u8..8).prop_map(|b| Access::from_bits(b).unwrap())
}

fn mode() -> impl Strategy<Value = CpuMode> {
    prop_oneof![
        Just(CpuMode::Bits16),
        Just(CpuMode::Bits32),
        Just(CpuMode::Bits64)
    ]
}

/// A guest-physical range of 1..=4096 bytes within one page.
fn page_range() -> impl Strategy<Value = (u64, u64)> {
    (any::<u64>(), 1u64..=4096).prop_map(|(g, size)| {
        let off = (g & 0xfff) % (4096 - size + 1);
        ((g & !0xfff) | off, size)
    })
}

fn msr() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..=0x1fff, 0xc000_0000u32..=0xc000_1fff]
}

fn cr() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(3), Just(4)]
}

/// A command with owned arrays.
#[derive(Clone, Debug)]
enum OwnedCommand {
    Plain(Command<'static>),
    GetRegisters(u16, Vec<u32>),
    GetPageAccess(u16, u16, Vec<u64>),
    SetPageAccess(u16, u16, Vec<PageAccessEntry>),
    WritePhysical(u64, Vec<u8>),
    ControlVe(u16, bool, Vec<u64>),
}

impl OwnedCommand {
    fn command(&self) -> Command<'_> {
        match self {
            Self::Plain(c) => *c,
            Self::GetRegisters(vcpu, m) => Command::GetRegisters {
                vcpu: *vcpu,
                msrs: List::from_slice(m),
            },
            Self::GetPageAccess(vcpu, view, g) => Command::GetPageAccess {
                vcpu: *vcpu,
                view: *view,
                gpas: List::from_slice(g),
            },
            Self::SetPageAccess(vcpu, view, e) => Command::SetPageAccess {
                vcpu: *vcpu,
                view: *view,
                entries: List::from_slice(e),
            },
            Self::WritePhysical(gpa, data) => Command::WritePhysical { gpa: *gpa, data },
            Self::ControlVe(vcpu, enable, g) => Command::ControlVe {
                vcpu: *vcpu,
                enable: *enable,
                gpas: List::from_slice(g),
            },
        }
    }
}

fn command() -> impl Strategy<Value = OwnedCommand> {
    use OwnedCommand::Plain;
    let v = any::<u16>;
    prop_oneof![
        Just(Plain(Command::GetVersion)),
        Just(Plain(Command::GetGuestInfo)),
        Just(Plain(Command::GetMapToken)),
        v().prop_map(|vcpu| Plain(Command::PauseVcpu { vcpu })),
        v().prop_map(|vcpu| Plain(Command::GetXsave { vcpu })),
        (v(), prop::collection::vec(any::<u32>(), 0..64))
            .prop_map(|(vcpu, m)| OwnedCommand::GetRegisters(vcpu, m)),
        (v(), regs()).prop_map(|(vcpu, regs)| Plain(Command::SetRegisters { vcpu, regs })),
        (v(), any::<u32>(), any::<u32>()).prop_map(|(vcpu, function, index)| Plain(
            Command::GetCpuid {
                vcpu,
                function,
                index
            }
        )),
        (v(), v(), prop::collection::vec(any::<u64>(), 0..64))
            .prop_map(|(vcpu, view, g)| OwnedCommand::GetPageAccess(vcpu, view, g)),
        (
            v(),
            v(),
            prop::collection::vec(
                (any::<u64>(), access()).prop_map(|(gpa, access)| PageAccessEntry { gpa, access }),
                0..64
            )
        )
            .prop_map(|(vcpu, view, e)| OwnedCommand::SetPageAccess(vcpu, view, e)),
        (v(), 0u8..32, any::<Option<u16>>(), any::<u64>()).prop_map(
            |(vcpu, vector, error_code, address)| Plain(Command::InjectException {
                vcpu,
                vector,
                error_code,
                address
            })
        ),
        page_range().prop_map(|(gpa, size)| Plain(Command::ReadPhysical { gpa, size })),
        page_range().prop_flat_map(|(gpa, size)| {
            prop::collection::vec(any::<u8>(), size as usize)
                .prop_map(move |data| OwnedCommand::WritePhysical(gpa, data))
        }),
        (v(), any::<u32>()).prop_map(|(vcpu, bits)| Plain(Command::ControlEvents {
            vcpu,
            events: EventSet::from_bits(bits & EventSet::ALL.bits())
        })),
        (v(), any::<bool>(), cr()).prop_map(|(vcpu, enable, cr)| Plain(Command::ControlCr {
            vcpu,
            enable,
            cr
        })),
        (v(), any::<bool>(), msr()).prop_map(|(vcpu, enable, msr)| Plain(Command::ControlMsr {
            vcpu,
            enable,
            msr
        })),
        (
            v(),
            any::<bool>(),
            prop::collection::vec(any::<u64>(), 0..64)
        )
            .prop_map(|(vcpu, enable, g)| OwnedCommand::ControlVe(vcpu, enable, g)),
        (
            prop_oneof![
                Just(VcpuSelector::All),
                (0u16..u16::MAX).prop_map(VcpuSelector::One)
            ],
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(vcpus, enable, gva)| Plain(Command::ControlBreakpoint {
                vcpus,
                enable,
                gva
            })),
    ]
}

/// A command result with owned data, and the command kind it answers.
#[derive(Clone, Debug)]
enum OwnedReply {
    Plain(Reply<'static>),
    Registers(CpuMode, KvmRegs, KvmSregs, Vec<MsrEntry>),
    PageAccess(Vec<Access>),
    Physical(Vec<u8>),
    Xsave(Vec<u8>),
}

impl OwnedReply {
    fn reply(&self) -> Reply<'_> {
        match self {
            Self::Plain(r) => *r,
            Self::Registers(mode, regs, sregs, msrs) => Reply::Registers(Registers {
                mode: *mode,
                regs: *regs,
                sregs: *sregs,
                msrs: List::from_slice(msrs),
            }),
            Self::PageAccess(a) => Reply::PageAccess(List::from_slice(a)),
            Self::Physical(d) => Reply::Physical(d),
            Self::Xsave(d) => Reply::Xsave(d),
        }
    }
}

fn reply() -> impl Strategy<Value = (CommandKind, Result<OwnedReply, ErrorCode>)> {
    use OwnedReply::Plain;
    let ok = |k: CommandKind, r: OwnedReply| (k, Ok(r));
    prop_oneof![
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(move |(version, commands, events)| ok(
            CommandKind::GetVersion,
            Plain(Reply::Version(VersionInfo {
                version,
                allowed: AllowedMasks { commands, events }
            }))
        )),
        (any::<u16>(), any::<u64>()).prop_map(move |(vcpu_count, tsc_speed)| ok(
            CommandKind::GetGuestInfo,
            Plain(Reply::GuestInfo(GuestInfo {
                vcpu_count,
                tsc_speed
            }))
        )),
        (
            mode(),
            regs(),
            sregs(),
            prop::collection::vec(
                (any::<u32>(), any::<u64>()).prop_map(|(index, data)| MsrEntry { index, data }),
                0..32
            )
        )
            .prop_map(move |(m, r, s, msrs)| ok(
                CommandKind::GetRegisters,
                OwnedReply::Registers(m, r, s, msrs)
            )),
        any::<[u32; 4]>().prop_map(move |[eax, ebx, ecx, edx]| ok(
            CommandKind::GetCpuid,
            Plain(Reply::Cpuid(CpuidLeaf { eax, ebx, ecx, edx }))
        )),
        prop::collection::vec(access(), 0..64)
            .prop_map(move |a| ok(CommandKind::GetPageAccess, OwnedReply::PageAccess(a))),
        prop::collection::vec(any::<u8>(), 1..=4096)
            .prop_map(move |d| ok(CommandKind::ReadPhysical, OwnedReply::Physical(d))),
        prop::collection::vec(any::<u8>(), 0..1024).prop_map(move |mut d| {
            d.truncate(d.len() / 4 * 4);
            ok(CommandKind::GetXsave, OwnedReply::Xsave(d))
        }),
        any::<[u8; 32]>().prop_map(move |t| ok(
            CommandKind::GetMapToken,
            Plain(Reply::MapToken(MapToken(t)))
        )),
        prop::sample::select(
            CommandKind::ALL
                .iter()
                .copied()
                .filter(|k| !k.has_reply_data())
                .collect::<Vec<_>>()
        )
        .prop_map(move |k| ok(k, Plain(Reply::Empty))),
        (
            prop::sample::select(CommandKind::ALL.to_vec()),
            prop::sample::select(ErrorCode::ALL.to_vec())
        )
            .prop_map(|(k, e)| (k, Err(e))),
    ]
}

fn event_payload() -> impl Strategy<Value = EventPayload> {
    prop_oneof![
        Just(EventPayload::PauseVcpu),
        Just(EventPayload::Xsetbv),
        Just(EventPayload::Hypercall),
        Just(EventPayload::CreateVcpu),
        Just(EventPayload::Singlestep),
        (cr(), any::<u64>(), any::<u64>()).prop_map(|(cr, old_value, new_value)| {
            EventPayload::Cr {
                cr: cr as u16,
                old_value,
                new_value,
            }
        }),
        (msr(), any::<u64>(), any::<u64>()).prop_map(|(msr, old_value, new_value)| {
            EventPayload::Msr {
                msr,
                old_value,
                new_value,
            }
        }),
        any::<u64>().prop_map(|gpa| EventPayload::Breakpoint { gpa }),
        (any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(gva, gpa, mode)| EventPayload::PageFault { gva, gpa, mode }),
        (0u32..256, any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
            |(vector, kind, error_code, cr2)| EventPayload::Trap {
                vector,
                kind,
                error_code,
                cr2
            }
        ),
        (
            any::<[u64; 2]>(),
            prop::sample::select(vec![
                DescriptorTable::Idtr,
                DescriptorTable::Gdtr,
                DescriptorTable::Ldtr,
                DescriptorTable::Tr
            ]),
            any::<bool>()
        )
            .prop_map(|(arch, descriptor, write)| EventPayload::Descriptor {
                arch,
                descriptor,
                write
            }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        any::<u16>(),
        mode(),
        regs(),
        sregs(),
        any::<[u64; 8]>(),
        event_payload(),
    )
        .prop_map(|(vcpu, mode, regs, sregs, m, payload)| Event {
            common: EventCommon {
                vcpu,
                mode,
                regs,
                sregs,
                msrs: EventMsrs {
                    sysenter_cs: m[0],
                    sysenter_esp: m[1],
                    sysenter_eip: m[2],
                    efer: m[3],
                    star: m[4],
                    lstar: m[5],
                    cstar: m[6],
                    pat: m[7],
                },
            },
            payload,
        })
}

/// An event kind, an action it accepts, and reply data of the right shape (PF context owned).
fn event_reply() -> impl Strategy<Value = (EventKind, Action, u64, bool, Vec<u8>)> {
    (
        prop::sample::select(EventKind::ALL.to_vec()),
        prop::sample::select(Action::ALL.to_vec()),
        any::<u64>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..=256),
    )
        .prop_filter("action accepted", |(k, a, ..)| {
            accepted_actions(*k).contains(*a)
        })
}

fn build_reply<'a>(
    kind: EventKind,
    action: Action,
    val: u64,
    trap: bool,
    ctx: &'a [u8],
) -> EventReply<'a> {
    let data = match kind {
        EventKind::Cr => EventReplyData::Cr { new_val: val },
        EventKind::Msr => EventReplyData::Msr { new_val: val },
        EventKind::PageFault => EventReplyData::PageFault(PageFaultReply {
            trap_access: trap,
            ctx_data: ctx,
        }),
        _ => EventReplyData::None,
    };
    EventReply {
        event: kind,
        action,
        data,
    }
}

proptest! {
    #[test]
    fn commands_round_trip(owned in command(), seq in any::<u32>()) {
        let cmd = owned.command();
        let len = V4::command_len(&cmd).unwrap();
        let mut buf = vec![0u8; len];
        prop_assert_eq!(V4::encode_command(seq, &cmd, &mut buf), Ok(len));
        let frame = V4::parse_frame(&buf).unwrap();
        prop_assert_eq!(frame.header.id, super::command_id(cmd.kind()));
        let msg = V4::decode_tool_message(frame).unwrap();
        prop_assert_eq!(msg, ToolMessage::Command { seq, command: cmd });
        // One byte short is reported, never written past.
        prop_assert!(V4::encode_command(seq, &cmd, &mut buf[..len - 1]).is_err());
    }

    #[test]
    fn replies_round_trip((kind, owned) in reply(), seq in any::<u32>()) {
        let result: CommandResult<'_> = owned.as_ref().map(OwnedReply::reply).map_err(|e| *e);
        let len = V4::reply_len(kind, &result).unwrap();
        let mut buf = vec![0u8; len];
        prop_assert_eq!(V4::encode_reply(kind, seq, &result, &mut buf), Ok(len));
        let frame = V4::parse_frame(&buf).unwrap();
        let HostMessage::Reply { seq: got_seq, command, payload } =
            V4::decode_host_message(frame).unwrap() else { panic!("not a reply") };
        prop_assert_eq!((got_seq, command), (seq, kind));
        prop_assert_eq!(V4::decode_reply(kind, payload).unwrap(), result);
    }

    #[test]
    fn events_round_trip(event in event(), seq in any::<u32>()) {
        let len = V4::event_len(&event);
        let mut buf = vec![0u8; len];
        prop_assert_eq!(V4::encode_event(seq, &event, &mut buf), Ok(len));
        let frame = V4::parse_frame(&buf).unwrap();
        prop_assert_eq!(V4::decode_host_message(frame).unwrap(), HostMessage::Event { seq, event });
    }

    #[test]
    fn event_replies_round_trip((kind, action, val, trap, ctx) in event_reply(), seq in any::<u32>()) {
        let reply = build_reply(kind, action, val, trap, &ctx);
        let len = V4::event_reply_len(&reply).unwrap();
        let mut buf = vec![0u8; len];
        prop_assert_eq!(V4::encode_event_reply(seq, &reply, &mut buf), Ok(len));
        let frame = V4::parse_frame(&buf).unwrap();
        let ToolMessage::EventReply { seq: got_seq, payload } =
            V4::decode_tool_message(frame).unwrap() else { panic!("not an event reply") };
        prop_assert_eq!(got_seq, seq);
        prop_assert_eq!(V4::decode_event_reply(kind, payload).unwrap(), reply);
    }

    #[test]
    fn arbitrary_payloads_never_panic_and_reencode(id in 0u16..40, payload in prop::collection::vec(any::<u8>(), 0..700)) {
        if let Ok(cmd) = V4::decode_command(id, &payload) {
            let mut buf = vec![0u8; V4::command_len(&cmd).unwrap()];
            V4::encode_command(0, &cmd, &mut buf).unwrap();
            prop_assert_eq!(&buf[8..], &payload[..]);
        }
        for kind in CommandKind::ALL {
            if let Ok(result) = V4::decode_reply(kind, &payload) {
                let mut buf = vec![0u8; V4::reply_len(kind, &result).unwrap()];
                V4::encode_reply(kind, 0, &result, &mut buf).unwrap();
                prop_assert_eq!(&buf[8..], &payload[..]);
            }
        }
        if let Ok(event) = V4::decode_event(&payload) {
            let mut buf = vec![0u8; V4::event_len(&event)];
            V4::encode_event(0, &event, &mut buf).unwrap();
            prop_assert_eq!(&buf[8..], &payload[..]);
        }
    }
}
