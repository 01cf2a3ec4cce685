//! The transport-neutral link between the introspector and one tool: the engine sends whole
//! encoded messages through a [`Channel`]; a transport (the unix socket here, or the
//! appliance's shared-memory rings, `RingChannel` in the `appliance-link` crate) feeds every
//! whole message it receives to [`crate::Introspector::handle_message`].

use std::io;

use protocol::event::Event;

/// One tool's channel, as the engine sees it.
pub trait Channel: Send + Sync {
    /// Sends one whole message (header and payload together, as one write). `route` says
    /// what it is, so a transport with one queue per vCPU never decodes it again.
    fn send(&self, message: &[u8], route: Route) -> io::Result<()>;
    /// Sends event `seq` of `vcpu`: `message` is its v4 encoding, which a v4 transport sends
    /// as is ([`Channel::send`], the default); a transport that speaks another dialect
    /// encodes `event` itself.
    fn send_event(&self, seq: u32, event: &Event, message: &[u8], vcpu: u32) -> io::Result<()> {
        let _ = (seq, event);
        self.send(message, Route::Event { vcpu })
    }
    /// Closes the channel (the transport's reader then ends).
    fn close(&self);
    /// Whether a vCPU thread waiting for its event reply can collect it itself with
    /// [`Channel::poll_replies`] (shared-memory rings: no thread hand-off on the hot path).
    fn polls_replies(&self) -> bool {
        false
    }
    /// Passes every whole message waiting on `vcpu`'s reply ring to `f` and returns how many
    /// (0 when another thread is draining that ring right now). The default collects none:
    /// a socket is read by its own thread.
    fn poll_replies(&self, _vcpu: u32, _f: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        Ok(0)
    }
    /// What `vcpu`'s thread is doing about its event reply, so the transport's service thread
    /// leaves a ring the vCPU polls alone (neither draining it nor asking the tool to wake it
    /// for that ring) and takes it over when the vCPU stops polling. Default: nothing.
    fn reply_wait(&self, _vcpu: u32, _state: ReplyWait) {}
}

/// What an outgoing message is, as the engine that encoded it knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// An event raised by vCPU `vcpu` (the rings put it on that vCPU's event ring).
    Event {
        /// The vCPU index.
        vcpu: u32,
    },
    /// The reply to a command.
    CommandReply,
}

/// A vCPU thread's state while it waits for its event reply ([`Channel::reply_wait`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyWait {
    /// It polls its reply ring with [`Channel::poll_replies`].
    Polling,
    /// It stopped polling and sleeps until someone else delivers the reply.
    Blocked,
    /// It has its reply (or gave up): nothing to deliver to it.
    Done,
}

/// Why an incoming message closes the channel (a protocol error).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The framing or an event reply was invalid.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The message arrived on a channel that is no longer attached.
    #[error("channel no longer attached")]
    Detached,
}
