//! The page-sharing hypercalls of the appliance VM: MEM_MAP, MEM_UNMAP, MAP_RANGE and
//! REVOKE_ALL, checked and served by `mmap(MAP_FIXED)` of the target's memfd over the
//! appliance's map window (zero-copy: later writes by the target are visible at once).
//!
//! # Checks, in order (each failure is an [`HcError`] in RAX; nothing is mapped)
//! 1. The target is still there (after [`Pager::retire`]: `NotPermitted`).
//! 2. The window pages lie inside the window (`OutsideWindow`) and are all unmapped (`Busy`).
//! 3. The target pages lie inside the target's RAM (`OutOfRange`).
//! 4. The 32-byte token is read from the caller's RAM at the given address, bounds-checked
//!    (`Fault`), and consumed from the target's token store: unknown or already used
//!    (`BadToken`), expired (`TokenExpired`), issued by another target of this shim
//!    (`WrongTarget`; the token is burnt). A token is consumed only once the addresses passed,
//!    so a typo does not cost the agent its token.
//!
//! # Read-only mappings
//! KVMI's GET_MAP_TOKEN carries no access mode, so every mapping is read-only
//! ([`hypercall::discovery::Features::WRITABLE_MAPS`] is not announced): the window's host
//! pages are mapped `PROT_READ` ([`RemapWindow::map_shared_readonly`]), so KVM maps them
//! read-only into the appliance and a write by the appliance exits instead of reaching the
//! target's page.

use std::sync::Arc;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hypercall::call::{PAGE_SIZE, Request, check_window};
use hypercall::error::HcError;
use hypercall::token::{MapToken, TOKEN_SIZE};

use kvmi_engine::Introspector;
use kvmi_engine::lock_order;
use kvmi_engine::tokens::TokenError;
use vmm::memory::GuestRam;
use vmm::sync::{RankedGuard, RankedMutex};
use vmm::window::RemapWindow;

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
        target: &GuestRam,
        target_gpa: u64,
        len: u64,
    ) -> Result<(), vmm::error::VmError> {
        match self {
            Backing::Remap(w) => w.map_shared_readonly(offset, target.memfd(), target_gpa, len),
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

/// Serves the page-sharing hypercalls of one appliance for one target.
pub struct Pager {
    target: Arc<Introspector>,
    target_ram: Arc<GuestRam>,
    others: Vec<Arc<Introspector>>,
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

/// The identity a target's token store binds its tokens to (see the engine).
fn target_id(ram: &GuestRam) -> u64 {
    ram.host_base() as u64
}

impl Pager {
    /// A pager mapping pages of `target` (whose RAM is `target_ram`) into `window`, which the
    /// appliance sees at guest-physical `window_gpa`. `others` are the other targets of this
    /// shim: their tokens are recognised (and refused with `WrongTarget`).
    pub fn new(
        target: Arc<Introspector>,
        target_ram: Arc<GuestRam>,
        others: Vec<Arc<Introspector>>,
        window: Arc<RemapWindow>,
        window_gpa: u64,
    ) -> Pager {
        Self::with_backing(
            target,
            target_ram,
            others,
            Backing::Remap(window),
            window_gpa,
        )
    }

    /// A pager for a host agent (guest-driver's host backend) whose window is the memfd
    /// `window` at guest-physical `window_gpa`: granted pages are copied in at map time (a
    /// snapshot; the one difference from the zero-copy VM path) and zeroed on unmap.
    pub fn new_copying(
        target: Arc<Introspector>,
        target_ram: Arc<GuestRam>,
        window: Arc<GuestRam>,
        window_gpa: u64,
    ) -> Pager {
        Self::with_backing(
            target,
            target_ram,
            Vec::new(),
            Backing::Copy(window),
            window_gpa,
        )
    }

    fn with_backing(
        target: Arc<Introspector>,
        target_ram: Arc<GuestRam>,
        others: Vec<Arc<Introspector>>,
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
    /// is). Requests other than the four page calls are `InvalidArgument`.
    pub fn serve(&self, request: &Request, caller_ram: &GuestRam) -> Result<u64, HcError> {
        let result = match *request {
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
        };
        if let Err(e) = result {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?request, "appliance page call refused: {e}");
        }
        result
    }

    fn read_token(caller_ram: &GuestRam, gpa: u64) -> Result<MapToken, HcError> {
        let mut bytes = [0u8; TOKEN_SIZE];
        caller_ram
            .read(gpa, &mut bytes)
            .map_err(|_| HcError::Fault)?;
        Ok(MapToken::from_bytes(bytes))
    }

    fn consume(&self, token: &MapToken) -> Result<(), HcError> {
        match self.target.tokens().consume(token) {
            Ok(grant) if grant.target == target_id(&self.target_ram) => Ok(()),
            Ok(_) => Err(HcError::WrongTarget),
            Err(TokenError::Expired) => Err(HcError::TokenExpired),
            Err(_) => {
                if self
                    .others
                    .iter()
                    .any(|o| o.tokens().consume(token).is_ok())
                {
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
