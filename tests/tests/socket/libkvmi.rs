//! End-to-end: the shim's libkvmi (`kvmi-v7`) dialect (`kvmi run --kvmi-dialect libkvmi
//! --kvmi-connect SOCK`) driven by the libkvmi stand-in (`kvmi_tests::libkvmi_peer`), which
//! listens before the VM starts, as libkvmi tools do. The scenarios replay what LibVMI's KVM
//! driver sends: init, reads under a pause, breakpoint and page-fault events, destroy, unhook,
//! and a hostile tool.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvmi::images::Image;
use kvmi_tests::libkvmi_peer::{Event, LIBVMI_MSRS, Listener, PeerError, Session};
use kvmi_tests::socket_target::Target;
use kvmi_tests::wait;
use protocol::wire::libkvmi::frame::Request;
use protocol::wire::libkvmi::{access, actions, events, ids};

/// How long the peer waits for the shim to connect (it reconnects with back-off).
pub(super) const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// How long a test waits for an event it expects.
pub(super) const EVENT_WAIT: Duration = Duration::from_secs(20);
/// How long a test waits for the VM to exit.
pub(super) const EXIT_WAIT: Duration = Duration::from_secs(60);

const UUID: &str = "5f1c3a2b-7d4e-4f60-8a9b-0c1d2e3f4a5b";

/// The events LibVMI's `vmi_init` enables on every vCPU (`VMI_INIT_EVENTS`).
const INIT_EVENTS: [u8; 4] = [events::CR, events::MSR, events::PF, events::SINGLESTEP];

/// A private directory holding the tool's socket.
pub(super) fn sock_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kvmi-libkvmi-{tag}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("socket dir");
    dir
}

/// Binds the peer, then starts `image` connecting to it in the libkvmi dialect.
pub(super) fn start(
    tag: &str,
    image: Image,
    cmdline: &str,
    extra: &[&str],
) -> (Listener, Target, PathBuf) {
    let dir = sock_dir(tag);
    let sock = dir.join("tool.sock");
    let listener = Listener::bind(&sock).expect("bind the tool socket");
    let mut args = vec!["--kvmi-dialect", "libkvmi"];
    args.extend_from_slice(extra);
    let t = Target::start_connecting(image, cmdline, &sock, &args, None);
    (listener, t, dir)
}

/// Accepts the shim's next connection (handshake + GET_VERSION), or fails with its stderr
/// (at once when the VM process has ended).
pub(super) fn accept(l: &Listener, t: &mut Target) -> Session {
    let deadline = std::time::Instant::now() + CONNECT_WAIT;
    loop {
        match l.accept(Duration::from_millis(500)) {
            Ok(s) => return s,
            Err(PeerError::Timeout) if t.running() && std::time::Instant::now() < deadline => {}
            Err(e) => panic!(
                "no libkvmi session: {e}; serial: {}; stderr: {}",
                t.serial(),
                t.stderr()
            ),
        }
    }
}

/// The next event, or a failure with the VM's output.
pub(super) fn next_event(s: &mut Session, t: &Target) -> Event {
    s.wait_event(EVENT_WAIT).unwrap_or_else(|e| {
        panic!(
            "no event: {e}; serial: {}; stderr: {}",
            t.serial(),
            t.stderr()
        )
    })
}

/// Collects exactly one PAUSE_VCPU event per vCPU (any other event fails the test).
fn pause_events(s: &mut Session, t: &Target, vcpus: u16) -> Vec<Event> {
    let mut got: Vec<Event> = Vec::new();
    while got.len() < usize::from(vcpus) {
        let ev = next_event(s, t);
        assert_eq!(ev.id(), events::PAUSE_VCPU, "unexpected event {}", ev.id());
        assert!(ev.vcpu() < vcpus, "PAUSE_VCPU from vCPU {}", ev.vcpu());
        assert!(
            got.iter().all(|g| g.vcpu() != ev.vcpu()),
            "two PAUSE_VCPU events from vCPU {}",
            ev.vcpu()
        );
        assert_eq!(ev.data.len(), 0, "PAUSE_VCPU carries no data");
        got.push(ev);
    }
    got
}

/// LibVMI's `vmi_resume_vm`: CONTINUE to every PAUSE_VCPU event.
fn resume(s: &mut Session, paused: &[Event]) {
    for ev in paused {
        s.reply_event(ev, actions::CONTINUE, &[])
            .expect("reply CONTINUE");
    }
}

/// Asserts that the guest's serial output keeps growing (the VM runs).
pub(super) fn assert_serial_grows(t: &mut Target, what: &str) {
    assert!(t.running(), "{what}: the VM died; stderr: {}", t.stderr());
    let len = t.serial().len();
    assert!(
        t.wait_serial_growth(len, Duration::from_secs(20)),
        "{what}: the serial output stopped at {len} bytes; stderr: {}",
        t.stderr()
    );
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// (pid, name) of every used slot of the demo target's task table, read with READ_PHYSICAL.
fn demo_tasks(t: &Target, s: &mut Session) -> Vec<(u64, String)> {
    let p = &t.profile;
    let base = t.sym("task_table");
    let size = p.structs["task"].size;
    let max = p.constant("max_tasks").expect("const.max_tasks");
    let table = s
        .read_physical_range(base, (size * max) as usize)
        .expect("READ_PHYSICAL of the task table");
    let field = |f: &str| p.field("task", f).unwrap_or_else(|| panic!("task.{f}")) as usize;
    let name_len = p.constant("task_name_len").expect("const.task_name_len") as usize;
    let free = p
        .constant("task_state_free")
        .expect("const.task_state_free");
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&table[at..at + 4]);
        u64::from_le_bytes(b)
    };
    (0..max as usize)
        .map(|i| i * size as usize)
        .filter(|&e| word(e + field("state")) != free)
        .map(|e| {
            let raw = &table[e + field("name")..e + field("name") + name_len];
            let name = raw
                .iter()
                .take_while(|&&b| b != 0)
                .map(|&b| b as char)
                .collect();
            (word(e + field("pid")), name)
        })
        .collect()
}

#[test]
fn libkvmi_init_handshake_version_guest_info_events_max_gfn_and_registers() {
    if !kvmi_tests::require_kvm(
        "libkvmi_init_handshake_version_guest_info_events_max_gfn_and_registers",
    ) {
        return;
    }
    let (l, mut t, dir) = start(
        "init",
        Image::TestGuest,
        "mode=spin",
        &[
            "--vcpus",
            "2",
            "--memory",
            "64",
            "--uuid",
            UUID,
            "--name",
            "libkvmi-init",
        ],
    );
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut s = accept(&l, &mut t);
    // Handshake: what --uuid and --name said, and a start time of about now.
    assert_eq!(s.vmm().struct_size, 96);
    assert_eq!(s.vmm().uuid_text(), UUID);
    assert_eq!(s.name(), "libkvmi-init");
    assert!(
        (before - 120..=before + 120).contains(&s.start_time()),
        "start_time {} vs now {before}",
        s.start_time()
    );
    assert!(s.get_version() >= 1);
    assert_eq!(&s.version_reply().features.other, &[0; 4]);
    // kvm_init_vmi: the vCPU count.
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 2);
    assert!(s.get_tsc_speed().is_ok(), "GET_VCPU_INFO");
    // VMI_INIT_EVENTS: any error here fails vmi_init.
    for vcpu in 0..2 {
        for ev in INIT_EVENTS {
            s.control_events(vcpu, ev, true)
                .unwrap_or_else(|e| panic!("CONTROL_EVENTS {ev} on vCPU {vcpu}: {e}"));
        }
    }
    // driver_get_memsize.
    let gfn = s.get_maximum_gfn().expect("GET_MAX_GFN");
    assert!(gfn * 4096 >= 64 << 20, "max gfn {gfn:#x} below 64 MiB");
    // vmi_get_vcpureg: GET_REGISTERS with LibVMI's 7 MSRs.
    let r = s
        .get_registers(0, &LIBVMI_MSRS)
        .expect("GET_REGISTERS with 7 MSRs (472 + 112 bytes)");
    let idx: Vec<u32> = r.msrs.iter().map(|e| e.index.get()).collect();
    assert_eq!(idx, LIBVMI_MSRS, "MSR indices echoed in order");
    let efer = r.msr(0xc000_0080).expect("EFER");
    assert_eq!(efer & 0x500, 0x500, "EFER {efer:#x}: LME and LMA");
    assert_eq!(r.sregs.efer.get() & 0x500, 0x500);
    assert_eq!(r.mode, 8, "64-bit mode");
    let text = t.profile.range("kernel_text").expect("range.kernel_text");
    assert!(
        (text.start..text.end).contains(&r.regs.rip.get()),
        "rip {:#x} outside kernel text",
        r.regs.rip.get()
    );
    // Permissions and unknown IDs.
    s.check_command(ids::GET_REGISTERS)
        .expect("GET_REGISTERS allowed");
    s.check_command(ids::READ_PHYSICAL)
        .expect("READ_PHYSICAL allowed");
    s.check_event(u16::from(events::BREAKPOINT))
        .expect("BREAKPOINT allowed");
    assert_eq!(
        s.check_command(ids::CONTROL_SPP).unwrap_err().kvm(),
        Some(-1),
        "CONTROL_SPP is not implemented: -KVM_EPERM"
    );
    let unknown = s
        .request(
            &Request::Other {
                id: 200,
                vcpu: None,
                body: &[],
            },
            0,
        )
        .unwrap_err();
    assert_eq!(unknown.kvm(), Some(-1000), "unknown ID: -KVM_ENOSYS");
    // The stream is still in step.
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 2);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_read_under_pause_sees_the_demo_task_table_and_resume_needs_one_reply_per_vcpu() {
    if !kvmi_tests::require_kvm(
        "libkvmi_read_under_pause_sees_the_demo_task_table_and_resume_needs_one_reply_per_vcpu",
    ) {
        return;
    }
    let (l, mut t, dir) = start("read", Image::DemoTarget, "", &["--vcpus", "2"]);
    let mut s = accept(&l, &mut t);
    assert!(
        t.wait_serial("heartbeat round=2", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    let vcpus = s.get_vcpu_count().expect("GET_GUEST_INFO") as u16;
    assert_eq!(vcpus, 2);
    s.pause_all_vcpus(vcpus).expect("pause all vCPUs");
    let paused = pause_events(&mut s, &t, vcpus);
    // Paused: the guest prints nothing more.
    let len = t.serial().len();
    let list = demo_tasks(&t, &mut s);
    let names: Vec<&str> = list.iter().map(|(_, n)| n.as_str()).collect();
    for want in ["init", "secret-reader", "agent-caller", "busy"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // The demo's rootkit, once it ran, has renamed itself `kworker/0` and marked `monitor`
    // exited (its entry stays until the slot is reused): before that, both are there by name.
    let tampered = names.contains(&"kworker/0");
    assert_eq!(names.contains(&"rootkit"), !tampered, "{names:?}");
    if !tampered {
        assert!(names.contains(&"monitor"), "{names:?}");
    }
    // Each task is logged after its table entry is written, so a task the pause caught in
    // between is logged once the guest runs again: the lines are checked after the resume.
    let lines: Vec<String> = list
        .iter()
        .filter(|(_, name)| !name.starts_with("worker") && name != "kworker/0")
        .map(|(pid, name)| format!("task created pid={pid} name={name} "))
        .collect();
    // A page read whole (as LibVMI's page cache does) holds the same bytes.
    let base = t.sym("task_table");
    let page = s
        .read_physical(base & !0xfff, 4096)
        .expect("READ_PHYSICAL of a page");
    let again = s
        .read_physical_range(base, 64)
        .expect("READ_PHYSICAL of the table start");
    let off = (base & 0xfff) as usize;
    let n = 64.min(4096 - off);
    assert_eq!(&page[off..off + n], &again[..n]);
    assert_eq!(t.serial().len(), len, "the guest ran while paused");
    resume(&mut s, &paused);
    // Exactly one PAUSE_VCPU per vCPU: nothing more arrives.
    match s.wait_event(Duration::from_secs(1)) {
        Err(PeerError::Timeout) => {}
        Ok(ev) => panic!("an extra event {} from vCPU {}", ev.id(), ev.vcpu()),
        Err(e) => panic!("after resume: {e}; stderr: {}", t.stderr()),
    }
    assert_serial_grows(&mut t, "after resume");
    for line in &lines {
        assert!(
            t.wait_serial(line, Duration::from_secs(10)),
            "{line} not logged: {}",
            t.serial()
        );
    }
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_int3_written_by_the_tool_raises_breakpoint_and_retry_after_restoring_runs_on() {
    if !kvmi_tests::require_kvm(
        "libkvmi_int3_written_by_the_tool_raises_breakpoint_and_retry_after_restoring_runs_on",
    ) {
        return;
    }
    let (l, mut t, dir) = start("bp", Image::TestGuest, "mode=breakpoint n=1 gate=1", &[]);
    let mut s = accept(&l, &mut t);
    assert!(
        t.wait_serial("gate waiting", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    let target = t.sym("breakpoint_target");
    let original = s.read_physical(target, 1).expect("read the first byte");
    assert_ne!(original[0], 0xcc);
    s.write_physical(target, &[0xcc]).expect("write int3");
    assert_eq!(s.read_physical(target, 1).unwrap(), vec![0xcc]);
    s.control_events(0, events::BREAKPOINT, true)
        .expect("CONTROL_EVENTS BREAKPOINT");
    // The libkvmi way to open the gate: WRITE_PHYSICAL of sym.gate.
    s.write_physical(t.sym("gate"), &1u64.to_le_bytes())
        .expect("open the gate");
    let ev = next_event(&mut s, &t);
    assert_eq!(ev.id(), events::BREAKPOINT);
    assert_eq!(ev.vcpu(), 0);
    assert_eq!(ev.regs().rip.get(), target);
    let bp = ev.breakpoint().expect("BREAKPOINT data");
    assert_eq!(bp.gpa.get(), target, "kernel text is identity mapped");
    assert_eq!(bp.insn_len, 1);
    s.write_physical(target, &original)
        .expect("restore the byte");
    s.reply_event(&ev, actions::RETRY, &[])
        .expect("reply RETRY");
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "stderr: {}", t.stderr());
    assert!(
        t.serial().contains("breakpoint calls=1 result=1"),
        "{}",
        t.serial()
    );
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_write_to_a_page_without_w_raises_pf_and_continue_performs_the_write() {
    if !kvmi_tests::require_kvm(
        "libkvmi_write_to_a_page_without_w_raises_pf_and_continue_performs_the_write",
    ) {
        return;
    }
    let (l, mut t, dir) = start(
        "pf",
        Image::TestGuest,
        "mode=mem-write n=16 gate=1 hold=1",
        &[],
    );
    let mut s = accept(&l, &mut t);
    assert!(
        t.wait_serial("gate waiting", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    let page = t.sym("scratch_page");
    assert_eq!(page % 4096, 0);
    s.control_events(0, events::PF, true)
        .expect("CONTROL_EVENTS PF");
    s.set_page_access(&[page], &[access::R | access::X], 0)
        .expect("SET_PAGE_ACCESS r-x");
    s.write_physical(t.sym("gate"), &1u64.to_le_bytes())
        .expect("open the gate");
    let pf_reply = [0u8; 272];
    // The first write (word 0) faults; nothing is written before the reply.
    let ev = next_event(&mut s, &t);
    assert_eq!(ev.id(), events::PF);
    assert_eq!(ev.vcpu(), 0);
    let pf = ev.pf().expect("PF data");
    assert_eq!(pf.gpa.get(), page);
    assert_ne!(pf.access & access::W, 0, "access {:#x}", pf.access);
    assert!(
        pf.gva.get() == page || pf.gva.get() == u64::MAX,
        "gva {:#x}",
        pf.gva.get()
    );
    assert_eq!(u64_at(&s.read_physical(page, 16).unwrap(), 0), 0);
    s.reply_event(&ev, actions::CONTINUE, &pf_reply)
        .expect("reply CONTINUE");
    // The second write (word 1) faults: word 0 now holds the first value.
    let ev = next_event(&mut s, &t);
    assert_eq!(ev.id(), events::PF);
    assert_eq!(ev.pf().expect("PF data").gpa.get(), page + 8);
    let words = s.read_physical(page, 16).unwrap();
    assert_eq!((u64_at(&words, 0), u64_at(&words, 8)), (0x5ca1_0000, 0));
    // Give the page back, then let the guest finish.
    s.set_page_access(&[page], &[access::R | access::W | access::X], 0)
        .expect("SET_PAGE_ACCESS rwx");
    s.reply_event(&ev, actions::CONTINUE, &pf_reply)
        .expect("reply CONTINUE");
    assert!(
        t.wait_serial("holding", Duration::from_secs(30)),
        "serial: {}; stderr: {}",
        t.serial(),
        t.stderr()
    );
    assert!(t.serial().contains("mem-write n=16 last=0x5ca1000f"));
    let words = s.read_physical(page, 128).unwrap();
    for i in 0..16 {
        assert_eq!(u64_at(&words, i * 8), 0x5ca1_0000 + i as u64, "word {i}");
    }
    assert!(t.running());
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_destroy_disables_everything_resumes_closes_and_the_shim_reconnects() {
    if !kvmi_tests::require_kvm(
        "libkvmi_destroy_disables_everything_resumes_closes_and_the_shim_reconnects",
    ) {
        return;
    }
    let (l, mut t, dir) = start(
        "destroy",
        Image::DemoTarget,
        "",
        &["--vcpus", "2", "--name", "destroy-me"],
    );
    let mut s = accept(&l, &mut t);
    let vcpus = s.get_vcpu_count().expect("GET_GUEST_INFO") as u16;
    assert_eq!(vcpus, 2);
    for vcpu in 0..vcpus {
        for ev in INIT_EVENTS {
            s.control_events(vcpu, ev, true)
                .unwrap_or_else(|e| panic!("CONTROL_EVENTS {ev} on vCPU {vcpu}: {e}"));
        }
    }
    assert!(
        t.wait_serial("heartbeat round=1", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    // vmi_destroy: pause, single-step off, events off, resume, close.
    s.pause_all_vcpus(vcpus).expect("pause all vCPUs");
    let paused = pause_events(&mut s, &t, vcpus);
    for vcpu in 0..vcpus {
        s.control_singlestep(vcpu, false)
            .unwrap_or_else(|e| panic!("VCPU_CONTROL_SINGLESTEP off on vCPU {vcpu}: {e}"));
    }
    for vcpu in 0..vcpus {
        for ev in INIT_EVENTS {
            s.control_events(vcpu, ev, false)
                .unwrap_or_else(|e| panic!("CONTROL_EVENTS {ev} off on vCPU {vcpu}: {e}"));
        }
    }
    resume(&mut s, &paused);
    s.close();
    // The VM runs on and the shim comes back with a fresh handshake.
    assert_serial_grows(&mut t, "after the tool closed");
    let mut s2 = accept(&l, &mut t);
    assert_eq!(s2.name(), "destroy-me");
    assert_eq!(s2.get_vcpu_count().expect("GET_GUEST_INFO"), 2);
    assert_serial_grows(&mut t, "with the second session");
    drop(s2);
    let _ = std::fs::remove_dir_all(dir);
}

/// A `kvmi run` with a timeout of its own (the [`Target`] helper fixes `--timeout 120`).
struct TimedVm {
    child: Child,
    dir: PathBuf,
}

impl TimedVm {
    fn start(dir: &Path, sock: &Path, image: Image, timeout: &str, extra: &[&str]) -> TimedVm {
        let stderr = std::fs::File::create(dir.join("stderr.txt")).expect("stderr file");
        let child = Command::new(kvmi_tests::kvmi_bin())
            .args(["run", "--image", image.name(), "--timeout", timeout])
            .args(["--kvmi-dialect", "libkvmi", "--kvmi-connect"])
            .arg(sock)
            .arg("--serial")
            .arg(dir.join("serial.txt"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start kvmi run");
        TimedVm {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap_or_default()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut code = None;
        wait::within(timeout, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                code = Some(st.code().unwrap_or(-1));
            }
            code.is_some()
        });
        code
    }
}

impl Drop for TimedVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn libkvmi_unhook_event_reaches_the_tool_before_the_shim_stops_and_it_waits_for_the_close() {
    if !kvmi_tests::require_kvm(
        "libkvmi_unhook_event_reaches_the_tool_before_the_shim_stops_and_it_waits_for_the_close",
    ) {
        return;
    }
    let dir = sock_dir("unhook");
    let sock = dir.join("tool.sock");
    let l = Listener::bind(&sock).expect("bind the tool socket");
    let mut vm = TimedVm::start(
        &dir,
        &sock,
        Image::DemoTarget,
        "8",
        &["--unhook-timeout", "10"],
    );
    let mut s = l
        .accept(CONNECT_WAIT)
        .unwrap_or_else(|e| panic!("no session: {e}; stderr: {}", vm.stderr()));
    s.control_vm_events(events::UNHOOK, true)
        .expect("CONTROL_VM_EVENTS UNHOOK");
    // --timeout 8 expires: UNHOOK (VM event: vCPU 0, no reply) before the socket closes.
    let ev = s
        .wait_event(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no UNHOOK event: {e}; stderr: {}", vm.stderr()));
    assert_eq!(ev.id(), events::UNHOOK);
    assert_eq!(ev.vcpu(), 0);
    assert!(ev.data.is_empty());
    // The shim waits for the tool to leave (up to --unhook-timeout).
    assert!(
        !s.wait_closed(Duration::from_secs(2)),
        "the shim closed without waiting for the tool; stderr: {}",
        vm.stderr()
    );
    assert!(vm.wait_exit(Duration::from_millis(1)).is_none());
    s.close();
    assert_eq!(
        vm.wait_exit(EXIT_WAIT),
        Some(124),
        "stderr: {}",
        vm.stderr()
    );
    drop(l);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn libkvmi_hostile_tool_is_disconnected_and_the_vm_survives_for_a_good_session() {
    if !kvmi_tests::require_kvm(
        "libkvmi_hostile_tool_is_disconnected_and_the_vm_survives_for_a_good_session",
    ) {
        return;
    }
    use std::io::{Read, Write};
    let (l, mut t, dir) = start("hostile", Image::DemoTarget, "", &[]);
    // 1. A handshake answer with struct_size 3: the shim closes, then reconnects.
    let mut raw = l
        .accept_raw(CONNECT_WAIT)
        .unwrap_or_else(|e| panic!("no connection: {e}; stderr: {}", t.stderr()));
    let mut hello = [0u8; 96];
    raw.read_exact(&mut hello).expect("the VMM's handshake");
    assert_eq!(&hello[..4], &96u32.to_le_bytes());
    let mut bad = vec![3, 0, 0, 0];
    bad.extend([0u8; 20]);
    raw.write_all(&bad).expect("bad answer");
    raw.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    let closed = loop {
        match raw.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                break !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    };
    assert!(closed, "a struct_size of 3 was accepted");
    drop(raw);
    assert_serial_grows(&mut t, "after the bad handshake");

    // 2. A header announcing 9000 bytes: closed.
    let mut s = accept(&l, &mut t);
    let seq = s.next_seq();
    let mut hdr = vec![2, 0];
    hdr.extend(9000u16.to_le_bytes());
    hdr.extend(seq.to_le_bytes());
    s.send_raw(&hdr).expect("oversized header");
    assert!(
        s.wait_closed(Duration::from_secs(20)),
        "a 9000-byte payload was not refused; stderr: {}",
        t.stderr()
    );
    assert_serial_grows(&mut t, "after the oversized header");

    // 3. Replies off, then a command whose reply carries data: closed.
    let mut s = accept(&l, &mut t);
    s.request(
        &Request::ControlCmdResponse {
            enable: false,
            now: false,
            flags: 0,
        },
        0,
    )
    .expect("CONTROL_CMD_RESPONSE {0, 0} is itself answered");
    s.send(&Request::GetRegisters { vcpu: 0, msrs: &[] })
        .expect("send GET_REGISTERS");
    assert!(
        s.wait_closed(Duration::from_secs(20)),
        "GET_REGISTERS with replies off did not close; stderr: {}",
        t.stderr()
    );
    assert_serial_grows(&mut t, "after GET_REGISTERS with replies off");

    // 4. A well-behaved session works.
    let mut s = accept(&l, &mut t);
    assert_eq!(s.get_vcpu_count().expect("GET_GUEST_INFO"), 1);
    let names: Vec<String> = demo_tasks(&t, &mut s).into_iter().map(|(_, n)| n).collect();
    assert!(names.iter().any(|n| n == "init"), "{names:?}");
    assert_serial_grows(&mut t, "with the good session");
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}
