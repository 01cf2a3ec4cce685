//! The introspector's shared state, the attach/detach (unhook) cycle, and the reader-thread
//! side of the protocol: classify every incoming message, run VM-scope commands, queue
//! vCPU-scope commands to their vCPU thread, and hand event replies to the waiting vCPU.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use protocol::V4;
use protocol::command::{Command, CommandKind};
use protocol::error::ErrorCode;
use protocol::event::EventKind;
use protocol::event_reply::{EventReply, EventReplyData};
use protocol::masks::AllowedMasks;
use protocol::reply::{CommandResult, GuestInfo, Reply, VersionInfo};
use protocol::types::{Access, MapToken, VcpuSelector};
use protocol::wire::{ToolMessage, WireProfile};

use super::IntrospectorConfig;
use super::access::{AccessTable, PAGE, access_is_valid, prot_for};
use super::alias::RamAlias;
use super::lock_order;
use super::msr::MsrFilter;
use super::slot::{
    Exchange, Life, Mailbox, OwnedReply, QueuedCommand, VcpuCommand, VcpuSlot, VcpuView,
};
use super::tokens::{DEFAULT_TTL, TargetKey, TokenIssuer};
use super::transport::{Channel, ChannelError, Route};
use super::walked::HostWalked;
use vmm::memory::GuestRam;
use vmm::running::VmHandle;
use vmm::sync::RankedMutex;

/// The KVMI version GET_VERSION reports.
pub const KVMI_VERSION: u32 = 1;
/// How long the reader waits for a vCPU thread to run a queued command.
pub const VCPU_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Hardware breakpoint slots (DR0–DR3).
pub const HW_BREAKPOINTS: usize = 4;
/// How long SET_PAGE_ACCESS waits for a running vCPU to record its current state after a
/// kick (see [`Introspector::host_walked`]); past it the state last recorded is used.
pub const VIEW_REFRESH_TIMEOUT: Duration = Duration::from_millis(200);

/// The attached tool, if any.
#[derive(Default)]
pub(crate) struct Link {
    pub(crate) channel: Option<Arc<dyn Channel>>,
    /// Bumped by every attach and detach.
    pub(crate) generation: u64,
    /// A tool attached at least once (releases `--kvmi-wait`).
    pub(crate) ever_attached: bool,
    /// When the tool last sent anything.
    pub(crate) last_heard: Option<Instant>,
}

/// The execution breakpoints set with CONTROL_BREAKPOINT (shared by every vCPU).
#[derive(Debug, Default)]
pub(crate) struct Breakpoints {
    pub(crate) gvas: [Option<u64>; HW_BREAKPOINTS],
    pub(crate) generation: u64,
}

/// The introspector of one VM: installed as its [`vmm::ExitHook`], attached to at most one
/// tool at a time through a [`Channel`]. With no tool attached it is a pass-through.
pub struct Introspector {
    pub(crate) config: IntrospectorConfig,
    pub(crate) masks: AllowedMasks,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) alias: RamAlias,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) handle: OnceLock<VmHandle>,
    pub(crate) link: RankedMutex<Link>,
    pub(crate) link_changed: Condvar,
    pub(crate) generation: AtomicU64,
    pub(crate) slots: Vec<VcpuSlot>,
    pub(crate) access: RankedMutex<AccessTable>,
    pub(crate) breakpoints: RankedMutex<Breakpoints>,
    pub(crate) msr_filter: MsrFilter,
    pub(crate) tokens: TokenIssuer,
    pub(crate) event_seq: AtomicU32,
    pub(crate) tickets: AtomicU64,
    /// KVM delivers guest INT3 as KVM_EXIT_DEBUG (USE_SW_BP) on this host.
    pub(crate) sw_breakpoints: bool,
    /// The guest TSC frequency in kHz (read by the first vCPU at start; 0 = unknown).
    pub(crate) tsc_khz: AtomicU64,
    /// The host walks guest page tables and delivers events through the RAM mapping, and
    /// single-steps only the CPL0 code it emulates (PVM): restrictions on what it walks are
    /// refused (`walked`), and CPL3 instructions are stepped at CPL0 (`hooks`).
    pub(crate) software_mmu: bool,
    /// Bumped (under the access lock) whenever the host protection of a guest page changes:
    /// an exit caused by a protection that is gone by the time it is handled is retried.
    pub(crate) prot_epoch: AtomicU64,
    /// Events delivered to a tool (sent on its channel), over the VM's life.
    pub(crate) events_sent: AtomicU64,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspector")
            .field("vcpus", &self.slots.len())
            .field("masks", &self.masks)
            .field("attached", &self.is_attached())
            .finish()
    }
}

/// The reply message of `kind` under `seq` (a `-KVM_ENOMEM` error reply if it cannot be
/// encoded).
pub(crate) fn encode_result(kind: CommandKind, seq: u32, result: &CommandResult<'_>) -> Vec<u8> {
    let len = V4::reply_len(kind, result).unwrap_or(16);
    let mut buf = vec![0u8; len];
    match V4::encode_reply(kind, seq, result, &mut buf) {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        Err(e) => {
            tracing::error!("cannot encode the {kind:?} reply: {e}");
            error_message(V4::command_id(kind), seq, ErrorCode::NoMem)
        }
    }
}

/// An error-only reply under message `id`.
pub(crate) fn error_message(id: u16, seq: u32, code: ErrorCode) -> Vec<u8> {
    let mut buf = vec![0u8; 16];
    let n = V4::encode_error_reply(id, seq, code, &mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

impl Introspector {
    pub(crate) fn new_parts(
        config: IntrospectorConfig,
        masks: AllowedMasks,
        ram: Arc<GuestRam>,
        vm_fd: Arc<VmFd>,
        vcpus: u32,
        sw_breakpoints: bool,
        software_mmu: bool,
    ) -> std::io::Result<Introspector> {
        let alias = RamAlias::new(&ram)?;
        let target = ram.host_base() as u64;
        let msr_filter = MsrFilter::new(&vm_fd);
        Ok(Introspector {
            config,
            masks,
            alias,
            ram,
            vm_fd,
            handle: OnceLock::new(),
            link: RankedMutex::new(lock_order::LINK, Link::default()),
            link_changed: Condvar::new(),
            generation: AtomicU64::new(0),
            slots: (0..vcpus).map(|_| VcpuSlot::default()).collect(),
            access: RankedMutex::new(lock_order::ACCESS, AccessTable::default()),
            breakpoints: RankedMutex::new(lock_order::BREAKPOINTS, Breakpoints::default()),
            msr_filter,
            tokens: TokenIssuer::new(
                TargetKey::generate(target, DEFAULT_TTL).map_err(std::io::Error::other)?,
            ),
            event_seq: AtomicU32::new(1),
            tickets: AtomicU64::new(1),
            tsc_khz: AtomicU64::new(0),
            sw_breakpoints,
            software_mmu,
            prot_epoch: AtomicU64::new(0),
            events_sent: AtomicU64::new(0),
        })
    }

    /// The `GET_VERSION` masks: what this host delivers ∩ what the operator allows.
    pub fn masks(&self) -> AllowedMasks {
        self.masks
    }

    /// The map-token issuer of this VM (`GET_MAP_TOKEN`). It starts with a key of its own;
    /// whoever checks the tokens (the appliance's pager) gets the key from the supervisor,
    /// which installs it here with [`TokenIssuer::rekey`].
    pub fn tokens(&self) -> &TokenIssuer {
        &self.tokens
    }

    /// The id this VM's map tokens are bound to (a [`TargetKey`]'s target).
    pub fn token_target(&self) -> u64 {
        self.ram.host_base() as u64
    }

    /// Gives the introspector the running VM's handle (to kick vCPUs).
    pub fn set_handle(&self, handle: VmHandle) {
        let _ = self.handle.set(handle);
        // A tool may have queued vCPU commands before the VM ran (the socket accepts tools
        // before the start): their kicks found no handle, so kick those vCPUs now. A command
        // queued after this scan sees the handle (the slot lock orders the two).
        for i in 0..self.slots.len() {
            if self.slots[i].lock().mailbox.has_queued() {
                self.kick(i);
            }
        }
    }

    /// True while a tool is attached.
    pub fn is_attached(&self) -> bool {
        self.link.lock().channel.is_some()
    }

    /// Current attach generation (changes on every attach and detach).
    pub fn current_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub(crate) fn kick(&self, vcpu: usize) {
        if let Some(c) = self.handle.get().and_then(|h| h.vcpu(vcpu as u32)) {
            c.nudge();
        }
    }

    /// Attaches a tool; returns the attach generation to pass to
    /// [`Introspector::handle_message`] and [`Introspector::detach`]. Fails if a tool is
    /// already attached.
    pub fn attach(&self, channel: Arc<dyn Channel>) -> Result<u64, ChannelError> {
        let mut link = self.link.lock();
        if link.channel.is_some() {
            return Err(ChannelError::Protocol("a tool is already attached".into()));
        }
        link.channel = Some(channel);
        link.generation += 1;
        link.ever_attached = true;
        link.last_heard = Some(Instant::now());
        self.generation.store(link.generation, Ordering::SeqCst);
        if let Err(e) = self.msr_filter.apply(&self.vm_fd, &[]) {
            tracing::warn!("MSR filter for the event-header MSRs: {e}");
        }
        self.link_changed.notify_all();
        tracing::info!(generation = link.generation, "introspection tool attached");
        Ok(link.generation)
    }

    /// Detaches the tool of `generation` (no-op if it is gone already) and restores every
    /// interception: page protections, breakpoints, single step, MSR filter, event masks,
    /// tokens. vCPUs waiting for a reply continue as if answered CONTINUE.
    pub fn detach(&self, generation: u64, reason: &str) {
        let channel = {
            let mut link = self.link.lock();
            if link.generation != generation || link.channel.is_none() {
                return;
            }
            link.generation += 1;
            self.generation.store(link.generation, Ordering::SeqCst);
            self.link_changed.notify_all();
            link.channel.take()
        };
        if let Some(c) = channel {
            c.close();
        }
        tracing::info!("introspection tool detached ({reason}); unhooking");
        self.unhook();
    }

    fn unhook(&self) {
        // Held while the pages are restored, so a restriction set by the next tool is never
        // undone here. Each run lies between read-write pages: restoring it only merges
        // mappings, it never needs a new one.
        let pages = {
            let mut table = self.access.lock();
            let pages = table.len();
            let runs = table.clear();
            let mut failures = 0usize;
            for &(start, len) in &runs {
                if let Err(e) = self
                    .ram
                    .protect(start, len, libc::PROT_READ | libc::PROT_WRITE)
                {
                    if failures == 0 {
                        tracing::error!("unhook: restoring {start:#x}+{len:#x}: {e}");
                    }
                    failures += 1;
                }
            }
            if failures > 1 {
                tracing::error!("unhook: {failures} page ranges could not be restored");
            }
            // A step-through that ends after this re-protects its pages under the same lock:
            // it finds no restriction and leaves them read-write.
            self.prot_epoch.fetch_add(1, Ordering::SeqCst);
            pages
        };
        {
            let mut bps = self.breakpoints.lock();
            bps.gvas = [None; HW_BREAKPOINTS];
            bps.generation += 1;
        }
        for slot in &self.slots {
            slot.lock().reset();
            slot.changed.notify_all();
        }
        if let Err(e) = self.msr_filter.clear(&self.vm_fd) {
            tracing::error!("unhook: clearing the MSR filter: {e}");
        }
        self.tokens.revoke_all();
        for i in 0..self.slots.len() {
            self.kick(i);
        }
        tracing::info!(pages, "unhooked: the VM runs untouched");
    }

    /// The attached tool's channel, if `generation` is still the attached one.
    pub(crate) fn channel_of(&self, generation: u64) -> Option<Arc<dyn Channel>> {
        let link = self.link.lock();
        if link.generation != generation {
            return None;
        }
        link.channel.clone()
    }

    /// Sends a message to the attached tool; on failure the tool is detached. False if no
    /// tool (of `generation`) is attached or the send failed.
    pub(crate) fn send(&self, generation: u64, message: &[u8], route: Route) -> bool {
        let channel = {
            let link = self.link.lock();
            if link.generation != generation {
                return false;
            }
            link.channel.clone()
        };
        let Some(channel) = channel else {
            return false;
        };
        match channel.send(message, route) {
            Ok(()) => true,
            Err(e) => {
                self.detach(generation, &format!("send failed: {e}"));
                false
            }
        }
    }

    /// Sends event `seq` to the attached tool ([`Channel::send_event`]); on failure the tool
    /// is detached. False if no tool (of `generation`) is attached or the send failed.
    pub(crate) fn send_event(
        &self,
        generation: u64,
        seq: u32,
        event: &protocol::event::Event,
        message: &[u8],
        vcpu: u32,
    ) -> bool {
        let Some(channel) = self.channel_of(generation) else {
            return false;
        };
        match channel.send_event(seq, event, message, vcpu) {
            Ok(()) => true,
            Err(e) => {
                self.detach(generation, &format!("send failed: {e}"));
                false
            }
        }
    }

    /// Waits until a tool has attached once (for `--kvmi-wait`), or the VM ended.
    pub(crate) fn wait_first_attach(&self) {
        let mut link = self.link.lock();
        while !link.ever_attached {
            if self.handle.get().is_some_and(|h| h.has_ended()) {
                return;
            }
            link = link
                .wait_timeout(&self.link_changed, Duration::from_millis(100))
                .0;
        }
    }

    /// When the tool last sent anything (for the reply timeout: a tool that is busy
    /// answering commands gets `reply_timeout` from its last message, not more).
    pub(crate) fn last_heard(&self) -> Option<Instant> {
        self.link.lock().last_heard
    }

    /// Handles one whole message from the tool of `generation`. Commands are answered
    /// (errors included) on the channel; an `Err` is a protocol error: the caller closes
    /// the channel with [`Introspector::detach`].
    pub fn handle_message(&self, generation: u64, message: &[u8]) -> Result<(), ChannelError> {
        if self.current_generation() != generation {
            return Err(ChannelError::Detached);
        }
        self.link.lock().last_heard = Some(Instant::now());
        let frame = V4::parse_frame(message).map_err(|e| ChannelError::Protocol(e.to_string()))?;
        let (id, seq) = (frame.header.id, frame.header.seq);
        let reply = match V4::decode_tool_message(frame) {
            Ok(ToolMessage::EventReply { seq, payload }) => {
                return self.event_reply(seq, payload);
            }
            Ok(ToolMessage::Command { seq, command }) => self.command(seq, &command),
            Err(e) if id == V4::EVENT_ID => {
                return Err(ChannelError::Protocol(format!("tool sent an event: {e}")));
            }
            Err(e) => {
                tracing::debug!(id, seq, "bad command: {e}");
                error_message(id, seq, e.error_code())
            }
        };
        if self.send(generation, &reply, Route::CommandReply) {
            Ok(())
        } else {
            Err(ChannelError::Detached)
        }
    }

    fn event_reply(&self, seq: u32, payload: &[u8]) -> Result<(), ChannelError> {
        self.deliver_event_reply(seq, |kind| {
            V4::decode_event_reply(kind, payload)
                .map_err(|e| format!("bad reply to {kind:?} event {seq}: {e}"))
        })
    }

    /// Delivers the tool's reply to the outstanding event `seq`: `decode` gets the event's
    /// kind and returns the reply, or why it is malformed (a protocol error).
    fn deliver_event_reply<'p>(
        &self,
        seq: u32,
        decode: impl FnOnce(EventKind) -> Result<EventReply<'p>, String>,
    ) -> Result<(), ChannelError> {
        for (i, slot) in self.slots.iter().enumerate() {
            let mut s = slot.lock();
            let kind = match s.exchange {
                Exchange::Sent { seq: sent, kind } if sent == seq => kind,
                _ => continue,
            };
            let reply = decode(kind).map_err(ChannelError::Protocol)?;
            if reply.event != kind {
                return Err(ChannelError::Protocol(format!(
                    "reply to {kind:?} event {seq} answers a {:?} event",
                    reply.event
                )));
            }
            let (new_val, ctx_data) = match reply.data {
                EventReplyData::Msr { new_val } | EventReplyData::Cr { new_val } => {
                    (Some(new_val), Vec::new())
                }
                // trap_access (emulate a REP instruction only once) is not implemented: the
                // upstream path emulates nothing, and the PVM path completes one trapped
                // access at a time. Refused rather than silently ignored (docs/protocol.md).
                EventReplyData::PageFault(pf) if pf.trap_access => {
                    return Err(ChannelError::Protocol(format!(
                        "reply to PAGE_FAULT event {seq} sets trap_access, which this host does \
                         not support"
                    )));
                }
                EventReplyData::PageFault(pf) => (None, pf.ctx_data.to_vec()),
                EventReplyData::None => (None, Vec::new()),
            };
            s.exchange = Exchange::Answered(OwnedReply {
                action: reply.action,
                new_val,
                ctx_data,
            });
            drop(s);
            slot.changed.notify_all();
            tracing::trace!(vcpu = i, seq, "event reply");
            return Ok(());
        }
        Err(ChannelError::Protocol(format!(
            "reply to event seq {seq}, which is not outstanding"
        )))
    }

    /// Runs one command for the tool of `generation` and returns the encoded v4 reply
    /// (what [`Introspector::handle_message`] would send). For transports that speak another
    /// dialect and translate the reply (the libkvmi dialect, [`crate::libkvmi`]).
    pub fn run_command(
        &self,
        generation: u64,
        seq: u32,
        command: &Command<'_>,
    ) -> Result<Vec<u8>, ChannelError> {
        if self.current_generation() != generation {
            return Err(ChannelError::Detached);
        }
        self.link.lock().last_heard = Some(Instant::now());
        Ok(self.command(seq, command))
    }

    /// Delivers a reply to the outstanding event `seq` from the tool of `generation`, as
    /// [`Introspector::handle_message`] does for a v4 event reply. `decode` gets the event's
    /// kind; its error, or a reply to another kind, is a protocol error.
    pub fn answer_event<'p>(
        &self,
        generation: u64,
        seq: u32,
        decode: impl FnOnce(EventKind) -> Result<EventReply<'p>, String>,
    ) -> Result<(), ChannelError> {
        if self.current_generation() != generation {
            return Err(ChannelError::Detached);
        }
        self.link.lock().last_heard = Some(Instant::now());
        self.deliver_event_reply(seq, decode)
    }

    /// Records that the tool of `generation` sent something (for the reply timeout).
    pub fn heard_from(&self, generation: u64) {
        let mut link = self.link.lock();
        if link.generation == generation {
            link.last_heard = Some(Instant::now());
        }
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.slots.len()
    }

    /// What the operator allows (`--allow-commands`, `--allow-events`), before the
    /// intersection with what this host delivers ([`Introspector::masks`]).
    pub fn operator_masks(&self) -> AllowedMasks {
        self.config.allowed
    }

    /// True when `gpa..gpa+len` lies inside guest RAM.
    pub fn ram_contains(&self, gpa: u64, len: u64) -> bool {
        self.alias.contains(gpa, len)
    }

    /// Size of guest RAM in bytes (RAM is one range from guest-physical 0).
    pub fn ram_size(&self) -> u64 {
        self.alias.size()
    }

    /// Translates `gva` with the guest page tables rooted at `cr3` (see
    /// [`crate::alias::translate`]).
    pub fn translate(&self, cr0: u64, cr3: u64, gva: u64) -> Option<u64> {
        super::alias::translate(&self.alias, cr0, cr3, gva)
    }

    /// Events sent to a tool (the socket's or the appliance's) so far, over every attachment.
    pub fn events_sent(&self) -> u64 {
        self.events_sent.load(Ordering::Relaxed)
    }

    /// Takes the next event sequence number (for events a transport raises itself, e.g.
    /// the libkvmi UNHOOK).
    pub fn next_event_seq(&self) -> u32 {
        self.event_seq.fetch_add(1, Ordering::Relaxed)
    }

    fn command(&self, seq: u32, command: &Command<'_>) -> Vec<u8> {
        let kind = command.kind();
        if let Err(e) = self.masks.check_command(kind) {
            return error_message(V4::command_id(kind), seq, e.error_code());
        }
        if let Some(vcpu) = command.vcpu()
            && usize::from(vcpu) >= self.slots.len()
        {
            return error_message(V4::command_id(kind), seq, ErrorCode::Inval);
        }
        let result = match *command {
            Command::GetVersion => Ok(Reply::Version(VersionInfo {
                version: KVMI_VERSION,
                allowed: self.masks,
            })),
            Command::GetGuestInfo => Ok(Reply::GuestInfo(GuestInfo {
                vcpu_count: self.slots.len() as u16,
                tsc_speed: self.tsc_khz.load(Ordering::Relaxed) * 1000,
            })),
            Command::ControlCr { .. } | Command::ControlVe { .. } => Err(ErrorCode::NoSys),
            Command::ReadPhysical { gpa, size } => {
                let mut buf = vec![0u8; size as usize];
                return if self.alias.read(gpa, &mut buf) {
                    encode_result(kind, seq, &Ok(Reply::Physical(&buf)))
                } else {
                    encode_result(kind, seq, &Err(ErrorCode::Inval))
                };
            }
            Command::WritePhysical { gpa, data } => {
                if self.alias.write(gpa, data) {
                    Ok(Reply::Empty)
                } else {
                    Err(ErrorCode::Inval)
                }
            }
            Command::GetPageAccess { view, gpas, .. } => {
                if view != 0 {
                    Err(ErrorCode::NoSys)
                } else if gpas.iter().any(|g| !self.alias.contains(g, 1)) {
                    Err(ErrorCode::Inval)
                } else {
                    let table = self.access.lock();
                    let out: Vec<Access> = gpas.iter().map(|g| table.get(g)).collect();
                    drop(table);
                    return encode_result(
                        kind,
                        seq,
                        &Ok(Reply::PageAccess(protocol::list::List::from_slice(&out))),
                    );
                }
            }
            Command::SetPageAccess { view, entries, .. } => {
                if view != 0 {
                    Err(ErrorCode::NoSys)
                } else {
                    self.set_page_access(entries.iter().map(|e| (e.gpa, e.access)))
                }
            }
            Command::GetMapToken => match self.tokens.issue() {
                Ok(t) => Ok(Reply::MapToken(MapToken(t.to_bytes()))),
                Err(_) => Err(ErrorCode::Again),
            },
            Command::ControlBreakpoint { vcpus, enable, gva } => {
                self.control_breakpoint(vcpus, enable, gva)
            }
            Command::ControlMsr { vcpu, enable, msr } => self.control_msr(vcpu, enable, msr),
            Command::PauseVcpu { vcpu } => self.pause_vcpu(vcpu),
            Command::ControlEvents { events, .. }
                if self.masks.check_event_set(events).is_err() =>
            {
                Err(ErrorCode::Perm)
            }
            _ => match VcpuCommand::from_command(command) {
                Some(queued) => {
                    let vcpu = command.vcpu().unwrap_or(0);
                    return self.queue_vcpu_command(usize::from(vcpu), seq, queued);
                }
                None => Err(ErrorCode::NoSys),
            },
        };
        encode_result(kind, seq, &result)
    }

    fn set_page_access(
        &self,
        entries: impl Iterator<Item = (u64, Access)>,
    ) -> CommandResult<'static> {
        // Entries apply in order and never stop the command; each one either applies fully
        // (host protection in place, then recorded) or leaves no trace. The table logs
        // refusals once per burst.
        let entries: Vec<(u64, Access)> = entries.collect();
        let restricting = entries
            .iter()
            .any(|&(_, a)| prot_for(a) != libc::PROT_READ | libc::PROT_WRITE);
        // Before the table lock: refreshing the vCPUs' state takes their slots.
        let walked = (self.software_mmu && restricting).then(|| self.host_walked());
        let mut refused = 0usize;
        let mut failed = None;
        let mut table = self.access.lock();
        for (gpa, access) in entries {
            // Write without read (`-w-`, `-wx`) is not a valid combination (EPT cannot
            // express it): -KVM_EINVAL, and the entry leaves no trace.
            if !self.alias.contains(gpa, 1) || !access_is_valid(access) {
                failed = Some(ErrorCode::Inval);
                continue;
            }
            if let Some(used) = walked
                .as_ref()
                .and_then(|w| w.refusal(gpa, prot_for(access)))
            {
                if refused == 0 {
                    tracing::warn!(
                        "SET_PAGE_ACCESS refused: page {:#x} is {}; restricting it as {access:?} \
                         would make the guest fault or triple-fault instead of trapping \
                         (-KVM_EINVAL)",
                        gpa & !(PAGE - 1),
                        used.describe()
                    );
                }
                refused += 1;
                failed = Some(ErrorCode::Inval);
                continue;
            }
            let applied = table.set_with(gpa, access, |change| {
                self.ram.protect(change.page, PAGE, change.prot)
            });
            if applied.is_err() {
                failed = Some(ErrorCode::NoMem);
            }
        }
        self.prot_epoch.fetch_add(1, Ordering::SeqCst);
        drop(table);
        if refused > 1 {
            tracing::warn!("SET_PAGE_ACCESS: {refused} entries of that command were refused");
        }
        failed.map_or(Ok(Reply::Empty), Err)
    }

    /// The guest pages the host walks on the guest's behalf (page tables, descriptor tables,
    /// trap frames; see [`crate::walked`]) for every vCPU's current state: running vCPUs are
    /// kicked to record it (at most [`VIEW_REFRESH_TIMEOUT`]); a vCPU in an event, halted or
    /// paused by the VMM is taken as last recorded.
    pub(crate) fn host_walked(&self) -> HostWalked {
        let mut pending = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let mut s = slot.lock();
            if s.life == Life::Live && !s.exchange.in_event() {
                s.view_wanted = true;
                pending.push((i, s.view_seq));
            }
        }
        for &(i, _) in &pending {
            self.kick(i);
        }
        let deadline = Instant::now() + VIEW_REFRESH_TIMEOUT;
        for (i, seq) in pending {
            let slot = &self.slots[i];
            let mut s = slot.lock();
            while s.view_seq == seq && s.life == Life::Live && !s.exchange.in_event() {
                let now = Instant::now();
                if now >= deadline {
                    tracing::debug!(vcpu = i, "no fresh state within {VIEW_REFRESH_TIMEOUT:?}");
                    break;
                }
                s = slot.wait(s, deadline - now).0;
            }
            s.view_wanted = false;
        }
        let states: Vec<(usize, VcpuView, Vec<u64>)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let s = slot.lock();
                s.view.map(|v| (i, v, s.roots.clone()))
            })
            .collect();
        let borrowed: Vec<_> = states
            .iter()
            .map(|(i, v, roots)| (*i, *v, roots.as_slice()))
            .collect();
        let read = |gpa: u64, buf: &mut [u8]| self.alias.read(gpa, buf);
        let walked = HostWalked::collect(&borrowed, &read);
        if walked.truncated {
            tracing::warn!(
                tables = walked.tables,
                "the guest's page tables were checked only in part (too many to walk)"
            );
        }
        walked
    }

    fn control_breakpoint(
        &self,
        vcpus: VcpuSelector,
        enable: bool,
        gva: u64,
    ) -> CommandResult<'static> {
        if let VcpuSelector::One(v) = vcpus
            && usize::from(v) >= self.slots.len()
        {
            return Err(ErrorCode::Inval);
        }
        let mut bps = self.breakpoints.lock();
        let existing = bps.gvas.iter().position(|g| *g == Some(gva));
        if enable {
            if existing.is_none() {
                let free = bps.gvas.iter().position(Option::is_none);
                let Some(free) = free else {
                    return Err(ErrorCode::Busy);
                };
                bps.gvas[free] = Some(gva);
            }
        } else {
            let Some(i) = existing else {
                return Err(ErrorCode::NoEnt);
            };
            bps.gvas[i] = None;
        }
        bps.generation += 1;
        drop(bps);
        self.refresh_debug_all();
        Ok(Reply::Empty)
    }

    /// Marks every vCPU's guest debug dirty and kicks the running ones to reload it.
    pub(crate) fn refresh_debug_all(&self) {
        for (i, slot) in self.slots.iter().enumerate() {
            let waiting = {
                let mut s = slot.lock();
                s.debug_dirty = true;
                s.exchange.in_event()
            };
            if !waiting {
                self.kick(i);
            }
        }
    }

    fn control_msr(&self, vcpu: u16, enable: bool, msr: u32) -> CommandResult<'static> {
        if !super::msr::filterable(msr) {
            return Err(ErrorCode::Inval);
        }
        {
            let mut s = self.slots[usize::from(vcpu)].lock();
            if enable {
                s.msrs.insert(msr);
            } else {
                s.msrs.remove(&msr);
            }
        }
        let wanted: Vec<u32> = self
            .slots
            .iter()
            .flat_map(|s| s.lock().msrs.iter().copied().collect::<Vec<_>>())
            .collect();
        self.msr_filter.apply(&self.vm_fd, &wanted).map_err(|e| {
            tracing::warn!("MSR filter: {e}");
            ErrorCode::Inval
        })?;
        Ok(Reply::Empty)
    }

    fn pause_vcpu(&self, vcpu: u16) -> CommandResult<'static> {
        let i = usize::from(vcpu);
        let waiting = {
            let mut s = self.slots[i].lock();
            if s.life == Life::Ended {
                return Err(ErrorCode::Again);
            }
            if s.pause_pending {
                return Err(ErrorCode::Busy);
            }
            s.pause_pending = true;
            s.exchange.in_event()
        };
        self.slots[i].changed.notify_all();
        if !waiting {
            self.kick(i);
        }
        Ok(Reply::Empty)
    }

    fn queue_vcpu_command(&self, i: usize, seq: u32, command: VcpuCommand) -> Vec<u8> {
        let id = V4::command_id(command.kind());
        let slot = &self.slots[i];
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let waiting = {
            let mut s = slot.lock();
            if s.life == Life::Ended {
                return error_message(id, seq, ErrorCode::Again);
            }
            if !s.mailbox.accepts() {
                return error_message(id, seq, ErrorCode::Busy);
            }
            s.mailbox = Mailbox::Queued(QueuedCommand {
                ticket,
                seq,
                command,
            });
            s.exchange.in_event()
        };
        slot.changed.notify_all();
        if !waiting {
            self.kick(i);
        }
        let deadline = Instant::now() + VCPU_COMMAND_TIMEOUT;
        let mut s = slot.lock();
        loop {
            if let Some(reply) = s.mailbox.take_reply(ticket) {
                return reply;
            }
            let now = Instant::now();
            if now >= deadline || s.life == Life::Ended {
                s.mailbox.abandon(ticket);
                return error_message(id, seq, ErrorCode::Again);
            }
            s = slot.wait(s, deadline - now).0;
        }
    }
}
