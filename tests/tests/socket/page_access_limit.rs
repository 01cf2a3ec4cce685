//! The per-VM limit on page-access restrictions, end to end: a tool restricting alternate
//! pages of a test-guest's RAM (each page its own range, so each `mprotect` splits the RAM
//! mapping) reaches the documented limit (`kvmi_engine::access::range_limit`), gets
//! `-KVM_ENOMEM` past it with nothing recorded, GET_PAGE_ACCESS reports only what is
//! enforced, and the guest, the process and the next tool carry on.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use kvmi::images::Image;
use kvmi_client::{ClientError, KvmiClient, is_kvm_error};
use kvmi_engine::access::{PAGE, range_limit};
use kvmi_tests::socket_target::{EVENT_WAIT, Target, expect_event};
use kvmi_tests::wait;
use protocol::error::ErrorCode;
use protocol::event::EventSet;
use protocol::event_reply::{EventReplyData, PageFaultReply};
use protocol::types::{Access, PageAccessEntry};
use protocol::{Action, EventKind, EventPayload};

/// Where the alternate pages start: RAM test-guest never touches (its image, stack and page
/// tables lie in the first MiBs).
const BASE: u64 = 0x200_0000;
/// Entries per SET/GET_PAGE_ACCESS (a message carries at most 64 KiB).
const BATCH: usize = 1000;

/// The `i`-th alternate page: every one is a range of its own.
fn alt(i: usize) -> u64 {
    BASE + 2 * i as u64 * PAGE
}

fn r_x() -> Access {
    Access::R.union(Access::X)
}

fn set(c: &KvmiClient, gpas: &[u64], access: Access) -> Result<(), ClientError> {
    let entries: Vec<PageAccessEntry> = gpas
        .iter()
        .map(|&gpa| PageAccessEntry { gpa, access })
        .collect();
    c.set_page_access(0, &entries)
}

fn get(c: &KvmiClient, gpas: &[u64]) -> Vec<Access> {
    gpas.chunks(BATCH)
        .flat_map(|chunk| c.get_page_access(0, chunk).expect("GET_PAGE_ACCESS"))
        .collect()
}

/// The process that holds the VM serving `socket`: the `kvmi run` whose command line names
/// it, or its `vmm-fleet` child when it supervises (the default: one process per VM).
fn pid_serving(socket: &Path) -> Option<u32> {
    let run = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == socket.as_os_str().as_bytes())
                .then_some(pid)
        })?;
    let children = std::fs::read_dir(format!("/proc/{run}/task"))
        .ok()?
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|w| w.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .find(|child| {
            std::fs::read(format!("/proc/{child}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"vmm-fleet"))
        });
    Some(children.unwrap_or(run))
}

/// The number of mappings of process `pid` (what `vm.max_map_count` bounds).
fn map_count(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("the kvmi process's maps")
        .lines()
        .count()
}

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

#[test]
fn restrictions_stop_at_the_range_limit_and_only_enforced_ones_are_reported() {
    if !kvmi_tests::require_kvm(
        "restrictions_stop_at_the_range_limit_and_only_enforced_ones_are_reported",
    ) {
        return;
    }
    let limit = range_limit();
    // Room for `limit` alternate pages and a few more above BASE.
    let ram_mib = alt(limit + 16).div_ceil(1 << 20) + 1;
    let mut t = Target::start(
        Image::TestGuest,
        "mode=cycle every=2000",
        &["--memory", &ram_mib.max(64).to_string()],
    );
    let c = t.attach();
    let scratch = t.sym("scratch_page");
    assert!(
        scratch + PAGE <= BASE,
        "scratch page {scratch:#x} above BASE"
    );
    let pid = pid_serving(&t.socket).expect("the kvmi process serving the socket");
    let maps_before = map_count(pid);
    assert!(t.wait_serial("cycle i=", EVENT_WAIT), "{}", t.serial());

    // Up to the limit: `limit` ranges of one page each.
    let gpas: Vec<u64> = (0..limit).map(alt).collect();
    for chunk in gpas.chunks(BATCH) {
        set(&c, chunk, r_x()).expect("SET_PAGE_ACCESS below the limit");
    }
    assert!(get(&c, &gpas).iter().all(|a| *a == r_x()));
    // Each range split the RAM mapping (two more mappings), and that is all they cost: the
    // process keeps most of its map count for threads (two mappings each) and grants.
    let maps_at_limit = map_count(pid);
    assert!(
        maps_at_limit >= maps_before + limit,
        "{limit} ranges but {maps_before} -> {maps_at_limit} mappings: not enforced by mprotect?"
    );
    assert!(
        maps_at_limit <= maps_before + 2 * limit + 16,
        "{limit} ranges cost {} mappings",
        maps_at_limit - maps_before
    );
    assert!(
        maps_at_limit <= max_map_count() / 2,
        "{maps_at_limit} mappings of {} at the limit",
        max_map_count()
    );

    // Past the limit, in one command whose entries apply in order: a new range is refused,
    // a page joining two ranges applies (one range fewer), so the next new range applies,
    // and the one after is refused again. Refused entries leave no trace.
    let joiner = BASE + PAGE;
    let batch = [alt(limit), joiner, alt(limit + 1), alt(limit + 2)];
    let result = set(&c, &batch, r_x());
    assert!(is_kvm_error(&result, ErrorCode::NoMem), "{result:?}");
    assert_eq!(
        get(&c, &batch),
        vec![Access::RWX, r_x(), r_x(), Access::RWX],
        "GET_PAGE_ACCESS after a SET_PAGE_ACCESS that crossed the limit"
    );
    // A tool hammering past the limit: every attempt refused, none recorded.
    for _ in 0..200 {
        let result = set(&c, &[alt(limit + 2)], Access::NONE);
        assert!(is_kvm_error(&result, ErrorCode::NoMem), "{result:?}");
    }

    // The page the guest writes, refused at the limit: reported rwx, and it is — the guest
    // writes it with no PF event.
    c.control_events(0, EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    let result = set(&c, &[scratch], r_x());
    assert!(is_kvm_error(&result, ErrorCode::NoMem), "{result:?}");
    assert_eq!(get(&c, &[scratch]), vec![Access::RWX]);
    let before = c.read_physical(scratch, PAGE).unwrap();
    wait::until(EVENT_WAIT, "the guest to write the scratch page", || {
        c.read_physical(scratch, PAGE).unwrap() != before
    });
    assert!(
        c.next_event(Duration::from_millis(200)).unwrap().is_none(),
        "a PF event for a page reported rwx"
    );

    // Lifting one range makes room: the restriction now applies, is reported, and is
    // enforced — the guest's next write to the page is a PF event.
    set(&c, &[alt(limit - 1)], Access::RWX).expect("lifting a range");
    set(&c, &[scratch], r_x()).expect("a restriction after lifting one");
    assert_eq!(get(&c, &[scratch]), vec![r_x()]);
    let ev = expect_event(&c, EventKind::PageFault, &t);
    let EventPayload::PageFault { gpa, mode, .. } = ev.event.payload else {
        unreachable!("a PageFault event")
    };
    assert_eq!(gpa & !(PAGE - 1), scratch, "PF at {gpa:#x}");
    assert_ne!(mode & 2, 0, "mode {mode:#x} lacks write");
    set(&c, &[scratch], Access::RWX).unwrap();
    c.reply(
        &ev,
        Action::Continue,
        EventReplyData::PageFault(PageFaultReply::default()),
    )
    .unwrap();

    // The guest runs on: its serial output keeps advancing.
    let len = t.serial().len();
    assert!(
        t.wait_serial_growth(len, EVENT_WAIT),
        "serial output stopped; stderr: {}",
        t.stderr()
    );
    // Some 200 refusals, logged once (per burst), and no error logged at all.
    let stderr = t.stderr();
    let logged = stderr.matches("SET_PAGE_ACCESS refused").count();
    assert!(
        (1..=2).contains(&logged),
        "{logged} refusal lines:\n{stderr}"
    );
    assert!(!stderr.contains("ERROR"), "{stderr}");

    // The next tool: the detach restored every page (the mapping merged back), a new
    // client is served, and its restrictions start from an empty table.
    c.close();
    let c = t.attach();
    assert_eq!(get(&c, &[alt(0), joiner, scratch]), vec![Access::RWX; 3]);
    set(&c, &[alt(0), alt(1)], r_x()).expect("a fresh tool restricts pages");
    assert_eq!(get(&c, &[alt(0), alt(1)]), vec![r_x(); 2]);
    let maps_after = map_count(pid);
    assert!(
        maps_after <= maps_before + 8,
        "{maps_before} mappings before, {maps_after} after the unhook"
    );
    let len = t.serial().len();
    assert!(
        t.wait_serial_growth(len, EVENT_WAIT),
        "serial output stopped; stderr: {}",
        t.stderr()
    );
    assert!(t.running(), "stderr: {}", t.stderr());
    c.close();
}
