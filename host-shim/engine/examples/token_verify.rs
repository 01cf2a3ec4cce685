//! What checking a map token costs: `TokenVerifier::verify` (HMAC-SHA-256 over 50 bytes,
//! expiry, the nonce set) against the store lookup it replaced (a constant-time scan of up to
//! 8 outstanding tokens, a clock read, a removal), measured in the same run.
//!
//! `cargo run --release -p kvmi-engine --example token_verify`. Prints ns per check for each,
//! the ratio, and the cost of refusing a forged token and of issuing one.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hypercall::token::MapToken;
use kvmi_engine::tokens::{
    DEFAULT_TTL, MAX_LIVE, MAX_OUTSTANDING, TargetKey, TokenIssuer, TokenVerifier,
};

const ROUNDS: usize = 9;

/// `MAX_LIVE` good tokens under `key` (issuers of eight each: one issuer gives at most
/// eight unused ones).
fn tokens(key: &TargetKey) -> Vec<MapToken> {
    (0..MAX_LIVE / MAX_OUTSTANDING)
        .flat_map(|_| {
            let issuer = TokenIssuer::new(key.clone());
            (0..MAX_OUTSTANDING).map(move |_| issuer.issue().expect("a token"))
        })
        .collect()
}

/// The old `TokenStore::consume`: find the token among the outstanding ones in constant time
/// per entry, remove it, compare its issue time with the clock.
fn old_lookup(store: &mut Vec<(MapToken, Instant)>, token: &MapToken) -> bool {
    let Some(pos) = store.iter().position(|(t, _)| t.ct_eq(token)) else {
        return false;
    };
    let (_, issued) = store.swap_remove(pos);
    Instant::now().saturating_duration_since(issued) < DEFAULT_TTL
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let key = TargetKey::generate(1, DEFAULT_TTL).expect("a key");
    let (mut new, mut old, mut forged, mut issue) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        // verify: a fresh verifier per round (it remembers at most MAX_LIVE tokens).
        let batch = tokens(&key);
        let verifier = TokenVerifier::new(key.clone());
        let t = Instant::now();
        for token in &batch {
            assert!(black_box(verifier.verify(black_box(token))).is_ok());
        }
        new.push(t.elapsed().as_nanos() as f64 / batch.len() as f64);

        // Forged: a good token with one tag bit flipped (MAC computed, refused).
        let mut bytes = batch[0].to_bytes();
        bytes[31] ^= 1;
        let bad = MapToken::from_bytes(bytes);
        let t = Instant::now();
        for _ in 0..batch.len() {
            assert!(black_box(verifier.verify(black_box(&bad))).is_err());
        }
        forged.push(t.elapsed().as_nanos() as f64 / batch.len() as f64);

        // The old lookup, with eight outstanding: each token found and removed, and the
        // store refilled to eight outside the timed region's per-token work.
        let mut store: Vec<(MapToken, Instant)> = Vec::with_capacity(MAX_OUTSTANDING);
        let mut elapsed = Duration::ZERO;
        for chunk in batch.chunks(MAX_OUTSTANDING) {
            store.clear();
            let now = Instant::now();
            store.extend(chunk.iter().map(|t| (*t, now)));
            let t = Instant::now();
            // Look the newest up first: the scan goes through the whole store for it.
            for token in chunk.iter().rev() {
                assert!(black_box(old_lookup(&mut store, black_box(token))));
            }
            elapsed += t.elapsed();
        }
        old.push(elapsed.as_nanos() as f64 / batch.len() as f64);

        // Issue: eight per issuer.
        let n = MAX_LIVE;
        let mut elapsed = Duration::ZERO;
        for _ in 0..n / MAX_OUTSTANDING {
            let issuer = TokenIssuer::new(key.clone());
            let t = Instant::now();
            for _ in 0..MAX_OUTSTANDING {
                black_box(issuer.issue().expect("a token"));
            }
            elapsed += t.elapsed();
        }
        issue.push(elapsed.as_nanos() as f64 / n as f64);
    }
    let (new, old, forged, issue) = (median(new), median(old), median(forged), median(issue));
    println!(
        "map token check, median of {ROUNDS} rounds of {MAX_LIVE} tokens:\n  \
         verify (MAC + expiry + nonce set): {new:8.1} ns/token\n  \
         old store lookup (baseline):       {old:8.1} ns/token\n  \
         ratio verify / baseline:           {:8.2}\n  \
         refuse a forged token:             {forged:8.1} ns/token\n  \
         issue (getrandom + MAC):           {issue:8.1} ns/token",
        new / old
    );
}
