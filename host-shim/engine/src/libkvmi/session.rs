//! One libkvmi tool's session over the engine: the reader that turns kvmi-v7 messages into
//! engine commands and event replies, and the [`Channel`] that turns the engine's events into
//! kvmi-v7 events.
//!
//! The engine speaks in v4 messages (its canonical encoding): a command runs through
//! [`Introspector::run_command`] and its v4 reply is decoded once and re-encoded here; an
//! event reaches [`Channel::send_event`] as the engine's event and leaves as a kvmi-v7 one. Everything
//! kvmi-v7 adds is kept here: per-vCPU event enables that the v4 set cannot express (events
//! this host accepts but never raises, single-step armed separately from its event), the VM
//! events (UNHOOK, CREATE_VCPU), the reply switch of CONTROL_CMD_RESPONSE, and the event each
//! vCPU awaits an answer to.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use protocol::V4;
use protocol::command::{Command, CommandKind};
use protocol::event::{Event, EventKind, EventPayload, EventSet};
use protocol::event_reply::{Action, EventReply, EventReplyData};
use protocol::frame::{HEADER_SIZE, Header};
use protocol::list::List;
use protocol::types::{Access, PageAccessEntry};
use protocol::wire::WireProfile;
use protocol::wire::libkvmi::event_layout::PF_CTX_MAX;
use protocol::wire::libkvmi::frame::{
    Disposition, FrameError, Request, check_event_reply, decode_request, split_tool_frame,
};
use protocol::wire::libkvmi::layout::ViewWire;
use protocol::wire::libkvmi::{MAX_MSG_SIZE, access, errors, events, ids};
use zerocopy::IntoBytes;
use zerocopy::little_endian::U16;

use super::support;
use super::translate::{self, Outstanding};
use crate::engine::Introspector;
use crate::lock_order;
use crate::transport::{Channel, ChannelError, Route};
use vmm::sync::RankedMutex;

/// MTRR memory types GET_MTRR_TYPE reports: RAM is write-back (the VMM sets no MTRRs, and
/// KVM treats guest RAM as WB), anything else uncacheable.
const MTRR_WRITE_BACK: u8 = 6;
const MTRR_UNCACHEABLE: u8 = 0;

/// Vectors that push an error code (#DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX).
const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// What the session remembers between messages.
#[derive(Debug)]
struct State {
    /// Per vCPU: the libkvmi event IDs the tool enabled (bit = ID).
    enabled: Vec<u16>,
    /// Per vCPU: VCPU_CONTROL_SINGLESTEP is on.
    stepping: Vec<bool>,
    /// Per vCPU: the engine has this session's event set (else it raises nothing for it,
    /// TRAP included).
    synced: Vec<bool>,
    /// The VM events the tool enabled (bit = ID: UNHOOK, CREATE_VCPU).
    vm_events: u16,
    /// Per vCPU: the event it waits for an answer to.
    outstanding: Vec<Option<Outstanding>>,
    /// Commands are answered (CONTROL_CMD_RESPONSE).
    replies_on: bool,
}

const fn bit(id: u8) -> u16 {
    1 << id
}

/// A libkvmi tool's channel: the engine's events go out as kvmi-v7 events through the
/// socket writer; command replies are written by the reader, never through `send`.
pub(crate) struct LibkvmiChannel {
    writer: Arc<dyn Channel>,
    introspector: Weak<Introspector>,
    generation: AtomicU64,
    state: RankedMutex<State>,
}

impl LibkvmiChannel {
    pub(crate) fn new(writer: Arc<dyn Channel>, introspector: &Arc<Introspector>) -> Self {
        let n = introspector.vcpu_count();
        LibkvmiChannel {
            writer,
            introspector: Arc::downgrade(introspector),
            generation: AtomicU64::new(0),
            state: RankedMutex::new(
                lock_order::LIBKVMI_SESSION,
                State {
                    enabled: vec![0; n],
                    stepping: vec![false; n],
                    synced: vec![false; n],
                    vm_events: 0,
                    outstanding: vec![None; n],
                    replies_on: true,
                },
            ),
        }
    }

    pub(crate) fn set_generation(&self, generation: u64) {
        self.generation.store(generation, Ordering::SeqCst);
    }

    /// Whether the tool enabled the UNHOOK event.
    pub(crate) fn wants_unhook(&self) -> bool {
        self.state.lock().vm_events & bit(events::UNHOOK) != 0
    }

    /// Sends the UNHOOK event (vCPU 0, no reply expected).
    pub(crate) fn send_unhook(&self, seq: u32) -> std::io::Result<()> {
        self.writer
            .send(&translate::encode_unhook(seq), Route::CommandReply)
    }

    fn write(&self, message: &[u8]) -> Result<(), String> {
        self.writer
            .send(message, Route::CommandReply)
            .map_err(|e| format!("write to the tool: {e}"))
    }

    /// Whether the tool wants event `id` from vCPU `vcpu` now.
    fn wanted(state: &State, vcpu: usize, kind: EventKind) -> bool {
        let id = translate::event_id(kind);
        match kind {
            // Always on: they answer the tool's own PAUSE_VCPU / INJECT_EXCEPTION.
            EventKind::PauseVcpu | EventKind::Trap => true,
            EventKind::CreateVcpu => state.vm_events & bit(id) != 0,
            EventKind::Singlestep => {
                state.enabled.get(vcpu).is_some_and(|e| e & bit(id) != 0)
                    && state.stepping.get(vcpu).copied().unwrap_or(false)
            }
            _ => state.enabled.get(vcpu).is_some_and(|e| e & bit(id) != 0),
        }
    }

    /// The v4 event set the engine should raise for `vcpu`: what the tool enabled that this
    /// host can deliver, SINGLESTEP only while stepping is on, and TRAP.
    fn engine_set(state: &State, vcpu: usize, masks: protocol::masks::AllowedMasks) -> EventSet {
        let mut set = EventSet::EMPTY;
        for kind in EventKind::ALL {
            let id = translate::event_id(kind);
            let on = match kind {
                EventKind::Singlestep => state.enabled[vcpu] & bit(id) != 0 && state.stepping[vcpu],
                // Always on in kvmi-v7: it answers the tool's own INJECT_EXCEPTION.
                EventKind::Trap => true,
                EventKind::PauseVcpu | EventKind::CreateVcpu => false,
                _ => state.enabled[vcpu] & bit(id) != 0,
            };
            if on && masks.allows_event(kind) {
                set = set.with(kind);
            }
        }
        set
    }
}

impl Channel for LibkvmiChannel {
    fn send(&self, _message: &[u8], route: Route) -> std::io::Result<()> {
        // Events come through `send_event`; command replies are written by the reader after
        // translation. Nothing else is sent to a tool.
        tracing::error!("libkvmi session: an untranslated {route:?} message was dropped");
        Ok(())
    }

    fn send_event(
        &self,
        seq: u32,
        event: &Event,
        _message: &[u8],
        vcpu: u32,
    ) -> std::io::Result<()> {
        let kind = event.kind();
        let i = vcpu as usize;
        let wanted = {
            let mut s = self.state.lock();
            let wanted = Self::wanted(&s, i, kind);
            if wanted && let Some(slot) = s.outstanding.get_mut(i) {
                let gva = match event.payload {
                    EventPayload::PageFault { gva, .. } => gva,
                    _ => 0,
                };
                *slot = Some(Outstanding {
                    seq,
                    id: translate::event_id(kind),
                    gva,
                });
            }
            wanted
        };
        if wanted {
            return self
                .writer
                .send(&translate::encode_event(seq, event), Route::Event { vcpu });
        }
        // Never send an event the tool did not enable (LibVMI drops it unanswered and the
        // vCPU would hang): answer it CONTINUE here, with the value being written for CR and
        // MSR events.
        tracing::debug!(
            vcpu,
            ?kind,
            "event not enabled by the libkvmi tool; continuing"
        );
        let Some(introspector) = self.introspector.upgrade() else {
            return Ok(());
        };
        let new_val = match event.payload {
            EventPayload::Cr { new_value, .. } | EventPayload::Msr { new_value, .. } => new_value,
            _ => 0,
        };
        let generation = match self.generation.load(Ordering::SeqCst) {
            // An event raised between the attach and `set_generation`.
            0 => introspector.current_generation(),
            g => g,
        };
        introspector
            .answer_event(generation, seq, |k| {
                Ok(EventReply {
                    event: k,
                    action: Action::Continue,
                    data: match k {
                        EventKind::PageFault => EventReplyData::PageFault(Default::default()),
                        EventKind::Cr => EventReplyData::Cr { new_val },
                        EventKind::Msr => EventReplyData::Msr { new_val },
                        _ => EventReplyData::None,
                    },
                })
            })
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e.to_string()))
    }

    fn close(&self) {
        self.writer.close();
    }
}

/// Serves one attached libkvmi tool: `pending` holds the bytes it sent after its handshake
/// answer. Returns why the session ended.
pub(crate) fn read_messages(
    introspector: &Arc<Introspector>,
    channel: &LibkvmiChannel,
    generation: u64,
    mut stream: UnixStream,
    pending: Vec<u8>,
) -> String {
    let session = Session {
        introspector,
        channel,
        generation,
    };
    let mut buf = pending;
    buf.reserve(MAX_MSG_SIZE);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut first = true;
    loop {
        if !first || buf.is_empty() {
            let n = match stream.read(&mut chunk) {
                Ok(0) => return "tool closed the socket".into(),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return format!("socket read: {e}"),
            };
            buf.extend_from_slice(&chunk[..n]);
        }
        first = false;
        let mut consumed = 0;
        while consumed < buf.len() {
            let rest = &buf[consumed..];
            match split_tool_frame(rest) {
                Ok(Some((frame, tail))) => {
                    let len = rest.len() - tail.len();
                    let (id, seq) = (frame.id, frame.seq);
                    let result = match decode_request(frame) {
                        Ok(request) => session.handle(id, seq, request),
                        Err(e) => session.rejected(id, seq, &e),
                    };
                    if let Err(reason) = result {
                        return reason;
                    }
                    consumed += len;
                }
                Ok(None) => break,
                Err(e) => {
                    // Framing refused before the payload was decoded: the header is whole
                    // (an error needs it), so answer under its ID and seq, or close.
                    let Ok(header) = Header::parse(rest) else {
                        return format!("protocol error: {e}");
                    };
                    if rest.len() < header.message_len() {
                        if matches!(e.disposition(), Disposition::Close) {
                            return format!("protocol error: {e}");
                        }
                        break;
                    }
                    if let Err(reason) = session.rejected(header.id, header.seq, &e) {
                        return reason;
                    }
                    consumed += header.message_len();
                }
            }
        }
        buf.drain(..consumed);
    }
}

struct Session<'a> {
    introspector: &'a Arc<Introspector>,
    channel: &'a LibkvmiChannel,
    generation: u64,
}

impl Session<'_> {
    /// Whether command `id`'s reply is sent, by the CONTROL_CMD_RESPONSE switch.
    fn replies_on(&self) -> bool {
        self.channel.state.lock().replies_on
    }

    /// A message refused by the decoder: answered in-band with its error, or the session
    /// ends (`Err`: why).
    fn rejected(&self, id: u16, seq: u32, e: &FrameError) -> Result<(), String> {
        self.introspector.heard_from(self.generation);
        match e.disposition() {
            Disposition::Close => Err(format!("protocol error: {e}")),
            Disposition::Reply(code) => {
                tracing::debug!(id, seq, "libkvmi message refused: {e}");
                self.answer(id, seq, &translate::error_reply(id, seq, -code))
            }
        }
    }

    /// Sends the reply to command `id` unless replies are off; while they are off, a reply
    /// that carries data, or says the command is unknown or not allowed, ends the session
    /// (as KVM does).
    fn answer(&self, id: u16, seq: u32, reply: &[u8]) -> Result<(), String> {
        if self.replies_on() {
            return self.channel.write(reply);
        }
        let err = reply_error(reply);
        if err == -errors::ENOSYS || err == -errors::EPERM {
            return Err(format!(
                "command {id} (seq {seq}) is not allowed or unknown while replies are off"
            ));
        }
        if reply.len() > HEADER_SIZE + 8 {
            return Err(format!(
                "command {id} (seq {seq}) returns data while replies are off"
            ));
        }
        Ok(())
    }

    fn handle(&self, id: u16, seq: u32, request: Request<'_>) -> Result<(), String> {
        match request {
            Request::EventReply {
                vcpu,
                action,
                event,
                data,
            } => self.event_reply(vcpu, seq, action, event, data),
            Request::ControlCmdResponse { enable, now, flags } => {
                self.introspector.heard_from(self.generation);
                if flags & 1 != 0 {
                    return Err(
                        "CONTROL_CMD_RESPONSE asks for CMD_ERROR events, which this \
                                host does not send"
                            .into(),
                    );
                }
                let silent = {
                    let mut s = self.channel.state.lock();
                    let before = s.replies_on;
                    s.replies_on = enable;
                    if now { !enable } else { !before }
                };
                if silent {
                    Ok(())
                } else {
                    self.channel.write(&translate::data_reply(id, seq, &[]))
                }
            }
            request => {
                self.introspector.heard_from(self.generation);
                if !self.replies_on() && replies_with_data(id) {
                    return Err(format!(
                        "command {id} (seq {seq}) returns data while replies are off"
                    ));
                }
                let reply = self.command(id, seq, request)?;
                self.answer(id, seq, &reply)
            }
        }
    }

    /// Runs `command` in the engine and translates its reply to message `id`.
    fn engine(&self, id: u16, seq: u32, command: &Command<'_>) -> Result<Vec<u8>, String> {
        let v4 = match self.introspector.run_command(self.generation, seq, command) {
            Ok(v4) => v4,
            Err(ChannelError::Detached) => return Err("detached".into()),
            Err(e) => return Err(e.to_string()),
        };
        Ok(translate_v4_reply(id, seq, command.kind(), &v4))
    }

    fn vcpu_ok(&self, vcpu: u16) -> bool {
        usize::from(vcpu) < self.introspector.vcpu_count()
    }

    fn command(&self, id: u16, seq: u32, request: Request<'_>) -> Result<Vec<u8>, String> {
        let i = self.introspector;
        let err = |code: i32| Ok(translate::error_reply(id, seq, code));
        if let Err(code) = support::command_permission(id, i.masks(), i.operator_masks()) {
            return err(code);
        }
        match request {
            Request::GetVersion => Ok(translate::version_reply(seq)),
            Request::CheckCommand(c) => {
                match support::check_command(c, i.masks(), i.operator_masks()) {
                    Ok(()) => Ok(translate::data_reply(id, seq, &[])),
                    Err(code) => err(code),
                }
            }
            Request::CheckEvent(e) => match support::check_event(e, i.masks()) {
                Ok(()) => Ok(translate::data_reply(id, seq, &[])),
                Err(code) => err(code),
            },
            Request::GetGuestInfo => self.engine(id, seq, &Command::GetGuestInfo),
            Request::GetVcpuInfo { vcpu } => {
                if !self.vcpu_ok(vcpu) {
                    return err(errors::EINVAL);
                }
                self.engine(id, seq, &Command::GetGuestInfo)
            }
            // The kick is asynchronous; `wait` needs no more here, since the tool only
            // learns the vCPU is out of the guest from its PAUSE_VCPU event.
            Request::PauseVcpu { vcpu, wait: _ } => {
                self.engine(id, seq, &Command::PauseVcpu { vcpu })
            }
            Request::ControlVmEvents { event, enable } => {
                if event == events::CREATE_VCPU
                    && !i.operator_masks().allows_event(EventKind::CreateVcpu)
                {
                    return err(errors::EPERM);
                }
                let mut s = self.channel.state.lock();
                if enable {
                    s.vm_events |= bit(event);
                } else {
                    s.vm_events &= !bit(event);
                }
                Ok(translate::data_reply(id, seq, &[]))
            }
            Request::ControlEvents {
                vcpu,
                event,
                enable,
            } => {
                if !self.vcpu_ok(vcpu) {
                    return err(errors::EINVAL);
                }
                if let Some(kind) = translate::event_kind(event)
                    && !i.operator_masks().allows_event(kind)
                {
                    return err(errors::EPERM);
                }
                self.update_events(id, seq, vcpu, |s| {
                    let v = usize::from(vcpu);
                    if enable {
                        s.enabled[v] |= bit(event);
                    } else {
                        s.enabled[v] &= !bit(event);
                    }
                })
            }
            Request::ControlSinglestep { vcpu, enable } => {
                if !self.vcpu_ok(vcpu) {
                    return err(errors::EINVAL);
                }
                if enable && !i.masks().allows_event(EventKind::Singlestep) {
                    return err(errors::EOPNOTSUPP);
                }
                self.update_events(id, seq, vcpu, |s| s.stepping[usize::from(vcpu)] = enable)
            }
            // Accepted, never raised: stock KVM handles CR writes without a userspace exit.
            Request::ControlCr { vcpu, .. } => {
                if !self.vcpu_ok(vcpu) {
                    return err(errors::EINVAL);
                }
                Ok(translate::data_reply(id, seq, &[]))
            }
            Request::ControlMsr { vcpu, msr, enable } => {
                self.engine(id, seq, &Command::ControlMsr { vcpu, enable, msr })
            }
            Request::GetRegisters { vcpu, msrs } => {
                let msrs: Vec<u32> = msrs.iter().map(|m| m.get()).collect();
                self.engine(
                    id,
                    seq,
                    &Command::GetRegisters {
                        vcpu,
                        msrs: List::from_slice(&msrs),
                    },
                )
            }
            Request::SetRegisters { vcpu, regs } => {
                self.engine(id, seq, &Command::SetRegisters { vcpu, regs })
            }
            Request::GetCpuid {
                vcpu,
                function,
                index,
            } => self.engine(
                id,
                seq,
                &Command::GetCpuid {
                    vcpu,
                    function,
                    index,
                },
            ),
            Request::GetXsave { vcpu } => self.engine(id, seq, &Command::GetXsave { vcpu }),
            Request::ReadPhysical { gpa, size } => {
                if !i.ram_contains(gpa, size) {
                    return err(errors::ENOENT);
                }
                self.engine(id, seq, &Command::ReadPhysical { gpa, size })
            }
            Request::WritePhysical { gpa, data } => {
                if !i.ram_contains(gpa, data.len() as u64) {
                    return err(errors::ENOENT);
                }
                self.engine(id, seq, &Command::WritePhysical { gpa, data })
            }
            Request::InjectException {
                vcpu,
                nr,
                error_code,
                address,
            } => {
                // TRAP is always on: make sure the engine raises it for this vCPU.
                if self.vcpu_ok(vcpu) && !self.channel.state.lock().synced[usize::from(vcpu)] {
                    self.update_events(id, seq, vcpu, |_| {})?;
                }
                let error_code = if has_error_code(nr) {
                    match u16::try_from(error_code) {
                        Ok(c) => Some(c),
                        Err(_) => return err(errors::EINVAL),
                    }
                } else {
                    None
                };
                self.engine(
                    id,
                    seq,
                    &Command::InjectException {
                        vcpu,
                        vector: nr,
                        error_code,
                        address,
                    },
                )
            }
            Request::SetPageAccess { view, entries } => {
                // SVE (suppress #VE) means nothing without #VE: ignored.
                let rights = access::R | access::W | access::X;
                let entries: Vec<PageAccessEntry> = entries
                    .iter()
                    .map(|e| PageAccessEntry {
                        gpa: e.gpa.get(),
                        access: Access::from_bits(e.access & rights).unwrap_or(Access::RWX),
                    })
                    .collect();
                self.engine(
                    id,
                    seq,
                    &Command::SetPageAccess {
                        vcpu: 0,
                        view,
                        entries: List::from_slice(&entries),
                    },
                )
            }
            Request::GetMtrrType { vcpu, gpa } => {
                if !self.vcpu_ok(vcpu) {
                    return err(errors::EINVAL);
                }
                let ty = if i.ram_contains(gpa, 1) {
                    MTRR_WRITE_BACK
                } else {
                    MTRR_UNCACHEABLE
                };
                Ok(translate::data_reply(id, seq, &[ty, 0, 0, 0, 0, 0, 0, 0]))
            }
            Request::GetMaxGfn => Ok(translate::u64_reply(id, seq, i.ram_size() >> 12)),
            Request::TranslateGva { vcpu, gva } => self.translate_gva(id, seq, vcpu, gva),
            Request::Other {
                id: ids::GET_EPT_VIEW,
                vcpu: Some(vcpu),
                body,
            } => {
                if !body.is_empty() {
                    return err(errors::EINVAL);
                }
                if !self.vcpu_ok(vcpu) {
                    return err(errors::EINVAL);
                }
                let view = ViewWire {
                    view: U16::new(0),
                    padding: [U16::new(0); 3],
                };
                Ok(translate::data_reply(id, seq, view.as_bytes()))
            }
            // Everything else is refused by `command_permission` above; a decoded request
            // without a handler here is ENOSYS too.
            _ => err(errors::ENOSYS),
        }
    }

    /// Applies `change` to the session's enables of `vcpu` and gives the engine the v4 set
    /// that results; on the engine's refusal the change is undone.
    fn update_events(
        &self,
        id: u16,
        seq: u32,
        vcpu: u16,
        change: impl FnOnce(&mut State),
    ) -> Result<Vec<u8>, String> {
        let v = usize::from(vcpu);
        let masks = self.introspector.masks();
        let (before, set) = {
            let mut s = self.channel.state.lock();
            let before = (s.enabled[v], s.stepping[v]);
            change(&mut s);
            (before, LibkvmiChannel::engine_set(&s, v, masks))
        };
        let command = Command::ControlEvents { vcpu, events: set };
        let reply = self.engine(id, seq, &command)?;
        let mut s = self.channel.state.lock();
        if reply_error(&reply) == 0 {
            s.synced[v] = true;
        } else {
            (s.enabled[v], s.stepping[v]) = before;
        }
        Ok(reply)
    }

    /// VCPU_TRANSLATE_GVA: the vCPU's CR0/CR3 (GET_REGISTERS on its thread), then a walk of
    /// its 4-level page tables; `!0` when the address has no translation.
    fn translate_gva(&self, id: u16, seq: u32, vcpu: u16, gva: u64) -> Result<Vec<u8>, String> {
        let command = Command::GetRegisters {
            vcpu,
            msrs: List::from_slice(&[]),
        };
        let v4 = match self
            .introspector
            .run_command(self.generation, seq, &command)
        {
            Ok(v4) => v4,
            Err(ChannelError::Detached) => return Err("detached".into()),
            Err(e) => return Err(e.to_string()),
        };
        let Ok(frame) = V4::parse_frame(&v4) else {
            return Ok(translate::error_reply(id, seq, errors::EINVAL));
        };
        Ok(
            match V4::decode_reply(CommandKind::GetRegisters, frame.payload) {
                Ok(Ok(protocol::reply::Reply::Registers(r))) => {
                    let gpa = self
                        .introspector
                        .translate(r.sregs.cr0.get(), r.sregs.cr3.get(), gva)
                        .unwrap_or(u64::MAX);
                    translate::u64_reply(id, seq, gpa)
                }
                Ok(Err(code)) => translate::error_reply(id, seq, code.value()),
                _ => translate::error_reply(id, seq, errors::EINVAL),
            },
        )
    }

    fn event_reply(
        &self,
        vcpu: u16,
        seq: u32,
        action: u8,
        event: u8,
        data: &[u8],
    ) -> Result<(), String> {
        let v = usize::from(vcpu);
        if v >= self.introspector.vcpu_count() {
            return Err(format!("event reply for vCPU {vcpu}, which does not exist"));
        }
        let pending = self.channel.state.lock().outstanding[v];
        let Some(pending) = pending else {
            tracing::debug!(vcpu, seq, "event reply with no event pending: dropped");
            return Ok(());
        };
        if pending.seq != seq {
            return Err(format!(
                "reply to event seq {seq} on vCPU {vcpu}, which awaits seq {}",
                pending.seq
            ));
        }
        if event != pending.id {
            tracing::debug!(
                vcpu,
                seq,
                event,
                pending = pending.id,
                "event ID echo differs"
            );
        }
        check_event_reply(pending.id, action, data).map_err(|e| e.to_string())?;
        let Some(kind) = translate::event_kind(pending.id) else {
            return Err(format!("event {} takes no reply", pending.id));
        };
        let mut ctx = [0u8; PF_CTX_MAX];
        let answered = self.introspector.answer_event(self.generation, seq, |k| {
            if k == kind {
                Ok(translate::event_reply(
                    &pending, kind, action, data, &mut ctx,
                ))
            } else {
                Err(format!(
                    "event {seq} is {k:?}, the session expected {kind:?}"
                ))
            }
        });
        {
            let mut s = self.channel.state.lock();
            if s.outstanding[v].is_some_and(|p| p.seq == seq) {
                s.outstanding[v] = None;
            }
        }
        match answered {
            Ok(()) => Ok(()),
            Err(ChannelError::Detached) => Err("detached".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Whether command `id`'s successful reply carries data (such a command is refused while
/// replies are off).
const fn replies_with_data(id: u16) -> bool {
    matches!(
        id,
        ids::GET_VERSION
            | ids::GET_GUEST_INFO
            | ids::GET_VCPU_INFO
            | ids::GET_REGISTERS
            | ids::GET_CPUID
            | ids::GET_XSAVE
            | ids::READ_PHYSICAL
            | ids::GET_MAP_TOKEN
            | ids::GET_MTRR_TYPE
            | ids::GET_MAX_GFN
            | ids::GET_NEXT_AVAILABLE_GFN
            | ids::GET_EPT_VIEW
            | ids::VCPU_TRANSLATE_GVA
            | ids::VCPU_GET_XCR
            | ids::QUERY_PHYSICAL
            | ids::CREATE_EPT_VIEW
    )
}

/// The `err` of an encoded libkvmi reply.
fn reply_error(reply: &[u8]) -> i32 {
    reply
        .get(HEADER_SIZE..HEADER_SIZE + 4)
        .map_or(0, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The libkvmi reply to message `id` for the engine's v4 reply to a command of `kind`.
fn translate_v4_reply(id: u16, seq: u32, kind: CommandKind, v4: &[u8]) -> Vec<u8> {
    let result = V4::parse_frame(v4)
        .map_err(|e| e.to_string())
        .and_then(|frame| V4::decode_reply(kind, frame.payload).map_err(|e| e.to_string()));
    match result {
        Ok(result) => translate::command_reply(id, seq, &result),
        Err(e) => {
            tracing::error!("undecodable engine reply to {kind:?}: {e}");
            translate::error_reply(id, seq, errors::EINVAL)
        }
    }
}
