//! The individual capability probes. Each runs one or two tiny VMs and interprets the exits;
//! each returns its finding plus a one-line detail of what was observed.

use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_CAP_X86_USER_SPACE_MSR, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    KVM_MSR_EXIT_REASON_FILTER, kvm_enable_cap, kvm_guest_debug,
};
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};

use super::MprotectMode;
use super::snippets::*;
use super::tiny::{ProbeVm, Watchdog};
use crate::error::VmError;
use crate::memory::{GuestRam, register_slot};
use crate::run_area::Exit;
use crate::window::RemapWindow;

/// Longest a probe vCPU may run before the watchdog stops it.
const RUN_LIMIT: Duration = Duration::from_millis(500);

/// What every probe needs.
pub struct ProbeEnv {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// Supported CPUID.
    pub cpuid: CpuId,
    /// The watchdog.
    pub wd: Watchdog,
}

/// A finding and what was seen.
pub type Finding<T> = Result<(T, String), VmError>;

fn describe(r: &Result<Exit, kvm_ioctls::Error>) -> String {
    match r {
        Ok(Exit::Interrupted) => "no exit within the deadline (vCPU kicked)".into(),
        Ok(e) => format!("{e:?}"),
        Err(e) => format!("KVM_RUN error: {e}"),
    }
}

/// PIO `out` data of the exit, as a little-endian u32 (0 when absent).
fn out_value(vm: &mut ProbeVm, exit: &Exit) -> Option<(u16, u32)> {
    if let Exit::Io {
        port,
        out: true,
        size,
        count: 1,
        data_offset,
    } = *exit
    {
        let data = vm.vcpu.area.io_data(data_offset, usize::from(size))?;
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        return Some((port, u32::from_le_bytes(v)));
    }
    None
}

fn set_debug(vm: &ProbeVm, control: u32, debugreg: [u64; 8]) -> Result<(), VmError> {
    let mut dbg = kvm_guest_debug {
        control,
        ..Default::default()
    };
    dbg.arch.debugreg = debugreg;
    vm.vcpu
        .fd
        .set_guest_debug(&dbg)
        .map_err(VmError::kvm("set guest debug"))
}

fn no_setup(_: &kvm_ioctls::VmFd, _: &GuestRam) -> Result<(), VmError> {
    Ok(())
}

/// int3 with KVM_GUESTDBG_USE_SW_BP: does it reach userspace as KVM_EXIT_DEBUG (#BP)?
pub fn sw_breakpoints(env: &ProbeEnv) -> Finding<bool> {
    let mut vm = ProbeVm::new(&env.kvm, &env.cpuid, INT3, no_setup)?;
    set_debug(&vm, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, [0; 8])?;
    let r = vm.run_to_exit(&env.wd, RUN_LIMIT);
    Ok(match r {
        Ok(Exit::Debug {
            exception: 3, pc, ..
        }) => (true, format!("KVM_EXIT_DEBUG #BP at {pc:#x}")),
        Ok(Exit::EmulationFailure { .. }) => (
            false,
            "int3 at CPL0 → emulation failure (KVM_EXIT_INTERNAL_ERROR)".into(),
        ),
        Ok(Exit::Shutdown) => (false, "#BP delivered to the guest (shutdown)".into()),
        other => (false, describe(&other)),
    })
}

/// Hardware exec breakpoints on four consecutive instructions: how many fire (DR0–DR3), and
/// does resuming with RFLAGS.RF step over a hit (else: disable, single-step, re-enable)?
pub fn hw_breakpoints(env: &ProbeEnv) -> Finding<(u32, bool)> {
    let mut vm = ProbeVm::new(&env.kvm, &env.cpuid, FOUR_NOPS, no_setup)?;
    let mut dr = [0u64; 8];
    for (i, d) in dr.iter_mut().take(4).enumerate() {
        *d = CODE_GPA + i as u64;
    }
    // L0..L3 enabled, exec (RW=00), length 1 (LEN=00); bit 10 is reserved-one.
    dr[7] = 0x455;
    let armed = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    set_debug(&vm, armed, dr)?;
    let mut hits: Vec<u64> = Vec::new();
    let mut rf_works = None;
    for _ in 0..12 {
        let r = vm.run_to_exit(&env.wd, RUN_LIMIT);
        match r {
            Ok(Exit::Debug {
                exception: 1, pc, ..
            }) => {
                if hits.last() == Some(&pc) {
                    // RF did not step over the hit: step over with breakpoints disabled.
                    rf_works = Some(false);
                    let mut off = dr;
                    off[7] = 0x400;
                    set_debug(&vm, armed | KVM_GUESTDBG_SINGLESTEP, off)?;
                    let step = vm.run_to_exit(&env.wd, RUN_LIMIT);
                    if !matches!(step, Ok(Exit::Debug { exception: 1, .. })) {
                        return Ok(((count_in_order(&hits), false), describe(&step)));
                    }
                    set_debug(&vm, armed, dr)?;
                    continue;
                }
                if hits.len() == 1 && rf_works.is_none() {
                    rf_works = Some(true);
                }
                hits.push(pc);
                // Try to resume over the breakpoint with RFLAGS.RF (through sync_regs).
                vm.vcpu.area.regs_mut().rflags |= 1 << 16;
            }
            Ok(Exit::Io {
                port: DONE_PORT, ..
            }) => break,
            other => {
                let n = count_in_order(&hits);
                return Ok(((n, false), format!("{n} fired, then {}", describe(&other))));
            }
        }
    }
    let n = count_in_order(&hits);
    let rf = rf_works.unwrap_or(false);
    let pcs: Vec<String> = hits.iter().map(|p| format!("{p:#x}")).collect();
    let how = if rf {
        "resumed with RFLAGS.RF"
    } else {
        "RF ignored: resumed by disable + single-step + re-enable"
    };
    Ok((
        (n, rf),
        format!("KVM_EXIT_DEBUG #DB at [{}]; {how}", pcs.join(", ")),
    ))
}

fn count_in_order(hits: &[u64]) -> u32 {
    hits.iter()
        .enumerate()
        .take_while(|(i, pc)| **pc == CODE_GPA + *i as u64)
        .count() as u32
}

/// KVM_GUESTDBG_SINGLESTEP: one KVM_EXIT_DEBUG per instruction with the next rip?
pub fn single_step(env: &ProbeEnv) -> Finding<bool> {
    let mut vm = ProbeVm::new(&env.kvm, &env.cpuid, FOUR_NOPS, no_setup)?;
    set_debug(&vm, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, [0; 8])?;
    let mut pcs = Vec::new();
    for _ in 0..8 {
        match vm.run_to_exit(&env.wd, RUN_LIMIT) {
            Ok(Exit::Debug {
                exception: 1, pc, ..
            }) => pcs.push(pc),
            Ok(Exit::Io {
                port: DONE_PORT, ..
            }) => break,
            other => return Ok((false, describe(&other))),
        }
    }
    let expect: Vec<u64> = (1..=4).map(|i| CODE_GPA + i).collect();
    let ok = pcs.len() >= 4 && pcs[..4] == expect[..];
    Ok((ok, format!("{} steps, rips {:x?}", pcs.len(), pcs)))
}

/// MSR filter denying writes to 0x174 with USER_SPACE_MSR=FILTER: KVM_EXIT_X86_WRMSR?
pub fn msr_filter(env: &ProbeEnv) -> Finding<bool> {
    let setup = |vm: &kvm_ioctls::VmFd, _: &GuestRam| {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
        vm.enable_cap(&cap)
            .map_err(VmError::kvm("enable USER_SPACE_MSR"))?;
        let bitmap = [0u8; 1];
        let range = MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: 0x174,
            msr_count: 1,
            bitmap: &bitmap,
        };
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
            .map_err(VmError::kvm("set MSR filter"))
    };
    let mut vm = match ProbeVm::new(&env.kvm, &env.cpuid, WRMSR_SYSENTER_CS, setup) {
        Ok(vm) => vm,
        Err(e) => return Ok((false, e.to_string())),
    };
    let first = vm.run_to_exit(&env.wd, RUN_LIMIT);
    match first {
        Ok(Exit::Wrmsr {
            index: 0x174,
            reason,
            ..
        }) if reason == KVM_MSR_EXIT_REASON_FILTER => {
            *vm.vcpu.area.msr_reply().0 = 0;
            let next = vm.run_to_exit(&env.wd, RUN_LIMIT);
            match next {
                Ok(Exit::Io {
                    port: DONE_PORT, ..
                }) => Ok((
                    true,
                    "wrmsr 0x174 → KVM_EXIT_X86_WRMSR reason FILTER, guest resumed".into(),
                )),
                other => Ok((false, format!("WRMSR exit, then {}", describe(&other)))),
            }
        }
        other => Ok((false, describe(&other))),
    }
}

/// A write to a KVM_MEM_READONLY slot: MMIO exit carrying the data; reads do not exit.
pub fn ro_slot(env: &ProbeEnv) -> Finding<bool> {
    let backing = GuestRam::new("kvmi-probe-ro", 0x1000)?;
    backing.write(0, &0xa5a5_a5a5u32.to_le_bytes())?;
    let setup = |vm: &kvm_ioctls::VmFd, _: &GuestRam| {
        // SAFETY: `backing` outlives the probe VM (declared before it in this function).
        unsafe {
            register_slot(
                vm,
                1,
                SLOT_GPA,
                backing.host_base(),
                0x1000,
                KVM_MEM_READONLY,
            )
        }
    };
    let mut vm = ProbeVm::new(&env.kvm, &env.cpuid, RO_SLOT, setup)?;
    let read = vm.run_to_exit(&env.wd, RUN_LIMIT);
    let read_ok = match read {
        Ok(ref e) => out_value(&mut vm, e) == Some((DONE_PORT, 0xa5a5_a5a5)),
        Err(_) => false,
    };
    if !read_ok {
        return Ok((false, format!("read from RO slot: {}", describe(&read))));
    }
    let write = vm.run_to_exit(&env.wd, RUN_LIMIT);
    match write {
        Ok(Exit::Mmio {
            addr: SLOT_GPA,
            write: true,
            len: 4,
        }) => {
            let data = vm.vcpu.area.mmio_data(4).to_vec();
            let ok =
                data == RO_WRITE_VALUE.to_le_bytes() && backing.read_u64(0)? as u32 == 0xa5a5_a5a5;
            let after = vm.run_to_exit(&env.wd, RUN_LIMIT);
            let resumed = matches!(
                after,
                Ok(Exit::Io {
                    port: NEXT_PORT,
                    ..
                })
            );
            Ok((
                ok && resumed,
                format!("write → MMIO exit with data {data:02x?}, reads no exit"),
            ))
        }
        other => Ok((false, format!("write to RO slot: {}", describe(&other)))),
    }
}

/// mprotect(PROT_READ) on a page of normal guest RAM, then a guest write: which mode?
pub fn mprotect_trap(env: &ProbeEnv) -> Finding<MprotectMode> {
    let mut vm = ProbeVm::new(&env.kvm, &env.cpuid, TWO_WRITES, no_setup)?;
    let first = vm.run_to_exit(&env.wd, RUN_LIMIT);
    if !matches!(
        first,
        Ok(Exit::Io {
            port: DONE_PORT,
            ..
        })
    ) {
        return Ok((
            MprotectMode::Failed,
            format!("first write: {}", describe(&first)),
        ));
    }
    vm.ram.protect(DATA_GPA, 0x1000, libc::PROT_READ)?;
    let second = vm.run_to_exit(&env.wd, RUN_LIMIT);
    let found = match second {
        Ok(Exit::Mmio {
            addr: DATA_GPA,
            write: true,
            len,
        }) => {
            let data = vm.vcpu.area.mmio_data(len).to_vec();
            (
                MprotectMode::MmioExit,
                format!("write → MMIO exit with data {data:02x?} (emulated, rip advanced)"),
            )
        }
        Ok(Exit::MemoryFault { gpa, .. }) => (
            MprotectMode::MemoryFault,
            format!("write → KVM_EXIT_MEMORY_FAULT at {gpa:#x}"),
        ),
        Err(e) if e.errno() == libc::EFAULT => {
            (MprotectMode::Efault, "write → KVM_RUN -EFAULT".into())
        }
        Ok(Exit::Io {
            port: NEXT_PORT, ..
        }) => (
            MprotectMode::NotTrapped,
            "write completed without an exit".into(),
        ),
        other => (MprotectMode::Failed, describe(&other)),
    };
    vm.ram
        .protect(DATA_GPA, 0x1000, libc::PROT_READ | libc::PROT_WRITE)?;
    Ok(found)
}

/// VM A writes a marker into its RAM; that memfd page is mmap'ed (MAP_FIXED) over VM B's
/// window; B's vCPU reads it.
pub fn memfd_remap(env: &ProbeEnv) -> Finding<bool> {
    let window = RemapWindow::new(0x1000)?;
    let mut a = ProbeVm::new(&env.kvm, &env.cpuid, WRITE_MARKER, no_setup)?;
    let setup = |vm: &kvm_ioctls::VmFd, _: &GuestRam| {
        // SAFETY: `window` outlives VM B (declared before it in this function).
        unsafe { register_slot(vm, 1, SLOT_GPA, window.host_base(), window.len(), 0) }
    };
    let mut b = ProbeVm::new(&env.kvm, &env.cpuid, READ_WINDOW, setup)?;
    let wrote = a.run_to_exit(&env.wd, RUN_LIMIT);
    if !matches!(
        wrote,
        Ok(Exit::Io {
            port: DONE_PORT,
            ..
        })
    ) {
        return Ok((false, format!("VM A: {}", describe(&wrote))));
    }
    window.map_shared(0, a.ram.memfd(), DATA_GPA, 0x1000)?;
    let read = b.run_to_exit(&env.wd, RUN_LIMIT);
    let seen = match read {
        Ok(ref e) => out_value(&mut b, e),
        Err(_) => None,
    };
    match seen {
        Some((DONE_PORT, v)) if v == REMAP_MARKER => Ok((
            true,
            format!("VM B read {v:#x} written by VM A, no ioctl on B"),
        )),
        Some((_, v)) => Ok((
            false,
            format!("VM B read {v:#x}, expected {REMAP_MARKER:#x}"),
        )),
        None => Ok((false, format!("VM B: {}", describe(&read)))),
    }
}

/// Dirty logging of a memslot: the guest writes one page, the log is fetched (and cleared),
/// the guest writes a second page; the second fetch must hold exactly that page, a third
/// (with no guest run between) nothing.
pub fn dirty_log(env: &ProbeEnv) -> Finding<bool> {
    let setup =
        |vm: &kvm_ioctls::VmFd, ram: &GuestRam| ram.register_at(vm, 0, 0, KVM_MEM_LOG_DIRTY_PAGES);
    let mut vm = ProbeVm::new(&env.kvm, &env.cpuid, TWO_PAGES, setup)?;
    let size = vm.ram.size() as usize;
    let fetch = |vm: &ProbeVm| -> Result<Vec<u64>, VmError> {
        let bits = vm
            .vm
            .get_dirty_log(0, size)
            .map_err(VmError::kvm("get dirty log"))?;
        Ok(crate::dirty::DirtyBitmap::from_words(bits, size as u64)
            .pages()
            .map(|p| p * crate::memory::PAGE_SIZE)
            .collect())
    };
    let list = |pages: &[u64]| {
        let v: Vec<String> = pages.iter().map(|p| format!("{p:#x}")).collect();
        format!("[{}]", v.join(" "))
    };
    let first = vm.run_to_exit(&env.wd, RUN_LIMIT);
    if !matches!(
        first,
        Ok(Exit::Io {
            port: DONE_PORT,
            ..
        })
    ) {
        return Ok((false, format!("first write: {}", describe(&first))));
    }
    let a = fetch(&vm)?;
    let second = vm.run_to_exit(&env.wd, RUN_LIMIT);
    if !matches!(
        second,
        Ok(Exit::Io {
            port: NEXT_PORT,
            ..
        })
    ) {
        return Ok((false, format!("second write: {}", describe(&second))));
    }
    let b = fetch(&vm)?;
    let c = fetch(&vm)?;
    let works = a.contains(&DATA_GPA) && b == [DIRTY_GPA] && c.is_empty();
    Ok((
        works,
        format!(
            "write {DATA_GPA:#x} → log {}, write {DIRTY_GPA:#x} → {}, refetch → {}",
            list(&a),
            list(&b),
            list(&c)
        ),
    ))
}

/// Times a CPL0 loop: nanoseconds per iteration (emulated ≈ 1000, native < 1).
pub fn cpl0_timing(env: &ProbeEnv) -> Finding<f64> {
    const ITERS: u64 = 4096;
    let mut vm = ProbeVm::new(&env.kvm, &env.cpuid, COUNT_DOWN, no_setup)?;
    let mut best = [Duration::MAX; 2];
    for _round in 0..3 {
        for (slot, n) in [0u64, ITERS].into_iter().enumerate() {
            {
                let regs = vm.vcpu.area.regs_mut();
                regs.rip = CODE_GPA;
                regs.rcx = n;
                regs.rflags = 0x2;
            }
            let t = Instant::now();
            let r = vm.run_to_exit(&env.wd, RUN_LIMIT);
            let dt = t.elapsed();
            if !matches!(
                r,
                Ok(Exit::Io {
                    port: DONE_PORT,
                    ..
                })
            ) {
                return Ok((0.0, format!("timing loop: {}", describe(&r))));
            }
            best[slot] = best[slot].min(dt);
        }
    }
    let per = best[1].saturating_sub(best[0]).as_nanos() as f64 / ITERS as f64;
    Ok((
        per,
        format!("{per:.1} ns per loop iteration (2 instructions)"),
    ))
}
