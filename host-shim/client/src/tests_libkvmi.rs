//! The libkvmi dialect against a hand-driven VMM on a real unix socket: the handshake both
//! ways, the kvmi-v7 bytes each typed method sends (checked against hand-built messages from
//! the dialect's layouts), replies and events read back, and bad bytes from the VMM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::event::EventSet;
use protocol::types::{Access, PageAccessEntry};
use protocol::wire::libkvmi::event_layout::EventCommon as WireCommon;
use protocol::wire::libkvmi::frame::{Request, decode_request, parse_tool_frame};
use protocol::wire::libkvmi::{errors, events, host, ids};
use protocol::{CommandKind, EventKind, EventPayload};

use super::{ClientError, Dialect, HandshakeError, KvmiClient, LibkvmiOptions};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "kvmi-client-lk-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn connect(path: &PathBuf) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("connect {}: {e}", path.display()),
        }
    }
}

/// The VMM's 96-byte handshake.
fn vmm_hello() -> [u8; 96] {
    let mut h = [0u8; 96];
    h[..4].copy_from_slice(&96u32.to_le_bytes());
    h[4..20].copy_from_slice(&[0x11; 16]);
    h[24..32].copy_from_slice(&1_700_000_000i64.to_le_bytes());
    h[32..45].copy_from_slice(b"vm-under-test");
    h
}

fn read_message(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut hdr = [0u8; 8];
    s.read_exact(&mut hdr).ok()?;
    let size = u16::from_le_bytes([hdr[2], hdr[3]]) as usize;
    let mut msg = hdr.to_vec();
    msg.resize(8 + size, 0);
    s.read_exact(&mut msg[8..]).ok()?;
    Some(msg)
}

fn event_message(seq: u32, vcpu: u16, id: u8, data: &[u8]) -> Vec<u8> {
    let mut c: WireCommon = protocol::wire::libkvmi::tool::read_padded(&[]);
    c.vcpu.set(vcpu);
    c.event = id;
    c.mode = 8;
    c.regs.rip.set(0xffff_ffff_8000_1000);
    let mut buf = vec![0u8; 8 + 544 + data.len()];
    let n = host::encode_event(seq, &c, data, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// A VMM serving the commands the client sends, recording every message it received.
struct Vmm {
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: JoinHandle<UnixStream>,
}

fn start_vmm(path: PathBuf) -> Vmm {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let thread = std::thread::spawn(move || {
        let mut s = connect(&path);
        s.write_all(&vmm_hello()).unwrap();
        let mut answer = [0u8; 24];
        s.read_exact(&mut answer).unwrap();
        let mut want = [0u8; 24];
        want[0] = 24;
        want[4..].copy_from_slice(&[0xcc; 20]);
        assert_eq!(answer, want, "the tool's introspector2qemu");
        let mut event_seq = 100;
        while let Some(msg) = read_message(&mut s) {
            log.lock().unwrap().push(msg.clone());
            let frame = parse_tool_frame(&msg).unwrap();
            let (id, seq) = (frame.id, frame.seq);
            let mut out = vec![0u8; 8 + 8 + 4096];
            let ok = |data: &[u8], out: &mut [u8]| host::encode_reply(id, seq, data, out).unwrap();
            let n = match decode_request(frame).unwrap() {
                Request::EventReply { .. } => continue,
                Request::GetVersion => {
                    ok(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut out)
                }
                Request::CheckCommand(ids::GET_MAP_TOKEN) => {
                    host::encode_error_reply(id, seq, errors::EPERM, &mut out).unwrap()
                }
                Request::GetGuestInfo => {
                    ok(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut out)
                }
                Request::GetVcpuInfo { .. } => ok(&1_000_000_000u64.to_le_bytes(), &mut out),
                Request::GetRegisters { msrs, .. } => {
                    let mut data = vec![0u8; 472 + 16 * msrs.len()];
                    data[..4].copy_from_slice(&8u32.to_le_bytes());
                    data[136..144].copy_from_slice(&0x1234u64.to_le_bytes()); // rip
                    data[392..400].copy_from_slice(&0x9000u64.to_le_bytes()); // cr3
                    data[464..468].copy_from_slice(&(msrs.len() as u32).to_le_bytes());
                    for (i, m) in msrs.iter().enumerate() {
                        let at = 472 + 16 * i;
                        data[at..at + 4].copy_from_slice(&m.get().to_le_bytes());
                        data[at + 8..at + 16].copy_from_slice(&0x77u64.to_le_bytes());
                    }
                    ok(&data, &mut out)
                }
                Request::ReadPhysical { gpa, size } => {
                    let data: Vec<u8> = (0..size).map(|i| (gpa + i) as u8).collect();
                    ok(&data, &mut out)
                }
                Request::PauseVcpu { vcpu, .. } => {
                    let n = ok(&[], &mut out);
                    s.write_all(&out[..n]).unwrap();
                    event_seq += 1;
                    s.write_all(&event_message(event_seq, vcpu, events::PAUSE_VCPU, &[]))
                        .unwrap();
                    continue;
                }
                _ => ok(&[], &mut out),
            };
            s.write_all(&out[..n]).unwrap();
        }
        s
    });
    Vmm { received, thread }
}

fn listen(path: &PathBuf) -> KvmiClient {
    let options = LibkvmiOptions {
        cookie_hash: [0xcc; 20],
    };
    KvmiClient::listen_libkvmi(path, Duration::from_secs(5), &options).unwrap()
}

/// The messages the VMM received since `from`, with their seq zeroed.
fn sent(vmm: &Vmm, from: usize) -> Vec<Vec<u8>> {
    vmm.received.lock().unwrap()[from..]
        .iter()
        .map(|m| {
            let mut m = m.clone();
            m[4..8].fill(0);
            m
        })
        .collect()
}

fn count(vmm: &Vmm) -> usize {
    vmm.received.lock().unwrap().len()
}

/// `{id, size}` + zero seq, then `payload`.
fn msg(id: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(payload);
    m
}

#[test]
fn libkvmi_handshake_probe_and_commands_have_the_kvmi_v7_bytes() {
    let path = socket_path();
    let vmm = start_vmm(path.clone());
    let client = listen(&path);
    assert_eq!(client.dialect(), Dialect::Libkvmi);
    let id = client.vm_identity().unwrap();
    assert_eq!(
        (id.name.as_str(), id.uuid, id.start_time),
        ("vm-under-test", [0x11; 16], 1_700_000_000)
    );
    // GET_VERSION first (libkvmi's order), then the permission probe.
    let first = sent(&vmm, 0);
    assert_eq!(first[0], msg(ids::GET_VERSION, &[]));
    assert_eq!(
        first[1],
        msg(ids::CHECK_COMMAND, &[2, 0, 0, 0, 0, 0, 0, 0]),
        "CHECK_COMMAND(GET_VERSION)"
    );
    let v = client.get_version().unwrap();
    assert_eq!(v.version, 1);
    assert!(v.allowed.allows_command(CommandKind::ReadPhysical));
    assert!(!v.allowed.allows_command(CommandKind::GetMapToken), "EPERM");
    assert!(
        !v.allowed.allows_command(CommandKind::ControlBreakpoint),
        "no kvmi-v7 equivalent"
    );
    assert!(v.allowed.allows_event(EventKind::PageFault));

    let at = count(&vmm);
    let info = client.get_guest_info().unwrap();
    assert_eq!((info.vcpu_count, info.tsc_speed), (2, 1_000_000_000));
    assert_eq!(
        sent(&vmm, at),
        vec![
            msg(ids::GET_GUEST_INFO, &[]),
            msg(ids::GET_VCPU_INFO, &[0; 8]),
        ]
    );

    // CONTROL_EVENTS: one message per event that changes; SINGLESTEP also armed and
    // disarmed with VCPU_CONTROL_SINGLESTEP.
    let vh1 = [1, 0, 0, 0, 0, 0, 0, 0];
    let ctl = |event: u8, enable: u8| {
        let mut p = vh1.to_vec();
        p.extend_from_slice(&[event, 0, enable, 0, 0, 0, 0, 0]);
        msg(ids::CONTROL_EVENTS, &p)
    };
    let step = |enable: u8| {
        let mut p = vh1.to_vec();
        p.extend_from_slice(&[enable, 0, 0, 0, 0, 0, 0, 0]);
        msg(ids::VCPU_CONTROL_SINGLESTEP, &p)
    };
    let base: EventSet = [EventKind::Breakpoint, EventKind::PageFault]
        .into_iter()
        .collect();
    let at = count(&vmm);
    client.control_events(1, base).unwrap();
    assert_eq!(sent(&vmm, at), vec![ctl(4, 1), ctl(6, 1)]);
    let at = count(&vmm);
    client
        .control_events(
            1,
            base.with(EventKind::Singlestep).with(EventKind::PauseVcpu),
        )
        .unwrap();
    assert_eq!(
        sent(&vmm, at),
        vec![ctl(11, 1), step(1)],
        "PAUSE_VCPU is always on"
    );
    let at = count(&vmm);
    client
        .control_events(1, base.without(EventKind::PageFault))
        .unwrap();
    assert_eq!(sent(&vmm, at), vec![ctl(6, 0), step(0), ctl(11, 0)]);

    // PAUSE_VCPU with wait=1; its event read back and answered for its own vCPU.
    let at = count(&vmm);
    client.pause_vcpu(1).unwrap();
    let mut p = vh1.to_vec();
    p.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(sent(&vmm, at), vec![msg(ids::PAUSE_VCPU, &p)]);
    let ev = client
        .next_event(Duration::from_secs(5))
        .unwrap()
        .expect("PAUSE_VCPU event");
    assert_eq!((ev.seq, ev.event.common.vcpu), (101, 1));
    assert_eq!(ev.event.payload, EventPayload::PauseVcpu);
    assert_eq!(ev.event.common.regs.rip.get(), 0xffff_ffff_8000_1000);
    let at = count(&vmm);
    client.reply_continue(&ev).unwrap();
    // Event replies get no answer: a command after it is the sync point.
    let r = client.get_registers(1, &[0x174]).unwrap();
    let got = sent(&vmm, at);
    let mut reply = msg(
        ids::EVENT_REPLY,
        &[1, 0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0],
    );
    reply[4..8].fill(0);
    assert_eq!(got[0], reply, "CONTINUE to PAUSE_VCPU on vCPU 1");
    let mut p = vh1.to_vec();
    p.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0x74, 1, 0, 0]);
    assert_eq!(got[1], msg(ids::GET_REGISTERS, &p));
    assert_eq!(r.regs.rip.get(), 0x1234);
    assert_eq!(r.sregs.cr3.get(), 0x9000);
    assert_eq!((r.msrs[0].index, r.msrs[0].data), (0x174, 0x77));

    let at = count(&vmm);
    assert_eq!(
        client.read_physical(0x2010, 4).unwrap(),
        vec![0x10, 0x11, 0x12, 0x13]
    );
    client.write_physical(0x3000, &[0xaa, 0xbb]).unwrap();
    client
        .set_page_access(
            0,
            &[PageAccessEntry {
                gpa: 0x5000,
                access: Access::from_bits(3).unwrap(),
            }],
        )
        .unwrap();
    let mut read = 0x2010u64.to_le_bytes().to_vec();
    read.extend_from_slice(&4u64.to_le_bytes());
    let mut write = 0x3000u64.to_le_bytes().to_vec();
    write.extend_from_slice(&2u64.to_le_bytes());
    write.extend_from_slice(&[0xaa, 0xbb]);
    let mut spa = vec![0, 0, 1, 0, 0, 0, 0, 0];
    spa.extend_from_slice(&0x5000u64.to_le_bytes());
    spa.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        sent(&vmm, at),
        vec![
            msg(ids::READ_PHYSICAL, &read),
            msg(ids::WRITE_PHYSICAL, &write),
            msg(ids::SET_PAGE_ACCESS, &spa),
        ]
    );

    // Commands without a kvmi-v7 equivalent: typed errors, nothing sent.
    let at = count(&vmm);
    assert!(matches!(
        client.control_breakpoint(None, 0x1000, true),
        Err(ClientError::Unsupported {
            command: CommandKind::ControlBreakpoint,
            dialect: "libkvmi"
        })
    ));
    assert!(matches!(
        client.get_page_access(0, &[0x1000]),
        Err(ClientError::Unsupported { .. })
    ));
    assert!(!client.supports(CommandKind::ControlBreakpoint));
    assert!(client.supports(CommandKind::SetPageAccess));
    assert_eq!(count(&vmm), at);
    assert!(client.translate_gva(0, 0x1000).unwrap().is_some());

    client.close();
    drop(vmm.thread.join().unwrap());
}

#[test]
fn bad_bytes_from_the_vmm_are_typed_errors() {
    // A struct_size below 32: the connection is refused; the tool waits for the next one.
    let path = socket_path();
    let p = path.clone();
    let bad = std::thread::spawn(move || {
        let mut s = connect(&p);
        s.write_all(&8u32.to_le_bytes()).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    let err = KvmiClient::listen_libkvmi(
        &path,
        Duration::from_millis(500),
        &LibkvmiOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, ClientError::Handshake(HandshakeError::StructSize(8))),
        "{err}"
    );
    assert!(bad.join().unwrap().is_empty(), "nothing answered");

    // After a good handshake: an event with an unknown ID closes the channel.
    let path = socket_path();
    let p = path.clone();
    let vmm = std::thread::spawn(move || {
        let mut s = connect(&p);
        s.write_all(&vmm_hello()).unwrap();
        let mut answer = [0u8; 24];
        s.read_exact(&mut answer).unwrap();
        let mut out = vec![0u8; 4096];
        while let Some(m) = read_message(&mut s) {
            let frame = parse_tool_frame(&m).unwrap();
            let n = host::encode_reply(frame.id, frame.seq, &[1; 16], &mut out).unwrap();
            s.write_all(&out[..n]).unwrap();
            if frame.id == ids::CHECK_EVENT && m[8] == 11 {
                break;
            }
        }
        let mut ev = event_message(5, 0, events::PAUSE_VCPU, &[]);
        ev[8 + 4] = 99;
        s.write_all(&ev).unwrap();
        // A reply with a seq never sent.
        let n = host::encode_reply(ids::GET_VERSION, 4242, &[0; 16], &mut out).unwrap();
        let _ = s.write_all(&out[..n]);
        s
    });
    let options = LibkvmiOptions::default();
    let client = KvmiClient::listen_libkvmi(&path, Duration::from_secs(5), &options).unwrap();
    assert!(client.wait_closed(Duration::from_secs(5)));
    assert!(
        client.closed().unwrap().contains("bad event"),
        "{:?}",
        client.closed()
    );
    assert!(matches!(client.get_version(), Err(ClientError::Closed(_))));
    drop(vmm.join().unwrap());
}
