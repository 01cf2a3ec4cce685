//! The supervisor's side: spawns VM processes of this same binary (`/proc/self/exe`), hands
//! each its configuration and descriptors over its control socket, forwards a stop, waits
//! for them and says how each ended.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::control::{CHILD_CONTROL_FD, CONTROL_FD_ENV, Control, ControlError, Message, Role};

/// How often the supervisor looks at its children.
const WATCH_PERIOD: Duration = Duration::from_millis(10);

/// How a VM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this status.
    Exited(u8),
    /// A signal killed it.
    Signal(i32),
}

impl Ended {
    /// The exit status the supervisor gives for it: the child's, or 128 + the signal.
    pub fn status(self) -> u8 {
        match self {
            Ended::Exited(code) => code,
            Ended::Signal(sig) => 128u8.saturating_add(u8::try_from(sig).unwrap_or(127)),
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Ended::Exited(code) => write!(f, "exited with status {code}"),
            Ended::Signal(sig) => write!(f, "killed by signal {sig} {}", signal_name(sig)),
        }
    }
}

/// The name of signal `sig` (`SIGKILL`, ...), or `SIG?`.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGSYS => "SIGSYS",
        _ => "SIG?",
    }
}

/// One VM process.
#[derive(Debug)]
pub struct VmProcess {
    /// What it runs, as messages name it ("target web", "appliance").
    pub label: String,
    /// Its process id.
    pub pid: u32,
    control: Control,
    child: std::process::Child,
    ended: Option<Ended>,
}

impl VmProcess {
    /// Spawns `/proc/self/exe vmm-<role>` with the child end of a fresh control socket at
    /// descriptor 3, in its own process group (a terminal's Ctrl-C reaches only the
    /// supervisor, which forwards a stop), with `PR_SET_PDEATHSIG(SIGKILL)` (the supervisor's
    /// death kills it), then sends it `role`, `args` and `fds`. Must be called from the
    /// thread that lives as long as the supervisor (the death signal follows the spawning
    /// thread).
    pub fn spawn(
        label: String,
        role: Role,
        verbose: u8,
        args: &[String],
        fds: &[RawFd],
    ) -> Result<VmProcess, ControlError> {
        Self::spawn_from(
            std::path::Path::new("/proc/self/exe"),
            label,
            role,
            verbose,
            args,
            fds,
        )
    }

    /// [`VmProcess::spawn`] of the `kvmi` binary at `exe` (for callers that are not the
    /// `kvmi` binary themselves: a benchmark run from a test).
    pub fn spawn_from(
        exe: &std::path::Path,
        label: String,
        role: Role,
        verbose: u8,
        args: &[String],
        fds: &[RawFd],
    ) -> Result<VmProcess, ControlError> {
        let (ours, theirs) = Control::pair()?;
        let subcommand = role.subcommand();
        let their_fd = theirs.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let supervisor = unsafe { libc::getpid() };
        let mut command = Command::new(exe);
        for _ in 0..verbose {
            command.arg("-v");
        }
        command
            .arg(subcommand)
            .env(CONTROL_FD_ENV, CHILD_CONTROL_FD.to_string())
            .env_remove(super::ISOLATE_ENV)
            .stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls (dup2, fcntl, setpgid, prctl, getppid, _exit); it
        // allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(their_fd, CHILD_CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 onto the same number keeps the flags: clear close-on-exec explicitly.
                libc::fcntl(CHILD_CONTROL_FD, libc::F_SETFD, 0);
                libc::setpgid(0, 0);
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor died before the death signal was armed: go now.
                if libc::getppid() != supervisor {
                    libc::_exit(125);
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(theirs);
        let pid = child.id();
        let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        let process = VmProcess {
            label,
            pid,
            control: ours,
            child,
            ended: None,
        };
        process.control.send_all(
            &Message::Config {
                role,
                verbose,
                args: args.to_vec(),
                fds: count,
            },
            fds,
        )?;
        tracing::info!(pid, "started {}", process.label);
        Ok(process)
    }

    /// Asks it to stop as on Ctrl-C (it may have ended already: not an error).
    pub fn stop(&self) {
        let _ = self.control.send(&Message::Stop, &[]);
    }

    /// Sends it `message` with `fds` (at most 4).
    pub fn send(&self, message: &Message, fds: &[RawFd]) -> Result<(), ControlError> {
        self.control.send(message, fds)
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// How it ended, if it has (reaps it).
    pub fn poll(&mut self) -> Option<Ended> {
        if self.ended.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            use std::os::unix::process::ExitStatusExt;
            self.ended = Some(match (status.code(), status.signal()) {
                (Some(code), _) => Ended::Exited(u8::try_from(code).unwrap_or(255)),
                (None, Some(sig)) => Ended::Signal(sig),
                (None, None) => Ended::Exited(255),
            });
        }
        self.ended
    }
}

/// Waits for every process of `processes`: forwards a stop to all of them once `interrupt`
/// is set, reports each death by a signal on stderr ("kvmi: target web (pid N) killed by
/// signal 31 SIGSYS"; an exit is logged: the process printed its own reason), and returns how each ended, in the order of `processes`. `on_end` is told of each
/// end as it happens (the caller decides what another process's end means, e.g. restarts).
pub fn wait_all(
    processes: &mut [VmProcess],
    interrupt: &AtomicBool,
    mut on_end: impl FnMut(usize, Ended, &mut [VmProcess]),
) -> Vec<Ended> {
    let mut forwarded = false;
    let mut reported = vec![false; processes.len()];
    loop {
        if !forwarded && interrupt.load(Ordering::SeqCst) {
            forwarded = true;
            for p in processes.iter() {
                p.stop();
            }
        }
        for i in 0..processes.len() {
            if reported[i] {
                continue;
            }
            if let Some(end) = processes[i].poll() {
                reported[i] = true;
                let p = &processes[i];
                // A process that exits says why itself; a signal is for the supervisor to
                // tell.
                if matches!(end, Ended::Signal(_)) {
                    vmm::devices::eprint_line(format_args!(
                        "kvmi: {} (pid {}) {end}",
                        p.label, p.pid
                    ));
                } else {
                    tracing::info!("{} (pid {}) {end}", p.label, p.pid);
                }
                on_end(i, end, processes);
            }
        }
        if reported.iter().all(|&r| r) {
            break;
        }
        std::thread::sleep(WATCH_PERIOD);
    }
    processes
        .iter_mut()
        .map(|p| p.poll().unwrap_or(Ended::Exited(255)))
        .collect()
}
