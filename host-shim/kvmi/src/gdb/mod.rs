//! `kvmi gdb`: a GDB remote-serial-protocol stub on a VM's KVMI channel.
//!
//! gdb sees the VM as one process whose threads are the vCPUs (thread id = vCPU index + 1).
//! The stub is built on the `gdbstub` crate; `target::KvmiTarget` is its target:
//! - `regs`: the register set (GET/SET_REGISTERS, GET_XSAVE) and its target description;
//! - `memory`: virtual memory through the thread's page tables over READ/WRITE_PHYSICAL;
//! - `insert` and `breakpoints`: hardware breakpoints with CONTROL_BREAKPOINT, software
//!   breakpoints and watchpoints as page-access restrictions (guest memory is never patched);
//! - `execution` and `events`: vCont, all-stop, which events are stops and which the stub
//!   answers by itself;
//! - `monitor`: `monitor` commands; `lifecycle`: kill/run/attach refused;
//! - `transport`: stdin/stdout or one TCP connection; the session loop below waits for
//!   gdb's bytes and the VM's events at once.
//!
//! `detach` (and `quit`) close the KVMI channel: the host lifts every restriction and the VM
//! runs on. `kill` is refused with an error reply (gdb: "Can't kill process").
//!
//! The channel is either dialect: `--socket` connects to a v4 socket, `--libkvmi-listen`
//! listens for a VM speaking libkvmi (kvmi-v7), which connects. The client hides the
//! difference; what kvmi-v7 cannot do (hardware breakpoints: it has no way to set them or
//! the debug registers) is refused to gdb with an error reply.

mod breakpoints;
mod events;
mod execution;
mod insert;
mod lifecycle;
mod memory;
mod monitor;
mod regs;
mod target;
mod transport;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub};
use kvmi_client::{KvmiClient, LibkvmiOptions};
use sha1::{Digest, Sha1};

use target::KvmiTarget;
use transport::GdbConnection;

pub use monitor::MONITOR_HELP;

/// `kvmi gdb`.
#[derive(Args, Debug)]
#[command(
    group(ArgGroup::new("vm").required(true).args(["socket", "libkvmi_listen"])),
    after_help = "EXAMPLES:\n  gdb -ex 'target remote | kvmi gdb --socket /tmp/vm.sock'\n  \
    gdb -ex 'target remote | kvmi gdb --libkvmi-listen /tmp/tool.sock'\n    \
    with the VM started as: kvmi run ... --kvmi-dialect libkvmi --kvmi-connect /tmp/tool.sock\n\n\
    Software breakpoints are execute traps on their page (guest memory is never patched);\n\
    hardware breakpoints (hbreak) at most 4, v4 dialect only (libkvmi cannot set them:\n\
    gdb gets an error); watch/rwatch/awatch are page-access traps.\n\
    `kill` is refused (\"Can't kill process\"); `detach` or `quit` leave the VM running.\n\
    `monitor help` lists the monitor commands."
)]
pub struct GdbArgs {
    /// The VM's KVMI socket, v4 dialect (`kvmi run --kvmi-socket PATH`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Listen on the unix socket PATH for a VM speaking the libkvmi dialect
    /// (`kvmi run --kvmi-dialect libkvmi --kvmi-connect PATH`) and debug it once it connects.
    #[arg(long, value_name = "PATH")]
    libkvmi_listen: Option<PathBuf>,
    /// libkvmi: a file holding the secret shared with the VM (`kvmi run --kvmi-secret`); the
    /// handshake answers with the SHA-1 of its bytes [default: zeros].
    #[arg(long, value_name = "FILE", requires = "libkvmi_listen")]
    kvmi_secret: Option<PathBuf>,
    /// Serve one gdb connection on TCP HOST:PORT (`target remote HOST:PORT`) instead of
    /// stdin/stdout.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// How long to wait for the KVMI socket (with --libkvmi-listen: for the VM to connect),
    /// in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    connect_timeout: f64,
}

/// Runs `kvmi gdb`; returns the exit status.
pub fn run(args: &GdbArgs) -> Result<u8> {
    let wait = Duration::try_from_secs_f64(args.connect_timeout)
        .context("--connect-timeout must be a non-negative number")?;
    let client = connect(args, wait)?;
    let conn = match &args.listen {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr}"))?;
            // Not a log line: a script starting `--listen HOST:0` reads the port here.
            eprintln!("kvmi gdb: waiting for gdb on {}", listener.local_addr()?);
            let (stream, peer) = listener.accept().context("accepting gdb")?;
            tracing::info!("gdb connected from {peer}");
            stream.set_nodelay(true).ok();
            let reader = stream.try_clone().context("cloning the TCP stream")?;
            GdbConnection::new(reader, stream)
        }
        None => GdbConnection::new(std::io::stdin(), std::io::stdout()),
    };
    let mut target = KvmiTarget::attach(client).context("attaching to the VM")?;
    let result = session(conn, &mut target);
    match &result {
        Ok(DisconnectReason::Kill) => {
            tracing::warn!("gdb killed the session: detached, the VM runs on");
        }
        Ok(reason) => tracing::info!("gdb session ended: {reason:?}"),
        Err(e) => tracing::warn!("gdb session ended: {e:#}"),
    }
    target.detach();
    result.map(|_| 0)
}

/// The KVMI channel `args` name, in its dialect.
fn connect(args: &GdbArgs, wait: Duration) -> Result<KvmiClient> {
    if let Some(path) = &args.libkvmi_listen {
        let mut options = LibkvmiOptions::default();
        if let Some(file) = &args.kvmi_secret {
            let secret =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            options.cookie_hash = Sha1::digest(&secret).into();
        }
        tracing::info!("waiting for a libkvmi VM on {}", path.display());
        let client = KvmiClient::listen_libkvmi(path, wait, &options)
            .with_context(|| format!("waiting for a libkvmi VM on {}", path.display()))?;
        if let Some(id) = client.vm_identity() {
            tracing::info!(name = id.name, "libkvmi VM connected");
        }
        return Ok(client);
    }
    let Some(path) = &args.socket else {
        anyhow::bail!("give --socket PATH or --libkvmi-listen PATH");
    };
    KvmiClient::connect_retry(path, wait)
        .with_context(|| format!("connecting to {}", path.display()))
}

/// Serves gdb until it detaches, kills, closes the connection or the VM ends.
fn session(conn: GdbConnection, target: &mut KvmiTarget) -> Result<DisconnectReason> {
    let mut gdb = GdbStub::new(conn)
        .run_state_machine(target)
        .map_err(|e| anyhow::anyhow!("starting the gdb stub: {e}"))?;
    let stub_err = |e: gdbstub::stub::GdbStubError<target::GdbError, std::io::Error>| {
        anyhow::anyhow!("gdb stub: {e}")
    };
    loop {
        gdb = match gdb {
            GdbStubStateMachine::Idle(mut g) => {
                let byte = loop {
                    match g.borrow_conn().next_byte(Duration::from_millis(500)) {
                        Ok(Some(b)) => break b,
                        Ok(None) => target.keepalive(),
                        Err(e) => {
                            tracing::info!("{e}");
                            return Ok(DisconnectReason::Disconnect);
                        }
                    }
                };
                g.incoming_data(target, byte).map_err(stub_err)?
            }
            GdbStubStateMachine::Disconnected(g) => return Ok(g.get_reason()),
            GdbStubStateMachine::CtrlCInterrupt(g) => {
                let stop = target.interrupt().context("stopping the VM")?;
                g.interrupt_handled(target, Some(stop)).map_err(stub_err)?
            }
            GdbStubStateMachine::Running(mut g) => {
                match g.borrow_conn().next_byte(Duration::ZERO) {
                    Ok(Some(b)) => g.incoming_data(target, b).map_err(stub_err)?,
                    Ok(None) => match target.poll(Duration::from_millis(20)) {
                        Ok(Some(stop)) => g.report_stop(target, stop).map_err(stub_err)?,
                        Ok(None) => GdbStubStateMachine::Running(g),
                        Err(e) => return Err(anyhow::Error::new(e).context("running the VM")),
                    },
                    Err(e) => {
                        tracing::info!("{e}");
                        return Ok(DisconnectReason::Disconnect);
                    }
                }
            }
        };
    }
}
