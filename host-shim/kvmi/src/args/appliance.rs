//! The `kvmi run --appliance` flags: boot the target together with an appliance VM that
//! introspects it over the rings and reads its memory through the map window.

use std::sync::Arc;
use std::time::Duration;

use hypercall::ring::RingSizes;
use protocol::masks::AllowedMasks;

use crate::args::introspection::KvmiRunArgs;
use appliance_link::fleet::{Fleet, FleetConfig, FleetReport, MAX_SLOT_WINDOW, TargetSpec};
use appliance_link::launch::{
    ApplianceConfig, ApplianceReport, DEFAULT_WINDOW_SIZE, start_with_appliance,
};
use appliance_link::rings::{DEFAULT_FULL_TIMEOUT, LogSink, stdout_sink};
use kvmi_engine::{IntrospectError, IntrospectorConfig, masks};
use vmm::devices::{SerialSink, UnknownIoPolicy};
use vmm::vm::{RunLimits, Vm, VmConfig};

/// The introspection and appliance flag groups of `kvmi run`, parsed from `flags` (the words
/// after `kvmi run`, e.g. `["--appliance"]`) with the command line's defaults. For callers
/// that set up a run the way `kvmi run` does (the end-to-end tests of the main job).
pub fn parse_flags<I, T>(flags: I) -> Result<(KvmiRunArgs, ApplianceRunArgs), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(clap::Parser)]
    #[command(name = "kvmi run")]
    struct Flags {
        #[command(flatten)]
        kvmi: KvmiRunArgs,
        #[command(flatten)]
        appliance: ApplianceRunArgs,
    }
    let words = std::iter::once(std::ffi::OsString::from("kvmi run"))
        .chain(flags.into_iter().map(Into::into));
    let parsed = <Flags as clap::Parser>::try_parse_from(words)?;
    Ok((parsed.kvmi, parsed.appliance))
}

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
    /// The policy: what the appliance guards on which targets (TOML or JSON, schema in
    /// docs/policy.md) [default: the demo policy, policies/demo.toml]. Checked against the
    /// targets' profiles before any VM starts.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<std::path::PathBuf>,
    /// The targets, each with its own image, vCPUs, memory, command line, profile, name and
    /// start delay, in a TOML file (see `kvmi::args::fleet_config`); instead of --image,
    /// --vcpus, --memory, --cmdline and --targets.
    #[arg(long, value_name = "FILE", conflicts_with = "targets")]
    pub config: Option<std::path::PathBuf>,
    /// Boot N targets (named `<image>-1` .. `<image>-N`, each with --vcpus, --memory and
    /// --cmdline), all guarded by the one appliance VM (at most 8).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub targets: u32,
    /// Slots of the appliance: the most targets guarded at once, at least the targets booted
    /// (at most 8) [default: the number of targets; 8 with --api-socket, so that targets
    /// can be added].
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
}

/// The most vCPUs of a target added through the API (when the booted targets have fewer):
/// every slot's ring region is sized for it.
pub const API_MAX_VCPUS: u32 = 4;

/// The management API of a fleet run: the bound socket and how added targets are built.
pub struct FleetApi {
    /// The bound API socket.
    pub listener: crate::api::ApiListener,
    /// Builds a target's VM from a `PUT /vm/targets` request.
    pub factory: crate::api::TargetFactory,
}

/// One target of `kvmi run` with an appliance.
pub struct FleetTarget {
    /// Its name.
    pub name: String,
    /// Its profile's name (what the policy matches).
    pub profile: String,
    /// The VM, built.
    pub vm: Vm,
    /// When it joins the appliance, from the start (zero: at once).
    pub start_after: Duration,
}

/// The demo policy (`policies/demo.toml`): what `kvmi run` guards without `--policy`.
pub const DEMO_POLICY: &str = include_str!("../../../../policies/demo.toml");

impl ApplianceRunArgs {
    /// Compiles `--policy` (or the demo policy) against `profiles` (profile name → the
    /// image's profile JSON, as `kvmi profile` prints it): the JSON the appliance receives.
    pub fn compile_policy(
        &self,
        profiles: &std::collections::HashMap<String, String>,
    ) -> Result<Vec<u8>, kvmi_policy::PolicyError> {
        let lookup = |name: &str| {
            profiles
                .get(name)
                .and_then(|json| appliance::profile::Profile::from_json(json.as_bytes()).ok())
        };
        let compiled = match &self.policy {
            Some(path) => kvmi_policy::load(path, &lookup)?,
            None => kvmi_policy::compile_named(
                "policies/demo.toml",
                DEMO_POLICY,
                kvmi_policy::Format::Toml,
                &lookup,
            )?,
        };
        Ok(compiled.to_json())
    }
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
    /// The API server did not start.
    #[error("the API server: {0}")]
    Api(#[from] crate::api::ServerError),
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
        } else if self.targets != 1 {
            Some("--targets")
        } else if self.policy.is_some() {
            Some("--policy")
        } else if self.config.is_some() {
            Some("--config")
        } else if self.slots.is_some() {
            Some("--slots")
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

    /// The configuration [`ApplianceRunArgs::run`] starts the target and the appliance VM
    /// with: the target's introspector (its vCPUs wait for the agent) and the appliance VM
    /// booting `image`, its serial output going to `serial` and its log-ring lines to `log`
    /// (`kvmi run`: stderr and stdout). The end-to-end tests run the main job from it too.
    pub fn setup(
        &self,
        kvmi: &KvmiRunArgs,
        image: Vec<u8>,
        serial: SerialSink,
        log: LogSink,
    ) -> Result<(IntrospectorConfig, ApplianceConfig), ApplianceArgsError> {
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
            serial,
            log,
            window_size,
            sizes: RingSizes::default(),
            full_timeout: DEFAULT_FULL_TIMEOUT,
            restarts: self.appliance_restarts,
        };
        Ok((intro_config, config))
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
        let serial = stderr_sink().map_err(|source| IntrospectError::Io {
            what: "duplicating stderr".into(),
            source,
        })?;
        let (intro_config, config) = self.setup(kvmi, image, serial, stdout_sink())?;
        let run = start_with_appliance(target, intro_config, config)?;
        let report = run.wait(limits);
        vmm::devices::eprint_line(format_args!(
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
        ));
        Ok(report)
    }
}

impl ApplianceRunArgs {
    /// Runs `targets` (name, profile, VM) under one appliance VM booting `image` until every
    /// target has ended, or `limits` expire (the agent then prints its final summaries);
    /// prints a line per target on stderr. With `api`, the management API serves the fleet
    /// while it runs.
    pub fn run_fleet(
        &self,
        kvmi: &KvmiRunArgs,
        targets: Vec<FleetTarget>,
        image: Vec<u8>,
        policy: Vec<u8>,
        limits: RunLimits,
        api: Option<FleetApi>,
    ) -> Result<FleetReport, ApplianceArgsError> {
        let serial = stderr_sink().map_err(|source| IntrospectError::Io {
            what: "duplicating stderr".into(),
            source,
        })?;
        let (intro_config, mut config) = self.setup(kvmi, image, serial, stdout_sink())?;
        let booted = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let default_slots = if api.is_some() {
            hypercall::directory::MAX_SLOTS
        } else {
            booted
        };
        let slots = self.slots.unwrap_or(default_slots.max(booted));
        if !(booted..=hypercall::directory::MAX_SLOTS).contains(&slots) {
            return Err(ApplianceArgsError::Size(
                "--slots must be at least the number of targets and at most 8",
            ));
        }
        if slots > 1 && config.window_size > MAX_SLOT_WINDOW {
            config.window_size = MAX_SLOT_WINDOW;
        }
        let mut max_vcpus = targets
            .iter()
            .map(|t| t.vm.boot_info().vcpu_count)
            .max()
            .unwrap_or(1);
        if api.is_some() {
            max_vcpus = max_vcpus.max(API_MAX_VCPUS);
        }
        let api_intro = intro_config.clone();
        let (now, later): (Vec<FleetTarget>, Vec<FleetTarget>) =
            targets.into_iter().partition(|t| t.start_after.is_zero());
        let spec = |t: FleetTarget| TargetSpec {
            name: t.name,
            profile: t.profile,
            vm: t.vm,
            introspection: intro_config.clone(),
        };
        let fleet = Arc::new(Fleet::start(
            FleetConfig {
                appliance: config,
                slots,
                max_vcpus,
                policy,
            },
            now.into_iter().map(spec).collect(),
        )?);
        let server = match api {
            Some(FleetApi { listener, factory }) => {
                let backend = crate::api::FleetBackend::new(fleet.clone(), factory, api_intro);
                match crate::api::ApiServer::start(listener, Arc::new(backend)) {
                    Ok(server) => Some(server),
                    Err(e) => {
                        fleet.wait(RunLimits {
                            timeout: Some(Duration::ZERO),
                            interrupt: None,
                        });
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        // Targets that start later join the running appliance from a thread of their own.
        let started = std::time::Instant::now();
        let mut later = later;
        later.sort_by_key(|t| t.start_after);
        let joiner = (!later.is_empty()).then(|| {
            let (fleet, specs): (_, Vec<(Duration, TargetSpec)>) = (
                fleet.clone(),
                later
                    .into_iter()
                    .map(|t| (t.start_after, spec(t)))
                    .collect(),
            );
            std::thread::spawn(move || {
                for (after, spec) in specs {
                    std::thread::sleep(after.saturating_sub(started.elapsed()));
                    let name = spec.name.clone();
                    match fleet.add_target(spec) {
                        Ok(id) => vmm::devices::eprint_line(format_args!(
                            "kvmi: target {id} ({name}) joined the appliance"
                        )),
                        Err(e) => vmm::devices::eprint_line(format_args!(
                            "kvmi: target {name} could not join: {e}"
                        )),
                    }
                }
            })
        });
        let report = fleet.wait(limits);
        drop(server);
        if let Some(joiner) = joiner {
            let _ = joiner.join();
        }
        for t in &report.targets {
            vmm::devices::eprint_line(format_args!(
                "kvmi: target {} ({}): {}; pages mapped {} in {} calls, unmapped {}, refused calls {}",
                t.id,
                t.name,
                t.run.outcome,
                t.pages.pages_mapped,
                t.pages.map_calls,
                t.pages.pages_unmapped,
                t.pages.refused,
            ));
        }
        vmm::devices::eprint_line(format_args!(
            "kvmi: appliance {}, rings {:?}, restarts {}",
            report
                .appliance
                .as_ref()
                .map_or("not run".to_string(), |r| r.outcome.to_string()),
            report.service,
            report.restarts,
        ));
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_job_gates_the_target_with_the_command_line_defaults() {
        let (kvmi, appliance) = parse_flags(["--appliance"]).unwrap();
        assert_eq!(appliance.appliance.as_deref(), Some("appliance"));
        let (intro, config) = appliance
            .setup(&kvmi, vec![0x7f], SerialSink::Null, Box::new(|_: &[u8]| {}))
            .unwrap();
        assert!(intro.wait_for_tool, "the target waits for the agent");
        assert_eq!(intro.reply_timeout, Some(Duration::from_secs(10)));
        assert_eq!(intro.allowed, AllowedMasks::all());
        assert_eq!(config.vm.memory_bytes, 64 << 20);
        assert_eq!(config.vm.vcpus, 1);
        assert_eq!(config.window_size, DEFAULT_WINDOW_SIZE);
        assert_eq!(config.restarts, 0);
        assert_eq!(config.image, vec![0x7f]);
    }

    #[test]
    fn the_main_job_setup_applies_the_flags() {
        let (kvmi, appliance) = parse_flags([
            "--appliance",
            "--appliance-cmdline",
            "events=5",
            "--appliance-restarts",
            "2",
            "--kvmi-timeout",
            "0",
        ])
        .unwrap();
        let (intro, config) = appliance
            .setup(&kvmi, Vec::new(), SerialSink::Null, Box::new(|_: &[u8]| {}))
            .unwrap();
        assert!(intro.wait_for_tool);
        assert_eq!(intro.reply_timeout, None);
        assert_eq!(config.vm.cmdline, "events=5");
        assert_eq!(config.restarts, 2);
        let (kvmi, appliance) =
            parse_flags(["--appliance", "--kvmi-socket", "/tmp/kvmi.sock"]).unwrap();
        assert!(matches!(
            appliance.setup(&kvmi, Vec::new(), SerialSink::Null, Box::new(|_: &[u8]| {})),
            Err(ApplianceArgsError::TwoTools)
        ));
        assert!(parse_flags(["--no-such-flag"]).is_err());
    }
}
