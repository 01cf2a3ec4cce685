//! seccomp-BPF allow-lists per thread kind, built with `seccompiler`.
//!
//! Every long-lived thread of a VMM process has a [`ThreadKind`]. A vCPU thread and a service
//! thread call [`install_current`] as their first action (a vCPU thread before its first
//! `KVM_RUN`, so before the guest's first instruction): it sets `no_new_privs` and installs
//! the kind's allow-list on the calling thread only (no `TSYNC`: the other threads keep their
//! own filter, or none). A syscall outside the list, or one whose arguments do not match its
//! rule, kills the whole process (`SECCOMP_RET_KILL_PROCESS`, the process dies of `SIGSYS`): a
//! thread that strays has been subverted or has a bug, and nothing it did after that can be
//! trusted.
//!
//! The main thread is [`ThreadKind::Main`] and is not filtered yet: in today's single process
//! it spawns every thread, loads images, creates VMs and opens files, so its list would be
//! nearly everything. The same holds for threads that do the main thread's work on its
//! behalf: the appliance watcher that boots a replacement appliance VM, the thread that adds
//! targets joining later, the host-process agent's acceptor (each agent gets new ring memfds
//! and a ring service thread), the probe's watchdog. When `kvmi run` becomes one process per VM under a supervisor, the
//! supervisor keeps that work and each VM process's main thread gets its own list.
//!
//! The lists were found by tracing every thread of the end-to-end suite (`strace -ff`, every
//! thread's syscalls after it named itself), then checked by running the suite with the
//! filters on. Each entry says why the thread needs the syscall. Arguments are checked where
//! it is cheap and meaningful: `ioctl` only with the KVM requests the kind uses (and `FIONBIO`
//! for service sockets), `mmap` never with `PROT_EXEC` (no new executable mapping), `openat`
//! read-only,
//! `socket` only `AF_UNIX`, `tgkill` only to threads of this process, `fcntl` only the
//! commands the standard library uses.
//!
//! [`set_enabled`] turns installation off for the whole process (`kvmi run --no-seccomp`, for
//! debugging); it is on by default. [`probe`] tells whether this kernel can filter at all.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kind of a thread, which chooses its allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the vCPU's exit handling (devices, hooks, the engine's
    /// vCPU side, appliance hypercalls remapping window pages, KVMI events sent on the tool's
    /// socket).
    Vcpu,
    /// A long-lived service thread: the KVMI socket's acceptor (after it started the tool
    /// thread) and its tool thread, the ring service of an appliance slot, the GDB stub's
    /// input.
    Service,
    /// The main thread: not filtered yet (see the module documentation).
    Main,
}

impl ThreadKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Service, ThreadKind::Main];

    /// The kind's name, as in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Service => "service",
            ThreadKind::Main => "main",
        }
    }

    /// Whether [`install`] installs a filter for this kind (false for [`ThreadKind::Main`]).
    pub fn is_filtered(self) -> bool {
        !matches!(self, ThreadKind::Main)
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allow-list did not compile to BPF (a bug in the list).
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        /// Whose list.
        kind: ThreadKind,
        /// What seccompiler refused.
        #[source]
        source: seccompiler::BackendError,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SECCOMP_SET_MODE_FILTER)` failed (a kernel
    /// without seccomp filtering, or one that refuses it here).
    #[error(
        "installing the {kind} seccomp filter (turn filtering off with --no-seccomp): {source}"
    )]
    Install {
        /// Whose list.
        kind: ThreadKind,
        /// What the kernel answered.
        #[source]
        source: seccompiler::Error,
    },
}

/// Whether [`install_current`] installs filters in this process (default: yes).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns filter installation on or off for every thread started afterwards (threads already
/// filtered stay filtered: a filter cannot be removed).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether threads started now install their filter.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Installs `kind`'s filter on the calling thread when filtering is [`enabled`] and the kind
/// is filtered. Returns whether a filter was installed.
pub fn install_current(kind: ThreadKind) -> Result<bool, SeccompError> {
    if !enabled() || !kind.is_filtered() {
        return Ok(false);
    }
    install(kind)?;
    tracing::debug!(kind = kind.name(), "seccomp filter installed");
    Ok(true)
}

/// Sets `no_new_privs` and installs `kind`'s filter on the calling thread only, whatever
/// [`enabled`] says; does nothing for [`ThreadKind::Main`] (returns false).
pub fn install(kind: ThreadKind) -> Result<bool, SeccompError> {
    if !kind.is_filtered() {
        return Ok(false);
    }
    let program = compile(kind)?;
    // `apply_filter` sets no_new_privs, then calls seccomp(SECCOMP_SET_MODE_FILTER) with no
    // flags: the calling thread only.
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })?;
    Ok(true)
}

/// `kind`'s filter as a BPF program (default action: kill the process).
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for entry in allow_list(kind) {
        rules.insert(entry.nr, entry.rules().map_err(build)?);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Whether seccomp filtering is available on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Availability {
    /// The kernel accepts filters whose default action kills the process
    /// (`seccomp(SECCOMP_GET_ACTION_AVAIL, SECCOMP_RET_KILL_PROCESS)` succeeded).
    pub available: bool,
    /// VMM threads install their filter unless told not to (`kvmi run --no-seccomp`).
    pub on_by_default: bool,
    /// Why not, when unavailable (the errno).
    pub detail: Option<String>,
}

impl Availability {
    /// What `kvmi caps` prints next to the yes or no.
    pub fn observed(&self) -> String {
        match (&self.detail, self.available) {
            (_, true) => "kill-process action available; on by default for vCPU and service \
                          threads (kvmi run --no-seccomp turns it off)"
                .to_string(),
            (Some(why), false) => format!("unavailable: {why}"),
            (None, false) => "not probed".to_string(),
        }
    }
}

/// Asks the kernel whether it supports seccomp filters with the kill-process action, without
/// installing anything.
pub fn probe() -> Availability {
    let action: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 through the pointer, which points to a
    // live local; no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if rc == 0 {
        Availability {
            available: true,
            on_by_default: true,
            detail: None,
        }
    } else {
        Availability {
            available: false,
            on_by_default: true,
            detail: Some(std::io::Error::last_os_error().to_string()),
        }
    }
}

/// What one allowed syscall may be called with.
#[derive(Clone, Copy, Debug)]
pub enum ArgRule {
    /// Any arguments.
    Any,
    /// `ioctl` whose request (argument 1) is one of these.
    Requests(&'static [u64]),
    /// Argument `arg` is one of these values.
    OneOf {
        /// Argument index (0-based).
        arg: u8,
        /// The values allowed.
        values: &'static [u64],
    },
    /// Argument `arg` is this process's id (read when the filter is built, in the process
    /// that installs it).
    ThisProcess {
        /// Argument index (0-based).
        arg: u8,
    },
    /// Argument `arg` has none of the bits in `mask` set.
    Clear {
        /// Argument index (0-based).
        arg: u8,
        /// The bits that must be zero.
        mask: u64,
    },
}

/// One entry of an allow-list: the syscall, what its arguments may be, and why the thread
/// needs it.
#[derive(Clone, Copy, Debug)]
pub struct Allowed {
    /// The syscall's name.
    pub name: &'static str,
    /// The x86_64 syscall number.
    pub nr: i64,
    /// Its argument rule.
    pub rule: ArgRule,
    /// Why the thread kind needs it.
    pub why: &'static str,
}

impl Allowed {
    /// The seccompiler rules: empty (any arguments) or one rule per allowed value.
    fn rules(&self) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let one = |arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64| {
            SeccompCondition::new(arg, len, op, value).and_then(|c| SeccompRule::new(vec![c]))
        };
        match self.rule {
            ArgRule::Any => Ok(Vec::new()),
            // The kernel truncates an ioctl request to 32 bits.
            ArgRule::Requests(values) => values
                .iter()
                .map(|&v| one(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v))
                .collect(),
            ArgRule::OneOf { arg, values } => values
                .iter()
                .map(|&v| one(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, v))
                .collect(),
            ArgRule::ThisProcess { arg } => Ok(vec![one(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::Eq,
                u64::from(std::process::id()),
            )?]),
            ArgRule::Clear { arg, mask } => Ok(vec![one(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(mask),
                0,
            )?]),
        }
    }
}

/// The KVM ioctl requests the filters name (`_IOC(dir, KVMIO, nr, size)` of the kernel's
/// `include/uapi/linux/kvm.h`).
pub mod kvm_requests {
    use kvm_bindings::{
        kvm_clear_dirty_log, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_guest_debug,
        kvm_interrupt, kvm_lapic_state, kvm_msr_filter, kvm_msrs, kvm_regs, kvm_sregs,
        kvm_translation, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };

    /// The KVM ioctl type.
    const KVMIO: u64 = 0xAE;
    const NONE: u64 = 0;
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    /// The Linux ioctl request encoding.
    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
    }

    /// Enters the guest.
    pub const KVM_RUN: u64 = ioc(NONE, 0x80, 0);
    /// Reads the general registers.
    pub const KVM_GET_REGS: u64 = ioc(READ, 0x81, size_of::<kvm_regs>());
    /// Writes the general registers.
    pub const KVM_SET_REGS: u64 = ioc(WRITE, 0x82, size_of::<kvm_regs>());
    /// Reads the special registers.
    pub const KVM_GET_SREGS: u64 = ioc(READ, 0x83, size_of::<kvm_sregs>());
    /// Writes the special registers.
    pub const KVM_SET_SREGS: u64 = ioc(WRITE, 0x84, size_of::<kvm_sregs>());
    /// Translates a guest-virtual address.
    pub const KVM_TRANSLATE: u64 = ioc(READ | WRITE, 0x85, size_of::<kvm_translation>());
    /// Injects an external interrupt.
    pub const KVM_INTERRUPT: u64 = ioc(WRITE, 0x86, size_of::<kvm_interrupt>());
    /// Reads MSRs.
    pub const KVM_GET_MSRS: u64 = ioc(READ | WRITE, 0x88, size_of::<kvm_msrs>());
    /// Writes MSRs.
    pub const KVM_SET_MSRS: u64 = ioc(WRITE, 0x89, size_of::<kvm_msrs>());
    /// Reads the FPU state.
    pub const KVM_GET_FPU: u64 = ioc(READ, 0x8c, size_of::<kvm_fpu>());
    /// Reads the vCPU's CPUID table (header size: the entries follow).
    pub const KVM_GET_CPUID2: u64 = ioc(READ | WRITE, 0x91, size_of::<kvm_cpuid2>());
    /// Reads the local APIC.
    pub const KVM_GET_LAPIC: u64 = ioc(READ, 0x8e, size_of::<kvm_lapic_state>());
    /// Injects an NMI.
    pub const KVM_NMI: u64 = ioc(NONE, 0x9a, 0);
    /// Sets single step and hardware breakpoints.
    pub const KVM_SET_GUEST_DEBUG: u64 = ioc(WRITE, 0x9b, size_of::<kvm_guest_debug>());
    /// Reads pending exceptions and interrupts.
    pub const KVM_GET_VCPU_EVENTS: u64 = ioc(READ, 0x9f, size_of::<kvm_vcpu_events>());
    /// Injects an exception.
    pub const KVM_SET_VCPU_EVENTS: u64 = ioc(WRITE, 0xa0, size_of::<kvm_vcpu_events>());
    /// Reads the debug registers.
    pub const KVM_GET_DEBUGREGS: u64 = ioc(READ, 0xa1, size_of::<kvm_debugregs>());
    /// Writes the debug registers.
    pub const KVM_SET_DEBUGREGS: u64 = ioc(WRITE, 0xa2, size_of::<kvm_debugregs>());
    /// Reads the XSAVE area.
    pub const KVM_GET_XSAVE: u64 = ioc(READ, 0xa4, size_of::<kvm_xsave>());
    /// Reads the XCRs.
    pub const KVM_GET_XCRS: u64 = ioc(READ, 0xa6, size_of::<kvm_xcrs>());
    /// Sets or replaces a memory slot (VM ioctl).
    pub const KVM_SET_USER_MEMORY_REGION: u64 =
        ioc(WRITE, 0x46, size_of::<kvm_userspace_memory_region>());
    /// Reads and resets a slot's dirty bitmap (VM ioctl).
    pub const KVM_GET_DIRTY_LOG: u64 = ioc(WRITE, 0x42, size_of::<kvm_dirty_log>());
    /// Clears part of a slot's dirty bitmap (VM ioctl).
    pub const KVM_CLEAR_DIRTY_LOG: u64 = ioc(READ | WRITE, 0xc0, size_of::<kvm_clear_dirty_log>());
    /// Replaces the MSR filter (VM ioctl).
    pub const KVM_X86_SET_MSR_FILTER: u64 = ioc(WRITE, 0xc6, size_of::<kvm_msr_filter>());
}

use kvm_requests::*;

/// The KVM requests a vCPU thread makes: running, the registers and events the dispatcher,
/// hooks, the engine and the GDB stub read and write, and the VM-wide changes the engine makes
/// while handling an exit (MSR filter, dirty log).
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_TRANSLATE,
    KVM_INTERRUPT,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_NMI,
    KVM_SET_GUEST_DEBUG,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_GET_XSAVE,
    KVM_GET_XCRS,
    KVM_GET_CPUID2,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    KVM_X86_SET_MSR_FILTER,
];

/// The requests a service thread makes: the MSR filter and dirty log the engine changes while
/// serving a tool's command, and `FIONBIO` (non-blocking sockets).
const SERVICE_IOCTLS: &[u64] = &[
    KVM_X86_SET_MSR_FILTER,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    libc::FIONBIO,
];

/// `fcntl` commands the standard library uses on a thread's fds.
const FCNTL_COMMANDS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

/// `openat` flags that would create, truncate or write.
const OPEN_WRITE_FLAGS: u64 = (libc::O_WRONLY
    | libc::O_RDWR
    | libc::O_CREAT
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_TMPFILE) as u64;

/// An entry with any arguments.
const fn any(name: &'static str, nr: libc::c_long, why: &'static str) -> Allowed {
    Allowed {
        name,
        nr,
        rule: ArgRule::Any,
        why,
    }
}

/// An entry with an argument rule.
const fn with(name: &'static str, nr: libc::c_long, rule: ArgRule, why: &'static str) -> Allowed {
    Allowed {
        name,
        nr,
        rule,
        why,
    }
}

/// What every filtered thread needs: the Rust and glibc runtime (locks, memory, signals,
/// thread exit, panics), time and sleeping, writing logs and serial output.
const RUNTIME: &[Allowed] = &[
    any(
        "futex",
        libc::SYS_futex,
        "locks, condition variables, parking, joins",
    ),
    any(
        "sched_yield",
        libc::SYS_sched_yield,
        "spin-then-yield waits (rings, pauses)",
    ),
    any("nanosleep", libc::SYS_nanosleep, "sleeps"),
    any("clock_nanosleep", libc::SYS_clock_nanosleep, "sleeps"),
    any(
        "clock_gettime",
        libc::SYS_clock_gettime,
        "time when the vDSO is not used",
    ),
    any(
        "gettimeofday",
        libc::SYS_gettimeofday,
        "time when the vDSO is not used",
    ),
    any(
        "restart_syscall",
        libc::SYS_restart_syscall,
        "resumes a sleep a kick signal interrupted",
    ),
    with(
        "mmap",
        libc::SYS_mmap,
        ArgRule::Clear {
            arg: 2,
            mask: libc::PROT_EXEC as u64,
        },
        "allocator arenas; MAP_FIXED remaps of window pages (never executable)",
    ),
    // Any protection: the engine lifts a trapped guest-RAM page to read+write+exec for the
    // one instruction a guest fetch steps through it (upstream KVM needs PROT_EXEC there).
    any(
        "mprotect",
        libc::SYS_mprotect,
        "allocator arenas growing; the engine's page access on guest RAM",
    ),
    any(
        "munmap",
        libc::SYS_munmap,
        "allocator, window pages, thread stacks",
    ),
    any(
        "madvise",
        libc::SYS_madvise,
        "allocator trimming, thread stack release at exit",
    ),
    any(
        "mremap",
        libc::SYS_mremap,
        "allocator growing a large block",
    ),
    any("brk", libc::SYS_brk, "allocator (main arena)"),
    any(
        "rt_sigprocmask",
        libc::SYS_rt_sigprocmask,
        "glibc masks signals around thread exit",
    ),
    any(
        "rt_sigreturn",
        libc::SYS_rt_sigreturn,
        "return from the kick signal handler",
    ),
    any(
        "sigaltstack",
        libc::SYS_sigaltstack,
        "the stack-overflow handler's stack, removed at exit",
    ),
    with(
        "tgkill",
        libc::SYS_tgkill,
        ArgRule::ThisProcess { arg: 0 },
        "kicks to vCPU threads, abort(); only threads of this process",
    ),
    any(
        "getpid",
        libc::SYS_getpid,
        "pthread_kill names this process",
    ),
    any("gettid", libc::SYS_gettid, "thread id (logs, pthread_kill)"),
    any(
        "sched_getaffinity",
        libc::SYS_sched_getaffinity,
        "glibc counts CPUs (malloc arenas)",
    ),
    with(
        "openat",
        libc::SYS_openat,
        ArgRule::Clear {
            arg: 2,
            mask: OPEN_WRITE_FLAGS,
        },
        "glibc reads /sys/devices/system/cpu/online when adding a malloc arena; read-only",
    ),
    any(
        "read",
        libc::SYS_read,
        "eventfds, pipes, the file openat opened",
    ),
    any(
        "lseek",
        libc::SYS_lseek,
        "a panic's backtrace reading debug info",
    ),
    any(
        "fstat",
        libc::SYS_fstat,
        "a panic's backtrace sizing a file it maps",
    ),
    any(
        "newfstatat",
        libc::SYS_newfstatat,
        "a panic's backtrace sizing a file it maps",
    ),
    any(
        "statx",
        libc::SYS_statx,
        "a panic's backtrace sizing a file it maps",
    ),
    any(
        "getcwd",
        libc::SYS_getcwd,
        "a panic's backtrace shortening paths",
    ),
    any(
        "readlink",
        libc::SYS_readlink,
        "a panic's backtrace finding the executable",
    ),
    any(
        "readlinkat",
        libc::SYS_readlinkat,
        "a panic's backtrace finding the executable",
    ),
    any(
        "write",
        libc::SYS_write,
        "serial sinks, stdout, stderr, log files, eventfds",
    ),
    any(
        "writev",
        libc::SYS_writev,
        "buffered writers flushing several slices",
    ),
    any("close", libc::SYS_close, "dropping fds (streams, files)"),
    with(
        "fcntl",
        libc::SYS_fcntl,
        ArgRule::OneOf {
            arg: 1,
            values: FCNTL_COMMANDS,
        },
        "fd flags, try_clone (F_DUPFD_CLOEXEC); debug builds check fds before closing",
    ),
    any(
        "getrandom",
        libc::SYS_getrandom,
        "map tokens, hash map seeds",
    ),
    any("exit", libc::SYS_exit, "thread exit"),
    any("exit_group", libc::SYS_exit_group, "process exit"),
];

/// What a vCPU thread needs besides [`RUNTIME`].
const VCPU: &[Allowed] = &[
    with(
        "ioctl",
        libc::SYS_ioctl,
        ArgRule::Requests(VCPU_IOCTLS),
        "KVM_RUN and the vCPU and VM requests made while handling exits",
    ),
    any(
        "sendto",
        libc::SYS_sendto,
        "KVMI events and replies sent on the tool's socket",
    ),
    any(
        "sendmsg",
        libc::SYS_sendmsg,
        "KVMI events sent on the tool's socket",
    ),
    any(
        "shutdown",
        libc::SYS_shutdown,
        "detaching a tool that broke the protocol",
    ),
    any(
        "poll",
        libc::SYS_poll,
        "waiting for a socket to be writable",
    ),
    any(
        "ppoll",
        libc::SYS_ppoll,
        "waiting for a socket to be writable",
    ),
];

/// What a service thread needs besides [`RUNTIME`].
const SERVICE: &[Allowed] = &[
    with(
        "ioctl",
        libc::SYS_ioctl,
        ArgRule::Requests(SERVICE_IOCTLS),
        "the engine's VM-wide changes for a tool's command; FIONBIO",
    ),
    any("accept4", libc::SYS_accept4, "accepting tools"),
    with(
        "socket",
        libc::SYS_socket,
        ArgRule::OneOf {
            arg: 0,
            values: &[libc::AF_UNIX as u64],
        },
        "--kvmi-connect: a unix socket to the tool",
    ),
    any(
        "connect",
        libc::SYS_connect,
        "--kvmi-connect: connecting to the tool",
    ),
    any(
        "setsockopt",
        libc::SYS_setsockopt,
        "read and write timeouts",
    ),
    any(
        "getsockopt",
        libc::SYS_getsockopt,
        "a socket's pending error",
    ),
    any("sendto", libc::SYS_sendto, "replies and events"),
    any("sendmsg", libc::SYS_sendmsg, "replies and events"),
    any("recvfrom", libc::SYS_recvfrom, "commands and replies"),
    any("recvmsg", libc::SYS_recvmsg, "commands and replies"),
    any("shutdown", libc::SYS_shutdown, "ending a session"),
    any("poll", libc::SYS_poll, "waiting for a socket or an eventfd"),
    any(
        "ppoll",
        libc::SYS_ppoll,
        "waiting for a socket or an eventfd",
    ),
    any(
        "epoll_wait",
        libc::SYS_epoll_wait,
        "waiting for a socket or an eventfd",
    ),
    any(
        "epoll_pwait",
        libc::SYS_epoll_pwait,
        "waiting for a socket or an eventfd",
    ),
    any("epoll_ctl", libc::SYS_epoll_ctl, "watching a socket"),
];

/// `kind`'s allow-list (empty for [`ThreadKind::Main`], which is not filtered yet).
pub fn allow_list(kind: ThreadKind) -> Vec<Allowed> {
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Service => SERVICE,
        ThreadKind::Main => return Vec::new(),
    };
    RUNTIME.iter().chain(own).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_requests_match_the_kernel_s_numbers() {
        // From include/uapi/linux/kvm.h as the kernel encodes them on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_SET_SREGS, 0x4138_ae84);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_SET_MSRS, 0x4008_ae89);
        assert_eq!(KVM_SET_GUEST_DEBUG, 0x4048_ae9b);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_X86_SET_MSR_FILTER, 0x4188_aec6);
        assert_eq!(KVM_GET_CPUID2, 0xc008_ae91);
    }

    #[test]
    fn every_filtered_kind_compiles_and_lists_each_syscall_once() {
        for kind in ThreadKind::ALL {
            let list = allow_list(kind);
            assert_eq!(list.is_empty(), !kind.is_filtered(), "{kind}");
            let mut seen = std::collections::BTreeSet::new();
            for entry in &list {
                assert!(seen.insert(entry.nr), "{kind}: {} twice", entry.name);
                assert!(
                    !entry.why.is_empty(),
                    "{kind}: {} has no reason",
                    entry.name
                );
            }
            if kind.is_filtered() {
                let program = compile(kind).unwrap();
                // The kernel's limit is 4096 instructions.
                assert!(program.len() < 4096, "{kind}: {}", program.len());
            }
        }
    }

    #[test]
    fn a_vcpu_thread_may_not_exec_create_network_sockets_or_open_for_writing() {
        let vcpu = allow_list(ThreadKind::Vcpu);
        let has = |nr| vcpu.iter().any(|e| e.nr == nr);
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_open,
            libc::SYS_memfd_create,
        ] {
            assert!(!has(nr), "syscall {nr} is allowed on vCPU threads");
        }
        let open = vcpu.iter().find(|e| e.nr == libc::SYS_openat).unwrap();
        assert!(
            matches!(open.rule, ArgRule::Clear { arg: 2, mask } if mask & libc::O_RDWR as u64 != 0)
        );
        let service = allow_list(ThreadKind::Service);
        let socket = service.iter().find(|e| e.nr == libc::SYS_socket).unwrap();
        assert!(
            matches!(socket.rule, ArgRule::OneOf { arg: 0, values: [v] } if *v == libc::AF_UNIX as u64)
        );
    }

    #[test]
    fn disabled_filtering_installs_nothing_and_main_is_never_filtered() {
        // Main is refused before `enabled` is consulted: the calling (test) thread stays
        // unfiltered either way.
        assert!(!install(ThreadKind::Main).unwrap());
        assert!(!install_current(ThreadKind::Main).unwrap());
    }

    #[test]
    fn the_probe_says_whether_the_kernel_can_kill_the_process() {
        let a = probe();
        assert!(a.on_by_default);
        assert_eq!(a.available, a.detail.is_none(), "{a:?}");
        assert!(!a.observed().is_empty());
    }
}
