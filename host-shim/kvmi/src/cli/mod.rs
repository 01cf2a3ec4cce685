//! `kvmi` subcommands that act on a running VM through its KVMI socket (`kvmi run
//! --kvmi-socket PATH`): watch events, read registers and memory, pause, protect pages, set
//! breakpoints, and the introspection benchmark.

pub mod api;
mod bench;
mod inspect;
mod signals;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use crate::images::Image;
use crate::profile::Profile;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kvmi_client::KvmiClient;

pub use bench::BenchArgs;

/// Where the VM's KVMI channel is.
#[derive(Args, Debug, Clone)]
pub struct SocketArgs {
    /// Connect to the socket a VM listens on (`kvmi run --kvmi-socket PATH`).
    #[arg(long, value_name = "PATH", required_unless_present = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen here and accept the VM's connection (`kvmi run --kvmi-connect PATH`).
    #[arg(long, value_name = "PATH", conflicts_with = "socket")]
    pub listen: Option<PathBuf>,
    /// How long to wait for the socket or the VM's connection, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Image whose profile resolves symbol names given as addresses (embedded name or ELF).
    #[arg(long, value_name = "IMAGE")]
    pub profile: Option<String>,
}

impl SocketArgs {
    /// Connects (or accepts) as asked.
    pub fn open(&self) -> Result<KvmiClient> {
        let wait = Duration::try_from_secs_f64(self.connect_timeout)
            .context("--connect-timeout must be a non-negative number")?;
        if let Some(path) = &self.listen {
            return KvmiClient::accept(path, wait)
                .with_context(|| format!("accepting a VM on {}", path.display()));
        }
        let Some(path) = &self.socket else {
            bail!("give --socket PATH or --listen PATH");
        };
        KvmiClient::connect_retry(path, wait)
            .with_context(|| format!("connecting to {}", path.display()))
    }

    /// Resolves an address: a number (`0x..` hex or decimal) or a profile symbol name
    /// (needs `--profile`), with an optional `+offset`.
    pub fn address(&self, text: &str) -> Result<u64> {
        let (base, offset) = match text.split_once('+') {
            Some((b, o)) => (b, parse_number(o)?),
            None => (text, 0),
        };
        let base = match parse_number(base) {
            Ok(n) => n,
            Err(_) => {
                let Some(image) = &self.profile else {
                    bail!("`{base}` is not a number (give --profile IMAGE to use symbol names)");
                };
                let profile = load_profile(image)?;
                profile
                    .symbol(base)
                    .or_else(|| profile.range(base).map(|r| r.start))
                    .with_context(|| format!("no symbol or range `{base}` in {image}'s profile"))?
            }
        };
        base.checked_add(offset).context("address overflows")
    }
}

fn load_profile(spec: &str) -> Result<Profile> {
    if let Some(image) = Image::from_name(spec) {
        return image
            .profile()
            .with_context(|| format!("{spec} is not embedded"))?
            .with_context(|| format!("profile of {spec}"));
    }
    let bytes = std::fs::read(spec).with_context(|| format!("reading {spec}"))?;
    Ok(Profile::from_elf(spec, &bytes)?)
}

/// A number in decimal or `0x` hex.
pub fn parse_number(text: &str) -> Result<u64> {
    let t = text.trim().replace('_', "");
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.with_context(|| format!("`{text}` is not a number"))
}

/// The subcommands on a running VM.
#[derive(Subcommand, Debug)]
pub enum ToolCommand {
    /// Attach to a VM and print its events as JSON lines, answering each with CONTINUE.
    #[command(visible_alias = "attach")]
    Events(watch::EventsArgs),
    /// Pause the VM, print a vCPU's registers as JSON, resume.
    Regs(inspect::RegsArgs),
    /// Print guest-physical memory as a hexdump.
    Read(inspect::ReadArgs),
    /// Pause every vCPU and hold them paused (until `kvmi resume`, Ctrl-C or --seconds).
    Pause(inspect::PauseArgs),
    /// Resume a VM paused by `kvmi pause`.
    Resume(inspect::ResumeArgs),
    /// Restrict page access and print the page-fault events as JSON lines (allowing each).
    Protect(watch::ProtectArgs),
    /// Set an execution breakpoint and print its hits as JSON lines.
    Break(watch::BreakArgs),
    /// Benchmark event round trips over the socket against the same exit without a tool.
    Bench(BenchArgs),
}

/// Runs one subcommand; returns the process exit status.
pub fn run(command: ToolCommand) -> Result<u8> {
    match command {
        ToolCommand::Events(a) => watch::events(&a),
        ToolCommand::Regs(a) => inspect::regs(&a),
        ToolCommand::Read(a) => inspect::read(&a),
        ToolCommand::Pause(a) => inspect::pause(&a),
        ToolCommand::Resume(a) => inspect::resume(&a),
        ToolCommand::Protect(a) => watch::protect(&a),
        ToolCommand::Break(a) => watch::breakpoint(&a),
        ToolCommand::Bench(a) => bench::run(&a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(profile: Option<&str>) -> SocketArgs {
        SocketArgs {
            socket: Some("/nonexistent".into()),
            listen: None,
            connect_timeout: 0.0,
            profile: profile.map(str::to_string),
        }
    }

    #[test]
    fn numbers_and_profile_symbols_resolve() {
        assert_eq!(parse_number("0x1_000").unwrap(), 0x1000);
        assert_eq!(parse_number("42").unwrap(), 42);
        assert!(parse_number("zz").is_err());
        let plain = socket(None);
        assert_eq!(plain.address("0x10+0x8").unwrap(), 0x18);
        assert!(
            plain.address("scratch_page").is_err(),
            "names need --profile"
        );
        let Some(Ok(profile)) = Image::TestGuest.profile() else {
            return; // built without embedded images
        };
        let with = socket(Some("test-guest"));
        let page = profile.symbol("scratch_page").unwrap();
        assert_eq!(with.address("scratch_page+8").unwrap(), page + 8);
        assert!(with.address("no_such_symbol").is_err());
        assert!(with.address("0xffffffffffffffff+1").is_err());
    }
}
