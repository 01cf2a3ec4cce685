//! `monitor` commands: the address space memory accesses go through, and what the
//! breakpoints restrict.

use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd};

use super::target::{GdbError, KvmiTarget};

/// `monitor help`.
pub const MONITOR_HELP: &str = "\
kvmi gdb monitor commands:
  monitor cr3 VALUE   translate memory accesses through this page-table root
  monitor cr3 auto    use the current thread's CR3 again (the default)
  monitor phys        memory addresses are guest-physical
  monitor virt        memory addresses are virtual again (the default)
  monitor pages       the pages breakpoints and watchpoints restrict
  monitor help        this list";

/// A parsed `monitor` command.
#[derive(Debug, PartialEq, Eq)]
pub enum MonitorCommand {
    /// `cr3 VALUE` (`Some`) or `cr3 auto` (`None`).
    Cr3(Option<u64>),
    /// `phys` (true) or `virt` (false).
    Physical(bool),
    /// `pages`.
    Pages,
    /// `help`, or nothing.
    Help,
    /// Anything else: the message to show (with the help).
    Invalid(String),
}

/// Parses the text after `monitor`.
pub fn parse(text: &str) -> MonitorCommand {
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["cr3", "auto"] => MonitorCommand::Cr3(None),
        ["cr3", value] => match crate::cli::parse_number(value) {
            Ok(cr3) => MonitorCommand::Cr3(Some(cr3)),
            Err(e) => MonitorCommand::Invalid(e.to_string()),
        },
        ["phys"] => MonitorCommand::Physical(true),
        ["virt"] => MonitorCommand::Physical(false),
        ["pages"] => MonitorCommand::Pages,
        ["help"] | [] => MonitorCommand::Help,
        _ => MonitorCommand::Invalid(format!("unknown monitor command `{}`", text.trim())),
    }
}

impl MonitorCmd for KvmiTarget {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), GdbError> {
        match parse(&String::from_utf8_lossy(cmd)) {
            MonitorCommand::Cr3(None) => {
                self.cr3_override = None;
                gdbstub::outputln!(out, "memory: through the current thread's CR3");
            }
            MonitorCommand::Cr3(Some(cr3)) => {
                self.cr3_override = Some(cr3);
                gdbstub::outputln!(out, "memory: through CR3 {cr3:#x}");
            }
            MonitorCommand::Physical(physical) => {
                self.physical = physical;
                let kind = if physical {
                    "guest-physical"
                } else {
                    "virtual"
                };
                gdbstub::outputln!(out, "memory: {kind} addresses");
            }
            MonitorCommand::Pages => {
                for (gpa, access) in self.book.restricted_pages() {
                    let access = kvmi_client::access_string(access);
                    gdbstub::outputln!(out, "page {gpa:#x}: {access}");
                }
                let hw = self.hw.len();
                let sw = self.book.sw_count();
                gdbstub::outputln!(out, "{sw} software, {hw} hardware breakpoints");
            }
            MonitorCommand::Help => gdbstub::outputln!(out, "{MONITOR_HELP}"),
            MonitorCommand::Invalid(why) => gdbstub::outputln!(out, "{why}\n{MONITOR_HELP}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_commands_parse() {
        assert_eq!(parse("cr3 0x22c000"), MonitorCommand::Cr3(Some(0x22c000)));
        assert_eq!(parse(" cr3   auto "), MonitorCommand::Cr3(None));
        assert_eq!(parse("phys"), MonitorCommand::Physical(true));
        assert_eq!(parse("virt"), MonitorCommand::Physical(false));
        assert_eq!(parse("pages"), MonitorCommand::Pages);
        assert_eq!(parse(""), MonitorCommand::Help);
        assert_eq!(parse("help"), MonitorCommand::Help);
        assert!(matches!(parse("cr3 zz"), MonitorCommand::Invalid(_)));
        assert!(matches!(parse("reset"), MonitorCommand::Invalid(m) if m.contains("reset")));
        assert!(MONITOR_HELP.contains("monitor cr3 VALUE"));
    }
}
