//! Map tokens (`GET_MAP_TOKEN`): 256 random bits from the OS, bound to one target VM, single
//! use, expiring, at most [`MAX_OUTSTANDING`] outstanding. The appliance's MEM_MAP handler
//! consumes them with [`TokenStore::consume`]. The store reads the time from a [`Clock`]:
//! the system's monotonic clock ([`SystemClock`]) unless a test injects its own.

use std::fmt;
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;

use std::time::{Duration, Instant};
use vmm::sync::{RankedGuard, RankedMutex};

use hypercall::token::MapToken;

/// Most tokens outstanding per target at once (more → `-KVM_EAGAIN`).
pub const MAX_OUTSTANDING: usize = 8;
/// Default lifetime of a token.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

/// Why a token could not be issued or consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Too many tokens are outstanding for this target.
    #[error("too many outstanding map tokens (at most {MAX_OUTSTANDING})")]
    TooMany,
    /// The OS random source failed.
    #[error("the OS random source failed")]
    Random,
    /// No such token (never issued, already used, revoked).
    #[error("unknown or already used map token")]
    Unknown,
    /// The token expired before use.
    #[error("map token expired")]
    Expired,
}

/// What a consumed token grants: mapping pages of `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The target VM the token is bound to.
    pub target: u64,
    /// When the token was issued.
    pub issued: Instant,
}

#[derive(Debug)]
struct Entry {
    token: MapToken,
    issued: Instant,
}

/// Where a [`TokenStore`] reads the current time (issue times, expiry).
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The system's monotonic clock ([`Instant::now`]): what every store uses unless built with
/// [`TokenStore::with_clock`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Instant {
        (**self).now()
    }
}

/// The tokens issued for one target VM.
#[derive(Debug)]
pub struct TokenStore {
    target: u64,
    ttl: Duration,
    clock: Box<dyn Clock>,
    entries: RankedMutex<Vec<Entry>>,
}

fn random_token() -> Result<MapToken, TokenError> {
    let mut bytes = [0u8; 32];
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
    Ok(MapToken::from_bytes(bytes))
}

impl TokenStore {
    /// A store for target VM `target` whose tokens live `ttl` (on the system clock).
    pub fn new(target: u64, ttl: Duration) -> TokenStore {
        TokenStore::with_clock(target, ttl, SystemClock)
    }

    /// A store like [`TokenStore::new`] that reads the time from `clock` (tests drive it by
    /// hand).
    pub fn with_clock(target: u64, ttl: Duration, clock: impl Clock + 'static) -> TokenStore {
        TokenStore {
            target,
            ttl,
            clock: Box::new(clock),
            entries: RankedMutex::new(crate::lock_order::TOKENS, Vec::new()),
        }
    }

    fn lock(&self) -> RankedGuard<'_, Vec<Entry>> {
        self.entries.lock()
    }

    /// Issues a fresh token (expired ones are dropped first).
    pub fn issue(&self) -> Result<MapToken, TokenError> {
        let mut entries = self.lock();
        let now = self.clock.now();
        entries.retain(|e| now.saturating_duration_since(e.issued) < self.ttl);
        if entries.len() >= MAX_OUTSTANDING {
            return Err(TokenError::TooMany);
        }
        let token = random_token()?;
        entries.push(Entry { token, issued: now });
        Ok(token)
    }

    /// Consumes a token (single use): the grant if it is known and not expired.
    pub fn consume(&self, token: &MapToken) -> Result<Grant, TokenError> {
        let mut entries = self.lock();
        let pos = entries
            .iter()
            .position(|e| e.token.ct_eq(token))
            .ok_or(TokenError::Unknown)?;
        let e = entries.swap_remove(pos);
        if self.clock.now().saturating_duration_since(e.issued) >= self.ttl {
            return Err(TokenError::Expired);
        }
        Ok(Grant {
            target: self.target,
            issued: e.issued,
        })
    }

    /// Drops every outstanding token; returns how many there were.
    pub fn revoke_all(&self) -> usize {
        let mut entries = self.lock();
        let n = entries.len();
        entries.clear();
        n
    }

    /// Outstanding (not yet used, possibly expired) tokens.
    pub fn outstanding(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_single_use_and_bound() {
        let store = TokenStore::new(7, DEFAULT_TTL);
        let a = store.issue().unwrap();
        let b = store.issue().unwrap();
        assert!(!a.ct_eq(&b));
        assert!(!a.is_zero());
        let g = store.consume(&a).unwrap();
        assert_eq!(g.target, 7);
        assert_eq!(store.consume(&a), Err(TokenError::Unknown));
        assert_eq!(
            store.consume(&MapToken::from_bytes([0; 32])),
            Err(TokenError::Unknown)
        );
        assert_eq!(store.outstanding(), 1);
        assert_eq!(store.revoke_all(), 1);
        assert_eq!(store.consume(&b), Err(TokenError::Unknown));
    }

    /// A clock that moves only when the test says so.
    #[derive(Debug)]
    struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        fn new() -> Arc<ManualClock> {
            Arc::new(ManualClock(Mutex::new(Instant::now())))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    #[test]
    fn at_most_eight_outstanding_and_expiry_frees_slots() {
        let ttl = Duration::from_millis(50);
        let clock = ManualClock::new();
        let store = TokenStore::with_clock(1, ttl, clock.clone());
        let tokens: Vec<_> = (0..MAX_OUTSTANDING)
            .map(|_| store.issue().unwrap())
            .collect();
        assert_eq!(store.issue().err(), Some(TokenError::TooMany));
        // Just before the end of their lifetime the eight still count, and are valid.
        clock.advance(ttl - Duration::from_millis(1));
        assert_eq!(store.issue().err(), Some(TokenError::TooMany));
        assert_eq!(store.consume(&tokens[1]).unwrap().target, 1);
        assert!(store.issue().is_ok(), "the used token freed its slot");
        assert_eq!(store.issue().err(), Some(TokenError::TooMany));
        // At the end of their lifetime they are expired.
        clock.advance(Duration::from_millis(1));
        assert_eq!(store.consume(&tokens[0]), Err(TokenError::Expired));
        // Issuing drops the expired ones: only the token issued at 49 ms is left.
        assert!(store.issue().is_ok());
        assert_eq!(store.outstanding(), 2);
    }

    #[test]
    fn the_default_clock_is_the_system_clock() {
        let store = TokenStore::new(3, DEFAULT_TTL);
        let before = Instant::now();
        let t = store.issue().unwrap();
        let grant = store.consume(&t).unwrap();
        assert!(grant.issued >= before && grant.issued <= Instant::now());
    }
}
