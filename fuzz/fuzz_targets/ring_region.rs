//! Feeds a hostile peer's view of a shared ring region to the ring code.
//!
//! Mode 0: the whole region is fuzz bytes (`Region::open` must reject or accept it safely).
//! Mode 1: a valid region is laid out, then fuzz bytes scribble its words (positions, record
//! headers, wake flags, data), as a peer would; every ring is then drained and filled. No
//! input may panic or touch memory outside the region; errors are expected.
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use hypercall::ring::Region;
use kvmi_fuzz::ring_fuzz_params;
use libfuzzer_sys::fuzz_target;

/// Largest region a raw input builds (words).
const MAX_WORDS: usize = 16 << 10;

fn word(chunk: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..chunk.len()].copy_from_slice(chunk);
    u64::from_le_bytes(b)
}

fn exercise(region: &Region<&[AtomicU64]>) {
    let mut buf = [0u8; 4096];
    for index in 0..region.params().ring_count() {
        if let Ok(mut consumer) = region.consumer(index) {
            for _ in 0..64 {
                match consumer.try_pop(&mut buf) {
                    Ok(Some(len)) => assert!(len <= buf.len()),
                    _ => break,
                }
            }
            let _ = consumer.release();
        }
        if let Ok(mut producer) = region.producer(index) {
            for len in [0usize, 1, 100, 600, 3000] {
                if producer.try_push(&buf[..len]).is_err() {
                    break;
                }
            }
            let _ = producer.publish();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let words: Vec<AtomicU64> = rest
            .chunks(8)
            .take(MAX_WORDS)
            .map(|c| AtomicU64::new(word(c)))
            .collect();
        let mem: &[AtomicU64] = &words;
        if let Ok(region) = Region::open(mem) {
            exercise(&region);
        }
        return;
    }
    let params = ring_fuzz_params();
    let words: Vec<AtomicU64> = (0..params.region_size() / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    let mem: &[AtomicU64] = &words;
    let Ok(region) = Region::create(mem, &params) else {
        return;
    };
    // Scribble: each 10-byte chunk is (u16 word index, u64 value).
    for chunk in rest.chunks_exact(10) {
        let index = usize::from(u16::from_le_bytes([chunk[0], chunk[1]])) % words.len();
        words[index].store(word(&chunk[2..]), Ordering::Relaxed);
    }
    exercise(&region);
    if let Ok(reopened) = Region::open(mem) {
        exercise(&reopened);
    }
});
