//! Appliance benchmarks (issue 5 item 7), as ratios measured in one run on one target:
//! - reading target memory through the map window (pages mapped with MAP_RANGE, then read
//!   from the window's mapping — the bytes the appliance VM sees, no copy on the shim side)
//!   against `READ_PHYSICAL` over the KVMI socket (one command per page);
//! - the shim's cost per mapped page: one MEM_MAP per page against one MAP_RANGE of 512
//!   pages (both through [`ApplianceHook::call`], the doorbell handler; the VM exit each
//!   call costs in a real appliance, ~5 µs here, comes on top and favours batching more).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypercall::call::{Hypercall, HypercallRegs, MAX_RANGE_PAGES, PAGE_SIZE};

use super::hook::ApplianceHook;
use super::pager::Pager;
use super::rings::Waker;
use crate::client::KvmiClient;
use crate::devices::{SerialSink, UnknownIoPolicy};
use crate::introspect::{Endpoint, IntrospectorConfig, start_introspected, temp_socket_path};
use crate::vm::{RunLimits, Vm, VmConfig};

/// Measured figures of one run.
#[derive(Clone, Debug)]
pub struct BenchFigures {
    /// Bytes read by each method.
    pub bytes: u64,
    /// Mapping `bytes` into the window (MAP_RANGE calls, tokens included).
    pub window_map: Duration,
    /// Reading `bytes` through the window once mapped.
    pub window_read: Duration,
    /// Reading `bytes` through the window again (page tables populated: memory speed).
    pub window_reread: Duration,
    /// Reading `bytes` with READ_PHYSICAL over the socket.
    pub read_physical: Duration,
    /// Shim cost per page with one MEM_MAP per page (token issue included).
    pub single_map_per_page: Duration,
    /// Shim cost per page with one MAP_RANGE of 512 pages (token issue included).
    pub batched_map_per_page: Duration,
}

impl BenchFigures {
    /// READ_PHYSICAL time / window time (map + read).
    pub fn window_speedup(&self) -> f64 {
        ratio(self.read_physical, self.window_map + self.window_read)
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
            "read {mib:.0} MiB of target memory:\n\
             \x20 window (map {:.1} ms + read {:.1} ms)   {:>9.1} MiB/s\n\
             \x20 window, read again (warm)       {:>9.1} ms {:>9.1} MiB/s\n\
             \x20 READ_PHYSICAL over the socket {:>9.1} ms {:>9.1} MiB/s\n\
             \x20 window / READ_PHYSICAL speedup (cold)   {:>9.1}x\n\
             \x20 window / READ_PHYSICAL speedup (warm)   {:>9.1}x\n\
             map cost per page (shim side):\n\
             \x20 MEM_MAP, one page per call       {:>9.2} us\n\
             \x20 MAP_RANGE, 512 pages per call    {:>9.2} us\n\
             \x20 batched speedup                  {:>9.1}x\n",
            ms(self.window_map),
            ms(self.window_read),
            rate(self.window_map + self.window_read),
            ms(self.window_reread),
            rate(self.window_reread),
            ms(self.read_physical),
            rate(self.read_physical),
            self.window_speedup(),
            ratio(self.read_physical, self.window_reread),
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

const WINDOW_GPA: u64 = super::launch::MAP_WINDOW_GPA;
const TOKEN_GPA: u64 = 0x10_0000;

/// Runs the benchmarks on a target booted from `target_image` (any image that keeps running,
/// e.g. test-guest `mode=spin`) reading `mib` MiB (1..=256) of its memory.
pub fn run(target_image: &[u8], cmdline: &str, mib: u64) -> Result<BenchFigures, BenchError> {
    if !(1..=256).contains(&mib) {
        return Err(BenchError("the size must be 1..=256 MiB".into()));
    }
    let bytes = mib << 20;
    let vm_config = |name: &str, mem: u64, cmdline: &str| VmConfig {
        name: name.into(),
        memory_bytes: mem,
        vcpus: 1,
        cmdline: cmdline.into(),
        unknown_io: UnknownIoPolicy::Ignore,
    };
    let mut target = Vm::new(
        vm_config("bench-target", bytes + (16 << 20), cmdline),
        target_image,
    )
    .map_err(|e| err("target")(e.to_string()))?;
    target.set_serial(SerialSink::Null);
    let target_ram = target.ram().clone();
    let socket = temp_socket_path("appliance-bench");
    let run = start_introspected(
        target,
        IntrospectorConfig::default(),
        Endpoint::Listen(socket),
    )
    .map_err(|e| err("starting the target")(e.to_string()))?;
    let intro = run.introspector.clone();
    // The appliance VM is built (RAM, window) but need not run: the doorbell handler is
    // called directly, as its exit would.
    let mut appliance = Vm::new(vm_config("bench-appliance", 16 << 20, ""), target_image)
        .map_err(|e| err("appliance")(e.to_string()))?;
    // Large enough for the read and for the 512-page map-cost measurement below.
    let window_bytes = bytes.max(MAX_RANGE_PAGES * PAGE_SIZE);
    let window = appliance
        .add_map_window(WINDOW_GPA, window_bytes)
        .map_err(|e| err("window")(e.to_string()))?;
    let pager = Arc::new(Pager::new(
        intro.clone(),
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
    let mut buf = vec![0u8; bytes as usize];
    let t = Instant::now();
    // SAFETY: the window mapping is at least `bytes` long, readable (read-only shared target pages)
    // and stays mapped while `window` lives; the target may write concurrently, which only
    // changes the values copied.
    unsafe { std::ptr::copy_nonoverlapping(window.host_base(), buf.as_mut_ptr(), buf.len()) };
    let window_read = t.elapsed();
    std::hint::black_box(&buf);
    let t = Instant::now();
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(window.host_base(), buf.as_mut_ptr(), buf.len()) };
    let window_reread = t.elapsed();
    std::hint::black_box(&buf);
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
    std::hint::black_box(&data);
    drop(client);
    run.running.handle().stop();
    let _ = run.wait(RunLimits {
        timeout: Some(Duration::from_secs(5)),
        interrupt: None,
    });
    Ok(BenchFigures {
        bytes,
        window_map,
        window_read,
        window_reread,
        read_physical,
        single_map_per_page,
        batched_map_per_page,
    })
}
