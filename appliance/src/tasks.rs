//! OS awareness for the demo target: its task table, read through profile offsets only.
//!
//! The table is `max_tasks` entries of `struct task` at symbol `task_table`; each entry has
//! `pid`, `state`, `parent`, `cpu` (u32), `name` (`task_name_len` bytes, NUL-padded) and
//! `cr3` (u64). Slots whose state is `task_state_free` are unused. The target may be changing
//! the table while we read it (and a rootkit may scribble on it), so the whole table is copied
//! once and every entry is decoded from the copy, never re-read.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use serde::Serialize;

use crate::memory::PhysicalMemory;
use crate::paging::{AddressSpace, WalkError};
use crate::profile::{Profile, ProfileError};

/// Upper bound on the table size we accept from a profile (bytes).
const MAX_TABLE_BYTES: u64 = 1 << 20;

/// A task's scheduling state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Runnable.
    Ready,
    /// Running on its vCPU.
    Running,
    /// Finished.
    Exited,
    /// A value the profile does not name (a corrupted or tampered entry).
    Unknown(u32),
}

/// One task, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskInfo {
    /// Index in the table.
    pub slot: u32,
    /// Process id.
    pub pid: u32,
    /// Name (bytes up to the first NUL; non-printable bytes replaced).
    pub name: String,
    /// State.
    pub state: TaskState,
    /// Parent's pid (0 for boot tasks).
    pub parent: u32,
    /// The vCPU that runs it.
    pub cpu: u32,
    /// Page-table root.
    pub cr3: u64,
}

/// Where the task table and its fields are, from a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLayout {
    /// Virtual address of the table.
    pub table: u64,
    /// Entries.
    pub count: u64,
    /// Size of one entry.
    pub entry_size: u64,
    /// Offset of `pid`.
    pub pid: u64,
    /// Offset of `state`.
    pub state: u64,
    /// Offset of `parent`.
    pub parent: u64,
    /// Offset of `cpu`.
    pub cpu: u64,
    /// Offset of `name`.
    pub name: u64,
    /// Bytes of `name`.
    pub name_len: u64,
    /// Offset of `cr3`.
    pub cr3: u64,
    /// State values: free, ready, running, exited.
    pub states: [u64; 4],
}

impl TaskLayout {
    /// Reads the layout from a profile, checking every field fits in its entry.
    pub fn from_profile(p: &Profile) -> Result<Self, ProfileError> {
        let name_len = p.constant("task_name_len")?;
        let entry_size = p.layout("task")?.size;
        let count = p.constant("max_tasks")?;
        if entry_size == 0
            || count == 0
            || entry_size
                .checked_mul(count)
                .is_none_or(|b| b > MAX_TABLE_BYTES)
        {
            return Err(ProfileError::Invalid {
                name: "task table".into(),
                why: "empty or implausibly large",
            });
        }
        Ok(TaskLayout {
            table: p.symbol("task_table")?,
            count,
            entry_size,
            pid: p.field("task", "pid", 4)?,
            state: p.field("task", "state", 4)?,
            parent: p.field("task", "parent", 4)?,
            cpu: p.field("task", "cpu", 4)?,
            name: p.field("task", "name", name_len)?,
            name_len,
            cr3: p.field("task", "cr3", 8)?,
            states: [
                p.constant("task_state_free")?,
                p.constant("task_state_ready")?,
                p.constant("task_state_running")?,
                p.constant("task_state_exited")?,
            ],
        })
    }

    /// Bytes of the whole table.
    pub fn table_bytes(&self) -> usize {
        (self.entry_size * self.count) as usize
    }

    /// Decodes entry `slot` from a copy of the table; `None` for a free slot.
    pub fn decode(&self, table: &[u8], slot: u64) -> Option<TaskInfo> {
        let entry = table
            .get((slot * self.entry_size) as usize..((slot + 1) * self.entry_size) as usize)?;
        let u32_at = |off: u64| -> u32 {
            let b = entry.get(off as usize..off as usize + 4).unwrap_or(&[0; 4]);
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        let raw_state = u32_at(self.state);
        let state = match u64::from(raw_state) {
            s if s == self.states[0] => return None,
            s if s == self.states[1] => TaskState::Ready,
            s if s == self.states[2] => TaskState::Running,
            s if s == self.states[3] => TaskState::Exited,
            _ => TaskState::Unknown(raw_state),
        };
        let name_bytes = entry
            .get(self.name as usize..(self.name + self.name_len) as usize)
            .unwrap_or(&[]);
        let name = printable_name(name_bytes);
        let mut cr3 = [0u8; 8];
        if let Some(b) = entry.get(self.cr3 as usize..self.cr3 as usize + 8) {
            cr3.copy_from_slice(b);
        }
        Some(TaskInfo {
            slot: slot as u32,
            pid: u32_at(self.pid),
            name,
            state,
            parent: u32_at(self.parent),
            cpu: u32_at(self.cpu),
            cr3: u64::from_le_bytes(cr3),
        })
    }

    /// Copies the table once from `space` and lists every used slot.
    pub fn list(
        &self,
        mem: &mut impl PhysicalMemory,
        space: AddressSpace,
    ) -> Result<Vec<TaskInfo>, WalkError> {
        let mut table = vec![0u8; self.table_bytes()];
        space.read(mem, self.table, &mut table)?;
        Ok((0..self.count)
            .filter_map(|slot| self.decode(&table, slot))
            .collect())
    }
}

/// A name read from guest memory: up to the first NUL, every byte that is not printable
/// ASCII shown as `?` (guest bytes are never trusted to be text).
pub fn printable_name(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes[..end]
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}
