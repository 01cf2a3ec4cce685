//! The appliance VM's exit hook: its doorbell hypercalls.
//!
//! VERSION and FEATURES answer from `hypercall::discovery`; NOTIFY serves the command ring on
//! the caller's thread and wakes the ring service thread for the others ([`Waker::notify`]); MEM_MAP, MEM_UNMAP, MAP_RANGE and REVOKE_ALL go to the [`Pager`]; the agent call
//! (34) is a target's call and is `NotPermitted` here. Every result or error goes back in RAX
//! (`hypercall::error::encode`); a bad call never stops the appliance or the shim.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hypercall::call::{HypercallRegs, Request};
use hypercall::discovery::{ABI_VERSION, Features};
use hypercall::error::{HcError, encode};

use super::pager::Pager;
use super::rings::Waker;
use vmm::hook::{ExitContext, ExitHook, HookResult};
use vmm::memory::GuestRam;

/// The features this shim serves to an appliance (mappings are read-only: no
/// `WRITABLE_MAPS`; see [`super::pager`]).
pub const SERVED_FEATURES: Features = Features(
    Features::MAP_RANGE.0
        | Features::REVOKE_ALL.0
        | Features::NOTIFY.0
        | Features::RING_WAKE_FLAGS.0,
);

/// The exit hook of the appliance VM.
#[derive(Debug)]
pub struct ApplianceHook {
    pager: Arc<Pager>,
    waker: Waker,
    calls: AtomicU64,
    notifies: AtomicU64,
}

impl ApplianceHook {
    /// A hook serving `pager`'s page calls and waking the ring service through `waker`.
    pub fn new(pager: Arc<Pager>, waker: Waker) -> ApplianceHook {
        ApplianceHook {
            pager,
            waker,
            calls: AtomicU64::new(0),
            notifies: AtomicU64::new(0),
        }
    }

    /// Serves one hypercall with the caller's registers and RAM: what the doorbell exit does,
    /// callable directly (tests, other backends such as the host socket).
    pub fn call(&self, regs: &HypercallRegs, caller_ram: &GuestRam) -> Result<u64, HcError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match Request::decode(regs)? {
            Request::Version => Ok(u64::from(ABI_VERSION)),
            Request::Features => Ok(SERVED_FEATURES.0),
            Request::Notify { ring } => {
                self.notifies.fetch_add(1, Ordering::Relaxed);
                self.waker.notify(ring);
                Ok(0)
            }
            Request::Agent => Err(HcError::NotPermitted),
            request => self.pager.serve(&request, caller_ram),
        }
    }

    /// Hypercalls served (all kinds) and NOTIFY calls among them.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.notifies.load(Ordering::Relaxed),
        )
    }
}

impl ExitHook for ApplianceHook {
    fn hypercall(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let r = ctx.regs();
        let regs = HypercallRegs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
        };
        let result = self.call(&regs, ctx.ram());
        ctx.regs_mut().rax = encode(result);
        HookResult::Handled
    }
}
