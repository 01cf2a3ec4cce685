//! The appliance's target directory: which targets it guards, where each one's ring region
//! and map window are, the policy the shim hands it, and the shim's stop request.
//!
//! One appliance VM guards up to [`MAX_SLOTS`] targets. Each target occupies a **slot**: its
//! own ring region and map window at fixed guest-physical addresses of the appliance, created
//! when the appliance boots. The directory is a small shared region (guest RAM of the
//! appliance, named by [`BootInfo::directory_gpa`](crate::boot::BootInfo::directory_gpa))
//! that the shim rewrites while the appliance runs: a slot turns [`SlotState::Live`] when a
//! target attaches to it and [`SlotState::Gone`] when the target ends, so targets come and go
//! without a reboot of the appliance.
//!
//! # Layout (64-bit little-endian words)
//! ```text
//! word 0   magic "KVMIDIR1"
//! word 1   slot_count (low 32 bits) | version << 32
//! word 2   generation: bumped after every slot change (the agent re-reads the slots on a change)
//! word 3   stop: non-zero when the shim asks the agent to report and end (e.g. Ctrl-C)
//! word 4   policy offset in bytes from the region's start (0: no policy)
//! word 5   policy length in bytes
//! word 6-7 reserved, zero
//! word 8.. slot i at word 8 + 16·i:
//!          0 seq (odd while the shim rewrites the slot; a seqlock)
//!          1 state ([`SlotState`]: 0 empty, 1 live, 2 gone, 3 ending)   2 target id   3 ring gpa   4 ring size
//!          5 window gpa   6 window size   7 target vCPUs
//!          8..12 name (32 bytes, NUL-padded)   12..16 profile (32 bytes, NUL-padded)
//! ```
//! The policy bytes (JSON, see the `appliance` crate's `policy` module) follow the slots.
//!
//! Every word is read through [`SharedMemory`]'s bounds-checked atomics: the reader (the
//! agent) validates every value, and a slot read while the shim rewrites it is retried, never
//! trusted half-written.

use core::sync::atomic::Ordering;

use crate::ring::SharedMemory;

/// `"KVMIDIR1"` in little-endian byte order.
pub const DIRECTORY_MAGIC: u64 = u64::from_le_bytes(*b"KVMIDIR1");
/// The layout version of this module.
pub const DIRECTORY_VERSION: u32 = 1;
/// Most targets one appliance guards.
pub const MAX_SLOTS: u32 = 8;
/// Bytes of a slot's name and profile fields.
pub const NAME_MAX: usize = 32;
/// Words of the header.
const HEADER_WORDS: usize = 8;
/// Words of one slot.
const SLOT_WORDS: usize = 16;
/// Reads of a slot retried while the shim is rewriting it.
const READ_RETRIES: u32 = 64;

/// Word indexes of the header.
mod word {
    pub const MAGIC: usize = 0;
    pub const COUNT_VERSION: usize = 1;
    pub const GENERATION: usize = 2;
    pub const STOP: usize = 3;
    pub const POLICY_OFFSET: usize = 4;
    pub const POLICY_LEN: usize = 5;
}

/// The state of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// No target uses the slot.
    Empty,
    /// A target is attached: its rings and window are in service.
    Live,
    /// The target ended: the agent drops its state for this slot (the shim revoked its
    /// grants and stopped its rings).
    Gone,
    /// The target ended and its rings still run: the agent writes its final report on the
    /// slot's log ring and drops its state; the shim then detaches the slot (gone).
    Ending,
}

impl SlotState {
    fn word(self) -> u64 {
        match self {
            SlotState::Empty => 0,
            SlotState::Live => 1,
            SlotState::Gone => 2,
            SlotState::Ending => 3,
        }
    }

    fn from_word(w: u64) -> Option<Self> {
        match w {
            0 => Some(SlotState::Empty),
            1 => Some(SlotState::Live),
            2 => Some(SlotState::Gone),
            3 => Some(SlotState::Ending),
            _ => None,
        }
    }
}

/// One slot, as read (and validated) from the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The slot's index.
    pub index: u32,
    /// Its state.
    pub state: SlotState,
    /// The target's id (unique for the shim's lifetime; a slot reused by another target
    /// gets another id).
    pub target_id: u64,
    /// Guest-physical base of the slot's ring region.
    pub ring_gpa: u64,
    /// Size of the ring region in bytes.
    pub ring_size: u64,
    /// Guest-physical base of the slot's map window.
    pub window_gpa: u64,
    /// Size of the map window in bytes.
    pub window_size: u64,
    /// The target's vCPUs.
    pub vcpus: u32,
    /// The target's name, NUL-padded.
    pub name: [u8; NAME_MAX],
    /// The target's profile name (its image), NUL-padded.
    pub profile: [u8; NAME_MAX],
}

impl Slot {
    /// The name as text (`"?"` when it is not UTF-8).
    pub fn name(&self) -> &str {
        text(&self.name)
    }

    /// The profile name as text (`"?"` when it is not UTF-8).
    pub fn profile(&self) -> &str {
        text(&self.profile)
    }
}

fn text(bytes: &[u8; NAME_MAX]) -> &str {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(NAME_MAX);
    core::str::from_utf8(&bytes[..len]).unwrap_or("?")
}

/// `s` NUL-padded into a name field (cut at [`NAME_MAX`] bytes, on a character boundary).
pub fn name_field(s: &str) -> [u8; NAME_MAX] {
    let mut out = [0u8; NAME_MAX];
    let mut len = s.len().min(NAME_MAX);
    while !s.is_char_boundary(len) {
        len -= 1;
    }
    out[..len].copy_from_slice(&s.as_bytes()[..len]);
    out
}

/// Why a directory is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// The region is too small for its header and slots (or for what is being written).
    #[error("directory region too small")]
    TooSmall,
    /// The magic word is wrong.
    #[error("directory magic is wrong")]
    Magic,
    /// The version is not [`DIRECTORY_VERSION`].
    #[error("directory version {0} is not supported")]
    Version(u32),
    /// The slot count is 0 or above [`MAX_SLOTS`].
    #[error("directory slot count {0} is out of range")]
    SlotCount(u32),
    /// A slot index past the slot count.
    #[error("no slot {0}")]
    NoSlot(u32),
    /// A slot holds an impossible value.
    #[error("slot {slot}: {what}")]
    BadSlot {
        /// The slot.
        slot: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// A slot stayed mid-rewrite for every retry.
    #[error("slot {0} is being rewritten")]
    Busy(u32),
    /// The policy's offset or length leaves the region.
    #[error("policy bytes outside the directory")]
    Policy,
}

/// Bytes a directory of `slots` slots and a policy of `policy_len` bytes needs (a page
/// multiple).
pub const fn region_size(slots: u32, policy_len: usize) -> u64 {
    let bytes = policy_offset(slots) + policy_len as u64;
    bytes.div_ceil(4096) * 4096
}

/// Byte offset of the policy in a directory of `slots` slots.
const fn policy_offset(slots: u32) -> u64 {
    ((HEADER_WORDS + SLOT_WORDS * slots as usize) * 8) as u64
}

/// A directory over shared memory (the shim writes it, the agent reads it).
#[derive(Debug)]
pub struct Directory<M> {
    mem: M,
    slots: u32,
}

impl<M: SharedMemory> Directory<M> {
    /// Lays out a fresh directory of `slots` empty slots with `policy` in `mem` (the shim's
    /// side, before the appliance boots).
    pub fn create(mem: M, slots: u32, policy: &[u8]) -> Result<Self, DirectoryError> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(DirectoryError::SlotCount(slots));
        }
        let offset = policy_offset(slots);
        if region_size(slots, policy.len()) > (mem.word_count() as u64) * 8 {
            return Err(DirectoryError::TooSmall);
        }
        let store = |i, v| {
            mem.store(i, v, Ordering::Relaxed)
                .ok_or(DirectoryError::TooSmall)
        };
        for i in 0..HEADER_WORDS + SLOT_WORDS * slots as usize {
            store(i, 0)?;
        }
        mem.write_bytes((offset / 8) as usize, policy)
            .ok_or(DirectoryError::TooSmall)?;
        store(
            word::COUNT_VERSION,
            u64::from(slots) | (u64::from(DIRECTORY_VERSION) << 32),
        )?;
        store(
            word::POLICY_OFFSET,
            if policy.is_empty() { 0 } else { offset },
        )?;
        store(word::POLICY_LEN, policy.len() as u64)?;
        mem.store(word::MAGIC, DIRECTORY_MAGIC, Ordering::Release)
            .ok_or(DirectoryError::TooSmall)?;
        Ok(Directory { mem, slots })
    }

    /// Opens a directory the shim laid out (the agent's side), validating its header.
    pub fn open(mem: M) -> Result<Self, DirectoryError> {
        let load = |i| {
            mem.load(i, Ordering::Acquire)
                .ok_or(DirectoryError::TooSmall)
        };
        if load(word::MAGIC)? != DIRECTORY_MAGIC {
            return Err(DirectoryError::Magic);
        }
        let cv = load(word::COUNT_VERSION)?;
        let version = (cv >> 32) as u32;
        if version != DIRECTORY_VERSION {
            return Err(DirectoryError::Version(version));
        }
        let slots = cv as u32;
        if slots == 0 || slots > MAX_SLOTS {
            return Err(DirectoryError::SlotCount(slots));
        }
        if HEADER_WORDS + SLOT_WORDS * slots as usize > mem.word_count() {
            return Err(DirectoryError::TooSmall);
        }
        Ok(Directory { mem, slots })
    }

    /// Number of slots.
    pub fn slot_count(&self) -> u32 {
        self.slots
    }

    /// The change counter (bumped after every slot change).
    pub fn generation(&self) -> u64 {
        self.mem
            .load(word::GENERATION, Ordering::Acquire)
            .unwrap_or(0)
    }

    /// Whether the shim asked the agent to report and end.
    pub fn stop_requested(&self) -> bool {
        self.mem
            .load(word::STOP, Ordering::Acquire)
            .is_some_and(|w| w != 0)
    }

    /// Asks the agent to report and end (the shim's side).
    pub fn request_stop(&self) {
        let _ = self.mem.store(word::STOP, 1, Ordering::Release);
    }

    /// Copies the policy bytes into `out` (cleared first); the length is bounded by the region.
    #[cfg(feature = "alloc")]
    pub fn policy(&self, out: &mut alloc::vec::Vec<u8>) -> Result<(), DirectoryError> {
        out.clear();
        let load = |i| {
            self.mem
                .load(i, Ordering::Acquire)
                .ok_or(DirectoryError::TooSmall)
        };
        let (offset, len) = (load(word::POLICY_OFFSET)?, load(word::POLICY_LEN)?);
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or(DirectoryError::Policy)?;
        if !offset.is_multiple_of(8)
            || offset < policy_offset(self.slots)
            || end > (self.mem.word_count() as u64) * 8
        {
            return Err(DirectoryError::Policy);
        }
        out.resize(len as usize, 0);
        self.mem
            .read_bytes((offset / 8) as usize, out)
            .ok_or(DirectoryError::Policy)
    }

    fn slot_word(&self, slot: u32, w: usize) -> Result<usize, DirectoryError> {
        if slot >= self.slots {
            return Err(DirectoryError::NoSlot(slot));
        }
        Ok(HEADER_WORDS + SLOT_WORDS * slot as usize + w)
    }

    /// Reads slot `index` consistently (retrying while the shim rewrites it) and validates it.
    pub fn slot(&self, index: u32) -> Result<Slot, DirectoryError> {
        let base = self.slot_word(index, 0)?;
        let load = |w: usize| {
            self.mem
                .load(base + w, Ordering::Acquire)
                .ok_or(DirectoryError::TooSmall)
        };
        for _ in 0..READ_RETRIES {
            let seq = load(0)?;
            if seq % 2 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let words: [u64; SLOT_WORDS] = core::array::from_fn(|w| load(w).unwrap_or(0));
            self.mem.fence();
            if load(0)? != seq {
                continue;
            }
            return decode_slot(index, &words);
        }
        Err(DirectoryError::Busy(index))
    }

    /// Writes slot `slot.index` (the shim's side) and bumps the generation.
    pub fn write_slot(&self, slot: &Slot) -> Result<(), DirectoryError> {
        let base = self.slot_word(slot.index, 0)?;
        let store = |w: usize, v: u64, o| {
            self.mem
                .store(base + w, v, o)
                .ok_or(DirectoryError::TooSmall)
        };
        let seq = self
            .mem
            .load(base, Ordering::Acquire)
            .ok_or(DirectoryError::TooSmall)?;
        let seq = seq | 1;
        store(0, seq, Ordering::Release)?;
        self.mem.fence();
        let fields = [
            slot.state.word(),
            slot.target_id,
            slot.ring_gpa,
            slot.ring_size,
            slot.window_gpa,
            slot.window_size,
            u64::from(slot.vcpus),
        ];
        for (i, v) in fields.into_iter().enumerate() {
            store(1 + i, v, Ordering::Relaxed)?;
        }
        self.mem
            .write_bytes(base + 8, &slot.name)
            .ok_or(DirectoryError::TooSmall)?;
        self.mem
            .write_bytes(base + 12, &slot.profile)
            .ok_or(DirectoryError::TooSmall)?;
        store(0, seq.wrapping_add(1), Ordering::Release)?;
        let g = self.generation();
        let _ = self
            .mem
            .store(word::GENERATION, g.wrapping_add(1), Ordering::Release);
        Ok(())
    }
}

fn decode_slot(index: u32, w: &[u64; SLOT_WORDS]) -> Result<Slot, DirectoryError> {
    let bad = |what| DirectoryError::BadSlot { slot: index, what };
    let state = SlotState::from_word(w[1]).ok_or(bad("unknown state"))?;
    let mut name = [0u8; NAME_MAX];
    let mut profile = [0u8; NAME_MAX];
    for i in 0..4 {
        name[i * 8..i * 8 + 8].copy_from_slice(&w[8 + i].to_le_bytes());
        profile[i * 8..i * 8 + 8].copy_from_slice(&w[12 + i].to_le_bytes());
    }
    let slot = Slot {
        index,
        state,
        target_id: w[2],
        ring_gpa: w[3],
        ring_size: w[4],
        window_gpa: w[5],
        window_size: w[6],
        vcpus: u32::try_from(w[7]).map_err(|_| bad("vCPU count"))?,
        name,
        profile,
    };
    if state != SlotState::Empty {
        let area = |gpa: u64, size: u64| {
            size != 0
                && gpa.is_multiple_of(4096)
                && size.is_multiple_of(4096)
                && gpa.checked_add(size).is_some()
        };
        if !area(slot.ring_gpa, slot.ring_size) {
            return Err(bad("ring region"));
        }
        if !area(slot.window_gpa, slot.window_size) {
            return Err(bad("map window"));
        }
        if slot.vcpus == 0 {
            return Err(bad("no vCPUs"));
        }
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::AtomicU64;

    fn words(bytes: u64) -> alloc::vec::Vec<AtomicU64> {
        (0..bytes / 8).map(|_| AtomicU64::new(0)).collect()
    }

    fn live(index: u32, id: u64) -> Slot {
        Slot {
            index,
            state: SlotState::Live,
            target_id: id,
            ring_gpa: 0xC000_0000 + u64::from(index) * 0x0700_0000,
            ring_size: 0x10_0000,
            window_gpa: 0xC100_0000 + u64::from(index) * 0x0700_0000,
            window_size: 64 << 20,
            vcpus: 2,
            name: name_field("web-1"),
            profile: name_field("demo-target"),
        }
    }

    #[test]
    fn slots_written_by_the_shim_read_back_validated() {
        let mem = words(region_size(3, 5));
        let mem = &mem[..];
        let dir = Directory::create(mem, 3, b"{\"a\"}").unwrap();
        let agent = Directory::open(mem).unwrap();
        assert_eq!(agent.slot_count(), 3);
        assert_eq!(agent.slot(1).unwrap().state, SlotState::Empty);
        let g0 = agent.generation();
        dir.write_slot(&live(1, 7)).unwrap();
        assert_eq!(agent.generation(), g0 + 1);
        let s = agent.slot(1).unwrap();
        assert_eq!(s, live(1, 7));
        assert_eq!((s.name(), s.profile()), ("web-1", "demo-target"));
        let mut policy = alloc::vec::Vec::new();
        agent.policy(&mut policy).unwrap();
        assert_eq!(policy, b"{\"a\"}");
        assert!(!agent.stop_requested());
        dir.request_stop();
        assert!(agent.stop_requested());
        assert_eq!(agent.slot(3), Err(DirectoryError::NoSlot(3)));
    }

    #[test]
    fn hostile_words_are_refused() {
        let mem = words(region_size(2, 0));
        let mem = &mem[..];
        let dir = Directory::create(mem, 2, b"").unwrap();
        dir.write_slot(&live(0, 1)).unwrap();
        let base = HEADER_WORDS;
        // An unknown state, a ring region of size 0, a slot stuck mid-rewrite.
        mem.store(base + 1, 9, Ordering::Relaxed);
        assert!(matches!(
            Directory::open(mem).unwrap().slot(0),
            Err(DirectoryError::BadSlot { .. })
        ));
        mem.store(base + 1, 1, Ordering::Relaxed);
        mem.store(base + 4, 0, Ordering::Relaxed);
        assert!(matches!(
            Directory::open(mem).unwrap().slot(0),
            Err(DirectoryError::BadSlot {
                what: "ring region",
                ..
            })
        ));
        mem.store(base, 3, Ordering::Relaxed);
        assert_eq!(
            Directory::open(mem).unwrap().slot(0),
            Err(DirectoryError::Busy(0))
        );
        // A policy pointing outside the region, a slot count out of range, a bad magic.
        mem.store(word::POLICY_LEN, 1 << 40, Ordering::Relaxed);
        mem.store(word::POLICY_OFFSET, 8 * 40, Ordering::Relaxed);
        let mut out = alloc::vec::Vec::new();
        assert_eq!(
            Directory::open(mem).unwrap().policy(&mut out),
            Err(DirectoryError::Policy)
        );
        mem.store(word::COUNT_VERSION, 99 | (1 << 32), Ordering::Relaxed);
        assert_eq!(
            Directory::open(mem).unwrap_err(),
            DirectoryError::SlotCount(99)
        );
        mem.store(word::MAGIC, 0, Ordering::Relaxed);
        assert_eq!(Directory::open(mem).unwrap_err(), DirectoryError::Magic);
    }

    #[test]
    fn names_are_cut_on_a_character_boundary() {
        let long = "é".repeat(20);
        let field = name_field(&long);
        assert_eq!(text(&field), "é".repeat(16));
    }
}
