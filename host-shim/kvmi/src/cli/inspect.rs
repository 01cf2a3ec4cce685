//! One-shot subcommands: `regs`, `read`, and the `pause` / `resume` pair.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kvmi_client::json::{self as event_json, received_json};
use serde_json::json;

use super::{SocketArgs, parse_number, signals};

/// MSRs `kvmi regs` prints besides the event header's: FS/GS base, kernel GS base, TSC aux.
const EXTRA_MSRS: [u32; 3] = [0xc000_0100, 0xc000_0101, 0xc000_0102];

/// `kvmi regs`.
#[derive(Args, Debug)]
pub struct RegsArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// The vCPU.
    #[arg(long, default_value_t = 0)]
    vcpu: u16,
}

/// `kvmi read`.
#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Guest-physical address (number, or symbol with --profile).
    #[arg(value_name = "GPA")]
    gpa: String,
    /// Number of bytes (at most 1 MiB).
    #[arg(value_name = "LEN")]
    len: String,
}

/// `kvmi pause`.
#[derive(Args, Debug)]
pub struct PauseArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Resume by itself after this many seconds (default: hold until `kvmi resume`/Ctrl-C).
    #[arg(long, value_name = "SECS")]
    seconds: Option<f64>,
}

/// `kvmi resume`.
#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The socket given to `kvmi pause`.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
}

/// `kvmi regs`: pause every vCPU (a consistent snapshot), print one vCPU's registers, resume.
pub fn regs(args: &RegsArgs) -> Result<u8> {
    let client = args.socket.open()?;
    let paused = client
        .pause_all(Duration::from_secs(10))
        .context("pausing the VM")?;
    let result = client.get_registers(args.vcpu, &EXTRA_MSRS);
    client.resume(&paused).context("resuming the VM")?;
    let state = result.with_context(|| format!("registers of vCPU {}", args.vcpu))?;
    let s = &state.sregs;
    let hex = |v: u64| format!("{v:#x}");
    let msrs: serde_json::Map<String, serde_json::Value> = state
        .msrs
        .iter()
        .map(|m| (format!("{:#x}", m.index), hex(m.data).into()))
        .collect();
    let out = json!({
        "vcpu": args.vcpu,
        "mode": state.mode.bytes() * 8,
        "regs": event_json::regs_json(&state.regs),
        "cr0": hex(s.cr0.get()), "cr2": hex(s.cr2.get()), "cr3": hex(s.cr3.get()),
        "cr4": hex(s.cr4.get()), "efer": hex(s.efer.get()),
        "cs": hex(s.cs.selector.get().into()), "ss": hex(s.ss.selector.get().into()),
        "cpl": s.cs.dpl,
        "msrs": msrs,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    client.close();
    Ok(0)
}

/// Writes a classic hexdump of `data` (addresses from `base`).
pub fn hexdump(out: &mut impl Write, base: u64, data: &[u8]) -> std::io::Result<()> {
    for (i, line) in data.chunks(16).enumerate() {
        let addr = base + (i as u64) * 16;
        let hexes: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        writeln!(out, "{addr:016x}  {:<47}  |{text}|", hexes.join(" "))?;
    }
    Ok(())
}

/// `kvmi read`: READ_PHYSICAL page by page, printed as a hexdump.
pub fn read(args: &ReadArgs) -> Result<u8> {
    let gpa = args.socket.address(&args.gpa)?;
    let len = parse_number(&args.len)?;
    if len == 0 || len > 1 << 20 {
        bail!("LEN must be 1..=1048576 bytes");
    }
    let client = args.socket.open()?;
    let data = client
        .read_physical_range(gpa, len)
        .with_context(|| format!("reading {len:#x} bytes at {gpa:#x}"))?;
    hexdump(&mut std::io::stdout().lock(), gpa, &data)?;
    client.close();
    Ok(0)
}

/// The file `kvmi pause` leaves next to the socket, holding its pid.
fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".paused");
    PathBuf::from(name)
}

/// `kvmi pause`: pause every vCPU, print the pause events, hold the channel (the pause lasts
/// while the tool is attached; the host resumes everything when a tool detaches).
pub fn pause(args: &PauseArgs) -> Result<u8> {
    signals::install();
    let client = args.socket.open()?;
    let paused = client
        .pause_all(Duration::from_secs(10))
        .context("pausing the VM")?;
    for ev in &paused {
        println!("{}", received_json(ev));
    }
    std::io::stdout().flush()?;
    let marker = args.socket.socket.as_deref().map(pid_file);
    if let Some(m) = &marker {
        std::fs::write(m, std::process::id().to_string())
            .with_context(|| format!("writing {}", m.display()))?;
    }
    let end = args
        .seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    while !signals::stopped() && end.is_none_or(|e| Instant::now() < e) {
        if client.wait_closed(Duration::from_millis(100)) {
            eprintln!("kvmi: channel closed while paused");
            break;
        }
    }
    let resumed = client.resume(&paused);
    if let Some(m) = &marker {
        let _ = std::fs::remove_file(m);
    }
    resumed.context("resuming the VM")?;
    eprintln!("kvmi: resumed {} vCPUs", paused.len());
    client.close();
    Ok(0)
}

/// `kvmi resume`: tell the `kvmi pause` holding this socket to resume and detach.
pub fn resume(args: &ResumeArgs) -> Result<u8> {
    let marker = pid_file(&args.socket);
    let text = std::fs::read_to_string(&marker).with_context(|| {
        format!(
            "no `kvmi pause` holds {} (no {})",
            args.socket.display(),
            marker.display()
        )
    })?;
    let pid: libc::pid_t = text.trim().parse().context("bad pid file")?;
    if pid <= 0 {
        bail!("bad pid {pid} in {}", marker.display());
    }
    // SAFETY: kill(2) with a positive pid read from our own marker file; no memory involved.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let _ = std::fs::remove_file(&marker);
        bail!(
            "`kvmi pause` (pid {pid}) is gone: {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while marker.exists() {
        if Instant::now() >= deadline {
            bail!("`kvmi pause` (pid {pid}) did not resume within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hexdump_lines_show_address_bytes_and_text() {
        let mut out = Vec::new();
        let data: Vec<u8> = (0..20u8).map(|i| b'A' + i).collect();
        hexdump(&mut out, 0x1000, &data).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("0000000000001000  41 42 43"));
        assert!(lines[0].ends_with("|ABCDEFGHIJKLMNOP|"));
        assert!(lines[1].starts_with("0000000000001010  51 52 53 54 "));
        assert!(lines[1].ends_with("|QRST|"));
    }

    #[test]
    fn pid_file_sits_next_to_the_socket() {
        assert_eq!(
            pid_file(Path::new("/tmp/vm.sock")),
            PathBuf::from("/tmp/vm.sock.paused")
        );
    }
}
