//! A target slot's link to the shim: its ring region, its map window, how to wait for the
//! shim, and the command client, opened over the memory [`kernel`](crate::kernel) mapped.

use alloc::boxed::Box;
use core::cell::RefCell;
use core::sync::atomic::AtomicU64;

use appliance::agent::{CommandClient, CommandError, OwnedReply, Waiting};
use guest_driver::port::{GuestMemory, PauseWaiter, PortHypercalls, open_in_vm};
use guest_driver::{Discovery, DriverError, HypercallNotify, MapWindow};
use hypercall::call::{NOTIFY_SLOT_RINGS, notify_arg};
use hypercall::discovery::{NO_VCPU, RingKind};
use hypercall::ring::{Region, RingError, WaitStrategy};
use protocol::{Command, Reply};

/// Staging buffer of the token for MEM_MAP (guest-physical = virtual).
static MAP_TOKEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Token buffer of the NOTIFY backend (never used for a token).
static NOTIFY_TOKEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// How the agent wakes the shim: the NOTIFY hypercall.
pub type Notifier = HypercallNotify<&'static PortHypercalls>;
/// How the agent waits for the shim.
pub type Wait = Waiting<PauseWaiter, Notifier>;
/// The command client on a slot's command ring.
pub type Client = CommandClient<GuestMemory>;
/// A slot's map window.
pub type Window = MapWindow<PortHypercalls, GuestMemory>;

/// Why a slot's link could not be opened.
#[derive(Debug)]
pub enum LinkError {
    /// The ring region or the map window is unusable.
    Open(DriverError),
    /// A ring of the region is missing or corrupt.
    Ring(RingError),
}

impl core::fmt::Display for LinkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LinkError::Open(e) => write!(f, "cannot open the ring region or map window: {e}"),
            LinkError::Ring(e) => write!(f, "ring: {e}"),
        }
    }
}

/// One target's link to the shim, open. The window, waiters and client live for the rest of
/// the program (leaked: a few KiB per slot ever opened), so handlers may borrow them for good.
pub struct Link {
    /// Where the ring region and the map window are.
    pub discovery: Discovery,
    /// The ring region (event, reply, command and log rings).
    pub region: Region<GuestMemory>,
    /// The map window (target pages, read-only, after a token and a map hypercall).
    pub window: &'static Window,
    /// How the event loop waits (its NOTIFY names every ring of the slot).
    pub waiting: &'static Wait,
    /// How the command client waits (its NOTIFY names the command ring: the shim serves a
    /// command on the spot).
    pub commands: &'static Wait,
    /// The command client (in a `RefCell`: the page cache's token source shares it).
    pub client: &'static RefCell<Client>,
}

impl Link {
    /// Sends `command` and waits for its reply.
    pub fn call(&self, command: &Command<'_>) -> Result<OwnedReply, CommandError> {
        self.client.borrow_mut().call(command, self.commands)
    }

    /// Sends `command` and checks that the shim accepted it (any reply but an error code).
    pub fn call_ok(&self, command: &Command<'_>) -> Result<(), CommandError> {
        match self.call(command)?.decode()? {
            Ok(_) => Ok(()),
            Err(code) => Err(CommandError::Refused(code)),
        }
    }

    /// GET_GUEST_INFO: the target's TSC frequency (the host clock the agent's TSC runs on),
    /// if the shim reports it.
    pub fn tsc_hz(&self) -> Result<Option<u64>, CommandError> {
        Ok(match self.call(&Command::GetGuestInfo)?.decode() {
            Ok(Ok(Reply::GuestInfo(info))) if info.tsc_speed > 0 => Some(info.tsc_speed),
            _ => None,
        })
    }
}

/// Opens the ring region and the map window of target slot `slot` described by `discovery`
/// (slot 0: `Discovery::from_boot_info`): the rings, the window, the waiters (their NOTIFY
/// names the slot) and the command client.
pub fn open_slot(discovery: Discovery, slot: u32) -> Result<Link, LinkError> {
    let calls =
        PortHypercalls::new(&MAP_TOKEN, (&raw const MAP_TOKEN) as u64).map_err(LinkError::Open)?;
    let notify_calls: &'static PortHypercalls = Box::leak(Box::new(
        PortHypercalls::new(&NOTIFY_TOKEN, (&raw const NOTIFY_TOKEN) as u64)
            .map_err(LinkError::Open)?,
    ));
    // The kernel maps exactly the areas it validated; refuse any other (a slot the directory
    // names now but did not name at boot).
    if !crate::kernel::is_mapped(discovery.ring_gpa, discovery.ring_size)
        || !crate::kernel::is_mapped(discovery.window_gpa, discovery.window_size)
    {
        return Err(LinkError::Open(DriverError::BadBootInfo(
            "slot areas not mapped",
        )));
    }
    // SAFETY: the kernel mapped this ring region and window virtual = physical,
    // user-writable, for the rest of the program (checked just above); only this slot's link
    // touches them.
    let (region, window) = unsafe {
        open_in_vm(
            &discovery,
            discovery.ring_gpa as *mut u8,
            discovery.window_gpa as *mut u8,
            calls,
        )
    }
    .map_err(LinkError::Open)?;
    let window: &'static Window = Box::leak(Box::new(window));
    let wait = |ring| -> &'static Wait {
        Box::leak(Box::new(Waiting::new(
            WaitStrategy::default(),
            // Nothing else runs on this vCPU: a short burst keeps a "sleep" well below an
            // event round trip.
            PauseWaiter { pauses: 16 },
            HypercallNotify::new(notify_calls, notify_arg(slot, ring)),
        )))
    };
    let waiting = wait(NOTIFY_SLOT_RINGS);
    let command_ring = region
        .ring_index(RingKind::Command, NO_VCPU)
        .map_err(LinkError::Ring)?;
    let commands = wait(command_ring);
    let client: &'static RefCell<Client> = Box::leak(Box::new(RefCell::new(CommandClient::new(
        region
            .producer_for(RingKind::Command, NO_VCPU)
            .map_err(LinkError::Ring)?,
        region
            .consumer_for(RingKind::CommandReply, NO_VCPU)
            .map_err(LinkError::Ring)?,
    ))));
    Ok(Link {
        discovery,
        region,
        window,
        waiting,
        commands,
        client,
    })
}
