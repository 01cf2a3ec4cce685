//! What this host can deliver (from the capability probe) as `GET_VERSION` masks, and the
//! operator's restriction flags (`--allow-commands`, `--allow-events`).

use protocol::command::CommandKind;
use protocol::event::EventKind;
use protocol::masks::AllowedMasks;

use vmm::probe::{Capabilities, MprotectMode};

/// The commands and events this host delivers: CONTROL_CR and CONTROL_VE, and the CR,
/// XSETBV and DESCRIPTOR events are never available (stock KVM has no such exits); the
/// others depend on what the probe observed.
pub fn host_masks(caps: &Capabilities) -> AllowedMasks {
    let page_traps = matches!(
        caps.mprotect_write_trap,
        MprotectMode::MmioExit | MprotectMode::MemoryFault
    );
    let breakpoints = caps.sw_breakpoints || caps.hw_breakpoints > 0;
    let commands = CommandKind::ALL.into_iter().filter(|k| match k {
        CommandKind::ControlCr | CommandKind::ControlVe => false,
        CommandKind::ControlMsr => caps.msr_write_filter,
        CommandKind::GetPageAccess | CommandKind::SetPageAccess => page_traps,
        CommandKind::ControlBreakpoint => breakpoints,
        _ => true,
    });
    let events = EventKind::ALL.into_iter().filter(|k| match k {
        EventKind::Cr | EventKind::Xsetbv | EventKind::Descriptor => false,
        EventKind::Msr => caps.msr_write_filter,
        EventKind::PageFault => page_traps,
        EventKind::Breakpoint => breakpoints,
        EventKind::Singlestep => caps.single_step,
        _ => true,
    });
    AllowedMasks::from_kinds(commands, events)
}

/// The masks offered to a tool: the intersection of two mask sets (what the host delivers,
/// what the operator allows), plus `GET_VERSION` and the `PAUSE_VCPU` event, which KVMI
/// always allows (an operator list that omits them does not remove them).
pub fn intersect(a: AllowedMasks, b: AllowedMasks) -> AllowedMasks {
    AllowedMasks {
        commands: a.commands & b.commands,
        events: a.events & b.events,
    }
    .with_always_allowed()
}

/// The operator's name of a command (as in the reference, lower case).
pub fn command_flag_name(kind: CommandKind) -> &'static str {
    kind.name()
}

/// The operator's name of an event.
pub fn event_flag_name(kind: EventKind) -> &'static str {
    kind.name()
}

fn normalize(word: &str) -> String {
    let w = word.trim().to_ascii_lowercase().replace('-', "_");
    w.strip_prefix("kvmi_").map(str::to_string).unwrap_or(w)
}

/// A comma-separated name list did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{name}` (known: {known})")]
pub struct UnknownName {
    /// "command" or "event".
    pub what: &'static str,
    /// The offending word.
    pub name: String,
    /// The accepted names.
    pub known: String,
}

/// Parses `--allow-commands a,b,...` (`all` allows every command) into a command mask.
pub fn parse_commands(list: &str) -> Result<u32, UnknownName> {
    let mut mask = 0;
    for word in list.split(',').map(normalize).filter(|w| !w.is_empty()) {
        if word == "all" {
            mask |= AllowedMasks::all().commands;
            continue;
        }
        let kind = CommandKind::ALL
            .into_iter()
            .find(|k| command_flag_name(*k) == word)
            .ok_or_else(|| UnknownName {
                what: "command",
                name: word.clone(),
                known: CommandKind::ALL.map(command_flag_name).join(","),
            })?;
        mask |= AllowedMasks::command_bit(kind);
    }
    Ok(mask)
}

/// Parses `--allow-events x,y,...` (`all` allows every event; `pf` = `page_fault`) into an
/// event mask.
pub fn parse_events(list: &str) -> Result<u32, UnknownName> {
    let mut mask = 0;
    for word in list.split(',').map(normalize).filter(|w| !w.is_empty()) {
        let word = match word.as_str() {
            "pf" => "page_fault".to_string(),
            "event_pf" => "page_fault".to_string(),
            _ => word
                .strip_prefix("event_")
                .map(str::to_string)
                .unwrap_or(word),
        };
        if word == "all" {
            mask |= AllowedMasks::all().events;
            continue;
        }
        let kind = EventKind::ALL
            .into_iter()
            .find(|k| event_flag_name(*k) == word)
            .ok_or_else(|| UnknownName {
                what: "event",
                name: word.clone(),
                known: EventKind::ALL.map(event_flag_name).join(","),
            })?;
        mask |= AllowedMasks::from_kinds([], [kind]).events;
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pvm_like: bool) -> Capabilities {
        Capabilities {
            kvm_api_version: 12,
            pvm_module: pvm_like,
            seccomp: Default::default(),
            sw_breakpoints: !pvm_like,
            hw_breakpoints: 4,
            hw_breakpoint_rf_resume: !pvm_like,
            single_step: true,
            msr_write_filter: true,
            ro_slot_write_trap: true,
            mprotect_write_trap: if pvm_like {
                MprotectMode::MmioExit
            } else {
                MprotectMode::MemoryFault
            },
            memfd_remap: true,
            cpl0_emulated: pvm_like,
            cpl0_ns_per_iteration: 1000.0,
            sync_regs: 7,
            immediate_exit: true,
            dirty_log: true,
            dirty_log_ring: 0,
            shmem_huge_pages: None,
            details: Vec::new(),
            probe_micros: 0,
        }
    }

    #[test]
    fn unsupported_commands_and_events_are_clear() {
        let m = host_masks(&caps(true));
        for k in [CommandKind::ControlCr, CommandKind::ControlVe] {
            assert!(!m.allows_command(k), "{k:?}");
        }
        for k in [EventKind::Cr, EventKind::Xsetbv, EventKind::Descriptor] {
            assert!(!m.allows_event(k), "{k:?}");
        }
        for k in [
            EventKind::Msr,
            EventKind::PageFault,
            EventKind::Breakpoint,
            EventKind::Singlestep,
            EventKind::Hypercall,
            EventKind::Trap,
            EventKind::CreateVcpu,
        ] {
            assert!(m.allows_event(k), "{k:?}");
        }
        assert!(m.allows_command(CommandKind::SetPageAccess));
    }

    #[test]
    fn missing_capabilities_clear_their_bits() {
        let mut c = caps(true);
        c.msr_write_filter = false;
        c.single_step = false;
        c.hw_breakpoints = 0;
        c.mprotect_write_trap = MprotectMode::NotTrapped;
        let m = host_masks(&c);
        assert!(!m.allows_event(EventKind::Msr));
        assert!(!m.allows_command(CommandKind::ControlMsr));
        assert!(!m.allows_event(EventKind::Singlestep));
        assert!(!m.allows_event(EventKind::Breakpoint));
        assert!(!m.allows_command(CommandKind::ControlBreakpoint));
        assert!(!m.allows_event(EventKind::PageFault));
        assert!(!m.allows_command(CommandKind::GetPageAccess));
        assert!(m.allows_command(CommandKind::ReadPhysical));
    }

    #[test]
    fn get_version_and_pause_vcpu_are_always_allowed() {
        let op = AllowedMasks {
            commands: parse_commands("read_physical").unwrap(),
            events: parse_events("pf").unwrap(),
        };
        let m = intersect(host_masks(&caps(true)), op);
        // The bits themselves (what GET_VERSION reports), not `allows_*`, which says yes
        // for these two whatever the masks hold.
        let always = AllowedMasks::always();
        assert_eq!(m.commands & always.commands, always.commands);
        assert_eq!(m.events & always.events, always.events);
        assert!(m.allows_command(CommandKind::ReadPhysical));
        assert!(!m.allows_command(CommandKind::PauseVcpu));
        assert!(!m.allows_event(EventKind::Msr));
        let none = intersect(
            host_masks(&caps(false)),
            AllowedMasks {
                commands: 0,
                events: 0,
            },
        );
        assert_eq!(
            none.commands,
            AllowedMasks::command_bit(CommandKind::GetVersion)
        );
        assert_eq!(
            none.events,
            AllowedMasks::from_kinds([], [EventKind::PauseVcpu]).events
        );
    }

    #[test]
    fn operator_lists_parse_and_intersect() {
        let cmds = parse_commands("get_registers, READ-PHYSICAL,kvmi_get_version").unwrap();
        let evs = parse_events("pf,msr,cr").unwrap();
        let op = AllowedMasks {
            commands: cmds,
            events: evs,
        };
        let m = intersect(host_masks(&caps(true)), op);
        assert!(m.allows_command(CommandKind::GetRegisters));
        assert!(m.allows_command(CommandKind::ReadPhysical));
        assert!(!m.allows_command(CommandKind::WritePhysical));
        assert!(m.allows_event(EventKind::PageFault));
        assert!(m.allows_event(EventKind::Msr));
        assert!(!m.allows_event(EventKind::Cr)); // the host cannot deliver it
        assert!(!m.allows_event(EventKind::Breakpoint));
        assert_eq!(parse_commands("all").unwrap(), AllowedMasks::all().commands);
        assert!(
            parse_events("bogus")
                .unwrap_err()
                .to_string()
                .contains("bogus")
        );
        assert!(parse_commands("read_physical,nope").is_err());
        assert_eq!(parse_events("").unwrap(), 0);
    }
}
