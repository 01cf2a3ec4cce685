//! The peer against a small in-test VMM built from the protocol crate's host-side encoders,
//! over a real unix socket pair: exact bytes of what the peer writes, and how it reads.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use protocol::frame::{HEADER_SIZE, Header};
use protocol::wire::libkvmi::frame::{decode_request, parse_tool_frame, vmm_handshake};
use protocol::wire::libkvmi::host::{
    encode_error_reply, encode_event, encode_get_registers_reply, encode_reply,
};
use protocol::wire::libkvmi::{access, actions, errors};

use super::*;

/// The VMM end of the socket pair.
struct Vmm {
    s: UnixStream,
}

impl Vmm {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Sends a handshake struct and reads the tool's 24-byte answer.
    fn hello_with(&mut self, bytes: &[u8]) -> [u8; 24] {
        self.send(bytes);
        let mut a = [0u8; 24];
        self.s.read_exact(&mut a).unwrap();
        a
    }

    /// One message as raw bytes (header + payload).
    fn read_raw(&mut self) -> Vec<u8> {
        let mut h = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut h).unwrap();
        let hdr = Header::parse(&h).unwrap();
        let mut m = h.to_vec();
        m.resize(HEADER_SIZE + hdr.size as usize, 0);
        self.s.read_exact(&mut m[HEADER_SIZE..]).unwrap();
        m
    }

    fn reply(&mut self, id: u16, seq: u32, data: &[u8]) {
        let mut buf = vec![0u8; 70_000];
        let n = encode_reply(id, seq, data, &mut buf).unwrap();
        self.send(&buf[..n]);
    }

    fn event(&mut self, seq: u32, vcpu: u16, event: u8, data: &[u8]) {
        let mut c = EventCommon::new_zeroed();
        c.vcpu = U16::new(vcpu);
        c.event = event;
        c.mode = 8;
        c.regs.rip = U64::new(0x1000 + u64::from(event));
        let mut buf = vec![0u8; MAX_MSG_SIZE];
        let n = encode_event(seq, &c, data, &mut buf).unwrap();
        self.send(&buf[..n]);
    }

    /// Answers the peer's GET_VERSION with `version`; returns the request's bytes.
    fn serve_version(&mut self, version: u32) -> Vec<u8> {
        let m = self.read_raw();
        let mut v = GetVersionReply::new_zeroed();
        v.version = U32::new(version);
        self.reply(ids::GET_VERSION, seq_of(&m), v.as_bytes());
        m
    }

    /// The standard kvmi-v7 hello + version 1.
    fn connect(&mut self) {
        let hs = vmm_handshake(UUID, 1_700_000_000, b"vm-under-test");
        self.hello_with(hs.as_bytes());
        self.serve_version(1);
    }

    /// Whether the tool closed its end (EOF) with nothing more sent.
    fn eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(n) => n == 0,
            // Closing with our bytes unread resets the connection.
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

const UUID: [u8; 16] = [
    0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
];

/// Runs `vmm` on one end of a socket pair and the peer's handshake on the other.
fn pair<T: Send + 'static>(
    cookie: Option<[u8; 20]>,
    vmm: impl FnOnce(&mut Vmm) -> T + Send + 'static,
) -> (PeerResult<Session>, JoinHandle<T>) {
    let (tool, host) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let h = std::thread::spawn(move || vmm(&mut Vmm { s: host }));
    (Session::handshake(tool, SeqCounter::new(), cookie), h)
}

/// A session whose VMM side the test drives from a thread through `script`.
fn session<T: Send + 'static>(
    script: impl FnOnce(&mut Vmm) -> T + Send + 'static,
) -> (Session, JoinHandle<T>) {
    let (s, h) = pair(None, move |v| {
        v.connect();
        script(v)
    });
    (s.expect("handshake"), h)
}

#[test]
fn handshake_reads_the_vmm_struct_answers_24_bytes_and_sends_get_version_seq_1() {
    let (s, h) = pair(Some([0xab; 20]), |v| {
        let hs = vmm_handshake(UUID, 1_700_000_123, b"guest-one");
        let answer = v.hello_with(hs.as_bytes());
        let req = v.serve_version(1);
        (answer, req)
    });
    let s = s.unwrap();
    let (answer, req) = h.join().unwrap();
    let mut want = vec![24, 0, 0, 0];
    want.extend([0xab; 20]);
    assert_eq!(answer.to_vec(), want);
    // GET_VERSION: id 2, size 0, seq 1 (the counter's first value).
    assert_eq!(req, vec![2, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(s.uuid(), UUID);
    assert_eq!(s.vmm().uuid_text(), "12345678-9abc-def0-1122-334455667788");
    assert_eq!(s.name(), "guest-one");
    assert_eq!(s.start_time(), 1_700_000_123);
    assert_eq!(s.vmm().struct_size, 96);
    assert_eq!(s.get_version(), 1);
}

#[test]
fn a_zero_cookie_hash_is_sent_by_default() {
    let (s, h) = pair(None, |v| {
        let hs = vmm_handshake(UUID, 0, b"x");
        let a = v.hello_with(hs.as_bytes());
        v.serve_version(1);
        a
    });
    s.unwrap();
    let a = h.join().unwrap();
    assert_eq!(&a[..4], &[24, 0, 0, 0]);
    assert_eq!(&a[4..], &[0; 20]);
}

#[test]
fn a_104_byte_v12_struct_is_read_whole_and_the_stream_stays_in_step() {
    let (s, h) = session_v12();
    let mut s = s.unwrap();
    assert_eq!(s.vmm().struct_size, 104);
    assert_eq!(s.name(), "v12");
    assert_eq!(s.uuid(), UUID);
    // The 8 extra bytes (max_gpa) were discarded, not taken for a message header.
    assert_eq!(s.get_vcpu_count().unwrap(), 3);
    h.join().unwrap();
}

fn session_v12() -> (PeerResult<Session>, JoinHandle<()>) {
    pair(None, |v| {
        let hs = vmm_handshake(UUID, 5, b"v12");
        let mut b = hs.as_bytes().to_vec();
        b[..4].copy_from_slice(&104u32.to_le_bytes());
        b.extend(0xfff_ffffu64.to_le_bytes());
        v.hello_with(&b);
        v.serve_version(1);
        let m = v.read_raw();
        assert_eq!(id_of(&m), ids::GET_GUEST_INFO);
        let mut info = GetGuestInfoReply::new_zeroed();
        info.vcpu_count = U32::new(3);
        v.reply(ids::GET_GUEST_INFO, seq_of(&m), info.as_bytes());
    })
}

#[test]
fn a_short_struct_size_is_read_partially_and_the_name_is_cut() {
    // struct_size 40: 36 more bytes (uuid, pad, start_time, 8 bytes of name) and no more.
    let (s, h) = pair(None, |v| {
        let hs = vmm_handshake(UUID, 9, b"abcdefghijklmnop");
        let mut b = hs.as_bytes()[..40].to_vec();
        b[..4].copy_from_slice(&40u32.to_le_bytes());
        v.hello_with(&b);
        v.serve_version(1);
    });
    let s = s.unwrap();
    h.join().unwrap();
    assert_eq!(s.name(), "abcdefgh");
    assert_eq!(s.start_time(), 9);
}

#[test]
fn the_last_name_byte_is_forced_to_nul() {
    let (s, h) = pair(None, |v| {
        let mut hs = vmm_handshake(UUID, 0, b"");
        hs.name = [b'A'; 64];
        v.hello_with(hs.as_bytes());
        v.serve_version(1);
    });
    let s = s.unwrap();
    h.join().unwrap();
    assert_eq!(s.name(), "A".repeat(63));
    assert_eq!(s.vmm().name_raw[63], 0);
}

#[test]
fn struct_sizes_below_32_or_above_65536_are_rejected_without_an_answer() {
    for size in [31u32, 3, 65_537] {
        let (s, h) = pair(None, move |v| {
            // One write; the tool may close before reading it all.
            let mut b = size.to_le_bytes().to_vec();
            b.extend([0u8; 92]);
            let _ = v.s.write_all(&b);
            v.eof()
        });
        match s {
            Err(PeerError::HandshakeSize(got)) => assert_eq!(got, size),
            Err(e) => panic!("size {size}: {e}"),
            Ok(_) => panic!("size {size} accepted"),
        }
        assert!(h.join().unwrap(), "size {size}: the tool wrote something");
    }
    // 32 is the smallest accepted.
    let (s, h) = pair(None, |v| {
        let hs = vmm_handshake(UUID, 0, b"n");
        let mut b = hs.as_bytes()[..32].to_vec();
        b[..4].copy_from_slice(&32u32.to_le_bytes());
        v.hello_with(&b);
        v.serve_version(1);
    });
    let s = s.unwrap();
    h.join().unwrap();
    assert_eq!(s.name(), "");
}

#[test]
fn a_version_below_1_or_an_error_reply_fails_the_connection() {
    let (s, h) = pair(None, |v| {
        let hs = vmm_handshake(UUID, 0, b"n");
        v.hello_with(hs.as_bytes());
        v.serve_version(0);
    });
    assert!(matches!(s, Err(PeerError::Version(0))));
    h.join().unwrap();
    let (s, h) = pair(None, |v| {
        let hs = vmm_handshake(UUID, 0, b"n");
        v.hello_with(hs.as_bytes());
        let m = v.read_raw();
        let mut buf = [0u8; 16];
        let n = encode_error_reply(ids::GET_VERSION, seq_of(&m), errors::EPERM, &mut buf).unwrap();
        v.send(&buf[..n]);
    });
    assert_eq!(s.err().and_then(|e| e.kvm()), Some(-1));
    h.join().unwrap();
}

#[test]
fn pause_all_vcpus_is_one_write_of_27_7_7_27_with_consecutive_seqs() {
    let (mut s, h) = session(|v| {
        // All four messages arrive before any reply is sent.
        let msgs: Vec<Vec<u8>> = (0..4).map(|_| v.read_raw()).collect();
        v.reply(ids::CONTROL_CMD_RESPONSE, seq_of(&msgs[3]), &[]);
        msgs
    });
    let first = s.seq.peek();
    s.pause_all_vcpus(2).unwrap();
    let m = h.join().unwrap();
    let s0 = first;
    #[rustfmt::skip]
    let want: Vec<Vec<u8>> = vec![
        // CONTROL_CMD_RESPONSE {enable 0, now 1}
        [&[27, 0, 8, 0][..], &s0.to_le_bytes(), &[0, 1, 0, 0, 0, 0, 0, 0]].concat(),
        // PAUSE_VCPU vh{vcpu 0} {wait 1}
        [&[7, 0, 16, 0][..], &(s0 + 1).to_le_bytes(),
            &[0, 0, 0, 0, 0, 0, 0, 0,  1, 0, 0, 0, 0, 0, 0, 0]].concat(),
        // PAUSE_VCPU vh{vcpu 1} {wait 1}
        [&[7, 0, 16, 0][..], &(s0 + 2).to_le_bytes(),
            &[1, 0, 0, 0, 0, 0, 0, 0,  1, 0, 0, 0, 0, 0, 0, 0]].concat(),
        // CONTROL_CMD_RESPONSE {enable 1, now 1}
        [&[27, 0, 8, 0][..], &(s0 + 3).to_le_bytes(), &[1, 1, 0, 0, 0, 0, 0, 0]].concat(),
    ];
    assert_eq!(m, want);
    assert_eq!(s.seq.peek(), s0 + 4);
    // Every message the VMM decodes is valid.
    for msg in &m {
        decode_request(parse_tool_frame(msg).unwrap()).unwrap();
    }
}

#[test]
fn events_arriving_before_a_reply_are_queued_and_returned_in_order() {
    let (mut s, h) = session(|v| {
        let m = v.read_raw();
        v.event(41, 0, events::PAUSE_VCPU, &[]);
        let mut bp = [0u8; 16];
        bp[..8].copy_from_slice(&0x7c00u64.to_le_bytes());
        bp[8] = 1;
        v.event(42, 1, events::BREAKPOINT, &bp);
        let mut info = GetGuestInfoReply::new_zeroed();
        info.vcpu_count = U32::new(2);
        v.reply(ids::GET_GUEST_INFO, seq_of(&m), info.as_bytes());
        // The replies to the two events.
        (v.read_raw(), v.read_raw())
    });
    assert_eq!(s.get_vcpu_count().unwrap(), 2);
    assert_eq!(s.pending_events(), 2);
    let e1 = s.wait_event(Duration::from_secs(1)).unwrap();
    let e2 = s.wait_event(Duration::from_secs(1)).unwrap();
    assert_eq!((e1.seq, e1.vcpu(), e1.id()), (41, 0, events::PAUSE_VCPU));
    assert_eq!((e2.seq, e2.vcpu(), e2.id()), (42, 1, events::BREAKPOINT));
    assert_eq!(e2.regs().rip.get(), 0x1004);
    assert_eq!(e2.mode(), 8);
    let bp = e2.breakpoint().unwrap();
    assert_eq!((bp.gpa.get(), bp.insn_len), (0x7c00, 1));
    assert_eq!(s.pending_events(), 0);
    s.reply_event(&e1, actions::CONTINUE, &[]).unwrap();
    s.reply_event(&e2, actions::RETRY, &[]).unwrap();
    let (r1, r2) = h.join().unwrap();
    // id 0, size 16, the event's seq; vh{vcpu}; {action, event, pad}.
    #[rustfmt::skip]
    assert_eq!(r1, vec![0, 0, 16, 0, 41, 0, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0,  0, 10, 0, 0, 0, 0, 0, 0]);
    #[rustfmt::skip]
    assert_eq!(r2, vec![0, 0, 16, 0, 42, 0, 0, 0,  1, 0, 0, 0, 0, 0, 0, 0,  1, 4, 0, 0, 0, 0, 0, 0]);
    // No event left: wait_event times out.
    assert!(matches!(
        s.wait_event(Duration::from_millis(20)),
        Err(PeerError::Timeout | PeerError::Closed)
    ));
}

#[test]
fn event_replies_have_the_sizes_libkvmi_tools_send() {
    let (mut s, h) = session(|v| {
        v.event(7, 0, events::CR, &[0; 24]);
        v.event(8, 0, events::MSR, &[0; 24]);
        v.event(9, 0, events::PF, &[0; 24]);
        v.event(10, 0, events::SINGLESTEP, &[0; 8]);
        (0..4).map(|_| v.read_raw()).collect::<Vec<_>>()
    });
    for _ in 0..4 {
        let e = s.wait_event(Duration::from_secs(5)).unwrap();
        let data = if e.id() == events::CR {
            0x1234u64.to_le_bytes().to_vec()
        } else {
            Vec::new()
        };
        s.reply_event(&e, actions::CONTINUE, &data).unwrap();
    }
    let r = h.join().unwrap();
    let sizes: Vec<u16> = r.iter().map(|m| u16::from_le_bytes([m[2], m[3]])).collect();
    assert_eq!(sizes, vec![24, 24, 288, 16]);
    assert_eq!(&r[0][24..32], &0x1234u64.to_le_bytes());
    assert!(r[2][24..].iter().all(|&b| b == 0));
}

#[test]
fn get_registers_reply_must_be_exact_and_msrs_come_back_in_order() {
    let (mut s, h) = session(|v| {
        let mut fixed = GetRegistersReply::new_zeroed();
        fixed.mode = U32::new(8);
        fixed.regs.rip = U64::new(0xdead);
        fixed.sregs.efer = U64::new(0x500);
        let m = v.read_raw();
        // The request: vh, {nmsrs 7}, the indices.
        assert_eq!(m.len(), 8 + 8 + 8 + 28);
        let entries: Vec<KvmMsrEntry> = LIBVMI_MSRS
            .iter()
            .map(|&i| {
                let mut e = KvmMsrEntry::new_zeroed();
                e.index = U32::new(i);
                e.data = U64::new(u64::from(i) + 1);
                e
            })
            .collect();
        let mut buf = vec![0u8; 1024];
        let n = encode_get_registers_reply(seq_of(&m), &fixed, &entries, &mut buf).unwrap();
        v.send(&buf[..n]);
        // Second request: answered with one MSR entry too few (data 16 bytes short).
        let m = v.read_raw();
        let n = encode_get_registers_reply(seq_of(&m), &fixed, &entries[..6], &mut buf).unwrap();
        v.send(&buf[..n]);
        // Third: one entry too many.
        let m = v.read_raw();
        let mut more = entries.clone();
        more.push(entries[0]);
        let n = encode_get_registers_reply(seq_of(&m), &fixed, &more, &mut buf).unwrap();
        v.send(&buf[..n]);
    });
    let r = s.get_registers(0, &LIBVMI_MSRS).unwrap();
    assert_eq!(
        (r.mode, r.regs.rip.get(), r.sregs.efer.get()),
        (8, 0xdead, 0x500)
    );
    let idx: Vec<u32> = r.msrs.iter().map(|e| e.index.get()).collect();
    assert_eq!(idx, LIBVMI_MSRS);
    assert_eq!(r.msr(0xc000_0080), Some(0xc000_0081));
    match s.get_registers(0, &LIBVMI_MSRS) {
        Err(PeerError::ReplySize { expected, got }) => assert_eq!((expected, got), (584, 568)),
        other => panic!("short reply: {other:?}"),
    }
    match s.get_registers(0, &LIBVMI_MSRS) {
        Err(PeerError::ReplySize { expected, got }) => assert_eq!((expected, got), (584, 600)),
        other => panic!("long reply: {other:?}"),
    }
    h.join().unwrap();
}

#[test]
fn other_replies_are_cut_or_zero_filled_to_the_expected_size() {
    let (mut s, h) = session(|v| {
        let m = v.read_raw();
        v.reply(
            ids::GET_MAX_GFN,
            seq_of(&m),
            &[0x10, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
        );
        let m = v.read_raw();
        v.reply(ids::VCPU_TRANSLATE_GVA, seq_of(&m), &[0x34, 0x12]);
    });
    assert_eq!(s.get_maximum_gfn().unwrap(), 0x10);
    assert_eq!(s.translate_gva(0, 0x1000).unwrap(), 0x1234);
    h.join().unwrap();
}

#[test]
fn a_reply_with_another_id_or_seq_is_a_wrong_message() {
    let (mut s, h) = session(|v| {
        let m = v.read_raw();
        v.reply(ids::GET_GUEST_INFO, seq_of(&m) + 1, &[0; 16]);
        let m = v.read_raw();
        v.reply(ids::GET_VCPU_INFO, seq_of(&m), &[0; 8]);
    });
    assert!(matches!(
        s.get_vcpu_count(),
        Err(PeerError::WrongMessage { id: 5, .. })
    ));
    let e = s.get_maximum_gfn().unwrap_err();
    assert!(
        matches!(
            e,
            PeerError::WrongMessage {
                id: 6,
                want_id: 29,
                ..
            }
        ),
        "{e}"
    );
    h.join().unwrap();
}

#[test]
fn error_replies_carry_the_vmm_code() {
    let (mut s, h) = session(|v| {
        let mut buf = [0u8; 16];
        let m = v.read_raw();
        let n =
            encode_error_reply(ids::CHECK_COMMAND, seq_of(&m), errors::EPERM, &mut buf).unwrap();
        v.send(&buf[..n]);
        let m = v.read_raw();
        assert_eq!(id_of(&m), 200);
        let n = encode_error_reply(200, seq_of(&m), errors::ENOSYS, &mut buf).unwrap();
        v.send(&buf[..n]);
        let m = v.read_raw();
        v.reply(ids::CHECK_COMMAND, seq_of(&m), &[]);
    });
    assert_eq!(
        s.check_command(ids::CONTROL_SPP).unwrap_err().kvm(),
        Some(-1)
    );
    let e = s
        .request(
            &Request::Other {
                id: 200,
                vcpu: None,
                body: &[],
            },
            0,
        )
        .unwrap_err();
    assert_eq!(e.kvm(), Some(-1000));
    s.check_command(ids::GET_REGISTERS).unwrap();
    h.join().unwrap();
}

#[test]
fn a_batch_with_an_event_reply_ends_with_now_0_and_waits_for_nothing() {
    let (mut s, h) = session(|v| {
        v.event(77, 0, events::PF, &[0; 24]);
        let msgs: Vec<Vec<u8>> = (0..5).map(|_| v.read_raw()).collect();
        // A batch of one event reply: sent bare.
        let bare = v.read_raw();
        (msgs, bare)
    });
    let e = s.wait_event(Duration::from_secs(5)).unwrap();
    let mut regs = e.common.regs;
    regs.rip = U64::new(0x2000);
    let s0 = s.seq.peek();
    let mut b = s.batch();
    assert_eq!(b.prefix_seq(), s0);
    b.queue_registers(0, &regs)
        .queue_page_access(&[0x5000], &[access::R | access::X], 0)
        .queue_reply_event(&e, actions::CONTINUE, &[]);
    b.commit().unwrap();
    let mut b = s.batch();
    b.queue_reply_event(&e, actions::RETRY, &[]);
    b.commit().unwrap();
    let (msgs, bare) = h.join().unwrap();
    let ids_sizes: Vec<(u16, u16, u32)> = msgs
        .iter()
        .map(|m| (id_of(m), u16::from_le_bytes([m[2], m[3]]), seq_of(m)))
        .collect();
    // prefix, SET_REGISTERS (152), SET_PAGE_ACCESS (8 + 16) and the PF reply (288) in
    // between, then the suffix.
    assert_eq!(
        ids_sizes[..3],
        [(27, 8, s0), (14, 152, s0 + 1), (21, 24, s0 + 2)]
    );
    assert_eq!(&msgs[0][8..10], &[0, 1]);
    // Then the PF reply (288 bytes, the event's seq) and the suffix {enable 1, now 0}.
    assert_eq!((id_of(&msgs[3]), seq_of(&msgs[3])), (0, 77));
    assert_eq!(u16::from_le_bytes([msgs[3][2], msgs[3][3]]), 288);
    assert_eq!(ids_sizes[4], (27, 8, s0 + 3));
    assert_eq!(&msgs[4][8..16], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // The bare reply: no wrapper (its would-be suffix was never built), seq 77.
    assert_eq!((id_of(&bare), seq_of(&bare)), (0, 77));
    // The bare batch still took its prefix seq: s0 + 4.
    assert_eq!(s.seq.peek(), s0 + 5);
}

#[test]
fn a_batch_suffix_with_an_event_reply_is_enable_1_now_0() {
    let (mut s, h) = session(|v| {
        v.event(5, 0, events::PAUSE_VCPU, &[]);
        (0..4).map(|_| v.read_raw()).collect::<Vec<_>>()
    });
    let e = s.wait_event(Duration::from_secs(5)).unwrap();
    let s0 = s.seq.peek();
    let mut b = s.batch();
    b.queue_pause_vcpu(0)
        .queue_reply_event(&e, actions::CONTINUE, &[]);
    b.commit().unwrap();
    let m = h.join().unwrap();
    let shape: Vec<(u16, u32)> = m.iter().map(|x| (id_of(x), seq_of(x))).collect();
    assert_eq!(shape, vec![(27, s0), (7, s0 + 1), (0, 5), (27, s0 + 2)]);
    assert_eq!(&m[3][8..16], &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(s.seq.peek(), s0 + 3);
}

#[test]
fn listener_unlinks_a_stale_path_and_accepts_a_vmm() {
    let dir = std::env::temp_dir().join(format!("kvmi-peer-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tool.sock");
    std::fs::write(&path, b"stale").unwrap();
    let l = Listener::bind(&path).unwrap();
    let p = path.clone();
    let h = std::thread::spawn(move || {
        let mut v = Vmm {
            s: UnixStream::connect(&p).unwrap(),
        };
        v.connect();
        let m = v.read_raw();
        v.reply(ids::GET_MAX_GFN, seq_of(&m), &0x4000u64.to_le_bytes());
        // The second connection only gets as far as the handshake.
        let mut v2 = Vmm {
            s: UnixStream::connect(&p).unwrap(),
        };
        v2.connect();
    });
    let mut s = l.accept(Duration::from_secs(10)).unwrap();
    assert_eq!(s.name(), "vm-under-test");
    assert_eq!(s.get_maximum_gfn().unwrap(), 0x4000);
    let s2 = l.accept(Duration::from_secs(10)).unwrap();
    h.join().unwrap();
    // One counter for the listener: GET_VERSION seq 1, GET_MAX_GFN 2, second GET_VERSION 3.
    assert_eq!(l.seq().peek(), 4);
    drop((s, s2));
    assert!(matches!(
        l.accept(Duration::from_millis(20)),
        Err(PeerError::Timeout)
    ));
    drop(l);
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wait_closed_sees_the_vmm_hang_up() {
    let (mut s, h) = session(|v| {
        let _ = v.s.shutdown(std::net::Shutdown::Both);
    });
    h.join().unwrap();
    assert!(s.wait_closed(Duration::from_secs(5)));
    assert!(
        s.wait_event(Duration::from_secs(1))
            .unwrap_err()
            .is_closed()
    );
}
