//! Map tokens (`GET_MAP_TOKEN`) that verify without the issuer: each token is a MAC, under a
//! key of its target, over what it grants.
//!
//! # Roles
//! - The **supervisor** (the code that sets a target up: `appliance_link`'s fleet and
//!   launch) makes one [`TargetKey`] per target from the OS random source
//!   ([`TargetKey::generate`]) and hands a copy to both of the others.
//! - The **issuer** ([`TokenIssuer`], the target's engine) answers `GET_MAP_TOKEN`: it
//!   computes a token and remembers nothing but what its rate limits need.
//! - The **verifier** ([`TokenVerifier`], the pager of the target's slot in the appliance)
//!   checks a token with the key alone: MAC, expiry, single use. It never asks the issuer, so
//!   it can live in another process (issue 14).
//!
//! # The token's 32 bytes (four little-endian words, the ABI size of
//! [`MapToken`])
//! | word | bits | field |
//! |---|---|---|
//! | 0 | 0..64 | nonce: 64 bits from the OS random source |
//! | 1 | 0..48 | expiry: milliseconds on the host's `CLOCK_MONOTONIC` (the [`Clock`]) |
//! | 1 | 48..56 | scope: [`SCOPE_MAP_READ`] (read-only maps of any pages of the target) |
//! | 1 | 56..64 | format: [`FORMAT`] |
//! | 2, 3 | 0..128 | tag: the first 16 bytes of HMAC-SHA-256(key, message) |
//!
//! The MACed message is `"kvmi map token v1\0"` ‖ target id ‖ epoch ‖ word 0 ‖ word 1 (each a
//! little-endian u64): every field the token carries (nonce, expiry, scope, format), plus two
//! the verifier knows without being told, so they need no room in the token:
//! - the **target id** (the target's key already binds a token to its target; the id in the
//!   MAC keeps that true even if a key were ever handed to two targets);
//! - the **epoch** of the key, a word the issuer bumps to revoke every token at once
//!   ([`TokenIssuer::revoke_all`]: detach, REVOKE, the end of a target); a token of an older
//!   epoch fails its MAC.
//!
//! A 128-bit tag is safe to truncate to: the key never leaves the host, so the only attack is
//! to guess tags online, one MEM_MAP hypercall per guess, each succeeding with probability
//! 2⁻¹²⁸; at a million guesses a second for a century (2⁵² guesses) the chance is 2⁻⁷⁶. It
//! is also above the 64-bit floor NIST SP 800-107 sets for truncated HMAC tags. Tags are
//! compared in constant time (`hmac`'s `verify_truncated_left`).
//!
//! # Single use and bounded memory
//! The verifier remembers the (nonce, expiry) of each token it accepted until the token
//! expires, at most [`MAX_LIVE`] of them: a token it remembers is refused as a replay, and when
//! [`MAX_LIVE`] unexpired tokens are remembered it refuses every new one
//! ([`TokenError::Full`]) rather than forget one. An honest issuer never lets it fill: it
//! issues at most [`MAX_LIVE`] tokens per lifetime ([`DEFAULT_TTL`]), and a token whose expiry
//! lies more than a lifetime ahead is refused, so nothing is remembered longer than that.
//!
//! The issuer keeps the old limit too: at most [`MAX_OUTSTANDING`] tokens issued and neither
//! used nor expired. It learns of uses through notices the verifier leaves in the shared key
//! (one way, after the check, never waited for; a lost notice only makes the issuer count the
//! token until it expires).
//!
//! # Across processes
//! In one process a [`TargetKey`] clone shares its epoch word and notice queue through an
//! `Arc`. Apart from the 32 key bytes, those two are all the state issuer and verifier share:
//! split into processes, the supervisor sends both the key bytes
//! ([`TargetKey::random_bytes`]) and one [`TokenPage`] (a memfd holding the epoch word and a
//! notice ring, mapped into no guest), and each side builds its key with
//! [`TargetKey::from_bytes_on_page`]. A revocation is then one atomic add on the shared page,
//! seen by the verifier's next check; notices cross the page and are dropped when its ring is
//! full or its counts are out of range (such tokens count until they expire).
//!
//! Every role reads the time from a [`Clock`]: the host's monotonic clock ([`SystemClock`],
//! the same in every process) unless a test injects its own.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use vmm::sync::RankedMutex;

use hypercall::token::{MapToken, TOKEN_SIZE};

/// Most tokens outstanding (issued, neither used nor expired) per target at once (more →
/// `-KVM_EAGAIN`).
pub const MAX_OUTSTANDING: usize = 8;
/// Most tokens an issuer issues per lifetime, and most nonces a verifier remembers.
pub const MAX_LIVE: usize = 4096;
/// Default lifetime of a token.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);
/// The token format this module writes and accepts (word 1, bits 56..64).
pub const FORMAT: u8 = 1;
/// The one scope there is: read-only maps of any pages of the target (word 1, bits 48..56).
/// KVMI's `GET_MAP_TOKEN` carries no range, so a token grants no narrower one.
pub const SCOPE_MAP_READ: u8 = 1;
/// Bytes of the HMAC-SHA-256 tag a token carries.
pub const TAG_SIZE: usize = 16;

const DOMAIN: &[u8; 18] = b"kvmi map token v1\0";
const EXPIRY_BITS: u32 = 48;
const EXPIRY_MASK: u64 = (1 << EXPIRY_BITS) - 1;
/// Use notices queued for the issuer at most (more are dropped: see the module docs).
const NOTICE_CAPACITY: usize = 4 * MAX_OUTSTANDING;

/// Why a token could not be issued or was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Too many tokens are outstanding for this target, or were issued this lifetime.
    #[error("too many map tokens (at most {MAX_OUTSTANDING} outstanding, {MAX_LIVE} per lifetime)")]
    TooMany,
    /// The OS random source failed.
    #[error("the OS random source failed")]
    Random,
    /// The clock reads beyond what a token can carry (2⁴⁸ ms).
    #[error("the clock is beyond what a map token can carry")]
    Clock,
    /// Not a token of this key and epoch (forged, tampered with, another target's, revoked),
    /// or already used.
    #[error("unknown, revoked or already used map token")]
    Unknown,
    /// The token expired before use.
    #[error("map token expired")]
    Expired,
    /// The verifier remembers [`MAX_LIVE`] unexpired tokens and takes no more until one
    /// expires.
    #[error("too many map tokens used this lifetime (at most {MAX_LIVE})")]
    Full,
}

/// What an accepted token grants: mapping pages of `target` (read-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The target VM the token is bound to.
    pub target: u64,
    /// When the token expires, on the [`Clock`]'s timeline (whole milliseconds).
    pub expires: Duration,
    /// What it grants ([`SCOPE_MAP_READ`]).
    pub scope: u8,
}

/// Where tokens' issue and expiry times come from: a monotonic time shared by every process
/// of the host.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time, since the clock's zero.
    fn now(&self) -> Duration;
}

/// The host's `CLOCK_MONOTONIC`: the same timeline in every process of the host, which is
/// what lets an issuer and a verifier in different processes agree on expiry.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        if rc != 0 {
            return Duration::ZERO;
        }
        Duration::new(
            ts.tv_sec.max(0) as u64,
            ts.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

fn millis(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

fn getrandom(bytes: &mut [u8]) -> Result<(), TokenError> {
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TokenError::Random);
        }
        filled += n as usize;
    }
    Ok(())
}

/// What issuer and verifier of one target share.
struct Shared {
    target: u64,
    ttl: Duration,
    /// HMAC-SHA-256 keyed with the target's 32 key bytes (the padded key blocks already
    /// hashed: cloned per token).
    mac: Hmac<Sha256>,
    /// The epoch word and the use notices.
    state: KeyState,
}

/// Where the epoch word and the use notices live.
enum KeyState {
    /// In this process (issuer and verifier share the key through an `Arc`).
    Local {
        /// Bumped by every revocation; covered by every tag.
        epoch: AtomicU64,
        /// Nonces the verifier accepted, for the issuer's [`MAX_OUTSTANDING`] count.
        notices: RankedMutex<Vec<u64>>,
    },
    /// In a [`TokenPage`] both processes map; the lock serialises this process's writers of
    /// notices.
    Page(Arc<TokenPage>, RankedMutex<()>),
}

impl KeyState {
    fn epoch(&self) -> u64 {
        match self {
            KeyState::Local { epoch, .. } => epoch.load(Ordering::SeqCst),
            KeyState::Page(page, _) => page.word(PAGE_EPOCH).load(Ordering::SeqCst),
        }
    }

    fn bump_epoch(&self) {
        match self {
            KeyState::Local { epoch, .. } => {
                epoch.fetch_add(1, Ordering::SeqCst);
            }
            KeyState::Page(page, _) => {
                page.word(PAGE_EPOCH).fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn notice_used(&self, nonce: u64) {
        match self {
            KeyState::Local { notices, .. } => {
                let mut notices = notices.lock();
                if notices.len() < NOTICE_CAPACITY {
                    notices.push(nonce);
                }
            }
            KeyState::Page(page, writers) => {
                let _one_writer = writers.lock();
                let written = page.word(PAGE_NOTICES_WRITTEN).load(Ordering::Relaxed);
                let read = page.word(PAGE_NOTICES_READ).load(Ordering::Acquire);
                if written.wrapping_sub(read) >= NOTICE_CAPACITY as u64 {
                    return; // Full (or scribbled): dropped, as a full local queue drops.
                }
                page.word(notice_slot(written))
                    .store(nonce, Ordering::Relaxed);
                page.word(PAGE_NOTICES_WRITTEN)
                    .store(written.wrapping_add(1), Ordering::Release);
            }
        }
    }

    fn take_notices(&self) -> Vec<u64> {
        match self {
            KeyState::Local { notices, .. } => std::mem::take(&mut *notices.lock()),
            KeyState::Page(page, _) => {
                // The written count comes from the other process: it is checked, not trusted.
                let written = page.word(PAGE_NOTICES_WRITTEN).load(Ordering::Acquire);
                let read = page.word(PAGE_NOTICES_READ).load(Ordering::Relaxed);
                let pending = written.wrapping_sub(read);
                let taken = if pending <= NOTICE_CAPACITY as u64 {
                    (0..pending)
                        .map(|i| {
                            page.word(notice_slot(read.wrapping_add(i)))
                                .load(Ordering::Relaxed)
                        })
                        .collect()
                } else {
                    // Not a count a verifier writes: skip to it, take nothing (the tokens
                    // then count until they expire).
                    Vec::new()
                };
                page.word(PAGE_NOTICES_READ)
                    .store(written, Ordering::Release);
                taken
            }
        }
    }
}

/// Bytes of a [`TokenPage`].
pub const TOKEN_PAGE_SIZE: u64 = 4096;
/// Word 0 of a token page: the epoch.
const PAGE_EPOCH: usize = 0;
/// Word 1: notices written (by the verifier), a free-running count.
const PAGE_NOTICES_WRITTEN: usize = 1;
/// Word 2: notices read (by the issuer), a free-running count.
const PAGE_NOTICES_READ: usize = 2;
/// Word 8 on: the notice slots.
const PAGE_NOTICE_SLOTS: usize = 8;

fn notice_slot(count: u64) -> usize {
    PAGE_NOTICE_SLOTS + (count % NOTICE_CAPACITY as u64) as usize
}

/// The page issuer and verifier of one target share when they live in different processes:
/// a memfd of [`TOKEN_PAGE_SIZE`] bytes (named `kvmi-tokens-NAME`) that the supervisor creates
/// and passes to the target process (issuer) and the appliance process (verifier), mapped
/// shared by both. It is mapped into **no guest**: the appliance's agent cannot roll the epoch
/// back.
///
/// Layout (little-endian `u64` words, each accessed atomically): word 0 the epoch (bumped by
/// [`TokenIssuer::revoke_all`]; a verifier reads it for every token, so a revocation takes
/// effect in the other process at once); word 1 the count of use notices written (by the
/// verifier), word 2 the count read (by the issuer); words 8.. a ring of
/// `4 × MAX_OUTSTANDING` nonce slots. Each side treats the other's counts as untrusted: a
/// count out of range drops notices (the issuer then counts those tokens until they expire),
/// never more.
#[derive(Debug)]
pub struct TokenPage {
    file: std::fs::File,
    map: memmap2::MmapRaw,
}

impl TokenPage {
    /// A fresh zeroed page (epoch 0, no notices) in a memfd named `name`.
    pub fn create(name: &str) -> std::io::Result<TokenPage> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| std::io::Error::other("a memfd name contains a NUL"))?;
        // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(TOKEN_PAGE_SIZE)?;
        TokenPage::from_file(file)
    }

    /// Maps a page received from the supervisor (at least [`TOKEN_PAGE_SIZE`] bytes, open
    /// read-write).
    pub fn from_file(file: std::fs::File) -> std::io::Result<TokenPage> {
        let len = file.metadata()?.len();
        if len < TOKEN_PAGE_SIZE {
            return Err(std::io::Error::other(format!(
                "a token page holds {TOKEN_PAGE_SIZE} bytes, this file {len}"
            )));
        }
        let map = memmap2::MmapOptions::new()
            .len(TOKEN_PAGE_SIZE as usize)
            .map_raw(&file)?;
        Ok(TokenPage { file, map })
    }

    /// The memfd (to pass to another process).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Word `i` of the page.
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < (TOKEN_PAGE_SIZE / 8) as usize, "token page word {i}");
        // SAFETY: the mapping is TOKEN_PAGE_SIZE bytes, page aligned, and lives as long as
        // `self`; word `i` lies inside it and is 8-byte aligned; AtomicU64 has the layout of a
        // u64, and every access to the page (here and in the other process) is atomic.
        unsafe { &*self.map.as_mut_ptr().cast::<AtomicU64>().add(i) }
    }
}

/// The per-target secret the supervisor makes and hands to the target's issuer and verifier
/// (clones share the epoch word and the notice queue; see the module docs).
#[derive(Clone)]
pub struct TargetKey {
    shared: Arc<Shared>,
}

impl fmt::Debug for TargetKey {
    /// Keys are secrets: only the target and the epoch are printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetKey")
            .field("target", &self.shared.target)
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl TargetKey {
    /// A fresh key for target `target` whose tokens live `ttl`: 32 bytes from the OS random
    /// source.
    pub fn generate(target: u64, ttl: Duration) -> Result<TargetKey, TokenError> {
        let mut bytes = [0u8; 32];
        getrandom(&mut bytes)?;
        let key = TargetKey::from_bytes(target, ttl, &bytes);
        bytes.fill(0);
        Ok(key)
    }

    /// A key from its 32 bytes (how the other side of a process boundary would rebuild it).
    pub fn from_bytes(target: u64, ttl: Duration, bytes: &[u8; 32]) -> TargetKey {
        // HMAC takes keys of any length: new_from_slice cannot fail.
        let mac = match Hmac::<Sha256>::new_from_slice(bytes) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts every key length"),
        };
        TargetKey {
            shared: Arc::new(Shared {
                target,
                ttl,
                mac,
                state: KeyState::Local {
                    epoch: AtomicU64::new(0),
                    notices: RankedMutex::new(crate::lock_order::TOKEN_NOTICES, Vec::new()),
                },
            }),
        }
    }

    /// A key from its 32 bytes whose epoch word and use notices live in `page`, shared with
    /// the other process's copy of the key (the target's issuer or the appliance's verifier;
    /// see [`TokenPage`]).
    pub fn from_bytes_on_page(
        target: u64,
        ttl: Duration,
        bytes: &[u8; 32],
        page: Arc<TokenPage>,
    ) -> TargetKey {
        let mut key = TargetKey::from_bytes(target, ttl, bytes);
        if let Some(shared) = Arc::get_mut(&mut key.shared) {
            shared.state =
                KeyState::Page(page, RankedMutex::new(crate::lock_order::TOKEN_NOTICES, ()));
        }
        key
    }

    /// 32 fresh key bytes from the OS random source (what the supervisor sends both sides).
    pub fn random_bytes() -> Result<[u8; 32], TokenError> {
        let mut bytes = [0u8; 32];
        getrandom(&mut bytes)?;
        Ok(bytes)
    }

    /// The target the key belongs to.
    pub fn target(&self) -> u64 {
        self.shared.target
    }

    /// The lifetime of the key's tokens.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The current epoch (bumped by each revocation).
    pub fn epoch(&self) -> u64 {
        self.shared.state.epoch()
    }

    fn tag(&self, epoch: u64, words: [u64; 2]) -> Hmac<Sha256> {
        let mut mac = self.shared.mac.clone();
        mac.update(DOMAIN);
        mac.update(&self.shared.target.to_le_bytes());
        mac.update(&epoch.to_le_bytes());
        mac.update(&words[0].to_le_bytes());
        mac.update(&words[1].to_le_bytes());
        mac
    }

    /// The token for nonce `nonce` and word 1 `meta` under the current epoch.
    fn seal(&self, nonce: u64, meta: u64) -> MapToken {
        let full = self
            .tag(self.epoch(), [nonce, meta])
            .finalize()
            .into_bytes();
        let mut bytes = [0u8; TOKEN_SIZE];
        bytes[..8].copy_from_slice(&nonce.to_le_bytes());
        bytes[8..16].copy_from_slice(&meta.to_le_bytes());
        bytes[16..].copy_from_slice(&full[..TAG_SIZE]);
        MapToken::from_bytes(bytes)
    }

    /// Whether `token`'s tag is right for its words under epoch `epoch` (constant time).
    fn authentic(&self, token: &MapToken, epoch: u64) -> bool {
        let bytes = token.to_bytes();
        self.tag(epoch, [token.words[0], token.words[1]])
            .verify_truncated_left(&bytes[16..])
            .is_ok()
    }

    fn notice_used(&self, nonce: u64) {
        self.shared.state.notice_used(nonce);
    }

    fn take_notices(&self) -> Vec<u64> {
        self.shared.state.take_notices()
    }
}

/// Word 1 of a token: expiry (ms), scope, format.
fn meta(expiry_ms: u64, scope: u8) -> u64 {
    expiry_ms | u64::from(scope) << EXPIRY_BITS | u64::from(FORMAT) << 56
}

#[derive(Debug)]
struct Issued {
    nonce: u64,
    expiry_ms: u64,
}

#[derive(Debug)]
struct IssuerState {
    key: TargetKey,
    /// Issued tokens not known to be used (expired ones are dropped at the next issue).
    outstanding: Vec<Issued>,
    /// Expiries of every token issued this lifetime, oldest first.
    live: VecDeque<u64>,
}

/// Issues the map tokens of one target (its engine's `GET_MAP_TOKEN`).
#[derive(Debug)]
pub struct TokenIssuer {
    clock: Box<dyn Clock>,
    state: RankedMutex<IssuerState>,
}

impl TokenIssuer {
    /// An issuer under `key`, on the system clock.
    pub fn new(key: TargetKey) -> TokenIssuer {
        TokenIssuer::with_clock(key, SystemClock)
    }

    /// An issuer like [`TokenIssuer::new`] that reads the time from `clock` (tests drive it by
    /// hand).
    pub fn with_clock(key: TargetKey, clock: impl Clock + 'static) -> TokenIssuer {
        TokenIssuer {
            clock: Box::new(clock),
            state: RankedMutex::new(
                crate::lock_order::TOKENS,
                IssuerState {
                    key,
                    outstanding: Vec::new(),
                    live: VecDeque::new(),
                },
            ),
        }
    }

    /// Issues a fresh token (expired ones and used ones are forgotten first).
    pub fn issue(&self) -> Result<MapToken, TokenError> {
        let mut st = self.state.lock();
        let now_ms = millis(self.clock.now());
        let used = st.key.take_notices();
        st.outstanding
            .retain(|t| t.expiry_ms > now_ms && !used.contains(&t.nonce));
        while st.live.front().is_some_and(|&e| e <= now_ms) {
            st.live.pop_front();
        }
        if st.outstanding.len() >= MAX_OUTSTANDING || st.live.len() >= MAX_LIVE {
            return Err(TokenError::TooMany);
        }
        let expiry_ms = now_ms
            .checked_add(millis(st.key.ttl()))
            .filter(|e| *e <= EXPIRY_MASK)
            .ok_or(TokenError::Clock)?;
        let mut nonce = [0u8; 8];
        getrandom(&mut nonce)?;
        let nonce = u64::from_le_bytes(nonce);
        let token = st.key.seal(nonce, meta(expiry_ms, SCOPE_MAP_READ));
        st.outstanding.push(Issued { nonce, expiry_ms });
        st.live.push_back(expiry_ms);
        Ok(token)
    }

    /// Invalidates every token issued so far, wherever it is checked: bumps the key's epoch.
    /// Returns how many were outstanding.
    pub fn revoke_all(&self) -> usize {
        let mut st = self.state.lock();
        st.key.shared.state.bump_epoch();
        st.key.take_notices();
        let n = st.outstanding.len();
        st.outstanding.clear();
        // The verifier forgets the old epoch's nonces, so the old lifetime's budget is free.
        st.live.clear();
        n
    }

    /// Issues under `key` from now on (the supervisor's key for this target); tokens of the
    /// old key are refused by the old key's verifiers (their epoch is bumped). Returns how many
    /// were outstanding.
    pub fn rekey(&self, key: TargetKey) -> usize {
        let n = self.revoke_all();
        let mut st = self.state.lock();
        st.key = key;
        st.key.take_notices();
        n
    }

    /// The key tokens are issued under now.
    pub fn key(&self) -> TargetKey {
        self.state.lock().key.clone()
    }

    /// Outstanding tokens: issued, not known to be used (possibly expired).
    pub fn outstanding(&self) -> usize {
        let mut st = self.state.lock();
        let used = st.key.take_notices();
        st.outstanding.retain(|t| !used.contains(&t.nonce));
        st.outstanding.len()
    }
}

#[derive(Debug)]
struct Seen {
    /// The epoch the remembered nonces belong to.
    epoch: u64,
    /// (word 1 << 64 | nonce) of every token accepted, until it expires.
    tokens: HashSet<u128>,
}

/// Checks the map tokens of one target with its key alone (the pager of the target's slot).
#[derive(Debug)]
pub struct TokenVerifier {
    key: TargetKey,
    clock: Box<dyn Clock>,
    capacity: usize,
    seen: RankedMutex<Seen>,
}

impl TokenVerifier {
    /// A verifier under `key`, on the system clock, remembering up to [`MAX_LIVE`] tokens.
    pub fn new(key: TargetKey) -> TokenVerifier {
        TokenVerifier::with_clock(key, SystemClock)
    }

    /// A verifier like [`TokenVerifier::new`] that reads the time from `clock`.
    pub fn with_clock(key: TargetKey, clock: impl Clock + 'static) -> TokenVerifier {
        TokenVerifier::with_capacity(key, clock, MAX_LIVE)
    }

    /// A verifier that remembers at most `capacity` unexpired tokens (tests of the bound).
    pub fn with_capacity(
        key: TargetKey,
        clock: impl Clock + 'static,
        capacity: usize,
    ) -> TokenVerifier {
        let epoch = key.epoch();
        TokenVerifier {
            key,
            clock: Box::new(clock),
            capacity,
            seen: RankedMutex::new(
                crate::lock_order::TOKENS,
                Seen {
                    epoch,
                    tokens: HashSet::new(),
                },
            ),
        }
    }

    /// The target this verifier's tokens are bound to.
    pub fn target(&self) -> u64 {
        self.key.target()
    }

    /// Checks `token` and, if it is good, uses it up (single use): the grant, or why there is
    /// none. In order: format and scope, tag (under the key's current epoch), expiry (a token
    /// expiring more than a lifetime ahead is refused too), replay, room to remember it.
    pub fn verify(&self, token: &MapToken) -> Result<Grant, TokenError> {
        let [nonce, meta_word, ..] = token.words;
        let expiry_ms = meta_word & EXPIRY_MASK;
        let scope = (meta_word >> EXPIRY_BITS) as u8;
        if (meta_word >> 56) as u8 != FORMAT || scope != SCOPE_MAP_READ {
            return Err(TokenError::Unknown);
        }
        let mut seen = self.seen.lock();
        let epoch = self.key.epoch();
        if !self.key.authentic(token, epoch) {
            return Err(TokenError::Unknown);
        }
        let now_ms = millis(self.clock.now());
        if now_ms >= expiry_ms {
            return Err(TokenError::Expired);
        }
        if expiry_ms - now_ms > millis(self.key.ttl()) {
            return Err(TokenError::Unknown);
        }
        if seen.epoch != epoch {
            // Tokens of the old epoch fail their tag now: their nonces need no memory.
            seen.epoch = epoch;
            seen.tokens.clear();
        }
        let id = u128::from(meta_word) << 64 | u128::from(nonce);
        if seen.tokens.contains(&id) {
            return Err(TokenError::Unknown);
        }
        if seen.tokens.len() >= self.capacity {
            seen.tokens
                .retain(|t| ((*t >> 64) as u64 & EXPIRY_MASK) > now_ms);
            if seen.tokens.len() >= self.capacity {
                return Err(TokenError::Full);
            }
        }
        seen.tokens.insert(id);
        drop(seen);
        self.key.notice_used(nonce);
        Ok(Grant {
            target: self.key.target(),
            expires: Duration::from_millis(expiry_ms),
            scope,
        })
    }

    /// Tokens remembered now (accepted, possibly expired; never more than the capacity).
    pub fn remembered(&self) -> usize {
        self.seen.lock().tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock that moves only when the test says so (starting at a whole millisecond).
    #[derive(Debug)]
    struct ManualClock(Mutex<Duration>);

    impl ManualClock {
        fn new() -> Arc<ManualClock> {
            Arc::new(ManualClock(Mutex::new(Duration::from_secs(1000))))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    fn pair(target: u64, ttl: Duration) -> (TokenIssuer, TokenVerifier, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let key = TargetKey::generate(target, ttl).unwrap();
        (
            TokenIssuer::with_clock(key.clone(), clock.clone()),
            TokenVerifier::with_clock(key, clock.clone()),
            clock,
        )
    }

    #[test]
    fn tokens_are_random_single_use_and_bound() {
        let (issuer, verifier, _) = pair(7, DEFAULT_TTL);
        let a = issuer.issue().unwrap();
        let b = issuer.issue().unwrap();
        assert!(!a.ct_eq(&b));
        assert!(!a.is_zero());
        let g = verifier.verify(&a).unwrap();
        assert_eq!((g.target, g.scope), (7, SCOPE_MAP_READ));
        assert_eq!(verifier.verify(&a), Err(TokenError::Unknown), "replay");
        assert_eq!(
            verifier.verify(&MapToken::from_bytes([0; 32])),
            Err(TokenError::Unknown)
        );
        assert_eq!(issuer.outstanding(), 1, "the use was noticed");
        assert_eq!(issuer.revoke_all(), 1);
        assert_eq!(verifier.verify(&b), Err(TokenError::Unknown), "revoked");
    }

    #[test]
    fn the_layout_is_as_documented() {
        let (issuer, verifier, clock) = pair(1, Duration::from_millis(1500));
        let t = issuer.issue().unwrap();
        let expiry = millis(clock.now()) + 1500;
        assert_eq!(t.words[1] & EXPIRY_MASK, expiry);
        assert_eq!((t.words[1] >> 48) as u8, SCOPE_MAP_READ);
        assert_eq!((t.words[1] >> 56) as u8, FORMAT);
        // The tag is HMAC-SHA-256 over the documented message, truncated to 16 bytes.
        let mut message = Vec::new();
        message.extend_from_slice(b"kvmi map token v1\0");
        for word in [1u64, 0, t.words[0], t.words[1]] {
            message.extend_from_slice(&word.to_le_bytes());
        }
        let mut mac = verifier.key.shared.mac.clone();
        mac.update(&message);
        let full = mac.finalize().into_bytes();
        assert_eq!(&t.to_bytes()[16..], &full[..16]);
        assert_eq!(
            verifier.verify(&t).unwrap().expires,
            Duration::from_millis(expiry)
        );
    }

    #[test]
    fn a_verifier_sharing_only_the_key_bytes_accepts() {
        // The issuer's side and a verifier rebuilt from the 32 key bytes alone, as another
        // process would: no store, no shared memory but the clock's timeline.
        let clock = ManualClock::new();
        let bytes = [0x5a; 32];
        let issuer =
            TokenIssuer::with_clock(TargetKey::from_bytes(9, DEFAULT_TTL, &bytes), clock.clone());
        let verifier =
            TokenVerifier::with_clock(TargetKey::from_bytes(9, DEFAULT_TTL, &bytes), clock.clone());
        let t = issuer.issue().unwrap();
        assert_eq!(verifier.verify(&t).unwrap().target, 9);
        assert_eq!(verifier.verify(&t), Err(TokenError::Unknown));
        // Another key's verifier, or the same key bytes bound to another target, refuse it.
        let t = issuer.issue().unwrap();
        let other = TokenVerifier::with_clock(
            TargetKey::from_bytes(9, DEFAULT_TTL, &[0x5b; 32]),
            clock.clone(),
        );
        assert_eq!(other.verify(&t), Err(TokenError::Unknown));
        let elsewhere = TokenVerifier::with_clock(
            TargetKey::from_bytes(10, DEFAULT_TTL, &bytes),
            clock.clone(),
        );
        assert_eq!(elsewhere.verify(&t), Err(TokenError::Unknown));
        assert!(verifier.verify(&t).is_ok());
    }

    #[test]
    fn tampering_with_any_bit_flips_the_verdict() {
        let (issuer, verifier, _) = pair(3, DEFAULT_TTL);
        for bit in 0..TOKEN_SIZE * 8 {
            let t = issuer.issue().unwrap();
            let mut bytes = t.to_bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                verifier.verify(&MapToken::from_bytes(bytes)),
                Err(TokenError::Unknown),
                "bit {bit}"
            );
            // The untampered token is still good (the tampered one burnt nothing).
            assert!(verifier.verify(&t).is_ok(), "bit {bit}");
        }
        // A token forged with the right layout and a made-up tag.
        let t = issuer.issue().unwrap();
        let mut forged = t.words;
        forged[0] ^= 1;
        forged[2] = 0;
        forged[3] = 0;
        assert_eq!(
            verifier.verify(&MapToken::new(forged)),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn expiry_replay_and_too_distant_expiry() {
        let ttl = Duration::from_millis(50);
        let (issuer, verifier, clock) = pair(1, ttl);
        let a = issuer.issue().unwrap();
        let b = issuer.issue().unwrap();
        clock.advance(ttl - Duration::from_millis(1));
        assert!(
            verifier.verify(&a).is_ok(),
            "good until the last millisecond"
        );
        assert_eq!(
            verifier.verify(&a),
            Err(TokenError::Unknown),
            "replay within TTL"
        );
        clock.advance(Duration::from_millis(1));
        assert_eq!(verifier.verify(&b), Err(TokenError::Expired));
        assert_eq!(
            verifier.verify(&a),
            Err(TokenError::Expired),
            "replay after TTL"
        );
        // A token the key authenticates but that would live longer than a lifetime (only a
        // broken issuer makes one): refused, so nothing is remembered beyond a lifetime.
        let far = millis(clock.now()) + 51;
        let t = verifier.key.seal(42, meta(far, SCOPE_MAP_READ));
        assert_eq!(verifier.verify(&t), Err(TokenError::Unknown));
        let t = verifier.key.seal(42, meta(far - 1, SCOPE_MAP_READ));
        assert!(verifier.verify(&t).is_ok());
        // Authentic words with another scope or format.
        let t = verifier.key.seal(43, meta(far - 1, 2));
        assert_eq!(verifier.verify(&t), Err(TokenError::Unknown));
        let t = verifier
            .key
            .seal(44, (far - 1) | u64::from(SCOPE_MAP_READ) << 48 | 2 << 56);
        assert_eq!(verifier.verify(&t), Err(TokenError::Unknown));
    }

    #[test]
    fn at_most_eight_outstanding_and_use_or_expiry_frees_slots() {
        let ttl = Duration::from_millis(50);
        let (issuer, verifier, clock) = pair(1, ttl);
        let tokens: Vec<_> = (0..MAX_OUTSTANDING)
            .map(|_| issuer.issue().unwrap())
            .collect();
        assert_eq!(issuer.issue().err(), Some(TokenError::TooMany));
        // Just before the end of their lifetime the eight still count, and are valid.
        clock.advance(ttl - Duration::from_millis(1));
        assert_eq!(issuer.issue().err(), Some(TokenError::TooMany));
        assert_eq!(verifier.verify(&tokens[1]).unwrap().target, 1);
        assert!(issuer.issue().is_ok(), "the used token freed its slot");
        assert_eq!(issuer.issue().err(), Some(TokenError::TooMany));
        // At the end of their lifetime they are expired.
        clock.advance(Duration::from_millis(1));
        assert_eq!(verifier.verify(&tokens[0]), Err(TokenError::Expired));
        // Issuing drops the expired ones: only the token issued at 49 ms is left.
        assert!(issuer.issue().is_ok());
        assert_eq!(issuer.outstanding(), 2);
    }

    #[test]
    fn the_issuer_issues_at_most_max_live_per_lifetime() {
        let ttl = Duration::from_millis(50);
        let (issuer, verifier, clock) = pair(1, ttl);
        for i in 0..MAX_LIVE {
            let t = issuer.issue().unwrap_or_else(|e| panic!("token {i}: {e}"));
            verifier.verify(&t).unwrap();
        }
        assert_eq!(issuer.issue().err(), Some(TokenError::TooMany));
        assert_eq!(verifier.remembered(), MAX_LIVE);
        clock.advance(ttl);
        let t = issuer.issue().unwrap();
        assert!(verifier.verify(&t).is_ok());
        assert!(verifier.remembered() <= MAX_LIVE);
    }

    #[test]
    fn the_nonce_set_is_bounded_and_refuses_when_full() {
        let ttl = Duration::from_millis(50);
        let clock = ManualClock::new();
        let key = TargetKey::generate(5, ttl).unwrap();
        let verifier = TokenVerifier::with_capacity(key.clone(), clock.clone(), 3);
        // Several issuers under one key (a misbehaving issuer side): more good tokens than
        // the verifier remembers.
        let issuers: Vec<_> = (0..2)
            .map(|_| TokenIssuer::with_clock(key.clone(), clock.clone()))
            .collect();
        let tokens: Vec<_> = (0..5).map(|i| issuers[i % 2].issue().unwrap()).collect();
        for t in &tokens[..3] {
            assert!(verifier.verify(t).is_ok());
        }
        assert_eq!(verifier.verify(&tokens[3]), Err(TokenError::Full));
        assert_eq!(verifier.remembered(), 3);
        for t in &tokens[..3] {
            assert_eq!(
                verifier.verify(t),
                Err(TokenError::Unknown),
                "still remembered"
            );
        }
        // Once the remembered ones expire there is room again, and a refused-as-full token
        // was not burnt.
        clock.advance(Duration::from_millis(30));
        let late = issuers[0].issue().unwrap();
        clock.advance(Duration::from_millis(20));
        assert_eq!(verifier.verify(&tokens[3]), Err(TokenError::Expired));
        assert!(verifier.verify(&late).is_ok());
        assert_eq!(verifier.remembered(), 1);
    }

    #[test]
    fn revocation_and_rekeying_refuse_every_earlier_token() {
        let (issuer, verifier, clock) = pair(2, DEFAULT_TTL);
        let a = issuer.issue().unwrap();
        assert!(verifier.verify(&a).is_ok());
        assert_eq!(verifier.remembered(), 1);
        let b = issuer.issue().unwrap();
        assert_eq!(issuer.revoke_all(), 1);
        assert_eq!(verifier.verify(&b), Err(TokenError::Unknown));
        let c = issuer.issue().unwrap();
        assert!(verifier.verify(&c).is_ok());
        assert_eq!(
            verifier.remembered(),
            1,
            "the old epoch's nonces were forgotten"
        );
        // A new key from the supervisor: the old verifier refuses the new tokens, and the old
        // key's tokens are dead everywhere.
        let d = issuer.issue().unwrap();
        let key = TargetKey::generate(2, DEFAULT_TTL).unwrap();
        assert_eq!(issuer.rekey(key.clone()), 1);
        let fresh = TokenVerifier::with_clock(key, clock);
        let e = issuer.issue().unwrap();
        assert_eq!(verifier.verify(&d), Err(TokenError::Unknown));
        assert_eq!(verifier.verify(&e), Err(TokenError::Unknown));
        assert_eq!(fresh.verify(&d), Err(TokenError::Unknown));
        assert!(fresh.verify(&e).is_ok());
    }

    #[test]
    fn the_default_clock_is_the_system_clock() {
        let key = TargetKey::generate(3, DEFAULT_TTL).unwrap();
        let (issuer, verifier) = (
            TokenIssuer::new(key.clone()),
            TokenVerifier::new(key.clone()),
        );
        let before = SystemClock.now();
        let t = issuer.issue().unwrap();
        let grant = verifier.verify(&t).unwrap();
        let after = SystemClock.now();
        assert!(grant.expires >= (before + DEFAULT_TTL).saturating_sub(Duration::from_millis(1)));
        assert!(grant.expires <= after + DEFAULT_TTL);
        assert!(format!("{key:?}").contains("target: 3"));
    }

    /// Issuer and verifier of `target` on two mappings of one token page, as the target
    /// process and the appliance process hold it: the verifier's page is a second open of the
    /// memfd (through `/proc/self/fd`) mapped on its own.
    fn paged_pair(target: u64) -> (TokenIssuer, TokenVerifier, Arc<TokenPage>, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let bytes = TargetKey::random_bytes().unwrap();
        let page = Arc::new(TokenPage::create("kvmi-tokens-test").unwrap());
        let path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(page.file())
        );
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let other = Arc::new(TokenPage::from_file(reopened).unwrap());
        assert_ne!(page.map.as_ptr(), other.map.as_ptr(), "two mappings");
        let issuer = TokenIssuer::with_clock(
            TargetKey::from_bytes_on_page(target, DEFAULT_TTL, &bytes, page.clone()),
            clock.clone(),
        );
        let verifier = TokenVerifier::with_clock(
            TargetKey::from_bytes_on_page(target, DEFAULT_TTL, &bytes, other),
            clock.clone(),
        );
        (issuer, verifier, page, clock)
    }

    #[test]
    fn a_token_page_carries_revocation_and_use_notices_between_two_mappings() {
        let (issuer, verifier, _page, _clock) = paged_pair(7);
        let t = issuer.issue().unwrap();
        assert_eq!(verifier.verify(&t).unwrap().target, 7);
        // Use notices cross the page: the issuer forgets used tokens and issues on.
        for _ in 0..3 * MAX_OUTSTANDING {
            let t = issuer.issue().unwrap();
            verifier.verify(&t).unwrap();
        }
        assert_eq!(issuer.outstanding(), 0);
        // A revocation in the issuer's mapping is the verifier's at once.
        let pending = issuer.issue().unwrap();
        assert_eq!(issuer.revoke_all(), 1);
        assert_eq!(verifier.key.epoch(), 1);
        assert_eq!(verifier.verify(&pending), Err(TokenError::Unknown));
        let fresh = issuer.issue().unwrap();
        assert!(verifier.verify(&fresh).is_ok());
    }

    #[test]
    fn a_revocation_reaches_only_the_keys_on_its_page() {
        // Same key bytes, different pages: the epochs are separate words.
        let bytes = TargetKey::random_bytes().unwrap();
        let (a, b) = (
            Arc::new(TokenPage::create("kvmi-tokens-a").unwrap()),
            Arc::new(TokenPage::create("kvmi-tokens-b").unwrap()),
        );
        let issuer = TokenIssuer::new(TargetKey::from_bytes_on_page(1, DEFAULT_TTL, &bytes, a));
        let verifier = TokenVerifier::new(TargetKey::from_bytes_on_page(1, DEFAULT_TTL, &bytes, b));
        let t = issuer.issue().unwrap();
        issuer.revoke_all();
        assert!(
            verifier.verify(&t).is_ok(),
            "page b never saw the revocation"
        );
        let after = issuer.issue().unwrap();
        assert_eq!(
            verifier.verify(&after),
            Err(TokenError::Unknown),
            "epoch 1 vs 0"
        );
    }

    #[test]
    fn scribbled_notice_counts_drop_notices_and_nothing_else() {
        let (issuer, verifier, page, _clock) = paged_pair(8);
        // A verifier's count far ahead of the issuer's: nothing is taken, nothing panics.
        page.word(PAGE_NOTICES_WRITTEN)
            .store(u64::MAX - 3, Ordering::SeqCst);
        let mut held = Vec::new();
        for _ in 0..MAX_OUTSTANDING {
            held.push(issuer.issue().unwrap());
        }
        assert_eq!(issuer.issue().err(), Some(TokenError::TooMany));
        // The issuer skipped to the scribbled count; notices written from there on arrive
        // (the count wraps around u64::MAX).
        for t in &held {
            verifier.verify(t).unwrap();
        }
        assert_eq!(
            issuer.outstanding(),
            0,
            "notices after the scribble crossed"
        );
        // A count behind the issuer's (a "negative" backlog): dropped as well.
        page.word(PAGE_NOTICES_READ).store(5, Ordering::SeqCst);
        page.word(PAGE_NOTICES_WRITTEN).store(1, Ordering::SeqCst);
        assert_eq!(issuer.outstanding(), 0);
        let t = issuer.issue().unwrap();
        verifier.verify(&t).unwrap();
        assert_eq!(issuer.outstanding(), 0);
    }

    #[test]
    fn a_short_file_is_not_a_token_page() {
        let page = TokenPage::create("kvmi-tokens-short").unwrap();
        page.file().set_len(100).unwrap();
        let err = TokenPage::from_file(page.file().try_clone().unwrap()).unwrap_err();
        assert!(err.to_string().contains("4096 bytes"), "{err}");
    }
}
