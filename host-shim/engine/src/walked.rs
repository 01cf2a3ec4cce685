//! Guest pages the host itself reads or writes through the RAM mapping on the guest's behalf,
//! where a page restriction would break the guest instead of trapping an access.
//!
//! Page access is `mprotect` of the RAM mapping KVM uses (`access`). On PVM (measured,
//! `docs/platform.md`) the host's software MMU reads the guest's page tables through that
//! mapping, and event delivery reads the IDT, GDT and TSS and pushes the exception frame
//! through it too. None of that is an exit, so none of it can become an event:
//! - a page table that is not readable (`PROT_NONE`: R or X removed) fails the host's page
//!   walk, which becomes a page fault injected into the guest; through the root (CR3) page,
//!   or the kernel's own tables, the guest triple-faults within microseconds;
//! - an IDT, GDT or TSS page that is not readable fails event delivery: triple fault at the
//!   next exception or `int3`;
//! - the frame an exception or `int3` from CPL3 pushes below `TSS.RSP0` (or an IST stack)
//!   on a page that is not writable (any restriction) fails the delivery: triple fault.
//!
//! [`HostWalked::collect`] finds those pages for the vCPUs' state as the engine last saw it
//! (every table reachable from each vCPU's CR3 and the roots it loaded lately, in long mode;
//! the IDT, GDT and TSS pages; the frame areas below RSP0 and IST1–7), and
//! [`HostWalked::refusal`] says whether a new host protection would break one. The check is
//! a snapshot: a page that becomes a page table, descriptor table or trap stack after it was
//! restricted is not covered.

use std::collections::{HashMap, HashSet};

use super::access::PAGE;
use super::slot::VcpuView;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const READ_WRITE: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// Page-table pages walked per check at most (a guest with more is checked partially).
pub const MAX_TABLES: usize = 1 << 14;
/// Bytes of the frame an exception from CPL3 pushes below the 16-byte aligned stack it
/// switches to: SS, RSP, RFLAGS, CS, RIP and an error code.
pub const TRAP_FRAME: u64 = 48;
/// Pages of one descriptor table checked at most (a GDT is at most 16 pages).
const MAX_TABLE_PAGES: u64 = 17;

/// Reads guest-physical memory (the RAM alias): false if outside RAM.
pub type ReadPhys<'a> = &'a dyn Fn(u64, &mut [u8]) -> bool;

/// What the host uses a guest page for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostUse {
    /// A page table reachable from `root` (a CR3 of `vcpu`, current or loaded lately).
    PageTable {
        /// The vCPU.
        vcpu: usize,
        /// The root it is reachable from.
        root: u64,
    },
    /// The IDT, GDT or TSS of `vcpu`.
    DescriptorTable {
        /// The vCPU.
        vcpu: usize,
        /// "IDT", "GDT" or "TSS".
        table: &'static str,
    },
    /// The frame area below a stack an exception from CPL3 switches to.
    TrapFrame {
        /// The vCPU.
        vcpu: usize,
        /// "TSS.RSP0" or "TSS.ISTn".
        stack: &'static str,
        /// The stack pointer.
        rsp: u64,
    },
}

impl HostUse {
    /// Whether the host's use of the page still works under host protection `prot`: tables
    /// need to be readable, a trap frame writable.
    pub fn works_under(&self, prot: libc::c_int) -> bool {
        match self {
            HostUse::TrapFrame { .. } => prot == READ_WRITE,
            _ => prot != libc::PROT_NONE,
        }
    }

    /// What the page is, for the refusal's log line.
    pub fn describe(&self) -> String {
        match self {
            HostUse::PageTable { vcpu, root } => format!(
                "a page table of vCPU {vcpu} (reachable from CR3 {root:#x}): the host's page \
                 walker reads it, so without R (or X, which also needs PROT_NONE) every \
                 translation through it fails"
            ),
            HostUse::DescriptorTable { vcpu, table } => format!(
                "vCPU {vcpu}'s {table}: event delivery reads it, so without R (or X) the next \
                 exception or interrupt fails"
            ),
            HostUse::TrapFrame { vcpu, stack, rsp } => format!(
                "the trap frame of vCPU {vcpu} ({stack} = {rsp:#x}): event delivery pushes an \
                 exception frame there when CPL3 code traps, so it must stay writable"
            ),
        }
    }
}

/// The pages of guest structures the host walks, for the vCPUs' recorded state.
#[derive(Debug, Default)]
pub struct HostWalked {
    uses: HashMap<u64, HostUse>,
    /// Page-table pages walked.
    pub tables: usize,
    /// The walk stopped at [`MAX_TABLES`].
    pub truncated: bool,
}

/// One vCPU's recorded state: its index, system state, and the roots it loaded lately.
pub type VcpuState<'a> = (usize, VcpuView, &'a [u64]);

impl HostWalked {
    /// Why the page holding `gpa` cannot take host protection `prot`, if it cannot.
    pub fn refusal(&self, gpa: u64, prot: libc::c_int) -> Option<&HostUse> {
        self.uses
            .get(&(gpa & !(PAGE - 1)))
            .filter(|u| !u.works_under(prot))
    }

    /// Every page of `vcpus`' page tables, descriptor tables and trap frames.
    pub fn collect(vcpus: &[VcpuState<'_>], read: ReadPhys<'_>) -> HostWalked {
        let mut w = HostWalked::default();
        let mut visited = HashSet::new();
        for &(vcpu, view, roots) in vcpus {
            if view.cr0 & CR0_PG == 0 {
                continue;
            }
            let long = view.efer & EFER_LMA != 0;
            let levels = if view.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
            let current = view.cr3 & ADDR;
            for &root in std::iter::once(&current).chain(roots.iter()) {
                if long {
                    w.walk_tree(read, vcpu, root, levels, &mut visited);
                } else {
                    // Legacy paging: only the root page is known to be a table.
                    w.uses
                        .entry(root & ADDR)
                        .or_insert(HostUse::PageTable { vcpu, root });
                }
            }
            for (table, (base, limit)) in [
                ("IDT", (view.idt.0, u64::from(view.idt.1))),
                ("GDT", (view.gdt.0, u64::from(view.gdt.1))),
                ("TSS", (view.tr.0, u64::from(view.tr.1))),
            ] {
                if base == 0 && limit == 0 {
                    continue;
                }
                let first = base & !(PAGE - 1);
                let last = base.saturating_add(limit) & !(PAGE - 1);
                let pages = ((last - first) / PAGE + 1).min(MAX_TABLE_PAGES);
                for k in 0..pages {
                    if let Some(t) = translate(read, &view, first + k * PAGE) {
                        w.uses
                            .entry(t.gpa & !(PAGE - 1))
                            .or_insert(HostUse::DescriptorTable { vcpu, table });
                    }
                }
            }
            if long && view.tr.1 >= 0x67 {
                w.trap_frames(read, vcpu, &view);
            }
        }
        w
    }

    fn walk_tree(
        &mut self,
        read: ReadPhys<'_>,
        vcpu: usize,
        root: u64,
        levels: u32,
        visited: &mut HashSet<u64>,
    ) {
        let mut stack = vec![(root & ADDR, levels)];
        let mut table = vec![0u8; PAGE as usize];
        while let Some((gpa, level)) = stack.pop() {
            if !visited.insert(gpa) {
                continue;
            }
            if self.tables >= MAX_TABLES {
                self.truncated = true;
                return;
            }
            if !read(gpa, &mut table) {
                continue;
            }
            self.tables += 1;
            // A page table outranks any other use: refused under PROT_NONE either way, and
            // its message is the most useful.
            self.uses.insert(gpa, HostUse::PageTable { vcpu, root });
            if level == 1 {
                continue;
            }
            for entry in table.chunks_exact(8) {
                let e = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                if e & PRESENT == 0 || ((level == 2 || level == 3) && e & HUGE != 0) {
                    continue;
                }
                stack.push((e & ADDR, level - 1));
            }
        }
    }

    fn trap_frames(&mut self, read: ReadPhys<'_>, vcpu: usize, view: &VcpuView) {
        const STACKS: [(&str, u64); 8] = [
            ("TSS.RSP0", 4),
            ("TSS.IST1", 0x24),
            ("TSS.IST2", 0x2c),
            ("TSS.IST3", 0x34),
            ("TSS.IST4", 0x3c),
            ("TSS.IST5", 0x44),
            ("TSS.IST6", 0x4c),
            ("TSS.IST7", 0x54),
        ];
        for (stack, offset) in STACKS {
            let Some(rsp) = read_linear_u64(read, view, view.tr.0.wrapping_add(offset)) else {
                continue;
            };
            if rsp == 0 {
                continue;
            }
            let top = rsp & !0xf;
            for la in [top.wrapping_sub(TRAP_FRAME), top.wrapping_sub(1)] {
                if let Some(t) = translate(read, view, la) {
                    let page = t.gpa & !(PAGE - 1);
                    let frame = HostUse::TrapFrame { vcpu, stack, rsp };
                    // A trap frame is refused under more protections than a table page.
                    match self.uses.get(&page) {
                        Some(HostUse::TrapFrame { .. }) => {}
                        _ => {
                            self.uses.insert(page, frame);
                        }
                    }
                }
            }
        }
    }
}

/// A translated guest-virtual address and the rights every level of the walk grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// User-accessible at every level.
    pub user: bool,
    /// Writable at every level.
    pub writable: bool,
}

/// Translates `la` with `view`'s paging (4- or 5-level long mode; identity with paging off;
/// `None` for legacy paging or a non-present level).
pub fn translate(read: ReadPhys<'_>, view: &VcpuView, la: u64) -> Option<Translation> {
    if view.cr0 & CR0_PG == 0 {
        return Some(Translation {
            gpa: la,
            user: true,
            writable: true,
        });
    }
    if view.efer & EFER_LMA == 0 {
        return None;
    }
    let levels = if view.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let (mut user, mut writable) = (true, true);
    let mut table = view.cr3 & ADDR;
    for level in (0..levels).rev() {
        let shift = 12 + 9 * level;
        let index = (la >> shift) & 0x1ff;
        let mut b = [0u8; 8];
        if !read(table + index * 8, &mut b) {
            return None;
        }
        let e = u64::from_le_bytes(b);
        if e & PRESENT == 0 {
            return None;
        }
        user &= e & USER != 0;
        writable &= e & WRITABLE != 0;
        if (level == 1 || level == 2) && e & HUGE != 0 {
            let size = 1u64 << shift;
            let gpa = (e & ADDR & !(size - 1)) | (la & (size - 1));
            return Some(Translation {
                gpa,
                user,
                writable,
            });
        }
        table = e & ADDR;
    }
    Some(Translation {
        gpa: table | (la & (PAGE - 1)),
        user,
        writable,
    })
}

/// Reads a little-endian u64 at guest-virtual `la` (split at a page boundary if it must).
fn read_linear_u64(read: ReadPhys<'_>, view: &VcpuView, la: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    let mut done = 0;
    while done < 8 {
        let at = la.wrapping_add(done as u64);
        let in_page = ((PAGE - (at & (PAGE - 1))) as usize).min(8 - done);
        let t = translate(read, view, at)?;
        if !read(t.gpa, &mut b[done..done + in_page]) {
            return None;
        }
        done += in_page;
    }
    Some(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Guest memory for the tests: sparse pages.
    #[derive(Default)]
    struct Mem(RefCell<HashMap<u64, Vec<u8>>>);

    impl Mem {
        fn put(&self, gpa: u64, v: u64) {
            let mut m = self.0.borrow_mut();
            let page = m.entry(gpa & !0xfff).or_insert_with(|| vec![0; 4096]);
            let o = (gpa & 0xfff) as usize;
            page[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            if gpa >= 0x100_0000 {
                return false;
            }
            let m = self.0.borrow();
            for (k, b) in buf.iter_mut().enumerate() {
                let a = gpa + k as u64;
                *b = m.get(&(a & !0xfff)).map_or(0, |p| p[(a & 0xfff) as usize]);
            }
            true
        }
    }

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    const USER_PDPT: u64 = 0x5000;

    /// 4-level tables: gva 0..2M → a PT mapping 4 KiB pages (identity for 0x0..0x20_0000),
    /// 2M..4M one 2 MiB page; PML4[1] → a user PDPT with a 1 GiB page.
    fn guest() -> (Mem, VcpuView) {
        let m = Mem::default();
        m.put(PML4, PDPT | 3);
        m.put(PML4 + 8, USER_PDPT | 7);
        m.put(PDPT, PD | 3);
        m.put(PD, PT | 3);
        m.put(PD + 8, 0x20_0000 | 0x83);
        for k in 0..512 {
            m.put(PT + k * 8, (k << 12) | 3);
        }
        m.put(PT + 0x10 * 8, (0x10 << 12) | 7);
        m.put(USER_PDPT, 0x4000_0000 | 0x87);
        let view = VcpuView {
            cr0: CR0_PG | 1,
            cr3: PML4,
            cr4: 0x20,
            efer: EFER_LMA | 0x100,
            idt: (0x8000, 0xfff),
            gdt: (0x9000, 0x3f),
            tr: (0x9040, 0x67),
        };
        (m, view)
    }

    #[test]
    fn every_reachable_table_and_no_leaf_page_is_a_page_table() {
        let (m, view) = guest();
        let read = |g: u64, b: &mut [u8]| m.read(g, b);
        let w = HostWalked::collect(&[(0, view, &[])], &read);
        for t in [PML4, PDPT, PD, PT, USER_PDPT] {
            assert!(
                matches!(
                    w.refusal(t + 0x123, libc::PROT_NONE),
                    Some(HostUse::PageTable {
                        vcpu: 0,
                        root: PML4
                    })
                ),
                "{t:#x}"
            );
            assert!(w.refusal(t, libc::PROT_READ).is_none(), "r-x stays allowed");
        }
        assert_eq!(w.tables, 5);
        // Leaves (a 4 KiB page, the 2 MiB and 1 GiB pages) are not tables.
        for leaf in [0x7000, 0x20_0000, 0x4000_0000] {
            assert!(w.refusal(leaf, libc::PROT_NONE).is_none(), "{leaf:#x}");
        }
        // A root loaded lately is walked as well; tables shared with the current one once.
        m.put(0x6000, PDPT | 3);
        let w = HostWalked::collect(&[(0, view, &[0x6000])], &read);
        assert!(matches!(
            w.refusal(0x6000, libc::PROT_NONE),
            Some(HostUse::PageTable { root: 0x6000, .. })
        ));
        assert_eq!(w.tables, 6);
        // Paging off: no tables.
        let off = VcpuView { cr0: 1, ..view };
        let w = HostWalked::collect(&[(0, off, &[])], &read);
        assert!(w.refusal(PML4, libc::PROT_NONE).is_none());
    }

    #[test]
    fn descriptor_tables_need_reads_and_trap_frames_need_writes() {
        let (m, view) = guest();
        // TSS at 0x9040: RSP0 = 0xa010 (frame 0x9fe0..0xa010: pages 0x9000 and 0xa000),
        // IST1 = 0xc000 (frame in page 0xb000), the rest 0.
        m.put(0x9040 + 4, 0xa010);
        m.put(0x9040 + 0x24, 0xc000);
        let read = |g: u64, b: &mut [u8]| m.read(g, b);
        let w = HostWalked::collect(&[(1, view, &[])], &read);
        assert!(matches!(
            w.refusal(0x8000, libc::PROT_NONE),
            Some(HostUse::DescriptorTable {
                vcpu: 1,
                table: "IDT"
            })
        ));
        assert!(w.refusal(0x8000, libc::PROT_READ).is_none());
        for (page, stack) in [
            (0x9000, "TSS.RSP0"),
            (0xa000, "TSS.RSP0"),
            (0xb000, "TSS.IST1"),
        ] {
            let r = w.refusal(page, libc::PROT_READ);
            assert!(
                matches!(r, Some(HostUse::TrapFrame { vcpu: 1, stack: s, .. }) if *s == stack),
                "{page:#x}: {r:?}"
            );
            assert!(
                w.refusal(page, libc::PROT_READ | libc::PROT_WRITE)
                    .is_none()
            );
        }
        assert!(
            w.refusal(0xc000, libc::PROT_NONE).is_none(),
            "above the frame"
        );
        assert!(w.refusal(0xd000, libc::PROT_NONE).is_none());
        assert!(
            w.refusal(0x9000, libc::PROT_NONE)
                .is_some_and(|u| u.describe().contains("trap frame"))
        );
    }

    #[test]
    fn translation_reports_user_and_write_rights_of_every_level() {
        let (m, view) = guest();
        let read = |g: u64, b: &mut [u8]| m.read(g, b);
        let t = translate(&read, &view, 0x10_123).unwrap();
        assert_eq!(t.gpa, 0x10_123);
        assert!(!t.user, "the upper levels are supervisor-only");
        assert!(t.writable);
        let t = translate(&read, &view, (1 << 39) + 0x1234_5678).unwrap();
        assert_eq!(t.gpa, 0x4000_0000 + 0x1234_5678);
        assert!(t.user && t.writable);
        assert_eq!(translate(&read, &view, 2 << 39), None);
        assert_eq!(translate(&read, &view, 0x20_0abc).unwrap().gpa, 0x20_0abc);
        // Unaligned reads across a page boundary.
        m.put(0xff8, 0x1122_3344_0000_0000);
        let v = read_linear_u64(&read, &view, 0xffc);
        assert_eq!(v, Some(0x1122_3344 | (PDPT | 3) << 32));
    }
}
