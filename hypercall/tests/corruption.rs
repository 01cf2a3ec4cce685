//! A hostile peer scribbles random positions, lengths and tags into a live ring while a
//! producer and a consumer use it. The ring must report typed errors, never panic, and never
//! touch memory outside its own control block and data area: the region sits between
//! inaccessible guard pages (any stray access faults the test), and every other ring of the
//! region must still be all zeroes afterwards.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use common::{Mapping, next};
use hypercall::discovery::Features;
use hypercall::ring::{
    LayoutParams, Region, RingError, RingSizes, SharedMemory, SharedRegion, TAG_RECORD, TAG_WRAP,
};

type Shared = Arc<SharedRegion<Mapping>>;

const GUARD: usize = 64 << 10;
const SCRIBBLES: u64 = 1_000_000;

fn setup() -> (Region<Shared>, LayoutParams) {
    let params = LayoutParams {
        vcpu_count: 2,
        sizes: RingSizes {
            event: 4096,
            event_reply: 4096,
            command: 4096,
            command_reply: 4096,
            log: 4096,
        },
        features: Features::NOTIFY,
        map_window_gpa: 0,
        map_window_size: 0,
    };
    let len = params.region_size() as usize;
    let fd = common::memfd(len);
    let region = Region::create(common::region(&fd, len, GUARD), &params).unwrap();
    (region, params)
}

/// A word to scribble: some random, most of them plausible-looking.
fn hostile_value(rng: &mut u64, near: u64) -> u64 {
    let r = next(rng);
    let len = next(rng) % 5000;
    match r % 8 {
        0 => next(rng),
        1 => near.wrapping_add(len),
        2 => near.wrapping_sub(len & !7),
        3 => near.wrapping_add(4096 * (1 + len % 3)),
        4 => (u64::from(TAG_RECORD) << 32) | len,
        5 => (u64::from(TAG_WRAP) << 32) | (len % 2),
        6 => u64::MAX - (len & !7),
        _ => (len & !7) | (1 << 63),
    }
}

fn variant(e: &RingError) -> &'static str {
    match e {
        RingError::BadProducerPosition { .. } => "BadProducerPosition",
        RingError::BadConsumerPosition { .. } => "BadConsumerPosition",
        RingError::BadRecordTag { .. } => "BadRecordTag",
        RingError::BadRecordLength { .. } => "BadRecordLength",
        other => panic!("unexpected error kind under corruption: {other:?}"),
    }
}

#[test]
fn scribbled_ring_reports_errors_and_stays_inside() {
    let (region, params) = setup();
    let d = params.descriptor(0).unwrap();
    let control = (d.control_offset / 8) as usize;
    let data = (d.data_offset / 8) as usize;
    let data_words = (d.data_size / 8) as usize;
    let done = Arc::new(AtomicBool::new(false));
    let region = Arc::new(region);

    let scribbler = thread::spawn({
        let (region, done) = (region.clone(), done.clone());
        move || {
            // Ends the other loops even if this thread panics.
            struct Done(Arc<AtomicBool>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _done = Done(done);
            let mem = region.memory();
            let mut rng = 0x1234_5678_9abc_def1u64;
            for i in 0..SCRIBBLES {
                let near = mem.load(control, Ordering::Relaxed).unwrap();
                let r = next(&mut rng) % 16;
                let cons = mem.load(control + 8, Ordering::Relaxed).unwrap();
                let word = match r {
                    // The record header the consumer reads next.
                    0..=2 => data + ((cons % d.data_size) / 8) as usize,
                    3..=8 => data + (next(&mut rng) as usize % data_words),
                    9..=11 => control,      // producer position
                    12..=13 => control + 8, // consumer position
                    14 => control + 1,      // producer wake word
                    _ => control + 9,       // consumer wake word
                };
                let value = if r <= 2 {
                    // A record header with a random (often too large) length.
                    (u64::from(TAG_RECORD) << 32) | (next(&mut rng) % 8192)
                } else {
                    hostile_value(&mut rng, near)
                };
                mem.store(word, value, Ordering::Relaxed).unwrap();
                if i % 512 == 0 {
                    // Heal now and then, so the ends restart and meet fresh corruption.
                    let base = (near & !7) % (1 << 40);
                    mem.store(control + 8, base, Ordering::Relaxed).unwrap();
                    mem.store(control, base, Ordering::Relaxed).unwrap();
                }
                if i % 64 == 0 {
                    thread::yield_now();
                }
            }
        }
    });

    let producer = thread::spawn({
        let (region, done) = (region.clone(), done.clone());
        move || {
            let mut errors = BTreeMap::<&str, u64>::new();
            let mut pushed = 0u64;
            let mut tx = None;
            while !done.load(Ordering::Relaxed) {
                let p = match tx.as_mut() {
                    Some(p) => p,
                    None => match region.producer(0) {
                        Ok(p) => tx.insert(p),
                        Err(e) => {
                            *errors.entry(variant(&e)).or_default() += 1;
                            thread::yield_now();
                            continue;
                        }
                    },
                };
                let len = (pushed % 300) as usize;
                let result = p
                    .try_push(&vec![0x5a; len])
                    .and_then(|()| p.publish().map(|_| ()));
                match result {
                    Ok(()) => pushed += 1,
                    Err(RingError::Full) => thread::yield_now(),
                    Err(e) => {
                        *errors.entry(variant(&e)).or_default() += 1;
                        tx = None;
                    }
                }
            }
            (pushed, errors)
        }
    });

    let mut errors = BTreeMap::<&str, u64>::new();
    let (mut popped, mut rx) = (0u64, None);
    let mut buf = vec![0u8; 4096];
    while !done.load(Ordering::Relaxed) {
        let c = match rx.as_mut() {
            Some(c) => c,
            None => match region.consumer(0) {
                Ok(c) => rx.insert(c),
                Err(e) => {
                    *errors.entry(variant(&e)).or_default() += 1;
                    thread::yield_now();
                    continue;
                }
            },
        };
        match c.try_pop(&mut buf).and_then(|r| c.release().map(|_| r)) {
            Ok(Some(len)) => {
                assert!(
                    len <= c.max_payload(),
                    "a record longer than the ring allows"
                );
                popped += 1;
            }
            Ok(None) => thread::yield_now(),
            Err(e) => {
                *errors.entry(variant(&e)).or_default() += 1;
                rx = None;
            }
        }
    }
    scribbler.join().unwrap();
    let (pushed, producer_errors) = producer.join().unwrap();
    println!("consumer: {popped} records, errors {errors:?}");
    println!("producer: {pushed} records, errors {producer_errors:?}");

    for kind in ["BadProducerPosition", "BadRecordTag", "BadRecordLength"] {
        assert!(
            errors.get(kind).copied().unwrap_or(0) > 0,
            "consumer never saw {kind}: {errors:?}"
        );
    }
    assert!(
        producer_errors
            .get("BadConsumerPosition")
            .copied()
            .unwrap_or(0)
            > 0
    );
    assert!(
        pushed > 0 && popped > 0,
        "the ring kept working between corruptions"
    );

    // Nothing outside ring 0 was written: every other ring's control block and data are zero.
    let mem = region.memory();
    let first_other = (params.descriptor(1).unwrap().control_offset / 8) as usize;
    let end = (params.region_size() / 8) as usize;
    for word in first_other..end {
        assert_eq!(
            mem.load(word, Ordering::Relaxed),
            Some(0),
            "word {word} outside ring 0 was written"
        );
    }
}

#[test]
fn scribbled_headers_are_refused_or_harmless() {
    let (region, params) = setup();
    let mem = region.memory().clone();
    let header_words = (params.descriptor(0).unwrap().control_offset / 8) as usize;
    let mut rng = 0xfeed_beef_u64;
    let (mut refused, mut accepted) = (0u32, 0u32);
    for _ in 0..20_000 {
        let word = next(&mut rng) as usize % header_words;
        let saved = mem.load(word, Ordering::Relaxed).unwrap();
        let value = hostile_value(&mut rng, saved);
        mem.store(word, value, Ordering::Relaxed).unwrap();
        match Region::open(mem.clone()) {
            Ok(opened) => {
                // Accepted only when the ring layout is still exactly the one written (the
                // scribble hit padding, or the features or window words, which the ring
                // cannot check against anything).
                let got = opened.params();
                assert_eq!(
                    (got.vcpu_count, got.sizes),
                    (params.vcpu_count, params.sizes),
                    "word {word} = {value:#x}"
                );
                accepted += 1;
            }
            Err(e) => {
                assert!(matches!(e, RingError::Discovery(_)), "{e:?}");
                refused += 1;
            }
        }
        mem.store(word, saved, Ordering::Relaxed).unwrap();
    }
    assert!(refused > 15_000, "refused {refused}, accepted {accepted}");
}
