//! A VM: guest RAM, the loaded image, boot state, vCPU threads, and the run with its limits.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar};
use std::time::{Duration, Instant};

use hypercall::boot::{BOOT_INFO_ADDR, BootInfo, IDENTITY_MAP_BYTES};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};

use crate::devices::{Devices, SerialSink, UnknownIoPolicy};
use crate::dispatch::Dispatcher;
use crate::error::VmError;
use crate::hook::{ExitHook, NoHook};
use crate::kick::{VcpuControl, install_kick_handler};
use crate::layout::{write_boot_info, write_boot_tables};
use crate::loader::{LoadedImage, load_image};
use crate::memory::{GuestRam, register_slot};
use crate::outcome::RunOutcome;
use crate::running::{RunShared, RunningVm};
use crate::vcpu::{PreparedVcpu, create_vcpu, spawn_vcpu_thread};
use crate::window::RemapWindow;
use zerocopy::IntoBytes;

/// Most vCPUs a VM may have here.
pub const MAX_VCPUS: u32 = 64;

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name of the memfd (shows in /proc/PID/fd).
    pub name: String,
    /// Guest RAM in bytes (multiple of 4 KiB, at least 2 MiB, at most the host's RAM + swap:
    /// see [`host_memory_bytes`]).
    pub memory_bytes: u64,
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u32,
    /// The guest command line (`key=value` words).
    pub cmdline: String,
    /// What to do with I/O no device claims.
    pub unknown_io: UnknownIoPolicy,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "guest-ram".to_string(),
            memory_bytes: 64 << 20,
            vcpus: 1,
            cmdline: String::new(),
            unknown_io: UnknownIoPolicy::Ignore,
        }
    }
}

/// Limits of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunLimits {
    /// Wall-clock limit; on expiry every vCPU is kicked and the run ends TimedOut.
    pub timeout: Option<Duration>,
    /// A flag (e.g. set by a SIGINT handler) that ends the run as Interrupted.
    pub interrupt: Option<&'static AtomicBool>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: RunOutcome,
    /// Wall-clock time from start to the end of the last vCPU.
    pub elapsed: Duration,
    /// Exits handled per vCPU.
    pub exits: Vec<u64>,
    /// vCPU threads that did not stop within the grace period (left detached).
    pub stuck_vcpus: u32,
}

/// A built VM, ready to start.
pub struct Vm {
    // vCPUs first: dropped before the VM fd and RAM.
    vcpus: Vec<PreparedVcpu>,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    image: LoadedImage,
    boot_info: BootInfo,
    config: VmConfig,
    hook: Arc<dyn ExitHook>,
    serial: SerialSink,
    extra_ram: Vec<Arc<GuestRam>>,
    windows: Vec<Arc<RemapWindow>>,
    /// Guest-physical ranges of the extra slots (start, end).
    extra_ranges: Vec<(u64, u64)>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("image", &self.image)
            .finish()
    }
}

impl Vm {
    /// Builds a VM from `image` (a static ELF per `hypercall::boot`): RAM memfd as slot 0,
    /// image loaded, boot tables and BootInfo written, vCPUs created in the entry state.
    pub fn new(config: VmConfig, image: &[u8]) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "vCPU count {} must be 1..={MAX_VCPUS}",
                config.vcpus
            )));
        }
        if config.memory_bytes < (2 << 20) {
            return Err(VmError::Config(format!(
                "guest RAM {:#x} is below the 2 MiB minimum",
                config.memory_bytes
            )));
        }
        check_host_memory(config.memory_bytes)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::kvm("create VM"))?;
        let ram = GuestRam::new(&config.name, config.memory_bytes)?;
        ram.register(&fd, 0)?;
        let loaded = load_image(&ram, image)?;
        write_boot_tables(&ram)?;
        let boot_info = write_boot_info(&ram, config.vcpus, loaded.end, &config.cmdline)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::kvm("get supported CPUID"))?;
        let vcpus = (0..config.vcpus)
            .map(|i| create_vcpu(&fd, &supported, i, loaded.entry))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(
            entry = format_args!("{:#x}", loaded.entry),
            image_end = format_args!("{:#x}", loaded.end),
            vcpus = config.vcpus,
            ram_mib = config.memory_bytes >> 20,
            "VM built"
        );
        Ok(Vm {
            vcpus,
            fd: Arc::new(fd),
            ram: Arc::new(ram),
            image: loaded,
            boot_info,
            config,
            hook: Arc::new(NoHook),
            serial: SerialSink::Stdout,
            extra_ram: Vec::new(),
            windows: Vec::new(),
            extra_ranges: Vec::new(),
        })
    }

    /// Guest RAM (memfd-backed; see [`GuestRam`]).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM fd (memslots, MSR filter, ioeventfds).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Where the loader put the image.
    pub fn image(&self) -> LoadedImage {
        self.image
    }

    /// The BootInfo record written for the guest.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot_info
    }

    /// The vCPUs (before start), e.g. to set guest debug state.
    pub fn vcpus_mut(&mut self) -> &mut [PreparedVcpu] {
        &mut self.vcpus
    }

    /// The guest's TSC frequency in kHz (KVM_GET_TSC_KHZ of vCPU 0), if KVM reports it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.vcpus.first()?.fd.get_tsc_khz().ok()
    }

    /// The installed exit hook (to wrap it, e.g. to time exits around it).
    pub fn hook(&self) -> Arc<dyn ExitHook> {
        self.hook.clone()
    }

    /// Installs the exit hook (default: [`NoHook`]).
    pub fn set_hook(&mut self, hook: Arc<dyn ExitHook>) {
        self.hook = hook;
    }

    /// Sets where serial output goes (default: stdout).
    pub fn set_serial(&mut self, sink: SerialSink) {
        self.serial = sink;
    }

    /// Checks that `gpa..gpa+size` is page-aligned, above RAM, inside the boot identity map
    /// and clear of every other extra region; returns the next free memslot id.
    fn claim_range(&mut self, gpa: u64, size: u64) -> Result<u32, VmError> {
        let end = gpa.saturating_add(size);
        let bad = |why: &str| VmError::Config(format!("extra region {gpa:#x}+{size:#x}: {why}"));
        if size == 0 || !gpa.is_multiple_of(4096) || !size.is_multiple_of(4096) {
            return Err(bad("must be non-empty and page-aligned"));
        }
        if gpa < self.ram.size() || end > IDENTITY_MAP_BYTES {
            return Err(bad(
                "must lie above guest RAM and below the 4 GiB identity map",
            ));
        }
        if self.extra_ranges.iter().any(|&(s, e)| gpa < e && s < end) {
            return Err(bad("overlaps another extra region"));
        }
        self.extra_ranges.push((gpa, end));
        Ok(self.extra_ranges.len() as u32)
    }

    fn rewrite_boot_info(&self) -> Result<(), VmError> {
        self.ram.write(BOOT_INFO_ADDR, self.boot_info.as_bytes())
    }

    /// Adds a memfd-backed region of guest memory at `gpa`, above guest RAM (for memory the
    /// host shares with the guest, such as ring buffers). The returned RAM is the host's view
    /// of it; its memfd can be handed to another process. Nothing is recorded in the boot
    /// record: the caller says where the guest finds it ([`Vm::update_boot_info`]).
    pub fn add_shared_region(
        &mut self,
        name: &str,
        gpa: u64,
        size: u64,
    ) -> Result<Arc<GuestRam>, VmError> {
        let slot = self.claim_range(gpa, size)?;
        let region = Arc::new(GuestRam::new(name, size)?);
        region.register_at(&self.fd, slot, gpa, 0)?;
        self.extra_ram.push(region.clone());
        Ok(region)
    }

    /// Adds a remap window at `gpa`: placeholder pages reading as zero, later replaced by
    /// pages of other memfds (another VM's RAM) with [`RemapWindow::map_shared`]. Like
    /// [`Vm::add_shared_region`], it records nothing in the boot record.
    pub fn add_remap_window(&mut self, gpa: u64, size: u64) -> Result<Arc<RemapWindow>, VmError> {
        let slot = self.claim_range(gpa, size)?;
        let window = Arc::new(RemapWindow::new(size)?);
        // SAFETY: the window is kept alive by this Vm (and then by the RunningVm) until after
        // the VM fd is dropped.
        unsafe { register_slot(&self.fd, slot, gpa, window.host_base(), size, 0)? };
        self.windows.push(window.clone());
        Ok(window)
    }

    /// Edits the boot record the guest reads at its entry (for example to tell it where an
    /// extra region lies) and writes it back to guest memory.
    pub fn update_boot_info(&mut self, edit: impl FnOnce(&mut BootInfo)) -> Result<(), VmError> {
        edit(&mut self.boot_info);
        self.rewrite_boot_info()
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, VmError> {
        install_kick_handler();
        let n = self.vcpus.len();
        let shared = Arc::new(RunShared {
            outcome: crate::sync::RankedMutex::new(crate::sync::vmm_ranks::OUTCOME, None),
            changed: Condvar::new(),
            live: AtomicU32::new(0),
            controls: (0..n).map(|_| Arc::new(VcpuControl::new())).collect(),
            vm_fd: self.fd.clone(),
            ram: self.ram.clone(),
        });
        let exits: Arc<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let dispatcher = Arc::new(Dispatcher {
            devices: Devices::new(self.serial),
            hook: self.hook,
            policy: self.config.unknown_io,
            ram: self.ram.clone(),
            doorbell_warned: AtomicBool::new(false),
        });
        let started = Instant::now();
        let mut threads = Vec::with_capacity(n);
        for vcpu in self.vcpus {
            let control = shared.controls[vcpu.index as usize].clone();
            let s = shared.clone();
            shared.live.fetch_add(1, Ordering::SeqCst);
            let spawned = spawn_vcpu_thread(
                vcpu,
                control,
                dispatcher.clone(),
                exits.clone(),
                move |ending| {
                    if let Some(o) = ending {
                        s.finish(o);
                    }
                    s.vcpu_done();
                },
            );
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.finish(RunOutcome::Interrupted);
                    shared.live.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(RunningVm {
            shared,
            threads,
            started,
            exits,
            _fd: self.fd,
            _ram: self.ram,
            _extra_ram: self.extra_ram,
            _windows: self.windows,
        })
    }

    /// Starts the VM and waits for its end within `limits`.
    pub fn run(self, limits: RunLimits) -> Result<RunReport, VmError> {
        Ok(self.start()?.wait(limits))
    }
}

/// The most guest RAM a VM may have on this host: its physical RAM plus swap (`sysinfo(2)`:
/// `totalram + totalswap`, the `MemTotal` and `SwapTotal` of `/proc/meminfo`); `None` if the
/// kernel does not say.
///
/// Guest RAM is a memfd that the host fills only as the guest touches it, so a larger guest
/// would boot, but nothing could back it once the guest used its memory: [`Vm::new`] refuses
/// it up front instead. (Several VMs may still add up to more than the host has; this bounds
/// one VM, not the sum.)
pub fn host_memory_bytes() -> Option<u64> {
    // SAFETY: a zeroed `sysinfo` is valid; the kernel fills it in and keeps no pointer.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `sysinfo`.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    // `c_ulong` is u64 on the 64-bit hosts this VMM runs on; the generic keeps that implicit.
    fn wide(v: impl Into<u64>) -> u64 {
        v.into()
    }
    let unit = wide(info.mem_unit.max(1));
    let ram = wide(info.totalram).saturating_mul(unit);
    let swap = wide(info.totalswap).saturating_mul(unit);
    Some(ram.saturating_add(swap))
}

/// Refuses guest RAM of `bytes` when it exceeds [`host_memory_bytes`].
fn check_host_memory(bytes: u64) -> Result<(), VmError> {
    check_memory_against(bytes, host_memory_bytes())
}

fn check_memory_against(bytes: u64, host: Option<u64>) -> Result<(), VmError> {
    let Some(host) = host else {
        tracing::warn!("sysinfo failed: guest RAM is not checked against the host's memory");
        return Ok(());
    };
    if bytes > host {
        return Err(VmError::Config(format!(
            "guest RAM of {} MiB is more than this host's RAM + swap ({} MiB)",
            bytes >> 20,
            host >> 20
        )));
    }
    Ok(())
}

/// Builds and runs a VM to its end: the one-call API for tools and tests.
pub fn run_image(
    config: VmConfig,
    image: &[u8],
    serial: SerialSink,
    limits: RunLimits,
) -> Result<RunReport, VmError> {
    let mut vm = Vm::new(config, image)?;
    vm.set_serial(serial);
    vm.run(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_beyond_the_hosts_ram_and_swap_is_refused() {
        let host = host_memory_bytes().expect("sysinfo works on Linux");
        assert!(host >= 64 << 20, "{host} bytes of RAM + swap");
        assert!(check_host_memory(64 << 20).is_ok());
        assert!(check_host_memory(host).is_ok());
        let err = check_host_memory(host + (1 << 20)).unwrap_err().to_string();
        assert!(err.contains("is more than this host's RAM + swap"), "{err}");
        // 4000000 MiB on a 23 GiB host: the message names both sizes.
        let err = check_memory_against(4_000_000 << 20, Some(23 << 30))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: guest RAM of 4000000 MiB is more than this host's RAM + \
             swap (23552 MiB)"
        );
        assert!(check_memory_against(u64::MAX, None).is_ok());
    }
}
