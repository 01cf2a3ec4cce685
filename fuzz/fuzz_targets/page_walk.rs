//! x86-64 page-table walks (`appliance::paging`) over hostile target memory: the tables are
//! the target's, so every entry is attacker-chosen.
//!
//! Input: `cr3: u64 ‖ va: u64 ‖ len: u64` (len & 0x3fff is the length of a virtual read),
//! then scribble records that write the target's physical memory ([`SparseMemory`]: 32 GiB
//! that read as zero except the words written). Checks:
//! - a translation reads at most 4 entries (4 table pages, 32 bytes) and is consistent
//!   (page offset kept, frame below 2^52, a neighbour in the same page maps next to it);
//! - errors name the address asked for and a level 1..=4;
//! - `read_virt` reads at most `len` bytes, reports its fault at `va + read`, does at most
//!   5 memory reads per 4 KiB page spanned (4 entries + the data), and copies exactly what
//!   `translate` + a physical read give for each page.
#![no_main]

use appliance::memory::PhysicalMemory;
use appliance::paging::{
    ADDR_MASK, AddressSpace, PageSize, WalkError, is_canonical, read_virt, translate,
};
use kvmi_fuzz::{PAGE, SparseMemory, take_u64s};
use libfuzzer_sys::fuzz_target;

/// Pages of 4 KiB that `[va, va + len)` touches (wrapping around the top of the address
/// space counts on).
fn pages_spanned(va: u64, len: usize) -> usize {
    ((va % PAGE) as usize + len).div_ceil(PAGE as usize)
}

fn check_translate(mem: &mut SparseMemory, cr3: u64, va: u64) {
    mem.reset_counters();
    let result = translate(mem, cr3, va);
    assert!(mem.reads <= 4, "{} reads for one walk", mem.reads);
    assert!(mem.bytes_read <= 32);
    assert!(mem.touched.len() <= 4);
    match result {
        Ok(t) => {
            assert!(is_canonical(va));
            let mask = t.size.bytes() - 1;
            assert_eq!(t.pa & mask, va & mask, "page offset lost");
            assert!(t.pa <= ADDR_MASK | 0xfff, "frame above 2^52: {:#x}", t.pa);
            // Another address in the same page maps to the same frame.
            let other = va ^ 8;
            let u = translate(mem, cr3, other).expect("same page translates");
            assert_eq!((u.pa, u.size, u.flags), (t.pa ^ 8, t.size, t.flags));
            if t.size != PageSize::Size4K {
                let far = (va & !mask) | (!va & mask & !0xfff);
                let f = translate(mem, cr3, far).expect("same large page translates");
                assert_eq!(f.pa & !mask, t.pa & !mask);
            }
        }
        Err(WalkError::NonCanonical { va: at }) => assert!(at == va && !is_canonical(va)),
        Err(WalkError::NotPresent { va: at, level }) => {
            assert_eq!(at, va);
            assert!((1..=4).contains(&level));
        }
        Err(WalkError::Reserved { va: at, level, .. }) => {
            assert_eq!(at, va);
            assert!((2..=4).contains(&level), "reserved at level {level}");
        }
        Err(WalkError::Memory(_)) => {}
    }
}

fn check_read(mem: &mut SparseMemory, cr3: u64, va: u64, len: usize) {
    let mut buf = vec![0u8; len];
    mem.reset_counters();
    let r = read_virt(mem, cr3, va, &mut buf);
    let pages = pages_spanned(va, len);
    assert!(
        mem.reads <= 5 * pages,
        "{} reads for {pages} pages",
        mem.reads
    );
    assert!(r.read <= len);
    match &r.fault {
        None => assert_eq!(r.read, len),
        Some((at, _)) => {
            assert!(r.read < len);
            assert_eq!(*at, va.wrapping_add(r.read as u64));
        }
    }
    // What was read is what translate + read_phys give, page by page.
    let mut done = 0;
    while done < r.read {
        let at = va.wrapping_add(done as u64);
        let t = translate(mem, cr3, at).expect("a page read_virt copied translates");
        let take = ((PAGE - at % PAGE) as usize).min(r.read - done);
        let mut want = vec![0u8; take];
        mem.read_phys(t.pa, &mut want)
            .expect("a page read_virt copied reads");
        assert_eq!(&buf[done..done + take], &want[..], "bytes at {at:#x}");
        done += take;
    }
    let mut again = vec![0u8; len];
    let whole = AddressSpace::Paged { cr3 }.read(mem, va, &mut again);
    assert_eq!(whole.is_ok(), r.is_complete());
}

fuzz_target!(|data: &[u8]| {
    let ([cr3, va, len], rest) = take_u64s::<3>(data);
    let mut mem = SparseMemory::from_scribbles(rest);
    check_translate(&mut mem, cr3, va);
    check_read(&mut mem, cr3, va, (len & 0x3fff) as usize);
});
