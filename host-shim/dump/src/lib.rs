//! Memory acquisition: writes a running VM's RAM to a file as LiME, ELF core or a raw image.
//!
//! [`dump`] reads guest RAM through its own read-only `MAP_SHARED` mapping of the RAM memfd
//! (never the VM's mapping, whose pages the introspection engine may protect) and writes the
//! file with io_uring (several 4 MiB writes in flight, O_DIRECT where the file system takes
//! it; `pwrite` where io_uring is unavailable), ending with an fsync.
//!
//! - Stop-and-copy (default): every vCPU is paused, the file is written, the VM resumes.
//! - Live (`DumpRequest::live`): KVM dirty logging (plus the VMM's log of host writes) is
//!   started, a first pass copies everything while the VM runs, further passes re-copy the
//!   pages dirtied during the previous one until the set is small or stops shrinking, then
//!   the vCPUs are paused only to copy the last dirty pages and the registers. The file equals
//!   guest memory at that pause.
//!
//! Whatever fails, the partial file is removed and the VM is resumed; a dump never changes
//! guest memory or registers. Holes of the memfd (pages the guest never touched) are not
//! read: they are left as sparse zeros in the file.
#![deny(missing_docs)]

pub mod format;
pub mod io;
mod run;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

pub use io::IoChoice;

/// The file format of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// LiME: a 32-byte header (magic 0x4C694D45, version 1, start, inclusive end) per range.
    Lime,
    /// ELF core (`virsh dump --memory-only` layout): PT_NOTE with the vCPUs' registers, then
    /// one PT_LOAD per RAM range.
    Elf,
    /// A flat image: file offset = guest-physical address, holes zero-filled.
    Raw,
}

/// What to dump and how.
#[derive(Clone, Debug)]
pub struct DumpRequest {
    /// The output file (created or truncated; removed again if the dump fails).
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Iterative pre-copy with dirty logging, pausing only for the last pass (falls back to
    /// pause-and-copy where dirty logging does not work, saying so in the summary).
    pub live: bool,
}

/// Progress of a running dump, readable from other threads.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes written so far (all passes).
    pub done: AtomicU64,
    /// Bytes of the first pass (the file's size).
    pub total: AtomicU64,
    /// The pass under way (1 = the full copy).
    pub pass: AtomicU32,
}

/// What a finished dump did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DumpSummary {
    /// The file written.
    pub path: String,
    /// Its format.
    pub format: Format,
    /// Bytes written in all (every pass; pages left sparse are not written).
    pub bytes: u64,
    /// The file's size.
    pub file_bytes: u64,
    /// Wall time of the whole dump, in seconds.
    pub seconds: f64,
    /// `bytes` / `seconds`, in MiB/s.
    pub mib_per_s: f64,
    /// How long the VM's vCPUs stood paused, in milliseconds.
    pub pause_ms: f64,
    /// Passes over memory (1 without `live`).
    pub passes: u32,
    /// Whether the dump ran live (pre-copy) or fell back to pause-and-copy.
    pub live: bool,
    /// How the bytes were written (e.g. "io_uring+O_DIRECT", "io_uring", "pwrite").
    pub io: String,
    /// Why a requested feature was not used (live without dirty logging, O_DIRECT refused).
    pub fallback: Option<String>,
    /// File bytes left as sparse zeros because the guest never touched those pages (part of
    /// the image, but not written: not in `bytes`, and no I/O).
    pub sparse_bytes: u64,
    /// Bytes of dirty pages re-copied by the passes after the first (live only).
    pub recopied_bytes: u64,
}

/// Why a dump failed (the partial file is removed and the VM runs on).
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Creating, writing or syncing the output failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The output file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VM's vCPUs did not pause in time.
    #[error("the VM's vCPUs did not pause within {0:?}")]
    PauseTimeout(std::time::Duration),
    /// The VM has ended.
    #[error("the VM is not running")]
    NotRunning,
    /// Another dump of the same VM is under way.
    #[error("a dump of this VM is already under way")]
    Busy,
    /// The guest's RAM could not be described in the format (a bug or an impossible VM).
    #[error("cannot lay out the dump: {0}")]
    Layout(#[from] format::LayoutError),
}

/// Tuning of a dump (defaults suit the `kvmi dump` command; tests and benchmarks change them).
#[derive(Clone, Debug)]
pub struct DumpOptions {
    /// The write path.
    pub io: IoChoice,
    /// How long every vCPU gets to pause.
    pub pause_timeout: Duration,
    /// Most passes of a live dump, the paused one included.
    pub max_passes: u32,
    /// A live dump pauses once the pages dirtied during a pass are at most this many bytes.
    pub small_dirty_bytes: u64,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            io: IoChoice::Auto,
            pause_timeout: Duration::from_secs(2),
            max_passes: 8,
            small_dirty_bytes: 4 << 20,
        }
    }
}

/// Dumps the RAM of the VM behind `vm` as `request` says, updating `progress` as it goes.
pub fn dump(
    vm: &vmm::VmHandle,
    request: &DumpRequest,
    progress: &Progress,
) -> Result<DumpSummary, DumpError> {
    dump_with(vm, request, progress, &DumpOptions::default())
}

/// [`dump`] with explicit [`DumpOptions`].
pub fn dump_with(
    vm: &vmm::VmHandle,
    request: &DumpRequest,
    progress: &Progress,
    options: &DumpOptions,
) -> Result<DumpSummary, DumpError> {
    run::dump(vm, request, progress, options)
}
