//! Property tests: no input panics the tool-message parser, and every request that encodes
//! and is valid decodes back to itself.

use proptest::prelude::*;
use zerocopy::FromBytes;
use zerocopy::little_endian::{U16, U32, U64};

use super::frame::*;
use super::layout::PageAccessEntry;
use super::{actions, events};
use crate::kvm::KvmRegs;

/// Owned arrays for the borrowing variants.
#[derive(Clone, Debug)]
enum Owned {
    Plain(Request<'static>),
    GetRegisters(u16, Vec<u32>),
    WritePhysical(u64, Vec<u8>),
    SetPageAccess(u16, Vec<(u64, u8)>),
    EventReply(u16, u8, u8, Vec<u8>),
}

fn vcpu_event() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 8, 11, 13])
}

fn page_range() -> impl Strategy<Value = (u64, u64)> {
    (any::<u64>(), 1u64..=4096).prop_map(|(g, size)| {
        let off = (g & 0xfff) % (4096 - size + 1);
        ((g & !0xfff) | off, size)
    })
}

fn msr() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..=0x1fff, 0xc000_0000u32..=0xc000_1fff]
}

fn plain() -> impl Strategy<Value = Request<'static>> {
    let v = any::<u16>;
    prop_oneof![
        Just(Request::GetVersion),
        any::<u16>().prop_map(Request::CheckCommand),
        any::<u16>().prop_map(Request::CheckEvent),
        Just(Request::GetGuestInfo),
        v().prop_map(|vcpu| Request::GetVcpuInfo { vcpu }),
        (v(), any::<bool>()).prop_map(|(vcpu, wait)| Request::PauseVcpu { vcpu, wait }),
        (prop::sample::select(vec![0u8, 9]), any::<bool>())
            .prop_map(|(event, enable)| Request::ControlVmEvents { event, enable }),
        (v(), vcpu_event(), any::<bool>()).prop_map(|(vcpu, event, enable)| {
            Request::ControlEvents {
                vcpu,
                event,
                enable,
            }
        }),
        (v(), prop::sample::select(vec![0u32, 3, 4]), any::<bool>())
            .prop_map(|(vcpu, cr, enable)| Request::ControlCr { vcpu, cr, enable }),
        (v(), msr(), any::<bool>()).prop_map(|(vcpu, msr, enable)| Request::ControlMsr {
            vcpu,
            msr,
            enable
        }),
        (v(), prop::collection::vec(any::<u8>(), 144)).prop_map(|(vcpu, b)| {
            Request::SetRegisters {
                vcpu,
                regs: KvmRegs::read_from_bytes(&b).unwrap(),
            }
        }),
        (v(), any::<u32>(), any::<u32>()).prop_map(|(vcpu, function, index)| {
            Request::GetCpuid {
                vcpu,
                function,
                index,
            }
        }),
        v().prop_map(|vcpu| Request::GetXsave { vcpu }),
        page_range().prop_map(|(gpa, size)| Request::ReadPhysical { gpa, size }),
        (v(), 0u8..32, any::<u32>(), any::<u64>()).prop_map(|(vcpu, nr, error_code, address)| {
            Request::InjectException {
                vcpu,
                nr,
                error_code,
                address,
            }
        }),
        Just(Request::GetMapToken),
        (v(), any::<u64>()).prop_map(|(vcpu, gpa)| Request::GetMtrrType { vcpu, gpa }),
        (any::<bool>(), any::<bool>(), 0u8..2)
            .prop_map(|(enable, now, flags)| Request::ControlCmdResponse { enable, now, flags }),
        Just(Request::GetMaxGfn),
        Just(Request::GetNextAvailableGfn),
        (v(), any::<u64>()).prop_map(|(vcpu, gva)| Request::TranslateGva { vcpu, gva }),
        (v(), any::<u8>()).prop_map(|(vcpu, xcr)| Request::GetXcr { vcpu, xcr }),
        (v(), any::<bool>()).prop_map(|(vcpu, enable)| Request::ControlSinglestep { vcpu, enable }),
    ]
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        4 => plain().prop_map(Owned::Plain),
        1 => (any::<u16>(), prop::collection::vec(any::<u32>(), 0..64))
            .prop_map(|(v, m)| Owned::GetRegisters(v, m)),
        1 => page_range().prop_flat_map(|(gpa, size)| {
            prop::collection::vec(any::<u8>(), size as usize)
                .prop_map(move |d| Owned::WritePhysical(gpa, d))
        }),
        1 => (any::<u16>(), prop::collection::vec((any::<u64>(), 0u8..16), 0..32))
            .prop_map(|(v, e)| Owned::SetPageAccess(v, e)),
        1 => (any::<u16>(), 0u8..3, any::<u8>(), prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(v, a, e, d)| Owned::EventReply(v, a, e, d)),
    ]
}

fn check_round_trip(req: &Request<'_>) -> Result<(), TestCaseError> {
    let mut buf = vec![0u8; super::MAX_MSG_SIZE];
    let n = encode_request(9, req, &mut buf).unwrap();
    let frame = parse_tool_frame(&buf[..n]).unwrap();
    prop_assert_eq!(frame.seq, 9);
    let back = decode_request(frame).unwrap();
    prop_assert_eq!(&back, req);
    // The same bytes split off a stream with trailing bytes.
    let mut stream = buf[..n].to_vec();
    stream.push(0xee);
    let (f, rest) = split_tool_frame(&stream).unwrap().unwrap();
    prop_assert_eq!(decode_request(f).unwrap(), back);
    prop_assert_eq!(rest, &[0xee][..]);
    Ok(())
}

proptest! {
    #[test]
    fn random_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_tool_frame(&buf).and_then(decode_request);
        let mut rest = &buf[..];
        while let Ok(Some((f, r))) = split_tool_frame(rest) {
            if let Ok(Request::EventReply { action, data, .. }) = decode_request(f) {
                for ev in 0..=events::COUNT {
                    let _ = check_event_reply(ev, action, data);
                }
                let _ = pf_reply(data);
            }
            rest = r;
        }
        let _ = split_tool_handshake(&buf);
    }

    #[test]
    fn random_payloads_for_every_id_never_panic(
        id in 0u16..70,
        seq in any::<u32>(),
        payload in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut buf = Vec::with_capacity(8 + payload.len());
        buf.extend_from_slice(&id.to_le_bytes());
        buf.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&payload);
        match parse_tool_frame(&buf).and_then(decode_request) {
            Ok(r) => {
                // Whatever decodes re-encodes to the same bytes.
                let mut out = vec![0u8; buf.len() + 8];
                let n = encode_request(seq, &r, &mut out).unwrap();
                if !matches!(r, Request::GetRegisters { .. }) {
                    prop_assert_eq!(&out[..n], &buf[..]);
                }
            }
            Err(e) => { let _ = e.disposition(); }
        }
    }

    #[test]
    fn requests_round_trip(o in owned()) {
        match &o {
            Owned::Plain(r) => check_round_trip(r)?,
            Owned::GetRegisters(vcpu, m) => {
                let msrs: Vec<U32> = m.iter().map(|&x| U32::new(x)).collect();
                check_round_trip(&Request::GetRegisters { vcpu: *vcpu, msrs: &msrs })?;
            }
            Owned::WritePhysical(gpa, d) => {
                check_round_trip(&Request::WritePhysical { gpa: *gpa, data: d })?;
            }
            Owned::SetPageAccess(view, e) => {
                let entries: Vec<PageAccessEntry> = e
                    .iter()
                    .map(|&(gpa, access)| PageAccessEntry {
                        gpa: U64::new(gpa),
                        access,
                        padding1: 0,
                        padding2: U16::new(0),
                        padding3: U32::new(0),
                    })
                    .collect();
                check_round_trip(&Request::SetPageAccess { view: *view, entries: &entries })?;
            }
            Owned::EventReply(vcpu, action, event, data) => {
                check_round_trip(&Request::EventReply {
                    vcpu: *vcpu,
                    action: *action,
                    event: *event,
                    data,
                })?;
                let _ = actions::accepted(*event, *action);
            }
        }
    }
}

proptest! {
    #[test]
    fn events_round_trip(
        common in prop::collection::vec(any::<u8>(), 544),
        event in 0u8..14,
        data in prop::collection::vec(any::<u8>(), 24),
        seq in any::<u32>(),
    ) {
        use super::event_layout::EventCommon;
        use super::host::{decode_event, encode_event};
        let mut c = EventCommon::read_from_bytes(&common).unwrap();
        c.event = event;
        let d = &data[..events::data_size(event).unwrap()];
        let mut buf = vec![0u8; 8 + 544 + 24];
        let n = encode_event(seq, &c, d, &mut buf).unwrap();
        let (f, rest) = crate::frame::split_frame(&buf[..n], super::MAX_MSG_SIZE).unwrap().unwrap();
        prop_assert!(rest.is_empty());
        prop_assert_eq!(f.header.seq, seq);
        let (back, bd) = decode_event(f.payload).unwrap();
        c.size = U16::new(544);
        prop_assert_eq!(back, c);
        prop_assert_eq!(bd, d);
    }

    #[test]
    fn random_events_and_replies_never_panic(buf in prop::collection::vec(any::<u8>(), 0..700)) {
        let _ = super::host::decode_event(&buf);
        let _ = super::host::decode_reply(&buf);
    }
}
