//! The client's half of a KVMI socket: one writer (every message in a single `write`), one
//! reader thread that separates command replies (matched by `seq`) from events (queued), in
//! either wire dialect ([`Dialect`]).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::frame::HEADER_SIZE;
use protocol::wire::libkvmi::tool::{self, HostEvent};
use protocol::wire::libkvmi::{self as lk, ids};
use protocol::{CommandKind, Event, HostMessage, V4, WireProfile};

use super::error::ClientError;

/// An event received from the host, waiting for the tool's reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceivedEvent {
    /// The event's sequence number (the reply must carry it).
    pub seq: u32,
    /// The decoded event.
    pub event: Event,
    /// When the reader thread received it.
    pub received: Instant,
}

/// The wire dialect of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// The v4 dialect (`kvmi run --kvmi-dialect v4`, the default).
    V4,
    /// The libkvmi / kvmi-v7 dialect (`kvmi run --kvmi-dialect libkvmi`).
    Libkvmi,
}

impl Dialect {
    /// The dialect's name, as `kvmi run --kvmi-dialect` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::Libkvmi => "libkvmi",
        }
    }

    /// Largest message the host sends, header included.
    const fn max_host_message(self) -> usize {
        match self {
            Self::V4 => V4::MAX_MSG_SIZE,
            // Replies are bounded only by the header's u16 size; events by 8184 bytes.
            Self::Libkvmi => HEADER_SIZE + lk::host::MAX_REPLY_PAYLOAD,
        }
    }
}

/// A reply as received: the command it answers and its raw payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawReply {
    /// The command kind the reply answers: named by the message ID (v4), or the command
    /// the kvmi-v7 message was sent for (libkvmi).
    pub command: CommandKind,
    /// The reply's message ID, as on the wire.
    pub id: u16,
    /// The payload (error code first).
    pub payload: Vec<u8>,
}

/// A command sent and not answered yet.
struct Waiter {
    /// The caller gave up waiting: a late reply is dropped.
    abandoned: bool,
    /// The message ID the reply must carry (checked in the libkvmi dialect).
    id: u16,
    /// The command it was sent for.
    command: CommandKind,
}

#[derive(Default)]
struct State {
    /// Replies that arrived, by seq, for seqs someone waits for.
    replies: HashMap<u32, RawReply>,
    /// Seqs of commands sent and not answered yet.
    waiting: HashMap<u32, Waiter>,
    events: VecDeque<ReceivedEvent>,
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self, reason: String) {
        let mut st = self.lock();
        if st.closed.is_none() {
            tracing::debug!("KVMI channel closed: {reason}");
            st.closed = Some(reason);
        }
        drop(st);
        self.changed.notify_all();
    }
}

/// A connected socket with its reader thread.
pub(crate) struct Channel {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_seq: AtomicU32,
    reader: Option<JoinHandle<()>>,
    dialect: Dialect,
}

impl Channel {
    /// Starts the reader thread on `stream`, reading messages of `dialect`.
    pub(crate) fn new(stream: UnixStream, dialect: Dialect) -> Result<Channel, ClientError> {
        let read_half = stream
            .try_clone()
            .map_err(ClientError::io("cloning the socket"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let for_reader = shared.clone();
        let reader = std::thread::Builder::new()
            .name("kvmi-client-reader".into())
            .spawn(move || read_loop(read_half, &for_reader, dialect))
            .map_err(ClientError::io("spawning the reader thread"))?;
        Ok(Channel {
            writer: Mutex::new(stream),
            shared,
            next_seq: AtomicU32::new(1),
            reader: Some(reader),
            dialect,
        })
    }

    /// The channel's wire dialect.
    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// A fresh sequence number (never 0).
    pub(crate) fn next_seq(&self) -> u32 {
        loop {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            if seq != 0 {
                return seq;
            }
        }
    }

    /// Writes one whole message with a single write under the writer lock.
    pub(crate) fn send(&self, message: &[u8]) -> Result<(), ClientError> {
        if let Some(reason) = self.closed() {
            return Err(ClientError::Closed(reason));
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(message).map_err(|e| {
            self.shared.close(format!("write failed: {e}"));
            ClientError::io("writing a message")(e)
        })
    }

    /// Registers `seq` as awaiting a reply with message ID `id` to `command` (before
    /// sending, so no reply can be missed).
    pub(crate) fn expect_reply(&self, seq: u32, id: u16, command: CommandKind) {
        self.shared.lock().waiting.insert(
            seq,
            Waiter {
                abandoned: false,
                id,
                command,
            },
        );
    }

    /// Waits for the reply with `seq`.
    pub(crate) fn wait_reply(
        &self,
        command: CommandKind,
        seq: u32,
        timeout: Duration,
    ) -> Result<RawReply, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(reply) = st.replies.remove(&seq) {
                return Ok(reply);
            }
            if let Some(reason) = st.closed.clone() {
                st.waiting.remove(&seq);
                return Err(ClientError::Closed(reason));
            }
            let now = Instant::now();
            if now >= deadline {
                if let Some(w) = st.waiting.get_mut(&seq) {
                    w.abandoned = true;
                }
                return Err(ClientError::Timeout {
                    command,
                    seq,
                    millis: timeout.as_millis(),
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Removes and returns the first queued event that `wanted` accepts, waiting up to
    /// `timeout`; `Ok(None)` on timeout, `Err(Closed)` once the channel is closed and no
    /// accepted event is queued.
    pub(crate) fn take_event(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&ReceivedEvent) -> bool,
    ) -> Result<Option<ReceivedEvent>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(i) = st.events.iter().position(&mut wanted) {
                return Ok(st.events.remove(i));
            }
            if let Some(reason) = &st.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Number of queued (unanswered, not yet taken) events.
    pub(crate) fn queued_events(&self) -> usize {
        self.shared.lock().events.len()
    }

    /// The reason the channel closed, if it did.
    pub(crate) fn closed(&self) -> Option<String> {
        self.shared.lock().closed.clone()
    }

    /// Waits until the channel is closed (true) or `timeout` passes (false).
    pub(crate) fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.closed.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Shuts the socket down (the host sees the tool detach) and stops the reader.
    pub(crate) fn shutdown(&mut self) {
        {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = w.shutdown(Shutdown::Both);
        }
        self.shared.close("closed by the client".into());
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reads messages until EOF or an error; a message that does not decode closes the channel
/// (as the protocol requires of either peer).
fn read_loop(mut stream: UnixStream, shared: &Shared, dialect: Dialect) {
    let max = dialect.max_host_message();
    let mut buf: Vec<u8> = Vec::with_capacity(max * 2);
    let mut chunk = vec![0u8; max];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return shared.close("the host closed the socket".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return shared.close(format!("read failed: {e}")),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        loop {
            match protocol::frame::split_frame(&buf[used..], max) {
                Ok(None) => break,
                Ok(Some((frame, rest))) => {
                    let consumed = buf.len() - used - rest.len();
                    let handled = match dialect {
                        Dialect::V4 => dispatch(shared, frame),
                        Dialect::Libkvmi => dispatch_libkvmi(shared, frame),
                    };
                    if let Err(reason) = handled {
                        let _ = stream.shutdown(Shutdown::Both);
                        return shared.close(reason);
                    }
                    used += consumed;
                }
                Err(e) => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return shared.close(format!("bad frame from the host: {e}"));
                }
            }
        }
        buf.drain(..used);
    }
}

fn dispatch(shared: &Shared, frame: protocol::frame::Frame<'_>) -> Result<(), String> {
    let message = V4::decode_host_message(frame).map_err(|e| format!("bad message: {e}"))?;
    let mut st = shared.lock();
    match message {
        HostMessage::Event { seq, event } => st.events.push_back(ReceivedEvent {
            seq,
            event,
            received: Instant::now(),
        }),
        HostMessage::Reply {
            seq,
            command,
            payload,
        } => {
            match st.waiting.remove(&seq) {
                None => return Err(format!("reply with unknown seq {seq} ({command:?})")),
                Some(w) if w.abandoned => return Ok(()), // the caller timed out
                Some(_) => {}
            }
            st.replies.insert(
                seq,
                RawReply {
                    command,
                    id: V4::command_id(command),
                    payload: payload.to_vec(),
                },
            );
        }
    }
    drop(st);
    shared.changed.notify_all();
    Ok(())
}

/// A kvmi-v7 message from the VMM: an event (queued) or the reply to a command, which must
/// carry the ID of the command sent with its seq (libkvmi's rule: anything else is "wrong
/// message" and the stream is out of step).
fn dispatch_libkvmi(shared: &Shared, frame: protocol::frame::Frame<'_>) -> Result<(), String> {
    let (id, seq) = (frame.header.id, frame.header.seq);
    let mut st = shared.lock();
    match id {
        ids::EVENT => match tool::decode_event(frame.payload) {
            Ok(HostEvent::Event(event)) => st.events.push_back(ReceivedEvent {
                seq,
                event,
                received: Instant::now(),
            }),
            Ok(HostEvent::Unhook) => return Err("the VM unhooks (UNHOOK event)".into()),
            Err(e) => return Err(format!("bad event: {e}")),
        },
        ids::EVENT_REPLY => return Err("the VM sent an event reply".into()),
        _ => {
            let Some(waiter) = st.waiting.remove(&seq) else {
                return Err(format!("reply with unknown seq {seq} (message {id})"));
            };
            if waiter.id != id {
                return Err(format!(
                    "reply with seq {seq} is message {id}, the command sent was {}",
                    waiter.id
                ));
            }
            if waiter.abandoned {
                return Ok(());
            }
            st.replies.insert(
                seq,
                RawReply {
                    command: waiter.command,
                    id,
                    payload: frame.payload.to_vec(),
                },
            );
        }
    }
    drop(st);
    shared.changed.notify_all();
    Ok(())
}
