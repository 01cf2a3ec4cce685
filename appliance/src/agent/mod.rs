//! The agent: event dispatch over the per-vCPU rings, the command client, and JSON-line
//! output on the log ring.
//!
//! - [`Agent`] owns each vCPU's event ring (consumer) and event-reply ring (producer). Its
//!   [`poll`](Agent::poll) drains every event ring once, decodes each record as a KVMI event
//!   message (`protocol::V4`), hands it to an [`EventHandler`] and pushes the encoded reply
//!   (same `seq`) on that vCPU's reply ring. [`run`](Agent::run) loops: poll; when every ring
//!   is empty, spin, back off and yield as the [`WaitStrategy`]
//!   says, and only then arm every ring's wake word and sleep in the [`Waiter`].
//!   No hypercall is made on the hot path: the shim only has to be notified when it sleeps.
//! - [`CommandClient`] sends commands on the command ring and matches replies by `seq`.
//! - [`LogWriter`] writes one JSON object per record (newline-terminated) on the log ring.

mod command;
mod dispatch;
mod handler;
mod output;

pub use command::{CommandClient, CommandError, CommandTokens, OwnedReply};
pub use dispatch::{Agent, AgentError, AgentStats};
pub use handler::{
    EventContext, EventHandler, EventSummary, default_reply, erased, kind_name, reply_with,
};
pub use output::LogWriter;

use hypercall::ring::{Notify, WaitStrategy, Waiter};

/// How a side waits for its peer: the strategy, the sleep and the wake-up of the peer.
#[derive(Clone, Debug)]
pub struct Waiting<W, N> {
    /// Spin / back-off / yield budget before sleeping.
    pub strategy: WaitStrategy,
    /// How to sleep (a `NOTIFY`-woken halt in the VM, a thread park on the host).
    pub waiter: W,
    /// How to wake the shim when it sleeps on a ring we produce or free.
    pub notify: N,
}

impl<W: Waiter, N: Notify> Waiting<W, N> {
    /// A waiting policy.
    pub fn new(strategy: WaitStrategy, waiter: W, notify: N) -> Self {
        Waiting {
            strategy,
            waiter,
            notify,
        }
    }
}
