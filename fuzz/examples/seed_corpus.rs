//! Writes the generated seed corpus: a handful of small, valid inputs per fuzz target, in
//! `corpus/<target>/gen-*` (other files there, e.g. protocol_decode's hand-made messages,
//! are kept). Run from anywhere: `cargo run --manifest-path fuzz/Cargo.toml --example
//! seed_corpus`; commit the result. Deterministic: rerunning changes nothing.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use hypercall::call::{AGENT_GUEST_REQUEST, Hypercall, OWN_RANGE_BASE};
use hypercall::discovery::RingKind;
use hypercall::ring::Region;
use kvmi_fuzz::pager::{Addr, Count, Input, Op, ServeKind};
use kvmi_fuzz::{PAGE, Scribbles, TableBuilder, demo_task_layout, pte, put_u64s, ring_fuzz_params};
use protocol::command::Command;
use protocol::event::{EventKind, EventSet};
use protocol::event_reply::{Action, EventReply, EventReplyData};
use protocol::list::List;
use protocol::types::{Access, PageAccessEntry, VcpuSelector};
use protocol::wire::WireProfile;
use protocol::wire::libkvmi::event_layout::EventCommon;
use protocol::wire::libkvmi::frame::{Request, encode_request};
use protocol::wire::libkvmi::layout::PageAccessEntry as KvmiPageAccessEntry;
use protocol::wire::libkvmi::{MAX_MSG_SIZE, actions, events, host, ids};
use protocol::wire::v4::V4;
use zerocopy::FromZeros;
use zerocopy::little_endian::{U16, U32, U64};

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn protocol_decode() -> Seeds {
    let entries = [PageAccessEntry {
        gpa: 0x10_0000,
        access: Access::R.union(Access::X),
    }];
    let gpas = [0x1000u64, 0x2000, 0x3000];
    let commands = [
        ("get-version", Command::GetVersion),
        ("pause-vcpu", Command::PauseVcpu { vcpu: 1 }),
        (
            "control-events",
            Command::ControlEvents {
                vcpu: 0,
                events: EventSet::EMPTY.with(EventKind::PageFault),
            },
        ),
        (
            "set-page-access",
            Command::SetPageAccess {
                vcpu: 0,
                view: 0,
                entries: List::from_slice(&entries),
            },
        ),
        (
            "get-page-access",
            Command::GetPageAccess {
                vcpu: 0,
                view: 0,
                gpas: List::from_slice(&gpas),
            },
        ),
        (
            "write-physical",
            Command::WritePhysical {
                gpa: 0x10_f000,
                data: &[1, 0, 0, 0, 0, 0, 0, 0],
            },
        ),
        (
            "control-breakpoint",
            Command::ControlBreakpoint {
                vcpus: VcpuSelector::All,
                enable: true,
                gva: 0xffff_8000_0010_0000,
            },
        ),
    ];
    let mut seeds = Seeds::new();
    for (name, command) in commands {
        let mut buf = vec![0u8; V4::command_len(&command).expect("length")];
        V4::encode_command(7, &command, &mut buf).expect("encode");
        seeds.push((name, buf));
    }
    let reply = EventReply {
        event: EventKind::PageFault,
        action: Action::Continue,
        data: EventReplyData::PageFault(Default::default()),
    };
    let mut buf = vec![0u8; V4::event_reply_len(&reply).expect("length")];
    V4::encode_event_reply(9, &reply, &mut buf).expect("encode");
    seeds.push(("event-reply-pf", buf));
    seeds
}

/// `pending ‖ stream`: the tool's handshake answer, then its requests (seq 1, 2, …).
fn libkvmi_decode() -> Seeds {
    // libkvmi's answer: struct_size 24, then the cookie hash (SHA-1 of an empty secret).
    let mut answer = 24u32.to_le_bytes().to_vec();
    answer.extend_from_slice(&[
        0xda, 0x39, 0xa3, 0xee, 0x5e, 0x6b, 0x4b, 0x0d, 0x32, 0x55, 0xbf, 0xef, 0x95, 0x60, 0x18,
        0x90, 0xaf, 0xd8, 0x07, 0x09,
    ]);
    let msrs: Vec<U32> = [0x174u32, 0x175, 0x176]
        .into_iter()
        .chain(0xc000_0080..=0xc000_0083)
        .map(U32::new)
        .collect();
    // PF reply: 8 bytes of emulation context at ctx_addr.
    let mut pf = vec![0u8; 272];
    pf[..8].copy_from_slice(&0xffff_8000_0010_2000u64.to_le_bytes());
    pf[8..12].copy_from_slice(&8u32.to_le_bytes());
    pf[16..24].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    // The largest message: SET_PAGE_ACCESS with 511 entries is 8184 payload bytes (it also
    // lifts libFuzzer's default input size limit above one message).
    let entries: Vec<KvmiPageAccessEntry> = (0..511u64)
        .map(|i| KvmiPageAccessEntry {
            gpa: U64::new(0x10_0000 + i * 0x1000),
            access: (i % 8) as u8,
            padding1: 0,
            padding2: U16::new(0),
            padding3: U32::new(0),
        })
        .collect();
    let cmd_response = |enable, now| Request::ControlCmdResponse {
        enable,
        now,
        flags: 0,
    };
    let sessions: Vec<(&str, Vec<Request<'_>>)> = vec![
        ("get-version", vec![Request::GetVersion]),
        (
            "pause-batch",
            vec![
                cmd_response(false, true),
                Request::PauseVcpu {
                    vcpu: 0,
                    wait: false,
                },
                Request::PauseVcpu {
                    vcpu: 1,
                    wait: true,
                },
                cmd_response(true, true),
            ],
        ),
        (
            "get-registers",
            vec![Request::GetRegisters {
                vcpu: 0,
                msrs: &msrs,
            }],
        ),
        (
            "read-physical",
            vec![Request::ReadPhysical {
                gpa: 0x12_3000,
                size: 4096,
            }],
        ),
        (
            "event-reply-pf",
            vec![Request::EventReply {
                vcpu: 0,
                action: actions::CONTINUE,
                event: events::PF,
                data: &pf,
            }],
        ),
        (
            "set-page-access-max",
            vec![Request::SetPageAccess {
                view: 0,
                entries: &entries,
            }],
        ),
    ];
    let mut seeds = Seeds::new();
    let mut all = vec![events::PF];
    all.extend_from_slice(&answer);
    for (name, requests) in sessions {
        let mut seed = vec![events::PF];
        seed.extend_from_slice(&answer);
        for (seq, request) in (1u32..).zip(&requests) {
            let mut buf = vec![0u8; MAX_MSG_SIZE];
            let n = encode_request(seq, request, &mut buf).expect("encode");
            seed.extend_from_slice(&buf[..n]);
            all.extend_from_slice(&buf[..n]);
        }
        seeds.push((name, seed));
    }
    seeds.push(("session", all));
    // The tool side: a PF event and a reply to GET_VERSION, as a VMM sends them.
    let mut common = EventCommon::new_zeroed();
    common.event = events::PF;
    common.mode = 8;
    let mut vmm = vec![events::PF];
    let mut buf = vec![0u8; MAX_MSG_SIZE];
    let n = host::encode_event(5, &common, &[0u8; 24], &mut buf).expect("encode event");
    vmm.extend_from_slice(&buf[..n]);
    // GET_VERSION's reply: version 1, padding, no features.
    let mut version = [0u8; 16];
    version[0] = 1;
    let n = host::encode_reply(ids::GET_VERSION, 1, &version, &mut buf).expect("encode reply");
    vmm.extend_from_slice(&buf[..n]);
    seeds.push(("vmm-event-and-reply", vmm));
    seeds
}

/// A laid-out region with records published on every ring (some consumed), as words.
fn busy_region() -> (Vec<u64>, Vec<u64>) {
    let params = ring_fuzz_params();
    let fresh: Vec<AtomicU64> = (0..params.region_size() / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    let words: Vec<AtomicU64> = (0..params.region_size() / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    let mem: &[AtomicU64] = &words;
    let region = Region::create(mem, &params).expect("layout");
    let _ = Region::create(&fresh[..], &params).expect("layout");
    for (k, kind) in [
        RingKind::Event,
        RingKind::EventReply,
        RingKind::Command,
        RingKind::CommandReply,
        RingKind::Log,
    ]
    .into_iter()
    .enumerate()
    {
        let index = region.ring_index(kind, 0).expect("ring");
        let mut producer = region.producer(index).expect("producer");
        for len in [8usize, 40, 100] {
            let record: Vec<u8> = (0..len).map(|i| (i + k) as u8).collect();
            producer.try_push(&record).expect("fits");
        }
        let _ = producer.publish().expect("publish");
        if k % 2 == 0 {
            let mut consumer = region.consumer(index).expect("consumer");
            let mut buf = [0u8; 128];
            consumer.try_pop(&mut buf).expect("pop");
            let _ = consumer.release().expect("release");
        }
    }
    let load = |w: &[AtomicU64]| w.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    (load(&fresh), load(&words))
}

fn ring_region() -> Seeds {
    let (fresh, busy) = busy_region();
    let mut raw = vec![0u8];
    put_u64s(&mut raw, &busy);
    let mut empty_raw = vec![0u8];
    put_u64s(&mut empty_raw, &fresh);
    // Scribble mode: the words that differ from a fresh layout, as (u16 index, u64 value).
    let mut scribbled = vec![1u8];
    for (i, (&a, &b)) in fresh.iter().zip(&busy).enumerate() {
        if a != b {
            scribbled.extend_from_slice(&(i as u16).to_le_bytes());
            scribbled.extend_from_slice(&b.to_le_bytes());
        }
    }
    vec![
        ("raw-fresh", empty_raw),
        ("raw-busy", raw),
        ("scribble-none", vec![1u8]),
        ("scribble-busy", scribbled),
    ]
}

fn hypercall_request() -> Seeds {
    let own = |n: u64| OWN_RANGE_BASE + n;
    // rax, rbx, rcx, rdx, rsi, rdi, window base, window size, raw result.
    let window = [0x8000_0000u64, 512 * PAGE];
    let cases: [(&str, [u64; 6], u64); 10] = [
        (
            "mem-map",
            [
                Hypercall::MemMap.number(),
                0x2000,
                0x5000,
                0x8000_0000,
                0,
                0,
            ],
            0,
        ),
        (
            "mem-unmap",
            [Hypercall::MemUnmap.number(), 0x8000_1000, 0, 0, 0, 0],
            0,
        ),
        (
            "agent",
            [Hypercall::Agent.number(), 0, 0, 0, 0, AGENT_GUEST_REQUEST],
            0,
        ),
        ("version", [own(1), 0, 0, 0, 0, 0], 1),
        ("features", [own(2), 0, 0, 0, 0, 0], 0x3f),
        (
            "map-range",
            [own(3), 0x2000, 0x10_0000, 0x8000_0000, 512, 0],
            512,
        ),
        ("revoke-all", [own(4), 0, 0, 0, 0, 0], 7),
        ("notify-all", [own(5), u64::MAX, 0, 0, 0, 0], 0),
        (
            "map-range-wraps",
            [own(3), 0x2000, u64::MAX - 4095, 0, 2, 0],
            (-5i64) as u64,
        ),
        ("nosys", [0, 0, 0, 0, 0, 0], (-1i64) as u64),
    ];
    cases
        .into_iter()
        .map(|(name, regs, raw)| {
            let mut out = Vec::new();
            put_u64s(&mut out, &regs);
            put_u64s(&mut out, &window);
            put_u64s(&mut out, &[raw]);
            (name, out)
        })
        .collect()
}

fn insn_decode() -> Seeds {
    let seeds: [(&str, &[u8]); 12] = [
        // lock inc qword [rip+0xb288]
        ("lock-inc-rip", &[0xf0, 0x48, 0xff, 0x05, 0x88, 0xb2, 0, 0]),
        // lock add dword [rbx+rcx*8+0x10], 1
        ("lock-add-sib", &[0xf0, 0x83, 0x44, 0xcb, 0x10, 0x01]),
        // gs: lock cmpxchg [rbx], ecx
        ("gs-cmpxchg", &[0x65, 0xf0, 0x0f, 0xb1, 0x0b]),
        // mov dword [rax+0x12345678], 0xdeadbeef
        (
            "mov-imm32-disp32",
            &[0xc7, 0x80, 0x78, 0x56, 0x34, 0x12, 0xef, 0xbe, 0xad, 0xde],
        ),
        // mov word [rdi], 0x1234 (operand-size prefix: 2-byte immediate)
        ("mov-imm16", &[0x66, 0xc7, 0x07, 0x34, 0x12]),
        // fs: mov [r12], rax (REX.B, SIB for r12)
        ("fs-mov-r12", &[0x64, 0x49, 0x89, 0x04, 0x24]),
        // lock bts qword [r9+r10*4-8], 5 (REX.X and REX.B, 0f ba /5 ib)
        (
            "bts-imm8",
            &[0xf0, 0x4b, 0x0f, 0xba, 0x6c, 0x91, 0xf8, 0x05],
        ),
        // add [disp32] with no base (SIB base 5, mod 0)
        ("add-abs-sib", &[0x01, 0x04, 0x25, 0x00, 0x10, 0x00, 0x00]),
        // three-byte opcode map (0f 38 xx) with a memory operand: not decoded, reads ModRM
        ("three-byte", &[0x66, 0x0f, 0x38, 0x00, 0x00]),
        // test byte [rsi], 0x80 (f6 /0 ib)
        ("test-imm8", &[0xf6, 0x06, 0x80]),
        // register operand: no memory operand
        ("inc-reg", &[0xff, 0xc0]),
        // the longest legal form: prefixes up to 15 bytes
        (
            "fifteen",
            &[
                0x66, 0x67, 0x2e, 0x3e, 0xf0, 0x48, 0x81, 0x84, 0x88, 0x78, 0x56, 0x34, 0x12, 0x01,
                0x00,
            ],
        ),
    ];
    seeds.into_iter().map(|(n, b)| (n, b.to_vec())).collect()
}

/// `cr3 ‖ va ‖ len ‖ scribbles`.
fn walk_seed(cr3: u64, va: u64, len: u64, tables: &TableBuilder) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64s(&mut out, &[cr3, va, len]);
    tables.mem.encode(&mut out);
    out
}

fn data_page(t: &mut TableBuilder, frame: u64) {
    for k in 0..8 {
        t.mem
            .word(frame + k * 8, (0x1111_1111_1111_1111 * (k + 1)) ^ frame);
    }
    t.mem.word(frame + PAGE - 8, frame | 0xfff);
}

fn page_walk() -> Seeds {
    let mut seeds = Seeds::new();
    let rw_user = pte::W | pte::U | pte::NX;
    // A 4 KiB page; read 64 bytes inside it.
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    t.map(cr3, 0x7f00_0000_1000, 0x40_0000, 1, rw_user);
    data_page(&mut t, 0x40_0000);
    seeds.push(("4k", walk_seed(cr3, 0x7f00_0000_1010, 64, &t)));
    // A read across two scattered 4 KiB pages, then into an unmapped third.
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    t.map(cr3, 0x5555_0000_0000, 0x43_0000, 1, rw_user);
    t.map(cr3, 0x5555_0000_1000, 0x41_0000, 1, pte::W);
    data_page(&mut t, 0x43_0000);
    data_page(&mut t, 0x41_0000);
    seeds.push(("4k-scattered", walk_seed(cr3, 0x5555_0000_0f80, 256, &t)));
    seeds.push(("4k-fault", walk_seed(cr3, 0x5555_0000_0f80, 3 * PAGE, &t)));
    // A 2 MiB kernel page and a 1 GiB user page.
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    t.map(cr3, 0xffff_8000_0020_0000, 0x20_0000, 2, 0);
    t.map(cr3, 0xffff_c000_4000_0000, 0x4000_0000, 3, rw_user);
    data_page(&mut t, 0x20_1000);
    seeds.push(("2m", walk_seed(cr3, 0xffff_8000_0020_1234, PAGE, &t)));
    seeds.push(("1g", walk_seed(cr3, 0xffff_c000_4000_0100, 100, &t)));
    // A 1 GiB page whose frame lies past the end of memory: translates, the read faults.
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    t.map(cr3, 0x40_0000_0000, 0x10_0000_0000, 3, rw_user);
    seeds.push(("1g-past-memory", walk_seed(cr3, 0x40_0000_0000, 64, &t)));
    // PS at PML4 level (reserved), and a 2 MiB entry with an offset bit (reserved).
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    t.map(cr3, 0x1000, 0x60_0000, 1, rw_user);
    t.set(cr3, 0, 0x2000 | pte::P | pte::PS);
    seeds.push(("reserved-pml4", walk_seed(cr3, 0x1000, 8, &t)));
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    t.map(cr3, 0x20_0000, 0x20_0000 | 1 << 13, 2, rw_user);
    seeds.push(("reserved-2m", walk_seed(cr3, 0x20_0000, 8, &t)));
    // A non-canonical address, and an empty address space.
    seeds.push((
        "non-canonical",
        walk_seed(cr3, 0x0000_8000_0000_0000, 8, &t),
    ));
    seeds.push((
        "empty",
        walk_seed(0x1000, 0x1000, 8, &TableBuilder::new(0x1000)),
    ));
    seeds
}

struct Task<'a> {
    slot: u64,
    pid: u32,
    state: u64,
    parent: u32,
    cpu: u32,
    name: &'a [u8],
    cr3: u64,
}

/// The demo target's task table with these tasks, as bytes.
fn task_table_image(tasks: &[Task<'_>]) -> Vec<u8> {
    let l = demo_task_layout();
    let mut table = vec![0u8; l.table_bytes()];
    for t in tasks {
        let at = (t.slot * l.entry_size) as usize;
        let mut put = |off: u64, bytes: &[u8]| {
            table[at + off as usize..at + off as usize + bytes.len()].copy_from_slice(bytes);
        };
        put(l.pid, &t.pid.to_le_bytes());
        put(l.state, &(t.state as u32).to_le_bytes());
        put(l.parent, &t.parent.to_le_bytes());
        put(l.cpu, &t.cpu.to_le_bytes());
        put(l.name, t.name);
        put(l.cr3, &t.cr3.to_le_bytes());
    }
    table
}

fn demo_tasks() -> Vec<u8> {
    let [_, ready, running, exited] = demo_task_layout().states;
    task_table_image(&[
        Task {
            slot: 0,
            pid: 1,
            state: running,
            parent: 0,
            cpu: 0,
            name: b"init",
            cr3: 0x20_1000,
        },
        Task {
            slot: 1,
            pid: 2,
            state: ready,
            parent: 0,
            cpu: 1,
            name: b"monitor",
            cr3: 0x20_5000,
        },
        Task {
            slot: 4,
            pid: 9,
            state: exited,
            parent: 1,
            cpu: 1,
            name: b"worker-3",
            cr3: 0x20_9000,
        },
        Task {
            slot: 7,
            pid: 11,
            state: ready,
            parent: 1,
            cpu: 0,
            name: b"sixteen-chars-xx",
            cr3: 0x21_0000,
        },
        Task {
            slot: 31,
            pid: 12,
            state: 77,
            parent: 4,
            cpu: 0,
            name: b"kw\x01rk\xff",
            cr3: 0x21_4000,
        },
    ])
}

fn task_table() -> Seeds {
    let l = demo_task_layout();
    let table = demo_tasks();
    let with_mode = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    // The table up to the end of slot 8 (mode 1 pads the rest with free slots).
    let head = &table[..(8 * l.entry_size) as usize];
    let mut seeds = vec![
        ("identity-exact", with_mode(0, &table)),
        ("identity-short", with_mode(0, head)),
        ("identity-padded", with_mode(1, head)),
    ];
    // Paged: the table's page mapped by a 4 KiB page to another frame, the identity copy
    // holding other tasks; and an identity-mapping 2 MiB page.
    let frame = 0x80_0000;
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    let page = l.table & !(PAGE - 1);
    t.map(cr3, page, frame, 1, pte::W);
    t.mem.bytes(frame + (l.table - page), &table);
    t.mem.bytes(l.table, &table[..(2 * l.entry_size) as usize]);
    let mut paged = vec![2u8];
    put_u64s(&mut paged, &[cr3]);
    t.mem.encode(&mut paged);
    seeds.push(("paged-4k", paged));
    let mut t = TableBuilder::new(0x1000);
    let cr3 = t.table();
    t.map(cr3, 0, 0, 2, pte::W);
    t.mem.bytes(l.table, &table);
    let mut paged = vec![3u8];
    put_u64s(&mut paged, &[cr3]);
    t.mem.encode(&mut paged);
    seeds.push(("paged-2m-identity", paged));
    // An address space that does not map the table.
    let mut empty = vec![2u8];
    put_u64s(&mut empty, &[0x1000]);
    let mut s = Scribbles::default();
    s.bytes(l.table, &table[..l.entry_size as usize]);
    s.encode(&mut empty);
    seeds.push(("paged-unmapped", empty));
    seeds
}

fn pager_calls() -> Seeds {
    let issue = |slot| Op::Issue { other: false, slot };
    let map = |slot, target, window| Op::MemMap {
        token: Addr::at(slot),
        target: Addr::at(target),
        window: Addr::at(window),
    };
    let range = |slot, target, window, pages| Op::MapRange {
        token: Addr::at(slot),
        target: Addr::at(target),
        window: Addr::at(window),
        pages: Count::pages(pages),
    };
    let unmap = |window| Op::MemUnmap {
        window: Addr::at(window),
    };
    let remapped = |ops: Vec<Op>| Input { config: 0, ops }.encode();
    let copying = |ops: Vec<Op>| Input { config: 1, ops }.encode();
    vec![
        (
            "map-unmap",
            remapped(vec![issue(0), map(0, 5, 3), unmap(3), unmap(3)]),
        ),
        (
            "range-revoke",
            remapped(vec![issue(1), range(1, 8, 0, 8), Op::RevokeAll]),
        ),
        (
            "replay",
            remapped(vec![
                issue(0),
                map(0, 1, 1),
                Op::Replay { slot: 2, which: 0 },
                map(2, 2, 2),
                map(0, 2, 2),
            ]),
        ),
        (
            "expiry",
            remapped(vec![
                issue(0),
                Op::Advance { ms: 999 },
                issue(1),
                Op::Advance { ms: 1 },
                map(0, 4, 4),
                map(1, 4, 4),
            ]),
        ),
        (
            "wrong-target",
            remapped(vec![
                Op::Issue {
                    other: true,
                    slot: 0,
                },
                map(0, 0, 0),
                map(0, 0, 0),
            ]),
        ),
        (
            "window-bounds-busy",
            remapped(vec![
                issue(0),
                issue(1),
                range(0, 0, 30, 4),
                range(0, 0, 28, 4),
                map(1, 9, 29),
                map(1, 64, 27),
                map(1, 63, 27),
            ]),
        ),
        (
            "copying-target-write",
            copying(vec![
                issue(0),
                map(0, 7, 7),
                Op::TargetWrite { page: 7 },
                unmap(7),
            ]),
        ),
        (
            "remapped-target-write",
            remapped(vec![
                issue(0),
                map(0, 7, 7),
                Op::TargetWrite { page: 7 },
                unmap(7),
            ]),
        ),
        (
            "decoder-and-serve",
            Input {
                config: 2,
                ops: vec![
                    Op::Raw {
                        rax: 3,
                        args: [0; 5],
                    },
                    Op::Raw {
                        rax: 4,
                        args: [0; 5],
                    },
                    Op::Raw {
                        rax: 7,
                        args: [u64::MAX, 0, 0, 0, 0],
                    },
                    Op::Raw {
                        rax: 256,
                        args: [0; 5],
                    },
                    issue(0),
                    Op::Serve {
                        kind: ServeKind::MemMap,
                        token: Addr::at(0),
                        target: Addr::at(1),
                        window: Addr::at(1),
                        pages: Count::pages(1),
                    },
                    Op::Serve {
                        kind: ServeKind::MemUnmap,
                        token: Addr::at(0),
                        target: Addr::at(0),
                        window: Addr { kind: 1, value: 1 },
                        pages: Count::pages(1),
                    },
                ],
            }
            .encode(),
        ),
        (
            "retire",
            remapped(vec![
                issue(0),
                issue(1),
                map(0, 3, 3),
                Op::Retire,
                map(1, 3, 3),
            ]),
        ),
        ("nine-outstanding", remapped((0..9).map(issue).collect())),
        (
            "corrupt-and-fix",
            remapped(vec![
                issue(0),
                Op::Corrupt { slot: 0, bit: 77 },
                map(0, 2, 2),
                Op::Corrupt { slot: 0, bit: 77 },
                map(0, 2, 2),
            ]),
        ),
    ]
}

fn write(root: &Path, target: &str, seeds: Seeds) {
    let dir = root.join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    for entry in fs::read_dir(&dir).expect("corpus dir") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("gen-"))
        {
            fs::remove_file(&path).expect("remove old seed");
        }
    }
    for (i, (name, bytes)) in seeds.iter().enumerate() {
        fs::write(dir.join(format!("gen-{i:02}-{name}")), bytes).expect("write seed");
    }
    println!("{target}: {} seeds", seeds.len());
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    write(&root, "protocol_decode", protocol_decode());
    write(&root, "ring_region", ring_region());
    write(&root, "hypercall_request", hypercall_request());
    write(&root, "insn_decode", insn_decode());
    write(&root, "page_walk", page_walk());
    write(&root, "task_table", task_table());
    write(&root, "pager_calls", pager_calls());
    write(&root, "libkvmi_decode", libkvmi_decode());
}
