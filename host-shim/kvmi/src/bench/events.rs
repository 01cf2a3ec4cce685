//! Event round trips through the rings against the socket and the raw exit floor, in one
//! run. All five paths run the same test-guest loop, `mode=mem-write n=N gate=1`
//! (N word writes to a write-protected scratch page), and each sample is the time between
//! two consecutive exits (so it includes the guest's loop body and every cost of one round
//! trip):
//! - **floor**: an in-process [`ExitHook`](vmm::hook::ExitHook) takes the write exit and drops it;
//! - **appliance**: the target's introspector with the ring transport, answered by the agent
//!   inside the appliance VM (the embedded appliance image in `bench=events` mode, at CPL3,
//!   polling its event ring) — the path `kvmi run --appliance` uses;
//! - **rings**: the same transport answered by an agent thread of this process polling the
//!   shared ring region (the transport's cost without the appliance VM);
//! - **socket**: the same introspector over the KVMI unix socket, answered by [`KvmiClient`];
//! - **libkvmi**: the same introspector over the unix socket in the libkvmi (kvmi-v7)
//!   dialect, the shim connecting to a listener of this process (`Endpoint::Connect`), answered
//!   by a minimal libkvmi-style tool thread (`LibkvmiTool`): handshake, GET_VERSION,
//!   CONTROL_EVENTS, SET_PAGE_ACCESS, WRITE_PHYSICAL of the gate, then each PF event answered
//!   CONTINUE with its 272-byte reply;
//! - **v4 tool**: the v4 dialect with a tool built exactly like the libkvmi one (`V4Tool`:
//!   its own thread, the shim connecting to it). **libkvmi / v4 tool** is the dialect's own
//!   cost; **socket** differs from both in the tool (a reader thread handing events over)
//!   and in who connects.
//!
//! Every path must see exactly N exits (or events) per round, or the run fails naming the
//! path and both counts: a ratio against a floor that saw nothing would mean nothing.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypercall::discovery::RingKind;
use hypercall::ring::{Consumer, LayoutParams, Producer, Region, RingSizes};
use protocol::V4;
use protocol::command::Command;
use protocol::event::{EventKind, EventSet};
use protocol::event_reply::{Action, EventReply, EventReplyData};
use protocol::frame::{HEADER_SIZE, Header};
use protocol::list::List;
use protocol::types::{Access, PageAccessEntry};
use protocol::wire::libkvmi::frame::{Request, encode_request};
use protocol::wire::libkvmi::layout::{
    IntrospectorToQemu, PageAccessEntry as LibkvmiPageAccess, QemuToIntrospector,
};
use protocol::wire::libkvmi::{
    MAX_MSG_SIZE, access, actions, errors, events, handshake, host, ids,
};
use protocol::wire::{HostMessage, WireProfile};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::vms::{self, EventsLine, TargetEnd, TimingHook};
use appliance_link::hook::SERVED_FEATURES;
use appliance_link::rings::{RingMemory, RingService, Waker, create_region};
use kvmi_client::KvmiClient;
use kvmi_engine::libkvmi::LibkvmiConfig;
use kvmi_engine::socket::Dialect;
use kvmi_engine::{
    Endpoint, Introspector, IntrospectorConfig, start_introspected, start_introspected_dialect,
    temp_socket_path,
};
use vmm::devices::{SerialSink, UnknownIoPolicy};
use vmm::memory::GuestRam;
use vmm::vm::{RunLimits, Vm, VmConfig};

/// Median time per round trip of each path.
#[derive(Clone, Copy, Debug)]
pub struct EventFigures {
    /// Events per path (all rounds).
    pub samples: u64,
    /// The VMM alone handles the exit.
    pub floor: Duration,
    /// Through the rings, answered by the agent in the appliance VM.
    pub appliance: Duration,
    /// The appliance agent's own mean time per event (its TSC, from opening the gate to
    /// the last reply).
    pub appliance_mean: Duration,
    /// Times the appliance agent found every ring empty long enough to sleep (all rounds).
    pub appliance_sleeps: u64,
    /// Through the rings, answered by a host thread.
    pub rings: Duration,
    /// Through the rings with the target in a `vmm-target` process of its own (`kvmi run
    /// --isolate`), answered by a host thread of another process over the vhost-user link.
    pub rings_across: Duration,
    /// Through the socket (v4 dialect).
    pub socket: Duration,
    /// Through the socket in the libkvmi (kvmi-v7) dialect.
    pub libkvmi: Duration,
    /// Through the v4 socket, answered by a tool built like the libkvmi one (one thread).
    pub v4_tool: Duration,
}

impl EventFigures {
    /// A human-readable table with the ratios.
    pub fn table(&self) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let r = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
        format!(
            "event round trip (write-protected page, {} events, median):\n\
             \x20 raw exit floor                     {:>8.1} us\n\
             \x20 rings, agent in the appliance VM   {:>8.1} us   {:.2}x the floor\n\
             \x20 rings, agent on a host thread      {:>8.1} us   {:.2}x the floor\n\
             \x20 rings, target in its own process   {:>8.1} us   {:.2}x the floor\n\
             \x20 socket, host tool                  {:>8.1} us   {:.2}x the floor\n\
             \x20 socket, libkvmi dialect (kvmi-v7)  {:>8.1} us   {:.2}x the floor\n\
             \x20 socket, v4, same one-thread tool   {:>8.1} us   {:.2}x the floor\n\
             \x20 socket / rings (appliance VM)      {:.2}x\n\
             \x20 rings across processes / in one    {:.2}x\n\
             \x20 libkvmi / socket (v4)              {:.2}x\n\
             \x20 libkvmi / v4, same tool loop       {:.2}x\n\
             \x20 appliance agent: mean {:.1} us per event by its own clock, {} sleeps\n",
            self.samples,
            us(self.floor),
            us(self.appliance),
            r(self.appliance, self.floor),
            us(self.rings),
            r(self.rings, self.floor),
            us(self.rings_across),
            r(self.rings_across, self.floor),
            us(self.socket),
            r(self.socket, self.floor),
            us(self.libkvmi),
            r(self.libkvmi, self.floor),
            us(self.v4_tool),
            r(self.v4_tool, self.floor),
            r(self.socket, self.appliance),
            r(self.rings_across, self.rings),
            r(self.libkvmi, self.socket),
            r(self.libkvmi, self.v4_tool),
            us(self.appliance_mean),
            self.appliance_sleeps,
        )
    }
}

impl EventFigures {
    /// The same figures as one line of JSON (medians in microseconds, and the ratios the table
    /// prints), for scripts: `kvmi appliance-bench` prints it after the table.
    pub fn json_line(&self) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let r = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
        serde_json::json!({
            "event_round_trip": {
                "samples": self.samples,
                "floor_us": us(self.floor),
                "appliance_us": us(self.appliance),
                "rings_us": us(self.rings),
                "rings_across_processes_us": us(self.rings_across),
                "rings_across_over_in_process": r(self.rings_across, self.rings),
                "socket_us": us(self.socket),
                "libkvmi_us": us(self.libkvmi),
                "v4_tool_us": us(self.v4_tool),
                "appliance_mean_us": us(self.appliance_mean),
                "appliance_sleeps": self.appliance_sleeps,
                "socket_over_appliance": r(self.socket, self.appliance),
                "libkvmi_over_socket": r(self.libkvmi, self.socket),
                "libkvmi_over_v4_tool": r(self.libkvmi, self.v4_tool),
            }
        })
        .to_string()
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("event bench: {0}")]
pub struct EventBenchError(pub(crate) String);

pub(super) fn fail(what: &str) -> impl FnOnce(String) -> EventBenchError + '_ {
    move |e| EventBenchError(format!("{what}: {e}"))
}

/// The times between consecutive exits.
fn gaps(times: &[Instant]) -> impl Iterator<Item = Duration> + '_ {
    times.windows(2).map(|w| w[1] - w[0])
}

/// Checks that `path` saw exactly the `n` exits (or events) asked for: a path that saw fewer
/// (an empty floor, say) would still give a median and a ratio.
fn expect_count(path: &str, got: usize, n: u64) -> Result<(), EventBenchError> {
    if got as u64 == n {
        Ok(())
    } else {
        Err(EventBenchError(format!(
            "{path}: saw {got} exits/events, expected {n}"
        )))
    }
}

fn median(mut gaps: Vec<Duration>) -> Duration {
    gaps.sort();
    gaps.get(gaps.len() / 2).copied().unwrap_or_default()
}

/// Rounds of the five paths, alternated so a slow spell of the machine hits them all.
const ROUNDS: u32 = 3;

fn target_vm(image: &[u8], n: u64) -> Result<Vm, EventBenchError> {
    let config = VmConfig {
        name: "event-bench".into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: format!("mode=mem-write n={n} gate=1"),
        unknown_io: UnknownIoPolicy::Ignore,
    };
    let mut vm = Vm::new(config, image).map_err(|e| fail("target")(e.to_string()))?;
    vm.set_serial(SerialSink::Null);
    Ok(vm)
}

const LIMITS: RunLimits = RunLimits {
    timeout: Some(Duration::from_secs(120)),
    interrupt: None,
};

fn floor(image: &[u8], n: u64, page: u64, gate: u64) -> Result<Vec<Instant>, EventBenchError> {
    vms::floor_times(target_vm(image, n)?, page, gate, LIMITS).map_err(EventBenchError)
}

/// The agent's side of the rings.
pub(super) struct RingAgent {
    events: Consumer<RingMemory>,
    replies: Producer<RingMemory>,
    commands: Producer<RingMemory>,
    command_replies: Consumer<RingMemory>,
    buf: Vec<u8>,
    seq: u32,
    /// NOTIFY: wakes the shim's service thread when it sleeps (as the appliance's hypercall).
    waker: Waker,
}

impl RingAgent {
    /// The agent's ends of the rings of `app` (one vCPU), waking the service with `waker`.
    pub(super) fn open(
        app: &Region<RingMemory>,
        waker: Waker,
    ) -> Result<RingAgent, EventBenchError> {
        let ring = |e: hypercall::ring::RingError| fail("rings")(e.to_string());
        Ok(RingAgent {
            events: app.consumer_for(RingKind::Event, 0).map_err(ring)?,
            replies: app.producer_for(RingKind::EventReply, 0).map_err(ring)?,
            commands: app.producer_for(RingKind::Command, 0).map_err(ring)?,
            command_replies: app.consumer_for(RingKind::CommandReply, 0).map_err(ring)?,
            buf: vec![0u8; V4::MAX_MSG_SIZE],
            seq: 0,
            waker,
        })
    }

    fn pop(c: &mut Consumer<RingMemory>, buf: &mut [u8]) -> Result<usize, EventBenchError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(n) = c.try_pop(buf).map_err(|e| fail("ring")(e.to_string()))? {
                let _ = c.release().map_err(|e| fail("ring")(e.to_string()))?;
                return Ok(n);
            }
            if Instant::now() > deadline {
                return Err(EventBenchError("no record for 10 s".into()));
            }
            std::hint::spin_loop();
        }
    }

    fn push(
        p: &mut Producer<RingMemory>,
        msg: &[u8],
        waker: &Waker,
    ) -> Result<(), EventBenchError> {
        let notify = p
            .try_push(msg)
            .and_then(|()| p.publish())
            .map_err(|e| fail("ring push")(e.to_string()))?;
        if notify {
            waker.wake();
        }
        Ok(())
    }

    /// Sends `command`, retrying a few times while the vCPU is slow to take it (`-EAGAIN`
    /// after the engine's vCPU-command timeout, e.g. on a loaded host).
    fn command(&mut self, command: &Command<'_>) -> Result<(), EventBenchError> {
        let mut tries = 0;
        loop {
            match self.command_once(command) {
                Err(EventBenchError(e)) if e.ends_with("refused: Again") && tries < 5 => {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    fn command_once(&mut self, command: &Command<'_>) -> Result<(), EventBenchError> {
        self.seq += 1;
        let n = V4::encode_command(self.seq, command, &mut self.buf)
            .map_err(|e| fail("encode")(e.to_string()))?;
        Self::push(&mut self.commands, &self.buf[..n], &self.waker)?;
        let mut reply = vec![0u8; self.command_replies.max_payload()];
        let n = Self::pop(&mut self.command_replies, &mut reply)?;
        let frame = V4::parse_frame(&reply[..n]).map_err(|e| fail("reply")(e.to_string()))?;
        match V4::decode_host_message(frame) {
            Ok(HostMessage::Reply {
                seq,
                command: kind,
                payload,
            }) if seq == self.seq => match V4::decode_reply(kind, payload) {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(code)) => Err(EventBenchError(format!("{kind:?} refused: {code:?}"))),
                Err(e) => Err(fail("reply")(e.to_string())),
            },
            other => Err(EventBenchError(format!("unexpected reply {other:?}"))),
        }
    }

    /// The set-up of every path: PF events on, `page` write-protected, the guest's `gate`
    /// opened.
    pub(super) fn set_up(&mut self, page: u64, gate: u64) -> Result<(), EventBenchError> {
        let entries = [PageAccessEntry {
            gpa: page,
            access: Access::R.union(Access::X),
        }];
        let one = 1u64.to_le_bytes();
        for c in setup_commands(gate, &entries, &one) {
            self.command(&c)?;
        }
        Ok(())
    }

    /// Answers `n` events CONTINUE; returns when each arrived.
    pub(super) fn answer_events(&mut self, n: u64) -> Result<Vec<Instant>, EventBenchError> {
        let mut times = Vec::with_capacity(n as usize);
        let mut record = vec![0u8; self.events.max_payload()];
        while (times.len() as u64) < n {
            let len = Self::pop(&mut self.events, &mut record).map_err(|e| {
                EventBenchError(format!(
                    "rings: after {} of {n} events: {}",
                    times.len(),
                    e.0
                ))
            })?;
            times.push(Instant::now());
            let frame =
                V4::parse_frame(&record[..len]).map_err(|e| fail("event")(e.to_string()))?;
            let Ok(HostMessage::Event { seq, event }) = V4::decode_host_message(frame) else {
                return Err(EventBenchError("not an event on the event ring".into()));
            };
            let data = match event.payload.kind() {
                EventKind::PageFault => EventReplyData::PageFault(Default::default()),
                _ => EventReplyData::None,
            };
            let reply = EventReply {
                event: event.payload.kind(),
                action: Action::Continue,
                data,
            };
            let m = V4::encode_event_reply(seq, &reply, &mut self.buf)
                .map_err(|e| fail("encode")(e.to_string()))?;
            Self::push(&mut self.replies, &self.buf[..m], &self.waker)?;
        }
        Ok(times)
    }
}

fn setup_commands<'a>(
    gate: u64,
    entries: &'a [PageAccessEntry; 1],
    one: &'a [u8; 8],
) -> [Command<'a>; 3] {
    [
        Command::ControlEvents {
            vcpu: 0,
            events: EventSet::EMPTY.with(EventKind::PageFault),
        },
        Command::SetPageAccess {
            vcpu: 0,
            view: 0,
            entries: List::from_slice(entries),
        },
        Command::WritePhysical {
            gpa: gate,
            data: one,
        },
    ]
}

fn rings(image: &[u8], n: u64, page: u64, gate: u64) -> Result<Vec<Instant>, EventBenchError> {
    let caps = vmm::probe::cached_capabilities().map_err(|e| fail("probe")(e.to_string()))?;
    let mut vm = target_vm(image, n)?;
    let intro = Introspector::install(&mut vm, caps, IntrospectorConfig::default())
        .map_err(|e| fail("introspector")(e.to_string()))?;
    let params = LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes::default(),
        features: SERVED_FEATURES,
        map_window_gpa: appliance_link::launch::MAP_WINDOW_GPA,
        map_window_size: 1 << 20,
    };
    let size = params.region_size().next_multiple_of(4096);
    let ram =
        GuestRam::new("event-bench-rings", size).map_err(|e| fail("region")(e.to_string()))?;
    let region =
        create_region(Arc::new(ram), &params).map_err(|e| fail("region")(e.to_string()))?;
    let running = vm.start().map_err(|e| fail("start")(e.to_string()))?;
    intro.set_handle(running.handle());
    let service = RingService::start(
        intro.clone(),
        &region,
        Box::new(|_| {}),
        Duration::from_secs(10),
    )
    .map_err(|e| fail("ring service")(e.to_string()))?;
    let app = Region::open(region.memory().clone()).map_err(|e| fail("open")(e.to_string()))?;
    let mut agent = RingAgent::open(&app, service.waker())?;
    agent.set_up(page, gate)?;
    let times = agent.answer_events(n);
    let report = running.wait(LIMITS);
    let _ = service.stop();
    let times = times?;
    if !report.outcome.is_success() {
        return Err(EventBenchError(format!("rings run: {}", report.outcome)));
    }
    Ok(times)
}

fn socket(image: &[u8], n: u64, page: u64, gate: u64) -> Result<Vec<Instant>, EventBenchError> {
    let vm = target_vm(image, n)?;
    let path = temp_socket_path("event-bench");
    let run = start_introspected(vm, IntrospectorConfig::default(), Endpoint::Listen(path))
        .map_err(|e| fail("socket target")(e.to_string()))?;
    let client = KvmiClient::connect(run.socket()).map_err(|e| fail("connect")(e.to_string()))?;
    let entries = [PageAccessEntry {
        gpa: page,
        access: Access::R.union(Access::X),
    }];
    let one = 1u64.to_le_bytes();
    for c in setup_commands(gate, &entries, &one) {
        client
            .call(&c)
            .map_err(|e| fail("command")(e.to_string()))?;
    }
    let mut times = Vec::with_capacity(n as usize);
    while (times.len() as u64) < n {
        match client.next_event(Duration::from_secs(10)) {
            Ok(Some(ev)) => {
                times.push(ev.received);
                client
                    .reply_continue(&ev)
                    .map_err(|e| fail("reply")(e.to_string()))?;
            }
            Ok(None) => {
                return Err(EventBenchError(format!(
                    "socket: no event for 10 s after {} of {n} events",
                    times.len()
                )));
            }
            Err(e) => return Err(fail("socket")(e.to_string())),
        }
    }
    client.close();
    let report = run.wait(LIMITS);
    if !report.outcome.is_success() {
        return Err(EventBenchError(format!("socket run: {}", report.outcome)));
    }
    Ok(times)
}

/// Reply data of a PF event: `{u64 ctx_addr, u32 ctx_size, u8 singlestep, u8 rep_complete,
/// u16 pad, [u8; 256] ctx_data}`, all zero for a plain CONTINUE.
const PF_REPLY_SIZE: usize = match events::reply_data_size(events::PF) {
    Some(n) => n,
    None => 0,
};
const _: () = assert!(PF_REPLY_SIZE == 272);
const PF_REPLY: [u8; PF_REPLY_SIZE] = [0; PF_REPLY_SIZE];

/// How long the libkvmi tool waits for the shim (to connect, to answer, to send an event).
const TOOL_WAIT: Duration = Duration::from_secs(10);

/// A minimal libkvmi (kvmi-v7) tool: what libkvmi does on its socket, nothing more. It reads
/// each message as libkvmi does, the 8-byte header and then its payload.
struct LibkvmiTool {
    stream: UnixStream,
    seq: u32,
    /// Encoded requests.
    out: Vec<u8>,
    /// The payload of the last message read.
    msg: Vec<u8>,
}

impl LibkvmiTool {
    /// Accepts the shim's connection on `listener` and does the handshake: reads the VMM's
    /// 96-byte struct, answers the 24-byte one (no cookie: the shim has no secret).
    fn accept(listener: &UnixListener) -> Result<Self, EventBenchError> {
        let io = |what: &'static str| move |e: std::io::Error| fail(what)(e.to_string());
        listener.set_nonblocking(true).map_err(io("listener"))?;
        let deadline = Instant::now() + TOOL_WAIT;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(fail("libkvmi accept")(e.to_string())),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(io("libkvmi socket"))?;
        stream
            .set_read_timeout(Some(TOOL_WAIT))
            .map_err(io("libkvmi socket"))?;
        let mut hello = [0u8; handshake::VMM_SIZE];
        stream
            .read_exact(&mut hello)
            .map_err(io("libkvmi handshake"))?;
        let hello = QemuToIntrospector::read_from_bytes(&hello)
            .map_err(|_| EventBenchError("libkvmi handshake: short".into()))?;
        if hello.struct_size.get() as usize != handshake::VMM_SIZE {
            return Err(EventBenchError(format!(
                "libkvmi handshake: struct_size {}",
                hello.struct_size.get()
            )));
        }
        let answer = IntrospectorToQemu {
            struct_size: U32::new(handshake::TOOL_SIZE as u32),
            cookie_hash: [0; handshake::COOKIE_HASH_SIZE],
        };
        stream
            .write_all(answer.as_bytes())
            .map_err(io("libkvmi handshake"))?;
        Ok(LibkvmiTool {
            stream,
            seq: 0,
            out: vec![0u8; MAX_MSG_SIZE],
            msg: vec![0u8; MAX_MSG_SIZE],
        })
    }

    fn send(&mut self, seq: u32, request: &Request<'_>) -> Result<(), EventBenchError> {
        let n = encode_request(seq, request, &mut self.out)
            .map_err(|e| fail("libkvmi encode")(e.to_string()))?;
        self.stream
            .write_all(&self.out[..n])
            .map_err(|e| fail("libkvmi send")(e.to_string()))
    }

    /// Reads one message: its header, then its payload into `msg`.
    fn recv(&mut self) -> Result<Header, EventBenchError> {
        let mut h = [0u8; HEADER_SIZE];
        self.stream
            .read_exact(&mut h)
            .map_err(|e| fail("libkvmi read")(e.to_string()))?;
        let header = Header::parse(&h).map_err(|e| fail("libkvmi header")(e.to_string()))?;
        let payload = self
            .msg
            .get_mut(..header.size as usize)
            .ok_or_else(|| EventBenchError(format!("libkvmi: message of {}", header.size)))?;
        self.stream
            .read_exact(payload)
            .map_err(|e| fail("libkvmi read")(e.to_string()))?;
        Ok(header)
    }

    /// Checks the reply to command `id` number `seq` (just read); returns its data.
    fn reply(&self, header: Header, id: u16, seq: u32) -> Result<&[u8], EventBenchError> {
        if header.id != id || header.seq != seq {
            return Err(EventBenchError(format!(
                "libkvmi: expected the reply to command {id} seq {seq}, got id {} seq {}",
                header.id, header.seq
            )));
        }
        let reply = host::decode_reply(&self.msg[..header.size as usize])
            .map_err(|e| fail("libkvmi reply")(e.to_string()))?;
        if reply.err != 0 {
            return Err(EventBenchError(format!(
                "libkvmi: command {id} refused: {}",
                reply.err
            )));
        }
        Ok(reply.data)
    }

    /// Sends a command and waits for its reply (no event can come before it: the guest waits
    /// for its gate); retries a few times on `-KVM_EAGAIN` (a vCPU slow to take it).
    fn command(&mut self, request: &Request<'_>) -> Result<Vec<u8>, EventBenchError> {
        let mut tries = 0;
        loop {
            self.seq += 1;
            let seq = self.seq;
            self.send(seq, request)?;
            let id = Header::parse(&self.out)
                .map_err(|e| fail("libkvmi header")(e.to_string()))?
                .id;
            let header = self.recv()?;
            match self.reply(header, id, seq) {
                Ok(data) => return Ok(data.to_vec()),
                Err(EventBenchError(e))
                    if e.ends_with(&format!("refused: {}", -errors::EAGAIN)) && tries < 5 =>
                {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The libkvmi tool's whole session: GET_VERSION, CONTROL_EVENTS (PF on vCPU 0),
    /// SET_PAGE_ACCESS (`page` R|X), WRITE_PHYSICAL of 1 to the `gate`, then `n` PF events
    /// answered CONTINUE; returns when each event was read.
    fn run(&mut self, n: u64, page: u64, gate: u64) -> Result<Vec<Instant>, EventBenchError> {
        let version = self.command(&Request::GetVersion)?;
        let version = U32::read_from_prefix(&version)
            .map(|(v, _)| v.get())
            .unwrap_or(0);
        if version < 1 {
            return Err(EventBenchError(format!("libkvmi: version {version}")));
        }
        self.command(&Request::ControlEvents {
            vcpu: 0,
            event: events::PF,
            enable: true,
        })?;
        let entries = [LibkvmiPageAccess {
            gpa: U64::new(page),
            access: access::R | access::X,
            padding1: 0,
            padding2: U16::new(0),
            padding3: U32::new(0),
        }];
        self.command(&Request::SetPageAccess {
            view: 0,
            entries: &entries,
        })?;
        // The gate opens the guest's loop: its first event may come before the reply.
        self.seq += 1;
        let gate_seq = self.seq;
        self.send(
            gate_seq,
            &Request::WritePhysical {
                gpa: gate,
                data: &1u64.to_le_bytes(),
            },
        )?;
        let mut gate_open = false;
        let mut times = Vec::with_capacity(n as usize);
        while (times.len() as u64) < n || !gate_open {
            let header = self.recv().map_err(|e| {
                EventBenchError(format!(
                    "libkvmi: after {} of {n} events: {}",
                    times.len(),
                    e.0
                ))
            })?;
            if header.id == ids::EVENT {
                let received = Instant::now();
                let (common, _) = host::decode_event(&self.msg[..header.size as usize])
                    .map_err(|e| fail("libkvmi event")(e.to_string()))?;
                if common.event != events::PF {
                    return Err(EventBenchError(format!(
                        "libkvmi: event {} instead of PF",
                        common.event
                    )));
                }
                times.push(received);
                self.send(
                    header.seq,
                    &Request::EventReply {
                        vcpu: common.vcpu.get(),
                        action: actions::CONTINUE,
                        event: events::PF,
                        data: &PF_REPLY,
                    },
                )?;
            } else {
                self.reply(header, ids::WRITE_PHYSICAL, gate_seq)?;
                gate_open = true;
            }
        }
        Ok(times)
    }
}

/// A minimal v4 tool built like [`LibkvmiTool`]: on its own thread, connected to by the shim
/// (`--kvmi-connect`), reading each message (header, then payload) and answering each event
/// at once — so that the v4 and libkvmi paths differ only in the dialect. (The `socket`
/// path's [`KvmiClient`] is connected to the listening shim and hands each event from its
/// reader thread to the caller; both differences change the figure, see the README.)
struct V4Tool {
    stream: UnixStream,
    seq: u32,
    out: Vec<u8>,
    msg: Vec<u8>,
    times: Vec<Instant>,
}

impl V4Tool {
    /// Accepts the shim's connection on `listener` (the shim connects, as it does to a
    /// libkvmi tool; v4 has no handshake).
    fn accept(listener: &UnixListener) -> Result<Self, EventBenchError> {
        listener
            .set_nonblocking(true)
            .map_err(|e| fail("v4 tool listener")(e.to_string()))?;
        let deadline = Instant::now() + TOOL_WAIT;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(fail("v4 tool accept")(e.to_string())),
            }
        };
        let io = |e: std::io::Error| fail("v4 tool socket")(e.to_string());
        stream.set_nonblocking(false).map_err(io)?;
        stream.set_read_timeout(Some(TOOL_WAIT)).map_err(io)?;
        Ok(V4Tool {
            stream,
            seq: 0,
            out: vec![0u8; V4::MAX_MSG_SIZE],
            msg: vec![0u8; V4::MAX_MSG_SIZE],
            times: Vec::new(),
        })
    }

    fn write(&mut self, n: usize) -> Result<(), EventBenchError> {
        self.stream
            .write_all(&self.out[..n])
            .map_err(|e| fail("v4 tool send")(e.to_string()))
    }

    /// Reads one message into `msg`; an event is timestamped and answered CONTINUE here.
    /// Returns the header of anything else (a reply).
    fn recv(&mut self) -> Result<Option<Header>, EventBenchError> {
        let mut h = [0u8; HEADER_SIZE];
        self.stream
            .read_exact(&mut h)
            .map_err(|e| fail("v4 tool read")(e.to_string()))?;
        let header = Header::parse(&h).map_err(|e| fail("v4 tool header")(e.to_string()))?;
        let payload = self
            .msg
            .get_mut(..header.size as usize)
            .ok_or_else(|| EventBenchError(format!("v4 tool: message of {}", header.size)))?;
        self.stream
            .read_exact(payload)
            .map_err(|e| fail("v4 tool read")(e.to_string()))?;
        if header.id != V4::EVENT_ID {
            return Ok(Some(header));
        }
        let received = Instant::now();
        let event = V4::decode_event(&self.msg[..header.size as usize])
            .map_err(|e| fail("v4 tool event")(e.to_string()))?;
        if event.kind() != EventKind::PageFault {
            return Err(EventBenchError(format!(
                "v4 tool: {:?} event instead of PF",
                event.kind()
            )));
        }
        self.times.push(received);
        let reply = EventReply {
            event: EventKind::PageFault,
            action: Action::Continue,
            data: EventReplyData::PageFault(Default::default()),
        };
        let n = V4::encode_event_reply(header.seq, &reply, &mut self.out)
            .map_err(|e| fail("v4 tool encode")(e.to_string()))?;
        self.write(n)?;
        Ok(None)
    }

    /// Sends `command` and reads until its reply (answering any event that comes first).
    fn command(&mut self, command: &Command<'_>) -> Result<(), EventBenchError> {
        self.seq += 1;
        let seq = self.seq;
        let n = V4::encode_command(seq, command, &mut self.out)
            .map_err(|e| fail("v4 tool encode")(e.to_string()))?;
        self.write(n)?;
        loop {
            let Some(header) = self.recv()? else {
                continue;
            };
            if header.seq != seq {
                return Err(EventBenchError(format!(
                    "v4 tool: reply seq {} to command seq {seq}",
                    header.seq
                )));
            }
            return match V4::decode_reply(command.kind(), &self.msg[..header.size as usize]) {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(code)) => Err(EventBenchError(format!(
                    "v4 tool: {:?} refused: {code:?}",
                    command.kind()
                ))),
                Err(e) => Err(fail("v4 tool reply")(e.to_string())),
            };
        }
    }
}

/// The v4 socket answered by [`V4Tool`] (the like-for-like baseline of the libkvmi path).
fn v4_tool(image: &[u8], n: u64, page: u64, gate: u64) -> Result<Vec<Instant>, EventBenchError> {
    let vm = target_vm(image, n)?;
    let path = temp_socket_path("event-bench-v4");
    let listener = UnixListener::bind(&path).map_err(|e| fail("v4 tool listen")(e.to_string()))?;
    let run = match start_introspected(
        vm,
        IntrospectorConfig::default(),
        Endpoint::Connect(path.clone()),
    ) {
        Ok(run) => run,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(fail("v4 tool target")(e.to_string()));
        }
    };
    // On its own thread, connected to by the shim, as the libkvmi tool is: the two paths
    // differ only in the dialect.
    let socket_file = path.clone();
    let tool = std::thread::Builder::new()
        .name("v4-tool".into())
        .spawn(move || -> Result<Vec<Instant>, EventBenchError> {
            let tool = V4Tool::accept(&listener);
            // One session: once the tool leaves, the shim's reconnection attempts are refused.
            drop(listener);
            let _ = std::fs::remove_file(&socket_file);
            let mut tool = tool?;
            let entries = [PageAccessEntry {
                gpa: page,
                access: Access::R.union(Access::X),
            }];
            let one = 1u64.to_le_bytes();
            for c in setup_commands(gate, &entries, &one) {
                tool.command(&c)?;
            }
            while (tool.times.len() as u64) < n {
                let count = tool.times.len();
                if tool.recv()?.is_some() {
                    return Err(EventBenchError(format!(
                        "v4 tool: a reply where event {} of {n} was due",
                        count + 1
                    )));
                }
            }
            Ok(std::mem::take(&mut tool.times))
        })
        .map_err(|e| fail("v4 tool thread")(e.to_string()));
    let times = tool.and_then(|t| {
        t.join()
            .unwrap_or_else(|_| Err(EventBenchError("v4 tool thread panicked".into())))
    });
    let _ = std::fs::remove_file(&path);
    let times = times?;
    let report = run.wait(LIMITS);
    if !report.outcome.is_success() {
        return Err(EventBenchError(format!("v4 tool run: {}", report.outcome)));
    }
    Ok(times)
}

/// The libkvmi path: the shim connects to a listener of this process and serves the tool
/// thread in the libkvmi dialect.
fn libkvmi(image: &[u8], n: u64, page: u64, gate: u64) -> Result<Vec<Instant>, EventBenchError> {
    let vm = target_vm(image, n)?;
    let path = temp_socket_path("event-bench-libkvmi");
    let listener = UnixListener::bind(&path).map_err(|e| fail("libkvmi listen")(e.to_string()))?;
    let dialect = Dialect::Libkvmi(LibkvmiConfig {
        name: "event-bench".into(),
        unhook_timeout: Duration::from_secs(1),
        ..LibkvmiConfig::default()
    });
    let run = match start_introspected_dialect(
        vm,
        IntrospectorConfig::default(),
        Endpoint::Connect(path.clone()),
        dialect,
    ) {
        Ok(run) => run,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(fail("libkvmi target")(e.to_string()));
        }
    };
    let socket_file = path.clone();
    let tool = std::thread::Builder::new()
        .name("libkvmi-tool".into())
        .spawn(move || {
            let tool = LibkvmiTool::accept(&listener);
            // One session: once the tool leaves, the shim's reconnection attempts are refused.
            drop(listener);
            let _ = std::fs::remove_file(&socket_file);
            tool?.run(n, page, gate)
        })
        .map_err(|e| fail("libkvmi tool thread")(e.to_string()));
    let times = tool.and_then(|t| {
        t.join()
            .unwrap_or_else(|_| Err(EventBenchError("libkvmi tool thread panicked".into())))
    });
    let _ = std::fs::remove_file(&path);
    let times = times?;
    let report = run.wait(LIMITS);
    if !report.outcome.is_success() {
        return Err(EventBenchError(format!("libkvmi run: {}", report.outcome)));
    }
    Ok(times)
}

/// The agent in the appliance VM (`appliance_image` in `bench=events` mode); the times are
/// the target's write exits, taken before its introspector sees them.
fn appliance(
    image: &[u8],
    appliance_image: &[u8],
    n: u64,
    page: u64,
    gate: u64,
) -> Result<(Vec<Instant>, Duration, u64), EventBenchError> {
    let target = target_vm(image, n)?;
    let mut timing = None;
    let run = vms::run::<EventsLine>(
        target,
        appliance_image,
        format!("bench=events n={n} page={page:#x} gate={gate:#x}"),
        1 << 20,
        TargetEnd::Exits,
        |inner| {
            let hook = Arc::new(TimingHook::new(inner, n as usize));
            timing = Some(hook.clone());
            hook
        },
    )
    .map_err(|e| EventBenchError(format!("appliance run: {e}")))?;
    if run.line.events != n || run.line.replies != n {
        return Err(EventBenchError(format!(
            "the appliance answered {} of {n} events ({} replies)",
            run.line.events, run.line.replies
        )));
    }
    let times = timing.map(|t| t.take()).unwrap_or_default();
    let mean = vms::cycles(run.line.cycles, run.tsc_hz) / n as u32;
    Ok((times, mean, run.line.sleeps))
}

/// Runs the seven paths with `n` events each, `ROUNDS` times alternated, on test-guest
/// (`image`), whose profile gives the scratch `page` and the start `gate` addresses;
/// `appliance_image` is the appliance VM, `kvmi_exe` the `kvmi` binary whose `vmm-target`
/// process runs the target of the cross-process path.
pub fn run(
    image: &[u8],
    appliance_image: &[u8],
    kvmi_exe: &std::path::Path,
    n: u64,
    page: u64,
    gate: u64,
) -> Result<EventFigures, EventBenchError> {
    if !(2..=1_000_000).contains(&n) {
        return Err(EventBenchError("n must be 2..=1000000".into()));
    }
    let (mut floor_gaps, mut appliance_gaps, mut ring_gaps, mut socket_gaps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut appliance_mean, mut appliance_sleeps) = (Duration::ZERO, 0);
    let (mut libkvmi_gaps, mut v4_tool_gaps) = (Vec::new(), Vec::new());
    let mut across_gaps = Vec::new();
    for round in 0..ROUNDS {
        let times = floor(image, n, page, gate)?;
        expect_count("floor", times.len(), n)?;
        floor_gaps.extend(gaps(&times));
        let (times, mean, sleeps) = appliance(image, appliance_image, n, page, gate)?;
        expect_count("appliance", times.len(), n)?;
        appliance_gaps.extend(gaps(&times));
        appliance_mean += mean / ROUNDS;
        appliance_sleeps += sleeps;
        let times = rings(image, n, page, gate)?;
        expect_count("rings", times.len(), n)?;
        ring_gaps.extend(gaps(&times));
        let times = super::remote_rings::rings_across_processes(kvmi_exe, n, page, gate)?;
        expect_count("rings across processes", times.len(), n)?;
        across_gaps.extend(gaps(&times));
        let times = socket(image, n, page, gate)?;
        expect_count("socket", times.len(), n)?;
        socket_gaps.extend(gaps(&times));
        // The two dialects with the same one-thread tool, side by side, the first one
        // swapped every round.
        for libkvmi_turn in [round % 2 == 1, round % 2 == 0] {
            if libkvmi_turn {
                let times = libkvmi(image, n, page, gate)?;
                expect_count("libkvmi", times.len(), n)?;
                libkvmi_gaps.extend(gaps(&times));
            } else {
                let times = v4_tool(image, n, page, gate)?;
                expect_count("v4 tool", times.len(), n)?;
                v4_tool_gaps.extend(gaps(&times));
            }
        }
    }
    let (floor, appliance, rings, socket) = (
        median(floor_gaps),
        median(appliance_gaps),
        median(ring_gaps),
        median(socket_gaps),
    );
    let (libkvmi, v4_tool) = (median(libkvmi_gaps), median(v4_tool_gaps));
    let rings_across = median(across_gaps);
    Ok(EventFigures {
        samples: n * u64::from(ROUNDS),
        floor,
        appliance,
        appliance_mean,
        appliance_sleeps,
        rings,
        rings_across,
        socket,
        libkvmi,
        v4_tool,
    })
}
