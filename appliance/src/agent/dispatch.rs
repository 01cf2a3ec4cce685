//! The agent loop: drain the per-vCPU event rings, dispatch, reply; wait without exits.

use alloc::vec;
use alloc::vec::Vec;

use hypercall::discovery::{NO_VCPU, RingKind};
use hypercall::ring::{Consumer, Notify, Producer, Region, RingError, SharedMemory, Waiter};
use protocol::{Event, EventReply, HostMessage, V4, WireProfile};
use serde::Serialize;

use super::handler::{EventContext, EventHandler, default_reply, erased};
use super::{LogWriter, Waiting};

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A ring failed: the peer corrupted it (the channel is dead).
    #[error("ring of vCPU {vcpu}: {source}")]
    Ring {
        /// The vCPU (or `u32::MAX` for the shared rings).
        vcpu: u32,
        /// The ring error.
        source: RingError,
    },
}

/// Counters of the loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentStats {
    /// Events decoded and dispatched.
    pub events: u64,
    /// Replies published.
    pub replies: u64,
    /// Records that were not valid event messages (dropped and logged).
    pub bad_messages: u64,
    /// Handler replies that did not encode (replaced by the default reply).
    pub bad_replies: u64,
    /// Times the loop went to sleep on the waiter.
    pub sleeps: u64,
}

struct Context<'a, M> {
    vcpu: u32,
    seq: u32,
    log: &'a mut LogWriter<M>,
}

impl<M: SharedMemory> EventContext for Context<'_, M> {
    fn vcpu(&self) -> u32 {
        self.vcpu
    }
    fn seq(&self) -> u32 {
        self.seq
    }
    fn emit(&mut self, value: &dyn erased::Json) -> bool {
        match value.to_json() {
            Ok(json) => self.log.emit_json(&json),
            Err(_) => false,
        }
    }
}

#[derive(Serialize)]
struct BadMessage {
    error: &'static str,
    vcpu: u32,
    len: usize,
}

/// The event loop of the agent.
pub struct Agent<M, H, W, N> {
    events: Vec<Consumer<M>>,
    replies: Vec<Producer<M>>,
    log: LogWriter<M>,
    handler: H,
    waiting: Waiting<W, N>,
    stats: AgentStats,
    record: Vec<u8>,
    reply: Vec<u8>,
    /// The vCPU [`Agent::poll_at_most`] starts with.
    next_vcpu: usize,
}

impl<M, H, W, N> core::fmt::Debug for Agent<M, H, W, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Agent")
            .field("vcpus", &self.events.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<M, H, W, N> Agent<M, H, W, N>
where
    M: SharedMemory + Clone,
    H: EventHandler,
    W: Waiter,
    N: Notify,
{
    /// An agent over every vCPU's event and reply rings and the log ring of `region`.
    pub fn new(region: &Region<M>, handler: H, waiting: Waiting<W, N>) -> Result<Self, AgentError> {
        let ring = |vcpu: u32| move |source| AgentError::Ring { vcpu, source };
        let vcpus = region.params().vcpu_count;
        let mut events = Vec::new();
        let mut replies = Vec::new();
        for vcpu in 0..vcpus {
            events.push(
                region
                    .consumer_for(RingKind::Event, vcpu)
                    .map_err(ring(vcpu))?,
            );
            replies.push(
                region
                    .producer_for(RingKind::EventReply, vcpu)
                    .map_err(ring(vcpu))?,
            );
        }
        let log = LogWriter::new(
            region
                .producer_for(RingKind::Log, NO_VCPU)
                .map_err(ring(NO_VCPU))?,
        );
        let record = vec![0; events.first().map_or(0, |c| c.max_payload())];
        Ok(Agent {
            events,
            replies,
            log,
            handler,
            waiting,
            stats: AgentStats::default(),
            record,
            reply: vec![0; V4::MAX_MSG_SIZE],
            next_vcpu: 0,
        })
    }

    /// The counters.
    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The handler, mutably.
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// The log writer (for lines outside event handling, e.g. a summary).
    pub fn log(&mut self) -> &mut LogWriter<M> {
        &mut self.log
    }

    /// Publishes pending log lines.
    pub fn flush_log(&mut self) -> Result<(), AgentError> {
        self.log
            .flush(&self.waiting.notify)
            .map_err(|source| AgentError::Ring {
                vcpu: NO_VCPU,
                source,
            })
    }

    /// Drains every event ring once: each event is dispatched and answered. Returns the
    /// number of events handled.
    pub fn poll(&mut self) -> Result<usize, AgentError> {
        self.poll_at_most(usize::MAX)
    }

    /// Handles at most `budget` events, taking the vCPUs' rings in turn from where the last
    /// call stopped (so a budget smaller than the backlog still reaches every vCPU). Returns
    /// the number handled. An agent serving several targets calls this on each in turn: no
    /// target then waits for more than one budget of every other target's events.
    pub fn poll_at_most(&mut self, budget: usize) -> Result<usize, AgentError> {
        let mut handled = 0;
        let vcpus = self.events.len();
        for turn in 0..vcpus {
            if handled >= budget {
                break;
            }
            let vcpu = (self.next_vcpu + turn) % vcpus;
            let err = |source| AgentError::Ring {
                vcpu: vcpu as u32,
                source,
            };
            while handled < budget {
                let Some(n) = self.events[vcpu].try_pop(&mut self.record).map_err(err)? else {
                    break;
                };
                if self.handle_record(vcpu, n)? {
                    handled += 1;
                }
            }
            self.events[vcpu]
                .release_and_notify(&self.waiting.notify)
                .map_err(err)?;
            self.replies[vcpu]
                .publish_and_notify(&self.waiting.notify)
                .map_err(err)?;
            if handled >= budget {
                // Resume after this vCPU next time.
                self.next_vcpu = (vcpu + 1) % vcpus;
            }
        }
        if handled > 0 {
            self.flush_log()?;
        }
        Ok(handled)
    }

    /// Decodes, dispatches and answers the record of `n` bytes in the scratch buffer.
    fn handle_record(&mut self, vcpu: usize, n: usize) -> Result<bool, AgentError> {
        let decoded = V4::parse_frame(&self.record[..n]).and_then(V4::decode_host_message);
        let (seq, event): (u32, Event) = match decoded {
            Ok(HostMessage::Event { seq, event }) => (seq, event),
            Ok(HostMessage::Reply { .. }) | Err(_) => {
                self.stats.bad_messages += 1;
                let error = if decoded.is_ok() {
                    "reply on an event ring"
                } else {
                    "undecodable event"
                };
                self.log.emit(&BadMessage {
                    error,
                    vcpu: vcpu as u32,
                    len: n,
                });
                return Ok(false);
            }
        };
        self.stats.events += 1;
        let mut ctx = Context {
            vcpu: vcpu as u32,
            seq,
            log: &mut self.log,
        };
        let answer = self.handler.on_event(&mut ctx, &event);
        self.send_reply(vcpu, seq, &event, &answer)?;
        Ok(true)
    }

    fn send_reply(
        &mut self,
        vcpu: usize,
        seq: u32,
        event: &Event,
        answer: &EventReply<'_>,
    ) -> Result<(), AgentError> {
        let len = match V4::encode_event_reply(seq, answer, &mut self.reply) {
            Ok(len) => len,
            Err(_) => {
                self.stats.bad_replies += 1;
                let fallback = default_reply(event);
                match V4::encode_event_reply(seq, &fallback, &mut self.reply) {
                    Ok(len) => len,
                    // The default reply of a decoded event always encodes; drop otherwise.
                    Err(_) => return Ok(()),
                }
            }
        };
        let Waiting {
            strategy,
            waiter,
            notify,
        } = &self.waiting;
        // A full reply ring means the shim is behind: wait for it (nothing is dropped).
        self.replies[vcpu]
            .push_blocking(&self.reply[..len], strategy, waiter, notify)
            .map_err(|source| AgentError::Ring {
                vcpu: vcpu as u32,
                source,
            })?;
        self.stats.replies += 1;
        Ok(())
    }

    /// Whether any event ring has records.
    fn any_ready(&mut self) -> Result<bool, AgentError> {
        for (vcpu, ring) in self.events.iter_mut().enumerate() {
            if ring.available().map_err(|source| AgentError::Ring {
                vcpu: vcpu as u32,
                source,
            })? > 0
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Waits until some event ring has records: spin, back off, yield, then arm every
    /// ring's wake word and sleep (re-checking after arming, so no publish is missed).
    pub fn wait_for_events(&mut self) -> Result<(), AgentError> {
        let strategy = self.waiting.strategy;
        for _ in 0..strategy.spins {
            if self.any_ready()? {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        for round in 0..strategy.backoff_rounds {
            for _ in 0..1u32 << round.min(strategy.max_backoff_shift).min(31) {
                core::hint::spin_loop();
            }
            if self.any_ready()? {
                return Ok(());
            }
        }
        for _ in 0..strategy.yields {
            self.waiting.waiter.relax();
            if self.any_ready()? {
                return Ok(());
            }
        }
        let mut may_sleep = true;
        for (vcpu, ring) in self.events.iter_mut().enumerate() {
            let err = |source| AgentError::Ring {
                vcpu: vcpu as u32,
                source,
            };
            if !ring.arm_wake().map_err(err)? {
                may_sleep = false;
                break;
            }
        }
        if may_sleep {
            self.stats.sleeps += 1;
            self.waiting.waiter.wait();
        }
        for (vcpu, ring) in self.events.iter_mut().enumerate() {
            ring.disarm_wake().map_err(|source| AgentError::Ring {
                vcpu: vcpu as u32,
                source,
            })?;
        }
        Ok(())
    }

    /// Polls and waits until `stop` says so (checked after every poll); returns the counters.
    pub fn run(
        &mut self,
        mut stop: impl FnMut(&AgentStats) -> bool,
    ) -> Result<AgentStats, AgentError> {
        loop {
            let handled = self.poll()?;
            if stop(&self.stats) {
                self.flush_log()?;
                return Ok(self.stats);
            }
            if handled == 0 {
                self.wait_for_events()?;
            }
        }
    }
}
