//! End-to-end against the demo-target OS: walk its task table with READ_PHYSICAL and the
//! profile, catch the rootkit's write to the task table with a page-access event and drop it.

use std::time::Duration;

use kvmi::images::Image;
use kvmi_tests::socket_target::{EVENT_WAIT, Target};
use protocol::event::EventSet;
use protocol::event_reply::{EventReplyData, PageFaultReply};
use protocol::types::{Access, PageAccessEntry};
use protocol::{Action, EventKind, EventPayload};

/// (pid, state, name) of every used task-table slot, decoded with the profile.
fn tasks(t: &Target, c: &kvmi_client::KvmiClient) -> Vec<(u64, u64, String)> {
    let p = &t.profile;
    let base = t.sym("task_table");
    let size = p.structs["task"].size;
    let max = p.constant("max_tasks").expect("const.max_tasks");
    let table = c
        .read_physical_range(base, size * max)
        .expect("read the task table");
    let field = |f: &str| p.field("task", f).unwrap_or_else(|| panic!("task.{f}")) as usize;
    let word = |at: usize, len: usize| {
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&table[at..at + len]);
        u64::from_le_bytes(b)
    };
    let name_len = p.constant("task_name_len").expect("const.task_name_len") as usize;
    let free = p
        .constant("task_state_free")
        .expect("const.task_state_free");
    (0..max as usize)
        .map(|i| i * size as usize)
        .filter_map(|e| {
            let pid = word(e + field("pid"), 4);
            let state = word(e + field("state"), 4);
            let raw = &table[e + field("name")..e + field("name") + name_len];
            let name: String = raw
                .iter()
                .take_while(|&&b| b != 0)
                .map(|&b| b as char)
                .collect();
            (state != free).then_some((pid, state, name))
        })
        .collect()
}

#[test]
fn task_table_walk_finds_the_boot_tasks() {
    if !kvmi_tests::require_kvm("task_table_walk_finds_the_boot_tasks") {
        return;
    }
    let t = Target::start(Image::DemoTarget, "", &[]);
    let c = t.attach();
    assert!(
        t.wait_serial("heartbeat round=2", Duration::from_secs(30)),
        "{}",
        t.serial()
    );
    let list = tasks(&t, &c);
    let names: Vec<&str> = list.iter().map(|(_, _, n)| n.as_str()).collect();
    for want in ["init", "monitor", "secret-reader", "agent-caller", "busy"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // The serial log's "task created" lines agree with the pids read.
    for (pid, _, name) in &list {
        if name.starts_with("worker") || name == "kworker/0" {
            continue;
        }
        let line = format!("task created pid={pid} name={name} ");
        assert!(t.serial().contains(&line), "{line} not logged");
    }
}

#[test]
fn rootkit_write_to_the_task_table_is_seen_at_cpl3_and_skipped() {
    if !kvmi_tests::require_kvm("rootkit_write_to_the_task_table_is_seen_at_cpl3_and_skipped") {
        return;
    }
    let mut t = Target::start(Image::DemoTarget, "rounds=6", &["--kvmi-wait"]);
    let c = t.attach();
    let table = t.profile.range("task_table").expect("range.task_table");
    let alias = t
        .profile
        .constant("task_table_alias")
        .expect("const.task_table_alias");
    let pages: Vec<PageAccessEntry> = (table.start & !0xfff..table.end)
        .step_by(4096)
        .map(|gpa| PageAccessEntry {
            gpa,
            access: Access::R.union(Access::X),
        })
        .collect();
    c.control_events(0, EventSet::EMPTY.with(EventKind::PageFault))
        .unwrap();
    c.set_page_access(0, &pages).unwrap();
    let mut user_writes = 0;
    let mut kernel_writes = 0;
    loop {
        let ev = match c.next_event(EVENT_WAIT) {
            Ok(Some(ev)) => ev,
            Ok(None) => panic!("no event; serial: {}", t.serial()),
            Err(_) => break, // the VM finished its rounds
        };
        let EventPayload::PageFault { gva, gpa, mode } = ev.event.payload else {
            c.reply_continue(&ev).unwrap();
            continue;
        };
        assert!(
            (table.start..table.end).contains(&gpa),
            "gpa {gpa:#x} outside the table"
        );
        assert_ne!(mode & 2, 0);
        let data = EventReplyData::PageFault(PageFaultReply::default());
        if ev.event.common.sregs.cs.dpl == 3 {
            // The gva is reported when known (!0 otherwise): then it is the rootkit's alias.
            assert!(
                gva == u64::MAX || (alias..alias + 4096).contains(&gva),
                "user write via {gva:#x}"
            );
            user_writes += 1;
            c.reply(&ev, Action::Skip, data).unwrap();
        } else {
            kernel_writes += 1;
            c.reply(&ev, Action::Continue, data).unwrap();
        }
    }
    assert_eq!(
        t.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        t.stderr()
    );
    assert!(
        user_writes >= 2,
        "the rootkit's writes were not seen ({user_writes})"
    );
    assert!(
        kernel_writes > 0,
        "the kernel's own table writes were not seen"
    );
    let serial = t.serial();
    assert!(
        !serial.contains("integrity:"),
        "a skipped write landed: {serial}"
    );
    assert!(serial.contains("heartbeat round=6"), "{serial}");
}
