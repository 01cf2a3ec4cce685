//! Golden-byte tests of the libkvmi dialect. Every fixture is written by hand from the
//! layouts in docs/protocol.md, offsets in the comments; none is produced by the code under
//! test.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

use super::event_layout::*;
use super::frame::*;
use super::layout::*;
use super::*;

const EINVAL: i32 = -22;
const ENOSYS: i32 = -1000;

fn reply_code(buf: &[u8]) -> Disposition {
    match parse_tool_frame(buf).and_then(decode_request) {
        Ok(r) => panic!("accepted {r:?}"),
        Err(e) => e.disposition(),
    }
}

fn decode(buf: &[u8]) -> Request<'_> {
    decode_request(parse_tool_frame(buf).unwrap()).unwrap()
}

#[test]
fn numbering_matches_the_abi() {
    {
        use ids::*;
        let expect: [(u16, u16); 46] = [
            (EVENT_REPLY, 0),
            (EVENT, 1),
            (GET_VERSION, 2),
            (CHECK_COMMAND, 3),
            (CHECK_EVENT, 4),
            (GET_GUEST_INFO, 5),
            (GET_VCPU_INFO, 6),
            (PAUSE_VCPU, 7),
            (CONTROL_VM_EVENTS, 8),
            (CONTROL_EVENTS, 9),
            (CONTROL_CR, 10),
            (CONTROL_MSR, 11),
            (CONTROL_VE, 12),
            (GET_REGISTERS, 13),
            (SET_REGISTERS, 14),
            (GET_CPUID, 15),
            (GET_XSAVE, 16),
            (READ_PHYSICAL, 17),
            (WRITE_PHYSICAL, 18),
            (INJECT_EXCEPTION, 19),
            (GET_PAGE_ACCESS, 20),
            (SET_PAGE_ACCESS, 21),
            (GET_MAP_TOKEN, 22),
            (GET_MTRR_TYPE, 23),
            (CONTROL_SPP, 24),
            (GET_PAGE_WRITE_BITMAP, 25),
            (SET_PAGE_WRITE_BITMAP, 26),
            (CONTROL_CMD_RESPONSE, 27),
            (SET_VE_INFO_PAGE, 28),
            (GET_MAX_GFN, 29),
            (SET_PAGE_SVE, 30),
            (GET_NEXT_AVAILABLE_GFN, 31),
            (SWITCH_EPT_VIEW, 32),
            (DISABLE_VE, 33),
            (GET_EPT_VIEW, 34),
            (VCPU_TRANSLATE_GVA, 35),
            (CONTROL_EPT_VIEW, 36),
            (VCPU_GET_XCR, 37),
            (VCPU_SET_XSAVE, 38),
            (QUERY_PHYSICAL, 39),
            (VCPU_ALLOC_GFN, 41),
            (VCPU_FREE_GFN, 42),
            (CREATE_EPT_VIEW, 43),
            (DESTROY_EPT_VIEW, 44),
            (VCPU_CHANGE_GFN, 60),
            (VCPU_CONTROL_SINGLESTEP, 63),
        ];
        for (got, want) in expect {
            assert_eq!(got, want);
        }
        assert!(COMMANDS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(COMMANDS.len(), 44);
    }

    {
        use events::*;
        let ev = [
            UNHOOK,
            CR,
            MSR,
            XSETBV,
            BREAKPOINT,
            HYPERCALL,
            PF,
            TRAP,
            DESCRIPTOR,
            CREATE_VCPU,
            PAUSE_VCPU,
            SINGLESTEP,
            CMD_ERROR,
            CPUID,
        ];
        assert_eq!(ev, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(COUNT, 14);
    }
    assert_eq!(
        (actions::CONTINUE, actions::RETRY, actions::CRASH),
        (0, 1, 2)
    );
    use errors::*;
    assert_eq!(
        [
            EPERM, ENOENT, E2BIG, EAGAIN, ENOMEM, EFAULT, EBUSY, EINVAL, EOPNOTSUPP, ENOSYS
        ],
        [1, 2, 7, 11, 12, 14, 16, 22, 95, 1000]
    );
    assert_eq!((MSG_SIZE, MAX_MSG_SIZE), (8184, 8192));
    assert_eq!(
        (
            handshake::VMM_SIZE,
            handshake::TOOL_SIZE,
            handshake::VMM_MIN_SIZE
        ),
        (96, 24, 32)
    );
}

#[test]
fn vmm_handshake_golden() {
    let mut want = [0u8; 96];
    want[0] = 96; // @0 struct_size = 96
    want[4..20].copy_from_slice(&[0x11; 16]); // @4 uuid
    // @20 padding = 0
    want[24..32].copy_from_slice(&[0x00, 0x5e, 0xd0, 0xb2, 0, 0, 0, 0]); // @24 start_time 0xb2d05e00
    want[32..36].copy_from_slice(b"demo"); // @32 name, NUL-padded to 64
    let got = frame::vmm_handshake([0x11; 16], 3_000_000_000, b"demo");
    assert_eq!(got.as_bytes(), &want[..]);
    let back = QemuToIntrospector::read_from_bytes(&want).unwrap();
    assert_eq!(back.start_time.get(), 3_000_000_000);

    // A 70-byte name keeps 63 bytes and a NUL.
    let long = frame::vmm_handshake([0; 16], 0, &[b'a'; 70]);
    assert_eq!(&long.name[..63], &[b'a'; 63][..]);
    assert_eq!(long.name[63], 0);
}

#[test]
fn tool_handshake_golden() {
    // libkvmi's 24-byte answer followed by the GET_VERSION message.
    let mut buf = [0u8; 32];
    buf[0] = 24; // @0 struct_size = 24
    buf[4..24].copy_from_slice(&[0xab; 20]); // @4 cookie_hash
    buf[24..32].copy_from_slice(&[2, 0, 0, 0, 1, 0, 0, 0]); // hdr id 2, size 0, seq 1
    let (hash, rest) = split_tool_handshake(&buf).unwrap().unwrap();
    assert_eq!(hash, [0xab; 20]);
    assert_eq!(decode(rest), Request::GetVersion);

    // A longer answer: bytes past 24 are consumed and ignored.
    let mut long = [0u8; 28];
    long[0] = 28; // @0 struct_size = 28
    long[4] = 7; // @4 cookie_hash[0]
    long[24..28].copy_from_slice(&[9, 9, 9, 9]); // @24 extra, ignored
    let (hash, rest) = split_tool_handshake(&long).unwrap().unwrap();
    assert_eq!(hash[0], 7);
    assert!(rest.is_empty());

    // Partial input: need more.
    assert_eq!(split_tool_handshake(&buf[..3]), Ok(None));
    assert_eq!(split_tool_handshake(&long[..27]), Ok(None));
    // struct_size below 24 is refused and closes the connection.
    let short = [23u8, 0, 0, 0];
    let e = split_tool_handshake(&short).unwrap_err();
    assert_eq!(e, FrameError::HandshakeSize(23));
    assert_eq!(e.disposition(), Disposition::Close);
}

#[test]
fn pause_all_batch_splits_from_one_stream() {
    #[rustfmt::skip]
    let stream: [u8; 8 + 8 + 8 + 16 + 8 + 16 + 8 + 8] = [
        // CONTROL_CMD_RESPONSE: hdr id 27, size 8, seq 10; {enable 0, now 1, flags 0, pad}
        27, 0, 8, 0, 10, 0, 0, 0,   0, 1, 0, 0, 0, 0, 0, 0,
        // PAUSE_VCPU: hdr id 7, size 16, seq 11; vh vcpu 0; {wait 1, pad}
        7, 0, 16, 0, 11, 0, 0, 0,   0, 0, 0, 0, 0, 0, 0, 0,   1, 0, 0, 0, 0, 0, 0, 0,
        // PAUSE_VCPU: seq 12; vh vcpu 1
        7, 0, 16, 0, 12, 0, 0, 0,   1, 0, 0, 0, 0, 0, 0, 0,   1, 0, 0, 0, 0, 0, 0, 0,
        // CONTROL_CMD_RESPONSE: seq 13; {enable 1, now 1}
        27, 0, 8, 0, 13, 0, 0, 0,   1, 1, 0, 0, 0, 0, 0, 0,
    ];
    let mut rest = &stream[..];
    let mut got = Vec::new();
    while let Some((f, r)) = split_tool_frame(rest).unwrap() {
        got.push((f.seq, decode_request(f).unwrap()));
        rest = r;
    }
    assert!(rest.is_empty());
    assert_eq!(
        got,
        [
            (
                10,
                Request::ControlCmdResponse {
                    enable: false,
                    now: true,
                    flags: 0
                }
            ),
            (
                11,
                Request::PauseVcpu {
                    vcpu: 0,
                    wait: true
                }
            ),
            (
                12,
                Request::PauseVcpu {
                    vcpu: 1,
                    wait: true
                }
            ),
            (
                13,
                Request::ControlCmdResponse {
                    enable: true,
                    now: true,
                    flags: 0
                }
            ),
        ]
    );
    // A prefix of a message is "need more".
    assert_eq!(split_tool_frame(&stream[..7]), Ok(None));
    assert_eq!(split_tool_frame(&stream[..15]), Ok(None));
}

#[test]
fn get_registers_request_as_libvmi_sends_it() {
    #[rustfmt::skip]
    let msg: [u8; 8 + 44] = [
        13, 0, 44, 0, 3, 0, 0, 0,          // hdr id 13, size 44, seq 3
        2, 0, 0, 0, 0, 0, 0, 0,            // @0 vh vcpu 2
        7, 0, 0, 0, 0, 0, 0, 0,            // @8 nmsrs 7, pad
        0x74, 0x01, 0, 0,                  // @16 0x174
        0x75, 0x01, 0, 0,                  // @20 0x175
        0x76, 0x01, 0, 0,                  // @24 0x176
        0x80, 0, 0, 0xc0,                  // @28 0xc0000080
        0x81, 0, 0, 0xc0,                  // @32 0xc0000081
        0x82, 0, 0, 0xc0,                  // @36 0xc0000082
        0x83, 0, 0, 0xc0,                  // @40 0xc0000083
    ];
    let Request::GetRegisters { vcpu, msrs } = decode(&msg) else {
        panic!()
    };
    assert_eq!(vcpu, 2);
    let m: Vec<u32> = msrs.iter().map(|x| x.get()).collect();
    assert_eq!(
        m,
        [
            0x174,
            0x175,
            0x176,
            0xc000_0080,
            0xc000_0081,
            0xc000_0082,
            0xc000_0083
        ]
    );
    assert_eq!(get_registers_reply_size(7), 472 + 112);

    // nmsrs 8 overruns the indices sent: -KVM_EINVAL.
    let mut bad = msg;
    bad[16] = 8;
    assert_eq!(reply_code(&bad), Disposition::Reply(EINVAL));
    // Extra bytes after the indices are tolerated (size ≥ 16 + 4·nmsrs).
    let mut fewer = msg;
    fewer[16] = 6;
    assert!(matches!(decode(&fewer), Request::GetRegisters { msrs, .. } if msrs.len() == 6));
}

#[test]
fn get_registers_reply_offsets() {
    let mut data = [0u8; 472 + 16];
    data[0] = 8; // @0 mode 8
    data[8..16].copy_from_slice(&1u64.to_le_bytes()); // @8 regs.rax
    data[136..144].copy_from_slice(&0xfff0u64.to_le_bytes()); // @8+128 regs.rip
    data[144..152].copy_from_slice(&2u64.to_le_bytes()); // @8+136 regs.rflags
    data[152..160].copy_from_slice(&0xffff_0000u64.to_le_bytes()); // @152 sregs.cs.base
    data[392..400].copy_from_slice(&0x1000u64.to_le_bytes()); // @152+240 sregs.cr3
    data[416..424].copy_from_slice(&0x500u64.to_le_bytes()); // @152+264 sregs.efer
    data[464] = 1; // @464 nmsrs 1
    data[472..476].copy_from_slice(&0xc000_0080u32.to_le_bytes()); // @472 entry.index
    data[480..488].copy_from_slice(&0x500u64.to_le_bytes()); // @480 entry.data
    let (r, entries) = GetRegistersReply::read_from_prefix(&data).unwrap();
    assert_eq!(r.mode.get(), 8);
    assert_eq!(r.regs.rax.get(), 1);
    assert_eq!(r.regs.rip.get(), 0xfff0);
    assert_eq!(r.regs.rflags.get(), 2);
    assert_eq!(r.sregs.cs.base.get(), 0xffff_0000);
    assert_eq!(r.sregs.cr3.get(), 0x1000);
    assert_eq!(r.sregs.efer.get(), 0x500);
    assert_eq!(r.nmsrs.get(), 1);
    assert_eq!(entries.len(), get_registers_reply_size(1) - 472);
    let e = crate::kvm::KvmMsrEntry::read_from_bytes(entries).unwrap();
    assert_eq!((e.index.get(), e.data.get()), (0xc000_0080, 0x500));
}

#[test]
fn small_reply_goldens() {
    // GET_VERSION reply data: version 1 @0, pad @4, features @8 (spp, vmfunc, eptp, ve, …).
    let v = GetVersionReply {
        version: U32::new(KVMI_VERSION),
        padding: U32::new(0),
        features: Features {
            spp: 0,
            vmfunc: 0,
            eptp: 1,
            ve: 0,
            other: [0; 4],
        },
    };
    assert_eq!(
        v.as_bytes(),
        &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    );
    // GET_GUEST_INFO reply: u32 vcpu_count @0, pad[3].
    let g = GetGuestInfoReply::read_from_bytes(&[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    assert_eq!(g.vcpu_count.get(), 4);
    // Error code: s32 err @0 = -1000, pad @4.
    let e = ErrorCodeWire::read_from_bytes(&[0x18, 0xfc, 0xff, 0xff, 0, 0, 0, 0]).unwrap();
    assert_eq!(e.err.get(), ENOSYS);
}

#[test]
fn common_event_golden() {
    let mut ev = [0u8; 544];
    ev[0..2].copy_from_slice(&544u16.to_le_bytes()); // @0 size
    ev[2] = 3; // @2 vcpu 3
    ev[4] = events::BREAKPOINT; // @4 event
    ev[8] = 8; // @8 mode
    ev[10] = 0; // @10 view
    ev[144..152].copy_from_slice(&0x7c00u64.to_le_bytes()); // @16+128 regs.rip
    ev[400..408].copy_from_slice(&0x9000u64.to_le_bytes()); // @160+240 sregs.cr3
    ev[472..480].copy_from_slice(&0x10u64.to_le_bytes()); // @472 sysenter_cs
    ev[496..504].copy_from_slice(&0xd01u64.to_le_bytes()); // @496 efer
    ev[536..544].copy_from_slice(&0xffff_8000u64.to_le_bytes()); // @536 shadow_gs
    let c = EventCommon::read_from_bytes(&ev).unwrap();
    assert_eq!(c.size.get(), 544);
    assert_eq!(c.vcpu.get(), 3);
    assert_eq!(c.event, 4);
    assert_eq!(c.mode, 8);
    assert_eq!(c.regs.rip.get(), 0x7c00);
    assert_eq!(c.sregs.cr3.get(), 0x9000);
    assert_eq!(c.msrs.sysenter_cs.get(), 0x10);
    assert_eq!(c.msrs.efer.get(), 0xd01);
    assert_eq!(c.msrs.shadow_gs.get(), 0xffff_8000);
    assert_eq!(EVENT_COMMON_SIZE, 544);
}

#[test]
fn event_data_goldens() {
    // BREAKPOINT: u64 gpa @0, u8 insn_len @8, pad[7].
    let bp = BreakpointEvent::read_from_bytes(&[0, 0x7c, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    assert_eq!((bp.gpa.get(), bp.insn_len), (0x7c00, 1));
    // PF: gva @0, gpa @8, access @16, pad @17, view @18, pad @20.
    #[rustfmt::skip]
    let pf = PfEvent::read_from_bytes(&[
        0, 0x10, 0, 0, 0, 0, 0, 0,  // gva 0x1000
        0, 0x20, 0, 0, 0, 0, 0, 0,  // gpa 0x2000
        2, 0, 0, 0, 0, 0, 0, 0,     // access W, view 0
    ]).unwrap();
    assert_eq!((pf.gva.get(), pf.gpa.get(), pf.access), (0x1000, 0x2000, 2));
    // CR: u16 cr @0, pad, old @8, new @16.
    #[rustfmt::skip]
    let cr = CrEvent::read_from_bytes(&[
        3, 0, 0, 0, 0, 0, 0, 0,  1, 0, 0, 0, 0, 0, 0, 0,  2, 0, 0, 0, 0, 0, 0, 0,
    ]).unwrap();
    assert_eq!(
        (cr.cr.get(), cr.old_value.get(), cr.new_value.get()),
        (3, 1, 2)
    );
    // TRAP: vector @0, error_code @4, cr2 @8.
    let t =
        TrapEvent::read_from_bytes(&[14, 0, 0, 0, 2, 0, 0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!((t.vector, t.error_code.get(), t.cr2.get()), (14, 2, 0x3000));
    for (id, size) in [
        (0, 0),
        (1, 24),
        (2, 24),
        (4, 16),
        (6, 24),
        (7, 16),
        (8, 8),
        (11, 8),
    ] {
        assert_eq!(events::data_size(id), Some(size), "event {id}");
    }
    assert_eq!(events::data_size(14), None);
}

#[test]
fn event_replies_golden() {
    #[rustfmt::skip]
    let bp: [u8; 8 + 16] = [
        0, 0, 16, 0, 42, 0, 0, 0,      // hdr id 0, size 16, seq 42 (the event's)
        1, 0, 0, 0, 0, 0, 0, 0,        // vh vcpu 1
        1, 4, 0, 0, 0, 0, 0, 0,        // action RETRY, event BREAKPOINT, pad
    ];
    let f = parse_tool_frame(&bp).unwrap();
    assert_eq!(f.seq, 42);
    let Request::EventReply {
        vcpu,
        action,
        event,
        data,
    } = decode_request(f).unwrap()
    else {
        panic!()
    };
    assert_eq!((vcpu, action, event, data.len()), (1, 1, 4, 0));
    assert_eq!(check_event_reply(events::BREAKPOINT, action, data), Ok(()));
    // RETRY is not accepted by a PAUSE_VCPU event; CONTINUE is.
    assert!(check_event_reply(events::PAUSE_VCPU, actions::RETRY, &[]).is_err());
    assert_eq!(
        check_event_reply(events::PAUSE_VCPU, actions::CONTINUE, &[]),
        Ok(())
    );
    // UNHOOK takes no reply.
    assert!(check_event_reply(events::UNHOOK, 0, &[]).is_err());

    // CR reply: 24 bytes = vh + reply hdr + u64 new_val.
    #[rustfmt::skip]
    let cr: [u8; 8 + 24] = [
        0, 0, 24, 0, 7, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0,        // vh vcpu 0
        0, 1, 0, 0, 0, 0, 0, 0,        // CONTINUE, event CR
        0x33, 0, 0, 0x80, 0, 0, 0, 0,  // new_val 0x80000033
    ];
    let Request::EventReply { data, action, .. } = decode(&cr) else {
        panic!()
    };
    assert_eq!(new_val_reply(data), 0x8000_0033);
    assert_eq!(new_val_reply(&data[..2]), 0x33); // a short reply is zero-filled
    assert_eq!(
        NewValReply::read_from_bytes(data).unwrap().new_val.get(),
        0x8000_0033
    );
    assert_eq!(check_event_reply(events::CR, action, data), Ok(()));
    // 9 bytes of data for a CR event is more than its reply struct: close.
    let e = check_event_reply(events::CR, 0, &[0; 9]).unwrap_err();
    assert_eq!(e.disposition(), Disposition::Close);

    // Shorter than 16 bytes: close.
    let short: [u8; 8 + 15] = {
        let mut b = [0u8; 23];
        b[2] = 15;
        b
    };
    assert_eq!(reply_code(&short), Disposition::Close);
    // Non-zero padding in the reply header: close.
    let mut pad = bp;
    pad[20] = 1; // @4 of kvmi_event_reply: padding2
    assert_eq!(reply_code(&pad), Disposition::Close);
}

#[test]
fn pf_reply_golden() {
    let mut r = [0u8; 272];
    r[0..8].copy_from_slice(&0x1000u64.to_le_bytes()); // @0 ctx_addr
    r[8] = 4; // @8 ctx_size 4
    r[12] = 0; // @12 singlestep
    r[13] = 1; // @13 rep_complete
    r[16..20].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]); // @16 ctx_data
    let p = PfReply::read_from_bytes(&r).unwrap();
    assert_eq!(
        (p.ctx_addr.get(), p.ctx_size.get(), p.rep_complete),
        (0x1000, 4, 1)
    );
    assert_eq!(&p.ctx_data[..4], &[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(check_event_reply(events::PF, actions::CONTINUE, &r), Ok(()));
    // A shorter reply is zero-filled.
    assert_eq!(pf_reply(&r[..12]).rep_complete, 0);
    assert_eq!(
        check_event_reply(events::PF, actions::RETRY, &r[..8]),
        Ok(())
    );
    // ctx_size 257 closes.
    r[8] = 1;
    r[9] = 1;
    assert_eq!(
        check_event_reply(events::PF, 0, &r)
            .unwrap_err()
            .disposition(),
        Disposition::Close
    );
    // 273 bytes closes.
    assert!(check_event_reply(events::PF, 0, &[0; 273]).is_err());
}

#[test]
fn vm_commands_golden() {
    // CHECK_EVENT: {u16 id @0, pad}.
    assert_eq!(
        decode(&[4, 0, 8, 0, 1, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0]),
        Request::CheckEvent(10)
    );
    // CONTROL_VM_EVENTS: {u16 event_id @0, u8 enable @2, pad}.
    assert_eq!(
        decode(&[8, 0, 8, 0, 1, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0, 0]),
        Request::ControlVmEvents {
            event: events::CREATE_VCPU,
            enable: true
        }
    );
    // ... but not a vCPU event.
    assert_eq!(
        reply_code(&[8, 0, 8, 0, 1, 0, 0, 0, 4, 0, 1, 0, 0, 0, 0, 0]),
        Disposition::Reply(EINVAL)
    );
    // READ_PHYSICAL: {u64 gpa @0, u64 size @8}.
    #[rustfmt::skip]
    let rd = [17, 0, 16, 0, 1, 0, 0, 0,  0, 0x10, 0, 0, 0, 0, 0, 0,  0, 0x10, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        decode(&rd),
        Request::ReadPhysical {
            gpa: 0x1000,
            size: 4096
        }
    );
    let mut cross = rd;
    cross[8] = 1; // gpa 0x1001 + 4096 crosses the page
    assert_eq!(reply_code(&cross), Disposition::Reply(EINVAL));
    // WRITE_PHYSICAL: {gpa, size 2} + 2 bytes.
    #[rustfmt::skip]
    let wr = [18, 0, 18, 0, 1, 0, 0, 0,  0, 0x20, 0, 0, 0, 0, 0, 0,  2, 0, 0, 0, 0, 0, 0, 0,  0xaa, 0xbb];
    assert_eq!(
        decode(&wr),
        Request::WritePhysical {
            gpa: 0x2000,
            data: &[0xaa, 0xbb]
        }
    );
    let mut over = wr;
    over[16] = 3; // size 3 > 2 bytes sent: close
    assert_eq!(reply_code(&over), Disposition::Close);
    // SET_PAGE_ACCESS: {u16 view @0, u16 count @2, pad} + {u64 gpa, u8 access @8, pad}.
    #[rustfmt::skip]
    let spa = [21, 0, 24, 0, 1, 0, 0, 0,  0, 0, 1, 0, 0, 0, 0, 0,
               0, 0x30, 0, 0, 0, 0, 0, 0,  3, 0, 0, 0, 0, 0, 0, 0];
    let Request::SetPageAccess { view, entries } = decode(&spa) else {
        panic!()
    };
    assert_eq!((view, entries.len()), (0, 1));
    assert_eq!((entries[0].gpa.get(), entries[0].access), (0x3000, 3));
    // GET_MAX_GFN: no payload.
    assert_eq!(decode(&[29, 0, 0, 0, 1, 0, 0, 0]), Request::GetMaxGfn);
    // CONTROL_CMD_RESPONSE with non-zero padding closes.
    assert_eq!(
        reply_code(&[27, 0, 8, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1]),
        Disposition::Close
    );
}

#[test]
fn vcpu_commands_golden() {
    // CONTROL_EVENTS: vh vcpu 1 + {u16 event_id 6 (PF), u8 enable 1}.
    assert_eq!(
        decode(&[
            9, 0, 16, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 6, 0, 1, 0, 0, 0, 0, 0
        ]),
        Request::ControlEvents {
            vcpu: 1,
            event: events::PF,
            enable: true
        }
    );
    // CONTROL_CR: vh + {u8 enable @0, pad, u32 cr @4}.
    assert_eq!(
        decode(&[
            10, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0
        ]),
        Request::ControlCr {
            vcpu: 0,
            cr: 3,
            enable: true
        }
    );
    assert_eq!(
        reply_code(&[
            10, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0
        ]),
        Disposition::Reply(EINVAL)
    );
    // CONTROL_MSR: msr 0xc0000082 @4.
    assert_eq!(
        decode(&[
            11, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x82, 0, 0, 0xc0
        ]),
        Request::ControlMsr {
            vcpu: 0,
            msr: 0xc000_0082,
            enable: true
        }
    );
    // INJECT_EXCEPTION: vh + {u8 nr @0, u32 error_code @4, u64 address @8}.
    #[rustfmt::skip]
    let inj = [19, 0, 24, 0, 1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0,
               14, 0, 0, 0, 2, 0, 0, 0,  0, 0x40, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        decode(&inj),
        Request::InjectException {
            vcpu: 0,
            nr: 14,
            error_code: 2,
            address: 0x4000
        }
    );
    // VCPU_TRANSLATE_GVA: vh + {u64 gva}.
    assert_eq!(
        decode(&[
            35, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0, 0, 0, 0, 0, 0
        ]),
        Request::TranslateGva {
            vcpu: 0,
            gva: 0x5000
        }
    );
    // VCPU_CONTROL_SINGLESTEP: vh + {u8 enable, pad[7]}.
    assert_eq!(
        decode(&[
            63, 0, 16, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ]),
        Request::ControlSinglestep {
            vcpu: 2,
            enable: false
        }
    );
    // GET_VCPU_INFO: vh only.
    assert_eq!(
        decode(&[6, 0, 8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Request::GetVcpuInfo { vcpu: 0 }
    );
    // A flag byte other than 0/1: -KVM_EINVAL.
    assert_eq!(
        reply_code(&[
            9, 0, 16, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 6, 0, 2, 0, 0, 0, 0, 0
        ]),
        Disposition::Reply(EINVAL)
    );
    // PAUSE_VCPU with non-zero padding closes.
    assert_eq!(
        reply_code(&[
            7, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0
        ]),
        Disposition::Close
    );
}

#[test]
fn framing_errors() {
    // size 8185 > 8184: close, even before the payload arrived.
    assert_eq!(
        split_tool_frame(&[2, 0, 0xf9, 0x1f, 1, 0, 0, 0]),
        Err(FrameError::TooLarge(8185))
    );
    assert_eq!(FrameError::TooLarge(8185).disposition(), Disposition::Close);
    // size 8184 is fine (need more bytes).
    assert_eq!(split_tool_frame(&[2, 0, 0xf8, 0x1f, 1, 0, 0, 0]), Ok(None));
    // A vCPU header with non-zero padding: close.
    assert_eq!(
        reply_code(&[6, 0, 8, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]),
        Disposition::Close
    );
    // A vCPU command too short for its vCPU header: close.
    assert_eq!(
        reply_code(&[6, 0, 4, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
        Disposition::Close
    );
    // A tool sending EVENT: close.
    assert_eq!(reply_code(&[1, 0, 0, 0, 1, 0, 0, 0]), Disposition::Close);
    // Numbered without a handler, and unnumbered: -KVM_ENOSYS, payload consumed.
    for id in [12u8, 20, 25, 40, 45, 59, 64, 255] {
        assert_eq!(
            reply_code(&[id, 0, 2, 0, 1, 0, 0, 0, 0xff, 0xff]),
            Disposition::Reply(ENOSYS),
            "id {id}"
        );
    }
    // A fixed-size command with the wrong size: -KVM_EINVAL.
    assert_eq!(
        reply_code(&[2, 0, 1, 0, 1, 0, 0, 0, 0]),
        Disposition::Reply(EINVAL)
    );
    assert_eq!(
        reply_code(&[3, 0, 7, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Disposition::Reply(EINVAL)
    );
    // A buffer longer than the message it holds.
    assert!(parse_tool_frame(&[2, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
}

#[test]
fn encode_matches_golden_bytes() {
    let mut buf = [0u8; 64];
    let n = encode_request(
        11,
        &Request::PauseVcpu {
            vcpu: 1,
            wait: true,
        },
        &mut buf,
    )
    .unwrap();
    #[rustfmt::skip]
    let want = [7, 0, 16, 0, 11, 0, 0, 0,  1, 0, 0, 0, 0, 0, 0, 0,  1, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(&buf[..n], &want);
    // Too small a buffer is an error, not a panic.
    assert!(encode_request(1, &Request::GetMaxGfn, &mut buf[..7]).is_err());
}

#[test]
fn host_replies_golden() {
    use super::host::*;
    let mut buf = [0u8; 1024];
    // -KVM_ENOSYS to unknown ID 12, seq 5: hdr {12, size 8, 5}, err -1000 @0, pad @4.
    let n = encode_error_reply(12, 5, errors::ENOSYS, &mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        &[12, 0, 8, 0, 5, 0, 0, 0, 0x18, 0xfc, 0xff, 0xff, 0, 0, 0, 0]
    );
    // GET_VERSION reply, seq 1: hdr {2, size 24, 1}, err 0, version 1, pad, features 0.
    let v = GetVersionReply::read_from_bytes(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let n = encode_reply(ids::GET_VERSION, 1, v.as_bytes(), &mut buf).unwrap();
    #[rustfmt::skip]
    let want = [2, 0, 24, 0, 1, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0,
                1, 0, 0, 0, 0, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(&buf[..n], &want);
    let r = decode_reply(&buf[8..n]).unwrap();
    assert_eq!((r.err, r.data.len()), (0, 16));

    // GET_REGISTERS reply with 7 MSRs: payload 8 + 472 + 112 = 592 = 0x250.
    let mut fixed = GetRegistersReply::read_from_bytes(&[0u8; 472]).unwrap();
    fixed.mode = U32::new(8);
    let entries = [crate::kvm::KvmMsrEntry::read_from_bytes(&[0u8; 16]).unwrap(); 7];
    let n = encode_get_registers_reply(3, &fixed, &entries, &mut buf).unwrap();
    assert_eq!(n, 600);
    assert_eq!(&buf[..4], &[13, 0, 0x50, 0x02]); // id 13, size 592
    assert_eq!(buf[16], 8); // @0 of the data: mode
    assert_eq!(buf[16 + 464], 7); // @464 nmsrs
    assert_eq!(n - 16, get_registers_reply_size(7));
    // Too small a buffer is an error.
    assert!(encode_get_registers_reply(3, &fixed, &entries, &mut buf[..599]).is_err());
}

#[test]
fn host_event_golden() {
    use super::host::*;
    let mut common = EventCommon::read_from_bytes(&[0u8; 544]).unwrap();
    common.vcpu = zerocopy::little_endian::U16::new(1);
    common.event = events::BREAKPOINT;
    common.mode = 8;
    #[rustfmt::skip]
    let data = [0, 0x7c, 0, 0, 0, 0, 0, 0,  1, 0, 0, 0, 0, 0, 0, 0]; // gpa 0x7c00, insn_len 1
    let mut buf = [0u8; 8 + 560];
    let n = encode_event(9, &common, &data, &mut buf).unwrap();
    assert_eq!(n, 568);
    assert_eq!(&buf[..8], &[1, 0, 0x30, 0x02, 9, 0, 0, 0]); // id 1, size 560, seq 9
    assert_eq!(&buf[8..14], &[0x20, 0x02, 1, 0, 4, 0]); // size 544, vcpu 1, event 4
    assert_eq!(buf[16], 8); // @8 mode
    assert_eq!(&buf[8 + 544..], &data); // data @544
    let (c, d) = decode_event(&buf[8..n]).unwrap();
    assert_eq!((c.vcpu.get(), c.event, d), (1, 4, &data[..]));
    // Data of the wrong size for the event is refused.
    assert!(encode_event(9, &common, &data[..8], &mut buf).is_err());

    // A reader tolerates a smaller common part: size 16, data from offset 16.
    #[rustfmt::skip]
    let small = [16, 0, 0, 0, 10, 0, 0, 0,  8, 0, 0, 0, 0, 0, 0, 0];
    let (c, d) = decode_event(&small).unwrap();
    assert_eq!((c.event, c.mode, c.regs.rip.get(), d.len()), (10, 8, 0, 0));
    // size < 8, size beyond the payload, unknown event ID: errors.
    assert!(decode_event(&[7, 0, 0, 0, 0, 0, 0, 0]).is_err());
    assert!(decode_event(&[17, 0, 0, 0, 0, 0, 0, 0]).is_err());
    assert!(decode_event(&[8, 0, 0, 0, 14, 0, 0, 0]).is_err());
}
