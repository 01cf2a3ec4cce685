//! One dump: the source mapping, the passes, the pause, and the cleanup on failure.

use std::fs::File;
use std::io as stdio;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use memmap2::{Advice, MmapOptions, MmapRaw};
use vmm::VmHandle;
use vmm::dirty::DirtyBitmap;
use vmm::memory::GuestRam;
use vmm::sync::{Rank, RankedMutex};

use crate::format::{ALIGN, Layout, Piece};
use crate::io::{CHUNK, Source as WriteSource, Writer};
use crate::{DumpError, DumpOptions, DumpRequest, DumpSummary, Progress};

/// The RAMs (by address) being dumped now: one dump per VM at a time.
static ACTIVE: RankedMutex<Vec<usize>> =
    RankedMutex::new(Rank::new(900, "dump.active"), Vec::new());

/// Marks a VM's RAM as being dumped until dropped.
struct Claim(usize);

impl Claim {
    fn take(ram: &GuestRam) -> Result<Claim, DumpError> {
        let key = std::ptr::from_ref(ram) as usize;
        let mut active = ACTIVE.lock();
        if active.contains(&key) {
            return Err(DumpError::Busy);
        }
        active.push(key);
        Ok(Claim(key))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        ACTIVE.lock().retain(|&k| k != self.0);
    }
}

/// Removes the output file when dropped, unless the dump succeeded.
struct PartialFile<'a> {
    path: &'a Path,
    keep: bool,
}

impl Drop for PartialFile<'_> {
    fn drop(&mut self) {
        if !self.keep {
            match std::fs::remove_file(self.path) {
                Ok(()) => tracing::debug!(path = %self.path.display(), "partial dump removed"),
                Err(e) if e.kind() == stdio::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove partial dump {}: {e}", self.path.display()),
            }
        }
    }
}

/// Resumes the VM when dropped (a paused VM is never left behind, even by an early return),
/// unless it was already paused by someone else before the dump (then it stays paused).
struct Paused<'a> {
    vm: &'a VmHandle,
    since: Instant,
    resume: bool,
}

impl Paused<'_> {
    fn pause<'a>(vm: &'a VmHandle, timeout: Duration) -> Result<Paused<'a>, DumpError> {
        let since = Instant::now();
        let resume = !vm.pause_requested_all();
        if vm.pause_all(timeout) {
            return Ok(Paused { vm, since, resume });
        }
        if resume {
            vm.resume_all();
        }
        Err(if vm.has_ended() {
            DumpError::NotRunning
        } else {
            DumpError::PauseTimeout(timeout)
        })
    }

    /// Resumes now; the pause's length (zero when the VM was paused before the dump: the
    /// dump added no pause of its own).
    fn resume(self) -> Duration {
        let d = if self.resume {
            self.since.elapsed()
        } else {
            Duration::ZERO
        };
        drop(self);
        d
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if self.resume {
            self.vm.resume_all();
        }
    }
}

/// The dump's own read-only view of guest RAM: a second open of the memfd, mapped shared.
struct RamView {
    map: MmapRaw,
    file: File,
    size: u64,
}

impl RamView {
    fn open(ram: &GuestRam) -> stdio::Result<RamView> {
        // A new open file description (not a dup): the hole queries below move its offset.
        let file = File::open(format!("/proc/self/fd/{}", ram.memfd().as_raw_fd()))?;
        let len = usize::try_from(ram.size()).map_err(|_| stdio::Error::other("RAM too large"))?;
        let map = MmapOptions::new().len(len).map_raw_read_only(&file)?;
        // Where RAM lives in huge folios, our view maps them whole too (fewer faults); a
        // host without THP for shmem just ignores it.
        let _ = map.advise(Advice::HugePage);
        Ok(RamView {
            map,
            file,
            size: ram.size(),
        })
    }

    fn ptr(&self, gpa: u64) -> *const u8 {
        self.map.as_ptr().wrapping_add(gpa as usize)
    }

    /// Copies `dst.len()` guest bytes from `gpa` (inside RAM: the layout only names RAM).
    fn copy(&self, gpa: u64, dst: &mut [u8]) {
        if gpa
            .checked_add(dst.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            dst.fill(0);
            return;
        }
        // One call maps the whole range (a fault per page otherwise: the copy's main cost);
        // best effort (MADV_POPULATE_READ needs Linux 5.14).
        let _ = self
            .map
            .advise_range(Advice::PopulateRead, gpa as usize, dst.len());
        // SAFETY: the source lies inside our live read-only mapping (checked); vCPUs may
        // write those bytes concurrently, which a live dump tolerates (the page is then
        // dirty and copied again) and which cannot create a reference into guest memory.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(gpa), dst.as_mut_ptr(), dst.len()) };
    }

    /// The parts of `start..end` the memfd holds pages for (`SEEK_DATA`/`SEEK_HOLE`); all
    /// of it if the file system cannot say.
    fn data_extents(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let fd = self.file.as_raw_fd();
        let seek = |at: u64, whence: libc::c_int| -> Option<u64> {
            // SAFETY: lseek on our own fd has no memory effects.
            let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
            (r >= 0).then_some(r as u64)
        };
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let Some(data) = seek(at, libc::SEEK_DATA) else {
                if stdio::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after `at`
                }
                return vec![(start, end)];
            };
            if data >= end {
                break;
            }
            let hole = seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            out.push((data, hole));
            at = hole.max(data + 1);
        }
        out
    }
}

/// Aligns file ranges outward to [`ALIGN`], sorts and merges them.
fn aligned(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    for r in &mut ranges {
        r.0 -= r.0 % ALIGN;
        r.1 = r.1.next_multiple_of(ALIGN);
    }
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Writes file ranges of a layout from the RAM view.
struct Copier<'a> {
    view: &'a RamView,
    writer: Writer,
    progress: &'a Progress,
    path: &'a Path,
}

impl Copier<'_> {
    fn io_err(&self, what: &'static str) -> impl FnOnce(stdio::Error) -> DumpError + '_ {
        move |source| DumpError::Io {
            what,
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// Writes the aligned, disjoint file `ranges` as `layout` fills them.
    fn write(&mut self, layout: &Layout, ranges: &[(u64, u64)]) -> Result<u64, DumpError> {
        let mut bytes = 0;
        for &(a, b) in ranges {
            let mut off = a;
            while off < b {
                let len = (b - off).min(CHUNK as u64);
                self.chunk(layout, off, len as usize)
                    .map_err(|e| DumpError::Io {
                        what: "writing",
                        path: self.path.to_path_buf(),
                        source: e,
                    })?;
                self.progress.done.fetch_add(len, Ordering::Relaxed);
                bytes += len;
                off += len;
            }
        }
        Ok(bytes)
    }

    fn chunk(&mut self, layout: &Layout, off: u64, len: usize) -> stdio::Result<()> {
        let end = off + len as u64;
        let direct = layout.pieces.iter().find_map(|p| match *p {
            Piece::Ram {
                offset,
                gpa,
                len: l,
            } if offset <= off && end <= offset + l && (offset - gpa).is_multiple_of(ALIGN) => {
                Some(gpa + (off - offset))
            }
            _ => None,
        });
        if let Some(gpa) = direct {
            return self
                .writer
                .write(off, len, WriteSource::Mapped(self.view.ptr(gpa)));
        }
        let mut bounce = self.writer.bounce()?;
        let buf = &mut bounce.as_mut_slice()[..len];
        buf.fill(0);
        for p in &layout.pieces {
            let (ps, pe) = p.file_range();
            let (s, e) = (ps.max(off), pe.min(end));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - off) as usize..(e - off) as usize];
            match p {
                Piece::Bytes { data, .. } => {
                    dst.copy_from_slice(&data[(s - ps) as usize..(e - ps) as usize])
                }
                Piece::Ram { gpa, .. } => self.view.copy(gpa + (s - ps), dst),
            }
        }
        self.writer.write(off, len, WriteSource::Bounce(bounce))
    }

    /// File ranges of the first pass: metadata and the RAM the memfd holds pages for; also
    /// the bytes left sparse.
    fn first_pass_ranges(&self, layout: &Layout) -> (Vec<(u64, u64)>, u64) {
        let mut ranges = Vec::new();
        let mut sparse = 0;
        for p in &layout.pieces {
            match *p {
                Piece::Bytes { .. } => ranges.push(p.file_range()),
                Piece::Ram { offset, gpa, len } => {
                    let mut data = 0;
                    for (s, e) in self.view.data_extents(gpa, gpa + len) {
                        ranges.push((offset + (s - gpa), offset + (e - gpa)));
                        data += e - s;
                    }
                    sparse += len - data;
                }
            }
        }
        (aligned(ranges), sparse)
    }

    fn dirty_ranges(layout: &Layout, dirty: &DirtyBitmap) -> Vec<(u64, u64)> {
        let ranges = dirty
            .runs()
            .into_iter()
            .flat_map(|(gpa, len)| layout.file_ranges_of(gpa, len))
            .collect();
        aligned(ranges)
    }

    fn drain(&mut self) -> Result<(), DumpError> {
        let r = self.writer.drain();
        r.map_err(self.io_err("writing"))
    }
}

pub(crate) fn dump(
    vm: &VmHandle,
    request: &DumpRequest,
    progress: &Progress,
    options: &DumpOptions,
) -> Result<DumpSummary, DumpError> {
    if vm.has_ended() {
        return Err(DumpError::NotRunning);
    }
    let started = Instant::now();
    let ram = vm.ram().clone();
    let _claim = Claim::take(&ram)?;
    let path: PathBuf = request.path.clone();
    let io_err = |what: &'static str| {
        let path = path.clone();
        move |source| DumpError::Io { what, path, source }
    };
    let view = RamView::open(&ram).map_err(io_err("mapping guest RAM for"))?;
    let mut notes = Vec::new();
    // Live needs working dirty logging: measured by the probe, not assumed.
    let live = request.live
        && match vmm::probe::cached_capabilities() {
            Ok(c) if c.dirty_log => true,
            Ok(_) => {
                notes.push("live: KVM dirty logging does not work here: pause-and-copy".into());
                false
            }
            Err(e) => {
                notes.push(format!(
                    "live: capability probe failed ({e}): pause-and-copy"
                ));
                false
            }
        };
    let writer = Writer::create(&path, options.io).map_err(io_err("creating"))?;
    let mut file = PartialFile {
        path: &path,
        keep: false,
    };
    notes.extend(writer.fallback.iter().cloned());
    let io_desc = writer.describe();
    let mut copier = Copier {
        view: &view,
        writer,
        progress,
        path: &path,
    };
    let ranges = [(0, ram.size())];
    let vcpus = vm.vcpu_count() as usize;
    let geometry = Layout::new(request.format, &ranges, &vec![None; vcpus])?;
    progress.total.store(geometry.file_size, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    progress.pass.store(1, Ordering::Relaxed);

    let mut passes = 1;
    let mut recopied = 0;
    let sparse;
    let paused_for;
    if live {
        let log = match vm.start_dirty_log() {
            Ok(log) => log,
            Err(vmm::VmError::Busy(_)) => return Err(DumpError::Busy),
            Err(e) => {
                return Err(DumpError::Io {
                    what: "starting dirty logging for",
                    path: path.clone(),
                    source: stdio::Error::other(e.to_string()),
                });
            }
        };
        let (first, holes) = copier.first_pass_ranges(&geometry);
        sparse = holes;
        copier.write(&geometry, &first)?;
        copier.drain()?;
        let mut previous = u64::MAX;
        let mut pending = None;
        while passes + 1 < options.max_passes.max(2) {
            let dirty = log.fetch().map_err(|e| DumpError::Io {
                what: "fetching the dirty log for",
                path: path.clone(),
                source: stdio::Error::other(e.to_string()),
            })?;
            let bytes = dirty.bytes();
            tracing::debug!(pass = passes + 1, dirty_kib = bytes >> 10, "live dump pass");
            if bytes <= options.small_dirty_bytes || bytes >= previous {
                pending = Some(dirty);
                break;
            }
            previous = bytes;
            passes += 1;
            progress.pass.store(passes, Ordering::Relaxed);
            recopied += copier.write(&geometry, &Copier::dirty_ranges(&geometry, &dirty))?;
            copier.drain()?;
        }
        let paused = Paused::pause(vm, options.pause_timeout)?;
        passes += 1;
        progress.pass.store(passes, Ordering::Relaxed);
        let mut last = log.fetch().map_err(|e| DumpError::Io {
            what: "fetching the dirty log for",
            path: path.clone(),
            source: stdio::Error::other(e.to_string()),
        })?;
        if let Some(p) = pending {
            last.merge(&p);
        }
        let layout = Layout::new(request.format, &ranges, &vm.vcpu_states())?;
        let mut todo = Copier::dirty_ranges(&layout, &last);
        if layout.metadata_end > 0 {
            todo.push((0, layout.metadata_end));
            todo = aligned(todo);
        }
        recopied += copier.write(&layout, &todo)?;
        copier.drain()?;
        paused_for = paused.resume();
        drop(log);
    } else {
        let paused = Paused::pause(vm, options.pause_timeout)?;
        let layout = Layout::new(request.format, &ranges, &vm.vcpu_states())?;
        let (first, holes) = copier.first_pass_ranges(&layout);
        sparse = holes;
        copier.write(&layout, &first)?;
        copier.drain()?;
        paused_for = paused.resume();
    }
    copier
        .writer
        .finish_file(geometry.file_size)
        .map_err(io_err("syncing"))?;
    file.keep = true;
    let seconds = started.elapsed().as_secs_f64();
    // Sparse pages cost no I/O: they are not counted as written, nor in the rate.
    let bytes = geometry.file_size - sparse + recopied;
    let summary = DumpSummary {
        path: path.display().to_string(),
        format: request.format,
        bytes,
        file_bytes: geometry.file_size,
        seconds,
        mib_per_s: bytes as f64 / (1u64 << 20) as f64 / seconds.max(1e-9),
        pause_ms: paused_for.as_secs_f64() * 1000.0,
        passes,
        live,
        io: io_desc,
        fallback: (!notes.is_empty()).then(|| notes.join("; ")),
        sparse_bytes: sparse,
        recopied_bytes: recopied,
    };
    tracing::info!(
        path = %summary.path,
        format = ?summary.format,
        mib = summary.file_bytes >> 20,
        seconds = summary.seconds,
        pause_ms = summary.pause_ms,
        passes = summary.passes,
        io = %summary.io,
        "memory dump written"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_aligned_outward_and_merged() {
        assert_eq!(
            aligned(vec![
                (0x2010, 0x2020),
                (0, 32),
                (0x1000, 0x1800),
                (0x5000, 0x6000)
            ]),
            vec![(0, 0x3000), (0x5000, 0x6000)]
        );
        assert_eq!(aligned(vec![]), vec![]);
    }

    #[test]
    fn the_view_finds_the_pages_a_memfd_holds() {
        let ram = GuestRam::new("dump-test", 64 << 12).unwrap();
        ram.write(3 << 12, &[1]).unwrap();
        ram.write((10 << 12) + 5, &[2; 8192]).unwrap();
        let view = RamView::open(&ram).unwrap();
        let ext = view.data_extents(0, 64 << 12);
        assert_eq!(ext, vec![(3 << 12, 4 << 12), (10 << 12, 13 << 12)]);
        assert_eq!(
            view.data_extents(11 << 12, 12 << 12),
            vec![(11 << 12, 12 << 12)]
        );
        let mut b = [0u8; 2];
        view.copy((10 << 12) + 4, &mut b);
        assert_eq!(b, [0, 2]);
        view.copy(u64::MAX, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
