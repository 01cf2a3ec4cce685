//! `kvmi dump-bench`: the memory dump (`kvmi_dump`) against baselines measured in the same
//! run, as ratios:
//!
//! - dump throughput (raw and LiME, stop-and-copy) against `dd` writing the same number of
//!   bytes to the same file system (`oflag=direct` and buffered, both `conv=fsync`; the
//!   better one is the baseline);
//! - dump throughput against reading guest memory page by page with READ_PHYSICAL over a KVMI
//!   socket (what a tool without the dump would do);
//! - the vCPUs' pause of a live dump against stop-and-copy, for 256 MiB and 1 GiB guests
//!   whose vCPU keeps writing a 16 MiB working set at native speed (test-guest
//!   `mode=pattern`, CPL3: every page of it is dirty again within microseconds).
//!
//! Throughput is measured in `ROUNDS` interleaved rounds (dd direct, dd buffered, raw,
//! LiME), each figure the median of its rounds, so a burst of noise on the host hits all of
//! them alike. Every guest's RAM is filled with a pattern before it boots, so no page is a
//! sparse hole and the dump really copies every byte.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvmi_client::KvmiClient;
use kvmi_dump::{DumpRequest, DumpSummary, Format, Progress};
use kvmi_engine::{Endpoint, IntrospectorConfig, start_introspected, temp_socket_path};
use vmm::devices::{SerialSink, UnknownIoPolicy};
use vmm::vm::{RunLimits, Vm, VmConfig};

const MIB: u64 = 1 << 20;
/// The guest sizes of the pause comparison.
const PAUSE_SIZES_MIB: [u64; 2] = [256, 1024];
/// Interleaved rounds of the throughput figures.
const ROUNDS: usize = 3;
/// The working set the pause guests keep writing (`mode=pattern mib=`).
const HOT_MIB: u64 = 16;
/// MiB read with READ_PHYSICAL (page by page: slow, so fewer bytes suffice for a rate).
const READ_PHYSICAL_MIB: u64 = 32;

/// A test-guest running `cmdline` (`mode=spin`: its vCPU writes one counter), RAM filled
/// with a pattern.
fn guest(image: &[u8], mib: u64, cmdline: &str) -> Result<Vm> {
    let mut vm = Vm::new(
        VmConfig {
            name: "dump-bench".into(),
            memory_bytes: mib * MIB,
            vcpus: 1,
            cmdline: cmdline.into(),
            unknown_io: UnknownIoPolicy::Ignore,
        },
        image,
    )?;
    vm.set_serial(SerialSink::Null);
    let from = vm.image().end.next_multiple_of(MIB).max(2 * MIB);
    let mut block = vec![0u8; MIB as usize];
    for at in (from..mib * MIB).step_by(MIB as usize) {
        for (i, b) in block.iter_mut().enumerate() {
            *b = (at >> 20) as u8 ^ (i as u8).wrapping_mul(13);
        }
        vm.ram().write(at, &block)?;
    }
    Ok(vm)
}

fn dump_once(vm: &vmm::VmHandle, path: &Path, format: Format, live: bool) -> Result<DumpSummary> {
    let request = DumpRequest {
        path: path.to_path_buf(),
        format,
        live,
    };
    let s = kvmi_dump::dump(vm, &request, &Progress::default())
        .with_context(|| format!("dumping to {}", path.display()))?;
    let _ = std::fs::remove_file(path);
    Ok(s)
}

/// MiB/s of `dd` writing `mib` MiB of zeros to `path` (`direct`: `oflag=direct`), fsync included.
fn dd(path: &Path, mib: u64, direct: bool) -> Result<f64> {
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .arg("bs=1M")
        .arg(format!("count={mib}"))
        .arg("conv=fsync")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if direct {
        cmd.arg("oflag=direct");
    }
    let t = Instant::now();
    let status = cmd.status().context("running dd")?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    if !status.success() {
        bail!(
            "dd ({}) failed: {status}",
            if direct { "direct" } else { "buffered" }
        );
    }
    Ok(mib as f64 / secs)
}

/// MiB/s of READ_PHYSICAL, one page per command, over a KVMI socket of a `mib` MiB guest.
fn read_physical_rate(image: &[u8]) -> Result<f64> {
    let vm = guest(image, READ_PHYSICAL_MIB + 16, "mode=spin")?;
    let run = start_introspected(
        vm,
        IntrospectorConfig::default(),
        Endpoint::Listen(temp_socket_path("dump-bench")),
    )?;
    let client = KvmiClient::connect(run.socket())?;
    let bytes = READ_PHYSICAL_MIB * MIB;
    let t = Instant::now();
    let mut sum = 0u64;
    for gpa in (0..bytes).step_by(4096) {
        let page = client.read_physical(gpa, 4096)?;
        sum = sum.wrapping_add(u64::from(page[7]));
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    drop(client);
    run.running.handle().stop();
    let _ = run.wait(RunLimits {
        timeout: Some(Duration::from_secs(5)),
        interrupt: None,
    });
    Ok(READ_PHYSICAL_MIB as f64 / secs)
}

/// The median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Pause of stop-and-copy and of a live dump of one `mib` MiB guest writing its working set.
#[derive(Debug, serde::Serialize)]
pub struct PauseFigures {
    /// Guest RAM in MiB.
    pub mib: u64,
    /// Stop-and-copy: the whole dump paused, in ms.
    pub stop_pause_ms: f64,
    /// Live: the last pass paused, in ms.
    pub live_pause_ms: f64,
    /// Passes of the live dump.
    pub live_passes: u32,
    /// Whether the live dump ran live.
    pub live: bool,
    /// Live dump wall time in seconds.
    pub live_seconds: f64,
}

/// Everything `kvmi dump-bench` measures.
#[derive(Debug, serde::Serialize)]
pub struct DumpBenchFigures {
    /// MiB of guest RAM dumped for throughput.
    pub mib: u64,
    /// Where the files were written.
    pub dir: String,
    /// How the dump wrote (io_uring, O_DIRECT...).
    pub io: String,
    /// Raw dump MiB/s (fsync included; median of the rounds, as every throughput here).
    pub raw_mib_s: f64,
    /// LiME dump MiB/s.
    pub lime_mib_s: f64,
    /// dd oflag=direct MiB/s.
    pub dd_direct_mib_s: f64,
    /// dd buffered MiB/s.
    pub dd_buffered_mib_s: f64,
    /// READ_PHYSICAL page by page over the socket, MiB/s.
    pub read_physical_mib_s: f64,
    /// Raw dump / the better dd (target ≥ 0.8).
    pub raw_vs_dd: f64,
    /// LiME dump / the better dd (target ≥ 0.8).
    pub lime_vs_dd: f64,
    /// Raw dump / READ_PHYSICAL (target ≥ 10).
    pub raw_vs_read_physical: f64,
    /// Pause comparison per guest size.
    pub pauses: Vec<PauseFigures>,
}

impl DumpBenchFigures {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut t = format!(
            "memory dump, {} MiB guest, {} ({})\n\
             \x20 dump raw (stop-and-copy)          {:>9.0} MiB/s  {:>6.2}x dd   {:>6.1}x READ_PHYSICAL\n\
             \x20 dump lime (stop-and-copy)         {:>9.0} MiB/s  {:>6.2}x dd\n\
             \x20 dd oflag=direct conv=fsync        {:>9.0} MiB/s\n\
             \x20 dd buffered conv=fsync            {:>9.0} MiB/s\n\
             \x20 READ_PHYSICAL per page (socket)   {:>9.1} MiB/s\n\
             pause of the vCPUs (the guest keeps writing a {} MiB working set)\n",
            self.mib,
            self.dir,
            self.io,
            self.raw_mib_s,
            self.raw_vs_dd,
            self.raw_vs_read_physical,
            self.lime_mib_s,
            self.lime_vs_dd,
            self.dd_direct_mib_s,
            self.dd_buffered_mib_s,
            self.read_physical_mib_s,
            HOT_MIB,
        );
        for p in &self.pauses {
            t.push_str(&format!(
                "  {:>5} MiB: stop-and-copy {:>8.1} ms, live {:>7.1} ms ({} passes, {:.2} s{}) → {:.0}x shorter\n",
                p.mib,
                p.stop_pause_ms,
                p.live_pause_ms,
                p.live_passes,
                p.live_seconds,
                if p.live { "" } else { ", NOT live" },
                p.stop_pause_ms / p.live_pause_ms.max(1e-3),
            ));
        }
        t
    }
}

/// Runs the benchmark: `mib` MiB for throughput, files in `dir`.
pub fn run(image: &[u8], mib: u64, dir: &Path) -> Result<DumpBenchFigures> {
    if !(16..=4096).contains(&mib) {
        bail!("--mib must be 16..=4096");
    }
    let file = |name: &str| -> PathBuf {
        dir.join(format!("kvmi-dump-bench-{}-{name}", std::process::id()))
    };
    let running = guest(image, mib, "mode=spin")?.start()?;
    let vm = running.handle();
    // Warm-up (page cache, io_uring set-up), then interleaved rounds.
    dump_once(&vm, &file("warm"), Format::Raw, false)?;
    let mut rounds: [Vec<f64>; 4] = Default::default();
    let mut raw = None;
    for _ in 0..ROUNDS {
        let r = dump_once(&vm, &file("raw"), Format::Raw, false)?;
        if r.sparse_bytes > 4 * MIB {
            bail!(
                "the guest's RAM was not filled: {} sparse bytes",
                r.sparse_bytes
            );
        }
        let file_mib = r.file_bytes.div_ceil(MIB);
        rounds[0].push(r.mib_per_s);
        rounds[1].push(dump_once(&vm, &file("lime"), Format::Lime, false)?.mib_per_s);
        rounds[2].push(dd(&file("dd"), file_mib, true)?);
        rounds[3].push(dd(&file("dd"), file_mib, false)?);
        raw = Some(r);
    }
    vm.stop();
    let _ = running.wait(RunLimits::default());
    let raw = raw.context("no round ran")?;
    let [raw_mib_s, lime_mib_s, dd_direct, dd_buffered] = rounds.map(median);
    let read_physical = read_physical_rate(image)?;
    let mut pauses = Vec::new();
    for size in PAUSE_SIZES_MIB {
        let running = guest(image, size, &format!("mode=pattern mib={HOT_MIB}"))?.start()?;
        let vm = running.handle();
        std::thread::sleep(Duration::from_millis(100));
        let stop = dump_once(&vm, &file("stop"), Format::Raw, false)?;
        let live = dump_once(&vm, &file("live"), Format::Raw, true)?;
        vm.stop();
        let _ = running.wait(RunLimits::default());
        pauses.push(PauseFigures {
            mib: size,
            stop_pause_ms: stop.pause_ms,
            live_pause_ms: live.pause_ms,
            live_passes: live.passes,
            live: live.live,
            live_seconds: live.seconds,
        });
    }
    let best_dd = dd_direct.max(dd_buffered);
    Ok(DumpBenchFigures {
        mib,
        dir: dir.display().to_string(),
        io: raw.io.clone(),
        raw_mib_s,
        lime_mib_s,
        dd_direct_mib_s: dd_direct,
        dd_buffered_mib_s: dd_buffered,
        read_physical_mib_s: read_physical,
        raw_vs_dd: raw_mib_s / best_dd,
        lime_vs_dd: lime_mib_s / best_dd,
        raw_vs_read_physical: raw_mib_s / read_physical,
        pauses,
    })
}

/// `kvmi dump-bench`: prints the table (or, with `json`, only the JSON line) and the JSON line.
pub fn command(image: &[u8], mib: u64, dir: Option<PathBuf>, json: bool) -> Result<u8> {
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    let figures = run(image, mib, &dir)?;
    if !json {
        print!("{}", figures.table());
    }
    println!(
        "{}",
        serde_json::json!({ "bench": "dump", "figures": figures })
    );
    Ok(0)
}
