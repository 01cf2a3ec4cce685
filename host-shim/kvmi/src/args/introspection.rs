//! The `kvmi run` flags that attach the introspector to the VM.

use std::path::PathBuf;
use std::time::Duration;

use protocol::masks::AllowedMasks;

use kvmi_engine::libkvmi::{LibkvmiConfig, format_uuid, parse_uuid, random_uuid};
use kvmi_engine::masks::{UnknownName, parse_commands, parse_events};
use kvmi_engine::{Dialect, Endpoint, IntrospectorConfig};
use sha1::{Digest, Sha1};

/// The wire dialect of the KVMI socket (`--kvmi-dialect`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DialectArg {
    /// This project's KVMI v4 dialect (kvmi-client, the appliance agent).
    #[default]
    V4,
    /// The kvmi-v7 ABI of libkvmi (LibVMI, libmicrovmi, HVMI): the VMM sends a handshake
    /// first, as QEMU does; use with --kvmi-connect to reach a listening libkvmi tool.
    Libkvmi,
}

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
    /// Wire dialect of the KVMI socket.
    #[arg(long, value_enum, default_value_t = DialectArg::V4)]
    pub kvmi_dialect: DialectArg,
    /// libkvmi: the VM's UUID in the handshake (8-4-4-4-12 hex) [default: a random one,
    /// logged].
    #[arg(long, value_name = "UUID")]
    pub uuid: Option<String>,
    /// libkvmi: the VM's name in the handshake (at most 63 bytes are sent) [default: the
    /// image name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// libkvmi: a file holding the shared secret; the tool's handshake cookie must be the
    /// SHA-1 of its bytes [default: any tool is accepted].
    #[arg(long, value_name = "FILE")]
    pub kvmi_secret: Option<PathBuf>,
    /// libkvmi: seconds an attached tool has to close after the UNHOOK event sent before the
    /// shim stops (Ctrl-C, --timeout, guest exit).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub unhook_timeout: f64,
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
    /// A bad `--uuid`.
    #[error("--uuid {0:?} is not a UUID (8-4-4-4-12 hex digits)")]
    Uuid(String),
    /// The `--kvmi-secret` file cannot be read.
    #[error("reading the --kvmi-secret file {path}: {source}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// No random UUID could be made.
    #[error("generating the VM UUID: {0}")]
    Random(std::io::Error),
    /// A bad unhook timeout.
    #[error("--unhook-timeout must be a non-negative number of seconds")]
    UnhookTimeout,
    /// libkvmi flags with the v4 dialect.
    #[error("{0} applies to --kvmi-dialect libkvmi only")]
    NotLibkvmi(&'static str),
    /// Introspection flags without a socket.
    #[error(
        "--kvmi-wait, --allow-commands and --allow-events need --kvmi-socket or --kvmi-connect"
    )]
    NoSocket,
}

impl KvmiRunArgs {
    /// The socket's dialect; `default_name` names the VM in a libkvmi handshake when
    /// `--name` is not given.
    pub fn dialect(&self, default_name: &str) -> Result<Dialect, RunArgsError> {
        if self.kvmi_dialect == DialectArg::V4 {
            let given = [
                (self.uuid.is_some(), "--uuid"),
                (self.name.is_some(), "--name"),
                (self.kvmi_secret.is_some(), "--kvmi-secret"),
            ];
            if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
                return Err(RunArgsError::NotLibkvmi(flag));
            }
            return Ok(Dialect::V4);
        }
        if !(self.unhook_timeout.is_finite() && self.unhook_timeout >= 0.0) {
            return Err(RunArgsError::UnhookTimeout);
        }
        let uuid = match &self.uuid {
            Some(text) => parse_uuid(text).ok_or_else(|| RunArgsError::Uuid(text.clone()))?,
            None => {
                let uuid = random_uuid().map_err(RunArgsError::Random)?;
                tracing::info!("VM UUID {} (pass --uuid to choose it)", format_uuid(&uuid));
                uuid
            }
        };
        let cookie_hash = match &self.kvmi_secret {
            Some(path) => {
                let secret = std::fs::read(path).map_err(|source| RunArgsError::Secret {
                    path: path.clone(),
                    source,
                })?;
                Some(Sha1::digest(&secret).into())
            }
            None => None,
        };
        let start_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(Dialect::Libkvmi(LibkvmiConfig {
            uuid,
            start_time,
            name: self
                .name
                .clone()
                .unwrap_or_else(|| default_name.to_string()),
            cookie_hash,
            unhook_timeout: Duration::from_secs_f64(self.unhook_timeout),
        }))
    }

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
