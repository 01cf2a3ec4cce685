//! The command client: commands on the command ring, replies matched by `seq`.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use hypercall::ring::{Consumer, Notify, Producer, RingError, SharedMemory, Waiter};
use hypercall::token::MapToken;
use protocol::frame::Frame;
use protocol::{
    Command, CommandKind, CommandResult, HostMessage, ProtocolError, Reply, V4, WireProfile,
};

use super::Waiting;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command does not encode.
    #[error("encoding the command: {0:?}")]
    Encode(protocol::EncodeError),
    /// A ring failed (corruption by the peer, or a message larger than the ring).
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// The reply does not decode.
    #[error("bad reply: {0}")]
    Protocol(#[from] ProtocolError),
    /// The host answered with an error code.
    #[error("host refused the command: {0:?}")]
    Refused(protocol::ErrorCode),
    /// A reply of the wrong kind or shape.
    #[error("unexpected reply")]
    Unexpected,
    /// The target went (its slot is no longer live) before the reply came.
    #[error("the target went before it answered")]
    Abandoned,
}

/// A reply message copied out of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedReply {
    /// The command it answers.
    pub kind: CommandKind,
    /// Its sequence number.
    pub seq: u32,
    /// The whole message (header + payload).
    pub message: Vec<u8>,
}

impl OwnedReply {
    /// Decodes the reply (borrowing the message).
    pub fn decode(&self) -> Result<CommandResult<'_>, ProtocolError> {
        let frame = V4::parse_frame(&self.message)?;
        V4::decode_reply(self.kind, frame.payload)
    }
}

/// Sends commands and collects their replies. Replies may arrive in any order: a reply for
/// another outstanding command is kept until asked for; a reply nobody asked for is dropped
/// and counted.
pub struct CommandClient<M> {
    commands: Producer<M>,
    replies: Consumer<M>,
    next_seq: u32,
    outstanding: Vec<(u32, CommandKind)>,
    early: Vec<OwnedReply>,
    stray: u64,
    encode_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    /// Whether the target may still answer (`None`: always; see
    /// [`CommandClient::set_liveness`]).
    alive: Option<Box<dyn Fn() -> bool>>,
}

impl<M> core::fmt::Debug for CommandClient<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CommandClient")
            .field("next_seq", &self.next_seq)
            .field("outstanding", &self.outstanding.len())
            .finish()
    }
}

impl<M: SharedMemory> CommandClient<M> {
    /// A client on the command ring's producer and the command-reply ring's consumer.
    pub fn new(commands: Producer<M>, replies: Consumer<M>) -> Self {
        let recv = replies.max_payload();
        CommandClient {
            commands,
            replies,
            next_seq: 1,
            outstanding: Vec::new(),
            early: Vec::new(),
            stray: 0,
            encode_buf: vec![0; V4::MAX_MSG_SIZE],
            recv_buf: vec![0; recv],
            alive: None,
        }
    }

    /// Makes every wait for a reply ask `alive` while the reply ring is empty: once it says
    /// false (the target's slot is gone: a target whose process died cannot answer) the wait
    /// ends with [`CommandError::Abandoned`] instead of lasting forever.
    pub fn set_liveness(&mut self, alive: Box<dyn Fn() -> bool>) {
        self.alive = Some(alive);
    }

    /// Replies that matched no outstanding command.
    pub fn stray_replies(&self) -> u64 {
        self.stray
    }

    /// Encodes and publishes `command`; returns its `seq`.
    pub fn send<W: Waiter, N: Notify>(
        &mut self,
        command: &Command<'_>,
        waiting: &Waiting<W, N>,
    ) -> Result<u32, CommandError> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        let n =
            V4::encode_command(seq, command, &mut self.encode_buf).map_err(CommandError::Encode)?;
        self.commands.push_blocking(
            &self.encode_buf[..n],
            &waiting.strategy,
            &waiting.waiter,
            &waiting.notify,
        )?;
        self.commands.publish_and_notify(&waiting.notify)?;
        self.outstanding.push((seq, command.kind()));
        Ok(seq)
    }

    /// Takes one reply off the ring, if any, filing it by `seq`.
    fn receive_one(&mut self) -> Result<bool, CommandError> {
        let Some(n) = self.replies.try_pop(&mut self.recv_buf)? else {
            return Ok(false);
        };
        let message = &self.recv_buf[..n];
        let frame: Frame<'_> = V4::parse_frame(message)?;
        let seq = frame.header.seq;
        match V4::decode_host_message(frame) {
            Ok(HostMessage::Reply { command, .. })
                if self
                    .outstanding
                    .iter()
                    .any(|&(s, k)| s == seq && k == command) =>
            {
                self.outstanding.retain(|&(s, _)| s != seq);
                self.early.push(OwnedReply {
                    kind: command,
                    seq,
                    message: message.to_vec(),
                });
            }
            _ => self.stray += 1,
        }
        Ok(true)
    }

    /// Waits for the reply to `seq`.
    pub fn wait_reply<W: Waiter, N: Notify>(
        &mut self,
        seq: u32,
        waiting: &Waiting<W, N>,
    ) -> Result<OwnedReply, CommandError> {
        loop {
            if let Some(i) = self.early.iter().position(|r| r.seq == seq) {
                return Ok(self.early.swap_remove(i));
            }
            if !self.outstanding.iter().any(|&(s, _)| s == seq) {
                return Err(CommandError::Unexpected);
            }
            if self.receive_one()? {
                continue;
            }
            match &self.alive {
                None => self.replies.wait_readable(
                    &waiting.strategy,
                    &waiting.waiter,
                    &waiting.notify,
                )?,
                Some(alive) => {
                    if !alive() {
                        self.outstanding.retain(|&(s, _)| s != seq);
                        return Err(CommandError::Abandoned);
                    }
                    // A bounded wait: one round of the waiter, then look again.
                    self.replies.release_and_notify(&waiting.notify)?;
                    waiting.waiter.wait();
                }
            }
        }
    }

    /// Sends `command` and waits for its reply.
    pub fn call<W: Waiter, N: Notify>(
        &mut self,
        command: &Command<'_>,
        waiting: &Waiting<W, N>,
    ) -> Result<OwnedReply, CommandError> {
        let seq = self.send(command, waiting)?;
        self.wait_reply(seq, waiting)
    }

    /// GET_MAP_TOKEN: a fresh single-use map token.
    pub fn map_token<W: Waiter, N: Notify>(
        &mut self,
        waiting: &Waiting<W, N>,
    ) -> Result<MapToken, CommandError> {
        let reply = self.call(&Command::GetMapToken, waiting)?;
        match reply.decode()? {
            Ok(Reply::MapToken(token)) => Ok(MapToken::from_bytes(token.0)),
            Ok(_) => Err(CommandError::Unexpected),
            Err(code) => Err(CommandError::Refused(code)),
        }
    }
}

/// A [`TokenSource`](crate::memory::TokenSource) that asks the shim for each token with
/// GET_MAP_TOKEN on the command ring (for [`CachedMemory`](crate::memory::CachedMemory)).
pub struct CommandTokens<'a, M, W, N> {
    /// The command client.
    pub client: &'a mut CommandClient<M>,
    /// How to wait for the replies.
    pub waiting: &'a Waiting<W, N>,
    /// Tokens obtained so far.
    pub issued: u64,
}

impl<'a, M, W, N> CommandTokens<'a, M, W, N> {
    /// Tokens from `client`, waiting as `waiting` says.
    pub fn new(client: &'a mut CommandClient<M>, waiting: &'a Waiting<W, N>) -> Self {
        CommandTokens {
            client,
            waiting,
            issued: 0,
        }
    }
}

impl<M: SharedMemory, W: Waiter, N: Notify> crate::memory::TokenSource
    for CommandTokens<'_, M, W, N>
{
    fn next_token(&mut self) -> Result<MapToken, crate::memory::MemError> {
        let token = self
            .client
            .map_token(self.waiting)
            .map_err(|e| crate::memory::MemError::Token(alloc::format!("{e}")))?;
        self.issued += 1;
        Ok(token)
    }
}
