//! End-to-end: the libkvmi (`kvmi-v7`) dialect's commands and events beyond LibVMI's init,
//! read and breakpoint paths (`libkvmi.rs`): the permission answers, the reply switch of
//! `CONTROL_CMD_RESPONSE`, the handshake cookie, `--kvmi-socket`, registers, MSR and
//! single-step events, the query commands, `INJECT_EXCEPTION`'s TRAP and `--kvmi-wait`. Each
//! scenario is the libkvmi twin of a v4 one in `events.rs` where there is one.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kvmi::images::Image;
use kvmi_tests::libkvmi_peer::{Event, Listener, PeerError, SeqCounter, Session};
use kvmi_tests::socket_target::Target;
use protocol::frame::{HEADER_SIZE, Header};
use protocol::wire::libkvmi::event_layout::TrapEvent;
use protocol::wire::libkvmi::frame::Request;
use protocol::wire::libkvmi::{actions, events, handshake, ids};
use sha1::{Digest as _, Sha1};
use zerocopy::FromBytes as _;
use zerocopy::little_endian::U64;

use super::libkvmi::{
    CONNECT_WAIT, EXIT_WAIT, accept, assert_serial_grows, next_event, sock_dir, start, u64_at,
};

/// The IDs the docs' command table implements (CHECK_COMMAND answers 0 for each).
const IMPLEMENTED: [u16; 24] = [
    ids::GET_VERSION,
    ids::CHECK_COMMAND,
    ids::CHECK_EVENT,
    ids::GET_GUEST_INFO,
    ids::GET_VCPU_INFO,
    ids::PAUSE_VCPU,
    ids::CONTROL_VM_EVENTS,
    ids::CONTROL_EVENTS,
    ids::CONTROL_CR,
    ids::CONTROL_MSR,
    ids::GET_REGISTERS,
    ids::SET_REGISTERS,
    ids::GET_CPUID,
    ids::GET_XSAVE,
    ids::READ_PHYSICAL,
    ids::WRITE_PHYSICAL,
    ids::INJECT_EXCEPTION,
    ids::SET_PAGE_ACCESS,
    ids::GET_MTRR_TYPE,
    ids::CONTROL_CMD_RESPONSE,
    ids::GET_MAX_GFN,
    ids::GET_EPT_VIEW,
    ids::VCPU_TRANSLATE_GVA,
    ids::VCPU_CONTROL_SINGLESTEP,
];

/// IDs the docs list as not implemented (and 40, 45, 61, which kvmi-v7 does not number).
const NOT_IMPLEMENTED: [u16; 23] = [
    ids::CONTROL_VE,
    ids::GET_PAGE_ACCESS,
    ids::GET_MAP_TOKEN,
    ids::CONTROL_SPP,
    ids::GET_PAGE_WRITE_BITMAP,
    ids::SET_PAGE_WRITE_BITMAP,
    ids::SET_VE_INFO_PAGE,
    ids::SET_PAGE_SVE,
    ids::GET_NEXT_AVAILABLE_GFN,
    ids::SWITCH_EPT_VIEW,
    ids::DISABLE_VE,
    ids::CONTROL_EPT_VIEW,
    ids::VCPU_GET_XCR,
    ids::VCPU_SET_XSAVE,
    ids::QUERY_PHYSICAL,
    40,
    ids::VCPU_ALLOC_GFN,
    ids::VCPU_FREE_GFN,
    ids::CREATE_EPT_VIEW,
    ids::DESTROY_EPT_VIEW,
    45,
    ids::VCPU_CHANGE_GFN,
    61,
];

fn cmd_response(enable: bool, now: bool) -> Request<'static> {
    Request::ControlCmdResponse {
        enable,
        now,
        flags: 0,
    }
}

/// The VMM's error code of a failed peer call (panics on success or a non-KVM failure).
fn kvm_err<T: std::fmt::Debug>(r: Result<T, PeerError>, what: &str) -> i32 {
    match r {
        Err(e) => e
            .kvm()
            .unwrap_or_else(|| panic!("{what}: not an error reply: {e}")),
        Ok(v) => panic!("{what}: succeeded with {v:?}"),
    }
}

/// Reads one whole message off the session's socket (no checks): header and payload.
fn read_raw_msg(s: &Session) -> (Header, Vec<u8>) {
    let mut r: &UnixStream = s.stream();
    let mut h = [0u8; HEADER_SIZE];
    r.read_exact(&mut h).expect("a message header");
    let hdr = Header::parse(&h).expect("a valid header");
    let mut payload = vec![0u8; hdr.size as usize];
    r.read_exact(&mut payload).expect("the payload");
    (hdr, payload)
}

fn trap_of(ev: &Event) -> TrapEvent {
    assert_eq!(ev.id(), events::TRAP, "not a TRAP event");
    TrapEvent::read_from_prefix(&ev.data)
        .expect("TRAP data (16 bytes)")
        .0
}

/// Waits for the guest's `gate waiting` line.
fn wait_gate(t: &Target) {
    assert!(
        t.wait_serial("gate waiting", Duration::from_secs(30)),
        "serial: {}; stderr: {}",
        t.serial(),
        t.stderr()
    );
}

fn open_gate(s: &mut Session, t: &Target) {
    s.write_physical(t.sym("gate"), &1u64.to_le_bytes())
        .expect("WRITE_PHYSICAL of sym.gate");
}

/// Asserts that no event arrives within `within` (the VM ending, which closes the socket,
/// counts as none).
fn assert_no_event(s: &mut Session, within: Duration, what: &str) {
    match s.wait_event(within) {
        Ok(ev) => panic!(
            "{what}: unexpected event {} from vCPU {} at rip {:#x}",
            ev.id(),
            ev.vcpu(),
            ev.regs().rip.get()
        ),
        Err(PeerError::Timeout) => {}
        Err(e) if e.is_closed() => {}
        Err(e) => panic!("{what}: {e}"),
    }
}

#[test]
fn libkvmi_check_event_and_check_command_answer_per_id_as_documented() {
    if !kvmi_tests::require_kvm("libkvmi_check_event_and_check_command_answer_per_id_as_documented")
    {
        return;
    }
    let (l, mut t, dir) = start("check", Image::TestGuest, "mode=spin", &[]);
    let mut s = accept(&l, &mut t);
    // CHECK_EVENT 0..=13: 0 for what this host raises (UNHOOK always), -KVM_EPERM for the
    // events PVM has no exit for and for CMD_ERROR; 14 is past the last event.
    let got: Vec<(u16, i32)> = (0..=14u16)
        .map(|e| {
            let code = match s.check_event(e) {
                Ok(()) => 0,
                Err(err) => err
                    .kvm()
                    .unwrap_or_else(|| panic!("CHECK_EVENT {e}: {err}")),
            };
            (e, code)
        })
        .collect();
    let want: Vec<(u16, i32)> = vec![
        (u16::from(events::UNHOOK), 0),
        (u16::from(events::CR), -1),
        (u16::from(events::MSR), 0),
        (u16::from(events::XSETBV), -1),
        (u16::from(events::BREAKPOINT), 0),
        (u16::from(events::HYPERCALL), 0),
        (u16::from(events::PF), 0),
        (u16::from(events::TRAP), 0),
        (u16::from(events::DESCRIPTOR), -1),
        (u16::from(events::CREATE_VCPU), 0),
        (u16::from(events::PAUSE_VCPU), 0),
        (u16::from(events::SINGLESTEP), 0),
        (u16::from(events::CMD_ERROR), -1),
        (u16::from(events::CPUID), -1),
        (14, -22),
    ];
    assert_eq!(got, want, "CHECK_EVENT answers (event, code)");
    // CHECK_COMMAND: every implemented ID 0, the others -KVM_EPERM, past the last -KVM_EINVAL.
    for id in IMPLEMENTED {
        s.check_command(id)
            .unwrap_or_else(|e| panic!("CHECK_COMMAND {id}: {e}"));
    }
    for id in NOT_IMPLEMENTED {
        assert_eq!(
            kvm_err(s.check_command(id), &format!("CHECK_COMMAND {id}")),
            -1,
            "CHECK_COMMAND {id}"
        );
    }
    for id in [ids::EVENT_REPLY, ids::EVENT, 64, 200] {
        assert_eq!(
            kvm_err(s.check_command(id), &format!("CHECK_COMMAND {id}")),
            -22,
            "CHECK_COMMAND {id}"
        );
    }
    // An unimplemented command itself: -KVM_ENOSYS, and the stream stays in step.
    assert_eq!(
        kvm_err(
            s.request(
                &Request::Other {
                    id: ids::GET_MAP_TOKEN,
                    vcpu: None,
                    body: &[],
                },
                0,
            ),
            "GET_MAP_TOKEN"
        ),
        -1000
    );
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 1);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_allow_commands_restricts_check_command_and_the_command_itself() {
    if !kvmi_tests::require_kvm(
        "libkvmi_allow_commands_restricts_check_command_and_the_command_itself",
    ) {
        return;
    }
    let (l, mut t, dir) = start(
        "allow",
        Image::TestGuest,
        "mode=spin",
        &[
            "--allow-commands",
            "get_version,get_guest_info,read_physical",
        ],
    );
    let mut s = accept(&l, &mut t);
    assert!(
        t.wait_serial("spinning", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    s.check_command(ids::READ_PHYSICAL)
        .expect("READ_PHYSICAL allowed");
    s.check_command(ids::GET_GUEST_INFO)
        .expect("GET_GUEST_INFO allowed");
    assert_eq!(
        kvm_err(s.check_command(ids::WRITE_PHYSICAL), "CHECK_COMMAND 18"),
        -1
    );
    assert_eq!(
        kvm_err(s.check_command(ids::GET_REGISTERS), "CHECK_COMMAND 13"),
        -1
    );
    let counter = t.sym("probe_counter");
    let before = s.read_physical(counter, 8).expect("READ_PHYSICAL allowed");
    assert_eq!(
        kvm_err(
            s.write_physical(counter, &0u64.to_le_bytes()),
            "WRITE_PHYSICAL"
        ),
        -1,
        "WRITE_PHYSICAL is not allowed: -KVM_EPERM"
    );
    assert_eq!(
        kvm_err(s.get_registers(0, &[]), "GET_REGISTERS"),
        -1,
        "GET_REGISTERS is not allowed"
    );
    // The refused write did nothing: the spinning guest's counter only grew.
    let after = s.read_physical(counter, 8).expect("READ_PHYSICAL");
    assert!(
        u64_at(&after, 0) >= u64_at(&before, 0),
        "counter went from {:#x} to {:#x}",
        u64_at(&before, 0),
        u64_at(&after, 0)
    );
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 1);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_control_cmd_response_silences_replies_and_the_stream_stays_in_step() {
    if !kvmi_tests::require_kvm(
        "libkvmi_control_cmd_response_silences_replies_and_the_stream_stays_in_step",
    ) {
        return;
    }
    let (l, mut t, dir) = start("cmdresp", Image::TestGuest, "mode=spin", &[]);
    let mut s = accept(&l, &mut t);
    // {enable 0, now 1}: not answered itself.
    s.send(&cmd_response(false, true)).expect("send {0, 1}");
    // Failing error-only commands while replies are off: dropped, the session stays.
    s.send(&Request::PauseVcpu {
        vcpu: 5,
        wait: true,
    })
    .expect("send PAUSE_VCPU 5");
    s.send(&Request::ControlEvents {
        vcpu: 7,
        event: events::BREAKPOINT,
        enable: true,
    })
    .expect("send CONTROL_EVENTS on vCPU 7");
    // {enable 1, now 1}: answered, under its own seq, and nothing came before it (the peer
    // fails on any other reply first).
    s.request(&cmd_response(true, true), 0)
        .expect("{1, 1} is answered first");
    // The next command's reply is the next message, with that command's seq.
    let sent = s.send(&Request::GetGuestInfo).expect("send GET_GUEST_INFO");
    let (hdr, payload) = read_raw_msg(&s);
    assert_eq!(
        (hdr.id, hdr.seq),
        (ids::GET_GUEST_INFO, sent),
        "GET_GUEST_INFO's reply"
    );
    assert_eq!(&payload[..8], &[0; 8], "error code 0");
    assert_eq!(u32::from_le_bytes(payload[8..12].try_into().unwrap()), 1);
    // Those commands had failed: vCPU 5 and 7 do not exist.
    assert_eq!(
        kvm_err(
            s.request(
                &Request::PauseVcpu {
                    vcpu: 5,
                    wait: true
                },
                0
            ),
            "PAUSE_VCPU 5"
        ),
        -22
    );
    assert_eq!(
        kvm_err(
            s.control_events(7, events::BREAKPOINT, true),
            "CONTROL_EVENTS 7"
        ),
        -22
    );

    // {enable 0, now 0}: answered itself; the next command is not.
    s.request(&cmd_response(false, false), 0)
        .expect("{0, 0} is answered");
    let silent = s
        .send(&Request::ControlEvents {
            vcpu: 0,
            event: events::BREAKPOINT,
            enable: true,
        })
        .expect("send CONTROL_EVENTS on vCPU 0");
    s.request(&cmd_response(true, true), 0)
        .unwrap_or_else(|e| panic!("{{1, 1}} after CONTROL_EVENTS seq {silent}: {e}"));
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 1);
    assert!(t.running(), "stderr: {}", t.stderr());
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_secret_cookie_admits_only_the_right_tool_and_a_wrong_one_is_closed_silently() {
    if !kvmi_tests::require_kvm(
        "libkvmi_secret_cookie_admits_only_the_right_tool_and_a_wrong_one_is_closed_silently",
    ) {
        return;
    }
    let dir = sock_dir("secret");
    let secret = dir.join("secret.bin");
    let bytes = b"an introspection secret\x00\xff\n";
    std::fs::write(&secret, bytes).expect("secret file");
    let hash: [u8; handshake::COOKIE_HASH_SIZE] = Sha1::digest(bytes).into();
    let sock = dir.join("tool.sock");
    let l = Listener::bind(&sock).expect("bind the tool socket");
    let secret_arg = secret.to_str().expect("utf-8 path").to_string();
    let mut t = Target::start_connecting(
        Image::DemoTarget,
        "",
        &sock,
        &["--kvmi-dialect", "libkvmi", "--kvmi-secret", &secret_arg],
        None,
    );
    // 1. A wrong cookie: the shim reads it and closes without sending anything.
    let mut raw = l
        .accept_raw(CONNECT_WAIT)
        .unwrap_or_else(|e| panic!("no connection: {e}; stderr: {}", t.stderr()));
    let mut hello = [0u8; 96];
    raw.read_exact(&mut hello).expect("the VMM's handshake");
    assert_eq!(&hello[..4], &96u32.to_le_bytes());
    let mut wrong = hash;
    wrong[0] ^= 1;
    let mut answer = 24u32.to_le_bytes().to_vec();
    answer.extend_from_slice(&wrong);
    raw.write_all(&answer).expect("answer with a wrong cookie");
    raw.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let closed = loop {
        match raw.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                break !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    };
    assert!(closed, "a wrong cookie was not closed");
    assert!(got.is_empty(), "the shim sent {got:02x?} to a wrong cookie");
    drop(raw);
    assert_serial_grows(&mut t, "after the wrong cookie");
    // 2. The right cookie, on the shim's next attempt: served.
    let deadline = Instant::now() + CONNECT_WAIT;
    let mut s = loop {
        match l.accept_with(Duration::from_millis(500), Some(hash)) {
            Ok(s) => break s,
            Err(PeerError::Timeout) if t.running() && Instant::now() < deadline => {}
            Err(e) => panic!("no session with the right cookie: {e}; {}", t.stderr()),
        }
    };
    assert!(s.get_version() >= 1);
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 1);
    assert!(!t.stderr().contains("panicked"), "{}", t.stderr());
    assert_serial_grows(&mut t, "with the right cookie");
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_only_flags_are_refused_at_startup_with_one_line() {
    if !kvmi_tests::require_kvm("libkvmi_only_flags_are_refused_at_startup_with_one_line") {
        return;
    }
    let dir = sock_dir("flags");
    let sock = dir.join("tool.sock");
    let sock = sock.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--kvmi-connect",
                sock,
                "--kvmi-dialect",
                "libkvmi",
                "--uuid",
                "bad",
            ],
            "--uuid \"bad\" is not a UUID",
        ),
        (
            &["--kvmi-connect", sock, "--name", "vm"],
            "--name applies to --kvmi-dialect libkvmi only",
        ),
        (
            &[
                "--kvmi-socket",
                sock,
                "--uuid",
                "5f1c3a2b-7d4e-4f60-8a9b-0c1d2e3f4a5b",
            ],
            "--uuid applies to --kvmi-dialect libkvmi only",
        ),
    ];
    for (args, message) in cases {
        let out = Command::new(kvmi_tests::kvmi_bin())
            .args(["run", "--image", "test-guest", "--cmdline", "mode=hello"])
            .args(args)
            .output()
            .expect("run kvmi");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A bad option value is a VMM error (README: 125, "bad image or option"), not a
        // clap syntax error (2).
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("kvmi: error: ") && stderr.contains(message),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: the guest ran");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_on_kvmi_socket_the_tool_connects_and_the_handshake_and_reads_work() {
    if !kvmi_tests::require_kvm(
        "libkvmi_on_kvmi_socket_the_tool_connects_and_the_handshake_and_reads_work",
    ) {
        return;
    }
    let mut t = Target::start(
        Image::TestGuest,
        "mode=spin",
        &["--kvmi-dialect", "libkvmi", "--name", "listening-vm"],
    );
    let deadline = Instant::now() + CONNECT_WAIT;
    let stream = loop {
        match UnixStream::connect(&t.socket) {
            Ok(st) => break st,
            Err(e) => {
                assert!(
                    t.running() && Instant::now() < deadline,
                    "cannot connect to {}: {e}; stderr: {}",
                    t.socket.display(),
                    t.stderr()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut s = Session::handshake(stream, SeqCounter::new(), None)
        .unwrap_or_else(|e| panic!("handshake: {e}; stderr: {}", t.stderr()));
    assert_eq!(s.vmm().struct_size, 96);
    assert_eq!(s.name(), "listening-vm");
    assert!(s.get_version() >= 1);
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 1);
    assert!(
        t.wait_serial("spinning", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    // READ_PHYSICAL of the probe counter, which the spinning guest increments.
    let counter = t.sym("probe_counter");
    let first = u64_at(&s.read_physical(counter, 8).expect("READ_PHYSICAL"), 0);
    let grew = kvmi_tests::wait::within(Duration::from_secs(10), || {
        u64_at(&s.read_physical(counter, 8).expect("READ_PHYSICAL"), 0) > first
    });
    assert!(grew, "probe counter stuck at {first:#x}");
    drop(s);
}

#[test]
fn libkvmi_breakpoint_event_registers_and_set_registers_change_what_the_guest_prints() {
    if !kvmi_tests::require_kvm(
        "libkvmi_breakpoint_event_registers_and_set_registers_change_what_the_guest_prints",
    ) {
        return;
    }
    let (l, mut t, dir) = start(
        "bpregs",
        Image::TestGuest,
        "mode=breakpoint n=1 gate=1",
        &[],
    );
    let mut s = accept(&l, &mut t);
    wait_gate(&t);
    let target = t.sym("breakpoint_target");
    let original = s.read_physical(target, 1).expect("read the first byte");
    s.write_physical(target, &[0xcc]).expect("write int3");
    s.control_events(0, events::BREAKPOINT, true)
        .expect("CONTROL_EVENTS BREAKPOINT");
    open_gate(&mut s, &t);
    let ev = next_event(&mut s, &t);
    assert_eq!(ev.id(), events::BREAKPOINT);
    assert_eq!(ev.regs().rip.get(), target);
    assert_eq!(ev.mode(), 8);
    assert_eq!(ev.breakpoint().expect("BREAKPOINT data").gpa.get(), target);
    // The argument (rdi) is 0; GET_REGISTERS agrees with the event.
    assert_eq!(ev.regs().rdi.get(), 0, "breakpoint_target's argument");
    let r = s.get_registers(0, &[]).expect("GET_REGISTERS in the event");
    assert_eq!(r.regs.rip.get(), target);
    assert_eq!(r.regs.rsp.get(), ev.regs().rsp.get());
    s.write_physical(target, &original)
        .expect("restore the byte");
    // rdi = 0x41: breakpoint_target returns 0x42 = 66.
    let mut regs = *ev.regs();
    regs.rdi = U64::new(0x41);
    s.set_registers(0, &regs).expect("SET_REGISTERS");
    assert_eq!(
        s.get_registers(0, &[])
            .expect("GET_REGISTERS")
            .regs
            .rdi
            .get(),
        0x41
    );
    s.reply_event(&ev, actions::RETRY, &[])
        .expect("reply RETRY");
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "stderr: {}", t.stderr());
    assert!(
        t.serial().contains("breakpoint calls=1 result=66"),
        "{}",
        t.serial()
    );
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_msr_event_reports_old_and_new_values_and_continue_writes_new_val() {
    if !kvmi_tests::require_kvm(
        "libkvmi_msr_event_reports_old_and_new_values_and_continue_writes_new_val",
    ) {
        return;
    }
    let (l, mut t, dir) = start(
        "msr",
        Image::TestGuest,
        "mode=msr msr=0x174 value=0x10 gate=1",
        &[],
    );
    let mut s = accept(&l, &mut t);
    wait_gate(&t);
    s.control_events(0, events::MSR, true)
        .expect("CONTROL_EVENTS MSR");
    s.control_msr(0, 0x174, true).expect("CONTROL_MSR 0x174");
    assert_eq!(
        kvm_err(s.control_msr(0, 0x830, true), "CONTROL_MSR 0x830"),
        -22,
        "an x2APIC MSR"
    );
    open_gate(&mut s, &t);
    let ev = next_event(&mut s, &t);
    assert_eq!(ev.id(), events::MSR);
    assert_eq!(ev.vcpu(), 0);
    let m = ev.msr().expect("MSR data");
    assert_eq!(m.msr.get(), 0x174);
    assert_eq!(m.new_value.get(), 0x10);
    assert_eq!(
        m.old_value.get(),
        ev.msrs().sysenter_cs.get(),
        "old value vs the event's MSRs"
    );
    s.reply_event(&ev, actions::CONTINUE, &0x23u64.to_le_bytes())
        .expect("reply CONTINUE new_val 0x23");
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "stderr: {}", t.stderr());
    assert!(
        t.serial().contains("msr 0x174 wrote 0x10 read 0x23"),
        "{}",
        t.serial()
    );
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_single_step_events_report_rips_in_order_until_stepping_is_off() {
    if !kvmi_tests::require_kvm(
        "libkvmi_single_step_events_report_rips_in_order_until_stepping_is_off",
    ) {
        return;
    }
    let (l, mut t, dir) = start("step", Image::TestGuest, "mode=step n=1 gate=1", &[]);
    let mut s = accept(&l, &mut t);
    wait_gate(&t);
    let step = t.sym("step_target");
    let original = s.read_physical(step, 1).expect("read step_target");
    assert_eq!(original, vec![0x90], "step_target starts with a nop");
    s.write_physical(step, &[0xcc]).expect("write int3");
    s.control_events(0, events::BREAKPOINT, true)
        .expect("CONTROL_EVENTS BREAKPOINT");
    open_gate(&mut s, &t);
    let ev = next_event(&mut s, &t);
    assert_eq!(ev.id(), events::BREAKPOINT);
    assert_eq!(ev.regs().rip.get(), step);
    let ret = u64_at(
        &s.read_physical(ev.regs().rsp.get(), 8)
            .expect("read the return address"),
        0,
    );
    s.write_physical(step, &original).expect("restore the nop");
    s.control_singlestep(0, true)
        .expect("VCPU_CONTROL_SINGLESTEP on");
    s.control_events(0, events::SINGLESTEP, true)
        .expect("CONTROL_EVENTS SINGLESTEP");
    s.reply_event(&ev, actions::RETRY, &[])
        .expect("reply RETRY");
    let mut rips = Vec::new();
    for _ in 0..5 {
        let st = next_event(&mut s, &t);
        assert_eq!(st.id(), events::SINGLESTEP, "event {}", st.id());
        assert_eq!(st.singlestep().expect("SINGLESTEP data").failed, 0);
        rips.push(st.regs().rip.get());
        if rips.len() == 5 {
            s.control_singlestep(0, false)
                .expect("VCPU_CONTROL_SINGLESTEP off");
        }
        s.reply_event(&st, actions::CONTINUE, &[])
            .expect("reply CONTINUE");
    }
    assert_eq!(rips, vec![step + 1, step + 2, step + 3, step + 4, ret]);
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "stderr: {}", t.stderr());
    assert!(t.serial().contains("step calls=1"), "{}", t.serial());
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_singlestep_event_enabled_alone_steps_nothing() {
    if !kvmi_tests::require_kvm("libkvmi_singlestep_event_enabled_alone_steps_nothing") {
        return;
    }
    let (l, mut t, dir) = start("stepoff", Image::TestGuest, "mode=step n=3 gate=1", &[]);
    let mut s = accept(&l, &mut t);
    wait_gate(&t);
    // What LibVMI's vmi_init does on every vCPU: the event on, VCPU_CONTROL_SINGLESTEP not.
    s.control_events(0, events::SINGLESTEP, true)
        .expect("CONTROL_EVENTS SINGLESTEP");
    open_gate(&mut s, &t);
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "stderr: {}", t.stderr());
    assert!(t.serial().contains("step calls=3"), "{}", t.serial());
    assert_no_event(
        &mut s,
        Duration::from_secs(1),
        "SINGLESTEP without stepping",
    );
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_queries_translate_mtrr_cpuid_xsave_vcpu_info_and_read_past_ram() {
    if !kvmi_tests::require_kvm(
        "libkvmi_queries_translate_mtrr_cpuid_xsave_vcpu_info_and_read_past_ram",
    ) {
        return;
    }
    let (l, mut t, dir) = start("query", Image::TestGuest, "mode=spin", &[]);
    let mut s = accept(&l, &mut t);
    assert!(
        t.wait_serial("spinning", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    let target = t.sym("breakpoint_target");
    // VCPU_TRANSLATE_GVA: kernel text is identity mapped; an unmapped address is !0.
    assert_eq!(s.translate_gva(0, target).expect("TRANSLATE_GVA"), target);
    assert_eq!(
        s.translate_gva(0, target + 0x123).expect("TRANSLATE_GVA"),
        target + 0x123
    );
    assert_eq!(
        s.translate_gva(0, 0x0000_7f00_dead_0000)
            .expect("TRANSLATE_GVA of an unmapped address"),
        u64::MAX
    );
    // GET_MTRR_TYPE: write-back RAM, uncacheable past it.
    let end = s.get_maximum_gfn().expect("GET_MAX_GFN") * 4096;
    assert_eq!(s.get_mtrr_type(target).expect("GET_MTRR_TYPE of RAM"), 6);
    assert_eq!(s.get_mtrr_type(0).expect("GET_MTRR_TYPE of page 0"), 6);
    assert_eq!(
        s.get_mtrr_type(end).expect("GET_MTRR_TYPE past RAM"),
        0,
        "{end:#x}"
    );
    // GET_CPUID: leaf 0 has a max basic leaf and a vendor; an absent leaf is -KVM_ENOENT.
    let leaf0 = s.get_cpuid(0, 0, 0).expect("GET_CPUID 0");
    assert_ne!(leaf0[0], 0, "max basic leaf");
    assert_ne!(&leaf0[1..], &[0, 0, 0], "vendor string");
    let ext = s
        .get_cpuid(0, 0x8000_0000, 0)
        .expect("GET_CPUID 0x80000000");
    assert!(ext[0] >= 0x8000_0001, "max extended leaf {:#x}", ext[0]);
    // The hypervisor leaf, as the guest sees it: KVM's signature.
    let hv = s
        .get_cpuid(0, 0x4000_0000, 0)
        .expect("GET_CPUID 0x40000000");
    let sig: Vec<u8> = hv[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
    assert_eq!(&sig, b"KVMKVMKVM\0\0\0", "hypervisor leaf {hv:#x?}");
    assert!(hv[0] >= 0x4000_0001, "max hypervisor leaf {:#x}", hv[0]);
    assert_eq!(
        kvm_err(s.get_cpuid(0, 0x2000_0000, 0), "GET_CPUID 0x20000000"),
        -2,
        "an absent leaf"
    );
    // GET_XSAVE: the legacy area at least (512 bytes), MXCSR at its default.
    let seq = s.send(&Request::GetXsave { vcpu: 0 }).expect("GET_XSAVE");
    let (hdr, payload) = read_raw_msg(&s);
    assert_eq!((hdr.id, hdr.seq), (ids::GET_XSAVE, seq));
    assert_eq!(&payload[..8], &[0; 8], "error code 0");
    let xsave = &payload[8..];
    assert!(xsave.len() >= 512, "XSAVE area of {} bytes", xsave.len());
    let mxcsr = u32::from_le_bytes(xsave[24..28].try_into().unwrap());
    assert_eq!(mxcsr & 0xffc0, 0x1f80, "MXCSR {mxcsr:#x}");
    // GET_VCPU_INFO past the vCPU count; READ_PHYSICAL past RAM.
    assert_eq!(
        kvm_err(
            s.request(&Request::GetVcpuInfo { vcpu: 1 }, 8),
            "GET_VCPU_INFO 1"
        ),
        -22
    );
    assert_eq!(
        kvm_err(s.read_physical(end, 8), "READ_PHYSICAL past RAM"),
        -2
    );
    assert_eq!(
        kvm_err(s.write_physical(end, &[1]), "WRITE_PHYSICAL past RAM"),
        -2
    );
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 1);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts `mode=spin` and injects #PF (error 2, cr2 0xdeadb000) without any CONTROL_EVENTS;
/// returns the TRAP event.
fn inject_pf(tag: &str) -> (Listener, Target, Session, Event, PathBuf) {
    let (l, mut t, dir) = start(tag, Image::TestGuest, "mode=spin", &[]);
    let mut s = accept(&l, &mut t);
    assert!(
        t.wait_serial("spinning", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    s.inject_exception(0, 0xdead_b000, 2, 14)
        .expect("INJECT_EXCEPTION #PF");
    let ev = next_event(&mut s, &t);
    assert_eq!(ev.id(), events::TRAP, "event {}", ev.id());
    assert_eq!(ev.vcpu(), 0);
    let trap = trap_of(&ev);
    assert_eq!(
        (trap.vector, trap.error_code.get(), trap.cr2.get()),
        (14, 2, 0xdead_b000)
    );
    (l, t, s, ev, dir)
}

#[test]
fn libkvmi_injected_page_fault_raises_trap_unasked_and_reaches_the_guest_handler() {
    if !kvmi_tests::require_kvm(
        "libkvmi_injected_page_fault_raises_trap_unasked_and_reaches_the_guest_handler",
    ) {
        return;
    }
    let (_l, mut t, mut s, ev, dir) = inject_pf("trap");
    s.reply_event(&ev, actions::CONTINUE, &[])
        .expect("reply CONTINUE");
    let code = t.wait_exit(EXIT_WAIT);
    let serial = t.serial();
    assert!(
        serial.contains("EXCEPTION vector=14 err=0x2") && serial.contains("cr2=0xdeadb000"),
        "{serial}"
    );
    assert_eq!(
        code,
        Some(255),
        "0x10e clamps to 255; stderr: {}",
        t.stderr()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_retry_to_trap_is_a_protocol_error_that_closes_the_session() {
    if !kvmi_tests::require_kvm("libkvmi_retry_to_trap_is_a_protocol_error_that_closes_the_session")
    {
        return;
    }
    let (_l, mut t, mut s, ev, dir) = inject_pf("trapretry");
    s.reply_event(&ev, actions::RETRY, &[]).expect("send RETRY");
    assert!(
        s.wait_closed(Duration::from_secs(10)),
        "RETRY to TRAP was accepted; stderr: {}",
        t.stderr()
    );
    // Detached and unhooked: the guest takes the exception and its handler exits.
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(255), "stderr: {}", t.stderr());
    assert!(
        t.serial().contains("EXCEPTION vector=14 err=0x2"),
        "{}",
        t.serial()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_kvmi_wait_starts_the_vcpus_after_the_handshake_without_a_create_vcpu_event() {
    if !kvmi_tests::require_kvm(
        "libkvmi_kvmi_wait_starts_the_vcpus_after_the_handshake_without_a_create_vcpu_event",
    ) {
        return;
    }
    let (l, mut t, dir) = start("wait", Image::TestGuest, "mode=spin", &["--kvmi-wait"]);
    // No tool yet: the vCPU waits.
    std::thread::sleep(Duration::from_millis(500));
    assert!(t.running(), "stderr: {}", t.stderr());
    assert!(
        !t.serial().contains("spinning"),
        "a vCPU ran before the handshake: {}",
        t.serial()
    );
    let mut s = accept(&l, &mut t);
    assert!(
        t.wait_serial("spinning", Duration::from_secs(20)),
        "the vCPU did not start after the handshake: {}",
        t.serial()
    );
    assert_no_event(
        &mut s,
        Duration::from_secs(1),
        "CREATE_VCPU was not enabled",
    );
    assert!(t.running(), "stderr: {}", t.stderr());
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}
