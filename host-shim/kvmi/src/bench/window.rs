//! Appliance benchmarks of `kvmi appliance-bench`, as ratios measured in one run on identical
//! targets (test-guest `mode=spin gate=1`, whose memory from [`BenchFigures::from`] on is
//! filled with a pattern before boot, so every page is in use as in a real guest and the
//! bytes read can be checked):
//! - reading target memory through the map window **inside the appliance VM** (the appliance
//!   image in `bench=read` mode: GET_MAP_TOKEN + MAP_RANGE per 512 pages, then reads at CPL3)
//!   against `READ_PHYSICAL` over the KVMI socket (one command per page);
//! - the same window read from the shim's own mapping of the window (no VM: the memory cost
//!   alone, without the appliance's shadow page faults);
//! - the shim's cost per mapped page: one MEM_MAP per page against one MAP_RANGE of 512
//!   pages (both through [`ApplianceHook::call`], the doorbell handler; the VM exit each
//!   call costs in a real appliance, ~5 µs here, comes on top and favours batching more).
//!
//! All three readers must return the same checksum of the bytes, or the run fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypercall::call::{Hypercall, HypercallRegs, MAX_RANGE_PAGES, PAGE_SIZE};

use guest_driver::content_checksum;

use super::vms::{self, ReadLine, TargetEnd};
use appliance_link::hook::ApplianceHook;
use appliance_link::pager::Pager;
use appliance_link::rings::Waker;
use kvmi_client::KvmiClient;
use kvmi_engine::{Endpoint, IntrospectorConfig, start_introspected, temp_socket_path};
use vmm::devices::{SerialSink, UnknownIoPolicy};
use vmm::vm::{RunLimits, Vm, VmConfig};

/// Measured figures of one run.
#[derive(Clone, Debug)]
pub struct BenchFigures {
    /// Bytes read by each method.
    pub bytes: u64,
    /// Where the pattern (and the checksummed bytes) start.
    pub from: u64,
    /// In the appliance VM: tokens and MAP_RANGE calls for `bytes`.
    pub vm_map: Duration,
    /// Of `vm_map`: getting the tokens (GET_MAP_TOKEN round trips on the command ring).
    pub vm_tokens: Duration,
    /// In the appliance VM: the first read of the window (first touch of every page).
    pub vm_read: Duration,
    /// In the appliance VM: the second read.
    pub vm_reread: Duration,
    /// MAP_RANGE calls the appliance made.
    pub vm_map_calls: u64,
    /// The shim's mapping of the window: mapping `bytes` (MAP_RANGE, tokens included).
    pub window_map: Duration,
    /// The shim's mapping of the window: reading `bytes` once mapped.
    pub window_read: Duration,
    /// The shim's mapping of the window: reading `bytes` again.
    pub window_reread: Duration,
    /// Reading `bytes` with READ_PHYSICAL over the socket.
    pub read_physical: Duration,
    /// Shim cost per page with one MEM_MAP per page (token issue included).
    pub single_map_per_page: Duration,
    /// Shim cost per page with one MAP_RANGE of 512 pages (token issue included).
    pub batched_map_per_page: Duration,
    /// The checksum every reader returned ([`guest_driver::content_checksum`] from `from`).
    pub checksum: u64,
    /// The host's shmem THP mode during the run (`never` = every first touch is per page).
    pub shmem_thp: String,
}

impl BenchFigures {
    /// READ_PHYSICAL time / appliance-VM window time (map + first read).
    pub fn window_speedup(&self) -> f64 {
        ratio(self.read_physical, self.vm_map + self.vm_read)
    }

    /// READ_PHYSICAL time / appliance-VM window time of the second read.
    pub fn window_reread_speedup(&self) -> f64 {
        ratio(self.read_physical, self.vm_reread)
    }

    /// Single-page map cost / batched map cost.
    pub fn batching_speedup(&self) -> f64 {
        ratio(self.single_map_per_page, self.batched_map_per_page)
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mib = self.bytes as f64 / (1 << 20) as f64;
        let rate = |d: Duration| mib / d.as_secs_f64().max(1e-9);
        format!(
            "read {mib:.0} MiB of target memory (same checksum {:#018x} from every reader; \
             host shmem THP: {}):\n\
             \x20 appliance VM window, map ({} calls) + first read {:>7.1} + {:>6.1} ms {:>8.1} MiB/s\n\
             \x20 appliance VM window, read again                {:>16.1} ms {:>8.1} MiB/s\n\
             \x20   (of the map time, {:.1} ms getting tokens on the command ring)\n\
             \x20 shim's window mapping, map + first read       {:>7.1} + {:>6.1} ms {:>8.1} MiB/s\n\
             \x20 shim's window mapping, read again             {:>16.1} ms {:>8.1} MiB/s\n\
             \x20 READ_PHYSICAL over the socket                  {:>16.1} ms {:>8.1} MiB/s\n\
             \x20 appliance window / READ_PHYSICAL (map + first read) {:>8.1}x\n\
             \x20 appliance window / READ_PHYSICAL (read again)       {:>8.1}x\n\
             map cost per page (shim side):\n\
             \x20 MEM_MAP, one page per call       {:>9.2} us\n\
             \x20 MAP_RANGE, 512 pages per call    {:>9.2} us\n\
             \x20 batched speedup                  {:>9.1}x\n",
            self.checksum,
            self.shmem_thp,
            self.vm_map_calls,
            ms(self.vm_map),
            ms(self.vm_read),
            rate(self.vm_map + self.vm_read),
            ms(self.vm_reread),
            rate(self.vm_reread),
            ms(self.vm_tokens),
            ms(self.window_map),
            ms(self.window_read),
            rate(self.window_map + self.window_read),
            ms(self.window_reread),
            rate(self.window_reread),
            ms(self.read_physical),
            rate(self.read_physical),
            self.window_speedup(),
            self.window_reread_speedup(),
            us(self.single_map_per_page),
            us(self.batched_map_per_page),
            self.batching_speedup(),
        )
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("appliance bench: {0}")]
pub struct BenchError(String);

fn err(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError(format!("{what}: {e}"))
}

const WINDOW_GPA: u64 = appliance_link::launch::MAP_WINDOW_GPA;
const TOKEN_GPA: u64 = 0x10_0000;

/// The target of every reader: spins on its start gate, so its memory stays still.
const TARGET_CMDLINE: &str = "mode=spin gate=1";

fn vm_config(name: &str, mem: u64, cmdline: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        memory_bytes: mem,
        vcpus: 1,
        cmdline: cmdline.into(),
        unknown_io: UnknownIoPolicy::Ignore,
    }
}

/// A bench target with `bytes` of readable memory, filled from the first MiB boundary after
/// its image (returned) up to `bytes` with [`pattern`].
fn target_vm(image: &[u8], bytes: u64) -> Result<(Vm, u64), BenchError> {
    let mut vm = Vm::new(
        vm_config("bench-target", bytes + (16 << 20), TARGET_CMDLINE),
        image,
    )
    .map_err(|e| err("target")(e.to_string()))?;
    vm.set_serial(SerialSink::Null);
    let from = vm.image().end.next_multiple_of(1 << 20);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for gpa in (from..bytes).step_by(PAGE_SIZE as usize) {
        for (i, word) in page.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&pattern(gpa + 8 * i as u64).to_le_bytes());
        }
        vm.ram()
            .write(gpa, &page)
            .map_err(|e| err("filling the target")(e.to_string()))?;
    }
    Ok((vm, from))
}

/// The word the bench stores at `gpa` (a SplitMix64 step: no two pages alike).
fn pattern(gpa: u64) -> u64 {
    let mut z = gpa.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The checksum of `data` (read from gpa 0) from `from` on.
fn checksum_from(data: &[u8], from: u64) -> u64 {
    content_checksum(0, 0, data.get(from as usize..).unwrap_or_default())
}

/// The appliance VM reads `bytes` of a target through its window.
fn appliance_read(
    target_image: &[u8],
    appliance_image: &[u8],
    bytes: u64,
) -> Result<(ReadLine, f64, u64), BenchError> {
    let (target, from) = target_vm(target_image, bytes)?;
    let run = vms::run::<ReadLine>(
        target,
        appliance_image,
        format!("bench=read mib={} from={from:#x}", bytes >> 20),
        bytes,
        TargetEnd::Stopped,
        |hook| hook,
    )
    .map_err(|e| err("appliance run")(e))?;
    let line = run.line;
    if line.bytes != bytes || line.checksum != line.checksum_again {
        return Err(BenchError(format!(
            "the appliance read {} of {bytes} bytes, checksums {:#x} then {:#x}",
            line.bytes, line.checksum, line.checksum_again
        )));
    }
    Ok((line, run.tsc_hz, from))
}

/// Runs the benchmarks on test-guest (`target_image`) reading `mib` MiB (1..=256) of its
/// memory, with `appliance_image` as the appliance VM.
pub fn run(
    target_image: &[u8],
    appliance_image: &[u8],
    mib: u64,
) -> Result<BenchFigures, BenchError> {
    if !(1..=256).contains(&mib) {
        return Err(BenchError("the size must be 1..=256 MiB".into()));
    }
    let bytes = mib << 20;
    let (vm_line, tsc_hz, from) = appliance_read(target_image, appliance_image, bytes)?;

    let (target, _) = target_vm(target_image, bytes)?;
    let target_ram = target.ram().clone();
    let socket = temp_socket_path("appliance-bench");
    let run = start_introspected(
        target,
        IntrospectorConfig::default(),
        Endpoint::Listen(socket),
    )
    .map_err(|e| err("starting the target")(e.to_string()))?;
    let intro = run.introspector.clone();
    // This appliance VM is built (RAM, window) but need not run: the doorbell handler is
    // called directly, as its exit would.
    let mut appliance = Vm::new(vm_config("bench-appliance", 16 << 20, ""), target_image)
        .map_err(|e| err("appliance")(e.to_string()))?;
    // Large enough for the read and for the 512-page map-cost measurement below.
    let window_bytes = bytes.max(MAX_RANGE_PAGES * PAGE_SIZE);
    let window = appliance
        .add_remap_window(WINDOW_GPA, window_bytes)
        .map_err(|e| err("window")(e.to_string()))?;
    let verifier =
        appliance_link::pager::hand_out_key(&intro).map_err(|e| err("token key")(e.to_string()))?;
    let pager = Arc::new(Pager::new(
        verifier,
        target_ram,
        Vec::new(),
        window.clone(),
        WINDOW_GPA,
    ));
    let hook = ApplianceHook::new(pager.clone(), Waker::for_thread(std::thread::current()));
    let aram = appliance.ram().clone();
    let call = |nr: Hypercall, args: [u64; 4]| -> Result<u64, BenchError> {
        let token = intro
            .tokens()
            .issue()
            .map_err(|e| err("token")(e.to_string()))?;
        aram.write(TOKEN_GPA, &token.to_bytes())
            .map_err(|e| err("staging the token")(e.to_string()))?;
        let regs = HypercallRegs {
            rax: nr.number(),
            rbx: TOKEN_GPA,
            rcx: args[1],
            rdx: args[2],
            rsi: args[3],
            rdi: 0,
        };
        hook.call(&regs, &aram)
            .map_err(|e| err("map call")(e.to_string()))
    };
    let pages = bytes / PAGE_SIZE;

    // Window: map everything with MAP_RANGE, then read it all.
    let t = Instant::now();
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(MAX_RANGE_PAGES);
        call(
            Hypercall::MapRange,
            [0, page * PAGE_SIZE, WINDOW_GPA + page * PAGE_SIZE, n],
        )?;
        page += n;
    }
    let window_map = t.elapsed();
    // Page by page through one page-sized buffer, checksumming as the appliance does.
    let read_window = || {
        let mut page = [0u8; PAGE_SIZE as usize];
        let mut sum = 0;
        for offset in (0..bytes).step_by(PAGE_SIZE as usize) {
            // SAFETY: the window mapping is at least `bytes` long and readable (read-only
            // shared target pages, mapped above), and stays mapped while `window` lives; the
            // target may write concurrently, which only changes the values copied.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    window.host_base().add(offset as usize),
                    page.as_mut_ptr(),
                    page.len(),
                )
            };
            if offset >= from {
                sum = content_checksum(sum, (offset - from) / 8, &page);
            }
        }
        sum
    };
    let t = Instant::now();
    let window_checksum = read_window();
    let window_read = t.elapsed();
    let t = Instant::now();
    std::hint::black_box(read_window());
    let window_reread = t.elapsed();
    pager.revoke_all();

    // Map cost per page: 512 single MEM_MAPs against one MAP_RANGE of 512.
    let n = MAX_RANGE_PAGES;
    let t = Instant::now();
    for i in 0..n {
        call(
            Hypercall::MemMap,
            [0, i * PAGE_SIZE, WINDOW_GPA + i * PAGE_SIZE, 0],
        )?;
    }
    let single_map_per_page = t.elapsed() / n as u32;
    pager.revoke_all();
    let t = Instant::now();
    call(Hypercall::MapRange, [0, 0, WINDOW_GPA, n])?;
    let batched_map_per_page = t.elapsed() / n as u32;
    pager.retire();

    // READ_PHYSICAL over the socket.
    let client = KvmiClient::connect(run.socket()).map_err(|e| err("connect")(e.to_string()))?;
    let t = Instant::now();
    let data = client
        .read_physical_range(0, bytes)
        .map_err(|e| err("READ_PHYSICAL")(e.to_string()))?;
    let read_physical = t.elapsed();
    let physical_checksum = checksum_from(&data, from);
    drop(client);
    run.running.handle().stop();
    let _ = run.wait(RunLimits {
        timeout: Some(Duration::from_secs(5)),
        interrupt: None,
    });
    if window_checksum != vm_line.checksum || physical_checksum != vm_line.checksum {
        return Err(BenchError(format!(
            "the readers disagree: appliance {:#x}, shim window {window_checksum:#x}, \
             READ_PHYSICAL {physical_checksum:#x}",
            vm_line.checksum
        )));
    }
    Ok(BenchFigures {
        bytes,
        from,
        vm_map: vms::cycles(vm_line.map_cycles, tsc_hz),
        vm_tokens: vms::cycles(vm_line.token_cycles, tsc_hz),
        vm_read: vms::cycles(vm_line.read_cycles, tsc_hz),
        vm_reread: vms::cycles(vm_line.reread_cycles, tsc_hz),
        vm_map_calls: vm_line.map_calls,
        checksum: vm_line.checksum,
        shmem_thp: vmm::window::shmem_thp_mode().unwrap_or_else(|| "unavailable".into()),
        window_map,
        window_read,
        window_reread,
        read_physical,
        single_map_per_page,
        batched_map_per_page,
    })
}
