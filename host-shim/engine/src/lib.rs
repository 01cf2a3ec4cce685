//! The introspection engine: KVMI's host side on stock KVM.
//!
//! One [`Introspector`] per VM, installed as the VM's [`vmm::ExitHook`]: with no tool
//! attached it is a pass-through; a tool attached through a [`Channel`] (the unix socket of
//! [`socket`] here, or the appliance's shared-memory rings, `RingChannel` in `appliance-link`)
//! pauses vCPUs, reads and writes registers and memory, sets page access, and receives events
//! it answers with actions.
//!
//! # Threads
//! VM-scope commands (GET_VERSION, GET_GUEST_INFO, READ/WRITE_PHYSICAL, GET/SET_PAGE_ACCESS,
//! GET_MAP_TOKEN, CONTROL_BREAKPOINT, CONTROL_MSR, PAUSE_VCPU) run on the channel's reader
//! thread. vCPU-scope commands (GET/SET_REGISTERS, GET_CPUID, GET_XSAVE, INJECT_EXCEPTION,
//! CONTROL_EVENTS) are queued to the vCPU's thread and run there, while it waits for an event
//! reply or after a kick; a second queued command gets `-KVM_EBUSY`, a vCPU whose thread has
//! ended `-KVM_EAGAIN`. Every vCPU can have one event outstanding at once; replies are matched
//! by seq.
//!
//! # Actions per event (as implemented on PVM; upstream differences noted)
//! - PF, write to a write-protected page (PVM: decoded MMIO write, rip already past the
//!   instruction): CONTINUE writes the data, SKIP and RETRY drop it (the page is unchanged),
//!   CRASH stops the VM. PF read of a read-protected page: CONTINUE returns memory, or the
//!   reply's `ctx_data` (then memory) when `ctx_size > 0`; RETRY returns memory; SKIP returns
//!   ctx_data or zeros. KVM completes the read (the emulated instruction: the data written
//!   to its destination register, rip moved past it) on the next entry, after the reply.
//!   Registers loaded before that completion make KVM drop its emulator's register cache and
//!   the data never reaches the destination (PVM, measured), so a SET_REGISTERS sent while
//!   the read event waits is only recorded (a GET_REGISTERS in the event returns it); after
//!   the reply the engine has KVM complete the read without entering the guest
//!   (`ExitContext::complete_then_call_back`) and then loads, for each general register, rip
//!   and rflags, the tool's value where it differs from the event's, else what the
//!   completion left. So a register the tool did not change gets the read's result (RAX =
//!   memory or ctx_data for `mov rax, [mem]`), one it changed keeps the tool's value (a tool
//!   that emulates the read sets the destination and replies SKIP), and a rip the tool moved
//!   wins over the one past the instruction. RETRY merges the same way (the read is under
//!   way and completes; a tool re-enters at the instruction by setting rip back). Test:
//!   `set_registers_during_a_read_event_keeps_the_tool_s_changes_and_the_read_s_destination`.
//!   PF exec (PVM emulation failure in a no-exec page, gva = rip; for an
//!   instruction that runs into a second no-exec page, a second event with gva = that page's
//!   first byte): CONTINUE single-steps the instruction with the page(s) unprotected, then
//!   re-protects; RETRY/SKIP re-enter as is (the tool moved rip or changed access, else it
//!   traps again). PF of native CPL3 code (PVM `EFAULT`, decoded at rip): the same actions;
//!   CONTINUE steps the instruction at CPL0 where that changes nothing else, natively
//!   otherwise (then the guest sees a #DB after it; see [`fault`]).
//!   Upstream (`KVM_EXIT_MEMORY_FAULT`, no access type, nothing emulated): the access is
//!   inferred from the page's restriction and rip; CONTINUE steps it through like exec; SKIP
//!   = RETRY; ctx_data is not supported. The event's `mode` holds the access bits (1 = R,
//!   2 = W, 4 = X); gva is `u64::MAX` for data accesses (unknown on this path).
//!   The reply's `trap_access` is not implemented (on either path): a reply that sets it is a
//!   protocol error (the tool is detached), not silently ignored.
//! - BREAKPOINT (hardware DR0–DR3 set with CONTROL_BREAKPOINT, limit 4; gpa translated from
//!   rip with the guest's page tables): CONTINUE resumes, stepping over the breakpoint if rip
//!   is still on one; RETRY and SKIP re-enter at rip as the tool left it (on an armed
//!   breakpoint it fires again). Where the probe saw KVM deliver INT3 (`USE_SW_BP`; not on
//!   PVM), a guest INT3 (e.g. one the tool wrote) is a BREAKPOINT event too: CONTINUE
//!   re-injects #BP into the guest, RETRY/SKIP re-enter at rip as the tool left it.
//! - SINGLESTEP (enabled with CONTROL_EVENTS; stepping lasts while the event is enabled):
//!   CONTINUE/RETRY/SKIP step the next instruction.
//! - MSR (writes to MSRs enabled with CONTROL_MSR): CONTINUE writes the reply's `new_val`,
//!   SKIP drops the write, CRASH stops.
//! - HYPERCALL (agent call on the doorbell port: 64-bit RAX=34, RDI=24, RSI=0; 32-bit
//!   EAX=34, EBX=24, ECX=0): RAX = 0 after the reply; untouched when no event was delivered.
//! - PAUSE_VCPU: CONTINUE (or RETRY) resumes; CRASH stops. CREATE_VCPU, TRAP: CONTINUE
//!   resumes; CRASH stops (as the v4 text says, they do not accept RETRY).
//! - A reply whose action the event does not accept (e.g. RETRY to CREATE_VCPU or TRAP) is a
//!   protocol error: the tool is detached and everything unhooked.
//! - No answer within the reply timeout: the tool is detached and everything unhooked
//!   (PAUSE_VCPU events are exempt: a paused vCPU waits for its tool). A tool still sending
//!   commands keeps its vCPUs waiting, but only until a reply timeout after its last message.
//!
//! A tool that does not take a message within the reply timeout (it stopped reading, or is
//! stopped) is detached as well: the socket transport writes each message whole within that
//! deadline or not at all, never holding a lock while it waits ([`socket`]).
//!
//! # Restrictions refused on PVM
//! SET_PAGE_ACCESS refuses (`-KVM_EINVAL`, logged with the page's use) restrictions the host
//! itself would trip over, since it reads and writes those pages through the protected
//! mapping without an exit: R or X removal on the vCPUs' page tables (reachable from the
//! current CR3 or a root loaded lately) and on their IDT, GDT and TSS pages, and any
//! restriction on the exception-frame areas below TSS.RSP0 and IST1–7 ([`walked`]). The
//! check is a snapshot of the vCPUs' state at the command.

pub mod access;
pub mod alias;
pub mod convert;
pub mod decode;
mod engine;
pub mod fault;
mod hooks;
pub mod libkvmi;
pub mod lock_order;
pub mod masks;
pub mod msr;
pub mod slot;
pub mod socket;
pub mod tokens;
pub mod transport;
mod vcpu_side;
pub mod walked;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::masks::AllowedMasks;

pub use engine::{HW_BREAKPOINTS, Introspector, KVMI_VERSION, VCPU_COMMAND_TIMEOUT};
pub use socket::{Dialect, Endpoint, SocketServer};
pub use transport::{Channel, ChannelError, ReplyWait, Route};

use vmm::error::VmError;
use vmm::probe::Capabilities;
use vmm::running::RunningVm;
use vmm::vm::{RunLimits, RunReport, Vm};

/// Default time a tool has to answer an event before it is detached.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How the introspector of a VM behaves.
#[derive(Clone, Debug)]
pub struct IntrospectorConfig {
    /// The operator's restriction (`--allow-commands`, `--allow-events`); intersected with
    /// what the host delivers. Default: everything.
    pub allowed: AllowedMasks,
    /// Time a tool has to answer an event (None: wait forever).
    pub reply_timeout: Option<Duration>,
    /// Keep every vCPU from starting until a tool attaches, then send CREATE_VCPU events
    /// (if allowed) and start each vCPU when its event is answered.
    pub wait_for_tool: bool,
}

impl Default for IntrospectorConfig {
    fn default() -> Self {
        IntrospectorConfig {
            allowed: AllowedMasks::all(),
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            wait_for_tool: false,
        }
    }
}

/// Errors setting up introspection.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    /// The VM could not be built or started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The socket or RAM alias could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Introspector {
    /// Creates the introspector of `vm` (installing nothing yet; see [`Introspector::install`]).
    /// `caps` decides which commands and events this host can deliver.
    pub fn new(
        vm: &Vm,
        caps: &Capabilities,
        config: IntrospectorConfig,
    ) -> Result<Arc<Introspector>, IntrospectError> {
        let masks = masks::intersect(masks::host_masks(caps), config.allowed);
        let vcpus = vm.boot_info().vcpu_count;
        Introspector::new_parts(
            config,
            masks,
            vm.ram().clone(),
            vm.vm_fd().clone(),
            vcpus,
            caps.sw_breakpoints,
            caps.pvm_module,
        )
        .map(|i| {
            // Known before any vCPU runs, so GET_GUEST_INFO never reports 0.
            if let Some(khz) = vm.tsc_khz() {
                i.tsc_khz.store(u64::from(khz), Ordering::Relaxed);
            }
            Arc::new(i)
        })
        .map_err(|source| IntrospectError::Io {
            what: "mapping the guest RAM alias".into(),
            source,
        })
    }

    /// Creates the introspector of `vm` and installs it as the VM's exit hook.
    pub fn install(
        vm: &mut Vm,
        caps: &Capabilities,
        config: IntrospectorConfig,
    ) -> Result<Arc<Introspector>, IntrospectError> {
        let i = Introspector::new(vm, caps, config)?;
        vm.set_hook(i.clone());
        Ok(i)
    }
}

/// A VM started with its introspector and a KVMI socket.
pub struct IntrospectedVm {
    /// The running VM.
    pub running: RunningVm,
    /// Its introspector.
    pub introspector: Arc<Introspector>,
    /// The socket server (listening or connecting).
    pub server: SocketServer,
    /// libkvmi dialect: how long a tool has to close after UNHOOK (None: v4, no UNHOOK).
    unhook_timeout: Option<Duration>,
    /// When the VM was started.
    started: std::time::Instant,
}

impl std::fmt::Debug for IntrospectedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectedVm")
            .field("socket", &self.server.path())
            .finish()
    }
}

impl IntrospectedVm {
    /// The KVMI socket path.
    pub fn socket(&self) -> &Path {
        self.server.path()
    }

    /// Waits for the run's end (see [`RunningVm::wait`]), then stops the socket server.
    ///
    /// libkvmi dialect: when the run is to end by `limits` (timeout, interrupt), the attached
    /// tool gets the UNHOOK event first, while the VM still runs, and time to clean up and
    /// close ([`SocketServer::unhook`]); when the guest ends by itself, UNHOOK follows.
    pub fn wait(self, limits: RunLimits) -> RunReport {
        let mut unhooked = false;
        if let Some(unhook_timeout) = self.unhook_timeout {
            let handle = self.running.handle();
            while !handle.has_ended() {
                let timed_out = limits.timeout.is_some_and(|t| self.started.elapsed() >= t);
                let interrupted = limits.interrupt.is_some_and(|f| f.load(Ordering::SeqCst));
                if timed_out || interrupted {
                    self.server.unhook(unhook_timeout);
                    unhooked = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let report = self.running.wait(limits);
        if let Some(unhook_timeout) = self.unhook_timeout
            && !unhooked
        {
            self.server.unhook(unhook_timeout);
        }
        self.server.stop();
        report
    }
}

/// Builds the introspector of `vm` (masks from the host's cached capability probe),
/// starts the VM and serves KVMI on `endpoint`. With `config.wait_for_tool` the vCPUs start
/// only once a tool attached.
pub fn start_introspected(
    vm: Vm,
    config: IntrospectorConfig,
    endpoint: Endpoint,
) -> Result<IntrospectedVm, IntrospectError> {
    start_introspected_dialect(vm, config, endpoint, Dialect::V4)
}

/// [`start_introspected`] with the socket speaking `dialect`.
pub fn start_introspected_dialect(
    mut vm: Vm,
    config: IntrospectorConfig,
    endpoint: Endpoint,
    dialect: Dialect,
) -> Result<IntrospectedVm, IntrospectError> {
    let caps = vmm::probe::cached_capabilities().map_err(|e| IntrospectError::Io {
        what: "capability probe".into(),
        source: std::io::Error::other(e),
    })?;
    let unhook_timeout = match &dialect {
        Dialect::Libkvmi(c) => Some(c.unhook_timeout),
        Dialect::V4 => None,
    };
    let introspector = Introspector::install(&mut vm, caps, config)?;
    let server = SocketServer::start_dialect(introspector.clone(), endpoint, dialect)?;
    let running = vm.start()?;
    introspector.set_handle(running.handle());
    server.set_vm(running.handle());
    Ok(IntrospectedVm {
        running,
        introspector,
        server,
        unhook_timeout,
        started: std::time::Instant::now(),
    })
}

/// A fresh socket path in the temporary directory (for tests and tools).
pub fn temp_socket_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "kvmi-{tag}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}
