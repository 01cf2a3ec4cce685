//! End-to-end: no tool can freeze the guest or the socket. A tool that stops reading, or is
//! stopped (SIGSTOP) with its socket full both ways, is detached within `--kvmi-timeout`: the
//! guest keeps running and a fresh tool is served (with `--kvmi-connect`, the VM reconnects
//! to the next one). A VM started with `--kvmi-connect` backs off while no tool listens. A
//! second tool while one is attached is refused with `-KVM_EBUSY` and the first keeps
//! working. The stuck tools are `kvmi_tests::hostile::HostileTool`s.

use std::time::{Duration, Instant};

use kvmi::images::Image;
use kvmi_client::KvmiClient;
use kvmi_tests::hostile::{self, HostileTool};
use kvmi_tests::socket_target::{Target, read_u64};
use kvmi_tests::wait;
use protocol::event::EventSet;
use protocol::list::List;
use protocol::types::{Access, PageAccessEntry};
use protocol::wire::v4::ids;
use protocol::{Command, ErrorCode, EventKind};

/// The reply timeout the VMs of these tests run with (`--kvmi-timeout 3`).
const KVMI_TIMEOUT: Duration = Duration::from_secs(3);
const KVMI_TIMEOUT_ARG: [&str; 2] = ["--kvmi-timeout", "3"];

/// How long without progress counts as "the socket is full" when filling it.
const FULL_QUIET: Duration = Duration::from_millis(500);

/// Generous bound for things that happen at once when all is well.
const SOON: Duration = Duration::from_secs(20);

/// The size of the READ_PHYSICAL replies the stuck tool never reads (a whole page).
const PAGE: u64 = 4096;

/// A fresh tool can attach and its GET_VERSION is answered (each try bounded to 1 s, so that
/// a connection the host never serves fails the try instead of the whole wait).
fn fresh_tool_served(t: &Target) -> bool {
    let Ok(mut c) = KvmiClient::connect(&t.socket) else {
        return false;
    };
    c.set_reply_timeout(Duration::from_secs(1));
    let ok = c.get_version().is_ok();
    c.close();
    ok
}

/// How many heartbeats (`cycle i=` lines) the guest printed so far.
fn heartbeats(t: &Target) -> usize {
    t.serial().matches("cycle i=").count()
}

/// How the stuck tool of [`stuck_tool_is_detached`] misbehaves.
#[derive(Clone, Copy, Debug)]
struct Attack {
    /// Enable PF events on the page the guest writes on every iteration first, so that the
    /// guest's vCPU waits on the tool (an event it never answers).
    events: bool,
    /// Stop the tool process (SIGSTOP) once its socket is full.
    sigstop: bool,
}

/// The attack of the issue: a tool (with `events`) enables PF events on the page the guest
/// writes on every iteration, then sends READ_PHYSICAL commands of a page each without ever
/// reading a reply until the socket is full both ways; with `sigstop` the tool process is
/// then stopped. The tool must be detached within the reply timeout: a fresh tool is served
/// within `--kvmi-timeout` + 1 s of the stall, the guest prints on, the VMM says why, and
/// the stuck tool's socket is closed after whole messages only.
///
/// The stall is taken as the moment the fill went quiet ([`FULL_QUIET`] after the host
/// last took a byte, so the host's reply deadline started earlier still).
fn stuck_tool_is_detached(attack: Attack) {
    let mut t = Target::start(Image::TestGuest, "mode=cycle every=20", &KVMI_TIMEOUT_ARG);
    assert!(
        t.wait_serial("cycle i=", Duration::from_secs(30)),
        "the guest never printed a heartbeat; stderr: {}",
        t.stderr()
    );
    let page = t.sym("scratch_page");
    let mut tool = HostileTool::connect(&t.socket);
    let mut seen = hostile::Drained {
        bytes: Vec::new(),
        closed: false,
    };
    if attack.events {
        let events = EventSet::EMPTY.with(EventKind::PageFault);
        tool.send(&hostile::command(
            1,
            &Command::ControlEvents { vcpu: 0, events },
        ));
        let entries = [PageAccessEntry {
            gpa: page,
            access: Access::R.union(Access::X),
        }];
        tool.send(&hostile::command(
            2,
            &Command::SetPageAccess {
                vcpu: 0,
                view: 0,
                entries: List::from_slice(&entries),
            },
        ));
        // The guest's next write raises a PF event the tool never answers: its vCPU waits.
        wait::until(SOON, "the PF event of the guest's write", || {
            seen.bytes
                .extend(tool.read(64 * 1024, Duration::from_millis(200)));
            seen.frames().0.iter().any(|f| f.0 == ids::EVENT)
        });
    }
    // Now never read again: READ_PHYSICAL of a page each until the socket is full both ways.
    let read = hostile::command(
        3,
        &Command::ReadPhysical {
            gpa: page,
            size: PAGE,
        },
    );
    let fill = tool.fill(&read, FULL_QUIET);
    let stalled = Instant::now();
    assert!(
        !fill.closed && fill.messages > 0,
        "the socket did not fill: {fill:?}; stderr: {}",
        t.stderr()
    );
    if attack.sigstop {
        tool.stop();
    }
    let beats = heartbeats(&t);
    // The host stopped reading before the fill went quiet, so its reply deadline passed
    // at most KVMI_TIMEOUT after `stalled`: a fresh tool is served one second later at most.
    let served = wait::within(KVMI_TIMEOUT + Duration::from_secs(1), || {
        fresh_tool_served(&t)
    });
    assert!(
        served,
        "no fresh tool served within {:?} of the stall (sent {fill:?}); stderr: {}",
        KVMI_TIMEOUT + Duration::from_secs(1),
        t.stderr()
    );
    let detached_after = stalled.elapsed();
    // The guest runs on: more heartbeats after the attack.
    wait::until(
        SOON,
        "the guest to print heartbeats after the attack",
        || heartbeats(&t) > beats + 2,
    );
    assert!(t.running(), "the VM died; stderr: {}", t.stderr());
    // The VMM says why: the tool did not take a message in time, or (with events) the
    // unanswered event's own reply timeout came first; both detach it.
    let stderr = t.stderr();
    let why = stderr.contains("the tool stopped reading")
        || (attack.events && stderr.contains("the tool did not answer an event"));
    assert!(why, "no log line says why the tool was detached: {stderr}");
    // The stuck tool's socket was closed by the host; what it holds is whole messages (the
    // last one possibly cut short, and nothing after it).
    if attack.sigstop {
        tool.resume();
    }
    let rest = tool.drain(SOON);
    assert!(
        rest.closed,
        "the host did not close the stuck tool's socket"
    );
    seen.bytes.extend_from_slice(&rest.bytes);
    let (frames, left) = seen.frames();
    for &(id, seq, size) in &frames {
        match id {
            ids::EVENT => {}
            ids::READ_PHYSICAL => {
                assert_eq!(seq, 3);
                assert_eq!(u64::from(size), 8 + PAGE, "a READ_PHYSICAL reply of a page");
            }
            ids::CONTROL_EVENTS | ids::SET_PAGE_ACCESS => assert_eq!(size, 8),
            other => panic!("the tool got a message with id {other} (seq {seq}, size {size})"),
        }
    }
    assert!(
        left < 8 + PAGE as usize,
        "{left} bytes after the whole messages: more than one cut message"
    );
    eprintln!(
        "{attack:?}: stuck tool detached and a fresh tool served {detached_after:?} after the stall \
         ({} READ_PHYSICAL sent, {} replies received)",
        fill.messages,
        frames.iter().filter(|f| f.0 == ids::READ_PHYSICAL).count()
    );
    tool.kill();
}

#[test]
fn stopped_tool_with_a_full_socket_is_detached_within_the_timeout() {
    if !kvmi_tests::require_kvm("stopped_tool_with_a_full_socket_is_detached_within_the_timeout") {
        return;
    }
    stuck_tool_is_detached(Attack {
        events: true,
        sigstop: true,
    });
}

#[test]
fn tool_that_stops_reading_is_detached_within_the_timeout() {
    if !kvmi_tests::require_kvm("tool_that_stops_reading_is_detached_within_the_timeout") {
        return;
    }
    stuck_tool_is_detached(Attack {
        events: true,
        sigstop: false,
    });
}

/// With no event outstanding, only the write deadline can detach the tool: this one checks
/// that path and its log line alone.
#[test]
fn tool_flooding_commands_without_reading_is_detached_by_the_write_deadline() {
    if !kvmi_tests::require_kvm(
        "tool_flooding_commands_without_reading_is_detached_by_the_write_deadline",
    ) {
        return;
    }
    stuck_tool_is_detached(Attack {
        events: false,
        sigstop: false,
    });
}

/// The back-off delays the VM logged for its failed connect attempts, in order.
fn logged_backoff(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("KVMI connect attempt"))
        .filter_map(|l| l.split_once("next attempt in ")?.1.split_once(" ms"))
        .filter_map(|(ms, _)| ms.trim().parse().ok())
        .collect()
}

#[test]
fn kvmi_connect_backs_off_while_no_tool_listens_and_connects_when_one_does() {
    if !kvmi_tests::require_kvm(
        "kvmi_connect_backs_off_while_no_tool_listens_and_connects_when_one_does",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvmi-e2e-backoff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tool.sock");
    let _ = std::fs::remove_file(&path);
    let started = Instant::now();
    let t = Target::start_connecting(
        Image::TestGuest,
        "mode=spin",
        &path,
        &KVMI_TIMEOUT_ARG,
        Some("warn,kvmi_engine::socket=debug"),
    );
    // No tool for a few seconds: the attempts space out, doubling up to the 2 s cap.
    let delays = wait::until_some(SOON, "eight failed connect attempts", || {
        let d = logged_backoff(&t.stderr());
        (d.len() >= 8).then_some(d)
    });
    let waited = started.elapsed();
    assert_eq!(
        delays[..8],
        [50, 100, 200, 400, 800, 1600, 2000, 2000],
        "the back-off of the failed attempts; stderr: {}",
        t.stderr()
    );
    // Eight attempts 50+100+...+2000 ms apart took at least 5 s.
    assert!(
        waited >= Duration::from_millis(5150),
        "eight attempts within {waited:?}"
    );
    // A tool appears: the VM connects within the longest back-off (plus a margin).
    let listener = KvmiClient::listen(&path).unwrap();
    let c = KvmiClient::accept_on(&listener, Duration::from_millis(2000 + 1500))
        .unwrap_or_else(|e| panic!("{e}; stderr: {}", t.stderr()));
    assert_eq!(c.get_guest_info().unwrap().vcpu_count, 1);
    c.close();
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kvmi_connect_detaches_a_stopped_tool_and_reconnects_to_the_next_one() {
    if !kvmi_tests::require_kvm(
        "kvmi_connect_detaches_a_stopped_tool_and_reconnects_to_the_next_one",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvmi-e2e-reconnect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tool.sock");
    // The stuck tool listens, the VM connects to it (it takes no second connection).
    let mut tool = HostileTool::accept(&path);
    let t = Target::start_connecting(
        Image::TestGuest,
        "mode=cycle every=20",
        &path,
        &KVMI_TIMEOUT_ARG,
        None,
    );
    tool.wait_accepted();
    assert!(
        t.wait_serial("cycle i=", Duration::from_secs(30)),
        "{}",
        t.stderr()
    );
    let read = hostile::command(
        1,
        &Command::ReadPhysical {
            gpa: t.sym("scratch_page"),
            size: PAGE,
        },
    );
    let fill = tool.fill(&read, FULL_QUIET);
    assert!(!fill.closed && fill.messages > 0, "{fill:?}");
    tool.stop();
    // The next tool listens on the same path: the VM detaches the stopped one and, after a
    // session that lasted, reconnects at once.
    let listener = KvmiClient::listen(&path).unwrap();
    let c = KvmiClient::accept_on(&listener, KVMI_TIMEOUT + Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}; stderr: {}", t.stderr()));
    assert_eq!(c.get_guest_info().unwrap().vcpu_count, 1);
    let beats = heartbeats(&t);
    wait::until(SOON, "the guest to print heartbeats", || {
        heartbeats(&t) > beats + 2
    });
    assert!(
        t.stderr().contains("the tool stopped reading"),
        "{}",
        t.stderr()
    );
    tool.resume();
    assert!(tool.drain(SOON).closed, "the stopped tool's socket is open");
    c.close();
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn second_tool_is_refused_with_ebusy_and_the_first_keeps_working() {
    if !kvmi_tests::require_kvm("second_tool_is_refused_with_ebusy_and_the_first_keeps_working") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &KVMI_TIMEOUT_ARG);
    assert!(t.wait_serial("spinning", Duration::from_secs(30)));
    let first = t.attach();
    first.get_version().unwrap();
    // A second tool connects (the socket accepts it), and its first command is answered
    // -KVM_EBUSY; then the host closes its socket.
    let second = KvmiClient::connect(&t.socket).unwrap();
    let err = second.get_version().unwrap_err();
    assert_eq!(err.kvm_code(), Some(ErrorCode::Busy), "{err}");
    assert!(
        second.wait_closed(SOON),
        "the host kept the refused tool's socket open"
    );
    second.close();
    // One that sends nothing is closed too, with nothing sent to it.
    let mut silent = HostileTool::connect(&t.socket);
    let got = silent.drain(SOON);
    assert!(got.closed && got.bytes.is_empty(), "{got:?}");
    silent.kill();
    assert!(
        t.stderr().contains("already attached"),
        "no log line about the refused tool: {}",
        t.stderr()
    );
    // The first tool was not disturbed: it reads the guest's counter moving.
    let counter = t.sym("probe_counter");
    let before = read_u64(&first, counter);
    wait::until(SOON, "the counter to move", || {
        read_u64(&first, counter) > before
    });
    assert!(first.closed().is_none());
    // Once it leaves, the next tool attaches at once.
    first.close();
    let next = t.attach();
    next.get_version().unwrap();
}

#[test]
fn a_tool_that_talks_but_never_answers_is_detached_a_timeout_after_its_last_message() {
    if !kvmi_tests::require_kvm(
        "a_tool_that_talks_but_never_answers_is_detached_a_timeout_after_its_last_message",
    ) {
        return;
    }
    // The guest writes its scratch page on every iteration: with PF events on and the page
    // write-protected, its vCPU waits on an event the tool never answers.
    let t = Target::start(Image::TestGuest, "mode=cycle every=20", &KVMI_TIMEOUT_ARG);
    assert!(t.wait_serial("cycle i=", SOON), "{}", t.serial());
    let c = t.attach();
    c.control_events(0, EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    let page = t.sym("scratch_page");
    c.set_page_access(
        0,
        &[PageAccessEntry {
            gpa: page,
            access: Access::R.union(Access::X),
        }],
    )
    .unwrap();
    c.next_event_of(EventKind::PageFault, SOON)
        .unwrap()
        .expect("a PF event on the write-protected scratch page");
    let raised = Instant::now();
    // The tool keeps talking past the first reply deadline (3 s after the event), then goes
    // silent: it must be detached a timeout after its last message, not a timeout after the
    // deadline check that last saw it talking (which could be almost two timeouts).
    let mut last = raised;
    while raised.elapsed() < KVMI_TIMEOUT + Duration::from_millis(300) {
        c.get_version()
            .expect("commands are served while the event waits");
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(250));
    }
    let margin = Duration::from_secs(1);
    let closed = c.wait_closed(KVMI_TIMEOUT + margin);
    let detached_after = last.elapsed();
    assert!(
        closed,
        "still attached {detached_after:?} after the tool's last message; stderr: {}",
        t.stderr()
    );
    assert!(
        detached_after <= KVMI_TIMEOUT + margin,
        "{detached_after:?}"
    );
    // The guest runs on, unhooked, and a fresh tool is served.
    let before = heartbeats(&t);
    wait::until(SOON, "the guest to print on after the detach", || {
        heartbeats(&t) > before
    });
    assert!(fresh_tool_served(&t));
}
