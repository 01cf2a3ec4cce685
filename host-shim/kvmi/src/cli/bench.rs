//! `kvmi bench`: event round trips answered over the KVMI socket against the same exit
//! handled by the VMM itself (the floor), in one run, reported as ratios.
//!
//! Both sides run the same test-guest loop: `mode=breakpoint` (calls
//! `sym.breakpoint_target` n times; a hardware breakpoint there) and `mode=mem-write`
//! (n word writes to `sym.scratch_page`; the page write-protected). The floor is an in-process
//! [`ExitHook`] that takes the exit and resumes (stepping over the breakpoint, dropping the
//! write). The introspected side is a child `kvmi run --kvmi-socket` with this process as the
//! tool, answering every event with CONTINUE. Each sample is the time between two consecutive
//! exits (floor: seen by the hook; introspected: the event's arrival at the tool), so both
//! include the guest's loop body and every cost of one round trip.
//!
//! A third figure is the cost of an execute restriction whose events the tool answers with
//! CONTINUE (each instruction fetched from the page is stepped through it): test-guest
//! `mode=step` calls `sym.step_target` (four `nop`s and `ret`) in a loop that lives on the
//! same page. The same loop runs unrestricted (time per iteration from two runs of different
//! length, so the fixed costs of a run cancel) and with that page `rw-` and PF events
//! answered CONTINUE (time per iteration from the exec events' own timestamps), in one run,
//! reported as a slowdown ratio with the exec events per second.
//!
//! `--gdb` is a mode of its own ([`gdb`]): the hardware-breakpoint floor and socket figures,
//! then the same loop's breakpoint round trip through `kvmi gdb` (continue → hit → stop
//! reply), with a hardware and with a software (execute-trap) breakpoint, as ratios to the
//! floor of the same run.

mod gdb;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::images::Image;
use anyhow::{Context, Result, bail};
use clap::Args;
use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, kvm_guest_debug,
};
use kvmi_client::KvmiClient;
use protocol::EventKind;
use protocol::event::EventSet;
use protocol::types::{Access, PageAccessEntry};
use vmm::{
    DebugEvent, ExitContext, ExitHook, HookResult, MmioAccess, RunLimits, SerialSink, Vm, VmConfig,
};

/// `kvmi bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Guest loop iterations per measurement.
    #[arg(long, default_value_t = 2000)]
    iterations: u64,
    /// Print the results as one JSON object too.
    #[arg(long)]
    json: bool,
    /// Measure only the floor (the exits handled by the VMM, no socket).
    #[arg(long)]
    floor_only: bool,
    /// Measure the hardware-breakpoint floor, its socket round trip and the breakpoint round
    /// trip through `kvmi gdb` (continue → hit → stop reply; hbreak and break) instead of
    /// the page-write and exec figures.
    #[arg(long, conflicts_with = "floor_only")]
    gdb: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Breakpoint,
    PageWrite,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Breakpoint => "hw-breakpoint",
            Kind::PageWrite => "page-write",
        }
    }
    fn cmdline(self, n: u64) -> String {
        match self {
            Kind::Breakpoint => format!("mode=breakpoint n={n}"),
            Kind::PageWrite => format!("mode=mem-write n={n}"),
        }
    }
}

/// Summary of the gaps between consecutive exits.
#[derive(Clone, Copy, Debug)]
struct Stats {
    samples: usize,
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

fn stats(times: &[Instant]) -> Result<Stats> {
    if times.len() < 3 {
        bail!("only {} exits measured", times.len());
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    sample_stats(&gaps)
}

/// Summary of round trips measured one by one.
fn sample_stats(samples: &[Duration]) -> Result<Stats> {
    if samples.len() < 2 {
        bail!("only {} round trips measured", samples.len());
    }
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let total: f64 = us.iter().sum();
    us.sort_by(f64::total_cmp);
    let pct = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    Ok(Stats {
        samples: us.len(),
        per_sec: us.len() as f64 / (total / 1e6),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

fn guest_debug(control: u32, dr0: u64, dr7: u64) -> kvm_guest_debug {
    let mut dbg = kvm_guest_debug {
        control,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = dr7;
    dbg
}

/// The floor's hook: records each exit and resumes at once.
struct FloorHook {
    target: u64,
    page: u64,
    stepping: AtomicBool,
    times: Mutex<Vec<Instant>>,
}

impl FloorHook {
    fn record(&self) {
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Instant::now());
    }
}

impl ExitHook for FloorHook {
    fn debug(&self, ctx: &mut ExitContext<'_>, _ev: &DebugEvent) -> HookResult {
        // Step over portably (as the introspector must): disarm + single step, then re-arm.
        let (dbg, stepping) = if self.stepping.swap(false, Ordering::SeqCst) {
            (
                guest_debug(
                    KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
                    self.target,
                    0x401,
                ),
                false,
            )
        } else {
            self.record();
            let c = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_SINGLESTEP;
            (guest_debug(c, self.target, 0x400), true)
        };
        self.stepping.store(stepping, Ordering::SeqCst);
        match ctx.vcpu_fd().set_guest_debug(&dbg) {
            Ok(()) => HookResult::Handled,
            Err(e) => HookResult::Stop(format!("guest debug: {e}")),
        }
    }

    fn mmio(&self, _ctx: &mut ExitContext<'_>, io: &mut MmioAccess<'_>) -> HookResult {
        if io.write && io.addr & !0xfff == self.page {
            self.record();
            return HookResult::Handled;
        }
        HookResult::Unhandled
    }
}

fn floor(kind: Kind, n: u64, target: u64, page: u64) -> Result<Vec<Instant>> {
    let image = Image::TestGuest
        .elf()
        .context("test-guest is not embedded")?;
    let config = VmConfig {
        name: "kvmi-bench-floor".into(),
        memory_bytes: 32 << 20,
        cmdline: kind.cmdline(n),
        ..VmConfig::default()
    };
    let hook = Arc::new(FloorHook {
        target,
        page,
        stepping: AtomicBool::new(false),
        times: Mutex::new(Vec::with_capacity(n as usize)),
    });
    let mut vm = Vm::new(config, image)?;
    vm.set_hook(hook.clone());
    vm.set_serial(SerialSink::Null);
    match kind {
        Kind::Breakpoint => vm.vcpus_mut()[0].fd().set_guest_debug(&guest_debug(
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            target,
            0x401,
        ))?,
        Kind::PageWrite => vm.ram().protect(page, 4096, libc::PROT_READ)?,
    }
    let report = vm.run(RunLimits {
        timeout: Some(Duration::from_secs(300)),
        interrupt: None,
    })?;
    if !report.outcome.is_success() {
        bail!("floor VM for {}: {}", kind.name(), report.outcome);
    }
    let times = std::mem::take(&mut *hook.times.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(times)
}

/// Kills the child VM if the measurement fails half-way.
struct ChildVm(Option<Child>);

impl Drop for ChildVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn introspected(kind: Kind, n: u64, target: u64, page: u64, gate: u64) -> Result<Vec<Instant>> {
    let (mut child, client, socket) =
        attached_vm(&format!("{} gate=1", kind.cmdline(n)), kind.name())?;
    match kind {
        Kind::Breakpoint => {
            client.control_events_all(EventSet::EMPTY.with(EventKind::Breakpoint))?;
            client.control_breakpoint(None, target, true)?;
        }
        Kind::PageWrite => {
            client.control_events_all(EventSet::EMPTY.with(EventKind::PageFault))?;
            client.set_page_access(
                0,
                &[PageAccessEntry {
                    gpa: page,
                    access: Access::R.union(Access::X),
                }],
            )?;
        }
    }
    // Open the test-guest start gate: the loop starts once the interception is in place.
    client.write_physical(gate, &1u64.to_le_bytes())?;
    let mut times = Vec::with_capacity(n as usize);
    while (times.len() as u64) < n {
        match client.next_event(Duration::from_secs(10)) {
            Ok(Some(ev)) => {
                times.push(ev.received);
                client.reply_continue(&ev)?;
            }
            Ok(None) => bail!("no event for 10 s after {} events", times.len()),
            Err(e) => bail!("channel closed after {} of {n} events: {e}", times.len()),
        }
    }
    client.close();
    finish_vm(&mut child, &socket, kind.name())?;
    Ok(times)
}

/// Starts `kvmi run --image test-guest --cmdline CMDLINE` with a KVMI socket named after
/// `tag` and attaches to it (the VM is killed if anything fails before it is finished).
fn attached_vm(cmdline: &str, tag: &str) -> Result<(ChildVm, KvmiClient, PathBuf)> {
    let (mut child, socket) = spawn_vm(cmdline, tag)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        if let Some(c) = child.0.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("the VM exited with {status} before a tool could attach");
        }
        match KvmiClient::connect(&socket) {
            Ok(client) => break client,
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Ok((child, client, socket))
}

/// Starts `kvmi run --image test-guest --cmdline CMDLINE` with a KVMI socket named after
/// `tag`, for a tool to attach to.
fn spawn_vm(cmdline: &str, tag: &str) -> Result<(ChildVm, PathBuf)> {
    let socket: PathBuf =
        std::env::temp_dir().join(format!("kvmi-bench-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(std::env::current_exe()?)
        .args(["run", "--image", "test-guest", "--timeout", "300"])
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--kvmi-socket")
        .arg(&socket)
        .arg("--serial")
        .arg("/dev/null")
        .stdin(Stdio::null())
        .spawn()
        .context("starting the VM")?;
    Ok((ChildVm(Some(child)), socket))
}

/// The step VMs of the exec step-through case (`mode=step n=N gate=1`).
fn step_vm(n: u64, tag: &str) -> Result<(ChildVm, KvmiClient, PathBuf)> {
    attached_vm(&format!("mode=step n={n} gate=1"), &format!("exec-{tag}"))
}

/// Waits for the VM `what` to exit and requires success; removes its socket.
fn finish_vm(child: &mut ChildVm, socket: &PathBuf, what: &str) -> Result<()> {
    let status = child.0.take().map(|mut c| c.wait()).transpose()?;
    let _ = std::fs::remove_file(socket);
    if let Some(s) = status
        && !s.success()
    {
        bail!("the {what} VM exited with {s}");
    }
    Ok(())
}

/// Seconds from opening the gate to the exit of an unrestricted `mode=step n=N` VM.
fn unrestricted_step_run(n: u64, gate: u64) -> Result<f64> {
    let (mut child, client, socket) = step_vm(n, "free")?;
    let start = Instant::now();
    client.write_physical(gate, &1u64.to_le_bytes())?;
    finish_vm(&mut child, &socket, "step")?;
    let secs = start.elapsed().as_secs_f64();
    client.close();
    Ok(secs)
}

/// The exec step-through figures.
#[derive(Clone, Copy, Debug)]
struct ExecFigures {
    unrestricted_us: f64,
    restricted_us: f64,
    events_per_sec: f64,
    events_per_iteration: f64,
    events: usize,
}

/// Measures the `mode=step` loop unrestricted and with its page not executable (PF events
/// answered CONTINUE).
fn exec_step_through(n: u64, step_target: u64, gate: u64) -> Result<ExecFigures> {
    // Unrestricted: an iteration is a few µs, so run long loops; two lengths cancel the
    // fixed costs (boot is before the gate, but printing and the exit are after it).
    let (short, long) = (n * 10, n * 40);
    let t_short = unrestricted_step_run(short, gate)?;
    let t_long = unrestricted_step_run(long, gate)?;
    let unrestricted_us = ((t_long - t_short) / (long - short) as f64 * 1e6).max(1e-3);
    // Restricted: the page of step_target (and of the loop) loses X.
    let (mut child, client, socket) = step_vm(n, "noexec")?;
    client.control_events_all(EventSet::EMPTY.with(EventKind::PageFault))?;
    client.set_page_access(
        0,
        &[PageAccessEntry {
            gpa: step_target & !0xfff,
            access: Access::R.union(Access::W),
        }],
    )?;
    client.write_physical(gate, &1u64.to_le_bytes())?;
    let mut times = Vec::new();
    loop {
        match client.next_event(Duration::from_secs(10)) {
            Ok(Some(ev)) => {
                if matches!(ev.event.payload, protocol::EventPayload::PageFault { mode, .. } if mode & 4 != 0)
                {
                    times.push(ev.received);
                }
                client.reply_continue(&ev)?;
            }
            Ok(None) => bail!("no event for 10 s after {} exec events", times.len()),
            // The VM finished its loop and exited.
            Err(_) => break,
        }
    }
    client.close();
    finish_vm(&mut child, &socket, "step")?;
    let s = stats(&times)?;
    let events_per_iteration = times.len() as f64 / n as f64;
    Ok(ExecFigures {
        unrestricted_us,
        restricted_us: events_per_iteration / s.per_sec * 1e6,
        events_per_sec: s.per_sec,
        events_per_iteration,
        events: times.len(),
    })
}

fn show(name: &str, s: &Stats) -> String {
    format!(
        "  {name:<13} {:>9.0} round trips/s   p50 {:>8.1} µs   p99 {:>8.1} µs   ({} samples)",
        s.per_sec, s.p50_us, s.p99_us, s.samples
    )
}

/// The `--gdb` rows: the breakpoint round trip through `kvmi gdb`, hbreak and break, against
/// the hardware-breakpoint floor measured just before (in `results`).
fn gdb_figures(
    n: u64,
    target: u64,
    gate: u64,
    results: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let floor_p50 = results
        .get(Kind::Breakpoint.name())
        .and_then(|v| v["floor"]["p50_us"].as_f64())
        .context("the hardware-breakpoint floor was not measured")?;
    println!("gdb breakpoint round trip (n={n}, vCont;c -> T05 stop reply, through `kvmi gdb`):");
    let mut rows = serde_json::Map::new();
    for kind in [gdb::GdbBreak::Hardware, gdb::GdbBreak::Software] {
        let s = sample_stats(&gdb::round_trips(kind, n, target, gate)?)?;
        println!("{}", show(&format!("gdb {}", kind.name()), &s));
        let ratio = s.p50_us / floor_p50;
        println!("  ratio gdb {}/floor: {ratio:.1}x p50 latency", kind.name());
        rows.insert(
            kind.name().into(),
            serde_json::json!({
                "per_sec": s.per_sec, "p50_us": s.p50_us, "p99_us": s.p99_us,
                "samples": s.samples, "stops": s.samples,
                "ratio": {"p50": ratio},
            }),
        );
    }
    results.insert("gdb".into(), serde_json::Value::Object(rows));
    Ok(())
}

/// Runs both kinds, floor and introspected, and prints the figures and ratios.
pub fn run(args: &BenchArgs) -> Result<u8> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is not available");
    }
    let profile = Image::TestGuest
        .profile()
        .context("test-guest is not embedded")??;
    let target = profile
        .symbol("breakpoint_target")
        .context("profile lacks sym.breakpoint_target")?;
    let page = profile
        .symbol("scratch_page")
        .context("profile lacks sym.scratch_page")?;
    let gate = profile.symbol("gate").context("profile lacks sym.gate")?;
    let n = args.iterations.max(10);
    let mut results = serde_json::Map::new();
    let kinds: &[Kind] = if args.gdb {
        &[Kind::Breakpoint]
    } else {
        &[Kind::Breakpoint, Kind::PageWrite]
    };
    for &kind in kinds {
        let f = stats(&floor(kind, n, target, page)?)?;
        println!("{} (n={n}):", kind.name());
        println!("{}", show("floor (VMM)", &f));
        if args.floor_only {
            continue;
        }
        let t = stats(&introspected(kind, n, target, page, gate)?)?;
        println!("{}", show("over socket", &t));
        let rate = f.per_sec / t.per_sec;
        let p50 = t.p50_us / f.p50_us;
        let p99 = t.p99_us / f.p99_us;
        println!(
            "  ratio socket/floor: {p50:.2}x p50 latency, {p99:.2}x p99 latency, {rate:.2}x fewer round trips/s"
        );
        results.insert(
            kind.name().into(),
            serde_json::json!({
                "floor": {"per_sec": f.per_sec, "p50_us": f.p50_us, "p99_us": f.p99_us, "samples": f.samples},
                "socket": {"per_sec": t.per_sec, "p50_us": t.p50_us, "p99_us": t.p99_us, "samples": t.samples},
                "ratio": {"p50": p50, "p99": p99, "rate": rate},
            }),
        );
    }
    if args.gdb {
        gdb_figures(n, target, gate, &mut results)?;
    } else if !args.floor_only {
        let step_target = profile
            .symbol("step_target")
            .context("profile lacks sym.step_target")?;
        let e = exec_step_through(n, step_target, gate)?;
        let slowdown = e.restricted_us / e.unrestricted_us;
        println!("exec step-through (n={n}, the loop's page not executable, CONTINUE):");
        println!(
            "  unrestricted loop  {:>9.2} µs per iteration",
            e.unrestricted_us
        );
        println!(
            "  no-exec page       {:>9.2} µs per iteration   {:>7.0} exec events/s   ({:.1} per iteration, {} events)",
            e.restricted_us, e.events_per_sec, e.events_per_iteration, e.events
        );
        println!("  ratio no-exec/unrestricted: {slowdown:.1}x slower per iteration");
        results.insert(
            "exec-step-through".into(),
            serde_json::json!({
                "unrestricted_us_per_iteration": e.unrestricted_us,
                "restricted_us_per_iteration": e.restricted_us,
                "exec_events_per_sec": e.events_per_sec,
                "exec_events_per_iteration": e.events_per_iteration,
                "exec_events": e.events,
                "ratio": {"slowdown": slowdown},
            }),
        );
    }
    if args.json {
        println!("{}", serde_json::Value::Object(results));
    }
    Ok(0)
}
