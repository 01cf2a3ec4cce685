//! Issuing hypercalls: the [`Hypercalls`] backend trait and typed helpers on top of it.

use hypercall::call::{Hypercall, MAX_RANGE_PAGES};
use hypercall::error::decode;
use hypercall::token::MapToken;

use crate::DriverError;

/// A way to issue one hypercall: the doorbell port inside a VM ([`crate::port`]), or a
/// socket standing in for it on the host (`crate::host`, feature `std`).
///
/// Implementations only move registers; [`HypercallsExt`] decodes results.
pub trait Hypercalls {
    /// Issues hypercall `nr` with `args` in RBX, RCX, RDX, RSI, RDI and returns RAX as the
    /// host left it. `Err` only when the transport itself fails (never for the port).
    fn raw_call(&self, nr: u64, args: [u64; 5]) -> Result<u64, DriverError>;

    /// Puts `token` where the host reads it during the next map call and returns its
    /// guest-physical address (the `a0` argument of MEM_MAP and MAP_RANGE).
    fn stage_token(&self, token: &MapToken) -> Result<u64, DriverError>;
}

impl<T: Hypercalls + ?Sized> Hypercalls for &T {
    fn raw_call(&self, nr: u64, args: [u64; 5]) -> Result<u64, DriverError> {
        (**self).raw_call(nr, args)
    }
    fn stage_token(&self, token: &MapToken) -> Result<u64, DriverError> {
        (**self).stage_token(token)
    }
}

/// Typed hypercalls over any [`Hypercalls`] backend: RAX decoded with
/// [`hypercall::error::decode`], arguments placed as [`hypercall::call`] documents.
pub trait HypercallsExt: Hypercalls {
    /// Issues `call` with arguments `a0..a3` (RDI = 0) and decodes RAX.
    fn call(&self, call: Hypercall, args: [u64; 4]) -> Result<u64, DriverError> {
        let rax = self.raw_call(call.number(), [args[0], args[1], args[2], args[3], 0])?;
        Ok(decode(rax)?)
    }

    /// The host's ABI version.
    fn version(&self) -> Result<u64, DriverError> {
        self.call(Hypercall::Version, [0; 4])
    }

    /// The host's feature bits.
    fn features(&self) -> Result<hypercall::discovery::Features, DriverError> {
        self.call(Hypercall::Features, [0; 4])
            .map(hypercall::discovery::Features)
    }

    /// MEM_MAP: maps target page `target_gpa` at window page `window_gpa`.
    fn mem_map(
        &self,
        token: &MapToken,
        target_gpa: u64,
        window_gpa: u64,
    ) -> Result<(), DriverError> {
        let token_gpa = self.stage_token(token)?;
        expect(
            self.call(Hypercall::MemMap, [token_gpa, target_gpa, window_gpa, 0])?,
            0,
        )
    }

    /// MEM_UNMAP: drops the mapping at window page `window_gpa`.
    fn mem_unmap(&self, window_gpa: u64) -> Result<(), DriverError> {
        expect(self.call(Hypercall::MemUnmap, [window_gpa, 0, 0, 0])?, 0)
    }

    /// MAP_RANGE: maps `pages` target pages from `target_gpa` at `window_gpa` with one token.
    fn map_range(
        &self,
        token: &MapToken,
        target_gpa: u64,
        window_gpa: u64,
        pages: u64,
    ) -> Result<(), DriverError> {
        if pages == 0 || pages > MAX_RANGE_PAGES {
            return Err(DriverError::BadPageCount(pages));
        }
        let token_gpa = self.stage_token(token)?;
        let mapped = self.call(
            Hypercall::MapRange,
            [token_gpa, target_gpa, window_gpa, pages],
        )?;
        expect(mapped, pages)
    }

    /// REVOKE_ALL: drops every mapping in the window; returns how many pages were mapped.
    fn revoke_all(&self) -> Result<u64, DriverError> {
        self.call(Hypercall::RevokeAll, [0; 4])
    }

    /// NOTIFY: ring `ring` (or [`hypercall::call::NOTIFY_ALL_RINGS`]) needs service.
    fn notify(&self, ring: u64) -> Result<(), DriverError> {
        expect(self.call(Hypercall::Notify, [ring, 0, 0, 0])?, 0)
    }
}

impl<T: Hypercalls + ?Sized> HypercallsExt for T {}

fn expect(got: u64, expected: u64) -> Result<(), DriverError> {
    if got == expected {
        Ok(())
    } else {
        Err(DriverError::UnexpectedResult { expected, got })
    }
}

/// Wakes the shim with the NOTIFY hypercall: the [`Notify`](hypercall::ring::Notify) of the
/// appliance's ring ends. Ring producers and consumers call it only when the shim armed its
/// wake word (it sleeps), so the hot path makes no hypercall.
#[derive(Clone, Debug)]
pub struct HypercallNotify<H> {
    calls: H,
    ring: u64,
}

impl<H: Hypercalls> HypercallNotify<H> {
    /// Notifies ring `ring` (an index in the ring table, or
    /// [`NOTIFY_ALL_RINGS`](hypercall::call::NOTIFY_ALL_RINGS)) through `calls`.
    pub fn new(calls: H, ring: u64) -> Self {
        HypercallNotify { calls, ring }
    }
}

impl<H: Hypercalls> hypercall::ring::Notify for HypercallNotify<H> {
    fn notify(&self) {
        // A failed notification is harmless: the shim re-checks its rings on its own timeout.
        let _ = self.calls.notify(self.ring);
    }
}
