//! A libkvmi stand-in for the tests: the TOOL side of the libkvmi (`kvmi-v7`) dialect, which
//! behaves on the wire as libkvmi 1.1 does, so the shim's `--kvmi-dialect libkvmi` can be
//! tested without the real library (which no package registry ships).
//!
//! What it reproduces (docs/protocol.md, "The libkvmi dialect"):
//!
//! - **Roles.** The tool listens ([`Listener::bind`]: a stale path is unlinked, the socket is
//!   bound, made world-accessible and listened on); the VMM connects.
//! - **Handshake** ([`Listener::accept`], [`Session::handshake`]): read the VMM's
//!   `struct_size` (it must be ≥ 32 and ≤ 65 536), read `min(struct_size, 96) − 4` more bytes,
//!   force the last byte of the name to NUL, discard the rest; answer the 24-byte
//!   `{struct_size = 24, cookie_hash}` (zeros unless a hash is given); send `GET_VERSION` and
//!   require `version ≥ 1`.
//! - **Sequence numbers.** One counter starting at 1, +1 per message built (the wrappers of a
//!   batch included). libkvmi's is process-wide; here every [`Listener`] (one tool) owns one
//!   ([`SeqCounter`]), so tests running in parallel in one process do not share it.
//! - **Requests** ([`Session::request`]): one message, then wait at most 15 s for the reply
//!   with that ID and `seq`; an `EVENT` arriving first is queued (at most 16 384), any other
//!   message is an error ([`PeerError::WrongMessage`]). Reply data: `min(received, expected)`
//!   bytes, zero-filled when short, except `GET_REGISTERS`, whose data must be exactly
//!   `472 + 16·nmsrs` bytes.
//! - **Batches** ([`Session::batch`], [`Batch::commit`], [`Session::pause_all_vcpus`]): one
//!   write holding `CONTROL_CMD_RESPONSE{enable 0, now 1}` (its `seq` taken when the batch was
//!   created), the queued messages, and `CONTROL_CMD_RESPONSE{enable 1, now}`; `now = 1` and
//!   the suffix's reply awaited, unless the batch holds an event reply (then `now = 0` and no
//!   wait); a batch of a single event reply is sent bare.
//! - **Events** ([`Session::wait_event`], [`Session::reply_event`]): queued events first;
//!   replies are `vh` + `{action, event, pad}` + data, padded to the sizes libkvmi tools send
//!   (CR/MSR 24 bytes of payload, PF 288, every other event 16).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use protocol::frame::{HEADER_SIZE, Header};
use protocol::kvm::{KvmMsrEntry, KvmRegs, KvmSregs};
use protocol::wire::libkvmi::event_layout::{
    BreakpointEvent, CrEvent, EventCommon, EventMsrs, MsrEvent, PfEvent, SinglestepEvent,
};
use protocol::wire::libkvmi::frame::{Request, encode_request};
use protocol::wire::libkvmi::host::{decode_event, decode_reply};
use protocol::wire::libkvmi::layout::{
    GetCpuidReply, GetGuestInfoReply, GetRegistersReply, GetVersionReply, IntrospectorToQemu,
    PageAccessEntry, QemuToIntrospector, get_registers_reply_size,
};
use protocol::wire::libkvmi::{KVMI_VERSION, MAX_MSG_SIZE, MSG_SIZE, events, handshake, ids};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// How long libkvmi waits for any one read or write (`KVMI_MAX_TIMEOUT`).
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// How many events libkvmi queues per domain while it waits for replies.
pub const MAX_QUEUED_EVENTS: usize = 16_384;

/// The seven MSRs LibVMI's KVM driver asks `GET_REGISTERS` for: SYSENTER_CS/ESP/EIP, EFER,
/// STAR, LSTAR, CSTAR.
pub const LIBVMI_MSRS: [u32; 7] = [
    0x174,
    0x175,
    0x176,
    0xc000_0080,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
];

/// Why a peer operation failed. [`PeerError::kvm`] gives the VMM's error code when it
/// answered one.
#[derive(Debug)]
pub enum PeerError {
    /// The VMM answered with this (negative) `kvmi_error_code.err`, e.g. −1000 (`ENOSYS`).
    Kvm(i32),
    /// A read or write did not complete in time (libkvmi: `ETIMEDOUT`).
    Timeout,
    /// The VMM closed the connection.
    Closed,
    /// Another socket error.
    Io(io::Error),
    /// The VMM's handshake `struct_size` is outside 32..=65536 (libkvmi: `ENODATA` /
    /// `E2BIG`).
    HandshakeSize(u32),
    /// `GET_VERSION` answered a version below 1.
    Version(u32),
    /// A message other than the awaited reply or an event (libkvmi: `ENOMSG`, "Wrong
    /// message").
    WrongMessage {
        /// ID received.
        id: u16,
        /// `seq` received.
        seq: u32,
        /// ID awaited.
        want_id: u16,
        /// `seq` awaited.
        want_seq: u32,
    },
    /// A `GET_REGISTERS` reply whose data is not exactly `472 + 16·nmsrs` bytes (libkvmi:
    /// `E2BIG`).
    ReplySize {
        /// Bytes required.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A reply or event that cannot be parsed (libkvmi: `EINVAL`).
    Malformed(String),
    /// More than [`MAX_QUEUED_EVENTS`] events queued.
    QueueFull,
}

impl PeerError {
    /// The VMM's error code (negative `KVM_E*`), when it answered with one.
    pub fn kvm(&self) -> Option<i32> {
        match self {
            Self::Kvm(e) => Some(*e),
            _ => None,
        }
    }

    /// Whether the connection was closed by the VMM (EOF or reset).
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kvm(e) => write!(f, "the VMM answered error {e}"),
            Self::Timeout => write!(f, "timed out"),
            Self::Closed => write!(f, "the VMM closed the connection"),
            Self::Io(e) => write!(f, "socket error: {e}"),
            Self::HandshakeSize(s) => write!(f, "handshake struct_size {s} outside 32..=65536"),
            Self::Version(v) => write!(f, "invalid protocol version {v}"),
            Self::WrongMessage {
                id,
                seq,
                want_id,
                want_seq,
            } => write!(
                f,
                "wrong message: id {id} seq {seq} while waiting for id {want_id} seq {want_seq}"
            ),
            Self::ReplySize { expected, got } => {
                write!(f, "reply of {got} data bytes, expected exactly {expected}")
            }
            Self::Malformed(what) => write!(f, "malformed message: {what}"),
            Self::QueueFull => write!(f, "more than {MAX_QUEUED_EVENTS} events queued"),
        }
    }
}

impl std::error::Error for PeerError {}

impl From<io::Error> for PeerError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout,
            io::ErrorKind::UnexpectedEof => Self::Closed,
            _ => Self::Io(e),
        }
    }
}

/// Result of a peer operation.
pub type PeerResult<T> = Result<T, PeerError>;

/// The tool's message sequence counter: starts at 1, +1 per message built. Clones share it.
#[derive(Clone, Debug)]
pub struct SeqCounter(Arc<AtomicU32>);

impl SeqCounter {
    /// A counter whose first value is 1.
    pub fn new() -> Self {
        Self(Arc::new(AtomicU32::new(1)))
    }

    /// Takes the next sequence number.
    pub fn next(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }

    /// The number the next message will get (without taking it).
    pub fn peek(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for SeqCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// A listening tool socket, as `kvmi_init_unix_socket` sets it up.
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
    seq: SeqCounter,
}

impl Listener {
    /// Unlinks a stale `path`, binds a unix stream socket there, listens, and makes the path
    /// world-accessible (libkvmi `chmod`s it 0777).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let inner = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
        inner.set_nonblocking(true)?;
        Ok(Listener {
            inner,
            path: path.to_path_buf(),
            seq: SeqCounter::new(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence counter every session of this listener takes its numbers from.
    pub fn seq(&self) -> &SeqCounter {
        &self.seq
    }

    /// Accepts one connection within `timeout`, without any handshake (for tests that
    /// misbehave during it).
    pub fn accept_raw(&self, timeout: Duration) -> PeerResult<UnixStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.inner.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(PeerError::Timeout);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Accepts one connection within `timeout` and runs libkvmi's connection setup on it
    /// (handshake with a zero cookie hash, then `GET_VERSION`).
    pub fn accept(&self, timeout: Duration) -> PeerResult<Session> {
        self.accept_with(timeout, None)
    }

    /// As [`Listener::accept`], answering the handshake with `cookie_hash` (the SHA-1 of the
    /// shared secret) when given, zeros otherwise.
    pub fn accept_with(
        &self,
        timeout: Duration,
        cookie_hash: Option<[u8; handshake::COOKIE_HASH_SIZE]>,
    ) -> PeerResult<Session> {
        let stream = self.accept_raw(timeout)?;
        Session::handshake(stream, self.seq.clone(), cookie_hash)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the VMM said about itself in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmInfo {
    /// The `struct_size` the VMM sent (96 from kvmi-v7, 104 from kvmi-v12).
    pub struct_size: u32,
    /// The VM UUID (raw bytes, all zero when the VM has none).
    pub uuid: [u8; 16],
    /// Seconds since the Unix epoch when the VM started.
    pub start_time: i64,
    /// The VM name as libkvmi keeps it: 64 bytes, the last forced to NUL.
    pub name_raw: [u8; handshake::NAME_SIZE],
}

impl VmmInfo {
    /// The name up to its first NUL (lossy UTF-8), as `kvmi_domain_name` returns it.
    pub fn name(&self) -> String {
        let end = self
            .name_raw
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name_raw.len());
        String::from_utf8_lossy(&self.name_raw[..end]).into_owned()
    }

    /// The UUID in canonical 8-4-4-4-12 lower-case text.
    pub fn uuid_text(&self) -> String {
        let h: Vec<String> = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            h[0..4].concat(),
            h[4..6].concat(),
            h[6..8].concat(),
            h[8..10].concat(),
            h[10..16].concat()
        )
    }
}

/// A `GET_REGISTERS` answer.
#[derive(Clone, Debug)]
pub struct Registers {
    /// CPU mode: 2, 4 or 8.
    pub mode: u32,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: KvmRegs,
    /// Segment and control registers.
    pub sregs: KvmSregs,
    /// The MSRs, in request order.
    pub msrs: Vec<KvmMsrEntry>,
}

impl Registers {
    /// The value of MSR `index`, if it was asked for.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs
            .iter()
            .find(|e| e.index.get() == index)
            .map(|e| e.data.get())
    }
}

/// An event as a libkvmi tool receives it.
#[derive(Clone, Debug)]
pub struct Event {
    /// The event message's `seq` (the reply must carry it).
    pub seq: u32,
    /// The common part (544 bytes; zero-filled when the VMM sent fewer).
    pub common: EventCommon,
    /// The event-specific data (from offset `common.size` of the payload).
    pub data: Vec<u8>,
}

impl Event {
    /// The vCPU.
    pub fn vcpu(&self) -> u16 {
        self.common.vcpu.get()
    }

    /// The event ID ([`protocol::wire::libkvmi::events`]).
    pub fn id(&self) -> u8 {
        self.common.event
    }

    /// The CPU mode (2, 4 or 8).
    pub fn mode(&self) -> u8 {
        self.common.mode
    }

    /// General-purpose registers at the event.
    pub fn regs(&self) -> &KvmRegs {
        &self.common.regs
    }

    /// Segment and control registers at the event.
    pub fn sregs(&self) -> &KvmSregs {
        &self.common.sregs
    }

    /// The nine MSRs of the common part.
    pub fn msrs(&self) -> &EventMsrs {
        &self.common.msrs
    }

    fn data_as<T: FromBytes>(&self, id: u8) -> Option<T> {
        if self.id() != id {
            return None;
        }
        T::read_from_prefix(&self.data).ok().map(|(t, _)| t)
    }

    /// The BREAKPOINT data, for a BREAKPOINT event.
    pub fn breakpoint(&self) -> Option<BreakpointEvent> {
        self.data_as(events::BREAKPOINT)
    }

    /// The PF data, for a PF event.
    pub fn pf(&self) -> Option<PfEvent> {
        self.data_as(events::PF)
    }

    /// The CR data, for a CR event.
    pub fn cr(&self) -> Option<CrEvent> {
        self.data_as(events::CR)
    }

    /// The MSR data, for an MSR event.
    pub fn msr(&self) -> Option<MsrEvent> {
        self.data_as(events::MSR)
    }

    /// The SINGLESTEP data, for a SINGLESTEP event.
    pub fn singlestep(&self) -> Option<SinglestepEvent> {
        self.data_as(events::SINGLESTEP)
    }
}

/// The reply data size libkvmi tools send for an event (after `vh` and the 8-byte
/// `kvmi_event_reply`): CR/MSR 8, PF 272, anything else 0.
pub const fn reply_data_size(event: u8) -> usize {
    match event {
        events::CR | events::MSR => 8,
        events::PF => 272,
        _ => 0,
    }
}

/// One received message.
struct Msg {
    id: u16,
    seq: u32,
    payload: Vec<u8>,
}

/// One connection to a VMM, after the handshake and `GET_VERSION`.
pub struct Session {
    stream: UnixStream,
    seq: SeqCounter,
    vmm: VmmInfo,
    version: GetVersionReply,
    queue: VecDeque<Msg>,
}

fn encode(seq: u32, req: &Request<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MSG_SIZE];
    let n = encode_request(seq, req, &mut buf)
        .unwrap_or_else(|e| panic!("encode request {req:?}: {e}"));
    buf.truncate(n);
    buf
}

fn cmd_response(seq: u32, enable: bool, now: bool) -> Vec<u8> {
    encode(
        seq,
        &Request::ControlCmdResponse {
            enable,
            now,
            flags: 0,
        },
    )
}

fn event_reply_msg(event: &Event, action: u8, data: &[u8]) -> Vec<u8> {
    let want = reply_data_size(event.id());
    let mut d = data.to_vec();
    if d.len() < want {
        d.resize(want, 0);
    }
    encode(
        event.seq,
        &Request::EventReply {
            vcpu: event.vcpu(),
            action,
            event: event.id(),
            data: &d,
        },
    )
}

fn id_of(msg: &[u8]) -> u16 {
    u16::from_le_bytes([msg[0], msg[1]])
}

#[cfg(test)]
fn seq_of(msg: &[u8]) -> u32 {
    u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]])
}

impl Session {
    /// Runs libkvmi's connection setup on a connected stream: read the VMM's handshake
    /// struct, answer it (`cookie_hash` or zeros), then `GET_VERSION` (version ≥ 1).
    /// Sequence numbers come from `seq`.
    pub fn handshake(
        stream: UnixStream,
        seq: SeqCounter,
        cookie_hash: Option<[u8; handshake::COOKIE_HASH_SIZE]>,
    ) -> PeerResult<Session> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut s = Session {
            stream,
            seq,
            vmm: VmmInfo {
                struct_size: 0,
                uuid: [0; 16],
                start_time: 0,
                name_raw: [0; handshake::NAME_SIZE],
            },
            version: GetVersionReply::new_zeroed(),
            queue: VecDeque::new(),
        };
        s.vmm = s.read_vmm_struct()?;
        let answer = IntrospectorToQemu {
            struct_size: U32::new(handshake::TOOL_SIZE as u32),
            cookie_hash: cookie_hash.unwrap_or([0; handshake::COOKIE_HASH_SIZE]),
        };
        s.stream.write_all(answer.as_bytes())?;
        let data = s.request(&Request::GetVersion, size_of::<GetVersionReply>())?;
        let version = GetVersionReply::read_from_bytes(&data)
            .map_err(|_| PeerError::Malformed("GET_VERSION reply".into()))?;
        if version.version.get() < KVMI_VERSION {
            return Err(PeerError::Version(version.version.get()));
        }
        s.version = version;
        Ok(s)
    }

    fn read_vmm_struct(&mut self) -> PeerResult<VmmInfo> {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size)?;
        let size = u32::from_le_bytes(size);
        if (size as usize) < handshake::VMM_MIN_SIZE || size as usize > handshake::VMM_MAX_SIZE {
            return Err(PeerError::HandshakeSize(size));
        }
        let mut buf = [0u8; handshake::VMM_SIZE];
        buf[..4].copy_from_slice(&size.to_le_bytes());
        let known = (size as usize).min(handshake::VMM_SIZE);
        self.stream.read_exact(&mut buf[4..known])?;
        let mut rest = vec![0u8; size as usize - known];
        self.stream.read_exact(&mut rest)?;
        let mut q = QemuToIntrospector::read_from_bytes(&buf)
            .map_err(|_| PeerError::Malformed("handshake".into()))?;
        q.name[handshake::NAME_SIZE - 1] = 0;
        Ok(VmmInfo {
            struct_size: size,
            uuid: q.uuid,
            start_time: q.start_time.get(),
            name_raw: q.name,
        })
    }

    /// What the VMM sent in the handshake.
    pub fn vmm(&self) -> &VmmInfo {
        &self.vmm
    }

    /// The VM UUID from the handshake.
    pub fn uuid(&self) -> [u8; 16] {
        self.vmm.uuid
    }

    /// The VM name from the handshake (`kvmi_domain_name`).
    pub fn name(&self) -> String {
        self.vmm.name()
    }

    /// The VM start time from the handshake (`kvmi_get_starttime`).
    pub fn start_time(&self) -> i64 {
        self.vmm.start_time
    }

    /// The cached `GET_VERSION` answer's version (`kvmi_get_version`; no new request).
    pub fn get_version(&self) -> u32 {
        self.version.version.get()
    }

    /// The cached `GET_VERSION` answer (version and feature bytes).
    pub fn version_reply(&self) -> &GetVersionReply {
        &self.version
    }

    /// The underlying socket (for raw writes in hostile tests).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Takes the next sequence number from the shared counter.
    pub fn next_seq(&self) -> u32 {
        self.seq.next()
    }

    /// Writes raw bytes to the VMM in one write.
    pub fn send_raw(&mut self, bytes: &[u8]) -> PeerResult<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Builds `req` with the next `seq` and sends it without waiting; returns the `seq`.
    pub fn send(&mut self, req: &Request<'_>) -> PeerResult<u32> {
        let seq = self.seq.next();
        let msg = encode(seq, req);
        self.send_raw(&msg)?;
        Ok(seq)
    }

    fn read_msg(&mut self) -> PeerResult<Msg> {
        self.read_msg_after(None)
    }

    /// Reads one message; `first` is its first byte when already read.
    fn read_msg_after(&mut self, first: Option<u8>) -> PeerResult<Msg> {
        let mut h = [0u8; HEADER_SIZE];
        match first {
            Some(b) => {
                h[0] = b;
                self.stream.read_exact(&mut h[1..])?;
            }
            None => self.stream.read_exact(&mut h)?,
        }
        let hdr = Header::parse(&h).map_err(|e| PeerError::Malformed(e.to_string()))?;
        let mut payload = vec![0u8; hdr.size as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(Msg {
            id: hdr.id,
            seq: hdr.seq,
            payload,
        })
    }

    fn queue_event(&mut self, msg: Msg) -> PeerResult<()> {
        if msg.payload.len() > MSG_SIZE {
            return Err(PeerError::Malformed(format!(
                "event of {} bytes",
                msg.payload.len()
            )));
        }
        if self.queue.len() >= MAX_QUEUED_EVENTS {
            return Err(PeerError::QueueFull);
        }
        self.queue.push_back(msg);
        Ok(())
    }

    /// Waits for the reply to message (`id`, `seq`), queueing events that come first; the
    /// reply's data (after the error code) as received.
    fn wait_reply(&mut self, id: u16, seq: u32) -> PeerResult<Vec<u8>> {
        loop {
            let msg = self.read_msg()?;
            if msg.id == ids::EVENT {
                self.queue_event(msg)?;
                continue;
            }
            if msg.id != id || msg.seq != seq {
                return Err(PeerError::WrongMessage {
                    id: msg.id,
                    seq: msg.seq,
                    want_id: id,
                    want_seq: seq,
                });
            }
            let r = decode_reply(&msg.payload).map_err(|e| PeerError::Malformed(e.to_string()))?;
            if r.err != 0 {
                return Err(PeerError::Kvm(r.err));
            }
            return Ok(r.data.to_vec());
        }
    }

    fn shape(id: u16, expected: usize, data: Vec<u8>) -> PeerResult<Vec<u8>> {
        if id == ids::GET_REGISTERS {
            if data.len() != expected {
                return Err(PeerError::ReplySize {
                    expected,
                    got: data.len(),
                });
            }
            return Ok(data);
        }
        let mut d = data;
        d.resize(expected, 0);
        Ok(d)
    }

    /// Sends one request and waits (≤ 15 s per read) for its reply. Returns `expected` bytes
    /// of reply data: `min(received, expected)` copied, the rest zero-filled; a
    /// `GET_REGISTERS` reply must hold exactly `expected` bytes. An error reply is
    /// [`PeerError::Kvm`].
    pub fn request(&mut self, req: &Request<'_>, expected: usize) -> PeerResult<Vec<u8>> {
        let seq = self.seq.next();
        let msg = encode(seq, req);
        let id = id_of(&msg);
        self.send_raw(&msg)?;
        let data = self.wait_reply(id, seq)?;
        Self::shape(id, expected, data)
    }

    /// Starts a batch; its prefix's `seq` is taken now.
    pub fn batch(&mut self) -> Batch<'_> {
        let prefix_seq = self.seq.next();
        Batch {
            session: self,
            prefix_seq,
            msgs: Vec::new(),
            event_reply: false,
        }
    }

    /// Pauses vCPUs `0..count` as `kvmi_pause_all_vcpus` does: one write of
    /// `CONTROL_CMD_RESPONSE{0,1}`, `PAUSE_VCPU{wait 1}` per vCPU, `CONTROL_CMD_RESPONSE{1,1}`,
    /// then the reply to the last. Each vCPU then sends a PAUSE_VCPU event.
    pub fn pause_all_vcpus(&mut self, count: u16) -> PeerResult<()> {
        if count == 0 {
            return Ok(());
        }
        let mut b = self.batch();
        for vcpu in 0..count {
            b.queue_pause_vcpu(vcpu);
        }
        b.commit()
    }

    /// The next event: a queued one first, else one read within `timeout`.
    pub fn wait_event(&mut self, timeout: Duration) -> PeerResult<Event> {
        if let Some(msg) = self.queue.pop_front() {
            return Self::parse_event(msg);
        }
        // Wait up to `timeout` for the first byte, then read the message as usual.
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut first = [0u8; 1];
        let got = loop {
            match self.stream.read(&mut first) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        self.stream.set_read_timeout(Some(IO_TIMEOUT))?;
        match got {
            Ok(0) => return Err(PeerError::Closed),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let msg = self.read_msg_after(Some(first[0]))?;
        if msg.id != ids::EVENT {
            return Err(PeerError::WrongMessage {
                id: msg.id,
                seq: msg.seq,
                want_id: ids::EVENT,
                want_seq: 0,
            });
        }
        if msg.payload.len() > MSG_SIZE {
            return Err(PeerError::Malformed(format!(
                "event of {} bytes",
                msg.payload.len()
            )));
        }
        Self::parse_event(msg)
    }

    fn parse_event(msg: Msg) -> PeerResult<Event> {
        let (common, data) =
            decode_event(&msg.payload).map_err(|e| PeerError::Malformed(e.to_string()))?;
        Ok(Event {
            seq: msg.seq,
            common,
            data: data.to_vec(),
        })
    }

    /// Events received while waiting for replies and not yet taken.
    pub fn pending_events(&self) -> usize {
        self.queue.len()
    }

    /// Replies to `event` (message 0 with the event's `seq`): `vh{vcpu}`, `{action, event
    /// echo, pad}` and `data`, zero-padded to the size libkvmi tools send (CR/MSR 8, PF 272,
    /// others 0); longer data is sent as given. No reply comes back.
    pub fn reply_event(&mut self, event: &Event, action: u8, data: &[u8]) -> PeerResult<()> {
        let msg = event_reply_msg(event, action, data);
        self.send_raw(&msg)
    }

    /// Waits until the VMM closes the connection (EOF or reset), discarding what arrives;
    /// whether it did within `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.stream.set_read_timeout(Some(left)).is_err() {
                return true;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    /// Closes the connection (`kvmi_domain_close`).
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    // -----------------------------------------------------------------------------------
    // Commands, as libkvmi's functions send them.

    /// `CHECK_COMMAND`: Ok when allowed, else the VMM's error (−1 disallowed).
    pub fn check_command(&mut self, id: u16) -> PeerResult<()> {
        self.request(&Request::CheckCommand(id), 0).map(drop)
    }

    /// `CHECK_EVENT`: Ok when allowed, else the VMM's error.
    pub fn check_event(&mut self, id: u16) -> PeerResult<()> {
        self.request(&Request::CheckEvent(id), 0).map(drop)
    }

    /// `GET_GUEST_INFO`: the number of vCPUs (`kvmi_get_vcpu_count`).
    pub fn get_vcpu_count(&mut self) -> PeerResult<u32> {
        let d = self.request(&Request::GetGuestInfo, size_of::<GetGuestInfoReply>())?;
        Ok(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
    }

    /// `GET_VCPU_INFO` of vCPU 0: the TSC frequency in Hz (`kvmi_get_tsc_speed`).
    pub fn get_tsc_speed(&mut self) -> PeerResult<u64> {
        let d = self.request(&Request::GetVcpuInfo { vcpu: 0 }, 8)?;
        Ok(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
    }

    /// `CONTROL_EVENTS` of one event on one vCPU.
    pub fn control_events(&mut self, vcpu: u16, event: u8, enable: bool) -> PeerResult<()> {
        self.request(
            &Request::ControlEvents {
                vcpu,
                event,
                enable,
            },
            0,
        )
        .map(drop)
    }

    /// `CONTROL_VM_EVENTS` (UNHOOK or CREATE_VCPU).
    pub fn control_vm_events(&mut self, event: u8, enable: bool) -> PeerResult<()> {
        self.request(&Request::ControlVmEvents { event, enable }, 0)
            .map(drop)
    }

    /// `CONTROL_CR`.
    pub fn control_cr(&mut self, vcpu: u16, cr: u32, enable: bool) -> PeerResult<()> {
        self.request(&Request::ControlCr { vcpu, cr, enable }, 0)
            .map(drop)
    }

    /// `CONTROL_MSR`.
    pub fn control_msr(&mut self, vcpu: u16, msr: u32, enable: bool) -> PeerResult<()> {
        self.request(&Request::ControlMsr { vcpu, msr, enable }, 0)
            .map(drop)
    }

    /// `GET_REGISTERS` with these MSRs; the reply must be exactly `472 + 16·msrs.len()`
    /// bytes.
    pub fn get_registers(&mut self, vcpu: u16, msrs: &[u32]) -> PeerResult<Registers> {
        let idx: Vec<U32> = msrs.iter().map(|&m| U32::new(m)).collect();
        let n = u16::try_from(msrs.len()).expect("at most 65535 MSRs");
        let d = self.request(
            &Request::GetRegisters { vcpu, msrs: &idx },
            get_registers_reply_size(n),
        )?;
        let (fixed, rest) = GetRegistersReply::read_from_prefix(&d)
            .map_err(|_| PeerError::Malformed("GET_REGISTERS reply".into()))?;
        let msrs = <[KvmMsrEntry]>::ref_from_bytes(rest)
            .map_err(|_| PeerError::Malformed("GET_REGISTERS MSRs".into()))?
            .to_vec();
        Ok(Registers {
            mode: fixed.mode.get(),
            regs: fixed.regs,
            sregs: fixed.sregs,
            msrs,
        })
    }

    /// `SET_REGISTERS`.
    pub fn set_registers(&mut self, vcpu: u16, regs: &KvmRegs) -> PeerResult<()> {
        self.request(&Request::SetRegisters { vcpu, regs: *regs }, 0)
            .map(drop)
    }

    /// `GET_CPUID`: `[eax, ebx, ecx, edx]`.
    pub fn get_cpuid(&mut self, vcpu: u16, function: u32, index: u32) -> PeerResult<[u32; 4]> {
        let d = self.request(
            &Request::GetCpuid {
                vcpu,
                function,
                index,
            },
            size_of::<GetCpuidReply>(),
        )?;
        let r = GetCpuidReply::read_from_bytes(&d)
            .map_err(|_| PeerError::Malformed("GET_CPUID reply".into()))?;
        Ok([r.eax.get(), r.ebx.get(), r.ecx.get(), r.edx.get()])
    }

    /// `GET_XSAVE` into a buffer of `size` bytes (`kvmi_get_xsave`).
    pub fn get_xsave(&mut self, vcpu: u16, size: usize) -> PeerResult<Vec<u8>> {
        self.request(&Request::GetXsave { vcpu }, size)
    }

    /// `READ_PHYSICAL` of `size` bytes (the caller keeps it within one page, as libkvmi's
    /// callers must).
    pub fn read_physical(&mut self, gpa: u64, size: usize) -> PeerResult<Vec<u8>> {
        self.request(
            &Request::ReadPhysical {
                gpa,
                size: size as u64,
            },
            size,
        )
    }

    /// `READ_PHYSICAL` of any range, split at page boundaries.
    pub fn read_physical_range(&mut self, gpa: u64, size: usize) -> PeerResult<Vec<u8>> {
        let mut out = Vec::with_capacity(size);
        let mut at = gpa;
        let end = gpa + size as u64;
        while at < end {
            let n = (4096 - at % 4096).min(end - at) as usize;
            out.extend(self.read_physical(at, n)?);
            at += n as u64;
        }
        Ok(out)
    }

    /// `WRITE_PHYSICAL` (within one page).
    pub fn write_physical(&mut self, gpa: u64, data: &[u8]) -> PeerResult<()> {
        self.request(&Request::WritePhysical { gpa, data }, 0)
            .map(drop)
    }

    /// `INJECT_EXCEPTION` (`kvmi_inject_exception(dom, vcpu, gva, error, vector)`).
    pub fn inject_exception(
        &mut self,
        vcpu: u16,
        gva: u64,
        error: u32,
        vector: u8,
    ) -> PeerResult<()> {
        self.request(
            &Request::InjectException {
                vcpu,
                nr: vector,
                error_code: error,
                address: gva,
            },
            0,
        )
        .map(drop)
    }

    /// `SET_PAGE_ACCESS` (`kvmi_set_page_access(dom, gpa[], access[], count, view)`).
    pub fn set_page_access(&mut self, gpa: &[u64], access: &[u8], view: u16) -> PeerResult<()> {
        let entries = page_entries(gpa, access);
        self.request(
            &Request::SetPageAccess {
                view,
                entries: &entries,
            },
            0,
        )
        .map(drop)
    }

    /// `GET_MTRR_TYPE` (vCPU 0, as libkvmi sends it).
    pub fn get_mtrr_type(&mut self, gpa: u64) -> PeerResult<u8> {
        let d = self.request(&Request::GetMtrrType { vcpu: 0, gpa }, 8)?;
        Ok(d[0])
    }

    /// `GET_MAX_GFN` (`kvmi_get_maximum_gfn`).
    pub fn get_maximum_gfn(&mut self) -> PeerResult<u64> {
        let d = self.request(&Request::GetMaxGfn, 8)?;
        Ok(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
    }

    /// `VCPU_TRANSLATE_GVA`: the GPA, `!0` when unmapped.
    pub fn translate_gva(&mut self, vcpu: u16, gva: u64) -> PeerResult<u64> {
        let d = self.request(&Request::TranslateGva { vcpu, gva }, 8)?;
        Ok(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
    }

    /// `VCPU_CONTROL_SINGLESTEP`.
    pub fn control_singlestep(&mut self, vcpu: u16, enable: bool) -> PeerResult<()> {
        self.request(&Request::ControlSinglestep { vcpu, enable }, 0)
            .map(drop)
    }
}

fn page_entries(gpa: &[u64], access: &[u8]) -> Vec<PageAccessEntry> {
    assert_eq!(gpa.len(), access.len(), "one access byte per GPA");
    gpa.iter()
        .zip(access)
        .map(|(&g, &a)| PageAccessEntry {
            gpa: U64::new(g),
            access: a,
            padding1: 0,
            padding2: U16::new(0),
            padding3: U32::new(0),
        })
        .collect()
}

/// A libkvmi batch (`kvmi_batch_alloc` … `kvmi_batch_commit`): messages sent in one write
/// between two `CONTROL_CMD_RESPONSE` wrappers. Dropping it uncommitted sends nothing.
pub struct Batch<'s> {
    session: &'s mut Session,
    prefix_seq: u32,
    msgs: Vec<Vec<u8>>,
    event_reply: bool,
}

impl Batch<'_> {
    fn push(&mut self, req: &Request<'_>) {
        let seq = self.session.seq.next();
        self.msgs.push(encode(seq, req));
    }

    /// The `seq` of the prefix message (taken when the batch was created).
    pub fn prefix_seq(&self) -> u32 {
        self.prefix_seq
    }

    /// Queues `SET_REGISTERS` (`kvmi_queue_registers`).
    pub fn queue_registers(&mut self, vcpu: u16, regs: &KvmRegs) -> &mut Self {
        self.push(&Request::SetRegisters { vcpu, regs: *regs });
        self
    }

    /// Queues `SET_PAGE_ACCESS` (`kvmi_queue_page_access`).
    pub fn queue_page_access(&mut self, gpa: &[u64], access: &[u8], view: u16) -> &mut Self {
        let entries = page_entries(gpa, access);
        self.push(&Request::SetPageAccess {
            view,
            entries: &entries,
        });
        self
    }

    /// Queues `PAUSE_VCPU{wait 1}` (`kvmi_queue_pause_vcpu`).
    pub fn queue_pause_vcpu(&mut self, vcpu: u16) -> &mut Self {
        self.push(&Request::PauseVcpu { vcpu, wait: true });
        self
    }

    /// Queues an event reply (`kvmi_queue_reply_event`), sized as
    /// [`Session::reply_event`] sends it; it carries the event's `seq`.
    pub fn queue_reply_event(&mut self, event: &Event, action: u8, data: &[u8]) -> &mut Self {
        self.msgs.push(event_reply_msg(event, action, data));
        self.event_reply = true;
        self
    }

    /// Sends the batch in one write. With an event reply in it, the suffix is
    /// `{enable 1, now 0}` and nothing is awaited; otherwise it is `{1, 1}` and its reply is
    /// awaited. A batch of one event reply is sent bare; an empty one sends nothing.
    pub fn commit(self) -> PeerResult<()> {
        let Batch {
            session,
            prefix_seq,
            msgs,
            event_reply,
        } = self;
        if msgs.is_empty() {
            return Ok(());
        }
        if msgs.len() == 1 && event_reply {
            return session.send_raw(&msgs[0]);
        }
        let suffix_seq = session.seq.next();
        let mut out = cmd_response(prefix_seq, false, true);
        for m in &msgs {
            out.extend_from_slice(m);
        }
        let suffix = cmd_response(suffix_seq, true, !event_reply);
        out.extend_from_slice(&suffix);
        session.send_raw(&out)?;
        if event_reply {
            return Ok(());
        }
        session
            .wait_reply(ids::CONTROL_CMD_RESPONSE, suffix_seq)
            .map(drop)
    }
}

#[cfg(test)]
mod tests;
