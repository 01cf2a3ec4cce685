//! `kvmi ctl` and `kvmi dump`: clients of a running `kvmi run --api-socket PATH` (docs/api.md).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::api::client::{Response, request};

/// How long a quick request (not a dump) may take.
const QUICK: Duration = Duration::from_secs(30);
/// How often `kvmi dump` asks for the progress.
const PROGRESS_PERIOD: Duration = Duration::from_millis(200);

/// `kvmi ctl`: one request to the management API, its JSON response on stdout.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The API socket (`kvmi run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub op: CtlOp,
}

/// The operations of `kvmi ctl`.
#[derive(Subcommand, Debug)]
pub enum CtlOp {
    /// The VMs: targets and the appliance, with vCPUs, memory, state and KVMI attachment.
    Info,
    /// Pause a target's vCPUs (default: every target).
    Pause {
        /// The target's id (`info`).
        #[arg(long, value_name = "ID")]
        target: Option<u64>,
    },
    /// Resume a target paused with `pause` (default: every target).
    Resume {
        /// The target's id.
        #[arg(long, value_name = "ID")]
        target: Option<u64>,
    },
    /// The targets' event counters.
    Stats,
    /// Dump a target's memory to a file the server writes (no progress bar: see `kvmi dump`).
    Dump(DumpOptions),
    /// The dumps under way (bytes done of total, pass).
    Progress,
    /// Add a target to the running appliance.
    Add {
        /// Its name (1..=32 bytes, unique).
        #[arg(long)]
        name: String,
        /// An embedded image's name or an ELF file.
        #[arg(long)]
        image: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// RAM in MiB.
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        memory: u64,
        /// The guest's command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// The profile the policy matches (default: the image's name).
        #[arg(long)]
        profile: Option<String>,
    },
    /// Stop a target and free its slot.
    Remove {
        /// The target's id.
        #[arg(value_name = "ID")]
        id: u64,
    },
}

/// The file formats of a dump.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DumpFormat {
    /// LiME (Volatility, `lime` ranges).
    Lime,
    /// ELF core (`virsh dump --memory-only` layout).
    Elf,
    /// A flat image, file offset = guest-physical address.
    Raw,
}

impl DumpFormat {
    fn name(self) -> &'static str {
        match self {
            DumpFormat::Lime => "lime",
            DumpFormat::Elf => "elf",
            DumpFormat::Raw => "raw",
        }
    }
}

/// What to dump.
#[derive(Args, Debug, Clone)]
pub struct DumpOptions {
    /// The output file (made absolute here; the server creates it).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// The file format.
    #[arg(long, value_enum)]
    pub format: DumpFormat,
    /// Pre-copy while the target runs, pausing it only for the last pass.
    #[arg(long)]
    pub live: bool,
    /// The target's id (default: the only running target).
    #[arg(long, value_name = "ID")]
    pub target: Option<u64>,
}

/// `kvmi dump`: dump a target's memory through the API, with a progress bar on a terminal.
#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The API socket (`kvmi run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(flatten)]
    pub dump: DumpOptions,
}

impl DumpOptions {
    /// The body of `PUT /vm/dump`.
    fn body(&self) -> Result<Vec<u8>> {
        let path = std::path::absolute(&self.output)
            .with_context(|| format!("the path of {}", self.output.display()))?;
        let path = path
            .to_str()
            .context("the output path is not UTF-8")?
            .to_string();
        let mut body = json!({ "path": path, "format": self.format.name(), "live": self.live });
        if let Some(t) = self.target {
            body["target"] = json!(t);
        }
        Ok(body.to_string().into_bytes())
    }
}

/// Prints a response: the JSON body on stdout and 0 on success, else the error on stderr
/// and 1.
fn finish(response: &Response) -> u8 {
    if response.is_success() {
        println!("{}", String::from_utf8_lossy(&response.body).trim_end());
        0
    } else {
        vmm::devices::eprint_line(format_args!(
            "kvmi: error: {} ({})",
            response.error_message(),
            response.status
        ));
        1
    }
}

fn target_body(target: Option<u64>) -> Vec<u8> {
    match target {
        Some(t) => json!({ "target": t }).to_string().into_bytes(),
        None => Vec::new(),
    }
}

/// Runs `kvmi ctl`; returns the exit status.
pub fn ctl(args: &CtlArgs) -> Result<u8> {
    let socket = &args.api_socket;
    let quick = |method: &str, route: &str, body: Vec<u8>| {
        request(socket, method, route, Some(&body), Some(QUICK))
    };
    let response = match &args.op {
        CtlOp::Info => quick("GET", "/vm/info", Vec::new()),
        CtlOp::Pause { target } => quick("PUT", "/vm/pause", target_body(*target)),
        CtlOp::Resume { target } => quick("PUT", "/vm/resume", target_body(*target)),
        CtlOp::Stats => quick("GET", "/vm/stats", Vec::new()),
        CtlOp::Progress => quick("GET", "/vm/dump/progress", Vec::new()),
        CtlOp::Dump(d) => request(socket, "PUT", "/vm/dump", Some(&d.body()?), None),
        CtlOp::Add {
            name,
            image,
            vcpus,
            memory,
            cmdline,
            profile,
        } => {
            // A file is named to the server by its absolute path.
            let image = if Path::new(image).is_file() {
                std::path::absolute(image)?.display().to_string()
            } else {
                image.clone()
            };
            let mut body = json!({
                "name": name, "image": image, "vcpus": vcpus,
                "memory_mib": memory, "cmdline": cmdline,
            });
            if let Some(p) = profile {
                body["profile"] = json!(p);
            }
            quick("PUT", "/vm/targets", body.to_string().into_bytes())
        }
        CtlOp::Remove { id } => quick("DELETE", &format!("/vm/targets/{id}"), Vec::new()),
    };
    match response {
        Ok(r) => Ok(finish(&r)),
        Err(e) => {
            vmm::devices::eprint_line(format_args!("kvmi: error: {e}"));
            Ok(1)
        }
    }
}

/// Draws the progress of target `target`'s dump on stderr until `done` is set.
fn progress_bar(socket: PathBuf, target: Option<u64>, done: Arc<AtomicBool>) {
    let mut drawn = false;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(PROGRESS_PERIOD);
        let Ok(r) = request(&socket, "GET", "/vm/dump/progress", None, Some(QUICK)) else {
            continue;
        };
        let json = r.json();
        let Some(dumps) = json["dumps"].as_array() else {
            continue;
        };
        let dump = match target {
            Some(t) => dumps.iter().find(|d| d["target"] == t),
            None => dumps.first(),
        };
        let Some(d) = dump else { continue };
        let (done_b, total, pass) = (
            d["done"].as_u64().unwrap_or(0),
            d["total"].as_u64().unwrap_or(0),
            d["pass"].as_u64().unwrap_or(0),
        );
        let fraction = if total == 0 {
            0.0
        } else {
            (done_b as f64 / total as f64).min(1.0)
        };
        let width = 30;
        let filled = (fraction * width as f64) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {:5.1}% {} / {} MiB, pass {pass} ",
            "#".repeat(filled),
            ".".repeat(width - filled),
            fraction * 100.0,
            done_b >> 20,
            total >> 20,
        );
        let _ = err.flush();
        drawn = true;
    }
    if drawn {
        let _ = writeln!(std::io::stderr());
    }
}

/// Runs `kvmi dump`: the dump request, a progress bar on stderr when it is a terminal, and
/// the summary as one JSON line on stdout. Returns the exit status.
pub fn dump(args: &DumpArgs) -> Result<u8> {
    let body = args.dump.body()?;
    let done = Arc::new(AtomicBool::new(false));
    let bar = std::io::stderr().is_terminal().then(|| {
        let (socket, target, done) = (args.api_socket.clone(), args.dump.target, done.clone());
        std::thread::spawn(move || progress_bar(socket, target, done))
    });
    let response = request(&args.api_socket, "PUT", "/vm/dump", Some(&body), None);
    done.store(true, Ordering::SeqCst);
    if let Some(bar) = bar {
        let _ = bar.join();
    }
    match response {
        Ok(r) if r.is_success() => {
            println!("{}", r.json());
            Ok(0)
        }
        Ok(r) => Ok(finish(&r)),
        Err(e) => {
            vmm::devices::eprint_line(format_args!("kvmi: error: {e}"));
            Ok(1)
        }
    }
}
