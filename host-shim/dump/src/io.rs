//! The output file and its writer: io_uring with several large writes in flight, O_DIRECT
//! where the file system accepts it, `pwrite` where io_uring is unavailable.
//!
//! Every write is `ALIGN`-aligned in offset, length and memory (O_DIRECT's rule): it comes
//! either straight from the dump's mapping of guest RAM or from one of a few aligned bounce
//! buffers. The caller keeps the source memory mapped until [`Writer::drain`] returns.

use std::alloc::{Layout as AllocLayout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use io_uring::{IoUring, opcode, types};

use crate::format::ALIGN;

/// Largest single write.
pub const CHUNK: usize = 4 << 20;
/// Writes in flight at once (io_uring).
pub const DEPTH: usize = 8;

/// Which write path to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoChoice {
    /// io_uring if the kernel allows it, else `pwrite`.
    #[default]
    Auto,
    /// `pwrite` only (the fallback, selectable for tests and benchmarks).
    Pwrite,
}

/// An aligned, zeroed heap buffer of [`CHUNK`] bytes.
pub struct Bounce {
    ptr: *mut u8,
}

// SAFETY: the buffer is plain heap memory owned by this value.
unsafe impl Send for Bounce {}

impl Bounce {
    fn layout() -> AllocLayout {
        // CHUNK and ALIGN are non-zero powers of two: the layout is valid.
        AllocLayout::from_size_align(CHUNK, ALIGN as usize).unwrap_or(AllocLayout::new::<u8>())
    }

    fn new() -> Bounce {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(Self::layout()) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout());
        }
        Bounce { ptr }
    }

    /// The buffer as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of CHUNK bytes owned by `self`; `&mut self`
        // makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, CHUNK) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.ptr, Self::layout()) };
    }
}

/// Where the bytes of one write come from.
pub enum Source {
    /// Memory the caller keeps mapped and readable until [`Writer::drain`].
    Mapped(*const u8),
    /// A bounce buffer, handed back to the writer's pool when the write completes.
    Bounce(Bounce),
}

struct Slot {
    source: Source,
    offset: u64,
    len: usize,
    done: usize,
}

enum Engine {
    Uring(Box<IoUring>),
    Pwrite,
}

/// The open output file and its write engine.
pub struct Writer {
    file: File,
    engine: Engine,
    slots: Vec<Option<Slot>>,
    in_flight: usize,
    pool: Vec<Bounce>,
    bounces: usize,
    direct: bool,
    /// Bytes written so far.
    pub written: u64,
    /// Why a preferred path was not taken.
    pub fallback: Vec<String>,
}

impl Writer {
    /// Creates (or truncates) `path`: O_DIRECT if the file system takes it, the io_uring
    /// engine unless `choice` or the kernel rules it out.
    pub fn create(path: &Path, choice: IoChoice) -> io::Result<Writer> {
        let mut fallback = Vec::new();
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.write(true).create(true).truncate(true).mode(0o600);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                fallback.push("O_DIRECT refused by the file system (EINVAL): buffered".into());
                (open(false)?, false)
            }
            Err(e) => return Err(e),
        };
        let engine = match choice {
            IoChoice::Pwrite => {
                fallback.push("pwrite requested".into());
                Engine::Pwrite
            }
            IoChoice::Auto => match uring_disabled() {
                Some(why) => {
                    fallback.push(why);
                    Engine::Pwrite
                }
                None => match IoUring::new(DEPTH as u32 * 2) {
                    Ok(r) => Engine::Uring(Box::new(r)),
                    Err(e) => {
                        fallback.push(format!("io_uring unavailable ({e}): pwrite"));
                        Engine::Pwrite
                    }
                },
            },
        };
        Ok(Writer {
            file,
            engine,
            slots: (0..DEPTH).map(|_| None).collect(),
            in_flight: 0,
            pool: Vec::new(),
            bounces: 0,
            direct,
            written: 0,
            fallback,
        })
    }

    /// How bytes are written: `io_uring` or `pwrite`, `+O_DIRECT` when direct.
    pub fn describe(&self) -> String {
        let engine = match self.engine {
            Engine::Uring(_) => "io_uring",
            Engine::Pwrite => "pwrite",
        };
        if self.direct {
            format!("{engine}+O_DIRECT")
        } else {
            engine.to_string()
        }
    }

    /// A free bounce buffer (waits for a write to complete when all are in use).
    pub fn bounce(&mut self) -> io::Result<Bounce> {
        loop {
            if let Some(b) = self.pool.pop() {
                return Ok(b);
            }
            if self.bounces < DEPTH {
                self.bounces += 1;
                return Ok(Bounce::new());
            }
            self.reap(1)?;
        }
    }

    /// Writes `len` bytes (aligned; at most [`CHUNK`]) from `source` at `offset`. With
    /// io_uring it returns once the write is queued; every later call may reap completions.
    pub fn write(&mut self, offset: u64, len: usize, source: Source) -> io::Result<()> {
        debug_assert!(len <= CHUNK && offset.is_multiple_of(ALIGN));
        if matches!(self.engine, Engine::Pwrite) {
            let buf = match &source {
                // SAFETY: the caller keeps `len` bytes at `p` mapped and readable until the
                // write returns (it returns before this function does).
                Source::Mapped(p) => unsafe { std::slice::from_raw_parts(*p, len) },
                Source::Bounce(b) => {
                    // SAFETY: a bounce buffer holds CHUNK >= len bytes.
                    unsafe { std::slice::from_raw_parts(b.ptr, len) }
                }
            };
            self.file.write_all_at(buf, offset)?;
            self.written += len as u64;
            if let Source::Bounce(b) = source {
                self.pool.push(b);
            }
            return Ok(());
        }
        while self.in_flight == DEPTH {
            self.reap(1)?;
        }
        let index = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| io::Error::other("no free write slot"))?;
        self.slots[index] = Some(Slot {
            source,
            offset,
            len,
            done: 0,
        });
        self.submit(index)?;
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self, index: usize) -> io::Result<()> {
        let Engine::Uring(ring) = &mut self.engine else {
            return Ok(());
        };
        let Some(slot) = &self.slots[index] else {
            return Ok(());
        };
        let base = match &slot.source {
            Source::Mapped(p) => *p,
            Source::Bounce(b) => b.ptr.cast_const(),
        };
        let entry = opcode::Write::new(
            types::Fd(self.file.as_raw_fd()),
            base.wrapping_add(slot.done),
            (slot.len - slot.done) as u32,
        )
        .offset(slot.offset + slot.done as u64)
        .build()
        .user_data(index as u64);
        // SAFETY: the buffer stays valid until the completion is reaped: a bounce buffer is
        // owned by the slot, mapped memory is kept by the caller until `drain`, and `Drop`
        // drains before the ring goes away.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            ring.submit()?;
            // SAFETY: as above.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        ring.submit()?;
        Ok(())
    }

    /// Waits for at least `want` completions and handles every completion ready.
    fn reap(&mut self, want: usize) -> io::Result<()> {
        let Engine::Uring(ring) = &mut self.engine else {
            return Ok(());
        };
        if want > 0 {
            loop {
                match ring.submit_and_wait(want) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut first_error = None;
        for (index, result) in done {
            let index = index as usize;
            let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            if result < 0 {
                first_error.get_or_insert(io::Error::from_raw_os_error(-result));
                self.finish(index);
                continue;
            }
            if result == 0 {
                first_error.get_or_insert(io::Error::from(io::ErrorKind::WriteZero));
                self.finish(index);
                continue;
            }
            slot.done += result as usize;
            if slot.done < slot.len {
                // A short write: queue the rest.
                self.submit(index)?;
            } else {
                self.written += slot.len as u64;
                self.finish(index);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn finish(&mut self, index: usize) {
        if let Some(slot) = self.slots[index].take() {
            self.in_flight -= 1;
            if let Source::Bounce(b) = slot.source {
                self.pool.push(b);
            }
        }
    }

    /// Waits until every queued write has completed (the first error, if any).
    pub fn drain(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        while self.in_flight > 0 {
            // Keep reaping after an error: no write may outlive the memory it reads.
            if let Err(e) = self.reap(1)
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        result
    }

    /// Sets the file's final size (dropping O_DIRECT padding, covering trailing holes) and
    /// flushes it to the device.
    pub fn finish_file(&mut self, size: u64) -> io::Result<()> {
        self.drain()?;
        self.file.set_len(size)?;
        self.file.sync_all()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.drain() {
            tracing::debug!("dump writes failed while closing: {e}");
        }
    }
}

/// Why io_uring is off on this host (`/proc/sys/kernel/io_uring_disabled` = 2), if it is.
fn uring_disabled() -> Option<String> {
    let v = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    (v.trim() == "2").then(|| "io_uring disabled (kernel.io_uring_disabled = 2): pwrite".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes three chunks (one mapped, two bounced, one short) and reads them back.
    fn round_trip(choice: IoChoice) -> String {
        let dir =
            std::env::temp_dir().join(format!("kvmi-dump-io-{}-{choice:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let mut src = Bounce::new();
        src.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        let mut w = Writer::create(&path, choice).unwrap();
        let how = w.describe();
        w.write(0, CHUNK, Source::Mapped(src.ptr)).unwrap();
        for k in 1..3u8 {
            let mut b = w.bounce().unwrap();
            b.as_mut_slice().fill(k);
            let len = if k == 2 { 4096 } else { CHUNK };
            w.write(k as u64 * CHUNK as u64, len, Source::Bounce(b))
                .unwrap();
        }
        w.finish_file(2 * CHUNK as u64 + 100).unwrap();
        assert_eq!(w.written, 2 * CHUNK as u64 + 4096);
        drop(w);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 2 * CHUNK + 100);
        assert_eq!(data[..CHUNK], src.as_mut_slice()[..]);
        assert!(data[CHUNK..2 * CHUNK].iter().all(|&b| b == 1));
        assert!(data[2 * CHUNK..].iter().all(|&b| b == 2));
        std::fs::remove_dir_all(&dir).unwrap();
        how
    }

    #[test]
    fn uring_and_pwrite_write_the_same_bytes() {
        let uring = round_trip(IoChoice::Auto);
        let pwrite = round_trip(IoChoice::Pwrite);
        assert!(pwrite.starts_with("pwrite"), "{pwrite}");
        assert!(
            uring.starts_with("io_uring") || uring.starts_with("pwrite"),
            "{uring}"
        );
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let e = Writer::create(Path::new("/nonexistent-kvmi-dir/x"), IoChoice::Auto)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
