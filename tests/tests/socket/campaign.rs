//! End-to-end: a bounded hostile-tool campaign against one demo-target VM. A fixed-seed PRNG
//! drives 100 connection cycles of 20 frames each (2,000 frames): random bytes, valid headers
//! with random contents, valid commands (some cut mid-message), tools that stop reading, tools
//! killed or disconnected mid-message, and PF events on a page the guest writes that are never
//! answered. After every cycle a fresh well-behaved client must be served within
//! `--kvmi-timeout` + 1 s, and the pages the cycle restricted must read back rwx (the engine
//! unhooks on detach). At the end the VM still runs, its heartbeat advanced, and its stderr
//! holds no panic.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kvmi::images::Image;
use kvmi_client::KvmiClient;
use kvmi_tests::hostile::{self, HostileTool};
use kvmi_tests::socket_target::Target;
use kvmi_tests::wait;
use protocol::EventKind;
use protocol::types::Access;
use protocol::wire::v4::{event_bit, ids};

/// The PRNG's fixed seed (printed by the test).
const SEED: u64 = 0x6b76_6d69_6361_6d70; // "kvmicamp"
const CYCLES: usize = 100;
const FRAMES_PER_CYCLE: usize = 20;
/// At most this many cycles of each stuck kind (a stuck cycle waits out the 3 s timeout).
const STUCK_PER_KIND: usize = 5;

const KVMI_TIMEOUT: Duration = Duration::from_secs(3);
/// A fresh tool must be served within this of the end of a cycle (or of the tool stopping).
const SERVED_WITHIN: Duration = Duration::from_secs(KVMI_TIMEOUT.as_secs() + 1);
/// Generous bound for what happens at once when all is well.
const SOON: Duration = Duration::from_secs(20);
const PAGE: u64 = 4096;
/// The errno the engine answers a second tool with.
const KVM_EBUSY: i32 = -16;

/// splitmix64: small, deterministic, good enough to pick behaviours and bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// What a cycle's tool does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// (a) random bytes.
    RandomBytes,
    /// (b) valid headers with random id, size, seq and payload.
    RandomHeaders,
    /// (c) valid commands, possibly the last one cut mid-message.
    Commands,
    /// (d) commands, never reading a reply.
    StopReading,
    /// (e) commands, then a killed or disconnected tool mid-message.
    KillMidMessage,
    /// (f) PF events on a page the guest writes, never answered.
    UnansweredEvent,
}

const KINDS: [Kind; 6] = [
    Kind::RandomBytes,
    Kind::RandomHeaders,
    Kind::Commands,
    Kind::StopReading,
    Kind::KillMidMessage,
    Kind::UnansweredEvent,
];

#[derive(Default, Debug)]
struct Counts {
    cycles: [usize; 6],
    frames: [usize; 6],
    bytes: usize,
    /// Frames cut mid-message.
    truncated: usize,
    /// Clean disconnects (close or shutdown) by the tool.
    disconnects: usize,
    /// Tools killed (SIGKILL).
    kills: usize,
    /// Tools stopped (SIGSTOP) while the host had to detach them.
    stops: usize,
    /// Tools that never read their replies.
    unread: usize,
    /// Events the guest raised that no tool answered.
    unanswered_events: usize,
    /// Messages flooded to fill the socket (stuck tools), beyond the campaign frames.
    flood: u64,
    /// Cycles whose tool the host closed on (bad input).
    host_closed: usize,
    /// Stuck cycles (the host had to detach the tool on its timeout).
    stuck: usize,
    /// SET_PAGE_ACCESS entries sent, and pages checked rwx after the detach.
    restrictions: usize,
    pages_checked: usize,
    held: usize,
    slowest: Duration,
}

/// Pages a cycle may restrict: where the demo target keeps its objects and code (the engine
/// accepts or refuses each; refusals are fine) and one page outside RAM.
struct Pages {
    pool: Vec<u64>,
    /// The page the guest writes all the time (`kernel_stats`).
    written: u64,
}

impl Pages {
    fn new(t: &Target) -> Pages {
        let page = |a: u64| a & !(PAGE - 1);
        let text = t.profile.range("kernel_text").expect("range.kernel_text");
        let utext = t.profile.range("user_text").expect("range.user_text");
        let data = t.profile.range("kernel_data").expect("range.kernel_data");
        let written = page(t.sym("kernel_stats"));
        let mut pool = vec![
            written,
            page(t.sym("task_table")),
            page(t.sym("secret_buffer")),
            page(text.start),
            page(text.start) + PAGE,
            page(utext.start),
            page(data.start),
        ];
        pool.sort_unstable();
        pool.dedup();
        Pages { pool, written }
    }
}

fn header(id: u16, size: u16, seq: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(8);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h
}

fn read_physical(seq: u32, gpa: u64, size: u64) -> Vec<u8> {
    let mut p = gpa.to_le_bytes().to_vec();
    p.extend_from_slice(&size.to_le_bytes());
    hostile::frame(ids::READ_PHYSICAL, seq, &p)
}

fn set_page_access(seq: u32, entries: &[(u64, u8)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0u16.to_le_bytes()); // vcpu
    p.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    p.extend_from_slice(&[0; 4]); // view 0, pad
    for &(gpa, access) in entries {
        p.extend_from_slice(&gpa.to_le_bytes());
        p.push(access);
        p.extend_from_slice(&[0; 7]);
    }
    hostile::frame(ids::SET_PAGE_ACCESS, seq, &p)
}

fn control_events(seq: u32, bits: u32) -> Vec<u8> {
    let mut p = vec![0u8; 4];
    p.extend_from_slice(&bits.to_le_bytes());
    hostile::frame(ids::CONTROL_EVENTS, seq, &p)
}

fn vcpu_only(id: u16, seq: u32) -> Vec<u8> {
    hostile::frame(id, seq, &[0; 8])
}

fn pf_bit() -> u32 {
    event_bit(EventKind::PageFault)
}

/// A random valid command (its fields random, so some are refused). Restricted pages go to
/// `restricted`.
fn random_command(
    rng: &mut Rng,
    seq: u32,
    pages: &Pages,
    restricted: &mut Vec<u64>,
    c: &mut Counts,
) -> Vec<u8> {
    match rng.below(8) {
        0 => hostile::frame(ids::GET_VERSION, seq, &[]),
        1 => vcpu_only(ids::GET_GUEST_INFO, seq),
        2 | 3 => {
            let gpa = match rng.below(4) {
                0 => rng.next(),          // anywhere, mostly out of range
                1 => rng.below(64 << 20), // in or near RAM
                _ => rng.pick(&pages.pool) + rng.below(PAGE),
            };
            let max = if rng.chance(20) { 2 * PAGE } else { 256 };
            let size = 1 + rng.below(max);
            read_physical(seq, gpa, size)
        }
        4 | 5 => {
            let n = 1 + rng.below(3) as usize;
            let entries: Vec<(u64, u8)> = (0..n)
                .map(|_| {
                    let gpa = if rng.chance(10) {
                        1 << 40 // outside RAM: refused
                    } else {
                        rng.pick(&pages.pool)
                    };
                    (gpa, rng.below(8) as u8)
                })
                .collect();
            for &(gpa, access) in &entries {
                if gpa < 1 << 40 && access != Access::RWX.bits() {
                    restricted.push(gpa);
                }
            }
            c.restrictions += entries.len();
            set_page_access(seq, &entries)
        }
        6 => {
            let mask = if rng.chance(70) { 0x7ff } else { !0 };
            control_events(seq, rng.next() as u32 & mask)
        }
        _ => vcpu_only(ids::PAUSE_VCPU, seq),
    }
}

/// A frame for the lifting of `restricted` (all back to rwx), if any.
fn lift(seq: u32, restricted: &[u64]) -> Option<Vec<u8>> {
    (!restricted.is_empty()).then(|| {
        let entries: Vec<(u64, u8)> = restricted
            .iter()
            .take(8)
            .map(|&g| (g, Access::RWX.bits()))
            .collect();
        set_page_access(seq, &entries)
    })
}

/// The error code of the first reply in `bytes`, if a whole reply header is there.
fn first_reply_err(bytes: &[u8]) -> Option<(u16, i32)> {
    let id = u16::from_le_bytes(bytes.get(0..2)?.try_into().ok()?);
    let err = i32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
    Some((id, err))
}

/// An in-process raw tool, attached (its GET_VERSION answered, not refused as a second tool).
fn raw_attach(t: &Target) -> UnixStream {
    wait::until_some(SERVED_WITHIN, "a raw tool to attach", || {
        let mut s = UnixStream::connect(&t.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(&hostile::frame(ids::GET_VERSION, 0, &[]))
            .ok()?;
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            match s.read(&mut buf[got..]) {
                Ok(0) | Err(_) => return None,
                Ok(n) => got += n,
            }
        }
        match first_reply_err(&buf[..got]) {
            Some((ids::GET_VERSION, 0)) => Some(s),
            _ => None,
        }
    })
}

/// A hostile tool in a child process, attached likewise.
fn hostile_attach(t: &Target) -> HostileTool {
    wait::until_some(SERVED_WITHIN, "a hostile tool to attach", || {
        let mut tool = HostileTool::connect(&t.socket);
        tool.send(&hostile::frame(ids::GET_VERSION, 0, &[]));
        let got = tool.read(4096, Duration::from_secs(1));
        match first_reply_err(&got) {
            Some((ids::GET_VERSION, 0)) => Some(tool),
            Some((_, KVM_EBUSY)) | Some(_) | None => {
                tool.kill();
                None
            }
        }
    })
}

/// Reads whatever the host sent so far, without waiting long.
fn drain_now(s: &mut UnixStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_millis(2)));
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return true;
            }
            Err(_) => return false,
        }
    }
}

/// Sends `frames` on a raw tool, reading replies as they come; the last one possibly cut.
/// Returns whether the host kept the socket open.
fn raw_send_all(
    s: &mut UnixStream,
    frames: &[Vec<u8>],
    cut_last: Option<usize>,
    c: &mut Counts,
) -> bool {
    for (i, f) in frames.iter().enumerate() {
        let bytes = match cut_last {
            Some(cut) if i + 1 == frames.len() => &f[..cut.min(f.len() - 1).max(1)],
            _ => &f[..],
        };
        if s.write_all(bytes).is_err() {
            return false;
        }
        c.bytes += bytes.len();
        if !drain_now(s) {
            return false;
        }
    }
    true
}

/// A fresh well-behaved client: attaches, GET_VERSION answered.
fn fresh_client(t: &Target) -> Option<KvmiClient> {
    let mut c = KvmiClient::connect(&t.socket).ok()?;
    c.set_reply_timeout(Duration::from_secs(1));
    if c.get_version().is_ok() {
        Some(c)
    } else {
        c.close();
        None
    }
}

/// The last demo-target heartbeat round (`heartbeat round=N ...`).
fn heartbeat(t: &Target) -> u64 {
    t.serial()
        .lines()
        .filter_map(|l| l.strip_prefix("heartbeat round="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Runs one cycle; returns when its tool is gone or stuck (the moment to measure from), and
/// the tool if it is still alive (stopped), to be killed after the check.
fn run_cycle(
    t: &Target,
    rng: &mut Rng,
    kind: Kind,
    stuck: bool,
    pages: &Pages,
    restricted: &mut Vec<u64>,
    c: &mut Counts,
) -> (Instant, Option<HostileTool>) {
    let mut seq = 1u32;
    let mut next_seq = || {
        seq += 1;
        seq
    };
    match kind {
        Kind::RandomBytes | Kind::RandomHeaders => {
            let mut s = raw_attach(t);
            let frames: Vec<Vec<u8>> = (0..FRAMES_PER_CYCLE)
                .map(|_| {
                    if kind == Kind::RandomBytes {
                        let n = 1 + rng.below(64) as usize;
                        rng.bytes(n)
                    } else {
                        let id = if rng.chance(60) {
                            rng.below(28) as u16
                        } else {
                            rng.next() as u16
                        };
                        let max = if rng.chance(80) { 64 } else { 4096 };
                        let size = rng.below(max) as u16;
                        let mut f = header(id, size, rng.next() as u32);
                        f.extend(rng.bytes(size as usize));
                        f
                    }
                })
                .collect();
            if !raw_send_all(&mut s, &frames, None, c) {
                c.host_closed += 1;
            }
            c.disconnects += 1;
            drop(s);
            (Instant::now(), None)
        }
        Kind::Commands => {
            let mut s = raw_attach(t);
            let mut frames: Vec<Vec<u8>> = (0..FRAMES_PER_CYCLE - 1)
                .map(|_| random_command(rng, next_seq(), pages, restricted, c))
                .collect();
            // The last frame lifts the restrictions (or is one more command).
            let last = lift(next_seq(), restricted)
                .unwrap_or_else(|| random_command(rng, next_seq(), pages, restricted, c));
            frames.push(last);
            let cut = rng.chance(50).then(|| rng.below(24) as usize + 1);
            if cut.is_some() {
                c.truncated += 1;
            }
            if !raw_send_all(&mut s, &frames, cut, c) {
                c.host_closed += 1;
            }
            if rng.chance(50) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            c.disconnects += 1;
            drop(s);
            (Instant::now(), None)
        }
        Kind::StopReading => {
            let mut tool = hostile_attach(t);
            for _ in 0..FRAMES_PER_CYCLE {
                let gpa = rng.pick(&pages.pool);
                let f = if rng.chance(70) {
                    read_physical(next_seq(), gpa, PAGE)
                } else {
                    vcpu_only(ids::GET_GUEST_INFO, next_seq())
                };
                c.bytes += tool.send(&f);
            }
            c.unread += 1;
            if stuck {
                // Never read, flood until the socket is full both ways, then stop the tool.
                let flood = read_physical(next_seq(), pages.written, PAGE);
                let fill = tool.fill(&flood, Duration::from_millis(300));
                assert!(
                    !fill.closed,
                    "the host closed a tool that only read: {fill:?}"
                );
                c.flood += fill.messages;
                tool.stop();
                c.stops += 1;
                c.stuck += 1;
                (Instant::now(), Some(tool))
            } else {
                if rng.chance(50) {
                    tool.kill();
                    c.kills += 1;
                } else {
                    tool.shutdown_socket();
                    tool.kill();
                    c.disconnects += 1;
                }
                (Instant::now(), None)
            }
        }
        Kind::KillMidMessage => {
            let mut tool = hostile_attach(t);
            for i in 0..FRAMES_PER_CYCLE {
                // Commands that do not close the channel (no garbage here): the tool must
                // still be attached when it dies mid-message.
                let f = match rng.below(3) {
                    0 => hostile::frame(ids::GET_VERSION, next_seq(), &[]),
                    1 => {
                        let gpa = rng.pick(&pages.pool);
                        read_physical(next_seq(), gpa, 1 + rng.below(PAGE / 2))
                    }
                    _ => vcpu_only(ids::GET_GUEST_INFO, next_seq()),
                };
                if i + 1 == FRAMES_PER_CYCLE {
                    let cut = 1 + rng.below(f.len() as u64 - 1) as usize;
                    c.bytes += tool.send(&f[..cut]);
                    c.truncated += 1;
                } else {
                    c.bytes += tool.send(&f);
                }
                if rng.chance(30) {
                    let _ = tool.read(64 * 1024, Duration::from_millis(1));
                }
            }
            match rng.below(3) {
                0 => {
                    tool.kill();
                    c.kills += 1;
                }
                1 => {
                    // Stopped mid-message, then killed.
                    tool.stop();
                    c.stops += 1;
                    tool.kill();
                    c.kills += 1;
                }
                _ => {
                    tool.shutdown_socket();
                    tool.kill();
                    c.disconnects += 1;
                }
            }
            (Instant::now(), None)
        }
        Kind::UnansweredEvent => {
            let mut tool = hostile_attach(t);
            // Commands first, then the events and the restriction last: the tool says nothing
            // after the event it will not answer. (The engine extends an event's deadline by
            // another timeout when the tool spoke within the last one, so a tool that talks
            // after the event is detached up to twice the timeout after its last message.)
            for _ in 2..FRAMES_PER_CYCLE {
                let f = read_physical(next_seq(), rng.pick(&pages.pool), 8);
                c.bytes += tool.send(&f);
            }
            c.bytes += tool.send(&control_events(next_seq(), pf_bit()));
            c.bytes += tool.send(&set_page_access(
                next_seq(),
                &[(pages.written, Access::R.union(Access::X).bits())],
            ));
            c.restrictions += 1;
            restricted.push(pages.written);
            // The guest's next write to the page is a PF event the tool never answers.
            let mut seen = hostile::Drained {
                bytes: Vec::new(),
                closed: false,
            };
            wait::until(SOON, "the PF event of the guest's write", || {
                seen.bytes
                    .extend(tool.read(64 * 1024, Duration::from_millis(100)));
                seen.frames().0.iter().any(|f| f.0 == ids::EVENT)
            });
            c.unanswered_events += 1;
            if stuck {
                tool.stop();
                c.stops += 1;
                c.stuck += 1;
                (Instant::now(), Some(tool))
            } else {
                tool.kill();
                c.kills += 1;
                (Instant::now(), None)
            }
        }
    }
}

#[test]
fn hostile_tool_campaign_every_cycle_holds() {
    if !kvmi_tests::require_kvm("hostile_tool_campaign_every_cycle_holds") {
        return;
    }
    let started = Instant::now();
    let mut t = Target::start(Image::DemoTarget, "", &["--kvmi-timeout", "3"]);
    assert!(
        wait::within(SOON, || heartbeat(&t) >= 1),
        "no heartbeat; stderr: {}",
        t.stderr()
    );
    let pages = Pages::new(&t);
    let beats_before = heartbeat(&t);
    eprintln!(
        "campaign seed {SEED:#018x}, restriction pool {:x?}",
        pages.pool
    );
    let mut rng = Rng(SEED);
    let mut c = Counts::default();
    let mut stuck_left = [STUCK_PER_KIND; 6];

    for cycle in 0..CYCLES {
        let k = rng.below(KINDS.len() as u64) as usize;
        let kind = KINDS[k];
        let stuck = matches!(kind, Kind::StopReading | Kind::UnansweredEvent)
            && stuck_left[k] > 0
            && rng.chance(50);
        if stuck {
            stuck_left[k] -= 1;
        }
        let mut restricted = Vec::new();
        let (moment, stuck_tool) =
            run_cycle(&t, &mut rng, kind, stuck, &pages, &mut restricted, &mut c);
        c.cycles[k] += 1;
        c.frames[k] += FRAMES_PER_CYCLE;

        // A fresh client is served within the timeout + 1 s of the moment.
        let mut client = None;
        let served = wait::within(SERVED_WITHIN, || {
            client = fresh_client(&t);
            client.is_some()
        });
        let took = moment.elapsed();
        assert!(
            served,
            "cycle {cycle} ({kind:?}, stuck {stuck}): no fresh client served within \
             {SERVED_WITHIN:?}; running {}; stderr: {}",
            t.running(),
            t.stderr()
        );
        c.slowest = c.slowest.max(took);
        let client = client.expect("served");
        // The detach lifted the cycle's restrictions.
        restricted.sort_unstable();
        restricted.dedup();
        restricted.truncate(4);
        if !restricted.is_empty() {
            let got = client
                .get_page_access(0, &restricted)
                .unwrap_or_else(|e| panic!("cycle {cycle}: GET_PAGE_ACCESS: {e}"));
            assert_eq!(
                got,
                vec![Access::RWX; restricted.len()],
                "cycle {cycle} ({kind:?}): pages {restricted:x?} still restricted after the detach"
            );
            c.pages_checked += restricted.len();
        }
        client.close();
        if let Some(mut tool) = stuck_tool {
            tool.resume();
            tool.kill();
        }
        c.held += 1;
    }

    // The guest ran on through the campaign.
    let ok = wait::within(SOON, || heartbeat(&t) > beats_before + 1);
    let beats_after = heartbeat(&t);
    assert!(
        ok,
        "heartbeat {beats_before} -> {beats_after}; stderr: {}",
        t.stderr()
    );
    assert!(t.running(), "the VM died; stderr: {}", t.stderr());
    let stderr = t.stderr();
    assert!(
        !stderr.contains("panicked") && !stderr.to_lowercase().contains("backtrace"),
        "{stderr}"
    );
    let frames: usize = c.frames.iter().sum();
    let per_kind: Vec<String> = KINDS
        .iter()
        .zip(c.cycles.iter().zip(c.frames.iter()))
        .map(|(k, (n, f))| format!("{k:?} {n}/{f}"))
        .collect();
    eprintln!(
        "campaign seed={SEED:#x}: {} cycles, {frames} frames ({} bytes; cycles/frames by kind: {}), \
         faults: {} disconnects, {} kills, {} stops, {} truncated mid-message, {} never read, \
         {} unanswered PF events, {} stuck (+{} flood messages), {} host-closed on bad input; \
         {} restriction entries, {} pages checked rwx after detach; held {}/{}; slowest fresh \
         client {:?}; heartbeat {beats_before} -> {beats_after}; {:?} total",
        CYCLES,
        c.bytes,
        per_kind.join(", "),
        c.disconnects,
        c.kills,
        c.stops,
        c.truncated,
        c.unread,
        c.unanswered_events,
        c.stuck,
        c.flood,
        c.host_closed,
        c.restrictions,
        c.pages_checked,
        c.held,
        CYCLES,
        c.slowest,
        started.elapsed()
    );
    assert_eq!(frames, CYCLES * FRAMES_PER_CYCLE);
    assert_eq!(c.held, CYCLES, "not every cycle held");
}
