//! The ring transport: the introspector's [`Channel`] over the shared-memory ring region,
//! and the service thread that feeds the appliance's replies and commands to it.
//!
//! - Events go to the event ring of the vCPU that raised them (the engine names it: [`Route`]), on
//!   that vCPU's thread. A full ring **back-pressures** the vCPU: it waits (spin, yield, then
//!   short sleeps) until the appliance frees space — an event is never dropped. Only when the
//!   ring stays full for the reply timeout is the appliance declared dead: the send fails and
//!   the engine detaches it (unhooks the target, which keeps running).
//! - Command replies go to the command-reply ring (same back-pressure).
//! - A vCPU waiting for its event reply polls its own reply ring for a while
//!   ([`Channel::reply_wait`]); meanwhile the service thread leaves that ring alone and does
//!   not arm its wake word, so the appliance answers without an exit. A vCPU that stops
//!   polling wakes the service thread, which takes the ring over.
//! - Commands: the command ring's wake word stays armed, so the appliance makes a NOTIFY
//!   hypercall after each command, and the shim serves the ring right there on the
//!   appliance's vCPU thread ([`Waker::notify`]): no hand-off to a thread that, on a busy
//!   host, may wait milliseconds for a CPU.
//! - The service thread drains the reply rings no vCPU polls, the command ring (when nobody
//!   notified) into [`Introspector::handle_message`], and prints the log ring's records on
//!   stdout (one line each). When every ring is empty it spins briefly, then arms the wake
//!   words and sleeps; the appliance's NOTIFY ([`RingService::waker`]) ends the sleep. Armed
//!   wake words are what lets the appliance skip NOTIFY while the thread is awake.
//! - The appliance polls the rings the shim produces, so the shim never notifies it.
//!
//! A corrupt ring (indices or lengths scribbled by the appliance; see `hypercall::ring`), a
//! protocol error, or anything but an event reply on a reply ring (a command there would be
//! queued for the very vCPU polling that ring) detaches the appliance with the reason; the
//! target runs on, unhooked.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use hypercall::call::NOTIFY_ALL_RINGS;
use hypercall::discovery::RingKind;
use hypercall::ring::{
    Consumer, LayoutParams, NoNotify, Producer, Region, RingError, SharedRegion,
};
use protocol::V4;
use protocol::frame::HEADER_SIZE;
use protocol::wire::WireProfile;

use kvmi_engine::lock_order;
use kvmi_engine::{Channel, ChannelError, Introspector, ReplyWait, Route};
use vmm::memory::GuestRam;
use vmm::sync::RankedMutex;

/// The ring region's memory as the shim sees it: the appliance's ring-region RAM.
pub type RingMemory = Arc<SharedRegion<Arc<GuestRam>>>;

/// Lays out the ring region in `ram` (the region's memory, which
/// [`add_appliance_regions`](crate::launch::add_appliance_regions) adds to the appliance VM
/// through `Vm::add_shared_region`).
pub fn create_region(
    ram: Arc<GuestRam>,
    params: &LayoutParams,
) -> Result<Region<RingMemory>, RingError> {
    let len = ram.size() as usize;
    create_region_in(ram, len, params)
}

/// [`create_region`] over the first `len` bytes of `ram` (a fleet slot's ring memory is sized
/// for its largest target; a smaller target's layout uses a prefix of it).
pub fn create_region_in(
    ram: Arc<GuestRam>,
    len: usize,
    params: &LayoutParams,
) -> Result<Region<RingMemory>, RingError> {
    if len as u64 > ram.size() {
        return Err(RingError::BadParams);
    }
    let ptr = ram.host_base();
    // SAFETY: `ptr..ptr+len` lies inside the RAM's shared mapping (checked above), kept alive
    // by the `Arc<GuestRam>` stored as the region's owner; the shim accesses the ring region
    // only through this region's atomics (the appliance VM accesses it as guest memory, which
    // is allowed).
    let shared = unsafe { SharedRegion::new(ram, ptr, len) }.map_err(|_| RingError::BadParams)?;
    Region::create(Arc::new(shared), params)
}

/// How long a side waits on a full ring before it declares the appliance dead.
pub const DEFAULT_FULL_TIMEOUT: Duration = Duration::from_secs(10);

/// The shim's producing end: per-vCPU event rings and the command-reply ring.
pub struct RingChannel {
    events: Vec<RankedMutex<Producer<RingMemory>>>,
    /// The per-vCPU reply rings, consumed by whichever of the waiting vCPU thread and the
    /// service thread holds the lock (one consumer at a time, as the ring requires).
    replies: Vec<RankedMutex<ReplyConsumer>>,
    /// Per vCPU: its thread is polling its reply ring right now ([`ReplyWait::Polling`]), so
    /// the service thread leaves that ring alone.
    polled: Vec<AtomicBool>,
    /// The service thread, woken when a vCPU stops polling (it then delivers the reply).
    service: OnceLock<Thread>,
    command_replies: RankedMutex<Producer<RingMemory>>,
    closed: AtomicBool,
    full_timeout: Duration,
    waits: AtomicU64,
    /// Why a reply ring was found bad by whichever thread read it (the vCPU that polled it
    /// detaches the appliance itself; the service thread reports this reason).
    reply_fault: OnceLock<String>,
    fairness: Arc<Fairness>,
}

impl std::fmt::Debug for RingChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingChannel")
            .field("vcpus", &self.events.len())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Event replies answered by one appliance, counted across all the targets it guards (one
/// per appliance; each target's [`RingChannel`] shares it).
#[derive(Debug, Default)]
pub struct FleetCounter {
    answered: AtomicU64,
}

/// How long, in other targets' events, one target's events waited for their replies: when a
/// vCPU sends an event, the channel notes the appliance's and its own answered counts; when
/// the reply comes, the difference of the two deltas is how many events of *other* targets
/// the appliance answered meanwhile. The maximum over all events is the fairness the agent
/// delivered (its bound: its budget per target per pass, times the other targets).
#[derive(Debug)]
struct Fairness {
    fleet: Arc<FleetCounter>,
    own: AtomicU64,
    /// Per vCPU: the (appliance, own) answered counts when its outstanding event was sent.
    sent: Vec<(AtomicU64, AtomicU64)>,
    max_others: AtomicU64,
}

impl Fairness {
    fn sent(&self, vcpu: usize) {
        if let Some((fleet, own)) = self.sent.get(vcpu) {
            fleet.store(
                self.fleet.answered.load(Ordering::SeqCst),
                Ordering::Relaxed,
            );
            own.store(self.own.load(Ordering::SeqCst), Ordering::Relaxed);
        }
    }

    fn answered(&self, vcpu: usize) {
        if let Some((fleet, own)) = self.sent.get(vcpu) {
            let all = self.fleet.answered.load(Ordering::SeqCst) - fleet.load(Ordering::Relaxed);
            let mine = self.own.load(Ordering::SeqCst) - own.load(Ordering::Relaxed);
            self.max_others
                .fetch_max(all.saturating_sub(mine), Ordering::Relaxed);
        }
        self.fleet.answered.fetch_add(1, Ordering::SeqCst);
        self.own.fetch_add(1, Ordering::SeqCst);
    }
}

/// A reply ring's consuming end with its copy-out buffer.
struct ReplyConsumer {
    ring: Consumer<RingMemory>,
    scratch: Vec<u8>,
    vcpu: usize,
    fairness: Arc<Fairness>,
}

impl ReplyConsumer {
    /// Feeds the published records of the reply ring to `f`; returns how many were
    /// consumed. Only event replies belong on a reply ring: anything else (a command, which
    /// the engine would queue for the very vCPU polling this ring, stalling it), a corrupt
    /// ring or a record `f` refuses ends the feeding, and the error says why.
    fn drain(&mut self, f: &mut dyn FnMut(&[u8]) -> Result<(), String>) -> Result<usize, String> {
        let mut failure = None;
        let n = self
            .ring
            .drain(&mut self.scratch, &NoNotify, |record| {
                if failure.is_none() {
                    match check_event_reply(record).and_then(|()| f(record)) {
                        Ok(()) => self.fairness.answered(self.vcpu),
                        Err(e) => failure = Some(e),
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        failure.map_or(Ok(n), Err)
    }
}

/// `Ok` if `record` is an event reply, the only message a reply ring may carry; otherwise
/// what it is, as the reason to detach the appliance.
fn check_event_reply(record: &[u8]) -> Result<(), String> {
    let what = match V4::parse_frame(record) {
        Ok(frame) if frame.header.id == V4::EVENT_REPLY_ID => return Ok(()),
        Ok(frame) if frame.header.id == V4::EVENT_ID => format!("an event (id {})", V4::EVENT_ID),
        Ok(frame) => match V4::command_kind(frame.header.id) {
            Some(kind) => format!("a {kind:?} command (id {})", frame.header.id),
            None => format!("a message of unknown id {}", frame.header.id),
        },
        Err(e) => format!("a malformed message ({e})"),
    };
    Err(format!("{what} where only event replies belong"))
}

fn io_err(e: RingError) -> std::io::Error {
    std::io::Error::other(e)
}

impl RingChannel {
    /// The producing ends of `region`; a ring that stays full `full_timeout` fails the send.
    /// `fleet` counts the replies of every target of the same appliance (see
    /// [`RingChannel::max_others_answered`]).
    pub fn new(
        region: &Region<RingMemory>,
        full_timeout: Duration,
        fleet: Arc<FleetCounter>,
    ) -> Result<RingChannel, RingError> {
        let vcpus = region.params().vcpu_count;
        let fairness = Arc::new(Fairness {
            fleet,
            own: AtomicU64::new(0),
            sent: (0..vcpus)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            max_others: AtomicU64::new(0),
        });
        let events = (0..vcpus)
            .map(|v| {
                region
                    .producer_for(RingKind::Event, v)
                    .map(|p| RankedMutex::new(lock_order::EVENT_RING, p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let command_replies = RankedMutex::new(
            lock_order::COMMAND_REPLY_RING,
            region.producer_for(RingKind::CommandReply, 0)?,
        );
        let replies = (0..vcpus)
            .map(|v| {
                let ring = region.consumer_for(RingKind::EventReply, v)?;
                let scratch = vec![0u8; ring.max_payload()];
                Ok(RankedMutex::new(
                    lock_order::REPLY_RING,
                    ReplyConsumer {
                        ring,
                        scratch,
                        vcpu: v as usize,
                        fairness: fairness.clone(),
                    },
                ))
            })
            .collect::<Result<Vec<_>, RingError>>()?;
        Ok(RingChannel {
            events,
            replies,
            polled: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            service: OnceLock::new(),
            command_replies,
            closed: AtomicBool::new(false),
            full_timeout,
            waits: AtomicU64::new(0),
            reply_fault: OnceLock::new(),
            fairness,
        })
    }

    /// The most events of other targets (of the same appliance) answered while one event of
    /// this target waited for its reply.
    pub fn max_others_answered(&self) -> u64 {
        self.fairness.max_others.load(Ordering::Relaxed)
    }

    /// Event replies received on this channel.
    pub fn answered(&self) -> u64 {
        self.fairness.own.load(Ordering::Relaxed)
    }

    /// Why a reply ring was found bad, if one was (the appliance is then detached).
    pub fn reply_fault(&self) -> Option<&str> {
        self.reply_fault.get().map(String::as_str)
    }

    /// Whether vCPU `v`'s thread is polling its own reply ring.
    fn is_polled(&self, v: usize) -> bool {
        self.polled.get(v).is_some_and(|p| p.load(Ordering::SeqCst))
    }

    /// Times a send found its ring full and waited (back-pressure).
    pub fn full_waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// The ring a message goes to: an event's vCPU ring, else the command-reply ring.
    fn ring_for(&self, route: Route) -> std::io::Result<&RankedMutex<Producer<RingMemory>>> {
        match route {
            Route::CommandReply => Ok(&self.command_replies),
            Route::Event { vcpu } => self
                .events
                .get(vcpu as usize)
                .ok_or_else(|| std::io::Error::other("event of a vCPU without a ring")),
        }
    }

    fn push(
        &self,
        ring: &RankedMutex<Producer<RingMemory>>,
        message: &[u8],
    ) -> std::io::Result<()> {
        let mut p = ring.lock();
        let mut started: Option<Instant> = None;
        let mut round = 0u32;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            match p.try_push(message) {
                Ok(()) => break,
                Err(RingError::Full) => {}
                Err(e) => return Err(io_err(e)),
            }
            let since = *started.get_or_insert_with(|| {
                self.waits.fetch_add(1, Ordering::Relaxed);
                Instant::now()
            });
            if since.elapsed() > self.full_timeout {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the appliance did not free ring space in time",
                ));
            }
            round += 1;
            match round {
                0..=256 => std::hint::spin_loop(),
                257..=320 => std::thread::yield_now(),
                _ => std::thread::sleep(Duration::from_micros(50)),
            }
        }
        // The appliance polls the rings we produce: no notification to send.
        let _ = p.publish().map_err(io_err)?;
        Ok(())
    }
}

impl Channel for RingChannel {
    fn send(&self, message: &[u8], route: Route) -> std::io::Result<()> {
        if message.len() < HEADER_SIZE {
            return Err(std::io::Error::other("message shorter than its header"));
        }
        let ring = self.ring_for(route)?;
        if let Route::Event { vcpu } = route {
            // Before the push: the reply cannot be counted before its event.
            self.fairness.sent(vcpu as usize);
        }
        self.push(ring, message)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn polls_replies(&self) -> bool {
        true
    }

    fn poll_replies(&self, vcpu: u32, f: &mut dyn FnMut(&[u8])) -> std::io::Result<usize> {
        let Some(ring) = self.replies.get(vcpu as usize) else {
            return Ok(0);
        };
        // The service thread holds it: it delivers this reply itself.
        let Some(mut consumer) = ring.try_lock() else {
            return Ok(0);
        };
        // A bad record fails the poll: the polling vCPU detaches the appliance at once
        // ("reply ring of vCPU N: <reason>"), and the service thread reports the same.
        consumer
            .drain(&mut |record| {
                f(record);
                Ok(())
            })
            .map_err(|reason| {
                let _ = self
                    .reply_fault
                    .set(format!("reply ring of vCPU {vcpu}: {reason}"));
                std::io::Error::new(std::io::ErrorKind::InvalidData, reason)
            })
    }

    fn reply_wait(&self, vcpu: u32, state: ReplyWait) {
        let Some(polled) = self.polled.get(vcpu as usize) else {
            return;
        };
        polled.store(state == ReplyWait::Polling, Ordering::SeqCst);
        if state == ReplyWait::Polling
            && let Some(ring) = self.replies.get(vcpu as usize)
            && let Some(mut consumer) = ring.try_lock()
        {
            // Armed by a sleeping service thread: the agent would NOTIFY (exit) for a reply
            // this thread is about to collect itself. A failure shows up in the next drain.
            let _ = consumer.ring.disarm_wake();
        }
        if state == ReplyWait::Blocked
            && let Some(service) = self.service.get()
        {
            // It may sleep with this ring's wake word unarmed: let it take the ring over.
            service.unpark();
        }
    }
}

/// Where the log ring's lines go.
pub type LogSink = Box<dyn FnMut(&[u8]) + Send>;

/// Prints each log record as one line on stdout (records are JSON lines; a trailing newline
/// is not doubled).
pub fn stdout_sink() -> LogSink {
    Box::new(|record: &[u8]| {
        let text = record.strip_suffix(b"\n").unwrap_or(record);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    })
}

/// Counters of the service thread.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Messages fed to the introspector (event replies and commands).
    pub messages: AtomicU64,
    /// Log records printed.
    pub log_records: AtomicU64,
    /// Times the thread slept.
    pub sleeps: AtomicU64,
}

/// Why serving stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceEnd {
    /// [`RingService::stop`] was called.
    Stopped,
    /// The appliance detached (a corrupt ring, a protocol error, or the engine detached it).
    Detached(String),
}

/// The shim's service thread for one appliance's rings.
pub struct RingService {
    stop: Arc<AtomicBool>,
    thread: RankedMutex<Option<JoinHandle<ServiceEnd>>>,
    /// The command ring's desk and the ring's index (for NOTIFY).
    desk: (Arc<CommandDesk>, u64),
    waker: Thread,
    stats: Arc<ServiceStats>,
    channel: Arc<RingChannel>,
    generation: u64,
}

impl std::fmt::Debug for RingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingService")
            .field("generation", &self.generation)
            .finish()
    }
}

/// What the appliance's NOTIFY hypercall does: serve the command ring right away on the
/// calling (appliance vCPU) thread, and wake the service thread for the other rings.
#[derive(Clone)]
pub struct Waker {
    thread: Option<Thread>,
    desk: Option<(Arc<CommandDesk>, u64)>,
    /// A target in another process: its slot's doorbell eventfd.
    doorbell: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker")
            .field("inline_commands", &self.desk.is_some())
            .field("doorbell", &self.doorbell.is_some())
            .finish()
    }
}

impl Waker {
    /// A waker for `thread` (e.g. a test's own thread), with no command ring to serve.
    pub fn for_thread(thread: Thread) -> Waker {
        Waker {
            thread: Some(thread),
            desk: None,
            doorbell: None,
        }
    }

    /// The waker of a target in another process: every NOTIFY writes the slot's doorbell
    /// eventfd (the link's `SET_VRING_KICK`), which the target's
    /// [`KickForwarder`](crate::kick::KickForwarder) turns into its service's wake-up.
    pub fn doorbell(kick: Arc<vmm_sys_util::eventfd::EventFd>) -> Waker {
        Waker {
            thread: None,
            desk: None,
            doorbell: Some(kick),
        }
    }

    /// Ends the service thread's sleep (cheap, idempotent).
    pub fn wake(&self) {
        if let Some(thread) = &self.thread {
            thread.unpark();
        }
        if let Some(kick) = &self.doorbell {
            // A full counter (2^64 - 2 kicks unread) already wakes the reader.
            let _ = kick.write(1);
        }
    }

    /// NOTIFY for ring index `ring` ([`NOTIFY_ALL_RINGS`] = any): the command ring is served
    /// on this thread at once (no hand-off to a thread that may wait for a CPU); any other
    /// ring wakes the service thread, as does a command ring the service thread is draining.
    /// Through a doorbell every ring is one wake-up of the target's process.
    pub fn notify(&self, ring: u64) {
        let Some((desk, command_ring)) = &self.desk else {
            return self.wake();
        };
        let commands = ring == NOTIFY_ALL_RINGS || ring == *command_ring;
        let served = commands && desk.serve().is_some();
        if ring != *command_ring || !served {
            self.wake();
        }
    }
}

/// The command ring's consumer, shared by the service thread and NOTIFY (whoever holds it
/// drains it into the introspector). Its wake word stays armed, so the appliance notifies
/// after every command it publishes.
pub struct CommandDesk {
    intro: Arc<Introspector>,
    generation: u64,
    inbox: RankedMutex<(Consumer<RingMemory>, Vec<u8>)>,
    stats: Arc<ServiceStats>,
}

impl CommandDesk {
    /// Drains the command ring if no other thread is; `None` when one is. A bad ring or
    /// command detaches the appliance (the service thread then ends).
    fn serve(&self) -> Option<usize> {
        if self.intro.current_generation() != self.generation {
            // Detached: nothing to serve (and no warning per NOTIFY of a hostile appliance).
            return Some(0);
        }
        let mut inbox = self.inbox.try_lock()?;
        match self.drain(&mut inbox) {
            Ok(n) => Some(n),
            Err(reason) => {
                drop(inbox);
                tracing::warn!("appliance rings: {reason}; detaching the appliance");
                self.intro.detach(self.generation, &reason);
                Some(0)
            }
        }
    }

    /// Drains the ring, then re-arms its wake word at the new read position (the word is an
    /// event index: armed once, it fires once).
    fn drain(&self, inbox: &mut (Consumer<RingMemory>, Vec<u8>)) -> Result<usize, String> {
        let (consumer, scratch) = inbox;
        let mut total = 0;
        loop {
            total += drain(consumer, scratch, "command", |record| {
                self.stats.messages.fetch_add(1, Ordering::Relaxed);
                self.intro
                    .handle_message(self.generation, record)
                    .map_err(|e| e.to_string())
            })?;
            if consumer
                .arm_wake()
                .map_err(|e| format!("command ring: {e}"))?
            {
                return Ok(total);
            }
        }
    }
}

struct Inbound {
    channel: Arc<RingChannel>,
    desk: Arc<CommandDesk>,
    /// The log ring and where its lines go; `None` when another process consumes it.
    log: Option<(Consumer<RingMemory>, LogSink)>,
}

/// How long the service thread sleeps at most before re-checking (a NOTIFY ends it early).
const SLEEP: Duration = Duration::from_millis(2);
/// How long after its last work the thread polls with spin hints, then with scheduler
/// yields, before it arms the wake words and sleeps (time-based, so the budget does not
/// depend on the build's speed).
const SPIN_FOR: Duration = Duration::from_micros(50);
const YIELD_FOR: Duration = Duration::from_micros(500);

impl RingService {
    /// Attaches the appliance's rings in `region` to `introspector` as its tool and starts
    /// the service thread. Fails if a tool is attached already.
    pub fn start(
        introspector: Arc<Introspector>,
        region: &Region<RingMemory>,
        log: LogSink,
        full_timeout: Duration,
    ) -> Result<RingService, ChannelError> {
        Self::start_in_fleet(introspector, region, log, full_timeout, Arc::default())
    }

    /// [`RingService::start`] for one of several targets of the same appliance, whose
    /// replies `fleet` counts (for [`RingChannel::max_others_answered`]).
    pub fn start_in_fleet(
        introspector: Arc<Introspector>,
        region: &Region<RingMemory>,
        log: LogSink,
        full_timeout: Duration,
        fleet: Arc<FleetCounter>,
    ) -> Result<RingService, ChannelError> {
        Self::start_with(introspector, region, Some(log), full_timeout, fleet)
    }

    /// [`RingService::start`] for a target process of `kvmi run --isolate`: the same
    /// service, but the log ring is left alone (the appliance process reads it and prints
    /// its lines). The appliance's NOTIFY reaches this process as a doorbell eventfd: see
    /// [`crate::kick::KickForwarder`], which hands it to [`RingService::waker`].
    pub fn start_without_log(
        introspector: Arc<Introspector>,
        region: &Region<RingMemory>,
        full_timeout: Duration,
    ) -> Result<RingService, ChannelError> {
        Self::start_with(introspector, region, None, full_timeout, Arc::default())
    }

    fn start_with(
        introspector: Arc<Introspector>,
        region: &Region<RingMemory>,
        log: Option<LogSink>,
        full_timeout: Duration,
        fleet: Arc<FleetCounter>,
    ) -> Result<RingService, ChannelError> {
        let bad = |e: RingError| ChannelError::Protocol(format!("ring region: {e}"));
        let channel = Arc::new(RingChannel::new(region, full_timeout, fleet).map_err(bad)?);
        let mut commands = region.consumer_for(RingKind::Command, 0).map_err(bad)?;
        // Armed for good: the appliance notifies after each command (served inline).
        commands.arm_wake().map_err(bad)?;
        let command_ring = region.ring_index(RingKind::Command, 0).map_err(bad)?;
        let log = match log {
            Some(sink) => Some((region.consumer_for(RingKind::Log, 0).map_err(bad)?, sink)),
            None => None,
        };
        let generation = introspector.attach(channel.clone())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServiceStats::default());
        let desk = Arc::new(CommandDesk {
            intro: introspector.clone(),
            generation,
            inbox: RankedMutex::new(lock_order::COMMAND_INBOX, (commands, vec![0u8; 1 << 20])),
            stats: stats.clone(),
        });
        let inbound = Inbound {
            channel: channel.clone(),
            desk: desk.clone(),
            log,
        };
        let (s, st, intro) = (stop.clone(), stats.clone(), introspector.clone());
        let spawned = std::thread::Builder::new()
            .name("kvmi-rings".into())
            .spawn(move || {
                let end = match vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service) {
                    Ok(_) => serve(&intro, generation, inbound, &s, &st),
                    Err(e) => ServiceEnd::Detached(e.to_string()),
                };
                if let ServiceEnd::Detached(reason) = &end {
                    intro.detach(generation, reason);
                }
                end
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                introspector.detach(generation, "cannot start the ring service");
                return Err(ChannelError::Protocol(format!(
                    "spawning the ring thread: {e}"
                )));
            }
        };
        let waker = thread.thread().clone();
        let _ = channel.service.set(waker.clone());
        Ok(RingService {
            stop,
            thread: RankedMutex::new(lock_order::RING_SERVICE_THREAD, Some(thread)),
            desk: (desk, u64::from(command_ring)),
            waker,
            stats,
            channel,
            generation,
        })
    }

    /// The NOTIFY handler: serves commands inline, wakes the thread for the rest.
    pub fn waker(&self) -> Waker {
        Waker {
            thread: Some(self.waker.clone()),
            desk: Some(self.desk.clone()),
            doorbell: None,
        }
    }

    /// The attach generation of the appliance.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The counters.
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// The channel (for its back-pressure counter).
    pub fn channel(&self) -> &Arc<RingChannel> {
        &self.channel
    }

    /// True once the thread has ended (stopped or detached).
    pub fn has_ended(&self) -> bool {
        self.thread
            .lock()
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread (draining the log ring once more) and returns why it ended. The
    /// caller detaches the appliance from the introspector if it is still attached.
    pub fn stop(&self) -> ServiceEnd {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.unpark();
        let t = self.thread.lock().take();
        match t.map(JoinHandle::join) {
            Some(Ok(end)) => end,
            Some(Err(_)) => ServiceEnd::Detached("the ring service panicked".into()),
            None => ServiceEnd::Stopped,
        }
    }
}

impl Drop for RingService {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Drains one inbound ring into `f`; an error ends serving.
fn drain(
    consumer: &mut Consumer<RingMemory>,
    scratch: &mut [u8],
    what: &str,
    mut f: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<usize, String> {
    let mut failure = None;
    let n = consumer
        .drain(scratch, &NoNotify, |record| {
            if failure.is_none()
                && let Err(e) = f(record)
            {
                failure = Some(e);
            }
        })
        .map_err(|e| format!("{what} ring: {e}"))?;
    match failure {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

fn serve(
    intro: &Introspector,
    generation: u64,
    mut inbound: Inbound,
    stop: &AtomicBool,
    stats: &ServiceStats,
) -> ServiceEnd {
    let mut scratch = vec![0u8; 1 << 20];
    let mut last_work = Instant::now();
    let handle = |record: &[u8]| -> Result<(), String> {
        stats.messages.fetch_add(1, Ordering::Relaxed);
        intro
            .handle_message(generation, record)
            .map_err(|e| e.to_string())
    };
    loop {
        let mut work = 0usize;
        let round = (|| -> Result<(), String> {
            for (v, ring) in inbound.channel.replies.iter().enumerate() {
                // A vCPU collecting its own reply polls or holds the ring: skip it.
                if inbound.channel.is_polled(v) {
                    continue;
                }
                let Some(mut consumer) = ring.try_lock() else {
                    continue;
                };
                work += consumer
                    .drain(&mut |record| handle(record))
                    .map_err(|e| format!("reply ring of vCPU {v}: {e}"))?;
            }
            if let Some(mut inbox) = inbound.desk.inbox.try_lock() {
                work += inbound.desk.drain(&mut inbox)?;
            }
            if let Some((ring, log)) = &mut inbound.log {
                work += drain(ring, &mut scratch, "log", |r| {
                    stats.log_records.fetch_add(1, Ordering::Relaxed);
                    log(r);
                    Ok(())
                })?;
            }
            Ok(())
        })();
        if let Err(reason) = round {
            tracing::warn!("appliance rings: {reason}; detaching the appliance");
            return ServiceEnd::Detached(reason);
        }
        // A detach that came before the stop request is what ended the appliance: report it
        // as such, whichever of the two this thread notices first.
        if intro.current_generation() != generation {
            // A vCPU that found its reply ring bad detached the appliance: say why.
            let reason = inbound.channel.reply_fault().map_or_else(
                || "the introspector detached the appliance".to_string(),
                str::to_string,
            );
            return ServiceEnd::Detached(reason);
        }
        if stop.load(Ordering::SeqCst) {
            return ServiceEnd::Stopped;
        }
        if work > 0 {
            last_work = Instant::now();
            continue;
        }
        let idle = last_work.elapsed();
        if idle < SPIN_FOR {
            std::hint::spin_loop();
        } else if idle < YIELD_FOR {
            std::thread::yield_now();
        } else if let Err(e) = sleep_armed(&mut inbound, stats) {
            return ServiceEnd::Detached(format!("arming ring wake words: {e}"));
        }
    }
}

/// Arms every inbound ring's wake word; sleeps (until NOTIFY or [`SLEEP`]) only if all are
/// still empty; disarms again.
fn sleep_armed(inbound: &mut Inbound, stats: &ServiceStats) -> Result<(), RingError> {
    let mut all_empty = true;
    for (v, reply) in inbound.channel.replies.iter().enumerate() {
        // A ring its vCPU polls needs no NOTIFY (the appliance would exit for nothing); the
        // vCPU wakes this thread when it stops polling.
        if !inbound.channel.is_polled(v) {
            all_empty &= reply.lock().ring.arm_wake()?;
        }
    }
    if let Some((log, _)) = &mut inbound.log {
        all_empty &= log.arm_wake()?;
    }
    // A NOTIFY serving the command ring right now holds it (possibly waiting on a full
    // reply ring): do not wait for it; it drains what is there and re-arms the ring.
    all_empty &= match inbound.desk.inbox.try_lock() {
        Some(mut inbox) => inbox.0.available()? == 0,
        None => true,
    };
    if all_empty {
        stats.sleeps.fetch_add(1, Ordering::Relaxed);
        std::thread::park_timeout(SLEEP);
    }
    for reply in &inbound.channel.replies {
        reply.lock().ring.disarm_wake()?;
    }
    if let Some((log, _)) = &mut inbound.log {
        log.disarm_wake()?;
    }
    Ok(())
}
