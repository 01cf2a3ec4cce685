//! Page-table walks against tables built in a buffer, checked by an independent oracle (the
//! list of mappings the builder was asked for).

mod common;

use appliance::memory::{BufferMemory, MemError};
use appliance::paging::{AddressSpace, PageSize, PteFlags, WalkError, read_virt, translate};
use common::{Rng, Tables, pattern};

const MEM: usize = 8 << 20;
const RW_USER: PteFlags = PteFlags {
    writable: true,
    user: true,
    no_execute: true,
};
const RO_KERNEL: PteFlags = PteFlags {
    writable: false,
    user: false,
    no_execute: false,
};

/// Two address spaces: the same virtual pages mapped to different frames, plus large pages.
fn two_spaces() -> (Tables, u64, u64) {
    let mut t = Tables::new(MEM, 0x10_0000, 0x20_0000);
    let (a, b) = (t.table(), t.table());
    for (cr3, frames) in [(a, 0x40_0000u64), (b, 0x50_0000)] {
        for i in 0..16u64 {
            let flags = if i % 3 == 0 { RO_KERNEL } else { RW_USER };
            t.map(
                cr3,
                0x7f00_0000_0000 + i * 4096,
                frames + i * 4096,
                PageSize::Size4K,
                flags,
            );
        }
        t.map(
            cr3,
            0xffff_8000_0020_0000,
            0x20_0000,
            PageSize::Size2M,
            RO_KERNEL,
        );
        t.map(
            cr3,
            0xffff_c000_4000_0000,
            0x4000_0000,
            PageSize::Size1G,
            RW_USER,
        );
    }
    // A lone page next to an unmapped neighbour, and a page far up in the lower half.
    t.map(a, 0x1000, 0x60_0000, PageSize::Size4K, RW_USER);
    t.map(a, 0x7fff_ffff_f000, 0x61_0000, PageSize::Size4K, RO_KERNEL);
    (t, a, b)
}

#[test]
fn translations_match_the_oracle_for_random_addresses() {
    let (mut t, a, b) = two_spaces();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut hits = 0;
    let mut misses = 0;
    for i in 0..4000 {
        let cr3 = if i % 2 == 0 { a } else { b };
        let va = match i % 4 {
            // Inside a recorded mapping.
            0 | 1 => {
                let m = t.mapped[rng.below(t.mapped.len() as u64) as usize];
                m.va + rng.below(m.size.bytes())
            }
            // Near a mapping (often just outside it).
            2 => {
                let m = t.mapped[rng.below(t.mapped.len() as u64) as usize];
                m.va.wrapping_add(m.size.bytes())
                    .wrapping_add(rng.below(3 * 4096))
            }
            // Anywhere canonical.
            _ => {
                let low = rng.below(1 << 47);
                if rng.below(2) == 0 {
                    low
                } else {
                    low | 0xffff_8000_0000_0000
                }
            }
        };
        let want = t.oracle(cr3, va);
        match (translate(&mut t.mem, cr3, va), want) {
            (Ok(got), Some((pa, size, flags))) => {
                assert_eq!(
                    (got.pa, got.size, got.flags),
                    (pa, size, flags),
                    "va {va:#x}"
                );
                hits += 1;
            }
            (Err(WalkError::NonCanonical { va: at }), None) => {
                let top = va >> 47;
                assert!(top != 0 && top != 0x1_ffff && at == va, "va {va:#x}");
            }
            (Err(WalkError::NotPresent { va: at, level }), None) => {
                assert_eq!(at, va);
                assert!((1..=4).contains(&level));
                misses += 1;
            }
            (got, want) => panic!("va {va:#x} cr3 {cr3:#x}: walk {got:?}, oracle {want:?}"),
        }
    }
    assert!(hits > 1500 && misses > 500, "hits {hits} misses {misses}");
    // The same virtual address resolves per address space.
    let va = 0x7f00_0000_0000 + 5 * 4096 + 0x123;
    assert_eq!(translate(&mut t.mem, a, va).unwrap().pa, 0x40_5123);
    assert_eq!(translate(&mut t.mem, b, va).unwrap().pa, 0x50_5123);
}

#[test]
fn bad_addresses_and_entries_fail_with_their_reason() {
    let (mut t, a, _) = two_spaces();
    assert!(matches!(
        translate(&mut t.mem, a, 0x0000_8000_0000_0000),
        Err(WalkError::NonCanonical {
            va: 0x0000_8000_0000_0000
        })
    ));
    assert!(matches!(
        translate(&mut t.mem, a, 0x2000),
        Err(WalkError::NotPresent {
            va: 0x2000,
            level: 1
        })
    ));
    assert!(matches!(
        translate(&mut t.mem, a, 0x4000_0000_0000),
        Err(WalkError::NotPresent { level: 4, .. })
    ));
    // PS at PML4 level is reserved.
    let pml4_index = 0x1000u64 >> 39;
    let entry = t.entry(a, pml4_index);
    t.set_entry(a, pml4_index, entry | 1 << 7);
    assert!(matches!(
        translate(&mut t.mem, a, 0x1000),
        Err(WalkError::Reserved { level: 4, .. })
    ));
    t.set_entry(a, pml4_index, entry);
    // A 2 MiB entry with an address bit inside the page offset is reserved.
    let c = t.table();
    t.map(c, 0x20_0000, 0x20_0000, PageSize::Size2M, RW_USER);
    let pdpt = t.entry(c, 0) & 0x000f_ffff_ffff_f000;
    let pd = t.entry(pdpt, 0) & 0x000f_ffff_ffff_f000;
    let leaf = t.entry(pd, 1);
    t.set_entry(pd, 1, leaf | 1 << 13);
    assert!(matches!(
        translate(&mut t.mem, c, 0x20_0000),
        Err(WalkError::Reserved { level: 2, .. })
    ));
    // A CR3 outside memory: the table read fails.
    assert!(matches!(
        translate(&mut t.mem, MEM as u64 + 0x1000, 0x1000),
        Err(WalkError::Memory(MemError::OutOfRange { .. }))
    ));
}

#[test]
fn upper_levels_restrict_permissions() {
    let mut t = Tables::new(MEM, 0x10_0000, 0x20_0000);
    let cr3 = t.table();
    t.map(
        cr3,
        0x1000,
        0x60_0000,
        PageSize::Size4K,
        PteFlags {
            writable: true,
            user: true,
            no_execute: false,
        },
    );
    let full = translate(&mut t.mem, cr3, 0x1000).unwrap();
    assert_eq!(
        full.flags,
        PteFlags {
            writable: true,
            user: true,
            no_execute: false
        }
    );
    let pml4e = t.entry(cr3, 0);
    // PML4 entry: supervisor-only and no-execute.
    t.set_entry(cr3, 0, (pml4e & !4) | 1 << 63);
    let limited = translate(&mut t.mem, cr3, 0x1000).unwrap();
    assert_eq!(
        limited.flags,
        PteFlags {
            writable: true,
            user: false,
            no_execute: true
        }
    );
    // PDPT entry read-only.
    let pdpt = pml4e & 0x000f_ffff_ffff_f000;
    let pdpte = t.entry(pdpt, 0);
    t.set_entry(pdpt, 0, pdpte & !2);
    assert!(!translate(&mut t.mem, cr3, 0x1000).unwrap().flags.writable);
}

#[test]
fn virtual_reads_cross_scattered_pages_and_stop_at_the_first_fault() {
    let mut t = Tables::new(MEM, 0x10_0000, 0x20_0000);
    let cr3 = t.table();
    let frames = [0x43_0000u64, 0x41_0000];
    let base = 0x5555_0000_0000u64;
    for (i, frame) in frames.iter().enumerate() {
        t.map(
            cr3,
            base + i as u64 * 4096,
            *frame,
            PageSize::Size4K,
            RW_USER,
        );
        let bytes: Vec<u8> = (*frame..frame + 4096).map(pattern).collect();
        t.mem.write(*frame, &bytes).unwrap();
    }
    let mut buf = vec![0u8; 3 * 4096 - 100];
    let result = read_virt(&mut t.mem, cr3, base + 100, &mut buf);
    assert_eq!(result.read, 2 * 4096 - 100);
    let (at, err) = result.fault.expect("third page is unmapped");
    assert_eq!(at, base + 2 * 4096);
    assert!(matches!(err, WalkError::NotPresent { level: 1, .. }));
    let want: Vec<u8> = (frames[0] + 100..frames[0] + 4096)
        .chain(frames[1]..frames[1] + 4096)
        .map(pattern)
        .collect();
    assert_eq!(&buf[..result.read], &want[..]);
    // A whole read inside the mapped pages is complete; through AddressSpace too.
    let mut small = [0u8; 64];
    assert!(read_virt(&mut t.mem, cr3, base + 4096 - 32, &mut small).is_complete());
    assert_eq!(
        small[32..].to_vec(),
        (frames[1]..frames[1] + 32).map(pattern).collect::<Vec<_>>()
    );
    let mut again = [0u8; 64];
    AddressSpace::Paged { cr3 }
        .read(&mut t.mem, base + 4096 - 32, &mut again)
        .unwrap();
    assert_eq!(again, small);
    // A 1 GiB page whose frame lies beyond memory: translation works, the read faults.
    t.map(cr3, 0x40_0000_0000, 0x4000_0000, PageSize::Size1G, RW_USER);
    let r = read_virt(&mut t.mem, cr3, 0x40_0000_0000, &mut small);
    assert_eq!(r.read, 0);
    assert!(matches!(
        r.fault,
        Some((0x40_0000_0000, WalkError::Memory(_)))
    ));
    let _ = BufferMemory::default();
}
