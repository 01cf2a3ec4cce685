//! The page cache over a map window served by an in-process host (window = shared atomic
//! words, target = a buffer with page tables; tokens single use), checked against reads of
//! the same buffer directly.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use appliance::memory::{BufferMemory, CachedMemory, MemError, PhysicalMemory};
use appliance::paging::{PageSize, PteFlags, read_virt, translate};
use common::{Tables, pattern};
use guest_driver::{DriverError, Hypercalls, MapWindow};
use hypercall::HcError;
use hypercall::call::{HypercallRegs, Request};
use hypercall::error::encode;
use hypercall::token::MapToken;

const WINDOW_GPA: u64 = 0x1_0000_0000;
const SLOTS: usize = 16;

/// Plays the shim's map calls: copies granted target pages into the window words.
struct Host {
    target: RefCell<BufferMemory>,
    window: Arc<[AtomicU64]>,
    staged: Cell<[u64; 4]>,
    valid: RefCell<HashSet<[u64; 4]>>,
    maps: Cell<u64>,
    unmaps: Cell<u64>,
}

impl Host {
    fn serve(&self, regs: &HypercallRegs) -> Result<u64, HcError> {
        match Request::decode(regs)? {
            Request::MemMap {
                target_gpa,
                window_gpa,
                ..
            } => {
                if !self.valid.borrow_mut().remove(&self.staged.get()) {
                    return Err(HcError::BadToken);
                }
                hypercall::call::check_window(window_gpa, 1, WINDOW_GPA, SLOTS as u64 * 4096)?;
                let mut page = [0u8; 4096];
                self.target
                    .borrow_mut()
                    .read_phys(target_gpa, &mut page)
                    .map_err(|_| HcError::OutOfRange)?;
                let word = ((window_gpa - WINDOW_GPA) / 8) as usize;
                for (i, chunk) in page.chunks(8).enumerate() {
                    let v = u64::from_le_bytes(chunk.try_into().unwrap());
                    self.window[word + i].store(v, Ordering::Relaxed);
                }
                self.maps.set(self.maps.get() + 1);
                Ok(0)
            }
            Request::MemUnmap { window_gpa } => {
                let word = ((window_gpa - WINDOW_GPA) / 8) as usize;
                for w in &self.window[word..word + 512] {
                    w.store(0, Ordering::Relaxed);
                }
                self.unmaps.set(self.unmaps.get() + 1);
                Ok(0)
            }
            _ => Err(HcError::NotPermitted),
        }
    }
}

impl Hypercalls for Host {
    fn raw_call(&self, nr: u64, args: [u64; 5]) -> Result<u64, DriverError> {
        let [rbx, rcx, rdx, rsi, rdi] = args;
        Ok(encode(self.serve(&HypercallRegs {
            rax: nr,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
        })))
    }
    fn stage_token(&self, token: &MapToken) -> Result<u64, DriverError> {
        self.staged.set(token.words);
        Ok(0x2000)
    }
}

fn setup(target: BufferMemory, tokens: u64) -> MapWindow<Host, Arc<[AtomicU64]>> {
    let window: Arc<[AtomicU64]> = (0..SLOTS * 512).map(|_| AtomicU64::new(0)).collect();
    let host = Host {
        target: RefCell::new(target),
        window: window.clone(),
        staged: Cell::new([0; 4]),
        valid: RefCell::new((1..=tokens).map(|i| [i, 0, 0, 1]).collect()),
        maps: Cell::new(0),
        unmaps: Cell::new(0),
    };
    MapWindow::new(host, window, WINDOW_GPA).unwrap()
}

fn token_counter() -> impl FnMut() -> Result<MapToken, MemError> {
    token_counter_from(0)
}

fn token_counter_from(mut next: u64) -> impl FnMut() -> Result<MapToken, MemError> {
    move || {
        next += 1;
        Ok(MapToken::new([next, 0, 0, 1]))
    }
}

fn patterned(len: usize) -> BufferMemory {
    BufferMemory::from_bytes(0, (0..len as u64).map(pattern).collect())
}

#[test]
fn hits_misses_and_lru_eviction() {
    let window = setup(patterned(64 * 4096), 100);
    let mut mem = CachedMemory::new(&window, token_counter_from(0), 2);
    let mut buf = [0u8; 16];
    let read = |mem: &mut CachedMemory<'_, _, _, _>, pa: u64| {
        let mut b = [0u8; 16];
        mem.read_phys(pa, &mut b).unwrap();
        b
    };
    assert_eq!(
        read(&mut mem, 0x1010).to_vec(),
        (0x1010..0x1020).map(pattern).collect::<Vec<_>>()
    );
    read(&mut mem, 0x2000); // miss
    read(&mut mem, 0x1100); // hit, page 1 is now most recent
    read(&mut mem, 0x3000); // miss, evicts page 2
    read(&mut mem, 0x1200); // hit
    read(&mut mem, 0x2000); // miss again, evicts page 3
    let s = mem.stats();
    assert_eq!((s.hits, s.misses, s.evictions), (2, 4, 2));
    assert_eq!(mem.cached_pages(), 2);
    assert_eq!(window.calls().maps.get(), 4, "one MEM_MAP per miss");
    assert_eq!(window.calls().unmaps.get(), 2, "one MEM_UNMAP per eviction");
    // A read across a page boundary touches both pages.
    mem.read_phys(0x2ff8, &mut buf).unwrap();
    assert_eq!(
        buf.to_vec(),
        (0x2ff8..0x3008).map(pattern).collect::<Vec<_>>()
    );
    drop(mem);
    assert_eq!(
        window.free_slots(),
        SLOTS,
        "dropping the cache unmaps everything"
    );

    // A cache larger than the window: a full window evicts instead of failing.
    let mut big = CachedMemory::new(&window, token_counter_from(50), 64);
    for page in 0..(SLOTS as u64 + 4) {
        assert_eq!(read(&mut big, page * 4096 + 8)[0], pattern(page * 4096 + 8));
    }
    assert_eq!(big.cached_pages(), SLOTS);
    assert_eq!(big.stats().evictions, 4);
}

#[test]
fn map_failures_are_reported_with_the_page() {
    let window = setup(patterned(4 * 4096), 1);
    let mut mem = CachedMemory::new(&window, token_counter(), 4);
    let mut b = [0u8; 8];
    mem.read_phys(0, &mut b).unwrap();
    // The second token is unknown to the host.
    match mem.read_phys(0x1000, &mut b) {
        Err(MemError::Map {
            pa: 0x1000,
            source: DriverError::Hypercall(HcError::BadToken),
        }) => {}
        other => panic!("{other:?}"),
    }
    let window = setup(patterned(4 * 4096), 10);
    let mut mem = CachedMemory::new(&window, token_counter(), 4);
    assert!(matches!(
        mem.read_phys(0x10_0000, &mut b),
        Err(MemError::Map {
            pa: 0x10_0000,
            source: DriverError::Hypercall(HcError::OutOfRange)
        })
    ));
    assert_eq!(window.free_slots(), SLOTS);
}

#[test]
fn page_walks_through_the_window_agree_with_direct_reads() {
    let mut t = Tables::new(4 << 20, 0x10_0000, 0x18_0000);
    let cr3 = t.table();
    let flags = PteFlags {
        writable: true,
        user: true,
        no_execute: true,
    };
    for i in 0..6u64 {
        let frame = 0x20_0000 + ((i * 5) % 6) * 4096;
        t.map(cr3, 0x7000_0000 + i * 4096, frame, PageSize::Size4K, flags);
        let bytes: Vec<u8> = (frame..frame + 4096).map(pattern).collect();
        t.mem.write(frame, &bytes).unwrap();
    }
    let mut direct = t.mem.clone();
    let window = setup(t.mem.clone(), 1000);
    // 6 data pages + 4 table pages fit: the second pass is all hits.
    let mut cached = CachedMemory::new(&window, token_counter(), 12);
    for va in [0x7000_0000u64, 0x7000_1234, 0x7000_5fff, 0x7000_6000] {
        let a = translate(&mut direct, cr3, va).map(|t| t.pa).ok();
        let b = translate(&mut cached, cr3, va).map(|t| t.pa).ok();
        assert_eq!(a, b, "{va:#x}");
    }
    let mut a = vec![0u8; 7 * 4096];
    let mut b = vec![0u8; 7 * 4096];
    let ra = read_virt(&mut direct, cr3, 0x7000_0000, &mut a);
    let rb = read_virt(&mut cached, cr3, 0x7000_0000, &mut b);
    assert_eq!((ra.read, rb.read), (6 * 4096, 6 * 4096));
    assert_eq!(a, b);
    let before = cached.stats();
    let rb = read_virt(&mut cached, cr3, 0x7000_0000, &mut b);
    assert_eq!(rb.read, 6 * 4096);
    let after = cached.stats();
    assert!(after.hits > before.hits);
    assert_eq!(after.evictions, before.evictions);
}
