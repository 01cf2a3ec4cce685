//! Which libkvmi commands and events this host implements, and which engine permission
//! governs each: the answers to CHECK_COMMAND and CHECK_EVENT, and the `-KVM_EPERM` check
//! every command passes first.

use protocol::command::CommandKind;
use protocol::event::EventKind;
use protocol::masks::AllowedMasks;
use protocol::wire::libkvmi::{errors, events, ids};

/// Largest message ID libkvmi numbers (`VCPU_CONTROL_SINGLESTEP`); CHECK_COMMAND answers
/// `-KVM_EINVAL` above it.
const LAST_ID: u16 = ids::VCPU_CONTROL_SINGLESTEP;

/// How a libkvmi command is served here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Not implemented: `-KVM_ENOSYS`, and CHECK_COMMAND answers `-KVM_EPERM`.
    No,
    /// Always allowed (the operator cannot restrict it).
    Always,
    /// Allowed when the engine allows this v4 command (the operator's `--allow-commands`
    /// and what this host delivers).
    Engine(CommandKind),
    /// Allowed when the operator allows this v4 command (answered here, whatever the host
    /// delivers).
    Operator(CommandKind),
}

/// How command `id` is served.
pub const fn served(id: u16) -> Served {
    use CommandKind as K;
    match id {
        ids::GET_VERSION
        | ids::CHECK_COMMAND
        | ids::CHECK_EVENT
        | ids::CONTROL_CMD_RESPONSE
        | ids::GET_MAX_GFN
        | ids::GET_MTRR_TYPE
        | ids::GET_EPT_VIEW => Served::Always,
        ids::GET_GUEST_INFO | ids::GET_VCPU_INFO => Served::Engine(K::GetGuestInfo),
        ids::PAUSE_VCPU => Served::Engine(K::PauseVcpu),
        ids::CONTROL_EVENTS | ids::VCPU_CONTROL_SINGLESTEP => Served::Engine(K::ControlEvents),
        ids::CONTROL_VM_EVENTS => Served::Operator(K::ControlEvents),
        ids::CONTROL_CR => Served::Operator(K::ControlCr),
        ids::CONTROL_MSR => Served::Engine(K::ControlMsr),
        ids::GET_REGISTERS | ids::VCPU_TRANSLATE_GVA => Served::Engine(K::GetRegisters),
        ids::SET_REGISTERS => Served::Engine(K::SetRegisters),
        ids::GET_CPUID => Served::Engine(K::GetCpuid),
        ids::GET_XSAVE => Served::Engine(K::GetXsave),
        ids::READ_PHYSICAL => Served::Engine(K::ReadPhysical),
        ids::WRITE_PHYSICAL => Served::Engine(K::WritePhysical),
        ids::INJECT_EXCEPTION => Served::Engine(K::InjectException),
        ids::SET_PAGE_ACCESS => Served::Engine(K::SetPageAccess),
        _ => Served::No,
    }
}

/// The permission of command `id`: `Ok` or the positive `KVM_E*` code to answer
/// (`ENOSYS` for an unimplemented ID, `EPERM` for a disallowed one).
pub fn command_permission(id: u16, masks: AllowedMasks, operator: AllowedMasks) -> Result<(), i32> {
    match served(id) {
        Served::No => Err(errors::ENOSYS),
        Served::Always => Ok(()),
        Served::Engine(k) if masks.allows_command(k) => Ok(()),
        Served::Operator(k) if operator.allows_command(k) => Ok(()),
        Served::Engine(_) | Served::Operator(_) => Err(errors::EPERM),
    }
}

/// The CHECK_COMMAND answer for `id`: 0, or the positive code (`EINVAL` past the last ID,
/// `EPERM` for anything not implemented or not allowed).
pub fn check_command(id: u16, masks: AllowedMasks, operator: AllowedMasks) -> Result<(), i32> {
    if id > LAST_ID || id == ids::EVENT || id == ids::EVENT_REPLY {
        return Err(errors::EINVAL);
    }
    command_permission(id, masks, operator).map_err(|_| errors::EPERM)
}

/// The CHECK_EVENT answer for `id`: 0 for an event this host can deliver and the operator
/// allows (UNHOOK always); `EPERM` for the rest (CR, XSETBV, DESCRIPTOR, CPUID where the host
/// has no such exit, CMD_ERROR, which libkvmi cannot parse); `EINVAL` past the last event.
pub fn check_event(id: u16, masks: AllowedMasks) -> Result<(), i32> {
    let Ok(id) = u8::try_from(id) else {
        return Err(errors::EINVAL);
    };
    if id >= events::COUNT {
        return Err(errors::EINVAL);
    }
    if id == events::UNHOOK {
        return Ok(());
    }
    match EventKind::from_number(id) {
        Some(kind) if masks.allows_event(kind) => Ok(()),
        _ => Err(errors::EPERM),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn without_writes() -> AllowedMasks {
        let mut commands: Vec<CommandKind> = CommandKind::ALL.to_vec();
        commands.retain(|k| *k != CommandKind::WritePhysical);
        AllowedMasks::from_kinds(commands, EventKind::ALL)
    }

    #[test]
    fn check_command_answers_implemented_allowed_and_unknown() {
        let all = AllowedMasks::all();
        assert_eq!(check_command(ids::GET_VERSION, all, all), Ok(()));
        assert_eq!(check_command(ids::GET_REGISTERS, all, all), Ok(()));
        assert_eq!(
            check_command(ids::VCPU_CONTROL_SINGLESTEP, all, all),
            Ok(())
        );
        assert_eq!(
            check_command(ids::CONTROL_SPP, all, all),
            Err(errors::EPERM)
        );
        assert_eq!(
            check_command(ids::GET_MAP_TOKEN, all, all),
            Err(errors::EPERM)
        );
        assert_eq!(check_command(64, all, all), Err(errors::EINVAL));
        assert_eq!(check_command(ids::EVENT, all, all), Err(errors::EINVAL));
        let restricted = without_writes();
        assert_eq!(
            check_command(ids::WRITE_PHYSICAL, restricted, restricted),
            Err(errors::EPERM)
        );
        assert_eq!(
            command_permission(ids::WRITE_PHYSICAL, restricted, restricted),
            Err(errors::EPERM)
        );
        assert_eq!(
            command_permission(ids::CONTROL_SPP, all, all),
            Err(errors::ENOSYS)
        );
        // CONTROL_CR is answered here: only the operator restricts it.
        let host_without_cr = AllowedMasks::from_kinds(
            CommandKind::ALL
                .into_iter()
                .filter(|k| *k != CommandKind::ControlCr),
            EventKind::ALL,
        );
        assert_eq!(
            command_permission(ids::CONTROL_CR, host_without_cr, all),
            Ok(())
        );
    }

    #[test]
    fn check_event_follows_the_host_masks() {
        let no_cr = AllowedMasks::from_kinds(
            CommandKind::ALL,
            EventKind::ALL.into_iter().filter(|k| *k != EventKind::Cr),
        );
        assert_eq!(check_event(u16::from(events::UNHOOK), no_cr), Ok(()));
        assert_eq!(check_event(u16::from(events::BREAKPOINT), no_cr), Ok(()));
        assert_eq!(
            check_event(u16::from(events::CR), no_cr),
            Err(errors::EPERM)
        );
        assert_eq!(
            check_event(u16::from(events::CMD_ERROR), no_cr),
            Err(errors::EPERM)
        );
        assert_eq!(
            check_event(u16::from(events::CPUID), no_cr),
            Err(errors::EPERM)
        );
        assert_eq!(check_event(14, no_cr), Err(errors::EINVAL));
        assert_eq!(check_event(0x100, no_cr), Err(errors::EINVAL));
    }
}
