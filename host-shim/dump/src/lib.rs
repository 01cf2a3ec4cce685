//! Memory acquisition: writes a running VM's RAM to a file as LiME, ELF core or a raw image.
//!
//! SKELETON: the public interface other crates code against; the implementation lands next.
#![deny(missing_docs)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64};

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
    /// Bytes written in all (every pass).
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
}

/// Dumps the RAM of the VM behind `vm` as `request` says, updating `progress` as it goes.
pub fn dump(
    vm: &vmm::VmHandle,
    request: &DumpRequest,
    progress: &Progress,
) -> Result<DumpSummary, DumpError> {
    let _ = (vm, progress);
    Err(DumpError::Io {
        what: "dumping (not implemented yet)",
        path: request.path.clone(),
        source: std::io::Error::from(std::io::ErrorKind::Unsupported),
    })
}
