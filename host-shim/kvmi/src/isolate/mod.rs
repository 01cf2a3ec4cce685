//! `kvmi run --isolate`: one process per VM (docs/isolation.md).
//!
//! `kvmi run --isolate` is a small **supervisor**: it spawns VM processes of the same binary
//! (hidden subcommands `vmm-*`, started through `/proc/self/exe`), hands each its
//! configuration and the descriptors it needs over an inherited control socket
//! ([`control`]), forwards Ctrl-C as a stop, waits for them and reports how each ended
//! ([`supervisor`]). Every VM process dies with the supervisor (`PR_SET_PDEATHSIG`).

/// `KVMI_ISOLATE=0` in the environment of `kvmi run` is `--no-isolate`, `KVMI_ISOLATE=1`
/// `--isolate` (for running a test suite both ways); VM processes never see it.
pub const ISOLATE_ENV: &str = "KVMI_ISOLATE";

/// Whether `kvmi run` supervises VM processes: the flags first (`--isolate`,
/// `--no-isolate`), then [`ISOLATE_ENV`], then the default (yes).
pub fn wanted(isolate: bool, no_isolate: bool) -> bool {
    if isolate || no_isolate {
        return isolate;
    }
    std::env::var_os(ISOLATE_ENV).is_none_or(|v| v != "0")
}

pub mod appliance;
pub mod control;
pub mod run;
pub mod split;
pub mod supervisor;
pub mod target;
