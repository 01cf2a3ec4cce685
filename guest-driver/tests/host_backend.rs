//! The host backend against a test server that plays the shim: real memfds, a real unix
//! socket pair, SCM_RIGHTS, and the doorbell ABI's checks (tokens single use, addresses
//! checked, only granted pages ever written into the window).

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use guest_driver::host::{self, HOST_TOKEN_GPA, HostAgent, HostRequest, Mapping, REQUEST_SIZE};
use guest_driver::{Discovery, DriverError, HypercallNotify, HypercallsExt};
use hypercall::HcError;
use hypercall::boot::{BOOT_MAGIC, BOOT_VERSION, BootInfo};
use hypercall::call::{Request, check_window};
use hypercall::discovery::{ABI_VERSION, Features, RingKind};
use hypercall::error::encode;
use hypercall::ring::{LayoutParams, Region, RingSizes};
use hypercall::token::MapToken;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const TARGET_PAGES: u64 = 64;
const WINDOW_GPA: u64 = 0x1_0000_0000;
const WINDOW_PAGES: u64 = 16;
const RING_GPA: u64 = 0x2_0000_0000;

/// The byte the target holds at `gpa`.
fn target_byte(gpa: u64) -> u8 {
    (gpa / 4096 * 31 + gpa % 251) as u8
}

/// What the server saw, for assertions.
#[derive(Default, Debug)]
struct ServerLog {
    calls: Vec<u64>,
    window_writes: u64,
    notified: Vec<u64>,
}

struct Shim {
    target: File,
    window: File,
    tokens: HashSet<[u64; 4]>,
    used: HashSet<[u64; 4]>,
    mapped: HashSet<u64>,
    log: Arc<Mutex<ServerLog>>,
}

impl Shim {
    fn take_token(&mut self, request: &HostRequest, token_gpa: u64) -> Result<(), HcError> {
        if token_gpa != HOST_TOKEN_GPA {
            return Err(HcError::Fault);
        }
        if self.used.contains(&request.token) {
            return Err(HcError::TokenExpired);
        }
        if !self.tokens.remove(&request.token) {
            return Err(HcError::BadToken);
        }
        self.used.insert(request.token);
        Ok(())
    }

    fn copy_pages(&mut self, target_gpa: u64, window_gpa: u64, pages: u64) -> Result<u64, HcError> {
        check_window(window_gpa, pages, WINDOW_GPA, WINDOW_PAGES * 4096)?;
        if target_gpa + pages * 4096 > TARGET_PAGES * 4096 {
            return Err(HcError::OutOfRange);
        }
        let mut page = [0u8; 4096];
        for i in 0..pages {
            self.target
                .read_exact_at(&mut page, target_gpa + i * 4096)
                .unwrap();
            let at = window_gpa + i * 4096;
            self.window.write_all_at(&page, at - WINDOW_GPA).unwrap();
            self.mapped.insert(at);
            self.log.lock().unwrap().window_writes += 1;
        }
        Ok(pages)
    }

    fn serve(&mut self, request: &HostRequest) -> Result<u64, HcError> {
        self.log.lock().unwrap().calls.push(request.regs[0]);
        match Request::decode(&request.regs())? {
            Request::Version => Ok(ABI_VERSION.into()),
            Request::Features => Ok(Features::MAP_RANGE.union(Features::REVOKE_ALL).0),
            Request::MemMap {
                token_gpa,
                target_gpa,
                window_gpa,
            } => {
                check_window(window_gpa, 1, WINDOW_GPA, WINDOW_PAGES * 4096)?;
                if target_gpa >= TARGET_PAGES * 4096 {
                    return Err(HcError::OutOfRange);
                }
                self.take_token(request, token_gpa)?;
                self.copy_pages(target_gpa, window_gpa, 1).map(|_| 0)
            }
            Request::MapRange {
                token_gpa,
                target_gpa,
                window_gpa,
                pages,
            } => {
                self.take_token(request, token_gpa)?;
                self.copy_pages(target_gpa, window_gpa, pages)
            }
            Request::MemUnmap { window_gpa } => {
                if !self.mapped.remove(&window_gpa) {
                    return Err(HcError::NotMapped);
                }
                self.window
                    .write_all_at(&[0u8; 4096], window_gpa - WINDOW_GPA)
                    .unwrap();
                Ok(0)
            }
            Request::RevokeAll => {
                let n = self.mapped.len() as u64;
                for gpa in self.mapped.drain() {
                    self.window
                        .write_all_at(&[0u8; 4096], gpa - WINDOW_GPA)
                        .unwrap();
                }
                Ok(n)
            }
            Request::Notify { ring } => {
                self.log.lock().unwrap().notified.push(ring);
                Ok(0)
            }
            Request::Agent => Err(HcError::NotPermitted),
        }
    }
}

/// The agent plus the shim's view. The server thread ends when the agent's socket closes.
struct Fixture {
    agent: HostAgent,
    shim_region: Region<host::HostMemory>,
    tokens: Vec<MapToken>,
    log: Arc<Mutex<ServerLog>>,
}

fn boot_info(ring_size: u64) -> BootInfo {
    let mut info = BootInfo::new_zeroed();
    info.magic = BOOT_MAGIC;
    info.version = BOOT_VERSION;
    info.vcpu_count = 1;
    info.ram_size = 64 << 20;
    info.ring_region_gpa = RING_GPA;
    info.ring_region_size = ring_size;
    info.map_window_gpa = WINDOW_GPA;
    info.map_window_size = WINDOW_PAGES * 4096;
    info
}

fn params() -> LayoutParams {
    LayoutParams {
        vcpu_count: 2,
        sizes: RingSizes {
            event: 4096,
            event_reply: 4096,
            command: 4096,
            command_reply: 4096,
            log: 4096,
        },
        features: Features::MAP_RANGE.union(Features::REVOKE_ALL),
        map_window_gpa: WINDOW_GPA,
        map_window_size: WINDOW_PAGES * 4096,
    }
}

fn start() -> Fixture {
    let params = params();
    let ring_fd = host::memfd(c"ring", params.region_size()).unwrap();
    let window_fd = host::memfd(c"window", WINDOW_PAGES * 4096).unwrap();
    let target_fd = host::memfd(c"target", TARGET_PAGES * 4096).unwrap();
    let target = File::from(target_fd);
    let bytes: Vec<u8> = (0..TARGET_PAGES * 4096).map(target_byte).collect();
    target.write_all_at(&bytes, 0).unwrap();
    let ring_mem = Mapping::map(ring_fd.as_raw_fd(), params.region_size() as usize)
        .unwrap()
        .into_region()
        .unwrap();
    let shim_region = Region::create(ring_mem, &params).unwrap();

    let (server_end, client_end) = UnixStream::pair().unwrap();
    let info = boot_info(params.region_size());
    host::send_with_fds(
        &server_end,
        info.as_bytes(),
        &[ring_fd.as_raw_fd(), window_fd.as_raw_fd()],
    )
    .unwrap();
    let tokens: Vec<MapToken> = (1..=8u64)
        .map(|i| MapToken::new([i, i * 7, !i, 0x5eed]))
        .collect();
    let log = Arc::new(Mutex::new(ServerLog::default()));
    let mut shim = Shim {
        target,
        window: File::from(window_fd),
        tokens: tokens.iter().map(|t| t.words).collect(),
        used: HashSet::new(),
        mapped: HashSet::new(),
        log: log.clone(),
    };
    let mut stream = server_end;
    std::thread::spawn(move || {
        let mut buf = [0u8; REQUEST_SIZE];
        while stream.read_exact(&mut buf).is_ok() {
            let request = HostRequest::read_from_bytes(&buf).unwrap();
            let rax = encode(shim.serve(&request));
            if stream.write_all(&rax.to_le_bytes()).is_err() {
                break;
            }
        }
    });
    let agent = HostAgent::from_stream(client_end).unwrap();
    Fixture {
        agent,
        shim_region,
        tokens,
        log,
    }
}

fn expected_page(gpa: u64) -> Vec<u8> {
    (gpa..gpa + 4096).map(target_byte).collect()
}

#[test]
fn handshake_shares_the_ring_region_and_answers_typed_calls() {
    let f = start();
    assert_eq!(f.agent.discovery.window_slots(), WINDOW_PAGES);
    assert_eq!(f.agent.discovery.ring_gpa, RING_GPA);
    assert_eq!(
        f.agent.window.calls().version().unwrap(),
        u64::from(ABI_VERSION)
    );
    assert!(
        f.agent
            .window
            .calls()
            .features()
            .unwrap()
            .contains(Features::MAP_RANGE)
    );
    // NOTIFY is sent only when the consumer armed its wake word.
    let notify = HypercallNotify::new(f.agent.window.calls(), 2);
    let mut waker = f.shim_region.producer_for(RingKind::Event, 0).unwrap();
    let mut sleeper = f.agent.region.consumer_for(RingKind::Event, 0).unwrap();
    waker.try_push(b"x").unwrap();
    waker.publish_and_notify(&notify).unwrap();
    assert!(
        f.log.lock().unwrap().notified.is_empty(),
        "awake consumer: no hypercall"
    );
    assert_eq!(sleeper.try_pop(&mut [0u8; 8]).unwrap(), Some(1));
    assert!(sleeper.arm_wake().unwrap(), "empty ring: may sleep");
    waker.try_push(b"y").unwrap();
    waker.publish_and_notify(&notify).unwrap();
    assert_eq!(f.log.lock().unwrap().notified, vec![2]);

    // A record the "shim" publishes on vCPU 1's event ring arrives through the memfd.
    let mut producer = f.shim_region.producer_for(RingKind::Event, 1).unwrap();
    producer.try_push(b"event through the memfd").unwrap();
    let _ = producer.publish().unwrap();
    let mut consumer = f.agent.region.consumer_for(RingKind::Event, 1).unwrap();
    let mut buf = [0u8; 64];
    let n = consumer.try_pop(&mut buf).unwrap().unwrap();
    assert_eq!(&buf[..n], b"event through the memfd");
}

#[test]
fn map_reads_the_target_page_and_unmaps_on_drop() {
    let f = start();
    let window = &f.agent.window;
    let slots = window.slot_count();
    {
        let page = window.map(&f.tokens[0], 5 * 4096).unwrap();
        assert_eq!(page.target_gpa(), 5 * 4096);
        assert!((WINDOW_GPA..WINDOW_GPA + WINDOW_PAGES * 4096).contains(&page.window_gpa()));
        assert_eq!(page.to_array().to_vec(), expected_page(5 * 4096));
        let mut odd = [0u8; 13];
        page.read(4090 - 13, &mut odd).unwrap();
        assert_eq!(odd.to_vec(), expected_page(5 * 4096)[4077..4090].to_vec());
        assert_eq!(
            page.read_u64(3).unwrap(),
            u64::from_le_bytes(expected_page(5 * 4096)[3..11].try_into().unwrap())
        );
        assert!(matches!(
            page.read(4090, &mut [0u8; 7]),
            Err(DriverError::OutOfBounds {
                offset: 4090,
                len: 7
            })
        ));
        assert_eq!(window.free_slots(), slots - 1);
    }
    assert_eq!(window.free_slots(), slots);
    let stats = window.stats();
    assert_eq!(
        (
            stats.maps,
            stats.pages_mapped,
            stats.unmaps,
            stats.unmap_errors
        ),
        (1, 1, 1, 0)
    );
    let calls = f.log.lock().unwrap().calls.clone();
    assert_eq!(calls, vec![32, 33], "one MEM_MAP, one MEM_UNMAP");
}

#[test]
fn refused_maps_report_the_host_error_and_free_their_slot() {
    let f = start();
    let window = &f.agent.window;
    let slots = window.slot_count();
    let forged = MapToken::new([0xdead; 4]);
    let err = |r: Result<guest_driver::Page<'_, _, _>, DriverError>| match r {
        Err(DriverError::Hypercall(e)) => e,
        other => panic!("expected a hypercall error, got {other:?}"),
    };
    assert_eq!(err(window.map(&forged, 0)), HcError::BadToken);
    assert_eq!(err(window.map(&f.tokens[1], 0x1001)), HcError::Unaligned);
    assert_eq!(
        err(window.map(&f.tokens[1], TARGET_PAGES * 4096)),
        HcError::OutOfRange
    );
    let page = window.map(&f.tokens[1], 0).unwrap();
    drop(page);
    assert_eq!(
        err(window.map(&f.tokens[1], 0)),
        HcError::TokenExpired,
        "replayed token"
    );
    assert_eq!(window.free_slots(), slots);
    assert_eq!(
        f.log.lock().unwrap().window_writes,
        1,
        "only the granted page was written"
    );
}

#[test]
fn range_maps_fill_consecutive_slots_and_revoke_all_frees_them() {
    let mut f = start();
    {
        let window = &f.agent.window;
        let range = window.map_range(&f.tokens[2], 8 * 4096, 8).unwrap();
        assert_eq!(range.pages(), 8);
        let all = range.to_vec();
        let want: Vec<u8> = (8 * 4096..16 * 4096).map(target_byte).collect();
        assert_eq!(all, want);
        let mut across = [0u8; 100];
        range.read(4096 - 50, &mut across).unwrap();
        assert_eq!(across.to_vec(), want[4046..4146].to_vec());
        assert!(matches!(
            window.map_range(&f.tokens[3], 0, WINDOW_PAGES),
            Err(DriverError::WindowFull {
                pages: WINDOW_PAGES
            })
        ));
        assert!(matches!(
            window.map_range(&f.tokens[3], 0, 0),
            Err(DriverError::BadPageCount(0))
        ));
        assert!(matches!(
            window.map_range(&f.tokens[3], 0, 513),
            Err(DriverError::BadPageCount(513))
        ));
        std::mem::forget(range); // leak the handle: only REVOKE_ALL can clean up now
        assert_eq!(window.free_slots(), WINDOW_PAGES as usize - 8);
        let stats = window.stats();
        assert_eq!(
            (stats.range_maps, stats.pages_mapped, stats.unmaps),
            (1, 8, 0)
        );
    }
    assert_eq!(f.agent.window.revoke_all().unwrap(), 8);
    assert_eq!(f.agent.window.free_slots(), WINDOW_PAGES as usize);
    // The window slots are zero again: a fresh map of page 0 shows page 0, not stale bytes.
    let page = f.agent.window.map(&f.tokens[4], 0).unwrap();
    assert_eq!(page.to_array().to_vec(), expected_page(0));
}

#[test]
fn bad_handshakes_are_refused() {
    let params = params();
    let ring_fd = host::memfd(c"ring", params.region_size()).unwrap();
    let window_fd = host::memfd(c"window", WINDOW_PAGES * 4096).unwrap();
    let ring_mem = Mapping::map(ring_fd.as_raw_fd(), params.region_size() as usize)
        .unwrap()
        .into_region()
        .unwrap();
    Region::create(ring_mem, &params).unwrap();
    let attempt = |info: &BootInfo, fds: &[i32]| {
        let (server, client) = UnixStream::pair().unwrap();
        host::send_with_fds(&server, info.as_bytes(), fds).unwrap();
        HostAgent::from_stream(client).expect_err("handshake must fail")
    };
    let good = boot_info(params.region_size());
    let one_fd = attempt(&good, &[ring_fd.as_raw_fd()]);
    assert!(matches!(one_fd, DriverError::Handshake(_)), "{one_fd:?}");
    let mut bad = good;
    bad.magic = 0;
    assert!(matches!(
        attempt(&bad, &[ring_fd.as_raw_fd(), window_fd.as_raw_fd()]),
        DriverError::BadBootInfo("magic")
    ));
    let mut bad = good;
    bad.map_window_gpa = RING_GPA;
    assert!(matches!(
        attempt(&bad, &[ring_fd.as_raw_fd(), window_fd.as_raw_fd()]),
        DriverError::BadBootInfo(_)
    ));
    // The header names another window than the boot info.
    let mut bad = good;
    bad.map_window_gpa = WINDOW_GPA + 0x10_0000;
    assert!(matches!(
        attempt(&bad, &[ring_fd.as_raw_fd(), window_fd.as_raw_fd()]),
        DriverError::BadBootInfo("region header names another map window")
    ));
    // Descriptors swapped: the "ring" memfd is the zeroed window, its header is invalid.
    let mut bad = good;
    bad.ring_region_size = WINDOW_PAGES * 4096;
    bad.map_window_size = params.region_size();
    let swapped = attempt(&bad, &[window_fd.as_raw_fd(), ring_fd.as_raw_fd()]);
    assert!(
        matches!(swapped, DriverError::Ring(_) | DriverError::BadBootInfo(_)),
        "{swapped:?}"
    );
    // The peer closes without a handshake.
    let (server, client) = UnixStream::pair().unwrap();
    drop(server);
    assert!(HostAgent::from_stream(client).is_err());
}

#[test]
fn discovery_validates_every_boot_info_field() {
    let good = boot_info(0x10_000);
    assert!(Discovery::from_boot_info(&good).is_ok());
    type Mutation = fn(&mut BootInfo);
    let cases: [(&str, Mutation); 7] = [
        ("version", |i| i.version = 9),
        ("no ring", |i| i.ring_region_size = 0),
        ("no window", |i| i.map_window_gpa = 0),
        ("unaligned ring", |i| i.ring_region_gpa += 8),
        ("wrapping window", |i| i.map_window_gpa = u64::MAX - 4095),
        ("window in RAM", |i| i.map_window_gpa = 0x10_0000),
        ("overlap", |i| i.ring_region_gpa = WINDOW_GPA + 4096),
    ];
    for (what, mutate) in cases {
        let mut info = good;
        mutate(&mut info);
        assert!(
            matches!(
                Discovery::from_boot_info(&info),
                Err(DriverError::BadBootInfo(_))
            ),
            "{what}"
        );
    }
    assert!(Discovery::parse_boot_info(&[0u8; 100]).is_err());
}

#[test]
fn in_vm_setup_opens_the_region_and_window_at_given_addresses() {
    use guest_driver::port::{PortHypercalls, open_in_vm};
    use std::sync::atomic::AtomicU64;
    let params = params();
    let ring_fd = host::memfd(c"ring", params.region_size()).unwrap();
    let window_fd = host::memfd(c"window", WINDOW_PAGES * 4096).unwrap();
    let ring = Mapping::map(ring_fd.as_raw_fd(), params.region_size() as usize).unwrap();
    let window = Mapping::map(window_fd.as_raw_fd(), (WINDOW_PAGES * 4096) as usize).unwrap();
    let shim_view = Mapping::map(ring_fd.as_raw_fd(), params.region_size() as usize)
        .unwrap()
        .into_region()
        .unwrap();
    Region::create(shim_view, &params).unwrap();
    let token: &'static [AtomicU64; 4] = Box::leak(Box::new([const { AtomicU64::new(0) }; 4]));
    assert!(
        PortHypercalls::new(token, 0x1004).is_err(),
        "misaligned token buffer"
    );
    let mut info = boot_info(params.region_size());
    let d = Discovery::from_boot_info(&info).unwrap();
    let calls = PortHypercalls::new(token, 0x1000).unwrap();
    // SAFETY: both areas are live read-write mappings owned by `ring` and `window`, which
    // outlive the returned handles (dropped before them below).
    let (region, win) = unsafe { open_in_vm(&d, ring.as_ptr(), window.as_ptr(), calls) }.unwrap();
    assert_eq!(region.params().vcpu_count, 2);
    assert_eq!(win.slot_count(), WINDOW_PAGES as usize);
    assert_eq!(win.base_gpa(), WINDOW_GPA);
    drop((region, win));
    // A boot info naming another window than the region header: refused.
    info.map_window_gpa += 0x1000;
    let d = Discovery::from_boot_info(&info).unwrap();
    let calls = PortHypercalls::new(token, 0x1000).unwrap();
    // SAFETY: as above.
    let refused = unsafe { open_in_vm(&d, ring.as_ptr(), window.as_ptr(), calls) };
    assert!(matches!(refused, Err(DriverError::BadBootInfo(_))));
    drop((ring, window));
}

#[test]
fn connect_by_path_performs_the_handshake() {
    let dir = std::env::temp_dir().join(format!("guest-driver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shim.sock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let params = params();
    let ring_fd = host::memfd(c"ring", params.region_size()).unwrap();
    let window_fd = host::memfd(c"window", WINDOW_PAGES * 4096).unwrap();
    let ring_mem = Mapping::map(ring_fd.as_raw_fd(), params.region_size() as usize)
        .unwrap()
        .into_region()
        .unwrap();
    Region::create(ring_mem, &params).unwrap();
    let info = boot_info(params.region_size());
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        host::send_with_fds(
            &stream,
            info.as_bytes(),
            &[ring_fd.as_raw_fd(), window_fd.as_raw_fd()],
        )
        .unwrap();
        stream
    });
    let agent = HostAgent::connect(&path).unwrap();
    let _stream = server.join().unwrap();
    assert_eq!(agent.discovery.window_gpa, WINDOW_GPA);
    assert_eq!(agent.region.params().vcpu_count, 2);
    assert_eq!(agent.window.slot_count(), WINDOW_PAGES as usize);
    std::fs::remove_dir_all(&dir).unwrap();
}
