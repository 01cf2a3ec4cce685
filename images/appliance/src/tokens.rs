//! Map tokens for the page cache, from a command client the main loop shares.
//!
//! `appliance::agent::CommandTokens` holds the client by `&mut`; the image also sends its
//! set-up commands and GET_GUEST_INFO on the same client while the cache lives inside the
//! event handler, so the client sits in a `RefCell` (one thread: the agent at CPL3).

use core::cell::RefCell;

use appliance::agent::{CommandClient, Waiting};
use appliance::memory::{MemError, TokenSource};
use hypercall::ring::{Notify, SharedMemory, Waiter};
use hypercall::token::MapToken;

/// GET_MAP_TOKEN on the command ring, one token per call.
pub struct SharedTokens<M: 'static, W: 'static, N: 'static> {
    client: &'static RefCell<CommandClient<M>>,
    waiting: &'static Waiting<W, N>,
}

impl<M, W, N> SharedTokens<M, W, N> {
    /// Tokens from `client`, waiting for replies as `waiting` says.
    pub fn new(
        client: &'static RefCell<CommandClient<M>>,
        waiting: &'static Waiting<W, N>,
    ) -> Self {
        SharedTokens { client, waiting }
    }
}

impl<M: SharedMemory, W: Waiter, N: Notify> TokenSource for SharedTokens<M, W, N> {
    fn next_token(&mut self) -> Result<MapToken, MemError> {
        let mut client = self
            .client
            .try_borrow_mut()
            .map_err(|_| MemError::Token("command client busy".into()))?;
        client
            .map_token(self.waiting)
            .map_err(|e| MemError::Token(alloc::format!("{e}")))
    }
}
