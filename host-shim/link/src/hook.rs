//! The appliance VM's exit hook: its doorbell hypercalls.
//!
//! One appliance guards one target per slot (see `hypercall::directory`); each slot has its
//! own ring service and pager. VERSION and FEATURES answer from `hypercall::discovery`;
//! NOTIFY names a slot and a ring (`hypercall::call::NotifyTarget`): the slot's command ring
//! is served on the caller's thread and the slot's ring service thread is woken for the
//! others ([`Waker::notify`]); MEM_MAP, MEM_UNMAP and MAP_RANGE go to the [`Pager`] of the
//! slot whose window holds the window address, REVOKE_ALL to every slot's; the agent call
//! (34) is a target's call and is `NotPermitted` here. Every result or error goes back in RAX
//! (`hypercall::error::encode`); a bad call never stops the appliance or the shim.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use hypercall::call::{HypercallRegs, NOTIFY_ALL_RINGS, NotifyTarget, Request};
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

/// What serves one slot: its pager (whose window is the slot's) and its ring service's waker.
#[derive(Clone, Debug)]
pub struct SlotRoute {
    /// The slot's pager.
    pub pager: Arc<Pager>,
    /// The slot's ring service.
    pub waker: Waker,
}

/// The exit hook of the appliance VM.
#[derive(Debug)]
pub struct ApplianceHook {
    slots: RwLock<Vec<Option<SlotRoute>>>,
    calls: AtomicU64,
    notifies: AtomicU64,
}

impl ApplianceHook {
    /// A hook for one target (slot 0): serving `pager`'s page calls and waking the ring
    /// service through `waker`.
    pub fn new(pager: Arc<Pager>, waker: Waker) -> ApplianceHook {
        let hook = ApplianceHook::with_slots(1);
        hook.set_slot(0, Some(SlotRoute { pager, waker }));
        hook
    }

    /// A hook for `slots` slots, all empty (a call for an empty slot is refused).
    pub fn with_slots(slots: u32) -> ApplianceHook {
        ApplianceHook {
            slots: RwLock::new(vec![None; slots as usize]),
            calls: AtomicU64::new(0),
            notifies: AtomicU64::new(0),
        }
    }

    /// Attaches (`Some`) or detaches (`None`) slot `slot`'s route; out-of-range slots are
    /// ignored.
    pub fn set_slot(&self, slot: u32, route: Option<SlotRoute>) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(slot as usize) {
            *s = route;
        }
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<SlotRoute>>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    /// NOTIFY: wakes the named slot's ring service (every slot's for [`NOTIFY_ALL_RINGS`]);
    /// a slot that is empty or does not exist is ignored.
    fn notify(&self, arg: u64) {
        let routes = self.routes();
        match NotifyTarget::of(arg) {
            NotifyTarget::All => routes
                .iter()
                .flatten()
                .for_each(|r| r.waker.notify(NOTIFY_ALL_RINGS)),
            NotifyTarget::Slot(slot) => {
                if let Some(Some(r)) = routes.get(slot as usize) {
                    r.waker.notify(NOTIFY_ALL_RINGS);
                }
            }
            NotifyTarget::Ring { slot, ring } => {
                if let Some(Some(r)) = routes.get(slot as usize) {
                    r.waker.notify(u64::from(ring));
                }
            }
        }
    }

    /// A page call: to the pager whose window holds the request's window address; REVOKE_ALL
    /// to every pager (the pages unmapped are summed).
    fn page_call(&self, request: &Request, caller_ram: &GuestRam) -> Result<u64, HcError> {
        let window_gpa = match *request {
            Request::MemMap { window_gpa, .. }
            | Request::MapRange { window_gpa, .. }
            | Request::MemUnmap { window_gpa } => window_gpa,
            Request::RevokeAll => {
                let pagers: Vec<Arc<Pager>> = self
                    .routes()
                    .iter()
                    .flatten()
                    .map(|r| r.pager.clone())
                    .collect();
                let mut total = 0;
                for pager in pagers {
                    total += pager.serve(request, caller_ram)?;
                }
                return Ok(total);
            }
            _ => return Err(HcError::InvalidArgument),
        };
        // A window address in no slot's window goes to the first attached slot's pager, whose
        // checks refuse it (OutsideWindow) and count the refusal.
        let pager = {
            let routes = self.routes();
            let mut attached = routes.iter().flatten();
            let first = attached.clone().next().map(|r| r.pager.clone());
            attached
                .find(|r| r.pager.window_contains(window_gpa))
                .map(|r| r.pager.clone())
                .or(first)
                .ok_or(HcError::OutsideWindow)?
        };
        pager.serve(request, caller_ram)
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
                self.notify(ring);
                Ok(0)
            }
            Request::Agent => Err(HcError::NotPermitted),
            request => self.page_call(&request, caller_ram),
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
