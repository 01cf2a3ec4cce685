//! A KVMI client: the tool's side of the introspection socket.
//!
//! [`KvmiClient`] connects to a VM's socket (`kvmi run --kvmi-socket PATH`) or accepts the
//! VM's connection on a listening path (`kvmi run --kvmi-connect PATH`), then offers one typed
//! method per command. Both wire dialects are spoken: v4, and libkvmi / kvmi-v7
//! ([`KvmiClient::listen_libkvmi`] for `kvmi run --kvmi-dialect libkvmi --kvmi-connect PATH`),
//! where each command becomes its kvmi-v7 message(s); a command without a kvmi-v7 equivalent
//! fails with [`ClientError::Unsupported`]. A reader thread separates replies (matched by `seq`) from events
//! (queued): commands can be sent while events wait for their replies, from several threads.
//! Take events with [`KvmiClient::next_event`], answer them with [`KvmiClient::reply`].
//!
//! ```no_run
//! use kvmi_client::{KvmiClient, neutral_data};
//! use protocol::{Action, EventKind, EventPayload, event_reply::EventReplyData};
//! use std::time::Duration;
//!
//! let client = KvmiClient::connect("/tmp/vm.kvmi")?;
//! let info = client.get_guest_info()?;
//! client.control_events(0, [EventKind::Msr].into_iter().collect())?;
//! client.control_msr(0, 0x174, true)?; // writes to IA32_SYSENTER_CS raise MSR events
//! if let Some(ev) = client.next_event(Duration::from_secs(5))? {
//!     // An MSR reply must carry the value to write (`new_val`); the guest's own value lets
//!     // its write go ahead unchanged. `neutral_data(&ev)` is that data for any event, and
//!     // `reply_continue(&ev)` answers CONTINUE with it in one call.
//!     let data = match ev.event.payload {
//!         EventPayload::Msr { new_value, .. } => EventReplyData::Msr { new_val: new_value },
//!         _ => neutral_data(&ev),
//!     };
//!     client.reply(&ev, Action::Continue, data)?;
//! }
//! # let _ = info;
//! # Ok::<(), kvmi_client::ClientError>(())
//! ```

mod channel;
mod commands;
mod error;
pub mod json;
mod libkvmi;
mod names;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_libkvmi;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use protocol::event_reply::EventReplyData;
use protocol::{Action, Command, CommandKind, ErrorCode, EventKind, EventReply, V4, WireProfile};

pub use channel::{Dialect, RawReply, ReceivedEvent};
pub use commands::RegisterState;
pub use error::{ClientError, HandshakeError};
pub use libkvmi::{LibkvmiOptions, VmIdentity};
pub use names::{
    access_string, command_name, event_name, parse_access, parse_event_list, parse_event_name,
};

use channel::Channel;

/// How long a command waits for its reply by default.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to one VM's introspection channel.
pub struct KvmiClient {
    channel: Channel,
    reply_timeout: Duration,
    /// The libkvmi session (`None`: the v4 dialect).
    libkvmi: Option<libkvmi::Session>,
}

impl std::fmt::Debug for KvmiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmiClient")
            .field("dialect", &self.channel.dialect())
            .field("closed", &self.channel.closed())
            .finish()
    }
}

impl KvmiClient {
    /// Connects to a VM listening on `path` (`kvmi run --kvmi-socket PATH`).
    pub fn connect(path: impl AsRef<Path>) -> Result<KvmiClient, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(ClientError::io(format!("connecting to {}", path.display())))?;
        Self::from_stream(stream)
    }

    /// Connects to `path`, retrying until the VM listens there or `timeout` passes.
    pub fn connect_retry(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<KvmiClient, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(path.as_ref()) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Listens on `path` (replacing a stale socket file) and accepts one connection from a
    /// VM started with `kvmi run --kvmi-connect PATH`, waiting at most `timeout`.
    pub fn accept(path: impl AsRef<Path>, timeout: Duration) -> Result<KvmiClient, ClientError> {
        let listener = Self::listen(path)?;
        Self::accept_on(&listener, timeout)
    }

    /// Binds a listening socket at `path` (replacing a stale socket file), for
    /// [`KvmiClient::accept_on`] when the VM starts after the listener must exist.
    pub fn listen(path: impl AsRef<Path>) -> Result<UnixListener, ClientError> {
        let path = path.as_ref();
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(path);
        }
        UnixListener::bind(path)
            .map_err(ClientError::io(format!("listening on {}", path.display())))
    }

    /// Accepts one connection on `listener`, waiting at most `timeout`.
    pub fn accept_on(
        listener: &UnixListener,
        timeout: Duration,
    ) -> Result<KvmiClient, ClientError> {
        Self::from_stream(Self::accept_stream(listener, timeout)?)
    }

    /// Accepts one connection on `listener` (blocking mode), waiting at most `timeout`.
    fn accept_stream(
        listener: &UnixListener,
        timeout: Duration,
    ) -> Result<UnixStream, ClientError> {
        listener
            .set_nonblocking(true)
            .map_err(ClientError::io("listener non-blocking"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(ClientError::io("socket blocking"))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ClientError::io("waiting for the VM to connect")(
                            std::io::Error::from(std::io::ErrorKind::TimedOut),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(ClientError::io("accepting")(e)),
            }
        }
    }

    /// A v4 client over an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<KvmiClient, ClientError> {
        Ok(KvmiClient {
            channel: Channel::new(stream, Dialect::V4)?,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            libkvmi: None,
        })
    }

    /// Sets how long commands wait for their reply.
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    /// Sends `command` and waits for its reply; a KVM error code becomes
    /// [`ClientError::Kvm`]. Returns the raw reply for the typed methods to decode (v4). In
    /// the libkvmi dialect the command is carried out as its kvmi-v7 message(s) and the raw
    /// reply is empty: use the typed methods.
    pub fn call(&self, command: &Command<'_>) -> Result<RawReply, ClientError> {
        let kind = command.kind();
        if self.libkvmi.is_some() {
            self.lk_exec(command)?;
            return Ok(RawReply {
                command: kind,
                id: libkvmi::message_id(kind).unwrap_or_default(),
                payload: Vec::new(),
            });
        }
        let mut buf = vec![0u8; V4::command_len(command)?];
        let seq = self.channel.next_seq();
        let n = V4::encode_command(seq, command, &mut buf)?;
        let raw = self.exchange(kind, seq, &buf[..n])?;
        if raw.command != kind {
            return Err(ClientError::UnexpectedReply(kind));
        }
        match V4::decode_reply(kind, &raw.payload)? {
            Ok(_) => Ok(raw),
            Err(code) => Err(ClientError::Kvm {
                command: kind,
                code,
            }),
        }
    }

    fn exchange(&self, kind: CommandKind, seq: u32, msg: &[u8]) -> Result<RawReply, ClientError> {
        let id = u16::from_le_bytes([msg[0], msg[1]]);
        self.channel.expect_reply(seq, id, kind);
        self.channel.send(msg)?;
        self.channel.wait_reply(kind, seq, self.reply_timeout)
    }

    /// Sends a hand-made command message (`id`, `payload`, a fresh seq) and returns the
    /// reply's error code and data. For testing a host's handling of malformed input: the
    /// host may instead close the channel ([`ClientError::Closed`]).
    pub fn call_raw(&self, id: u16, payload: &[u8]) -> Result<(i32, Vec<u8>), ClientError> {
        let seq = self.channel.next_seq();
        let msg = raw_message(id, seq, payload)?;
        let kind = match self.dialect() {
            Dialect::V4 => V4::command_kind(id),
            Dialect::Libkvmi => CommandKind::ALL
                .into_iter()
                .find(|&k| libkvmi::message_id(k) == Some(id)),
        }
        .unwrap_or(CommandKind::GetVersion);
        let raw = self.exchange(kind, seq, &msg)?;
        let err = raw
            .payload
            .get(..4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(ClientError::UnexpectedReply(kind))?;
        Ok((err, raw.payload.get(8..).unwrap_or(&[]).to_vec()))
    }

    /// Writes arbitrary bytes to the socket (testing a host's handling of garbage).
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.channel.send(bytes)
    }

    /// The next event, waiting at most `timeout` (`Ok(None)`: none came).
    pub fn next_event(&self, timeout: Duration) -> Result<Option<ReceivedEvent>, ClientError> {
        self.channel.take_event(timeout, |_| true)
    }

    /// The next event of `kind` (other events stay queued), waiting at most `timeout`.
    pub fn next_event_of(
        &self,
        kind: EventKind,
        timeout: Duration,
    ) -> Result<Option<ReceivedEvent>, ClientError> {
        self.channel
            .take_event(timeout, |e| e.event.payload.kind() == kind)
    }

    /// The next event that `wanted` accepts (others stay queued).
    pub fn next_event_matching(
        &self,
        timeout: Duration,
        wanted: impl FnMut(&ReceivedEvent) -> bool,
    ) -> Result<Option<ReceivedEvent>, ClientError> {
        self.channel.take_event(timeout, wanted)
    }

    /// Events received and not taken yet.
    pub fn queued_events(&self) -> usize {
        self.channel.queued_events()
    }

    /// Answers `event` with `action` and the event's reply data (`EventReplyData::None` for
    /// events without any; MSR, CR and PF events need theirs).
    pub fn reply(
        &self,
        event: &ReceivedEvent,
        action: Action,
        data: EventReplyData<'_>,
    ) -> Result<(), ClientError> {
        if self.libkvmi.is_some() {
            let (vcpu, gva) = Self::lk_reply_target(event);
            let reply = EventReply {
                event: event.event.payload.kind(),
                action,
                data,
            };
            return self.lk_reply(vcpu, event.seq, &reply, gva);
        }
        self.reply_seq(event.seq, event.event.payload.kind(), action, data)
    }

    /// Answers `event` with `CONTINUE` and the neutral reply data: the MSR event's new
    /// value as written, an empty PF context.
    pub fn reply_continue(&self, event: &ReceivedEvent) -> Result<(), ClientError> {
        self.reply(event, Action::Continue, neutral_data(event))
    }

    /// Sends an event reply for any `seq` (also one never sent: testing the host). A
    /// kvmi-v7 reply names its vCPU: in the libkvmi dialect this one names vCPU 0 (use
    /// [`KvmiClient::reply`] for the event's own vCPU).
    pub fn reply_seq(
        &self,
        seq: u32,
        kind: EventKind,
        action: Action,
        data: EventReplyData<'_>,
    ) -> Result<(), ClientError> {
        let reply = EventReply {
            event: kind,
            action,
            data,
        };
        if self.libkvmi.is_some() {
            return self.lk_reply(0, seq, &reply, 0);
        }
        let mut buf = vec![0u8; V4::event_reply_len(&reply)?];
        let n = V4::encode_event_reply(seq, &reply, &mut buf)?;
        self.channel.send(&buf[..n])
    }

    /// Why the channel closed, if it did.
    pub fn closed(&self) -> Option<String> {
        self.channel.closed()
    }

    /// Waits until the host closes the channel (true) or `timeout` passes (false).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        self.channel.wait_closed(timeout)
    }

    /// Detaches: closes the socket (the host unhooks) and stops the reader thread.
    pub fn close(mut self) {
        self.channel.shutdown();
    }
}

/// The reply data that lets an event's operation go ahead unchanged.
pub fn neutral_data(event: &ReceivedEvent) -> EventReplyData<'static> {
    use protocol::EventPayload;
    match event.event.payload {
        EventPayload::Msr { new_value, .. } => EventReplyData::Msr { new_val: new_value },
        EventPayload::Cr { new_value, .. } => EventReplyData::Cr { new_val: new_value },
        EventPayload::PageFault { .. } => EventReplyData::PageFault(Default::default()),
        _ => EventReplyData::None,
    }
}

/// A message with header `{id, size, seq}` and `payload`.
fn raw_message(id: u16, seq: u32, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
    let size = u16::try_from(payload.len())
        .map_err(|_| ClientError::Invalid(format!("payload of {} bytes", payload.len())))?;
    let mut msg = Vec::with_capacity(8 + payload.len());
    msg.extend_from_slice(&id.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(&seq.to_le_bytes());
    msg.extend_from_slice(payload);
    Ok(msg)
}

/// Whether `result` is the host's error `code`.
pub fn is_kvm_error<T>(result: &Result<T, ClientError>, code: ErrorCode) -> bool {
    matches!(result, Err(e) if e.kvm_code() == Some(code))
}
