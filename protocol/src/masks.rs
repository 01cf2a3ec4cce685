//! The allowed-command and allowed-event masks of `GET_VERSION`, and the permission check.
//!
//! The masks are in the v4 numbering (docs/protocol.md): command ID *n* is bit *n − 1* of
//! `commands` (as `KVMI_ALLOWED_COMMAND`), and `events` holds event bits (bit *k* for the event
//! numbered *k*, see [`EventKind`]). `GET_VERSION` and the `PAUSE_VCPU` event are always
//! allowed; anything else outside the masks is refused with `-KVM_EPERM`.

use crate::command::CommandKind;
use crate::error::ProtocolError;
use crate::event::{EventKind, EventSet};
use crate::wire::v4;

/// The commands and events a host allows (and supports), as `GET_VERSION` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AllowedMasks {
    /// Allowed commands: bit `id − 1` for command ID `id` (v4 numbering).
    pub commands: u32,
    /// Allowed events: the v4 event bits.
    pub events: u32,
}

impl AllowedMasks {
    /// Masks that allow every known command and event.
    pub fn all() -> AllowedMasks {
        let commands = CommandKind::ALL
            .into_iter()
            .map(Self::command_bit)
            .fold(0, |a, b| a | b);
        AllowedMasks {
            commands,
            events: v4::event_set_to_bits(EventSet::ALL),
        }
    }

    /// What is always allowed, whatever the host and the operator say: the `GET_VERSION`
    /// command and the `PAUSE_VCPU` event. Masks offered to a tool carry these bits.
    pub fn always() -> AllowedMasks {
        Self::from_kinds([CommandKind::GetVersion], [EventKind::PauseVcpu])
    }

    /// These masks with the [`always`](Self::always) allowed bits added.
    pub fn with_always_allowed(self) -> AllowedMasks {
        let always = Self::always();
        AllowedMasks {
            commands: self.commands | always.commands,
            events: self.events | always.events,
        }
    }

    /// Masks allowing exactly the given commands and events.
    pub fn from_kinds(
        commands: impl IntoIterator<Item = CommandKind>,
        events: impl IntoIterator<Item = EventKind>,
    ) -> AllowedMasks {
        AllowedMasks {
            commands: commands
                .into_iter()
                .map(Self::command_bit)
                .fold(0, |a, b| a | b),
            events: v4::event_set_to_bits(events.into_iter().collect()),
        }
    }

    /// The mask bit of a command (`1 << (id − 1)`).
    pub fn command_bit(kind: CommandKind) -> u32 {
        1u32 << (v4::command_id(kind) - 1)
    }

    /// Whether `kind` is allowed (`GET_VERSION` always is).
    pub fn allows_command(&self, kind: CommandKind) -> bool {
        kind == CommandKind::GetVersion || self.commands & Self::command_bit(kind) != 0
    }

    /// Whether `kind` is allowed (the `PAUSE_VCPU` event always is).
    pub fn allows_event(&self, kind: EventKind) -> bool {
        kind == EventKind::PauseVcpu || self.events & v4::event_bit(kind) != 0
    }

    /// `Ok` if the command is allowed, else `-KVM_EPERM`.
    pub fn check_command(&self, kind: CommandKind) -> Result<(), ProtocolError> {
        if self.allows_command(kind) {
            Ok(())
        } else {
            Err(ProtocolError::CommandNotAllowed(kind))
        }
    }

    /// `Ok` if the event is allowed, else `-KVM_EPERM`.
    pub fn check_event(&self, kind: EventKind) -> Result<(), ProtocolError> {
        if self.allows_event(kind) {
            Ok(())
        } else {
            Err(ProtocolError::EventNotAllowed(kind))
        }
    }

    /// `Ok` if every event of a `CONTROL_EVENTS` set is allowed, else `-KVM_EPERM` naming the
    /// first one that is not.
    pub fn check_event_set(&self, set: EventSet) -> Result<(), ProtocolError> {
        EventKind::ALL
            .into_iter()
            .filter(|k| set.contains(*k))
            .try_for_each(|k| self.check_event(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_masks_allow_only_get_version_and_pause_event() {
        let masks = AllowedMasks::default();
        for kind in CommandKind::ALL {
            assert_eq!(
                masks.allows_command(kind),
                kind == CommandKind::GetVersion,
                "{kind:?}"
            );
        }
        for kind in EventKind::ALL {
            assert_eq!(
                masks.allows_event(kind),
                kind == EventKind::PauseVcpu,
                "{kind:?}"
            );
        }
        let err = masks.check_command(CommandKind::ReadPhysical).unwrap_err();
        assert_eq!(err.code(), -1);
        assert_eq!(masks.check_event(EventKind::Cr).unwrap_err().code(), -1);
    }

    #[test]
    fn always_allowed_bits_are_get_version_and_the_pause_event() {
        let always = AllowedMasks::always();
        assert_eq!(always.commands, 1 << 0, "GET_VERSION is command 1: bit 0");
        assert_eq!(always.events, 1 << 10, "PAUSE_VCPU is event bit 1<<10");
        assert_eq!(AllowedMasks::default().with_always_allowed(), always);
        let some = AllowedMasks::from_kinds([CommandKind::ReadPhysical], [EventKind::Msr]);
        let with = some.with_always_allowed();
        assert_eq!(with.commands, some.commands | always.commands);
        assert_eq!(with.events, some.events | always.events);
        assert_eq!(
            AllowedMasks::all().with_always_allowed(),
            AllowedMasks::all()
        );
    }

    #[test]
    fn command_bits_follow_v4_ids() {
        assert_eq!(AllowedMasks::command_bit(CommandKind::GetVersion), 1 << 0);
        assert_eq!(AllowedMasks::command_bit(CommandKind::PauseVcpu), 1 << 1);
        assert_eq!(AllowedMasks::command_bit(CommandKind::GetXsave), 1 << 25);
        assert_eq!(
            AllowedMasks::command_bit(CommandKind::ControlBreakpoint),
            1 << 20
        );
        let masks = AllowedMasks::from_kinds([CommandKind::ReadPhysical], [EventKind::Cr]);
        assert_eq!(masks.commands, 1 << 12);
        assert_eq!(masks.events, 1 << 1);
        assert!(masks.allows_command(CommandKind::ReadPhysical));
        assert!(!masks.allows_command(CommandKind::WritePhysical));
        assert!(masks.allows_event(EventKind::Cr));
        assert!(!masks.allows_event(EventKind::Msr));
    }

    #[test]
    fn event_set_check_names_the_disallowed_event() {
        let masks = AllowedMasks::from_kinds([], [EventKind::Cr]);
        let ok: EventSet = [EventKind::Cr, EventKind::PauseVcpu].into_iter().collect();
        assert!(masks.check_event_set(ok).is_ok());
        let bad = ok.with(EventKind::PageFault);
        assert_eq!(
            masks.check_event_set(bad),
            Err(ProtocolError::EventNotAllowed(EventKind::PageFault))
        );
    }

    #[test]
    fn all_allows_everything() {
        let masks = AllowedMasks::all();
        assert!(
            CommandKind::ALL
                .into_iter()
                .all(|k| masks.allows_command(k))
        );
        assert!(EventKind::ALL.into_iter().all(|k| masks.allows_event(k)));
    }
}
