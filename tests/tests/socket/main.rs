//! End-to-end tests of the introspection engine over the KVMI socket: a VM run by the `kvmi`
//! command with `--kvmi-socket`, driven by the client library, the tool subcommands and
//! hostile raw clients; plus the engine installed in-process; and the libkvmi dialect
//! (`--kvmi-dialect libkvmi`) against the libkvmi stand-in.

mod campaign;
mod cli;
mod commands;
mod demo;
mod engine_smoke;
mod events;
mod hostile;
mod libkvmi;
mod libkvmi_commands;
mod page_access_limit;
mod stuck_tool;
mod survival;
