//! The page-sharing hypercalls of the appliance VM: MEM_MAP, MEM_UNMAP, MAP_RANGE and
//! REVOKE_ALL, checked and served by `mmap(MAP_FIXED)` of the target's memfd over the
//! appliance's map window (zero-copy: later writes by the target are visible at once).
//!
//! # Checks, in order (each failure is an [`HcError`] in RAX; nothing is mapped)
//! 1. The arguments obey the decoder's rules (`Unaligned`, `TooManyPages`): always true of a
//!    request from [`Request::decode`], checked again for one built otherwise.
//! 2. The target is still there (after [`Pager::retire`]: `NotPermitted`).
//! 3. The window pages lie inside the window (`OutsideWindow`) and are all unmapped (`Busy`).
//! 4. The target pages lie inside the target's RAM (`OutOfRange`).
//! 5. The 32-byte token is read from the caller's RAM at the given address, bounds-checked
//!    (`Fault`), and checked by the slot's [`TokenVerifier`] with the target's key alone:
//!    forged, tampered with, revoked or already used (`BadToken`), expired (`TokenExpired`),
//!    more tokens used this lifetime than the verifier remembers (`Busy`, nothing burnt), a
//!    good token of another target this pager knows of (`WrongTarget`; the token is burnt).
//!    A token is used up only once the addresses passed, so a typo does not cost the agent
//!    its token.
//!
//! # Who judges tokens
//! A [`TokenVerifier`] holding the target's [`TargetKey`], which the supervisor (fleet,
//! launch, the host-agent server: [`hand_out_key`]) generated and gave to the target's
//! engine (the issuer) too. The check needs neither the engine nor any state it keeps, so it
//! carries over unchanged to an appliance in another process than its targets (issue 14).

//! # Read-only mappings
//! KVMI's GET_MAP_TOKEN carries no access mode, so every mapping is read-only
//! ([`hypercall::discovery::Features::WRITABLE_MAPS`] is not announced): the window's host
//! pages are mapped `PROT_READ` ([`RemapWindow::map_shared_readonly`]), so KVM maps them
//! read-only into the appliance and a write by the appliance exits instead of reaching the
//! target's page.

use std::sync::Arc;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hypercall::call::{MAX_RANGE_PAGES, PAGE_SIZE, Request, check_window};
use hypercall::error::HcError;
use hypercall::token::{MapToken, TOKEN_SIZE};

use kvmi_engine::Introspector;
use kvmi_engine::lock_order;
use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenError, TokenVerifier};
use vmm::memory::GuestRam;
use vmm::sync::{RankedGuard, RankedMutex};
use vmm::window::RemapWindow;

/// The supervisor's step for one target: a fresh [`TargetKey`] from the OS random source,
/// installed in the target's engine (its issuer: tokens of an older key are refused from now
/// on), and the verifier for the pager of the target's slot.
pub fn hand_out_key(target: &Introspector) -> Result<Arc<TokenVerifier>, TokenError> {
    let key = TargetKey::generate(target.token_target(), DEFAULT_TTL)?;
    target.tokens().rekey(key.clone());
    Ok(Arc::new(TokenVerifier::new(key)))
}

/// Counters of one pager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Pages mapped (all calls).
    pub pages_mapped: u64,
    /// Map calls that succeeded (MEM_MAP and MAP_RANGE).
    pub map_calls: u64,
    /// Pages unmapped (MEM_UNMAP, REVOKE_ALL, retire).
    pub pages_unmapped: u64,
    /// Calls refused with an error.
    pub refused: u64,
}

impl PagerStats {
    /// The counters of two pagers together.
    pub fn plus(self, other: PagerStats) -> PagerStats {
        PagerStats {
            pages_mapped: self.pages_mapped + other.pages_mapped,
            map_calls: self.map_calls + other.map_calls,
            pages_unmapped: self.pages_unmapped + other.pages_unmapped,
            refused: self.refused + other.refused,
        }
    }
}

/// The target memory a pager maps pages of.
enum TargetMemory {
    /// The target's RAM, in this process; its tokens are bound to its host base.
    Local(Arc<GuestRam>),
    /// The target's RAM memfd as the appliance process received it from the target's process
    /// (read-only, size sealed: [`Pager::new_remote`]), and the id its tokens are bound to.
    Remote {
        file: std::fs::File,
        len: u64,
        id: u64,
    },
}

impl TargetMemory {
    fn size(&self) -> u64 {
        match self {
            TargetMemory::Local(ram) => ram.size(),
            TargetMemory::Remote { len, .. } => *len,
        }
    }

    fn id(&self) -> u64 {
        match self {
            TargetMemory::Local(ram) => target_id(ram),
            TargetMemory::Remote { id, .. } => *id,
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            TargetMemory::Local(ram) => ram.memfd(),
            TargetMemory::Remote { file, .. } => std::os::fd::AsFd::as_fd(file),
        }
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), vmm::error::VmError> {
        match self {
            TargetMemory::Local(ram) => ram.read(gpa, buf),
            TargetMemory::Remote { file, .. } => {
                std::os::unix::fs::FileExt::read_exact_at(file, buf, gpa).map_err(|source| {
                    vmm::error::VmError::Memory {
                        what: "reading the target's RAM",
                        source,
                    }
                })
            }
        }
    }
}

/// Why [`Pager::new_remote`] refused a target's RAM.
#[derive(Debug, thiserror::Error)]
pub enum RemoteRamError {
    /// Its seals or flags could not be read.
    #[error("the target's RAM descriptor: {0}")]
    Io(#[from] std::io::Error),
    /// Its size is not sealed: the target could shrink it under the window's mappings.
    #[error("the target's RAM memfd is not sealed against shrinking")]
    NotSealed,
    /// It is open for writing: the window must not be able to write the target.
    #[error("the target's RAM descriptor is writable")]
    Writable,
    /// It is shorter than the size the target announced, or the size is not whole pages.
    #[error("the target's RAM is {file} bytes, {announced} announced")]
    Size {
        /// Bytes in the file.
        file: u64,
        /// Bytes announced.
        announced: u64,
    },
}

/// What backs the appliance's window.
enum Backing {
    /// An appliance VM's window: target pages are mapped over it, zero-copy.
    Remap(Arc<RemapWindow>),
    /// A host agent's window memfd (guest-driver's host backend): the shim cannot remap
    /// pages in another process, so granted pages are copied in at map time and zeroed on
    /// unmap. The checks are the same.
    Copy(Arc<GuestRam>),
}

impl Backing {
    fn len(&self) -> u64 {
        match self {
            Backing::Remap(w) => w.len(),
            Backing::Copy(m) => m.size(),
        }
    }

    fn map(
        &self,
        offset: u64,
        target: &TargetMemory,
        target_gpa: u64,
        len: u64,
    ) -> Result<(), vmm::error::VmError> {
        match self {
            Backing::Remap(w) => w.map_shared_readonly(offset, target.fd(), target_gpa, len),
            Backing::Copy(m) => {
                let mut page = vec![0u8; PAGE_SIZE as usize];
                for at in (0..len).step_by(PAGE_SIZE as usize) {
                    target.read(target_gpa + at, &mut page)?;
                    m.write(offset + at, &page)?;
                }
                Ok(())
            }
        }
    }

    fn revoke(&self, offset: u64, len: u64) -> Result<(), vmm::error::VmError> {
        match self {
            Backing::Remap(w) => w.revoke(offset, len),
            Backing::Copy(m) => {
                let zero = vec![0u8; PAGE_SIZE as usize];
                for at in (0..len).step_by(PAGE_SIZE as usize) {
                    m.write(offset + at, &zero)?;
                }
                Ok(())
            }
        }
    }
}

/// The argument rules of [`Request::decode`] that the pager relies on, checked again because
/// [`Pager::serve`] takes any [`Request`] (its fields are public): page-aligned target and
/// window addresses (`Unaligned`), an 8-aligned token address (`Unaligned`), 1..=
/// [`MAX_RANGE_PAGES`] pages (`TooManyPages`). Without them a copying window would copy a
/// grant across two window pages and zero an unmapped page's neighbour on unmap (leaving
/// target bytes in a page the pager counts as unmapped), and a remapped window would burn
/// the token before `mmap` refused the offset. Wrapping ranges are refused by the checked
/// arithmetic of the calls themselves.
fn check_arguments(request: &Request) -> Result<(), HcError> {
    let aligned = |gpa: u64, to: u64| {
        if gpa.is_multiple_of(to) {
            Ok(())
        } else {
            Err(HcError::Unaligned)
        }
    };
    let (token_gpa, target_gpa, window_gpa, pages) = match *request {
        Request::MemMap {
            token_gpa,
            target_gpa,
            window_gpa,
        } => (token_gpa, target_gpa, window_gpa, 1),
        Request::MapRange {
            token_gpa,
            target_gpa,
            window_gpa,
            pages,
        } => (token_gpa, target_gpa, window_gpa, pages),
        Request::MemUnmap { window_gpa } => return aligned(window_gpa, PAGE_SIZE),
        _ => return Ok(()),
    };
    if pages == 0 || pages > MAX_RANGE_PAGES {
        return Err(HcError::TooManyPages);
    }
    aligned(target_gpa, PAGE_SIZE)?;
    aligned(window_gpa, PAGE_SIZE)?;
    aligned(token_gpa, 8)
}

/// Serves the page-sharing hypercalls of one appliance for one target.
pub struct Pager {
    target: Arc<TokenVerifier>,
    target_ram: TargetMemory,
    others: Vec<Arc<TokenVerifier>>,
    window: Backing,
    window_gpa: u64,
    mapped: RankedMutex<Vec<bool>>,
    retired: AtomicBool,
    pages_mapped: AtomicU64,
    map_calls: AtomicU64,
    pages_unmapped: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("window_gpa", &format_args!("{:#x}", self.window_gpa))
            .field("window_len", &self.window.len())
            .field("stats", &self.stats())
            .finish()
    }
}

/// The identity a target's tokens are bound to (`Introspector::token_target`).
fn target_id(ram: &GuestRam) -> u64 {
    ram.host_base() as u64
}

impl Pager {
    /// A pager mapping pages of the target whose RAM is `target_ram` into `window`, which the
    /// appliance sees at guest-physical `window_gpa`, for tokens `target` verifies (its key
    /// bound to `target_ram.host_base()`, as an introspector binds its own). `others` verify
    /// the tokens of other targets of this shim: theirs are recognised (and refused with
    /// `WrongTarget`).
    pub fn new(
        target: Arc<TokenVerifier>,
        target_ram: Arc<GuestRam>,
        others: Vec<Arc<TokenVerifier>>,
        window: Arc<RemapWindow>,
        window_gpa: u64,
    ) -> Pager {
        Self::with_backing(
            target,
            TargetMemory::Local(target_ram),
            others,
            Backing::Remap(window),
            window_gpa,
        )
    }

    /// A pager for a target in another process: `ram` is its RAM memfd as the link delivered
    /// it ([`crate::vhost_link::TargetRam`]), which must be open read-only and sealed against
    /// shrinking (a target that could truncate it would turn the window's mappings into
    /// `SIGBUS`/`EFAULT` for the appliance) and at least `ram.len` bytes of whole pages. Its
    /// tokens are bound to the id `target`'s key carries (the target process's
    /// `Introspector::token_target`).
    pub fn new_remote(
        target: Arc<TokenVerifier>,
        ram: crate::vhost_link::TargetRam,
        others: Vec<Arc<TokenVerifier>>,
        window: Arc<RemapWindow>,
        window_gpa: u64,
    ) -> Result<Pager, RemoteRamError> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::from(ram.fd);
        let fd = file.as_raw_fd();
        // SAFETY: F_GETFL and F_GET_SEALS on a descriptor we own; no pointer arguments.
        let (flags, seals) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GET_SEALS),
            )
        };
        if flags < 0 || seals < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(RemoteRamError::Writable);
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RemoteRamError::NotSealed);
        }
        let size = file.metadata()?.len();
        if size < ram.len || !ram.len.is_multiple_of(PAGE_SIZE) {
            return Err(RemoteRamError::Size {
                file: size,
                announced: ram.len,
            });
        }
        let id = target.target();
        Ok(Self::with_backing(
            target,
            TargetMemory::Remote {
                file,
                len: ram.len,
                id,
            },
            others,
            Backing::Remap(window),
            window_gpa,
        ))
    }

    /// A pager for a host agent (guest-driver's host backend) whose window is the memfd
    /// `window` at guest-physical `window_gpa`: granted pages are copied in at map time (a
    /// snapshot; the one difference from the zero-copy VM path) and zeroed on unmap.
    pub fn new_copying(
        target: Arc<TokenVerifier>,
        target_ram: Arc<GuestRam>,
        window: Arc<GuestRam>,
        window_gpa: u64,
    ) -> Pager {
        Self::with_backing(
            target,
            TargetMemory::Local(target_ram),
            Vec::new(),
            Backing::Copy(window),
            window_gpa,
        )
    }

    fn with_backing(
        target: Arc<TokenVerifier>,
        target_ram: TargetMemory,
        others: Vec<Arc<TokenVerifier>>,
        window: Backing,
        window_gpa: u64,
    ) -> Pager {
        let pages = (window.len() / PAGE_SIZE) as usize;
        Pager {
            target,
            target_ram,
            others,
            window,
            window_gpa,
            mapped: RankedMutex::new(lock_order::PAGER_MAPPED, vec![false; pages]),
            retired: AtomicBool::new(false),
            pages_mapped: AtomicU64::new(0),
            map_calls: AtomicU64::new(0),
            pages_unmapped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Guest-physical base of the window.
    pub fn window_gpa(&self) -> u64 {
        self.window_gpa
    }

    /// Size of the window in bytes.
    pub fn window_len(&self) -> u64 {
        self.window.len()
    }

    /// Whether window address `gpa` is inside this pager's window.
    pub fn window_contains(&self, gpa: u64) -> bool {
        gpa.checked_sub(self.window_gpa)
            .is_some_and(|offset| offset < self.window.len())
    }

    /// The VM window (its host mapping is what the appliance sees); None for a host agent.
    pub fn window(&self) -> Option<&Arc<RemapWindow>> {
        match &self.window {
            Backing::Remap(w) => Some(w),
            Backing::Copy(_) => None,
        }
    }

    /// The counters.
    pub fn stats(&self) -> PagerStats {
        PagerStats {
            pages_mapped: self.pages_mapped.load(Ordering::Relaxed),
            map_calls: self.map_calls.load(Ordering::Relaxed),
            pages_unmapped: self.pages_unmapped.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Number of window pages mapped now.
    pub fn mapped_pages(&self) -> usize {
        self.lock().iter().filter(|m| **m).count()
    }

    fn lock(&self) -> RankedGuard<'_, Vec<bool>> {
        self.mapped.lock()
    }

    /// Serves one decoded map request; `caller_ram` is the appliance's RAM (where the token
    /// is). Requests other than the four page calls are `InvalidArgument`. A request built
    /// without [`Request::decode`] gets the decoder's argument checks first (see
    /// `check_arguments`).
    pub fn serve(&self, request: &Request, caller_ram: &GuestRam) -> Result<u64, HcError> {
        let result = check_arguments(request).and_then(|()| self.dispatch(request, caller_ram));
        if let Err(e) = result {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?request, "appliance page call refused: {e}");
        }
        result
    }

    fn dispatch(&self, request: &Request, caller_ram: &GuestRam) -> Result<u64, HcError> {
        match *request {
            Request::MemMap {
                token_gpa,
                target_gpa,
                window_gpa,
            } => self
                .map(token_gpa, target_gpa, window_gpa, 1, caller_ram)
                .map(|_| 0),
            Request::MapRange {
                token_gpa,
                target_gpa,
                window_gpa,
                pages,
            } => self.map(token_gpa, target_gpa, window_gpa, pages, caller_ram),
            Request::MemUnmap { window_gpa } => self.unmap(window_gpa).map(|_| 0),
            Request::RevokeAll => Ok(self.revoke_all() as u64),
            _ => Err(HcError::InvalidArgument),
        }
    }

    fn read_token(caller_ram: &GuestRam, gpa: u64) -> Result<MapToken, HcError> {
        let mut bytes = [0u8; TOKEN_SIZE];
        caller_ram
            .read(gpa, &mut bytes)
            .map_err(|_| HcError::Fault)?;
        Ok(MapToken::from_bytes(bytes))
    }

    fn consume(&self, token: &MapToken) -> Result<(), HcError> {
        match self.target.verify(token) {
            Ok(grant) if grant.target == self.target_ram.id() => Ok(()),
            Ok(_) => Err(HcError::WrongTarget),
            Err(TokenError::Expired) => Err(HcError::TokenExpired),
            Err(TokenError::Full) => Err(HcError::Busy),
            Err(_) => {
                if self.others.iter().any(|o| o.verify(token).is_ok()) {
                    Err(HcError::WrongTarget)
                } else {
                    Err(HcError::BadToken)
                }
            }
        }
    }

    fn map(
        &self,
        token_gpa: u64,
        target_gpa: u64,
        window_gpa: u64,
        pages: u64,
        caller_ram: &GuestRam,
    ) -> Result<u64, HcError> {
        if self.retired.load(Ordering::SeqCst) {
            return Err(HcError::NotPermitted);
        }
        check_window(window_gpa, pages, self.window_gpa, self.window.len())?;
        let bytes = pages.checked_mul(PAGE_SIZE).ok_or(HcError::TooManyPages)?;
        let first = ((window_gpa - self.window_gpa) / PAGE_SIZE) as usize;
        let mut mapped = self.lock();
        let slots = mapped
            .get_mut(first..first + pages as usize)
            .ok_or(HcError::OutsideWindow)?;
        if slots.iter().any(|m| *m) {
            return Err(HcError::Busy);
        }
        let end = target_gpa.checked_add(bytes).ok_or(HcError::OutOfRange)?;
        if end > self.target_ram.size() {
            return Err(HcError::OutOfRange);
        }
        let token = Self::read_token(caller_ram, token_gpa)?;
        self.consume(&token)?;
        self.window
            .map(
                window_gpa - self.window_gpa,
                &self.target_ram,
                target_gpa,
                bytes,
            )
            .map_err(|e| {
                tracing::error!("mapping target pages into the window: {e}");
                HcError::NoMemory
            })?;
        slots.fill(true);
        self.pages_mapped.fetch_add(pages, Ordering::Relaxed);
        self.map_calls.fetch_add(1, Ordering::Relaxed);
        Ok(pages)
    }

    fn unmap(&self, window_gpa: u64) -> Result<(), HcError> {
        check_window(window_gpa, 1, self.window_gpa, self.window.len())?;
        let index = ((window_gpa - self.window_gpa) / PAGE_SIZE) as usize;
        let mut mapped = self.lock();
        let slot = mapped.get_mut(index).ok_or(HcError::OutsideWindow)?;
        if !*slot {
            return Err(HcError::NotMapped);
        }
        self.window
            .revoke(window_gpa - self.window_gpa, PAGE_SIZE)
            .map_err(|e| {
                tracing::error!("restoring a window page: {e}");
                HcError::NoMemory
            })?;
        *slot = false;
        self.pages_unmapped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Puts the zero placeholder back over every mapped window page; returns how many pages
    /// were mapped. Runs of consecutive pages are revoked with one `mmap` each.
    pub fn revoke_all(&self) -> usize {
        let mut mapped = self.lock();
        let mut count = 0;
        let mut i = 0;
        while i < mapped.len() {
            if !mapped[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < mapped.len() && mapped[i] {
                i += 1;
            }
            let (offset, len) = (start as u64 * PAGE_SIZE, (i - start) as u64 * PAGE_SIZE);
            match self.window.revoke(offset, len) {
                Ok(()) => {
                    mapped[start..i].fill(false);
                    count += i - start;
                }
                Err(e) => tracing::error!("revoking window pages at {offset:#x}: {e}"),
            }
        }
        self.pages_unmapped
            .fetch_add(count as u64, Ordering::Relaxed);
        count
    }

    /// The target is gone or the appliance detached: revoke every mapping and refuse every
    /// later map call. Returns the number of pages revoked.
    pub fn retire(&self) -> usize {
        self.retired.store(true, Ordering::SeqCst);
        let n = self.revoke_all();
        if n > 0 {
            tracing::info!(pages = n, "revoked every page the target granted");
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use kvmi_engine::tokens::TokenIssuer;

    /// A copying pager over a bare issuer and verifier (no VM): 4 target pages, 4 window
    /// pages at `WINDOW`, the token at 0 of the caller's RAM.
    fn rig() -> (Pager, Arc<TokenIssuer>, Arc<GuestRam>, Arc<GuestRam>) {
        let target = Arc::new(GuestRam::new("pager-target", 4 * PAGE_SIZE).unwrap());
        target
            .write(PAGE_SIZE, &[0xaa; PAGE_SIZE as usize])
            .unwrap();
        let key = TargetKey::generate(target.host_base() as u64, Duration::from_secs(60)).unwrap();
        let store = Arc::new(TokenIssuer::new(key.clone()));
        let verifier = Arc::new(TokenVerifier::new(key));
        let window = Arc::new(GuestRam::new("pager-window", 4 * PAGE_SIZE).unwrap());
        let caller = Arc::new(GuestRam::new("pager-caller", PAGE_SIZE).unwrap());
        let pager = Pager::new_copying(verifier, target, window.clone(), WINDOW);
        (pager, store, window, caller)
    }

    const WINDOW: u64 = 0x8000_0000;

    #[test]
    fn requests_the_decoder_would_refuse_are_refused_before_the_token() {
        let (pager, store, window, caller) = rig();
        caller.write(0, &store.issue().unwrap().to_bytes()).unwrap();
        let refused = [
            (
                Request::MemMap {
                    token_gpa: 0,
                    target_gpa: PAGE_SIZE + 1,
                    window_gpa: WINDOW,
                },
                HcError::Unaligned,
            ),
            (
                Request::MemMap {
                    token_gpa: 0,
                    target_gpa: PAGE_SIZE,
                    window_gpa: WINDOW + 1,
                },
                HcError::Unaligned,
            ),
            (
                Request::MapRange {
                    token_gpa: 0,
                    target_gpa: PAGE_SIZE,
                    window_gpa: WINDOW,
                    pages: 0,
                },
                HcError::TooManyPages,
            ),
            (
                Request::MemMap {
                    token_gpa: 4,
                    target_gpa: PAGE_SIZE,
                    window_gpa: WINDOW,
                },
                HcError::Unaligned,
            ),
        ];
        for (request, error) in refused {
            assert_eq!(pager.serve(&request, &caller), Err(error), "{request:?}");
            assert_eq!(store.outstanding(), 1, "{request:?} burnt the token");
        }
        let map = Request::MemMap {
            token_gpa: 0,
            target_gpa: PAGE_SIZE,
            window_gpa: WINDOW + PAGE_SIZE,
        };
        assert_eq!(pager.serve(&map, &caller), Ok(0));
        // An unaligned unmap would zero half of the granted page and half of its neighbour.
        let unmap = Request::MemUnmap {
            window_gpa: WINDOW + PAGE_SIZE + 0x800,
        };
        assert_eq!(pager.serve(&unmap, &caller), Err(HcError::Unaligned));
        assert_eq!(pager.revoke_all(), 1);
        let mut bytes = vec![0xffu8; 4 * PAGE_SIZE as usize];
        window.read(0, &mut bytes).unwrap();
        assert!(
            bytes.iter().all(|&b| b == 0),
            "target bytes left in the window"
        );
        assert_eq!(pager.stats().refused, 5);
    }

    /// `ram`'s memfd reopened through `/proc/self/fd` (`write`: read-write), as the link
    /// delivers a target's RAM to the appliance process.
    fn delivered(
        fd: std::os::fd::BorrowedFd<'_>,
        len: u64,
        write: bool,
    ) -> crate::vhost_link::TargetRam {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap();
        crate::vhost_link::TargetRam {
            fd: file.into(),
            len,
        }
    }

    #[test]
    fn a_remote_target_s_read_only_ram_is_mapped_zero_copy_under_its_key() {
        let target = GuestRam::new("kvmi-ram-remote", 4 * PAGE_SIZE).unwrap();
        target
            .write(PAGE_SIZE, &[0xaa; PAGE_SIZE as usize])
            .unwrap();
        // The id the target process's engine binds its tokens to (not an address here).
        let key = TargetKey::generate(77, Duration::from_secs(60)).unwrap();
        let issuer = TokenIssuer::new(key.clone());
        let window = Arc::new(RemapWindow::new(4 * PAGE_SIZE).unwrap());
        let pager = Pager::new_remote(
            Arc::new(TokenVerifier::new(key)),
            delivered(target.memfd(), 4 * PAGE_SIZE, false),
            Vec::new(),
            window.clone(),
            WINDOW,
        )
        .unwrap();
        let caller = GuestRam::new("pager-caller", PAGE_SIZE).unwrap();
        caller
            .write(0, &issuer.issue().unwrap().to_bytes())
            .unwrap();
        let map = Request::MemMap {
            token_gpa: 0,
            target_gpa: PAGE_SIZE,
            window_gpa: WINDOW + PAGE_SIZE,
        };
        assert_eq!(pager.serve(&map, &caller), Ok(0), "MEM_MAP returns 0");
        // SAFETY: the window's page 1 is mapped (read-only) for as long as `window` lives.
        let seen = |at: usize| unsafe { *window.host_base().add(PAGE_SIZE as usize + at) };
        assert_eq!(seen(0), 0xaa);
        // Zero-copy: the target's later write is there at once.
        target.write(PAGE_SIZE + 8, &[0x55]).unwrap();
        assert_eq!(seen(8), 0x55);
        // Out of the announced range, and a used token: refused.
        caller
            .write(0, &issuer.issue().unwrap().to_bytes())
            .unwrap();
        let beyond = Request::MemMap {
            token_gpa: 0,
            target_gpa: 4 * PAGE_SIZE,
            window_gpa: WINDOW,
        };
        assert_eq!(pager.serve(&beyond, &caller), Err(HcError::OutOfRange));
        assert_eq!(pager.stats().pages_mapped, 1);
    }

    #[test]
    fn a_remote_target_s_ram_must_be_read_only_sealed_and_as_long_as_announced() {
        let window = || Arc::new(RemapWindow::new(4 * PAGE_SIZE).unwrap());
        let verifier = || {
            Arc::new(TokenVerifier::new(
                TargetKey::generate(1, Duration::from_secs(60)).unwrap(),
            ))
        };
        let target = GuestRam::new("kvmi-ram-checked", 4 * PAGE_SIZE).unwrap();
        let writable = delivered(target.memfd(), 4 * PAGE_SIZE, true);
        assert!(matches!(
            Pager::new_remote(verifier(), writable, Vec::new(), window(), WINDOW),
            Err(RemoteRamError::Writable)
        ));
        let longer = delivered(target.memfd(), 8 * PAGE_SIZE, false);
        assert!(matches!(
            Pager::new_remote(verifier(), longer, Vec::new(), window(), WINDOW),
            Err(RemoteRamError::Size { .. })
        ));
        // A memfd whose size is not sealed (the target could shrink it under the window).
        let page = kvmi_engine::tokens::TokenPage::create("kvmi-ram-unsealed").unwrap();
        let unsealed = delivered(std::os::fd::AsFd::as_fd(page.file()), PAGE_SIZE, false);
        assert!(matches!(
            Pager::new_remote(verifier(), unsealed, Vec::new(), window(), WINDOW),
            Err(RemoteRamError::NotSealed)
        ));
    }
}
