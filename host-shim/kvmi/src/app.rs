//! The `kvmi` command line: `run`, `caps`, `profile`, `appliance-bench`, and the tool
//! subcommands of `crate::cli` on a running VM's KVMI socket.

use crate::cli;

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::images::Image;
use crate::profile::Profile;
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use vmm::outcome::{
    EXIT_ALL_HALTED, EXIT_EMULATION_FAILURE, EXIT_INTERRUPTED, EXIT_SHUTDOWN, EXIT_TIMEOUT,
    EXIT_VMM_ERROR,
};
use vmm::{RunLimits, SerialSink, UnknownIoPolicy, Vm, VmConfig};

const EXIT_STATUS_HELP: &str = "\
EXIT STATUS of `kvmi run`:
  0..=255  the guest's debug-exit value (port 0xf4; values above 255 clamp to 255)
  123      every vCPU halted without a debug exit
  124      the --timeout limit passed (every vCPU was kicked and stopped)
  125      VMM error: bad image or option, KVM failure, unknown I/O with --unknown-io error,
           KVM entry failure or an exit the VMM does not handle
  126      KVM could not emulate a guest instruction (the message names rip and its bytes)
  127      the guest shut down (triple fault)
  130      interrupted by Ctrl-C
A guest may also write one of these values itself; the message on stderr tells them apart.
A command-line usage error exits with 2 after printing the usage.";

const RUN_HELP: &str = "\
EXAMPLES:
  kvmi run                                     the main job: the demo target OS watched by the
                                               appliance VM (JSON findings on stdout, the
                                               guests' serial output on stderr), until Ctrl-C
  kvmi run --no-appliance                      the demo target alone (serial on stdout)
  kvmi run --cmdline rounds=20 --vcpus 2       20 scheduler rounds on 2 vCPUs, then exit 0
  kvmi run --image test-guest --cmdline mode=hello --serial out.txt --timeout 10
  kvmi run --image guest.elf --unknown-io error
  kvmi run --appliance agent.elf --appliance-cmdline verbose=1
Images and their command lines are described in images/README.md.
";

/// Run freestanding guest images on KVM and introspect them. With no subcommand: `kvmi run`,
/// the main job (the demo target watched by the appliance VM).
#[derive(Parser, Debug)]
#[command(name = "kvmi", version, after_help = EXIT_STATUS_HELP)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest image and run it until it exits (serial output on stdout by default).
    #[command(after_help = format!("{RUN_HELP}\n{EXIT_STATUS_HELP}"))]
    Run(Box<RunArgs>),
    /// Probe what this host's KVM delivers (breakpoints, single step, MSR filter, traps...).
    Caps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an image's JSON profile (from its kvmi_profile.* ELF symbols).
    Profile {
        /// An ELF file, or the name of an embedded image (demo-target, test-guest).
        #[arg(long, default_value = "demo-target")]
        image: String,
    },
    /// Appliance benchmarks: target memory through the map window vs READ_PHYSICAL, and the
    /// map cost per page, single vs batched (ratios measured in one run).
    ApplianceBench {
        /// MiB of target memory to read (1..=256).
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Events per path for the event round trip (rings, socket in the v4 and libkvmi
        /// dialects, raw floor; 0 = skip).
        #[arg(long, default_value_t = 2000)]
        events: u64,
        /// Instead: one appliance guarding N test-guest targets at once, aggregate events/s
        /// against the sum of their floors, each target's share, loss and fairness (1..=8).
        #[arg(long, value_name = "N")]
        targets: Option<u32>,
        /// vCPUs per target with --targets (each writes --writes words).
        #[arg(long, value_name = "M", default_value_t = 1, requires = "targets")]
        vcpus: u32,
        /// Writes (events) per vCPU with --targets.
        #[arg(long, value_name = "K", default_value_t = 2000, requires = "targets")]
        writes: u64,
        /// Print the --targets figures as one JSON line too.
        #[arg(long, requires = "targets")]
        json: bool,
    },
    /// Memory-dump benchmark: dump throughput vs dd and READ_PHYSICAL, live vs stop-and-copy
    /// pause (ratios measured in one run).
    DumpBench {
        /// MiB of guest RAM to dump for throughput (16..=4096).
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Directory for the files [default: the temp directory].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Write an embedded image's ELF to a file (for gdb's `file`, objdump, ...).
    Image {
        /// The embedded image (demo-target, test-guest, appliance, example-agent).
        #[arg(value_name = "NAME")]
        name: String,
        /// Where to write the ELF.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Debug a running VM with gdb: a GDB remote stub on its KVMI socket (vCPUs are threads).
    Gdb(crate::gdb::GdbArgs),
    /// Talk to a running `kvmi run --api-socket PATH`: info, pause, resume, stats, dump,
    /// add and remove targets (prints the JSON response; exit 1 when the API refuses).
    Ctl(cli::api::CtlArgs),
    /// Dump a target's memory through `kvmi run --api-socket PATH` (a progress bar on a
    /// terminal, the summary as one JSON line on stdout).
    Dump(cli::api::DumpArgs),
    /// Subcommands on a running VM's KVMI socket (events, regs, read, pause, ...).
    #[command(flatten)]
    Tool(cli::ToolCommand),
    /// A VM process of `kvmi run --isolate` (started by the supervisor, configured over the
    /// control socket it inherits; not for use by hand).
    #[command(hide = true)]
    VmmFleet,
    /// A target's VM process of `kvmi run --isolate` (not for use by hand).
    #[command(hide = true)]
    VmmTarget,
    /// The appliance VM's process of `kvmi run --isolate` (not for use by hand).
    #[command(hide = true)]
    VmmAppliance,
}

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// An ELF file, or the name of an embedded image (demo-target, test-guest, appliance,
    /// example-agent) [default: the demo target, watched by the embedded appliance VM unless
    /// --no-appliance or a KVMI socket is given].
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// With no --image: run the demo target alone, without the appliance VM.
    #[arg(long, conflicts_with = "appliance")]
    pub(crate) no_appliance: bool,
    /// Number of vCPUs (each on its own thread).
    #[arg(long, default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub(crate) memory: u64,
    /// Write the guest's serial output to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub(crate) serial: Option<PathBuf>,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub(crate) timeout: Option<f64>,
    /// The guest's command line, e.g. "mode=hello" or "rounds=3".
    #[arg(long, default_value = "")]
    pub(crate) cmdline: String,
    /// What to do with port or MMIO accesses no device handles.
    #[arg(long, value_enum, default_value_t = UnknownIo::Ignore)]
    pub(crate) unknown_io: UnknownIo,
    /// Serve the management API (HTTP/1.1, JSON; docs/api.md) on the unix socket PATH:
    /// info, pause, resume, stats, dump, add and remove targets (`kvmi ctl`, `kvmi dump`).
    #[arg(long, value_name = "PATH")]
    pub(crate) api_socket: Option<PathBuf>,
    /// One process per VM (the default): a small supervisor that holds no KVM fd and no
    /// guest memory runs the appliance VM and every target in a process of its own, linked
    /// by vhost-user; every VM process dies with the supervisor, and a process that dies is
    /// reported. A run without an appliance VM, or with --api-socket, runs in one VM process
    /// under the supervisor (docs/isolation.md).
    #[arg(long, conflicts_with = "no_isolate")]
    pub(crate) isolate: bool,
    /// Run every VM in this one process (as before the split; for debugging the VMM).
    /// `KVMI_ISOLATE=0` in the environment does the same.
    #[arg(long)]
    pub(crate) no_isolate: bool,
    #[command(flatten)]
    pub(crate) kvmi: crate::args::introspection::KvmiRunArgs,
    #[command(flatten)]
    pub(crate) appliance: crate::args::appliance::ApplianceRunArgs,
    #[command(flatten)]
    pub(crate) seccomp: crate::args::seccomp::SeccompRunArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum UnknownIo {
    /// Log and continue: writes are dropped, reads return all-ones.
    Ignore,
    /// Stop the VM with an error naming the port or address (exit status 125).
    Error,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_sigint() {
    // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigint as *const () as usize;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGINT, &act, std::ptr::null_mut());
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Reads an image: an existing file, else an embedded image of that name.
fn load_image(spec: &str) -> Result<(String, Vec<u8>)> {
    let path = PathBuf::from(spec);
    if path.is_file() {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok((name, bytes));
    }
    let Some(image) = Image::from_name(spec) else {
        bail!("no file `{spec}` and no embedded image of that name (demo-target, test-guest)");
    };
    let Some(bytes) = image.elf() else {
        bail!("image `{spec}` is not embedded in this build (built with KVMI_SKIP_IMAGES?)");
    };
    Ok((image.name().to_string(), bytes.to_vec()))
}

/// The main job: `kvmi run` with no image and no tool of its own boots the demo target and the
/// embedded appliance VM that watches it.
fn apply_main_job_default(args: &mut RunArgs) {
    let tool_chosen = args.appliance.appliance.is_some()
        || args.appliance.appliance_socket.is_some()
        || args.kvmi.kvmi_socket.is_some()
        || args.kvmi.kvmi_connect.is_some();
    if args.image.is_some() || args.no_appliance || tool_chosen {
        return;
    }
    if Image::Appliance.elf().is_none() {
        tracing::warn!(
            "the appliance image is not embedded in this build: the demo target runs alone"
        );
        return;
    }
    args.appliance.appliance = Some(Image::Appliance.name().to_string());
}

/// What every process of a run builds from the `kvmi run` words before any VM exists: the
/// image, the VM settings, limits, where serial output goes, the appliance image.
pub(crate) struct Base {
    /// The image's name and ELF.
    pub(crate) name: String,
    pub(crate) image: Vec<u8>,
    /// The VM settings of `--vcpus`, `--memory`, `--cmdline`, `--unknown-io`.
    pub(crate) config: VmConfig,
    pub(crate) timeout: Option<Duration>,
    pub(crate) serial: SerialSink,
    /// The appliance VM's ELF, when the run has one.
    pub(crate) appliance_image: Option<Vec<u8>>,
}

/// The targets of a run with an appliance VM, every image they use (loaded once, by spec:
/// name and ELF) and the compiled policy, checked against their profiles.
pub(crate) struct TargetPlan {
    pub(crate) entries: Vec<crate::args::fleet_config::TargetConfig>,
    pub(crate) images: std::collections::HashMap<String, (String, Vec<u8>)>,
    pub(crate) policy: Vec<u8>,
}

/// Parses the words after `kvmi run` (without `--isolate`) as `kvmi run` does.
pub(crate) fn parse_run_words(words: &[String]) -> Result<RunArgs> {
    let cli = Cli::try_parse_from(
        ["kvmi".to_string(), "run".to_string()]
            .into_iter()
            .chain(words.iter().cloned()),
    )
    .context("the supervisor's run words do not parse")?;
    match cli.command {
        Some(Command::Run(args)) => Ok(*args),
        _ => bail!("the supervisor's run words are not a run"),
    }
}

/// The checks and defaults of `kvmi run` and the [`Base`] of the run. With `shared_serial`
/// (a VM process of `--isolate`, whose supervisor truncated the file) a `--serial` file is
/// appended to, not truncated: every VM process writes into it.
pub(crate) fn base(args: &mut RunArgs, shared_serial: bool) -> Result<Base> {
    args.seccomp.apply();
    apply_main_job_default(args);
    if let Some(option) = args.appliance.orphan_options() {
        bail!("{option} needs an appliance VM (--appliance, or the main job's default)");
    }
    let (name, image) = load_image(args.image.as_deref().unwrap_or(Image::DemoTarget.name()))?;
    let memory_bytes = args
        .memory
        .checked_mul(1 << 20)
        .context("--memory is too large")?;
    let timeout = match args.timeout {
        Some(s) if !(s.is_finite() && s > 0.0) => bail!("--timeout must be a positive number"),
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    let config = VmConfig {
        name: format!("kvmi-{name}"),
        memory_bytes,
        vcpus: args.vcpus,
        cmdline: args.cmdline.clone(),
        unknown_io: match args.unknown_io {
            UnknownIo::Ignore => UnknownIoPolicy::Ignore,
            UnknownIo::Error => UnknownIoPolicy::Error,
        },
    };
    let serial = match &args.serial {
        Some(p) if shared_serial => SerialSink::File(
            std::fs::OpenOptions::new()
                .append(true)
                .open(p)
                .with_context(|| format!("opening serial file {}", p.display()))?,
        ),
        Some(p) => SerialSink::File(
            File::create(p).with_context(|| format!("creating serial file {}", p.display()))?,
        ),
        // With an appliance, stdout carries only its JSON lines; serial output goes to stderr.
        None if args.appliance.enabled() => crate::args::appliance::stderr_sink()?,
        None => SerialSink::Stdout,
    };
    let appliance_image = match &args.appliance.appliance {
        Some(spec) => Some(load_image(spec).context("loading the appliance image")?.1),
        None => None,
    };
    let targets = args.appliance.targets;
    if !(1..=hypercall::directory::MAX_SLOTS).contains(&targets) {
        bail!("--targets must be 1..={}", hypercall::directory::MAX_SLOTS);
    }
    Ok(Base {
        name,
        image,
        config,
        timeout,
        serial,
        appliance_image,
    })
}

/// The targets of a run with an appliance VM: from `--config`, or `--targets` copies of
/// `--image`; every image loaded once, and (`with_policy`) the policy compiled against their
/// profiles before any VM starts (a target process leaves that to the supervisor and the
/// appliance process).
pub(crate) fn plan_targets(args: &RunArgs, base: &Base, with_policy: bool) -> Result<TargetPlan> {
    plan_targets_of(args, &base.name, &base.image, &base.config, with_policy)
}

fn plan_targets_of(
    args: &RunArgs,
    name: &str,
    image: &[u8],
    config: &VmConfig,
    with_policy: bool,
) -> Result<TargetPlan> {
    let targets = args.appliance.targets;
    let entries = match &args.appliance.config {
        Some(path) => {
            if args.image.is_some() {
                bail!("--config names each target's image: --image cannot be combined with it");
            }
            crate::args::fleet_config::load(path)?
        }
        None => (1..=targets)
            .map(|i| crate::args::fleet_config::TargetConfig {
                name: if targets == 1 {
                    name.to_string()
                } else {
                    format!("{name}-{i}")
                },
                image: args.image.clone().unwrap_or(name.to_string()),
                vcpus: config.vcpus,
                memory_mib: args.memory,
                cmdline: config.cmdline.clone(),
                profile: Some(name.to_string()),
                start_after_ms: 0,
            })
            .collect(),
    };
    let mut images = std::collections::HashMap::new();
    let mut profiles = std::collections::HashMap::new();
    for entry in &entries {
        if images.contains_key(&entry.image) {
            continue;
        }
        let (image_name, bytes) = if entry.image == name {
            (name.to_string(), image.to_vec())
        } else {
            load_image(&entry.image)
                .with_context(|| format!("the image of target {}", entry.name))?
        };
        if let Ok(profile) = Profile::from_elf(&image_name, &bytes) {
            profiles.insert(image_name.clone(), profile.to_json());
        }
        images.insert(entry.image.clone(), (image_name, bytes));
    }
    let policy = if with_policy {
        args.appliance
            .compile_policy(&profiles)
            .context("the policy is refused")?
    } else {
        Vec::new()
    };
    Ok(TargetPlan {
        entries,
        images,
        policy,
    })
}

/// Builds target `entry`'s VM (not started) from `plan`, with `template`'s settings and its
/// own sizes, its serial output going to `serial`.
pub(crate) fn build_target(
    plan: &TargetPlan,
    entry: &crate::args::fleet_config::TargetConfig,
    template: &VmConfig,
    serial: SerialSink,
) -> Result<Vm> {
    let (_, bytes) = &plan.images[&entry.image];
    let vm_config = target_config(
        template,
        &entry.name,
        entry.memory_mib,
        entry.vcpus,
        &entry.cmdline,
    );
    let mut vm =
        Vm::new(vm_config, bytes).with_context(|| format!("building the VM for {}", entry.name))?;
    vm.set_serial(serial);
    Ok(vm)
}

fn run(mut args: RunArgs) -> Result<u8> {
    if crate::isolate::wanted(args.isolate, args.no_isolate) {
        install_sigint();
        return crate::isolate::run::supervise(&INTERRUPTED);
    }
    let Base {
        name,
        image,
        config,
        timeout,
        serial,
        appliance_image,
    } = base(&mut args, false)?;
    let host_agent = args.appliance.appliance_socket.is_some();
    let introspection = match appliance_image {
        Some(_) => None,
        None if host_agent => None,
        None => args.kvmi.setup()?,
    };
    let dialect = args.kvmi.dialect(&name)?;
    if dialect != kvmi_engine::Dialect::V4 && introspection.is_none() {
        bail!("--kvmi-dialect libkvmi needs --kvmi-connect or --kvmi-socket (and no appliance)");
    }
    if args.api_socket.is_some() && appliance_image.is_none() && host_agent {
        bail!("--api-socket cannot be combined with --appliance-socket");
    }
    // Bound before any VM starts: a path in use fails at once.
    let mut api_listener = match &args.api_socket {
        Some(path) => Some(crate::api::ApiListener::bind(path).context("--api-socket")?),
        None => None,
    };
    let mut fleet = Vec::new();
    let mut policy = Vec::new();
    let mut fleet_api = None;
    if appliance_image.is_some() {
        let plan = plan_targets_of(&args, &name, &image, &config, true)?;
        policy = plan.policy.clone();
        if let Some(listener) = api_listener.take() {
            fleet_api = Some(crate::args::appliance::FleetApi {
                listener,
                factory: target_factory(
                    plan.images.clone(),
                    config.clone(),
                    serial.try_clone().context("duplicating the serial sink")?,
                ),
            });
        }
        for entry in &plan.entries {
            let vm = build_target(
                &plan,
                entry,
                &config,
                serial.try_clone().context("duplicating the serial sink")?,
            )?;
            fleet.push(crate::args::appliance::FleetTarget {
                profile: entry
                    .profile
                    .clone()
                    .unwrap_or_else(|| plan.images[&entry.image].0.clone()),
                name: entry.name.clone(),
                vm,
                start_after: Duration::from_millis(entry.start_after_ms),
            });
        }
    }
    // Without an appliance: the one target, with the tool (if any) of the flags.
    let single_info = (name.clone(), config.vcpus, config.memory_bytes);
    let single = if fleet.is_empty() {
        let mut vm =
            Vm::new(config, &image).with_context(|| format!("building the VM for {name}"))?;
        vm.set_serial(serial);
        Some(vm)
    } else {
        None
    };
    install_sigint();
    let limits = RunLimits {
        timeout,
        interrupt: Some(&INTERRUPTED),
    };
    let report = match (appliance_image, introspection) {
        (Some(image), _) => {
            let report = args
                .appliance
                .run_fleet(&args.kvmi, fleet, image, policy, limits, fleet_api)?;
            // The exit status is the first target's.
            let mut targets = report.targets;
            targets.sort_by_key(|t| t.id);
            targets
                .into_iter()
                .next()
                .map(|t| t.run)
                .context("no target ran")?
        }
        (None, introspection) => {
            let vm = single.context("no target VM was built")?;
            match introspection {
                _ if host_agent => args.appliance.run_host_socket(&args.kvmi, vm, limits)?,
                Some((config, endpoint)) => {
                    let run =
                        kvmi_engine::start_introspected_dialect(vm, config, endpoint, dialect)?;
                    let socket = run.socket().display().to_string();
                    let _server = serve_single(
                        api_listener,
                        &single_info,
                        run.running.handle(),
                        Some((run.introspector.clone(), socket)),
                    )?;
                    run.wait(limits)
                }
                None => {
                    let running = vm.start()?;
                    let _server = serve_single(api_listener, &single_info, running.handle(), None)?;
                    running.wait(limits)
                }
            }
        }
    };
    let code = report.outcome.exit_code();
    if report.outcome.is_success() {
        tracing::info!(
            "{} in {:.3} s",
            report.outcome,
            report.elapsed.as_secs_f64()
        );
    } else {
        vmm::devices::eprint_line(format_args!(
            "kvmi: {} (exit status {code})",
            report.outcome
        ));
    }
    Ok(code)
}

/// A target's VM settings: `template`'s (unknown I/O policy) with its own name, memory,
/// vCPUs and command line.
fn target_config(
    template: &VmConfig,
    name: &str,
    memory_mib: u64,
    vcpus: u32,
    cmdline: &str,
) -> VmConfig {
    VmConfig {
        name: format!("kvmi-{name}"),
        memory_bytes: memory_mib << 20,
        vcpus,
        cmdline: cmdline.to_string(),
        ..template.clone()
    }
}

/// A VM process of `kvmi run --isolate`: takes its configuration from the control socket it
/// inherited, stops (as on Ctrl-C) when the supervisor says so or its socket closes, and
/// runs its part of the run.
fn vmm_process(subcommand: &str) -> Result<u8> {
    use crate::isolate::control::{Control, Role};
    let control = Control::inherited().with_context(|| format!("kvmi {subcommand}"))?;
    let (role, _verbose, words, fds) = control.recv_config()?;
    if role.subcommand() != subcommand {
        bail!("kvmi {subcommand} was configured as {}", role.subcommand());
    }
    let mut args = parse_run_words(&words)?;
    // This process is the VM process: it never supervises.
    args.no_isolate = true;
    match role {
        Role::Fleet => {
            drop(fds);
            crate::isolate::control::stop_on_message(control, &INTERRUPTED)?;
            run(args)
        }
        Role::Target { index, id, key } => crate::isolate::target::run(
            control,
            args,
            crate::isolate::target::Assignment { index, id, key },
            fds,
            &INTERRUPTED,
        ),
        Role::Appliance => {
            drop(fds);
            crate::isolate::appliance::run(control, args, &INTERRUPTED)
        }
    }
}

/// Builds the targets added through the API: their image (one of `images`, already loaded by
/// spec, or loaded now), a VM with `template`'s settings and the request's sizes, its serial
/// output going where the other targets' goes.
fn target_factory(
    images: std::collections::HashMap<String, (String, Vec<u8>)>,
    template: VmConfig,
    serial: SerialSink,
) -> crate::api::TargetFactory {
    use crate::api::ApiError;
    Box::new(move |t: &crate::api::AddTarget| {
        let (image_name, bytes) = match images.get(&t.image) {
            Some(known) => known.clone(),
            None => load_image(&t.image)
                .map_err(|e| ApiError::BadRequest(format!("image {:?}: {e:#}", t.image)))?,
        };
        let config = target_config(&template, &t.name, t.memory_mib, t.vcpus, &t.cmdline);
        let mut vm = Vm::new(config, &bytes)
            .map_err(|e| ApiError::BadRequest(format!("the VM cannot be built: {e}")))?;
        vm.set_serial(
            serial
                .try_clone()
                .map_err(|e| ApiError::Internal(format!("duplicating the serial sink: {e}")))?,
        );
        Ok(crate::args::appliance::FleetTarget {
            name: t.name.clone(),
            profile: t.profile.clone().unwrap_or(image_name),
            vm,
            start_after: Duration::ZERO,
        })
    })
}

/// Serves the API (if bound) for the one VM of a run without an appliance; `info` is its
/// name, vCPUs and memory size.
fn serve_single(
    listener: Option<crate::api::ApiListener>,
    info: &(String, u32, u64),
    handle: vmm::VmHandle,
    introspector: Option<(std::sync::Arc<kvmi_engine::Introspector>, String)>,
) -> Result<Option<crate::api::ApiServer>> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let backend = crate::api::SingleBackend::new(
        info.0.clone(),
        info.1,
        info.2,
        handle.clone(),
        introspector,
    );
    match crate::api::ApiServer::start(listener, std::sync::Arc::new(backend)) {
        Ok(server) => Ok(Some(server)),
        Err(e) => {
            handle.stop();
            Err(e).context("--api-socket")
        }
    }
}

fn caps(json: bool) -> Result<u8> {
    let caps = vmm::probe_capabilities().context("probing KVM")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&caps)?);
    } else {
        print!("{}", caps.table());
    }
    Ok(0)
}

fn profile(spec: &str) -> Result<u8> {
    let (name, bytes) = load_image(spec)?;
    let profile = Profile::from_elf(&name, &bytes).with_context(|| format!("profile of {spec}"))?;
    println!("{}", profile.to_json());
    Ok(0)
}

fn write_image(name: &str, output: &std::path::Path) -> Result<u8> {
    let Some(image) = Image::from_name(name) else {
        let names: Vec<&str> = Image::ALL.iter().map(|i| i.name()).collect();
        bail!("no embedded image `{name}` (one of {})", names.join(", "));
    };
    let Some(bytes) = image.elf() else {
        bail!("image `{name}` is not embedded in this build (built with KVMI_SKIP_IMAGES?)");
    };
    std::fs::write(output, bytes).with_context(|| format!("writing {}", output.display()))?;
    Ok(0)
}

fn appliance_bench(mib: u64, events: u64) -> Result<u8> {
    let (_, image) = load_image("test-guest")?;
    let (_, appliance) = load_image("appliance")?;
    let figures = crate::bench::window::run(&image, &appliance, mib)?;
    print!("{}", figures.table());
    if events > 0 {
        let profile = Image::TestGuest
            .profile()
            .context("test-guest profile not embedded")??;
        let page = profile
            .symbol("scratch_page")
            .context("profile lacks sym.scratch_page")?;
        let gate = profile.symbol("gate").context("profile lacks sym.gate")?;
        let figures = crate::bench::events::run(
            &image,
            &appliance,
            std::path::Path::new("/proc/self/exe"),
            events,
            page,
            gate,
        )?;
        print!("{}", figures.table());
        println!("{}", figures.json_line());
    }
    Ok(0)
}

fn fleet_bench(targets: u32, vcpus: u32, writes: u64, json: bool) -> Result<u8> {
    if !(1..=hypercall::directory::MAX_SLOTS).contains(&targets) {
        bail!("--targets must be 1..={}", hypercall::directory::MAX_SLOTS);
    }
    if vcpus == 0 || writes < 2 {
        bail!("--vcpus must be at least 1 and --writes at least 2");
    }
    let (_, image) = load_image("test-guest")?;
    let (_, appliance) = load_image("appliance")?;
    let profile = Image::TestGuest
        .profile()
        .context("test-guest profile not embedded")??;
    let page = profile
        .symbol("scratch_page")
        .context("profile lacks sym.scratch_page")?;
    let gate = profile.symbol("gate").context("profile lacks sym.gate")?;
    let policy = crate::bench::fleet::bench_policy(&profile.to_json())?;
    let shape = crate::bench::fleet::FleetShape {
        targets,
        vcpus,
        writes,
        page,
        gate,
    };
    let figures = crate::bench::fleet::run(&image, &appliance, policy, shape)?;
    print!("{}", figures.table());
    if json {
        println!("{}", figures.json_line());
    }
    Ok(0)
}

/// The `kvmi` command: parses the process arguments, runs the subcommand, and returns its exit
/// status (documented in `kvmi --help`). The `kvmi` binary is this function.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // No subcommand: the main job, exactly as `kvmi run` with its defaults.
    let command = match cli.command {
        Some(command) => command,
        None => match Cli::try_parse_from(["kvmi", "run"]) {
            Ok(Cli {
                command: Some(run), ..
            }) => run,
            _ => {
                vmm::devices::eprint_line(format_args!(
                    "kvmi: error: the default `run` arguments do not parse"
                ));
                return ExitCode::from(EXIT_VMM_ERROR);
            }
        },
    };
    let result = match command {
        Command::Run(args) => run(*args),
        Command::Caps { json } => caps(json),
        Command::Profile { image } => profile(&image),
        Command::ApplianceBench {
            targets: Some(targets),
            vcpus,
            writes,
            json,
            ..
        } => fleet_bench(targets, vcpus, writes, json),
        Command::ApplianceBench { mib, events, .. } => appliance_bench(mib, events),
        Command::DumpBench { mib, dir, json } => load_image("test-guest")
            .and_then(|(_, image)| crate::bench::dump::command(&image, mib, dir, json)),
        Command::Image { name, output } => write_image(&name, &output),
        Command::Gdb(args) => crate::gdb::run(&args),
        Command::Ctl(args) => cli::api::ctl(&args),
        Command::Dump(args) => cli::api::dump(&args),
        Command::Tool(command) => cli::run(command),
        Command::VmmFleet => vmm_process("vmm-fleet"),
        Command::VmmTarget => vmm_process("vmm-target"),
        Command::VmmAppliance => vmm_process("vmm-appliance"),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            vmm::devices::eprint_line(format_args!("kvmi: error: {e:#}"));
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

// The statuses are documented in EXIT_STATUS_HELP; keep them in sync at compile time.
const _: () = {
    assert!(EXIT_ALL_HALTED == 123);
    assert!(EXIT_TIMEOUT == 124);
    assert!(EXIT_VMM_ERROR == 125);
    assert!(EXIT_EMULATION_FAILURE == 126);
    assert!(EXIT_SHUTDOWN == 127);
    assert!(EXIT_INTERRUPTED == 130);
};
