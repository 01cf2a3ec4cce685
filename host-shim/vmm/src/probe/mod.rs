//! The capability probe: tiny VMs that find out what this host's KVM delivers to a userspace
//! introspector (breakpoints, single step, MSR filter, write traps, page sharing), so that
//! nothing is assumed. See `docs/platform.md` for what each probe yields on PVM and upstream.

mod checks;
pub mod snippets;
pub mod tiny;

use std::fmt;
use std::sync::OnceLock;
use std::time::Instant;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};

use crate::error::VmError;
use checks::ProbeEnv;
use tiny::Watchdog;

/// What a guest write to a host-`mprotect(PROT_READ)`ed page of normal guest RAM does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MprotectMode {
    /// KVM emulates the write and exits with KVM_EXIT_MMIO carrying the data (PVM).
    MmioExit,
    /// KVM_RUN fails with -EFAULT and KVM_EXIT_MEMORY_FAULT (upstream with MEMORY_FAULT_INFO).
    MemoryFault,
    /// KVM_RUN fails with -EFAULT and no exit information (upstream without it).
    Efault,
    /// The write went through: mprotect does not trap here.
    NotTrapped,
    /// The probe failed (see the detail).
    Failed,
}

impl fmt::Display for MprotectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MprotectMode::MmioExit => "mmio-exit",
            MprotectMode::MemoryFault => "memory-fault",
            MprotectMode::Efault => "efault",
            MprotectMode::NotTrapped => "not-trapped",
            MprotectMode::Failed => "failed",
        })
    }
}

/// What this host's KVM can do for the introspector, as measured by running probe guests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// KVM_GET_API_VERSION.
    pub kvm_api_version: i32,
    /// Whether the kernel module is PVM (`/sys/module/kvm_pvm` exists).
    pub pvm_module: bool,
    /// seccomp-BPF filtering with the kill-process action ([`crate::seccomp::probe`]).
    #[serde(default)]
    pub seccomp: crate::seccomp::Availability,
    /// int3 with KVM_GUESTDBG_USE_SW_BP reaches userspace as KVM_EXIT_DEBUG.
    pub sw_breakpoints: bool,
    /// Hardware exec breakpoints that fired (0..=4).
    pub hw_breakpoints: u32,
    /// Resuming with RFLAGS.RF steps over a breakpoint hit (PVM: no at CPL0; then disable the
    /// breakpoint, single-step and re-enable).
    pub hw_breakpoint_rf_resume: bool,
    /// KVM_GUESTDBG_SINGLESTEP gives one exit per instruction.
    pub single_step: bool,
    /// KVM_X86_SET_MSR_FILTER + USER_SPACE_MSR deliver KVM_EXIT_X86_WRMSR.
    pub msr_write_filter: bool,
    /// A write to a read-only memslot exits as MMIO with the data.
    pub ro_slot_write_trap: bool,
    /// What a guest write to an mprotect(PROT_READ) page does.
    pub mprotect_write_trap: MprotectMode,
    /// A page of VM A's memfd mapped with MAP_FIXED over VM B's window is seen by B.
    pub memfd_remap: bool,
    /// Guest CPL0 code is emulated (slow), judged by timing.
    pub cpl0_emulated: bool,
    /// Measured nanoseconds per CPL0 loop iteration.
    pub cpl0_ns_per_iteration: f64,
    /// KVM_CAP_SYNC_REGS mask.
    pub sync_regs: u32,
    /// KVM_CAP_IMMEDIATE_EXIT.
    pub immediate_exit: bool,
    /// KVM_GET_DIRTY_LOG reports exactly the pages a guest wrote and a fetch clears it
    /// (measured; live dumps fall back to pause-and-copy without it).
    #[serde(default)]
    pub dirty_log: bool,
    /// KVM_CAP_DIRTY_LOG_RING is offered (its ring size in bytes; 0 = not offered).
    #[serde(default)]
    pub dirty_log_ring: u32,
    /// The host's shmem transparent-huge-page mode (`shmem_enabled`): with `advise` or wider,
    /// 2 MiB map-window grants are first touched with one fault instead of 512.
    #[serde(default)]
    pub shmem_huge_pages: Option<String>,
    /// One line per probe: what was observed.
    pub details: Vec<(String, String)>,
    /// Wall-clock time of the whole probe in microseconds.
    pub probe_micros: u64,
}

/// A guest loop iteration slower than this is emulated (native: < 1 ns, PVM: ~1000 ns).
const EMULATED_NS_THRESHOLD: f64 = 50.0;

impl Capabilities {
    /// The table `kvmi caps` prints.
    pub fn table(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        let rows: Vec<(&str, String, &str)> = vec![
            (
                "software breakpoints (int3)",
                yn(self.sw_breakpoints).into(),
                "sw_breakpoints",
            ),
            (
                "hardware exec breakpoints",
                self.hw_breakpoints.to_string(),
                "hw_breakpoints",
            ),
            (
                "breakpoint resume with RF",
                yn(self.hw_breakpoint_rf_resume).into(),
                "-",
            ),
            ("single step", yn(self.single_step).into(), "single_step"),
            (
                "MSR write filter",
                yn(self.msr_write_filter).into(),
                "msr_write_filter",
            ),
            (
                "read-only slot write trap",
                yn(self.ro_slot_write_trap).into(),
                "ro_slot",
            ),
            (
                "mprotect write trap",
                self.mprotect_write_trap.to_string(),
                "mprotect",
            ),
            (
                "memfd remap between VMs",
                yn(self.memfd_remap).into(),
                "memfd_remap",
            ),
            ("guest CPL0 emulated", yn(self.cpl0_emulated).into(), "cpl0"),
            (
                // PVM walks page tables and delivers events through the RAM mapping and does
                // not single-step CPL3 code: the engine refuses restrictions on what it walks
                // and steps CPL3 instructions at CPL0 (docs/platform.md).
                "restrict page tables/trap stacks",
                if self.pvm_module {
                    "refused"
                } else {
                    "allowed"
                }
                .into(),
                "-",
            ),
            ("dirty logging", yn(self.dirty_log).into(), "dirty_log"),
            (
                "dirty log ring",
                if self.dirty_log_ring > 0 {
                    format!("{} KiB", self.dirty_log_ring / 1024)
                } else {
                    "no".into()
                },
                "dirty_log_ring",
            ),
            (
                "shmem huge pages (window)",
                self.shmem_huge_pages
                    .as_deref()
                    .unwrap_or("unavailable")
                    .into(),
                "shmem_huge_pages",
            ),
        ];
        let mut out = format!("{:<30} {:<12} {}\n", "capability", "value", "observed");
        for (name, value, key) in rows {
            let detail = self
                .details
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, d)| d.as_str())
                .unwrap_or("");
            out.push_str(&format!("{name:<30} {value:<12} {detail}\n"));
        }
        out.push_str(&format!(
            "{:<30} {:<12} {}\n",
            "seccomp filters",
            yn(self.seccomp.available),
            self.seccomp.observed()
        ));
        out.push_str(&format!(
            "{:<30} {:<12} KVM API {}, PVM module {}, sync_regs {:#x}, immediate_exit {}\n",
            "probe time",
            format!("{} ms", self.probe_micros / 1000),
            self.kvm_api_version,
            yn(self.pvm_module),
            self.sync_regs,
            yn(self.immediate_exit),
        ));
        out
    }
}

fn record<T>(
    details: &mut Vec<(String, String)>,
    key: &str,
    finding: Result<(T, String), VmError>,
    fallback: T,
) -> T {
    match finding {
        Ok((v, d)) => {
            details.push((key.to_string(), d));
            v
        }
        Err(e) => {
            details.push((key.to_string(), format!("probe failed: {e}")));
            fallback
        }
    }
}

/// Probes once per process and shares the result with every later caller (the probe runs
/// tiny VMs; an introspector and tests need the answer many times).
pub fn cached_capabilities() -> Result<&'static Capabilities, String> {
    static CAPS: OnceLock<Result<Capabilities, String>> = OnceLock::new();
    CAPS.get_or_init(|| probe_capabilities().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs every probe (a few tiny VMs, each vCPU kicked if it does not exit within its
/// deadline) and returns what this host delivers.
pub fn probe_capabilities() -> Result<Capabilities, VmError> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::kvm("get supported CPUID"))?;
    let env = ProbeEnv {
        kvm,
        cpuid,
        wd: Watchdog::start()?,
    };
    let mut d = Vec::new();
    let sw_breakpoints = record(
        &mut d,
        "sw_breakpoints",
        checks::sw_breakpoints(&env),
        false,
    );
    let (hw_breakpoints, hw_breakpoint_rf_resume) = record(
        &mut d,
        "hw_breakpoints",
        checks::hw_breakpoints(&env),
        (0, false),
    );
    let single_step = record(&mut d, "single_step", checks::single_step(&env), false);
    let msr_write_filter = record(&mut d, "msr_write_filter", checks::msr_filter(&env), false);
    let ro_slot_write_trap = record(&mut d, "ro_slot", checks::ro_slot(&env), false);
    let mprotect_write_trap = record(
        &mut d,
        "mprotect",
        checks::mprotect_trap(&env),
        MprotectMode::Failed,
    );
    let memfd_remap = record(&mut d, "memfd_remap", checks::memfd_remap(&env), false);
    let ns = record(&mut d, "cpl0", checks::cpl0_timing(&env), 0.0);
    let dirty_log = record(&mut d, "dirty_log", checks::dirty_log(&env), false);
    let ring = env.kvm.check_extension_int(Cap::DirtyLogRing);
    let dirty_log_ring = u32::try_from(ring).unwrap_or(0);
    d.push((
        "dirty_log_ring".into(),
        format!("KVM_CAP_DIRTY_LOG_RING = {ring} (not used: the bitmap log suffices)"),
    ));
    let shmem_huge_pages = crate::window::shmem_thp_mode();
    d.push((
        "shmem_huge_pages".into(),
        match shmem_huge_pages.as_deref() {
            Some("advise" | "within_size" | "always" | "force") => {
                "2 MiB grants fault once per 2 MiB".into()
            }
            _ => "first touch faults per 4 KiB page; `echo advise > \
                  /sys/kernel/mm/transparent_hugepage/shmem_enabled` (root) for 2 MiB"
                .into(),
        },
    ));
    Ok(Capabilities {
        kvm_api_version: env.kvm.get_api_version(),
        pvm_module: std::path::Path::new("/sys/module/kvm_pvm").exists(),
        seccomp: crate::seccomp::probe(),
        sw_breakpoints,
        hw_breakpoints,
        hw_breakpoint_rf_resume,
        single_step,
        msr_write_filter,
        ro_slot_write_trap,
        mprotect_write_trap,
        memfd_remap,
        cpl0_emulated: ns > EMULATED_NS_THRESHOLD,
        cpl0_ns_per_iteration: ns,
        sync_regs: env.kvm.check_extension_int(Cap::SyncRegs) as u32,
        immediate_exit: env.kvm.check_extension(Cap::ImmediateExit),
        dirty_log,
        dirty_log_ring,
        shmem_huge_pages,
        details: d,
        probe_micros: started.elapsed().as_micros() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dirty-log probe on this host's KVM: whatever it concludes, its observation must
    /// agree (a "works" answer saw the second page alone after the clearing fetch).
    #[test]
    fn the_dirty_log_probe_reports_what_it_saw() {
        if !crate::kvm_available() {
            assert!(
                std::env::var("KVMI_REQUIRE_KVM").as_deref() != Ok("1"),
                "/dev/kvm is not available and KVMI_REQUIRE_KVM=1"
            );
            eprintln!("SKIPPED: /dev/kvm is not available");
            return;
        }
        let kvm = Kvm::new().unwrap();
        let env = ProbeEnv {
            cpuid: kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap(),
            kvm,
            wd: Watchdog::start().unwrap(),
        };
        let (works, detail) = checks::dirty_log(&env).unwrap();
        eprintln!("dirty log: {works} ({detail})");
        if works {
            assert!(
                detail.contains("write 0x5000 → [0x5000], refetch → []"),
                "{detail}"
            );
        }
    }
}
