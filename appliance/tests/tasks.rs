//! The demo target's task table, built in a buffer from the real profile (the fixture was
//! produced by `kvmi profile --image demo-target`), listed through profile offsets only.

mod common;

use appliance::paging::{AddressSpace, PageSize, PteFlags};
use appliance::profile::{Profile, ProfileError};
use appliance::tasks::{TaskInfo, TaskLayout, TaskState};
use common::Tables;
use serde_json::Value;

const FIXTURE: &[u8] = include_bytes!("fixtures/demo-target.profile.json");

/// Offsets read straight from the JSON (independently of `Profile`).
struct Raw(Value);

impl Raw {
    fn get(&self, path: &[&str]) -> u64 {
        let mut v = &self.0;
        for key in path {
            v = &v[*key];
        }
        v.as_u64().unwrap_or_else(|| panic!("{path:?}"))
    }
    fn field(&self, name: &str) -> u64 {
        self.get(&["structs", "task", "fields", name])
    }
}

struct Entry<'a> {
    slot: u64,
    pid: u32,
    state: u64,
    parent: u32,
    cpu: u32,
    name: &'a [u8],
    cr3: u64,
}

fn write_entry(t: &mut Tables, raw: &Raw, table: u64, e: &Entry<'_>) {
    let at = table + e.slot * raw.get(&["structs", "task", "size"]);
    let u32_at = |t: &mut Tables, field: &str, v: u32| {
        t.mem
            .write(at + raw.field(field), &v.to_le_bytes())
            .unwrap();
    };
    u32_at(t, "pid", e.pid);
    u32_at(t, "state", e.state as u32);
    u32_at(t, "parent", e.parent);
    u32_at(t, "cpu", e.cpu);
    t.mem.write(at + raw.field("name"), e.name).unwrap();
    t.mem.write_u64(at + raw.field("cr3"), e.cr3).unwrap();
}

#[test]
fn lists_the_demo_targets_tasks_from_its_profile() {
    let raw = Raw(serde_json::from_slice(FIXTURE).unwrap());
    let profile = Profile::from_json(FIXTURE).unwrap();
    assert_eq!(profile.image, "demo-target");
    let layout = TaskLayout::from_profile(&profile).unwrap();
    let table = raw.get(&["symbols", "task_table"]);
    assert_eq!(layout.table, table);
    assert_eq!(layout.count, raw.get(&["constants", "max_tasks"]));

    let mut t = Tables::new(16 << 20, 0x80_0000, 0x90_0000);
    let ready = raw.get(&["constants", "task_state_ready"]);
    let running = raw.get(&["constants", "task_state_running"]);
    let exited = raw.get(&["constants", "task_state_exited"]);
    let entries = [
        Entry {
            slot: 0,
            pid: 1,
            state: running,
            parent: 0,
            cpu: 0,
            name: b"init",
            cr3: 0x20_1000,
        },
        Entry {
            slot: 1,
            pid: 2,
            state: ready,
            parent: 0,
            cpu: 1,
            name: b"monitor",
            cr3: 0x20_5000,
        },
        Entry {
            slot: 4,
            pid: 9,
            state: exited,
            parent: 1,
            cpu: 1,
            name: b"worker-3",
            cr3: 0x20_9000,
        },
        // A full-length name (no NUL) and a tampered one.
        Entry {
            slot: 7,
            pid: 11,
            state: ready,
            parent: 1,
            cpu: 0,
            name: b"sixteen-chars-xx",
            cr3: 0x21_0000,
        },
        Entry {
            slot: 31,
            pid: 12,
            state: 77,
            parent: 4,
            cpu: 0,
            name: b"kw\x01rk\xff",
            cr3: 0x21_4000,
        },
    ];
    for e in &entries {
        write_entry(&mut t, &raw, table, e);
    }
    // The kernel is identity-mapped in every task: one 2 MiB page over the image.
    let cr3 = t.table();
    let flags = PteFlags {
        writable: true,
        user: false,
        no_execute: false,
    };
    t.map(cr3, 0, 0, PageSize::Size2M, flags);

    let want = vec![
        TaskInfo {
            slot: 0,
            pid: 1,
            name: "init".into(),
            state: TaskState::Running,
            parent: 0,
            cpu: 0,
            cr3: 0x20_1000,
        },
        TaskInfo {
            slot: 1,
            pid: 2,
            name: "monitor".into(),
            state: TaskState::Ready,
            parent: 0,
            cpu: 1,
            cr3: 0x20_5000,
        },
        TaskInfo {
            slot: 4,
            pid: 9,
            name: "worker-3".into(),
            state: TaskState::Exited,
            parent: 1,
            cpu: 1,
            cr3: 0x20_9000,
        },
        TaskInfo {
            slot: 7,
            pid: 11,
            name: "sixteen-chars-xx".into(),
            state: TaskState::Ready,
            parent: 1,
            cpu: 0,
            cr3: 0x21_0000,
        },
        TaskInfo {
            slot: 31,
            pid: 12,
            name: "kw?rk?".into(),
            state: TaskState::Unknown(77),
            parent: 4,
            cpu: 0,
            cr3: 0x21_4000,
        },
    ];
    assert_eq!(
        layout.list(&mut t.mem, AddressSpace::Identity).unwrap(),
        want
    );
    assert_eq!(
        layout
            .list(&mut t.mem, AddressSpace::Paged { cr3 })
            .unwrap(),
        want
    );
    let line = serde_json::to_string(&want[0]).unwrap();
    assert_eq!(
        line,
        r#"{"slot":0,"pid":1,"name":"init","state":"running","parent":0,"cpu":0,"cr3":2101248}"#
    );

    // An address space that does not map the table: a clear error, not a panic.
    let empty = t.table();
    assert!(
        layout
            .list(&mut t.mem, AddressSpace::Paged { cr3: empty })
            .is_err()
    );
}

#[test]
fn broken_profiles_are_refused_with_the_missing_fact() {
    let mut json: Value = serde_json::from_slice(FIXTURE).unwrap();
    json["symbols"]
        .as_object_mut()
        .unwrap()
        .remove("task_table");
    let p = Profile::from_json(json.to_string().as_bytes()).unwrap();
    assert!(matches!(
        TaskLayout::from_profile(&p),
        Err(ProfileError::Missing { kind: "symbol", ref name }) if name == "task_table"
    ));

    let mut json: Value = serde_json::from_slice(FIXTURE).unwrap();
    json["structs"]["task"]["fields"]["cr3"] = 84.into();
    let p = Profile::from_json(json.to_string().as_bytes()).unwrap();
    assert!(matches!(
        TaskLayout::from_profile(&p),
        Err(ProfileError::Invalid { .. })
    ));

    let mut json: Value = serde_json::from_slice(FIXTURE).unwrap();
    json["constants"]["max_tasks"] = (1u64 << 40).into();
    let p = Profile::from_json(json.to_string().as_bytes()).unwrap();
    assert!(matches!(
        TaskLayout::from_profile(&p),
        Err(ProfileError::Invalid { .. })
    ));

    let mut json: Value = serde_json::from_slice(FIXTURE).unwrap();
    json["format"] = 2.into();
    assert!(matches!(
        Profile::from_json(json.to_string().as_bytes()),
        Err(ProfileError::Format(2))
    ));
    assert!(matches!(
        Profile::from_json(b"{\"image\": 3}"),
        Err(ProfileError::Json(_))
    ));
    let mut json: Value = serde_json::from_slice(FIXTURE).unwrap();
    json["ranges"]["kernel_text"]["end"] = 0.into();
    assert!(matches!(
        Profile::from_json(json.to_string().as_bytes()),
        Err(ProfileError::Invalid { .. })
    ));
}
