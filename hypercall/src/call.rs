//! Hypercall numbers and the register convention.
//!
//! # Register convention
//! A hypercall is a 32-bit `out` to [`HYPERCALL_DOORBELL`] (`out 0xe4, eax`): `vmcall` never
//! reaches a userspace VMM on stock KVM, port I/O always does. The caller loads
//!
//! | register | meaning |
//! |---|---|
//! | RAX | the hypercall number ([`Hypercall`]) |
//! | RBX, RCX, RDX, RSI | arguments `a0`..`a3` |
//! | RDI | the agent call's sub-function ([`AGENT_GUEST_REQUEST`]), otherwise ignored |
//!
//! and the VMM writes the result to RAX before the guest resumes: a non-negative value on
//! success, a negative [`HcError`] on failure (see [`crate::error`]). Every other register
//! is preserved.
//!
//! # Numbers
//! The seed's numbers (KVMI v4, `include/uapi/linux/kvm_para.h`) are kept: [`Hypercall::MemMap`]
//! = 32, [`Hypercall::MemUnmap`] = 33, [`Hypercall::Agent`] = 34 (Xen's `hvm_op`). Our own
//! calls live in a separate range starting at [`OWN_RANGE_BASE`] (`0x4b56_0000`, "KV" in the
//! high bytes) so they can never collide with KVM's numbering. Zero and every other value are
//! invalid and answered with [`HcError::NoSys`].
//!
//! [`HYPERCALL_DOORBELL`]: crate::ports::HYPERCALL_DOORBELL

use crate::error::HcError;

/// First number of this project's own hypercall range.
pub const OWN_RANGE_BASE: u64 = 0x4b56_0000;
/// Number of values reserved for this project's own range (`OWN_RANGE_BASE..OWN_RANGE_END`).
pub const OWN_RANGE_LEN: u64 = 0x100;
/// One past the last number of this project's own range.
pub const OWN_RANGE_END: u64 = OWN_RANGE_BASE + OWN_RANGE_LEN;

/// RDI value of the agent call: Xen's `HVMOP_guest_request_vm_event`.
pub const AGENT_GUEST_REQUEST: u64 = 24;
/// RSI value of the agent call (64-bit callers).
pub const AGENT_GUEST_REQUEST_ARG: u64 = 0;

/// The most pages one [`Hypercall::MapRange`] call may map.
pub const MAX_RANGE_PAGES: u64 = 512;
/// Size of a page mapped by the map calls.
pub const PAGE_SIZE: u64 = 4096;

/// [`Hypercall::Notify`] argument meaning "every ring of every slot may need service".
pub const NOTIFY_ALL_RINGS: u64 = u64::MAX;
/// The ring part of a [`Hypercall::Notify`] argument meaning "every ring of this slot".
pub const NOTIFY_SLOT_RINGS: u32 = u32::MAX;

/// The [`Hypercall::Notify`] argument naming ring `ring` (or [`NOTIFY_SLOT_RINGS`]) of target
/// slot `slot` (see [`crate::directory`]): `slot << 32 | ring`. Slot 0's arguments are plain
/// ring indexes, as before slots existed.
pub const fn notify_arg(slot: u32, ring: u32) -> u64 {
    ((slot as u64) << 32) | ring as u64
}

/// What a [`Hypercall::Notify`] argument names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyTarget {
    /// Every ring of every slot ([`NOTIFY_ALL_RINGS`]).
    All,
    /// Every ring of one slot.
    Slot(u32),
    /// One ring of one slot.
    Ring {
        /// The target slot.
        slot: u32,
        /// The ring index in that slot's ring region.
        ring: u32,
    },
}

impl NotifyTarget {
    /// Decodes a [`Hypercall::Notify`] argument (every value means something; a slot or ring
    /// that does not exist is the shim's to ignore).
    pub const fn of(arg: u64) -> NotifyTarget {
        if arg == NOTIFY_ALL_RINGS {
            return NotifyTarget::All;
        }
        let (slot, ring) = ((arg >> 32) as u32, arg as u32);
        if ring == NOTIFY_SLOT_RINGS {
            NotifyTarget::Slot(slot)
        } else {
            NotifyTarget::Ring { slot, ring }
        }
    }
}

/// A hypercall number, as the guest puts it in RAX.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hypercall {
    /// `KVM_HC_MEM_MAP`: map one target page into the caller's map window.
    /// `a0` = guest-physical address of the 32-byte [`MapToken`](crate::token::MapToken) in
    /// the caller's RAM, `a1` = target guest-physical address, `a2` = window guest-physical
    /// address (both page-aligned). Returns 0.
    MemMap = 32,
    /// `KVM_HC_MEM_UNMAP`: drop the mapping at window address `a0`; the window page reads as
    /// zeroes afterwards. Returns 0.
    MemUnmap = 33,
    /// `KVM_HC_XEN_HVM_OP`: the KVMI agent call from a target (RDI = [`AGENT_GUEST_REQUEST`],
    /// RSI = [`AGENT_GUEST_REQUEST_ARG`]); raises a KVMI hypercall event. Returns 0.
    Agent = 34,
    /// Returns the ABI version ([`crate::discovery::ABI_VERSION`]).
    Version = OWN_RANGE_BASE + 1,
    /// Returns the feature bitmap ([`crate::discovery::Features`]).
    Features = OWN_RANGE_BASE + 2,
    /// Map a range of target pages with one token: `a0` = token address, `a1` = first target
    /// page, `a2` = first window page, `a3` = page count (1..=[`MAX_RANGE_PAGES`]).
    /// Returns the number of pages mapped (= `a3`).
    MapRange = OWN_RANGE_BASE + 3,
    /// Drop every mapping in the caller's map windows (every slot's). Returns the number of
    /// pages unmapped.
    RevokeAll = OWN_RANGE_BASE + 4,
    /// Wake the shim: ring `a0` needs service ([`notify_arg`]: a slot and an index into that
    /// slot's ring table, or [`NOTIFY_ALL_RINGS`]). Returns 0.
    Notify = OWN_RANGE_BASE + 5,
}

impl Hypercall {
    /// Every defined hypercall, for tables and tests.
    pub const ALL: [Hypercall; 8] = [
        Hypercall::MemMap,
        Hypercall::MemUnmap,
        Hypercall::Agent,
        Hypercall::Version,
        Hypercall::Features,
        Hypercall::MapRange,
        Hypercall::RevokeAll,
        Hypercall::Notify,
    ];

    /// The number the guest loads into RAX.
    pub const fn number(self) -> u64 {
        self as u64
    }

    /// Whether the call is in this project's own range (not a seed number).
    pub const fn is_own(self) -> bool {
        let n = self.number();
        n >= OWN_RANGE_BASE && n < OWN_RANGE_END
    }
}

impl From<Hypercall> for u64 {
    fn from(call: Hypercall) -> u64 {
        call.number()
    }
}

impl TryFrom<u64> for Hypercall {
    type Error = HcError;

    /// Decodes RAX; zero and unknown numbers are [`HcError::NoSys`].
    fn try_from(nr: u64) -> Result<Self, HcError> {
        Hypercall::ALL
            .into_iter()
            .find(|call| call.number() == nr)
            .ok_or(HcError::NoSys)
    }
}

/// The registers of one hypercall, as the VMM reads them at the doorbell exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallRegs {
    /// RAX: the number.
    pub rax: u64,
    /// RBX: `a0`.
    pub rbx: u64,
    /// RCX: `a1`.
    pub rcx: u64,
    /// RDX: `a2`.
    pub rdx: u64,
    /// RSI: `a3` (and the agent call's second Xen argument).
    pub rsi: u64,
    /// RDI: the agent call's sub-function.
    pub rdi: u64,
}

impl HypercallRegs {
    /// The arguments `a0`..`a3` in order.
    pub const fn args(&self) -> [u64; 4] {
        [self.rbx, self.rcx, self.rdx, self.rsi]
    }

    /// Decodes the number, and for the agent call checks the Xen sub-function registers.
    pub fn call(&self) -> Result<Hypercall, HcError> {
        let call = Hypercall::try_from(self.rax)?;
        if call == Hypercall::Agent
            && (self.rdi != AGENT_GUEST_REQUEST || self.rsi != AGENT_GUEST_REQUEST_ARG)
        {
            return Err(HcError::InvalidArgument);
        }
        Ok(call)
    }
}

/// A decoded, argument-checked hypercall: what the VMM dispatches on. Decoding checks what
/// the registers alone can tell (numbers, page alignment, counts, address overflow); the
/// token, the target's memory size and the caller's window are the VMM's to check
/// ([`check_window`] helps with the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// [`Hypercall::MemMap`].
    MemMap {
        /// Guest-physical address of the token in the caller's RAM (8-byte aligned).
        token_gpa: u64,
        /// Target page (page-aligned).
        target_gpa: u64,
        /// Window page (page-aligned).
        window_gpa: u64,
    },
    /// [`Hypercall::MemUnmap`].
    MemUnmap {
        /// Window page (page-aligned).
        window_gpa: u64,
    },
    /// [`Hypercall::Agent`] (sub-function already checked).
    Agent,
    /// [`Hypercall::Version`].
    Version,
    /// [`Hypercall::Features`].
    Features,
    /// [`Hypercall::MapRange`].
    MapRange {
        /// Guest-physical address of the token in the caller's RAM (8-byte aligned).
        token_gpa: u64,
        /// First target page (page-aligned).
        target_gpa: u64,
        /// First window page (page-aligned).
        window_gpa: u64,
        /// Number of pages, 1..=[`MAX_RANGE_PAGES`].
        pages: u64,
    },
    /// [`Hypercall::RevokeAll`].
    RevokeAll,
    /// [`Hypercall::Notify`].
    Notify {
        /// Ring index, or [`NOTIFY_ALL_RINGS`].
        ring: u64,
    },
}

fn page_aligned(gpa: u64) -> Result<u64, HcError> {
    if gpa.is_multiple_of(PAGE_SIZE) {
        Ok(gpa)
    } else {
        Err(HcError::Unaligned)
    }
}

fn token_address(gpa: u64) -> Result<u64, HcError> {
    // The 32-byte token must not wrap around the address space; 8-byte aligned.
    if !gpa.is_multiple_of(8) {
        return Err(HcError::Unaligned);
    }
    gpa.checked_add(crate::token::TOKEN_SIZE as u64)
        .ok_or(HcError::Fault)?;
    Ok(gpa)
}

impl Request {
    /// Decodes and checks the registers of a doorbell exit.
    pub fn decode(regs: &HypercallRegs) -> Result<Request, HcError> {
        let [a0, a1, a2, a3] = regs.args();
        Ok(match regs.call()? {
            Hypercall::MemMap => Request::MemMap {
                token_gpa: token_address(a0)?,
                target_gpa: page_aligned(a1)?,
                window_gpa: page_aligned(a2)?,
            },
            Hypercall::MemUnmap => Request::MemUnmap {
                window_gpa: page_aligned(a0)?,
            },
            Hypercall::Agent => Request::Agent,
            Hypercall::Version => Request::Version,
            Hypercall::Features => Request::Features,
            Hypercall::MapRange => {
                if a3 == 0 || a3 > MAX_RANGE_PAGES {
                    return Err(HcError::TooManyPages);
                }
                let bytes = a3 * PAGE_SIZE;
                let target_gpa = page_aligned(a1)?;
                let window_gpa = page_aligned(a2)?;
                target_gpa.checked_add(bytes).ok_or(HcError::OutOfRange)?;
                window_gpa
                    .checked_add(bytes)
                    .ok_or(HcError::OutsideWindow)?;
                Request::MapRange {
                    token_gpa: token_address(a0)?,
                    target_gpa,
                    window_gpa,
                    pages: a3,
                }
            }
            Hypercall::RevokeAll => Request::RevokeAll,
            Hypercall::Notify => Request::Notify { ring: a0 },
        })
    }

    /// The registers that carry this request (what a caller loads before the doorbell; unused
    /// argument registers zero). The inverse of [`Request::decode`].
    pub fn encode(&self) -> HypercallRegs {
        let regs = |call: Hypercall, a: [u64; 4]| HypercallRegs {
            rax: call.number(),
            rbx: a[0],
            rcx: a[1],
            rdx: a[2],
            rsi: a[3],
            rdi: 0,
        };
        match *self {
            Request::MemMap {
                token_gpa,
                target_gpa,
                window_gpa,
            } => regs(Hypercall::MemMap, [token_gpa, target_gpa, window_gpa, 0]),
            Request::MemUnmap { window_gpa } => regs(Hypercall::MemUnmap, [window_gpa, 0, 0, 0]),
            Request::Agent => HypercallRegs {
                rdi: AGENT_GUEST_REQUEST,
                rsi: AGENT_GUEST_REQUEST_ARG,
                ..regs(Hypercall::Agent, [0; 4])
            },
            Request::Version => regs(Hypercall::Version, [0; 4]),
            Request::Features => regs(Hypercall::Features, [0; 4]),
            Request::MapRange {
                token_gpa,
                target_gpa,
                window_gpa,
                pages,
            } => regs(
                Hypercall::MapRange,
                [token_gpa, target_gpa, window_gpa, pages],
            ),
            Request::RevokeAll => regs(Hypercall::RevokeAll, [0; 4]),
            Request::Notify { ring } => regs(Hypercall::Notify, [ring, 0, 0, 0]),
        }
    }
}

/// Checks that `pages` pages from `gpa` lie inside the window `base..base + size`.
pub fn check_window(gpa: u64, pages: u64, base: u64, size: u64) -> Result<(), HcError> {
    let end = pages
        .checked_mul(PAGE_SIZE)
        .and_then(|b| gpa.checked_add(b));
    let window_end = base.checked_add(size);
    match (end, window_end) {
        (Some(end), Some(window_end)) if gpa >= base && end <= window_end => Ok(()),
        _ => Err(HcError::OutsideWindow),
    }
}

const _: () = {
    assert!(Hypercall::MemMap.number() == 32);
    assert!(Hypercall::MemUnmap.number() == 33);
    assert!(Hypercall::Agent.number() == 34);
    assert!(!Hypercall::Agent.is_own());
    assert!(Hypercall::Notify.is_own());
    // The own range fits in the 32 bits a 32-bit `out` of EAX can carry.
    assert!(OWN_RANGE_END <= u32::MAX as u64);
};

#[cfg(test)]
mod tests {
    #[test]
    fn notify_arguments_name_slots_and_rings() {
        assert_eq!(NotifyTarget::of(NOTIFY_ALL_RINGS), NotifyTarget::All);
        // A plain ring index is slot 0's ring (the single-target encoding).
        assert_eq!(NotifyTarget::of(5), NotifyTarget::Ring { slot: 0, ring: 5 });
        assert_eq!(
            NotifyTarget::of(notify_arg(3, 7)),
            NotifyTarget::Ring { slot: 3, ring: 7 }
        );
        assert_eq!(
            NotifyTarget::of(notify_arg(2, NOTIFY_SLOT_RINGS)),
            NotifyTarget::Slot(2)
        );
    }

    #[test]
    fn encode_is_the_inverse_of_decode() {
        let requests = [
            Request::MemMap {
                token_gpa: 0x1008,
                target_gpa: 0x20_0000,
                window_gpa: 0xC100_0000,
            },
            Request::MemUnmap {
                window_gpa: 0xC100_1000,
            },
            Request::Agent,
            Request::Version,
            Request::Features,
            Request::MapRange {
                token_gpa: 0x2000,
                target_gpa: 0x40_0000,
                window_gpa: 0xC120_0000,
                pages: MAX_RANGE_PAGES,
            },
            Request::RevokeAll,
            Request::Notify { ring: 3 },
        ];
        for request in requests {
            assert_eq!(
                Request::decode(&request.encode()),
                Ok(request),
                "{request:?}"
            );
        }
    }

    use super::*;

    #[test]
    fn numbers_round_trip_and_unknowns_are_nosys() {
        for call in Hypercall::ALL {
            assert_eq!(Hypercall::try_from(call.number()), Ok(call));
            assert_eq!(u64::from(call), call as u64);
        }
        for nr in [
            0,
            1,
            31,
            35,
            OWN_RANGE_BASE,
            OWN_RANGE_BASE + 6,
            OWN_RANGE_END,
            u64::MAX,
        ] {
            assert_eq!(Hypercall::try_from(nr), Err(HcError::NoSys), "{nr:#x}");
        }
    }

    #[test]
    fn numbers_are_unique() {
        for (i, a) in Hypercall::ALL.iter().enumerate() {
            for b in &Hypercall::ALL[i + 1..] {
                assert_ne!(a.number(), b.number());
            }
        }
    }

    #[test]
    fn requests_are_decoded_and_checked() {
        let regs = |rax: u64, a: [u64; 4]| HypercallRegs {
            rax,
            rbx: a[0],
            rcx: a[1],
            rdx: a[2],
            rsi: a[3],
            rdi: 0,
        };
        assert_eq!(
            Request::decode(&regs(32, [0x2000, 0x5000, 0x8000_0000, 0])),
            Ok(Request::MemMap {
                token_gpa: 0x2000,
                target_gpa: 0x5000,
                window_gpa: 0x8000_0000
            })
        );
        assert_eq!(
            Request::decode(&regs(32, [0x2004, 0x5000, 0, 0])),
            Err(HcError::Unaligned)
        );
        assert_eq!(
            Request::decode(&regs(32, [u64::MAX - 7, 0, 0, 0])),
            Err(HcError::Fault)
        );
        assert_eq!(
            Request::decode(&regs(32, [0x2000, 0x5001, 0, 0])),
            Err(HcError::Unaligned)
        );
        assert_eq!(
            Request::decode(&regs(33, [0x1234, 0, 0, 0])),
            Err(HcError::Unaligned)
        );
        let range = OWN_RANGE_BASE + 3;
        assert_eq!(
            Request::decode(&regs(range, [0x2000, 0x10_0000, 0x8000_0000, 512])),
            Ok(Request::MapRange {
                token_gpa: 0x2000,
                target_gpa: 0x10_0000,
                window_gpa: 0x8000_0000,
                pages: 512
            })
        );
        for pages in [0, 513, u64::MAX] {
            assert_eq!(
                Request::decode(&regs(range, [0x2000, 0, 0, pages])),
                Err(HcError::TooManyPages)
            );
        }
        assert_eq!(
            Request::decode(&regs(range, [0x2000, u64::MAX - 4095, 0, 2])),
            Err(HcError::OutOfRange)
        );
        assert_eq!(Request::decode(&regs(0, [0; 4])), Err(HcError::NoSys));
        assert_eq!(
            Request::decode(&regs(OWN_RANGE_BASE + 5, [3, 0, 0, 0])),
            Ok(Request::Notify { ring: 3 })
        );
    }

    #[test]
    fn window_bounds() {
        let (base, size) = (0x8000_0000, 16 * PAGE_SIZE);
        assert_eq!(check_window(base, 16, base, size), Ok(()));
        assert_eq!(
            check_window(base + PAGE_SIZE, 16, base, size),
            Err(HcError::OutsideWindow)
        );
        assert_eq!(
            check_window(base - PAGE_SIZE, 1, base, size),
            Err(HcError::OutsideWindow)
        );
        assert_eq!(
            check_window(base, u64::MAX, base, size),
            Err(HcError::OutsideWindow)
        );
    }

    #[test]
    fn agent_call_checks_xen_subfunction() {
        let mut regs = HypercallRegs {
            rax: 34,
            rdi: 24,
            rsi: 0,
            ..Default::default()
        };
        assert_eq!(regs.call(), Ok(Hypercall::Agent));
        regs.rdi = 25;
        assert_eq!(regs.call(), Err(HcError::InvalidArgument));
        regs = HypercallRegs {
            rax: 32,
            rbx: 1,
            rcx: 2,
            rdx: 3,
            rsi: 4,
            rdi: 9,
        };
        assert_eq!(regs.call(), Ok(Hypercall::MemMap));
        assert_eq!(regs.args(), [1, 2, 3, 4]);
    }
}
