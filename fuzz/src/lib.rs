//! Input formats shared by the fuzz targets and the seed-corpus generator
//! (`examples/seed_corpus.rs`), so the committed seeds are built with the very code that
//! parses them.
//!
//! Multi-byte fields are little-endian; a field cut short by the end of the input reads as if
//! zero-padded.

use std::collections::{BTreeMap, BTreeSet};

use appliance::memory::{MemError, PhysicalMemory};

pub mod pager;

/// Reads `N` little-endian `u64`s from the front of `data` (zero-padded), and the rest.
pub fn take_u64s<const N: usize>(data: &[u8]) -> ([u64; N], &[u8]) {
    let mut out = [0u64; N];
    for (i, word) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        let chunk = data.get(i * 8..).unwrap_or(&[]);
        let n = chunk.len().min(8);
        b[..n].copy_from_slice(&chunk[..n]);
        *word = u64::from_le_bytes(b);
    }
    (out, data.get(N * 8..).unwrap_or(&[]))
}

/// Encodes `words` as [`take_u64s`] reads them.
pub fn put_u64s(out: &mut Vec<u8>, words: &[u64]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Target page size.
pub const PAGE: u64 = 4096;

/// Bytes of one scribble record: `u32` word index, `u64` value.
pub const SCRIBBLE: usize = 12;

/// Physical memory of a hostile target: `LIMIT` bytes that read as zero except the words
/// the input wrote (sparse: only written pages exist). Reads past `LIMIT` fail, as reads
/// beyond the target's RAM do. Counts reads and the pages they touch, so a target can bound
/// the work a walk does.
#[derive(Debug, Default)]
pub struct SparseMemory {
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
    /// `read_phys` calls so far.
    pub reads: usize,
    /// Bytes read so far.
    pub bytes_read: usize,
    /// Pages touched by reads so far.
    pub touched: BTreeSet<u64>,
}

impl SparseMemory {
    /// Physical size: every address a scribble's `u32` word index can name (32 GiB).
    pub const LIMIT: u64 = (u32::MAX as u64 + 1) * 8;

    /// Memory written by the scribble records of `data` ([`SCRIBBLE`] bytes each: a `u32`
    /// word index, address = index × 8, and the `u64` stored there); a trailing partial
    /// record is ignored.
    pub fn from_scribbles(data: &[u8]) -> Self {
        let mut mem = SparseMemory::default();
        for rec in data.chunks_exact(SCRIBBLE) {
            let index = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
            let (value, _) = take_u64s::<1>(&rec[4..]);
            mem.write(u64::from(index) * 8, &value[0].to_le_bytes());
        }
        mem
    }

    /// Writes `src` at `pa` (below [`LIMIT`](Self::LIMIT); anything past it is dropped).
    pub fn write(&mut self, pa: u64, src: &[u8]) {
        for (k, &b) in src.iter().enumerate() {
            let at = pa + k as u64;
            if at >= Self::LIMIT {
                return;
            }
            let page = self
                .pages
                .entry(at / PAGE)
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            page[(at % PAGE) as usize] = b;
        }
    }

    /// Forgets the read counters.
    pub fn reset_counters(&mut self) {
        self.reads = 0;
        self.bytes_read = 0;
        self.touched.clear();
    }
}

impl PhysicalMemory for SparseMemory {
    fn read_phys(&mut self, pa: u64, dst: &mut [u8]) -> Result<(), MemError> {
        self.reads += 1;
        let end = pa
            .checked_add(dst.len() as u64)
            .filter(|&end| end <= Self::LIMIT)
            .ok_or(MemError::OutOfRange { pa })?;
        self.bytes_read += dst.len();
        let mut at = pa;
        let mut out = dst;
        while at < end {
            let page = at / PAGE;
            self.touched.insert(page);
            let offset = (at % PAGE) as usize;
            let take = out.len().min(PAGE as usize - offset);
            let (head, tail) = out.split_at_mut(take);
            match self.pages.get(&page) {
                Some(bytes) => head.copy_from_slice(&bytes[offset..offset + take]),
                None => head.fill(0),
            }
            out = tail;
            at += take as u64;
        }
        Ok(())
    }
}

/// Builds [`SparseMemory`] scribble records (seed generation and tests).
#[derive(Debug, Default)]
pub struct Scribbles {
    words: BTreeMap<u64, u64>,
}

impl Scribbles {
    /// Sets the 8-aligned word at `pa`.
    pub fn word(&mut self, pa: u64, value: u64) {
        assert!(pa.is_multiple_of(8) && pa < SparseMemory::LIMIT, "{pa:#x}");
        self.words.insert(pa, value);
    }

    /// Writes `bytes` at `pa` (read-modify-write of the words they cover).
    pub fn bytes(&mut self, pa: u64, bytes: &[u8]) {
        for (k, &b) in bytes.iter().enumerate() {
            let at = pa + k as u64;
            let word = self.words.entry(at & !7).or_default();
            let shift = 8 * (at & 7);
            *word = (*word & !(0xff << shift)) | (u64::from(b) << shift);
        }
    }

    /// The scribble records, in address order (zero words are left out: memory starts zero).
    pub fn encode(&self, out: &mut Vec<u8>) {
        for (&pa, &value) in self.words.iter().filter(|(_, v)| **v != 0) {
            out.extend_from_slice(&((pa / 8) as u32).to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// x86-64 page-table entry bits used by the seed builders.
pub mod pte {
    /// Present.
    pub const P: u64 = 1;
    /// Writable.
    pub const W: u64 = 1 << 1;
    /// User.
    pub const U: u64 = 1 << 2;
    /// Large page (PS).
    pub const PS: u64 = 1 << 7;
    /// No-execute.
    pub const NX: u64 = 1 << 63;
}

/// Builds 4-level page tables as scribbles (tables allocated from `next_table` upwards).
#[derive(Debug)]
pub struct TableBuilder {
    /// The memory being built.
    pub mem: Scribbles,
    /// Entries already written (`pa` of the entry → value), to reuse intermediate tables.
    entries: BTreeMap<u64, u64>,
    next_table: u64,
}

impl TableBuilder {
    /// An empty builder that allocates table frames from `first_table`.
    pub fn new(first_table: u64) -> Self {
        TableBuilder {
            mem: Scribbles::default(),
            entries: BTreeMap::new(),
            next_table: first_table,
        }
    }

    /// A fresh table frame.
    pub fn table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += PAGE;
        t
    }

    /// Sets an entry.
    pub fn set(&mut self, table: u64, index: u64, value: u64) {
        self.entries.insert(table + index * 8, value);
        self.mem.word(table + index * 8, value);
    }

    /// Maps `va` → `pa` with a leaf at `leaf_level` (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB) and
    /// leaf `flags` (present is added; PS too above level 1).
    pub fn map(&mut self, cr3: u64, va: u64, pa: u64, leaf_level: u32, flags: u64) {
        let mut table = cr3;
        for level in (leaf_level + 1..=4).rev() {
            let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            table = match self.entries.get(&(table + index * 8)) {
                Some(&entry) => entry & 0x000f_ffff_ffff_f000,
                None => {
                    let next = self.table();
                    self.set(table, index, next | pte::P | pte::W | pte::U);
                    next
                }
            };
        }
        let index = (va >> (12 + 9 * (leaf_level - 1))) & 0x1ff;
        let ps = if leaf_level > 1 { pte::PS } else { 0 };
        self.set(table, index, pa | flags | pte::P | ps);
    }
}

/// A [`PhysicalMemory`] that counts the reads it passes on.
#[derive(Debug)]
pub struct Counted<M> {
    /// The memory read.
    pub inner: M,
    /// `read_phys` calls so far.
    pub reads: usize,
}

impl<M> Counted<M> {
    /// Wraps `inner` with a zero count.
    pub fn new(inner: M) -> Self {
        Counted { inner, reads: 0 }
    }
}

impl<M: PhysicalMemory> PhysicalMemory for Counted<M> {
    fn read_phys(&mut self, pa: u64, dst: &mut [u8]) -> Result<(), MemError> {
        self.reads += 1;
        self.inner.read_phys(pa, dst)
    }
}

/// The demo target's profile (the appliance tests' fixture), whose task layout the
/// `task_table` target and its seeds use.
pub const DEMO_PROFILE: &[u8] =
    include_bytes!("../../appliance/tests/fixtures/demo-target.profile.json");

/// The task-table layout of [`DEMO_PROFILE`].
pub fn demo_task_layout() -> appliance::tasks::TaskLayout {
    let profile = appliance::profile::Profile::from_json(DEMO_PROFILE).expect("fixture profile");
    appliance::tasks::TaskLayout::from_profile(&profile).expect("fixture task layout")
}

/// The ring region `ring_region` lays out in its scribble mode (small rings, one vCPU).
pub fn ring_fuzz_params() -> hypercall::ring::LayoutParams {
    use hypercall::discovery::Features;
    use hypercall::ring::{LayoutParams, RingSizes};
    LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes {
            event: 1024,
            event_reply: 512,
            command: 1024,
            command_reply: 1024,
            log: 512,
        },
        features: Features(0),
        map_window_gpa: 0,
        map_window_size: 0,
    }
}
