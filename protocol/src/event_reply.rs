//! A tool's answer to an event: an action plus the event-specific reply data.

use crate::error::ProtocolError;
use crate::event::EventKind;

/// What the host does when the tool answers an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Carry on with the operation that caused the event (v3 `ALLOW`, v4 `CONTINUE`).
    Continue,
    /// Re-enter the guest without finishing the operation (the tool changed RIP or rights).
    Retry,
    /// Stop the guest ungracefully.
    Crash,
    /// The tool emulated the operation itself: drop the access and re-enter the guest (v3
    /// `SKIP`; a project extension on the v4 wire).
    Skip,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 4] = [Self::Continue, Self::Retry, Self::Crash, Self::Skip];
}

/// A set of actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ActionSet(u8);

impl ActionSet {
    const fn bit(action: Action) -> u8 {
        match action {
            Action::Continue => 1,
            Action::Retry => 2,
            Action::Crash => 4,
            Action::Skip => 8,
        }
    }

    /// A set of the given actions.
    pub const fn of(actions: &[Action]) -> ActionSet {
        let mut bits = 0;
        let mut i = 0;
        while i < actions.len() {
            bits |= Self::bit(actions[i]);
            i += 1;
        }
        ActionSet(bits)
    }

    /// Whether `action` is in the set.
    pub const fn contains(self, action: Action) -> bool {
        self.0 & Self::bit(action) != 0
    }
}

/// The actions an event accepts: v4's (docs/protocol.md), plus `SKIP` where "the tool emulated
/// it" makes sense (page faults, breakpoints, MSR writes, single steps), plus `CONTINUE` for
/// `PAUSE_VCPU` (as from v5: resume after the pause). `CRASH` is always accepted.
pub const fn accepted_actions(event: EventKind) -> ActionSet {
    use Action::*;
    match event {
        EventKind::PauseVcpu => ActionSet::of(&[Continue, Retry, Crash]),
        EventKind::Cr
        | EventKind::Xsetbv
        | EventKind::Hypercall
        | EventKind::Trap
        | EventKind::Descriptor
        | EventKind::CreateVcpu => ActionSet::of(&[Continue, Crash]),
        EventKind::Msr => ActionSet::of(&[Continue, Crash, Skip]),
        EventKind::Breakpoint | EventKind::PageFault | EventKind::Singlestep => {
            ActionSet::of(&[Continue, Retry, Crash, Skip])
        }
    }
}

/// Check that `event` accepts `action` (otherwise `-KVM_EINVAL`).
pub fn check_action(event: EventKind, action: Action) -> Result<(), ProtocolError> {
    if accepted_actions(event).contains(action) {
        Ok(())
    } else {
        Err(ProtocolError::ActionNotAccepted { event, action })
    }
}

/// Largest `ctx_data` of a page-fault reply (`KVMI_CTX_DATA_SIZE`).
pub const PF_CTX_DATA_SIZE: usize = 256;

/// The reply data of a page-fault event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PageFaultReply<'a> {
    /// Emulate a REP-prefixed instruction only once (no further PF events for it).
    pub trap_access: bool,
    /// With `CONTINUE`: bytes emulated reads see instead of guest memory (≤ 256 bytes).
    pub ctx_data: &'a [u8],
}

/// The event-specific part of an event reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventReplyData<'a> {
    /// The event has no reply data.
    None,
    /// CR event: the value to load with `CONTINUE` (the old value denies the write).
    Cr {
        /// The value to load.
        new_val: u64,
    },
    /// MSR event: the value to write with `CONTINUE` (the old value denies the write).
    Msr {
        /// The value to write.
        new_val: u64,
    },
    /// Page-fault event reply.
    PageFault(PageFaultReply<'a>),
}

impl EventReplyData<'_> {
    /// Whether this data is the shape the reply to `event` must have.
    pub const fn fits(&self, event: EventKind) -> bool {
        matches!(
            (self, event),
            (Self::Cr { .. }, EventKind::Cr)
                | (Self::Msr { .. }, EventKind::Msr)
                | (Self::PageFault(_), EventKind::PageFault)
        ) || (matches!(self, Self::None)
            && !matches!(event, EventKind::Cr | EventKind::Msr | EventKind::PageFault))
    }
}

/// A tool's reply to an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventReply<'a> {
    /// The event being answered (replies are matched to events by `seq`).
    pub event: EventKind,
    /// What the host should do.
    pub action: Action,
    /// Event-specific reply data; must fit `event` ([`EventReplyData::fits`]).
    pub data: EventReplyData<'a>,
}

impl EventReply<'_> {
    /// Check the action is accepted, the data fits the event and the PF context is ≤ 256 B.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        check_action(self.event, self.action)?;
        if !self.data.fits(self.event) {
            return Err(ProtocolError::InvalidValue {
                field: "event reply data",
                value: u64::from(self.event.number()),
            });
        }
        if let EventReplyData::PageFault(pf) = self.data
            && pf.ctx_data.len() > PF_CTX_DATA_SIZE
        {
            return Err(ProtocolError::InvalidValue {
                field: "ctx_size",
                value: pf.ctx_data.len() as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_is_always_accepted() {
        for e in EventKind::ALL {
            assert!(accepted_actions(e).contains(Action::Crash), "{e:?}");
        }
    }

    #[test]
    fn accepted_actions_follow_the_reference() {
        use Action::*;
        assert!(check_action(EventKind::Cr, Continue).is_ok());
        assert_eq!(
            check_action(EventKind::Cr, Retry),
            Err(ProtocolError::ActionNotAccepted {
                event: EventKind::Cr,
                action: Retry
            })
        );
        assert_eq!(check_action(EventKind::Cr, Skip).unwrap_err().code(), -22);
        assert!(check_action(EventKind::Msr, Skip).is_ok());
        assert!(check_action(EventKind::Msr, Retry).is_err());
        for e in [
            EventKind::PageFault,
            EventKind::Breakpoint,
            EventKind::Singlestep,
        ] {
            for a in Action::ALL {
                assert!(check_action(e, a).is_ok(), "{e:?} {a:?}");
            }
        }
        assert!(check_action(EventKind::PauseVcpu, Retry).is_ok());
        assert!(check_action(EventKind::PauseVcpu, Skip).is_err());
        // The v4 text: TRAP, CREATE_VCPU and HYPERCALL accept CONTINUE and CRASH only.
        for e in [EventKind::Trap, EventKind::CreateVcpu, EventKind::Hypercall] {
            assert!(check_action(e, Continue).is_ok(), "{e:?}");
            assert!(check_action(e, Crash).is_ok(), "{e:?}");
            assert!(check_action(e, Retry).is_err(), "{e:?}");
            assert!(check_action(e, Skip).is_err(), "{e:?}");
        }
        assert!(check_action(EventKind::Hypercall, Skip).is_err());
    }

    #[test]
    fn reply_data_must_fit_the_event() {
        let reply = |event, data| EventReply {
            event,
            action: Action::Continue,
            data,
        };
        assert!(
            reply(EventKind::Cr, EventReplyData::Cr { new_val: 1 })
                .validate()
                .is_ok()
        );
        assert!(
            reply(EventKind::Cr, EventReplyData::None)
                .validate()
                .is_err()
        );
        assert!(
            reply(EventKind::Msr, EventReplyData::Cr { new_val: 1 })
                .validate()
                .is_err()
        );
        assert!(
            reply(EventKind::Trap, EventReplyData::None)
                .validate()
                .is_ok()
        );
        assert!(
            reply(EventKind::Trap, EventReplyData::Msr { new_val: 0 })
                .validate()
                .is_err()
        );
        let big = [0u8; 257];
        let pf = |ctx_data| {
            EventReplyData::PageFault(PageFaultReply {
                trap_access: false,
                ctx_data,
            })
        };
        assert!(
            reply(EventKind::PageFault, pf(&big[..256]))
                .validate()
                .is_ok()
        );
        assert_eq!(
            reply(EventKind::PageFault, pf(&big)).validate(),
            Err(ProtocolError::InvalidValue {
                field: "ctx_size",
                value: 257
            })
        );
    }
}
