//! The appliance's page calls (MEM_MAP, MAP_RANGE, MEM_UNMAP, REVOKE_ALL) against a
//! memory-only pager: a hostile appliance VM (any registers, any token bytes, any timing)
//! must never see a byte of the target it was not granted.
//!
//! Fixture (made once, restored after every input): a 64-page target RAM whose every word
//! is its page number, tagged ([`target_word`]); a 32-page window, remapped
//! (`Pager::new`, the appliance VM's) or copying (`Pager::new_copying`, a host agent's); a
//! 16-page caller RAM where tokens are placed; per input, a fresh target key shared by a
//! `TokenIssuer` and the pager's `TokenVerifier` on a manual clock, another target's key,
//! issuer and verifier (its tokens are `WrongTarget`) and an `ApplianceHook`, whose `call`
//! decodes the doorbell registers as the VM exit does.
//!
//! Input: [`kvmi_fuzz::pager::Input`]: a configuration byte, then operations (issue, forge,
//! replay and corrupt tokens; move the clock; page calls through the registers or straight to
//! `Pager::serve`; target writes; retire). A model follows every call: the window page →
//! target page grants, both issuers' outstanding tokens, the tokens each verifier used up, and
//! the counters. After every
//! operation:
//! - every window page, read through the pager's own view of the window (the
//!   `RemapWindow`'s host mapping the appliance VM sees, or the copying window's memfd), is
//!   all zeros where the model grants nothing and exactly the granted target page where it
//!   grants one (its current contents when remapped, those at map time when copied);
//! - `mapped_pages`, the counters and both issuers' outstanding tokens match the model;
//! - a call through the registers returns exactly the model's result: the decoder's error
//!   for registers it refuses, else the pager's documented checks in their documented order
//!   (retired, window, busy, target range, token address, token); the model changes only
//!   on success, so a refused call changes nothing but the token it burnt;
//! - a token maps at most once;
//! - a request straight to `serve` that the decoder would refuse (unaligned, no pages, too
//!   many, wrapping) is refused with a documented argument error before the token is
//!   looked at, and changes nothing.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use appliance_link::ApplianceHook;
use appliance_link::hook::SERVED_FEATURES;
use appliance_link::pager::{Pager, PagerStats};
use appliance_link::rings::Waker;
use hypercall::call::{Hypercall, HypercallRegs, Request};
use hypercall::discovery::ABI_VERSION;
use hypercall::error::HcError;
use hypercall::token::TOKEN_SIZE;
use kvmi_engine::tokens::{
    Clock, MAX_OUTSTANDING, TargetKey, TokenError, TokenIssuer, TokenVerifier,
};
use kvmi_fuzz::pager::{
    Addr, CALLER_PAGES, Input, Op, PAGE, ServeKind, TARGET_PAGES, TOKEN, TOKEN_SLOTS, TTL_MS,
    WINDOW_PAGES, target_word,
};
use libfuzzer_sys::fuzz_target;
use vmm::memory::GuestRam;
use vmm::window::RemapWindow;

const WINDOW_BYTES: u64 = WINDOW_PAGES * PAGE;
const TARGET_BYTES: u64 = TARGET_PAGES * PAGE;
const CALLER_BYTES: u64 = CALLER_PAGES * PAGE;

/// Memory shared by every input (restored after each).
struct Fixture {
    target: Arc<GuestRam>,
    caller: Arc<GuestRam>,
    remap: Arc<RemapWindow>,
    copy: Arc<GuestRam>,
}

/// Sets every word of `page` (one page of bytes) to `word`, unless it already is (judged by
/// the first word: the buffer is only ever filled whole). By doubling copies: a loop over the
/// words would be instrumented access by access.
fn fill_page(page: &mut [u8], word: u64) {
    if page[..8] == word.to_le_bytes() {
        return;
    }
    page[..8].copy_from_slice(&word.to_le_bytes());
    let mut filled = 8;
    while filled < page.len() {
        let n = filled.min(page.len() - filled);
        page.copy_within(..n, filled);
        filled += n;
    }
}

fn fill_target_page(ram: &GuestRam, page: u64, generation: u64) {
    let mut bytes = vec![1; PAGE as usize];
    fill_page(&mut bytes, target_word(page, generation));
    ram.write(page * PAGE, &bytes).expect("target page");
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let target = Arc::new(GuestRam::new("fuzz-target", TARGET_BYTES).expect("target RAM"));
        for page in 0..TARGET_PAGES {
            fill_target_page(&target, page, 0);
        }
        Fixture {
            target,
            caller: Arc::new(GuestRam::new("fuzz-caller", CALLER_BYTES).expect("caller RAM")),
            remap: Arc::new(RemapWindow::new(WINDOW_BYTES).expect("window")),
            copy: Arc::new(GuestRam::new("fuzz-window", WINDOW_BYTES).expect("copy window")),
        }
    })
}

/// A clock that moves only when the input says so.
#[derive(Debug)]
struct ManualClock {
    base: Duration,
    ms: AtomicU64,
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        self.base + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

#[derive(Clone, Copy)]
struct Outstanding {
    bytes: [u8; TOKEN_SIZE],
    issued_ms: u64,
}

/// What the pager, the issuers and the verifiers should hold.
#[derive(Default)]
struct Model {
    now_ms: u64,
    /// Outstanding tokens of the target's issuer and of the other target's: issued, not
    /// used (possibly expired: an issuer drops those when it next issues).
    own: Vec<Outstanding>,
    other: Vec<Outstanding>,
    /// Every token each issuer issued (bytes → issue time), and those its verifier used up.
    own_issued: HashMap<[u8; TOKEN_SIZE], u64>,
    other_issued: HashMap<[u8; TOKEN_SIZE], u64>,
    own_used: HashSet<[u8; TOKEN_SIZE]>,
    other_used: HashSet<[u8; TOKEN_SIZE]>,
    /// Every token ever issued (for replays).
    issued: Vec<[u8; TOKEN_SIZE]>,
    /// Tokens that mapped something.
    used: HashSet<[u8; TOKEN_SIZE]>,
    /// Window page → (target page, the target page's generation when mapped).
    grants: HashMap<u64, (u64, u64)>,
    /// Write generation of every target page.
    generation: Vec<u64>,
    retired: bool,
    /// Whether the pager knows the other target (the copying pager knows none).
    other_listed: bool,
    stats: PagerStats,
}

impl Model {
    fn expired(&self, issued_ms: u64) -> bool {
        self.now_ms - issued_ms >= TTL_MS
    }

    /// The pager's token check of `bytes` (its verifier, then the other target's): only an
    /// issued token's bytes carry a good tag (any other bytes, a corrupted token's included,
    /// are `BadToken`); expiry is judged before use.
    fn consume(&mut self, bytes: &[u8; TOKEN_SIZE]) -> Result<(), HcError> {
        if let Some(&issued_ms) = self.own_issued.get(bytes) {
            if self.expired(issued_ms) {
                return Err(HcError::TokenExpired);
            }
            if !self.own_used.insert(*bytes) {
                return Err(HcError::BadToken);
            }
            // The verifier's use notice frees the issuer's slot.
            self.own.retain(|t| &t.bytes != bytes);
            return Ok(());
        }
        if !self.other_listed {
            return Err(HcError::BadToken);
        }
        if let Some(&issued_ms) = self.other_issued.get(bytes) {
            // Another target's good token is burnt; an expired or used one is just unknown.
            if self.expired(issued_ms) || !self.other_used.insert(*bytes) {
                return Err(HcError::BadToken);
            }
            self.other.retain(|t| &t.bytes != bytes);
            return Err(HcError::WrongTarget);
        }
        Err(HcError::BadToken)
    }

    fn window_page(&self, base: u64, gpa: u64, pages: u64) -> Result<u64, HcError> {
        let (gpa, base) = (u128::from(gpa), u128::from(base));
        if gpa < base
            || gpa + u128::from(pages) * u128::from(PAGE) > base + u128::from(WINDOW_BYTES)
        {
            return Err(HcError::OutsideWindow);
        }
        Ok(((gpa - base) / u128::from(PAGE)) as u64)
    }

    /// MEM_MAP / MAP_RANGE of a decodable request, in the documented order of checks.
    fn map(
        &mut self,
        fx: &Fixture,
        base: u64,
        (token_gpa, target_gpa, window_gpa, pages): (u64, u64, u64, u64),
    ) -> Result<u64, HcError> {
        if self.retired {
            return Err(HcError::NotPermitted);
        }
        let first = self.window_page(base, window_gpa, pages)?;
        if (first..first + pages).any(|p| self.grants.contains_key(&p)) {
            return Err(HcError::Busy);
        }
        if u128::from(target_gpa) + u128::from(pages) * u128::from(PAGE) > u128::from(TARGET_BYTES)
        {
            return Err(HcError::OutOfRange);
        }
        if u128::from(token_gpa) + u128::from(TOKEN) > u128::from(CALLER_BYTES) {
            return Err(HcError::Fault);
        }
        let mut bytes = [0u8; TOKEN_SIZE];
        fx.caller.read(token_gpa, &mut bytes).expect("token bytes");
        self.consume(&bytes)?;
        assert!(self.used.insert(bytes), "a token mapped twice");
        for k in 0..pages {
            let t = target_gpa / PAGE + k;
            self.grants
                .insert(first + k, (t, self.generation[t as usize]));
        }
        self.stats.pages_mapped += pages;
        self.stats.map_calls += 1;
        Ok(pages)
    }

    fn unmap(&mut self, base: u64, window_gpa: u64) -> Result<u64, HcError> {
        let page = self.window_page(base, window_gpa, 1)?;
        self.grants.remove(&page).ok_or(HcError::NotMapped)?;
        self.stats.pages_unmapped += 1;
        Ok(0)
    }

    fn revoke_all(&mut self) -> u64 {
        let n = self.grants.len() as u64;
        self.grants.clear();
        self.stats.pages_unmapped += n;
        n
    }

    /// What `Pager::serve` answers to a request the decoder accepts.
    fn serve(&mut self, fx: &Fixture, base: u64, request: &Request) -> Result<u64, HcError> {
        let result = match *request {
            Request::MemMap {
                token_gpa,
                target_gpa,
                window_gpa,
            } => self
                .map(fx, base, (token_gpa, target_gpa, window_gpa, 1))
                .map(|_| 0),
            Request::MapRange {
                token_gpa,
                target_gpa,
                window_gpa,
                pages,
            } => self.map(fx, base, (token_gpa, target_gpa, window_gpa, pages)),
            Request::MemUnmap { window_gpa } => self.unmap(base, window_gpa),
            Request::RevokeAll => Ok(self.revoke_all()),
            _ => Err(HcError::InvalidArgument),
        };
        if result.is_err() {
            self.stats.refused += 1;
        }
        result
    }
}

struct Run<'a> {
    fx: &'a Fixture,
    copying: bool,
    base: u64,
    clock: Arc<ManualClock>,
    own: Arc<TokenIssuer>,
    other: Arc<TokenIssuer>,
    pager: Arc<Pager>,
    hook: ApplianceHook,
    model: Model,
    view: Vec<u8>,
    /// One page of what the window should read (see `fill_page`).
    expected: Vec<u8>,
}

impl Run<'_> {
    fn token_gpa(slot: u16) -> u64 {
        u64::from(slot) % TOKEN_SLOTS * TOKEN
    }

    fn resolve_token(a: Addr) -> u64 {
        a.resolve(0, TOKEN, TOKEN_SLOTS)
    }

    fn resolve_target(a: Addr) -> u64 {
        a.resolve(0, PAGE, TARGET_PAGES)
    }

    fn resolve_window(&self, a: Addr) -> u64 {
        a.resolve(self.base, PAGE, WINDOW_PAGES)
    }

    fn issue(&mut self, other: bool, slot: u16) {
        let (store, list, issued) = if other {
            (
                &self.other,
                &mut self.model.other,
                &mut self.model.other_issued,
            )
        } else {
            (&self.own, &mut self.model.own, &mut self.model.own_issued)
        };
        let now = self.model.now_ms;
        list.retain(|t| now - t.issued_ms < TTL_MS);
        let got = store.issue();
        if list.len() >= MAX_OUTSTANDING {
            assert_eq!(got.err(), Some(TokenError::TooMany));
            return;
        }
        let token = got.expect("a token when fewer than eight are outstanding");
        let bytes = token.to_bytes();
        assert!(!token.is_zero());
        assert!(!self.model.issued.contains(&bytes), "a token issued twice");
        list.push(Outstanding {
            bytes,
            issued_ms: now,
        });
        issued.insert(bytes, now);
        self.model.issued.push(bytes);
        self.fx
            .caller
            .write(Self::token_gpa(slot), &bytes)
            .expect("token slot");
    }

    /// A call through the doorbell registers, as the appliance's exit makes it.
    fn doorbell(&mut self, regs: HypercallRegs) {
        let got = self.hook.call(&regs, &self.fx.caller);
        let expected = match Request::decode(&regs) {
            Err(e) => Err(e),
            Ok(Request::Version) => Ok(u64::from(ABI_VERSION)),
            Ok(Request::Features) => Ok(SERVED_FEATURES.0),
            Ok(Request::Notify { .. }) => Ok(0),
            Ok(Request::Agent) => Err(HcError::NotPermitted),
            Ok(request) => self.model.serve(self.fx, self.base, &request),
        };
        assert_eq!(got, expected, "{regs:x?}");
    }

    /// A request straight to `Pager::serve`.
    fn serve(&mut self, request: Request) {
        let got = self.pager.serve(&request, &self.fx.caller);
        if Request::decode(&request.encode()) == Ok(request) {
            let expected = self.model.serve(self.fx, self.base, &request);
            assert_eq!(got, expected, "{request:x?}");
            return;
        }
        // The decoder would refuse it: so must the pager, before it looks at the token.
        self.model.stats.refused += 1;
        match got {
            Err(
                HcError::Unaligned
                | HcError::TooManyPages
                | HcError::OutsideWindow
                | HcError::OutOfRange
                | HcError::Fault
                | HcError::Busy
                | HcError::NotMapped
                | HcError::NotPermitted,
            ) => {}
            other => panic!("{request:x?} (the decoder refuses it) served: {other:?}"),
        }
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Issue { other, slot } => self.issue(other, slot),
            Op::Forge { slot, bytes } => self
                .fx
                .caller
                .write(Self::token_gpa(slot), &bytes)
                .expect("token slot"),
            Op::Replay { slot, which } => {
                if !self.model.issued.is_empty() {
                    let bytes = self.model.issued[usize::from(which) % self.model.issued.len()];
                    self.fx
                        .caller
                        .write(Self::token_gpa(slot), &bytes)
                        .expect("token slot");
                }
            }
            Op::Corrupt { slot, bit } => {
                let gpa = Self::token_gpa(slot);
                let mut bytes = [0u8; TOKEN_SIZE];
                self.fx.caller.read(gpa, &mut bytes).expect("token slot");
                bytes[usize::from(bit / 8)] ^= 1 << (bit % 8);
                self.fx.caller.write(gpa, &bytes).expect("token slot");
            }
            Op::Advance { ms } => {
                self.model.now_ms += u64::from(ms);
                self.clock.ms.store(self.model.now_ms, Ordering::Relaxed);
            }
            Op::MemMap {
                token,
                target,
                window,
            } => self.doorbell(HypercallRegs {
                rax: Hypercall::MemMap.number(),
                rbx: Self::resolve_token(token),
                rcx: Self::resolve_target(target),
                rdx: self.resolve_window(window),
                ..Default::default()
            }),
            Op::MapRange {
                token,
                target,
                window,
                pages,
            } => self.doorbell(HypercallRegs {
                rax: Hypercall::MapRange.number(),
                rbx: Self::resolve_token(token),
                rcx: Self::resolve_target(target),
                rdx: self.resolve_window(window),
                rsi: pages.resolve(),
                rdi: 0,
            }),
            Op::MemUnmap { window } => self.doorbell(HypercallRegs {
                rax: Hypercall::MemUnmap.number(),
                rbx: self.resolve_window(window),
                ..Default::default()
            }),
            Op::RevokeAll => self.doorbell(HypercallRegs {
                rax: Hypercall::RevokeAll.number(),
                ..Default::default()
            }),
            Op::Raw { rax, args } => {
                let rax = match rax {
                    0..256 => Hypercall::ALL[(rax % 8) as usize].number(),
                    256..512 => rax - 256,
                    _ => rax,
                };
                let [rbx, rcx, rdx, rsi, rdi] = args;
                self.doorbell(HypercallRegs {
                    rax,
                    rbx,
                    rcx,
                    rdx,
                    rsi,
                    rdi,
                });
            }
            Op::Serve {
                kind,
                token,
                target,
                window,
                pages,
            } => {
                let (token_gpa, target_gpa, window_gpa) = (
                    Self::resolve_token(token),
                    Self::resolve_target(target),
                    self.resolve_window(window),
                );
                self.serve(match kind {
                    ServeKind::MemMap => Request::MemMap {
                        token_gpa,
                        target_gpa,
                        window_gpa,
                    },
                    ServeKind::MapRange => Request::MapRange {
                        token_gpa,
                        target_gpa,
                        window_gpa,
                        pages: pages.resolve(),
                    },
                    ServeKind::MemUnmap => Request::MemUnmap { window_gpa },
                    ServeKind::RevokeAll => Request::RevokeAll,
                    ServeKind::Version => Request::Version,
                    ServeKind::Features => Request::Features,
                    ServeKind::Notify => Request::Notify { ring: token_gpa },
                    ServeKind::Agent => Request::Agent,
                });
            }
            Op::TargetWrite { page } => {
                let page = u64::from(page) % TARGET_PAGES;
                let generation = &mut self.model.generation[page as usize];
                *generation += 1;
                fill_target_page(&self.fx.target, page, *generation);
            }
            Op::Retire => {
                self.model.retired = true;
                let expected = self.model.revoke_all();
                assert_eq!(self.pager.retire() as u64, expected);
            }
        }
    }

    /// Every invariant that holds between operations.
    fn check(&mut self, after: &Op) {
        // The window as the appliance sees it: the pager's own view.
        if self.copying {
            assert!(self.pager.window().is_none());
            self.fx.copy.read(0, &mut self.view).expect("window memfd");
        } else {
            let window = self.pager.window().expect("a remapped window");
            assert!(Arc::ptr_eq(window, &self.fx.remap));
            // SAFETY: the window is `WINDOW_BYTES` of host memory mapped readable (the zero
            // placeholder or a target page mapped PROT_READ) for as long as `fx.remap` lives,
            // which is the whole process; nothing remaps it during the copy (one thread).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    window.host_base(),
                    self.view.as_mut_ptr(),
                    WINDOW_BYTES as usize,
                );
            }
        }
        for (page, bytes) in self.view.chunks_exact(PAGE as usize).enumerate() {
            let expected = match self.model.grants.get(&(page as u64)) {
                None => 0,
                Some(&(t, at_map)) if self.copying => target_word(t, at_map),
                Some(&(t, _)) => target_word(t, self.model.generation[t as usize]),
            };
            // One memcmp per page (a loop over the words would be traced compare by compare).
            fill_page(&mut self.expected, expected);
            if bytes == &self.expected[..] {
                continue;
            }
            let (k, word) = bytes
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .enumerate()
                .find(|&(_, w)| w != expected)
                .expect("a differing word");
            panic!(
                "after {after:x?}: window page {page} word {k} reads {word:#x}, the model says \
                 {expected:#x} (grant {:?})",
                self.model.grants.get(&(page as u64))
            );
        }
        assert_eq!(
            self.pager.mapped_pages(),
            self.model.grants.len(),
            "{after:x?}"
        );
        assert_eq!(self.pager.stats(), self.model.stats, "{after:x?}");
        assert_eq!(self.own.outstanding(), self.model.own.len(), "{after:x?}");
        assert_eq!(
            self.other.outstanding(),
            self.model.other.len(),
            "{after:x?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Input::decode(data);
    let fx = fixture();
    let clock = Arc::new(ManualClock {
        base: Duration::from_secs(1000),
        ms: AtomicU64::new(0),
    });
    let ttl = Duration::from_millis(TTL_MS);
    // Bound as an introspector binds its tokens: to the target RAM's host address. Keys as
    // the supervisor makes them, one per target, each shared by an issuer and a verifier.
    let target_id = fx.target.host_base() as u64;
    let key = |target| TargetKey::generate(target, ttl).expect("a key from the OS");
    let (own_key, other_key) = (key(target_id), key(target_id + PAGE));
    let own = Arc::new(TokenIssuer::with_clock(own_key.clone(), clock.clone()));
    let other = Arc::new(TokenIssuer::with_clock(other_key.clone(), clock.clone()));
    let own_verifier = Arc::new(TokenVerifier::with_clock(own_key, clock.clone()));
    let other_verifier = Arc::new(TokenVerifier::with_clock(other_key, clock.clone()));
    let base = input.window_base();
    let pager = Arc::new(if input.copying() {
        Pager::new_copying(own_verifier, fx.target.clone(), fx.copy.clone(), base)
    } else {
        // The other target is listed: its tokens are recognised and refused.
        let pager = Pager::new(
            own_verifier,
            fx.target.clone(),
            vec![other_verifier],
            fx.remap.clone(),
            base,
        );
        assert!(pager.window().is_some());
        pager
    });
    let hook = ApplianceHook::new(pager.clone(), Waker::for_thread(std::thread::current()));
    let mut run = Run {
        fx,
        copying: input.copying(),
        base,
        clock,
        own,
        other,
        pager,
        hook,
        model: Model {
            generation: vec![0; TARGET_PAGES as usize],
            other_listed: !input.copying(),
            ..Model::default()
        },
        view: vec![0; WINDOW_BYTES as usize],
        expected: vec![0; PAGE as usize],
    };
    run.check(&Op::RevokeAll);
    for op in input.ops {
        run.op(op);
        run.check(&op);
    }
    // Leave the fixture as found: nothing mapped, the target's pages and the caller's RAM
    // as at the start.
    run.op(Op::Retire);
    run.check(&Op::Retire);
    for (page, &generation) in run.model.generation.iter().enumerate() {
        if generation != 0 {
            fill_target_page(&fx.target, page as u64, 0);
        }
    }
    fx.caller
        .write(0, &vec![0; CALLER_BYTES as usize])
        .expect("caller RAM");
});
