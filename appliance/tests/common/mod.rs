//! Test helpers: page tables built in a byte buffer, with the mappings recorded for an
//! independent oracle.
#![allow(dead_code)]

use appliance::memory::BufferMemory;
use appliance::paging::{PageSize, PteFlags};

/// One mapping as the builder was asked for it.
#[derive(Clone, Copy, Debug)]
pub struct Mapped {
    pub cr3: u64,
    pub va: u64,
    pub pa: u64,
    pub size: PageSize,
    pub flags: PteFlags,
}

/// Builds 4-level page tables in a [`BufferMemory`].
pub struct Tables {
    pub mem: BufferMemory,
    next_frame: u64,
    end_frame: u64,
    pub mapped: Vec<Mapped>,
}

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

impl Tables {
    /// Memory of `len` bytes; page tables are allocated from `tables_at..tables_end`.
    pub fn new(len: usize, tables_at: u64, tables_end: u64) -> Self {
        Tables {
            mem: BufferMemory::zeroed(len),
            next_frame: tables_at,
            end_frame: tables_end,
            mapped: Vec::new(),
        }
    }

    /// A fresh zeroed table frame.
    pub fn table(&mut self) -> u64 {
        let frame = self.next_frame;
        assert!(frame < self.end_frame, "out of table frames");
        self.next_frame += 4096;
        frame
    }

    pub fn entry(&mut self, table: u64, index: u64) -> u64 {
        use appliance::memory::PhysicalMemory;
        self.mem.read_u64(table + index * 8).unwrap()
    }

    pub fn set_entry(&mut self, table: u64, index: u64, value: u64) {
        self.mem.write_u64(table + index * 8, value).unwrap();
    }

    /// Maps `va` → `pa` with a page of `size` and leaf `flags` in the space of `cr3`.
    pub fn map(&mut self, cr3: u64, va: u64, pa: u64, size: PageSize, flags: PteFlags) {
        let leaf_level = match size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        };
        let mut table = cr3;
        for level in (leaf_level + 1..=4).rev() {
            let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            let entry = self.entry(table, index);
            table = if entry & P != 0 {
                assert_eq!(entry & PS, 0, "mapping under a large page");
                entry & 0x000f_ffff_ffff_f000
            } else {
                let next = self.table();
                self.set_entry(table, index, next | P | W | U);
                next
            };
        }
        let index = (va >> (12 + 9 * (leaf_level - 1))) & 0x1ff;
        let mut leaf = pa | P;
        if flags.writable {
            leaf |= W;
        }
        if flags.user {
            leaf |= U;
        }
        if flags.no_execute {
            leaf |= NX;
        }
        if leaf_level > 1 {
            leaf |= PS;
        }
        self.set_entry(table, index, leaf);
        self.mapped.push(Mapped {
            cr3,
            va,
            pa,
            size,
            flags,
        });
    }

    /// The oracle: what the recorded mappings say about `va` in `cr3`.
    pub fn oracle(&self, cr3: u64, va: u64) -> Option<(u64, PageSize, PteFlags)> {
        self.mapped
            .iter()
            .find(|m| m.cr3 == cr3 && va >= m.va && va - m.va < m.size.bytes())
            .map(|m| (m.pa + (va - m.va), m.size, m.flags))
    }
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The byte a test frame holds at physical `pa`.
pub fn pattern(pa: u64) -> u8 {
    (pa.wrapping_mul(7) ^ (pa >> 12)) as u8
}
