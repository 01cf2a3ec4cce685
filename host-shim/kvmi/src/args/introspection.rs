//! The `kvmi run` flags that attach the introspector to the VM.

use std::path::PathBuf;
use std::time::Duration;

use protocol::masks::AllowedMasks;

use kvmi_engine::masks::{UnknownName, parse_commands, parse_events};
use kvmi_engine::{Endpoint, IntrospectorConfig};

/// Introspection options of `kvmi run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KvmiRunArgs {
    /// Serve KVMI on a unix socket at PATH (tools connect to it).
    #[arg(long, value_name = "PATH", conflicts_with = "kvmi_connect")]
    pub kvmi_socket: Option<PathBuf>,
    /// Connect to a tool listening on the unix socket PATH (as QEMU does; reconnects).
    #[arg(long, value_name = "PATH")]
    pub kvmi_connect: Option<PathBuf>,
    /// Seconds a tool has to answer an event before it is detached (0 = wait forever).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub kvmi_timeout: f64,
    /// Start no vCPU until a tool attaches; then send CREATE_VCPU events (if allowed).
    #[arg(long)]
    pub kvmi_wait: bool,
    /// Allow only these commands (comma-separated, e.g. get_registers,read_physical; `all`).
    #[arg(long, value_name = "LIST")]
    pub allow_commands: Option<String>,
    /// Allow only these events (comma-separated, e.g. page_fault,msr,breakpoint; `all`).
    #[arg(long, value_name = "LIST")]
    pub allow_events: Option<String>,
}

/// A bad introspection flag.
#[derive(Debug, thiserror::Error)]
pub enum RunArgsError {
    /// An unknown command or event name.
    #[error(transparent)]
    Name(#[from] UnknownName),
    /// A bad timeout.
    #[error("--kvmi-timeout must be a non-negative number of seconds")]
    Timeout,
    /// Introspection flags without a socket.
    #[error(
        "--kvmi-wait, --allow-commands and --allow-events need --kvmi-socket or --kvmi-connect"
    )]
    NoSocket,
}

impl KvmiRunArgs {
    /// The introspector's configuration and socket, or None when introspection is off.
    pub fn setup(&self) -> Result<Option<(IntrospectorConfig, Endpoint)>, RunArgsError> {
        let endpoint = match (&self.kvmi_socket, &self.kvmi_connect) {
            (Some(p), _) => Endpoint::Listen(p.clone()),
            (None, Some(p)) => Endpoint::Connect(p.clone()),
            (None, None) => {
                if self.kvmi_wait || self.allow_commands.is_some() || self.allow_events.is_some() {
                    return Err(RunArgsError::NoSocket);
                }
                return Ok(None);
            }
        };
        if !(self.kvmi_timeout.is_finite() && self.kvmi_timeout >= 0.0) {
            return Err(RunArgsError::Timeout);
        }
        let all = AllowedMasks::all();
        let allowed = AllowedMasks {
            commands: match &self.allow_commands {
                Some(l) => parse_commands(l)?,
                None => all.commands,
            },
            events: match &self.allow_events {
                Some(l) => parse_events(l)?,
                None => all.events,
            },
        };
        let config = IntrospectorConfig {
            allowed,
            reply_timeout: (self.kvmi_timeout > 0.0)
                .then(|| Duration::from_secs_f64(self.kvmi_timeout)),
            wait_for_tool: self.kvmi_wait,
        };
        Ok(Some((config, endpoint)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{CommandKind, EventKind};

    #[test]
    fn flags_build_the_configuration() {
        let none = KvmiRunArgs {
            kvmi_timeout: 10.0,
            ..Default::default()
        };
        assert!(none.setup().unwrap().is_none());
        let bad = KvmiRunArgs {
            kvmi_wait: true,
            kvmi_timeout: 10.0,
            ..Default::default()
        };
        assert!(matches!(bad.setup(), Err(RunArgsError::NoSocket)));
        let args = KvmiRunArgs {
            kvmi_socket: Some("/tmp/x.sock".into()),
            kvmi_timeout: 0.0,
            kvmi_wait: true,
            allow_commands: Some("read_physical".into()),
            allow_events: Some("pf".into()),
            ..Default::default()
        };
        let (config, endpoint) = args.setup().unwrap().unwrap();
        assert_eq!(endpoint, Endpoint::Listen("/tmp/x.sock".into()));
        assert_eq!(config.reply_timeout, None);
        assert!(config.wait_for_tool);
        assert!(config.allowed.allows_command(CommandKind::ReadPhysical));
        assert!(!config.allowed.allows_command(CommandKind::WritePhysical));
        assert!(config.allowed.allows_event(EventKind::PageFault));
        assert!(!config.allowed.allows_event(EventKind::Msr));
        let neg = KvmiRunArgs {
            kvmi_connect: Some("/tmp/y".into()),
            kvmi_timeout: -1.0,
            ..Default::default()
        };
        assert!(matches!(neg.setup(), Err(RunArgsError::Timeout)));
    }
}
