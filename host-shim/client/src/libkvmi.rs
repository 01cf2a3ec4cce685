//! The libkvmi (kvmi-v7) dialect of the client: the tool listens, the VM connects
//! (`kvmi run --kvmi-dialect libkvmi --kvmi-connect PATH`), sends its 96-byte handshake and
//! gets the tool's 24-byte answer; then each semantic [`Command`] becomes the kvmi-v7
//! message(s) that do the same, and replies and events are read back into the semantic
//! types, so every typed method of [`KvmiClient`] works in both dialects.
//!
//! Where kvmi-v7 differs:
//! - `CONTROL_EVENTS` takes one event ID per message: the client keeps each vCPU's enabled
//!   set and sends the difference. SINGLESTEP is also armed with `VCPU_CONTROL_SINGLESTEP`;
//!   PAUSE_VCPU and TRAP events are always on.
//! - `GET_GUEST_INFO` has no TSC: it comes from `GET_VCPU_INFO` of vCPU 0 (0 if refused).
//! - `GET_VERSION` has no permission masks: the client asks `CHECK_COMMAND`/`CHECK_EVENT`
//!   once at connect and reports the answers as [`VersionInfo::allowed`].
//! - `SET_PAGE_ACCESS` lists longer than one message are split.
//! - No equivalent: `CONTROL_BREAKPOINT` (kvmi-v7 cannot set breakpoints or debug
//!   registers), `GET_PAGE_ACCESS` and `CONTROL_VE` (no handler in kvmi-v7):
//!   [`ClientError::Unsupported`].
//! - An event reply names its vCPU: [`KvmiClient::reply`] takes it from the event.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::event::EventSet;
use protocol::frame::HEADER_SIZE;
use protocol::kvm::{KvmRegs, KvmSregs};
use protocol::masks::AllowedMasks;
use protocol::reply::{CpuidLeaf, GuestInfo, Registers, VersionInfo};
use protocol::types::{CpuMode, MapToken, MsrEntry, PageAccessEntry};
use protocol::wire::libkvmi::frame::{Request, encode_request};
use protocol::wire::libkvmi::tool::{self, SET_PAGE_ACCESS_MAX_ENTRIES, ToolError};
use protocol::wire::libkvmi::{MSG_SIZE, events, handshake, host, ids};
use protocol::{Command, CommandKind, ErrorCode, EventKind, EventReply, Reply};

use super::channel::{Channel, Dialect};
use super::error::{ClientError, HandshakeError};
use super::{DEFAULT_REPLY_TIMEOUT, KvmiClient, ReceivedEvent};

/// How the tool answers the VM's handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LibkvmiOptions {
    /// SHA-1 of the secret shared with the VM (`kvmi run --kvmi-secret FILE`); zeros when the
    /// VM authenticates no tool.
    pub cookie_hash: [u8; handshake::COOKIE_HASH_SIZE],
}

/// What the VM said about itself in the libkvmi handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmIdentity {
    /// The VM's UUID (raw bytes).
    pub uuid: [u8; 16],
    /// When the VM started (or last reset), seconds since the Unix epoch.
    pub start_time: i64,
    /// The VM's name (up to the first NUL, at most 63 bytes, lossily UTF-8).
    pub name: String,
}

/// The libkvmi state of a client.
#[derive(Debug)]
pub(crate) struct Session {
    identity: VmIdentity,
    /// Per vCPU: the events enabled through this client.
    enabled: Mutex<HashMap<u16, EventSet>>,
    /// What `CHECK_COMMAND` / `CHECK_EVENT` allowed at connect.
    allowed: AllowedMasks,
}

/// The kvmi-v7 message a command needs first (`None`: no equivalent).
pub(crate) const fn message_id(kind: CommandKind) -> Option<u16> {
    Some(match kind {
        CommandKind::GetVersion => ids::GET_VERSION,
        CommandKind::GetGuestInfo => ids::GET_GUEST_INFO,
        CommandKind::PauseVcpu => ids::PAUSE_VCPU,
        CommandKind::GetRegisters => ids::GET_REGISTERS,
        CommandKind::SetRegisters => ids::SET_REGISTERS,
        CommandKind::GetCpuid => ids::GET_CPUID,
        CommandKind::SetPageAccess => ids::SET_PAGE_ACCESS,
        CommandKind::InjectException => ids::INJECT_EXCEPTION,
        CommandKind::ReadPhysical => ids::READ_PHYSICAL,
        CommandKind::WritePhysical => ids::WRITE_PHYSICAL,
        CommandKind::ControlEvents => ids::CONTROL_EVENTS,
        CommandKind::ControlCr => ids::CONTROL_CR,
        CommandKind::ControlMsr => ids::CONTROL_MSR,
        CommandKind::GetMapToken => ids::GET_MAP_TOKEN,
        CommandKind::GetXsave => ids::GET_XSAVE,
        CommandKind::GetPageAccess | CommandKind::ControlVe | CommandKind::ControlBreakpoint => {
            return None;
        }
    })
}

/// Whether `CONTROL_EVENTS` takes this event (PAUSE_VCPU and TRAP are always on,
/// CREATE_VCPU is a VM event).
const fn per_vcpu(kind: EventKind) -> bool {
    events::is_vcpu_controllable(kind.number() as u16)
}

/// A reply's data, owned, before it is lent out as a [`Reply`].
#[expect(
    clippy::large_enum_variant,
    reason = "one per command, on the stack only while the reply is lent out"
)]
pub(crate) enum Owned {
    Empty,
    Version(VersionInfo),
    GuestInfo(GuestInfo),
    Registers {
        mode: CpuMode,
        regs: KvmRegs,
        sregs: KvmSregs,
        msrs: Vec<MsrEntry>,
    },
    Cpuid(CpuidLeaf),
    Physical(Vec<u8>),
    Xsave(Vec<u8>),
    MapToken(MapToken),
}

impl Owned {
    pub(crate) fn reply(&self) -> Reply<'_> {
        match self {
            Self::Empty => Reply::Empty,
            Self::Version(v) => Reply::Version(*v),
            Self::GuestInfo(g) => Reply::GuestInfo(*g),
            Self::Registers {
                mode,
                regs,
                sregs,
                msrs,
            } => Reply::Registers(Registers {
                mode: *mode,
                regs: *regs,
                sregs: *sregs,
                msrs: protocol::list::List::from_slice(msrs),
            }),
            Self::Cpuid(c) => Reply::Cpuid(*c),
            Self::Physical(d) => Reply::Physical(d),
            Self::Xsave(d) => Reply::Xsave(d),
            Self::MapToken(t) => Reply::MapToken(*t),
        }
    }
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = data.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

/// libkvmi's reading of a fixed reply struct: short data is zero-filled.
fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// Reads the VM's `qemu2introspector` from `stream` as libkvmi does: `struct_size` in
/// 32..=65536, the first 96 bytes kept (zero-filled), the rest discarded.
fn read_vmm_hello(stream: &mut UnixStream) -> Result<VmIdentity, ClientError> {
    let read = |stream: &mut UnixStream, buf: &mut [u8]| -> Result<(), ClientError> {
        stream.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ClientError::Handshake(HandshakeError::Closed)
            } else {
                ClientError::io("reading the VM's handshake")(e)
            }
        })
    };
    let mut size = [0u8; 4];
    read(stream, &mut size)?;
    let size = u32::from_le_bytes(size);
    let n = size as usize;
    if !(handshake::VMM_MIN_SIZE..=handshake::VMM_MAX_SIZE).contains(&n) {
        return Err(HandshakeError::StructSize(size).into());
    }
    let mut hello = [0u8; handshake::VMM_SIZE];
    let kept = n.min(handshake::VMM_SIZE);
    read(stream, &mut hello[4..kept])?;
    let mut rest = vec![0u8; n - kept];
    read(stream, &mut rest)?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&hello[4..20]);
    let start_time = i64::from_le_bytes(hello[24..32].try_into().unwrap_or_default());
    // libkvmi forces the name's last byte to 0.
    let name = &hello[32..32 + handshake::NAME_SIZE - 1];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(VmIdentity {
        uuid,
        start_time,
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
    })
}

/// The tool's `introspector2qemu`: `struct_size` 24 and the cookie hash.
pub(crate) fn tool_hello(options: &LibkvmiOptions) -> [u8; handshake::TOOL_SIZE] {
    let mut out = [0u8; handshake::TOOL_SIZE];
    out[..4].copy_from_slice(&(handshake::TOOL_SIZE as u32).to_le_bytes());
    out[4..].copy_from_slice(&options.cookie_hash);
    out
}

impl KvmiClient {
    /// Listens on `path` (replacing a stale socket file) for a VM started with
    /// `kvmi run --kvmi-dialect libkvmi --kvmi-connect PATH`, waits at most `timeout` for it
    /// to connect and complete the libkvmi handshake, and speaks kvmi-v7 from then on.
    pub fn listen_libkvmi(
        path: impl AsRef<Path>,
        timeout: Duration,
        options: &LibkvmiOptions,
    ) -> Result<KvmiClient, ClientError> {
        let listener = Self::listen(path)?;
        Self::accept_libkvmi_on(&listener, timeout, options)
    }

    /// Accepts a libkvmi VM on `listener` (see [`KvmiClient::listen_libkvmi`]). A connection
    /// whose handshake fails is closed and the next one awaited, as libkvmi does (the VM
    /// reconnects); the last failure is returned when `timeout` passes.
    pub fn accept_libkvmi_on(
        listener: &UnixListener,
        timeout: Duration,
        options: &LibkvmiOptions,
    ) -> Result<KvmiClient, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut failed: Option<ClientError> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let stream = match Self::accept_stream(listener, left) {
                Ok(s) => s,
                Err(e) => return Err(failed.unwrap_or(e)),
            };
            match Self::libkvmi_handshake(stream, deadline, options) {
                Ok(client) => return Ok(client),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!("libkvmi handshake failed, awaiting the next connection: {e}");
                    failed = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn libkvmi_handshake(
        mut stream: UnixStream,
        deadline: Instant,
        options: &LibkvmiOptions,
    ) -> Result<KvmiClient, ClientError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        stream
            .set_read_timeout(Some(left))
            .map_err(ClientError::io("socket timeout"))?;
        let identity = read_vmm_hello(&mut stream)?;
        stream
            .write_all(&tool_hello(options))
            .map_err(ClientError::io("answering the VM's handshake"))?;
        stream
            .set_read_timeout(None)
            .map_err(ClientError::io("socket timeout"))?;
        tracing::info!(
            name = identity.name,
            start_time = identity.start_time,
            "libkvmi handshake done"
        );
        let mut client = KvmiClient {
            channel: Channel::new(stream, Dialect::Libkvmi)?,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            libkvmi: Some(Session {
                identity,
                enabled: Mutex::new(HashMap::new()),
                allowed: AllowedMasks::all(),
            }),
        };
        // libkvmi's first message; an error here means the VM refused the tool.
        let version = client.lk_version()?;
        if version < 1 {
            return Err(HandshakeError::Version(version).into());
        }
        let allowed = client.lk_probe()?;
        if let Some(s) = &mut client.libkvmi {
            s.allowed = allowed;
        }
        Ok(client)
    }

    /// What the VM said about itself in the libkvmi handshake (`None` in the v4 dialect).
    pub fn vm_identity(&self) -> Option<&VmIdentity> {
        self.libkvmi.as_ref().map(|s| &s.identity)
    }

    /// The channel's wire dialect.
    pub fn dialect(&self) -> Dialect {
        self.channel.dialect()
    }

    /// Whether `kind` can be sent in this channel's dialect (v4: every command; libkvmi: the
    /// commands with a kvmi-v7 equivalent). Whether the VM allows it is
    /// [`VersionInfo::allowed`].
    pub fn supports(&self, kind: CommandKind) -> bool {
        self.libkvmi.is_none() || message_id(kind).is_some()
    }

    /// `VCPU_TRANSLATE_GVA` (libkvmi only): the guest-physical address `gva` maps to in
    /// `vcpu`'s current page tables (`None`: not mapped).
    pub fn translate_gva(&self, vcpu: u16, gva: u64) -> Result<Option<u64>, ClientError> {
        if self.libkvmi.is_none() {
            return Err(ClientError::Unsupported {
                command: CommandKind::ReadPhysical,
                dialect: Dialect::V4.name(),
            });
        }
        let data = self.lk_fixed(
            CommandKind::ReadPhysical,
            &Request::TranslateGva { vcpu, gva },
        )?;
        let gpa = u64_at(&data, 0);
        Ok((gpa != u64::MAX).then_some(gpa))
    }

    /// Sends one kvmi-v7 message built by `build` (given the seq and a buffer) for a
    /// `command`, and returns the reply's data; an error code becomes [`ClientError::Kvm`].
    fn lk_send(
        &self,
        command: CommandKind,
        build: impl FnOnce(u32, &mut [u8]) -> Result<usize, ClientError>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut buf = vec![0u8; HEADER_SIZE + MSG_SIZE];
        let seq = self.channel.next_seq();
        let n = build(seq, &mut buf)?;
        let id = u16::from_le_bytes([buf[0], buf[1]]);
        self.channel.expect_reply(seq, id, command);
        self.channel.send(&buf[..n])?;
        let raw = self.channel.wait_reply(command, seq, self.reply_timeout)?;
        let reply = host::decode_reply(&raw.payload).map_err(ToolError::from)?;
        match reply.err {
            0 => Ok(reply.data.to_vec()),
            err => Err(match ErrorCode::from_wire(err) {
                Some(code) => ClientError::Kvm { command, code },
                None => ClientError::UnknownCode { command, err },
            }),
        }
    }

    /// [`Self::lk_send`] of a fixed-layout request.
    fn lk_fixed(&self, command: CommandKind, req: &Request<'_>) -> Result<Vec<u8>, ClientError> {
        self.lk_send(command, |seq, buf| Ok(encode_request(seq, req, buf)?))
    }

    fn lk_version(&self) -> Result<u32, ClientError> {
        let data = self.lk_fixed(CommandKind::GetVersion, &Request::GetVersion)?;
        Ok(u32_at(&data, 0))
    }

    /// The commands and events the VM allows, by `CHECK_COMMAND` / `CHECK_EVENT`.
    fn lk_probe(&self) -> Result<AllowedMasks, ClientError> {
        let allowed = |r: Result<Vec<u8>, ClientError>| match r {
            Ok(_) => Ok(true),
            Err(ClientError::Kvm { .. } | ClientError::UnknownCode { .. }) => Ok(false),
            Err(e) => Err(e),
        };
        let mut commands = Vec::new();
        for kind in CommandKind::ALL {
            if let Some(id) = message_id(kind)
                && allowed(self.lk_fixed(kind, &Request::CheckCommand(id)))?
            {
                commands.push(kind);
            }
        }
        let mut events = Vec::new();
        for kind in EventKind::ALL {
            let check = self.lk_fixed(
                CommandKind::ControlEvents,
                &Request::CheckEvent(kind.number().into()),
            );
            if allowed(check)? {
                events.push(kind);
            }
        }
        Ok(AllowedMasks::from_kinds(commands, events))
    }

    /// Runs `command` as kvmi-v7 message(s) and returns its reply data.
    pub(crate) fn lk_exec(&self, command: &Command<'_>) -> Result<Owned, ClientError> {
        let kind = command.kind();
        let unsupported = || ClientError::Unsupported {
            command: kind,
            dialect: Dialect::Libkvmi.name(),
        };
        let empty = |r: Result<Vec<u8>, ClientError>| r.map(|_| Owned::Empty);
        match *command {
            Command::GetVersion => {
                let version = self.lk_version()?;
                let allowed = self
                    .libkvmi
                    .as_ref()
                    .map_or(AllowedMasks::all(), |s| s.allowed);
                Ok(Owned::Version(VersionInfo { version, allowed }))
            }
            Command::GetGuestInfo => {
                let data = self.lk_fixed(kind, &Request::GetGuestInfo)?;
                let count = u32_at(&data, 0);
                let vcpu_count = u16::try_from(count).map_err(|_| ToolError::Value {
                    field: "vcpu_count",
                    value: count.into(),
                })?;
                let tsc_speed = self
                    .lk_fixed(kind, &Request::GetVcpuInfo { vcpu: 0 })
                    .map_or(0, |d| u64_at(&d, 0));
                Ok(Owned::GuestInfo(GuestInfo {
                    vcpu_count,
                    tsc_speed,
                }))
            }
            Command::PauseVcpu { vcpu } => {
                empty(self.lk_fixed(kind, &Request::PauseVcpu { vcpu, wait: true }))
            }
            Command::GetRegisters { vcpu, msrs } => {
                let msrs: Vec<u32> = msrs.iter().collect();
                let data = self.lk_send(kind, |seq, buf| {
                    Ok(tool::encode_get_registers(seq, vcpu, &msrs, buf)?)
                })?;
                let r = tool::decode_registers(&data, msrs.len())?;
                Ok(Owned::Registers {
                    mode: r.mode,
                    regs: r.regs,
                    sregs: r.sregs,
                    msrs: r
                        .msrs
                        .iter()
                        .map(|e| MsrEntry {
                            index: e.index.get(),
                            data: e.data.get(),
                        })
                        .collect(),
                })
            }
            Command::SetRegisters { vcpu, regs } => {
                empty(self.lk_fixed(kind, &Request::SetRegisters { vcpu, regs }))
            }
            Command::GetCpuid {
                vcpu,
                function,
                index,
            } => {
                let d = self.lk_fixed(
                    kind,
                    &Request::GetCpuid {
                        vcpu,
                        function,
                        index,
                    },
                )?;
                Ok(Owned::Cpuid(CpuidLeaf {
                    eax: u32_at(&d, 0),
                    ebx: u32_at(&d, 4),
                    ecx: u32_at(&d, 8),
                    edx: u32_at(&d, 12),
                }))
            }
            Command::GetXsave { vcpu } => self
                .lk_fixed(kind, &Request::GetXsave { vcpu })
                .map(Owned::Xsave),
            Command::ReadPhysical { gpa, size } => {
                let data = self.lk_fixed(kind, &Request::ReadPhysical { gpa, size })?;
                if data.len() as u64 != size {
                    return Err(ClientError::UnexpectedReply(kind));
                }
                Ok(Owned::Physical(data))
            }
            Command::WritePhysical { gpa, data } => {
                empty(self.lk_fixed(kind, &Request::WritePhysical { gpa, data }))
            }
            Command::InjectException {
                vcpu,
                vector,
                error_code,
                address,
            } => empty(self.lk_fixed(
                kind,
                &Request::InjectException {
                    vcpu,
                    nr: vector,
                    error_code: error_code.map_or(0, u32::from),
                    address,
                },
            )),
            Command::SetPageAccess { view, entries, .. } => {
                let entries: Vec<PageAccessEntry> = entries.iter().collect();
                for part in entries.chunks(SET_PAGE_ACCESS_MAX_ENTRIES) {
                    self.lk_send(kind, |seq, buf| {
                        Ok(tool::encode_set_page_access(seq, view, part, buf)?)
                    })?;
                }
                Ok(Owned::Empty)
            }
            Command::ControlEvents { vcpu, events } => {
                self.lk_control_events(vcpu, events)?;
                Ok(Owned::Empty)
            }
            Command::ControlCr { vcpu, enable, cr } => {
                empty(self.lk_fixed(kind, &Request::ControlCr { vcpu, cr, enable }))
            }
            Command::ControlMsr { vcpu, enable, msr } => {
                empty(self.lk_fixed(kind, &Request::ControlMsr { vcpu, msr, enable }))
            }
            Command::GetMapToken => {
                let d = self.lk_fixed(kind, &Request::GetMapToken)?;
                let mut token = [0u8; 32];
                for (i, b) in token.iter_mut().enumerate() {
                    *b = d.get(i).copied().unwrap_or(0);
                }
                Ok(Owned::MapToken(MapToken(token)))
            }
            Command::GetPageAccess { .. }
            | Command::ControlVe { .. }
            | Command::ControlBreakpoint { .. } => Err(unsupported()),
        }
    }

    /// Makes `vcpu`'s enabled events `wanted`: `CONTROL_EVENTS` for each event that changes
    /// (disables first), `VCPU_CONTROL_SINGLESTEP` with the SINGLESTEP event. PAUSE_VCPU and
    /// TRAP are always on in kvmi-v7 and CREATE_VCPU is a VM event: they are not sent.
    fn lk_control_events(&self, vcpu: u16, wanted: EventSet) -> Result<(), ClientError> {
        let Some(session) = &self.libkvmi else {
            return Ok(());
        };
        let lock = || session.enabled.lock().unwrap_or_else(|p| p.into_inner());
        let have = lock().get(&vcpu).copied().unwrap_or(EventSet::EMPTY);
        let kind = CommandKind::ControlEvents;
        let changes = EventKind::ALL
            .into_iter()
            .filter(|&k| per_vcpu(k) && have.contains(k) != wanted.contains(k));
        let (off, on): (Vec<EventKind>, Vec<EventKind>) = changes.partition(|&k| have.contains(k));
        let control = |event: EventKind, enable: bool| {
            self.lk_fixed(
                kind,
                &Request::ControlEvents {
                    vcpu,
                    event: event.number(),
                    enable,
                },
            )
        };
        let step = |enable: bool| self.lk_fixed(kind, &Request::ControlSinglestep { vcpu, enable });
        let record = |event: EventKind, enable: bool| {
            let mut map = lock();
            let set = map.entry(vcpu).or_insert(EventSet::EMPTY);
            *set = if enable {
                set.with(event)
            } else {
                set.without(event)
            };
        };
        for event in off {
            if event == EventKind::Singlestep {
                step(false)?;
            }
            control(event, false)?;
            record(event, false);
        }
        for event in on {
            control(event, true)?;
            record(event, true);
            if event == EventKind::Singlestep {
                step(true)?;
            }
        }
        Ok(())
    }

    /// Sends the kvmi-v7 reply to the event `seq` raised on `vcpu`.
    pub(crate) fn lk_reply(
        &self,
        vcpu: u16,
        seq: u32,
        reply: &EventReply<'_>,
        pf_gva: u64,
    ) -> Result<(), ClientError> {
        let mut buf = vec![0u8; HEADER_SIZE + 16 + 272];
        let n = tool::encode_event_reply(seq, vcpu, reply, pf_gva, &mut buf)?;
        self.channel.send(&buf[..n])
    }

    /// The vCPU and PF address of a received event, for its kvmi-v7 reply.
    pub(crate) fn lk_reply_target(event: &ReceivedEvent) -> (u16, u64) {
        let gva = match event.event.payload {
            protocol::EventPayload::PageFault { gva, .. } => gva,
            _ => 0,
        };
        (event.event.common.vcpu, gva)
    }
}
