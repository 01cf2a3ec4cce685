//! The task-table parser (`appliance::tasks`) over hostile target memory, with the demo
//! target's profile (the layout the appliance uses): a rootkit may have scribbled anything
//! on the table and on the page tables that map it.
//!
//! Input: a mode byte, then
//! - mode & 3 == 0: the table's bytes, exactly as given, at the table's address (identity
//!   mapped; a short table must fail to read, not panic);
//! - mode & 3 == 1: the same, zero-padded or cut to the table's size (always readable);
//! - otherwise: `cr3: u64`, then scribble records of the target's physical memory
//!   ([`SparseMemory`]); the table is listed through the page tables at `cr3` and identity.
//!
//! The rest of the input is also decoded directly as a table copy. Checks: a listing has at
//! most the profile's `max_tasks` tasks, in increasing slots below it, no free slot, names of
//! at most `task_name_len` printable characters; it equals decoding one copy of the table
//! (read once: one physical read identity-mapped, at most 5 per table page through paging).
#![no_main]

use std::sync::OnceLock;

use appliance::memory::{BufferMemory, PhysicalMemory};
use appliance::paging::AddressSpace;
use appliance::tasks::{TaskInfo, TaskLayout, TaskState};
use kvmi_fuzz::{Counted, PAGE, SparseMemory, demo_task_layout, take_u64s};
use libfuzzer_sys::fuzz_target;

fn layout() -> &'static TaskLayout {
    static LAYOUT: OnceLock<TaskLayout> = OnceLock::new();
    LAYOUT.get_or_init(demo_task_layout)
}

/// What holds for any decoded entry (the slot bound only for a listing: `decode` takes any
/// slot its copy holds).
fn check_task(l: &TaskLayout, t: &TaskInfo) {
    assert!(t.name.len() as u64 <= l.name_len, "name {:?}", t.name);
    assert!(
        t.name
            .chars()
            .all(|c| c.is_ascii_graphic() || c == ' ' || c == '?'),
        "name {:?}",
        t.name
    );
    if let TaskState::Unknown(v) = t.state {
        assert!(
            !l.states.contains(&u64::from(v)),
            "named state {v} as unknown"
        );
    }
}

/// Checks a listing against one copy of the table.
fn check_list(l: &TaskLayout, tasks: &[TaskInfo], copy: &[u8]) {
    assert!(tasks.len() as u64 <= l.count, "{} tasks", tasks.len());
    for pair in tasks.windows(2) {
        assert!(pair[0].slot < pair[1].slot, "slots out of order");
    }
    for t in tasks {
        assert!(u64::from(t.slot) < l.count, "slot {}", t.slot);
        check_task(l, t);
    }
    let decoded: Vec<TaskInfo> = (0..l.count).filter_map(|s| l.decode(copy, s)).collect();
    assert_eq!(tasks, &decoded[..]);
}

/// Lists identity-mapped `mem`, which holds the whole table when `readable`.
fn identity<M: PhysicalMemory>(l: &TaskLayout, mem: M, readable: bool) {
    let mut mem = Counted::new(mem);
    let listed = l.list(&mut mem, AddressSpace::Identity);
    assert_eq!(mem.reads, 1, "the table is copied with one read");
    assert_eq!(listed.is_ok(), readable);
    if let Ok(tasks) = listed {
        let mut copy = vec![0u8; l.table_bytes()];
        mem.read_phys(l.table, &mut copy)
            .expect("read once already");
        check_list(l, &tasks, &copy);
    }
}

fuzz_target!(|data: &[u8]| {
    let l = layout();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    for slot in 0..l.count + 2 {
        if let Some(t) = l.decode(rest, slot) {
            assert_eq!(u64::from(t.slot), slot);
            check_task(l, &t);
        }
    }
    match mode & 3 {
        0 => {
            let readable = rest.len() >= l.table_bytes();
            identity(
                l,
                BufferMemory::from_bytes(l.table, rest.to_vec()),
                readable,
            );
        }
        1 => {
            let mut table = rest.to_vec();
            table.resize(l.table_bytes(), 0);
            identity(l, BufferMemory::from_bytes(l.table, table), true);
        }
        _ => {
            let ([cr3], scribbles) = take_u64s::<1>(rest);
            let mut mem = SparseMemory::from_scribbles(scribbles);
            let space = AddressSpace::Paged { cr3 };
            let listed = l.list(&mut mem, space);
            let pages = ((l.table % PAGE) as usize + l.table_bytes()).div_ceil(PAGE as usize);
            assert!(
                mem.reads <= 5 * pages,
                "{} reads for {pages} pages",
                mem.reads
            );
            let mut copy = vec![0u8; l.table_bytes()];
            let read = space.read(&mut mem, l.table, &mut copy);
            assert_eq!(listed.is_ok(), read.is_ok());
            if let Ok(tasks) = listed {
                check_list(l, &tasks, &copy);
            }
            identity(l, &mut mem, true);
        }
    }
});
