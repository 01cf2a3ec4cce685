//! The whole agent side on the host backend: a shim played by two threads (one serves the
//! hypercall socket, copying granted pages of a target memfd into the window memfd; one serves
//! GET_MAP_TOKEN on the command ring) and the agent listing the demo target's tasks through
//! its page tables, zero host-side knowledge of the layout (profile offsets only).

mod common;

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance::agent::{CommandClient, CommandTokens, LogWriter, Waiting};
use appliance::memory::{CachedMemory, PhysicalMemory};
use appliance::paging::{AddressSpace, PageSize, PteFlags};
use appliance::profile::Profile;
use appliance::tasks::{TaskLayout, TaskState};
use common::Tables;
use guest_driver::host::{self, HOST_TOKEN_GPA, HostAgent, HostRequest, Mapping, REQUEST_SIZE};
use hypercall::HcError;
use hypercall::boot::{BOOT_MAGIC, BOOT_VERSION, BootInfo};
use hypercall::call::{Request, check_window};
use hypercall::discovery::{Features, NO_VCPU, RingKind};
use hypercall::error::encode;
use hypercall::ring::park::SleepWaiter;
use hypercall::ring::{LayoutParams, NoNotify, Region, RingSizes, WaitStrategy};
use protocol::reply::Reply;
use protocol::types::MapToken;
use protocol::{Command, CommandKind, ToolMessage, V4, WireProfile};
use serde_json::Value;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const FIXTURE: &[u8] = include_bytes!("fixtures/demo-target.profile.json");
const TARGET_BYTES: u64 = 8 << 20;
const WINDOW_GPA: u64 = 0x1_0000_0000;
const WINDOW_PAGES: u64 = 32;

type Tokens = Arc<Mutex<HashSet<[u64; 4]>>>;

/// The demo target's memory: identity-mapped kernel, a task table at the profile's address.
fn build_target(raw: &Value) -> (Tables, u64) {
    let mut t = Tables::new(TARGET_BYTES as usize, 0x40_0000, 0x48_0000);
    let cr3 = t.table();
    let kernel = PteFlags {
        writable: true,
        user: false,
        no_execute: false,
    };
    t.map(cr3, 0, 0, PageSize::Size2M, kernel);
    let field = |name: &str| raw["structs"]["task"]["fields"][name].as_u64().unwrap();
    let size = raw["structs"]["task"]["size"].as_u64().unwrap();
    let table = raw["symbols"]["task_table"].as_u64().unwrap();
    let ready = raw["constants"]["task_state_ready"].as_u64().unwrap() as u32;
    for (slot, pid, parent, name) in [
        (0u64, 1u32, 0u32, "init"),
        (1, 2, 0, "monitor"),
        (5, 7, 1, "worker-1"),
    ] {
        let at = table + slot * size;
        t.mem.write(at + field("pid"), &pid.to_le_bytes()).unwrap();
        t.mem
            .write(at + field("state"), &ready.to_le_bytes())
            .unwrap();
        t.mem
            .write(at + field("parent"), &parent.to_le_bytes())
            .unwrap();
        t.mem.write(at + field("name"), name.as_bytes()).unwrap();
        t.mem
            .write_u64(at + field("cr3"), 0x20_0000 + u64::from(pid) * 0x1000)
            .unwrap();
    }
    (t, cr3)
}

fn serve_hypercalls(mut stream: UnixStream, target: File, window: File, tokens: Tokens) {
    let mut buf = [0u8; REQUEST_SIZE];
    let serve = |request: &HostRequest| -> Result<u64, HcError> {
        match Request::decode(&request.regs())? {
            Request::MemMap {
                token_gpa,
                target_gpa,
                window_gpa,
            } => {
                check_window(window_gpa, 1, WINDOW_GPA, WINDOW_PAGES * 4096)?;
                if target_gpa >= TARGET_BYTES {
                    return Err(HcError::OutOfRange);
                }
                if token_gpa != HOST_TOKEN_GPA {
                    return Err(HcError::Fault);
                }
                if !tokens.lock().unwrap().remove(&request.token) {
                    return Err(HcError::BadToken);
                }
                let mut page = [0u8; 4096];
                target.read_exact_at(&mut page, target_gpa).unwrap();
                window.write_all_at(&page, window_gpa - WINDOW_GPA).unwrap();
                Ok(0)
            }
            Request::MemUnmap { window_gpa } => {
                check_window(window_gpa, 1, WINDOW_GPA, WINDOW_PAGES * 4096)?;
                window
                    .write_all_at(&[0u8; 4096], window_gpa - WINDOW_GPA)
                    .unwrap();
                Ok(0)
            }
            _ => Err(HcError::NotPermitted),
        }
    };
    while stream.read_exact(&mut buf).is_ok() {
        let rax = encode(serve(&HostRequest::read_from_bytes(&buf).unwrap()));
        if stream.write_all(&rax.to_le_bytes()).is_err() {
            break;
        }
    }
}

#[test]
fn host_agent_lists_tasks_through_tokens_and_the_window() {
    let raw: Value = serde_json::from_slice(FIXTURE).unwrap();
    let (tables, kernel_cr3) = build_target(&raw);
    let params = LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes::default(),
        features: Features::MAP_RANGE,
        map_window_gpa: WINDOW_GPA,
        map_window_size: WINDOW_PAGES * 4096,
    };
    let target = File::from(host::memfd(c"target", TARGET_BYTES).unwrap());
    target.write_all_at(tables.mem.as_bytes(), 0).unwrap();
    let ring_fd = host::memfd(c"ring", params.region_size()).unwrap();
    let window_fd = host::memfd(c"window", WINDOW_PAGES * 4096).unwrap();
    let shim_region = Region::create(
        Mapping::map(ring_fd.as_raw_fd(), params.region_size() as usize)
            .unwrap()
            .into_region()
            .unwrap(),
        &params,
    )
    .unwrap();
    let mut info = BootInfo::new_zeroed();
    info.magic = BOOT_MAGIC;
    info.version = BOOT_VERSION;
    info.vcpu_count = 1;
    info.ring_region_gpa = 0x2_0000_0000;
    info.ring_region_size = params.region_size();
    info.map_window_gpa = WINDOW_GPA;
    info.map_window_size = WINDOW_PAGES * 4096;
    let (shim_end, agent_end) = UnixStream::pair().unwrap();
    host::send_with_fds(
        &shim_end,
        info.as_bytes(),
        &[ring_fd.as_raw_fd(), window_fd.as_raw_fd()],
    )
    .unwrap();

    let tokens: Tokens = Arc::default();
    let window_file = File::from(window_fd);
    let t2 = tokens.clone();
    std::thread::spawn(move || serve_hypercalls(shim_end, target, window_file, t2));

    // The command server: GET_MAP_TOKEN issues a fresh token the hypercall side accepts once.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, t3) = (stop.clone(), tokens.clone());
    let mut commands = shim_region
        .consumer_for(RingKind::Command, NO_VCPU)
        .unwrap();
    let mut replies = shim_region
        .producer_for(RingKind::CommandReply, NO_VCPU)
        .unwrap();
    let command_server = std::thread::spawn(move || {
        let mut buf = vec![0u8; commands.max_payload()];
        let mut out = vec![0u8; 256];
        let mut issued = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let Some(n) = commands.try_pop(&mut buf).unwrap() else {
                commands.release().unwrap();
                std::thread::sleep(Duration::from_micros(50));
                continue;
            };
            let frame = V4::parse_frame(&buf[..n]).unwrap();
            let ToolMessage::Command {
                seq,
                command: Command::GetMapToken,
            } = V4::decode_tool_message(frame).unwrap()
            else {
                panic!("unexpected command")
            };
            issued += 1;
            let words = [
                issued,
                issued.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                !issued,
                0x0070_656b_6f74,
            ];
            t3.lock().unwrap().insert(words);
            let token = hypercall::token::MapToken::new(words).to_bytes();
            let n = V4::encode_reply(
                CommandKind::GetMapToken,
                seq,
                &Ok(Reply::MapToken(MapToken(token))),
                &mut out,
            )
            .unwrap();
            replies.try_push(&out[..n]).unwrap();
            let _ = replies.publish().unwrap();
        }
        issued
    });

    // The agent.
    let agent = HostAgent::from_stream(agent_end).unwrap();
    let waiting = Waiting::new(
        WaitStrategy::default(),
        SleepWaiter(Duration::from_micros(50)),
        NoNotify,
    );
    let mut client = CommandClient::new(
        agent
            .region
            .producer_for(RingKind::Command, NO_VCPU)
            .unwrap(),
        agent
            .region
            .consumer_for(RingKind::CommandReply, NO_VCPU)
            .unwrap(),
    );
    let profile = Profile::from_json(FIXTURE).unwrap();
    let layout = TaskLayout::from_profile(&profile).unwrap();
    let tasks;
    let first_stats;
    {
        let mut mem =
            CachedMemory::new(&agent.window, CommandTokens::new(&mut client, &waiting), 16);
        // The kernel's CR3 (in the running system it comes with every event's sregs).
        let cr3 = kernel_cr3;
        tasks = layout.list(&mut mem, AddressSpace::Paged { cr3 }).unwrap();
        first_stats = mem.stats();
        let again = layout.list(&mut mem, AddressSpace::Paged { cr3 }).unwrap();
        assert_eq!(again, tasks);
        let second = mem.stats();
        assert_eq!(
            second.misses, first_stats.misses,
            "a second listing maps nothing new"
        );
        assert!(second.hits > first_stats.hits);
        let mut word = [0u8; 8];
        mem.read_phys(layout.table, &mut word).unwrap();
        assert_eq!(
            u32::from_le_bytes(word[..4].try_into().unwrap()),
            1,
            "pid of slot 0"
        );
    }
    let names: Vec<_> = tasks
        .iter()
        .map(|t| (t.pid, t.name.as_str(), t.parent, t.state))
        .collect();
    assert_eq!(
        names,
        [
            (1, "init", 0, TaskState::Ready),
            (2, "monitor", 0, TaskState::Ready),
            (7, "worker-1", 1, TaskState::Ready)
        ]
    );
    assert_eq!(tasks[2].cr3, 0x20_7000);
    // Pages walked: PML4, PDPT, PD (2 MiB leaf) and the task-table page = 4 misses, 4 tokens.
    assert_eq!(first_stats.misses, 4);
    assert_eq!(agent.window.stats().maps, 4);
    assert!(
        tokens.lock().unwrap().is_empty(),
        "every issued token was used exactly once"
    );

    // Findings go out as JSON lines.
    let mut log = LogWriter::new(agent.region.producer_for(RingKind::Log, NO_VCPU).unwrap());
    for task in &tasks {
        assert!(log.emit(task));
    }
    log.flush(&NoNotify).unwrap();
    let mut shim_log = shim_region.consumer_for(RingKind::Log, NO_VCPU).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = shim_log.try_pop(&mut buf).unwrap().unwrap();
    let line: Value = serde_json::from_slice(&buf[..n]).unwrap();
    assert_eq!(line["name"], "init");
    assert_eq!(line["cr3"], 0x20_1000);

    stop.store(true, Ordering::Relaxed);
    assert_eq!(command_server.join().unwrap(), 4);
}
