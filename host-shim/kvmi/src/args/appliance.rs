//! The `kvmi run --appliance` flags: boot the target together with an appliance VM that
//! introspects it over the rings and reads its memory through the map window.

use std::time::Duration;

use hypercall::ring::RingSizes;
use protocol::masks::AllowedMasks;

use crate::args::introspection::KvmiRunArgs;
use appliance_link::launch::{
    ApplianceConfig, ApplianceReport, DEFAULT_WINDOW_SIZE, start_with_appliance,
};
use appliance_link::rings::{DEFAULT_FULL_TIMEOUT, stdout_sink};
use kvmi_engine::{IntrospectError, IntrospectorConfig, masks};
use vmm::devices::{SerialSink, UnknownIoPolicy};
use vmm::vm::{RunLimits, Vm, VmConfig};

/// A serial sink writing to the process's standard error (a duplicate of fd 2).
pub fn stderr_sink() -> std::io::Result<SerialSink> {
    use std::os::fd::AsFd;
    let fd = std::io::stderr().as_fd().try_clone_to_owned()?;
    Ok(SerialSink::File(std::fs::File::from(fd)))
}

/// Appliance options of `kvmi run`. With `--appliance`, stdout carries only the appliance's
/// JSON lines (log ring); both VMs' serial output goes to stderr (unless `--serial`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApplianceRunArgs {
    /// Boot an appliance VM next to the target, from an ELF file or an embedded image name
    /// (default when the flag has no value: the embedded `appliance`). Its log-ring lines are
    /// printed on stdout. The target's vCPUs start once the agent has answered their
    /// CREATE_VCPU event (as with --kvmi-wait).
    #[arg(
        long,
        value_name = "FILE|NAME",
        num_args = 0..=1,
        default_missing_value = "appliance",
        conflicts_with = "appliance_socket"
    )]
    pub appliance: Option<String>,
    /// Serve a host-process agent (guest-driver's host backend) on the unix socket PATH: the
    /// rings and window as memfds, hypercalls as socket requests.
    #[arg(long, value_name = "PATH")]
    pub appliance_socket: Option<std::path::PathBuf>,
    /// The appliance's command line.
    #[arg(long, value_name = "WORDS", default_value = "")]
    pub appliance_cmdline: String,
    /// The appliance's RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub appliance_memory: u64,
    /// Size of the appliance's map window in MiB (at most 256).
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_WINDOW_SIZE >> 20)]
    pub appliance_window: u64,
    /// When the appliance VM ends or is detached (crash, exit, reply timeout, corrupt ring)
    /// while the target runs, boot a fresh one and attach it, at most N times; after that
    /// the target runs on, unhooked.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub appliance_restarts: u32,
}

/// A bad appliance flag.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceArgsError {
    /// Both a KVMI socket and an appliance: one tool at a time.
    #[error(
        "--appliance cannot be combined with --kvmi-socket or --kvmi-connect (one tool at a time)"
    )]
    TwoTools,
    /// A size is out of range.
    #[error("{0}")]
    Size(&'static str),
    /// An unknown command or event name.
    #[error(transparent)]
    Name(#[from] masks::UnknownName),
    /// The setup failed.
    #[error(transparent)]
    Setup(#[from] IntrospectError),
}

/// `mib` MiB in bytes, if that lies in `bytes`; else the error `what`.
fn mib_in(
    mib: u64,
    bytes: std::ops::RangeInclusive<u64>,
    what: &'static str,
) -> Result<u64, ApplianceArgsError> {
    mib.checked_mul(1 << 20)
        .filter(|b| bytes.contains(b))
        .ok_or(ApplianceArgsError::Size(what))
}

impl ApplianceRunArgs {
    /// Whether `--appliance` was given.
    pub fn enabled(&self) -> bool {
        self.appliance.is_some()
    }

    /// The appliance VM options given without an appliance VM to apply them to (the main
    /// job's default appliance counts).
    pub fn orphan_options(&self) -> Option<&'static str> {
        if self.appliance.is_some() {
            return None;
        }
        if !self.appliance_cmdline.is_empty() {
            Some("--appliance-cmdline")
        } else if self.appliance_restarts != 0 {
            Some("--appliance-restarts")
        } else {
            None
        }
    }

    /// Runs `target` serving a host agent on `--appliance-socket` until the target ends.
    pub fn run_host_socket(
        &self,
        kvmi: &KvmiRunArgs,
        mut target: Vm,
        limits: RunLimits,
    ) -> Result<vmm::vm::RunReport, ApplianceArgsError> {
        let Some(path) = &self.appliance_socket else {
            return Err(ApplianceArgsError::Size("--appliance-socket needs a path"));
        };
        let window_size = mib_in(
            self.appliance_window,
            1 << 20..=256 << 20,
            "--appliance-window must be 1..=256 MiB",
        )?;
        let config = Self::introspector_config(kvmi)?;
        let caps = vmm::probe::cached_capabilities().map_err(|e| IntrospectError::Io {
            what: "capability probe".into(),
            source: std::io::Error::other(e),
        })?;
        let intro = kvmi_engine::Introspector::install(&mut target, caps, config)?;
        let ram = target.ram().clone();
        let vcpus = target.boot_info().vcpu_count;
        let running = target.start().map_err(IntrospectError::from)?;
        intro.set_handle(running.handle());
        let server = appliance_link::host_socket::HostSocketServer::start(
            intro,
            ram,
            vcpus,
            path,
            window_size,
        )?;
        let report = running.wait(limits);
        server.stop();
        Ok(report)
    }

    /// The introspector's configuration from the shared `--kvmi-*` / `--allow-*` flags.
    fn introspector_config(kvmi: &KvmiRunArgs) -> Result<IntrospectorConfig, ApplianceArgsError> {
        if kvmi.kvmi_socket.is_some() || kvmi.kvmi_connect.is_some() {
            return Err(ApplianceArgsError::TwoTools);
        }
        if !(kvmi.kvmi_timeout.is_finite() && kvmi.kvmi_timeout >= 0.0) {
            return Err(ApplianceArgsError::Size("--kvmi-timeout must be >= 0"));
        }
        let all = AllowedMasks::all();
        Ok(IntrospectorConfig {
            allowed: AllowedMasks {
                commands: match &kvmi.allow_commands {
                    Some(l) => masks::parse_commands(l)?,
                    None => all.commands,
                },
                events: match &kvmi.allow_events {
                    Some(l) => masks::parse_events(l)?,
                    None => all.events,
                },
            },
            reply_timeout: (kvmi.kvmi_timeout > 0.0)
                .then(|| Duration::from_secs_f64(kvmi.kvmi_timeout)),
            wait_for_tool: kvmi.kvmi_wait,
        })
    }

    /// Runs `target` with the appliance `image` (already loaded from `--appliance`) until the
    /// target ends within `limits`; prints a summary on stderr.
    pub fn run(
        &self,
        kvmi: &KvmiRunArgs,
        target: Vm,
        image: Vec<u8>,
        limits: RunLimits,
    ) -> Result<ApplianceReport, ApplianceArgsError> {
        // The target's vCPUs start once the agent has answered their CREATE_VCPU event, which
        // it does after its guard is in place: nothing the target does goes unwatched.
        let intro_config = IntrospectorConfig {
            wait_for_tool: true,
            ..Self::introspector_config(kvmi)?
        };
        let memory_bytes = mib_in(
            self.appliance_memory,
            2 << 20..=2 << 30,
            "--appliance-memory must be 2..=2048 MiB",
        )?;
        let window_size = mib_in(
            self.appliance_window,
            1 << 20..=256 << 20,
            "--appliance-window must be 1..=256 MiB",
        )?;
        let config = ApplianceConfig {
            vm: VmConfig {
                name: "kvmi-appliance".into(),
                memory_bytes,
                vcpus: 1,
                cmdline: self.appliance_cmdline.clone(),
                unknown_io: UnknownIoPolicy::Ignore,
            },
            image,
            serial: stderr_sink().map_err(|source| IntrospectError::Io {
                what: "duplicating stderr".into(),
                source,
            })?,
            log: stdout_sink(),
            window_size,
            sizes: RingSizes::default(),
            full_timeout: DEFAULT_FULL_TIMEOUT,
            restarts: self.appliance_restarts,
        };
        let run = start_with_appliance(target, intro_config, config)?;
        let report = run.wait(limits);
        eprintln!(
            "kvmi: appliance: target {}, appliance {}, rings {:?}, restarts {}; pages mapped {} \
             in {} calls, unmapped {}, refused calls {}, revoked at end {}",
            report.target.outcome,
            report
                .appliance
                .as_ref()
                .map_or("not run".to_string(), |r| r.outcome.to_string()),
            report.service,
            report.restarts,
            report.pages.pages_mapped,
            report.pages.map_calls,
            report.pages.pages_unmapped,
            report.pages.refused,
            report.revoked_at_end,
        );
        Ok(report)
    }
}
