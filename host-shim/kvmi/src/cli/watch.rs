//! Subcommands that stay attached and print events: `events`, `protect`, `break`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kvmi_client::{ClientError, KvmiClient, json, parse_access, parse_event_list};
use protocol::event::EventSet;
use protocol::types::PageAccessEntry;
use protocol::{EventKind, event::EventPayload};

use super::{SocketArgs, signals};

/// Events watched when `--enable` is not given (those that do not flood the guest).
const DEFAULT_EVENTS: &str = "hypercall,msr,breakpoint,page_fault,trap,create_vcpu";

/// Options shared by the watching subcommands.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this many seconds (default: until Ctrl-C or the VM goes away).
    #[arg(long, value_name = "SECS")]
    pub seconds: Option<f64>,
}

/// `kvmi events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Events to enable on every vCPU, comma-separated (page_fault, msr, breakpoint,
    /// hypercall, trap, singlestep, create_vcpu, pause_vcpu, ...). Default: those the host
    /// allows among hypercall, msr, breakpoint, page_fault, trap, create_vcpu.
    #[arg(long, value_name = "LIST")]
    enable: Option<String>,
    /// MSRs whose writes to intercept (with the msr event), comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    msr: Vec<String>,
    #[command(flatten)]
    watch: WatchArgs,
}

/// `kvmi protect`.
#[derive(Args, Debug)]
pub struct ProtectArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// A guest-physical address or range `START..END` (pages touching it are protected).
    #[arg(value_name = "GPA[..GPA]")]
    range: String,
    /// Rights to leave, rwx-style (`r--` traps writes and fetches, `---` every access).
    #[arg(long, value_name = "RWX")]
    access: String,
    #[command(flatten)]
    watch: WatchArgs,
}

/// `kvmi break`.
#[derive(Args, Debug)]
pub struct BreakArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Guest-virtual address of the instruction (number, or symbol with --profile).
    #[arg(value_name = "ADDR")]
    address: String,
    #[command(flatten)]
    watch: WatchArgs,
}

/// Prints events as JSON lines and answers each with CONTINUE until a limit is reached.
/// Returns the number of events printed that `counted` accepts.
fn print_events(
    client: &KvmiClient,
    watch: &WatchArgs,
    counted: impl Fn(&EventPayload) -> bool,
) -> Result<u64> {
    signals::install();
    let end = match watch.seconds {
        Some(s) => Some(
            Instant::now()
                + Duration::try_from_secs_f64(s).context("--seconds must be non-negative")?,
        ),
        None => None,
    };
    let mut seen = 0;
    let mut out = std::io::stdout().lock();
    while watch.count.is_none_or(|n| seen < n) && !signals::stopped() {
        if end.is_some_and(|e| Instant::now() >= e) {
            break;
        }
        let ev = match client.next_event(Duration::from_millis(100)) {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(ClientError::Closed(reason)) => {
                eprintln!("kvmi: channel closed: {reason}");
                return Ok(seen);
            }
            Err(e) => return Err(e.into()),
        };
        writeln!(out, "{}", json::received_json(&ev))?;
        out.flush()?;
        if counted(&ev.event.payload) {
            seen += 1;
        }
        client.reply_continue(&ev)?;
    }
    Ok(seen)
}

/// `kvmi events`: enable events on every vCPU and print them.
pub fn events(args: &EventsArgs) -> Result<u8> {
    let client = args.socket.open()?;
    let allowed = client.get_version()?.allowed;
    let wanted = match &args.enable {
        Some(list) => parse_event_list(list)?,
        None => parse_event_list(DEFAULT_EVENTS)?
            .into_iter_kinds()
            .filter(|k| allowed.allows_event(*k))
            .collect(),
    };
    if wanted.contains(EventKind::Msr) {
        let vcpus = client.get_guest_info()?.vcpu_count;
        for msr in &args.msr {
            let msr = u32::try_from(super::parse_number(msr)?).context("MSR index")?;
            for vcpu in 0..vcpus {
                client
                    .control_msr(vcpu, msr, true)
                    .with_context(|| format!("intercepting MSR {msr:#x}"))?;
            }
        }
    }
    client
        .control_events_all(wanted)
        .context("enabling the events")?;
    print_events(&client, &args.watch, |_| true)?;
    client.close();
    Ok(0)
}

/// Page-aligned start and end of `START[..END]`.
fn page_range(socket: &SocketArgs, text: &str) -> Result<(u64, u64)> {
    let (start, end) = match text.split_once("..") {
        Some((a, b)) => (socket.address(a)?, socket.address(b)?),
        None => {
            let a = socket.address(text)?;
            (a, a + 1)
        }
    };
    if end <= start {
        bail!("empty range {start:#x}..{end:#x}");
    }
    let first = start & !0xfff;
    let last = end.checked_add(0xfff).context("range end overflows")? & !0xfff;
    if (last - first) / 4096 > 65_536 {
        bail!("range {start:#x}..{end:#x} covers more than 65536 pages");
    }
    Ok((first, last))
}

/// `kvmi protect`: set the rights, print page faults, restore the rights on exit.
pub fn protect(args: &ProtectArgs) -> Result<u8> {
    let access = parse_access(&args.access)?;
    let (first, last) = page_range(&args.socket, &args.range)?;
    let client = args.socket.open()?;
    let entries: Vec<PageAccessEntry> = (first..last)
        .step_by(4096)
        .map(|gpa| PageAccessEntry { gpa, access })
        .collect();
    client
        .control_events_all(EventSet::EMPTY.with(EventKind::PageFault))
        .context("enabling page_fault events")?;
    for chunk in entries.chunks(256) {
        client
            .set_page_access(0, chunk)
            .context("setting page access")?;
    }
    let n = print_events(&client, &args.watch, |p| {
        matches!(p, EventPayload::PageFault { .. })
    })?;
    let restore: Vec<PageAccessEntry> = entries
        .iter()
        .map(|e| PageAccessEntry {
            gpa: e.gpa,
            access: protocol::types::Access::RWX,
        })
        .collect();
    for chunk in restore.chunks(256) {
        if let Err(e) = client.set_page_access(0, chunk) {
            eprintln!("kvmi: restoring page access: {e} (detaching restores it too)");
            break;
        }
    }
    tracing::info!("{n} page-fault events");
    client.close();
    Ok(0)
}

/// `kvmi break`: set the breakpoint on every vCPU, print hits, clear it on exit.
pub fn breakpoint(args: &BreakArgs) -> Result<u8> {
    let gva = args.socket.address(&args.address)?;
    let client = args.socket.open()?;
    client
        .control_events_all(EventSet::EMPTY.with(EventKind::Breakpoint))
        .context("enabling breakpoint events")?;
    client
        .control_breakpoint(None, gva, true)
        .with_context(|| format!("setting a breakpoint at {gva:#x}"))?;
    print_events(&client, &args.watch, |p| {
        matches!(p, EventPayload::Breakpoint { .. })
    })?;
    if let Err(e) = client.control_breakpoint(None, gva, false) {
        eprintln!("kvmi: clearing the breakpoint: {e} (detaching clears it too)");
    }
    client.close();
    Ok(0)
}

/// Iterating the kinds of an event set.
trait Kinds {
    fn into_iter_kinds(self) -> impl Iterator<Item = EventKind>;
}

impl Kinds for EventSet {
    fn into_iter_kinds(self) -> impl Iterator<Item = EventKind> {
        EventKind::ALL
            .into_iter()
            .filter(move |k| self.contains(*k))
    }
}
