//! Unit tests of the layout, the record format, validation and notification suppression,
//! on heap memory (the cross-process, model-checked and corruption tests are in `tests/`).

use core::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::discovery::{DiscoveryError, Features, RingKind};

fn heap(bytes: u64) -> Vec<AtomicU64> {
    (0..bytes / 8).map(|_| AtomicU64::new(0)).collect()
}

fn params(vcpus: u32, ring: u64) -> LayoutParams {
    LayoutParams {
        vcpu_count: vcpus,
        sizes: RingSizes {
            event: ring,
            event_reply: ring,
            command: ring,
            command_reply: ring * 2,
            log: ring,
        },
        features: Features::NOTIFY.union(Features::RING_WAKE_FLAGS),
        map_window_gpa: 0x1_0000_0000,
        map_window_size: 64 << 20,
    }
}

#[test]
fn layout_is_aligned_disjoint_and_reopens() {
    let p = params(3, 4096);
    let mem = heap(p.region_size());
    let created = Region::create(&mem[..], &p).unwrap();
    let opened = Region::open(&mem[..]).unwrap();
    assert_eq!(opened.params(), created.params());
    assert_eq!(opened.header().ring_count, 9);
    let mut end = u64::from(opened.header().header_size);
    for i in 0..9 {
        let d = p.descriptor(i).unwrap();
        assert_eq!(d.control_offset % 64, 0);
        assert_eq!(d.data_offset % 64, 0);
        assert!(d.control_offset >= end, "ring {i} overlaps");
        end = d.data_offset + d.data_size;
    }
    assert!(end <= p.region_size());
    assert_eq!(p.region_size() % 4096, 0);
    assert_eq!(opened.ring_index(RingKind::EventReply, 2), Ok(5));
    assert_eq!(opened.ring_index(RingKind::Log, 0), Ok(8));
    assert_eq!(
        opened.ring_index(RingKind::Event, 3),
        Err(RingError::NoSuchRing(3))
    );
    assert!(opened.producer(9).is_err());
}

#[test]
fn open_rejects_corrupt_headers_and_tables() {
    let p = params(2, 4096);
    let mem = heap(p.region_size());
    Region::create(&mem[..], &p).unwrap();
    // Wrong length.
    assert!(matches!(
        Region::open(&mem[..mem.len() - 8]).unwrap_err(),
        RingError::Discovery(DiscoveryError::SizeMismatch { .. })
    ));
    // Each corruption, undone after the check.
    type Case = (usize, u64, fn(&RingError) -> bool);
    let cases: [Case; 5] = [
        (0, 0, |e| {
            matches!(e, RingError::Discovery(DiscoveryError::BadMagic(0)))
        }),
        (6, 7, |e| {
            matches!(e, RingError::Discovery(DiscoveryError::BadShape { .. }))
        }),
        // Ring 1's data size (word 8 + 4 + 3) made 8192: overlaps ring 2.
        (15, 8192, |e| {
            matches!(
                e,
                RingError::Discovery(DiscoveryError::RingBounds { index: 2 })
            )
        }),
        // Ring 1's data offset (word 8 + 4 + 2) moved by one line.
        (14, 0, |e| {
            matches!(
                e,
                RingError::Discovery(DiscoveryError::RingBounds { index: 1 })
            )
        }),
        // Ring 4 (command) given kind 5.
        (24, 5, |e| {
            matches!(
                e,
                RingError::Discovery(DiscoveryError::RingOrder { index: 4 })
            )
        }),
    ];
    for (word, value, expected) in cases {
        let saved = mem[word].load(Ordering::Relaxed);
        let value = if word == 14 { saved + 64 } else { value };
        mem[word].store(value, Ordering::Relaxed);
        let err = Region::open(&mem[..]).unwrap_err();
        assert!(expected(&err), "word {word}: {err:?}");
        assert!(err.is_corruption());
        mem[word].store(saved, Ordering::Relaxed);
    }
    Region::open(&mem[..]).unwrap();
}

#[test]
fn create_rejects_bad_params() {
    let mut p = params(1, 4096);
    p.sizes.log = 3000;
    assert_eq!(
        Region::create(&heap(1 << 20)[..], &p).unwrap_err(),
        RingError::BadParams
    );
    p = params(0, 4096);
    assert_eq!(
        Region::create(&heap(1 << 20)[..], &p).unwrap_err(),
        RingError::BadParams
    );
    p = params(1, 4096);
    p.map_window_gpa = 0x1001;
    assert_eq!(
        Region::create(&heap(1 << 20)[..], &p).unwrap_err(),
        RingError::BadParams
    );
}

fn one_ring(size: u64) -> (Vec<AtomicU64>, LayoutParams) {
    let p = params(1, size);
    let mem = heap(p.region_size());
    Region::create(&mem[..], &p).unwrap();
    (mem, p)
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31) ^ i) as u8)
        .collect()
}

#[test]
fn records_of_every_size_survive_many_wraps() {
    let (mem, _) = one_ring(1024);
    let region = Region::open(&mem[..]).unwrap();
    let mut tx = region.producer(0).unwrap();
    let mut rx = region.consumer(0).unwrap();
    assert_eq!(tx.max_payload(), 504);
    let mut buf = vec![0u8; rx.max_payload()];
    for round in 0..2000 {
        let len = round % 505;
        tx.try_push(&pattern(round, len)).unwrap();
        assert!(!tx.publish().unwrap(), "consumer is awake: no notification");
        assert_eq!(rx.try_pop(&mut buf).unwrap(), Some(len), "round {round}");
        assert_eq!(buf[..len], pattern(round, len)[..]);
        assert!(!rx.release().unwrap());
        assert_eq!(rx.try_pop(&mut buf).unwrap(), None);
    }
}

#[test]
fn batches_are_invisible_until_published_and_full_is_reported() {
    let (mem, _) = one_ring(1024);
    let region = Region::open(&mem[..]).unwrap();
    let mut tx = region.producer(0).unwrap();
    let mut rx = region.consumer(0).unwrap();
    // 100-byte payloads take 112 bytes: 9 fit in 1024.
    let mut pushed = 0;
    loop {
        match tx.try_push(&[pushed as u8; 100]) {
            Ok(()) => pushed += 1,
            Err(RingError::Full) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(pushed, 9);
    assert_eq!(tx.staged_bytes(), 9 * 112);
    let mut buf = [0u8; 512];
    assert_eq!(
        rx.try_pop(&mut buf).unwrap(),
        None,
        "staged records are not visible"
    );
    let _ = tx.publish().unwrap();
    let mut seen = Vec::new();
    let n = rx.drain(&mut buf, &NoNotify, |r| seen.push(r[0])).unwrap();
    assert_eq!(n, 9);
    assert_eq!(seen, (0..9).collect::<Vec<u8>>());
    tx.try_push(&[1; 100]).unwrap();
    assert_eq!(
        tx.try_push(&[0; 505]),
        Err(RingError::TooLarge { len: 505, max: 504 })
    );
    let _ = tx.publish().unwrap();
    let mut small = [0u8; 10];
    assert_eq!(
        rx.try_pop(&mut small),
        Err(RingError::BufferTooSmall { need: 100 })
    );
    assert_eq!(
        rx.try_pop(&mut buf).unwrap(),
        Some(100),
        "the record stayed"
    );
}

#[test]
fn consumer_notified_once_after_arming_and_never_while_awake() {
    let (mem, _) = one_ring(4096);
    let region = Region::open(&mem[..]).unwrap();
    let mut tx = region.producer(0).unwrap();
    let mut rx = region.consumer(0).unwrap();
    tx.try_push(b"awake").unwrap();
    assert!(!tx.publish().unwrap());
    let mut buf = [0u8; 64];
    assert_eq!(rx.try_pop(&mut buf).unwrap(), Some(5));
    // Arming with a record still pending is refused.
    tx.try_push(b"pending").unwrap();
    assert!(!tx.publish().unwrap());
    assert!(!rx.arm_wake().unwrap());
    assert_eq!(rx.try_pop(&mut buf).unwrap(), Some(7));
    // Empty now: arm, then the next publish notifies, the one after does not.
    assert!(rx.arm_wake().unwrap());
    tx.try_push(b"one").unwrap();
    assert!(tx.publish().unwrap(), "first publish after arming notifies");
    tx.try_push(b"two").unwrap();
    assert!(!tx.publish().unwrap(), "only once per arming");
    rx.disarm_wake().unwrap();
    tx.try_push(b"three").unwrap();
    assert!(!tx.publish().unwrap(), "disarmed: no notification");
    assert_eq!(rx.drain(&mut buf, &NoNotify, |_| {}).unwrap(), 3);
}

#[test]
fn producer_notified_once_when_space_frees() {
    let (mem, _) = one_ring(256);
    let region = Region::open(&mem[..]).unwrap();
    let mut tx = region.producer(0).unwrap();
    let mut rx = region.consumer(0).unwrap();
    while tx.try_push(&[7; 56]).is_ok() {}
    let _ = tx.publish().unwrap();
    assert!(tx.arm_wake(56).unwrap(), "full: may sleep");
    let mut buf = [0u8; 128];
    rx.try_pop(&mut buf).unwrap();
    assert!(
        rx.release().unwrap(),
        "release after the producer armed notifies"
    );
    rx.try_pop(&mut buf).unwrap();
    assert!(!rx.release().unwrap(), "once");
    tx.disarm_wake().unwrap();
    assert!(!tx.arm_wake(56).unwrap(), "space is free: no sleep");
}

#[test]
fn hostile_positions_and_headers_are_errors() {
    let (mem, p) = one_ring(1024);
    let region = Region::open(&mem[..]).unwrap();
    let d = p.descriptor(0).unwrap();
    let control = (d.control_offset / 8) as usize;
    let data = (d.data_offset / 8) as usize;
    let mut tx = region.producer(0).unwrap();
    let mut rx = region.consumer(0).unwrap();
    let mut buf = [0u8; 1024];
    tx.try_push(&[1; 40]).unwrap();
    let _ = tx.publish().unwrap();
    let set = |w: usize, v: u64| mem[w].store(v, Ordering::Relaxed);

    // Producer position misaligned, too far ahead, then moved backwards.
    set(control, 44);
    assert_eq!(
        rx.try_pop(&mut buf),
        Err(RingError::BadProducerPosition { pos: 44 })
    );
    set(control, 2048);
    assert_eq!(
        rx.try_pop(&mut buf),
        Err(RingError::BadProducerPosition { pos: 2048 })
    );
    set(control, 48);
    // Header with an unknown tag, then a length past the published end, then a huge one.
    set(data, 0xdead_0000_0000_0028);
    assert!(matches!(
        rx.try_pop(&mut buf),
        Err(RingError::BadRecordTag { pos: 0, .. })
    ));
    set(data, (u64::from(TAG_RECORD) << 32) | 41);
    assert_eq!(
        rx.try_pop(&mut buf),
        Err(RingError::BadRecordLength { pos: 0, len: 41 })
    );
    set(data, (u64::from(TAG_RECORD) << 32) | 0xffff_ffff);
    assert!(matches!(
        rx.try_pop(&mut buf),
        Err(RingError::BadRecordLength { .. })
    ));
    set(data, (u64::from(TAG_WRAP) << 32) | 8);
    assert!(matches!(
        rx.try_pop(&mut buf),
        Err(RingError::BadRecordTag { .. })
    ));
    // A wrap marker at 0 would skip 1024 bytes, more than published.
    set(data, u64::from(TAG_WRAP) << 32);
    assert!(matches!(
        rx.try_pop(&mut buf),
        Err(RingError::BadRecordLength { .. })
    ));
    set(data, (u64::from(TAG_RECORD) << 32) | 40);
    assert_eq!(rx.try_pop(&mut buf), Ok(Some(40)));
    set(control, 16);
    assert_eq!(
        rx.try_pop(&mut buf),
        Err(RingError::BadProducerPosition { pos: 16 }),
        "backwards"
    );
    set(control, 48);

    // The producer does not trust the consumer position either.
    let _ = rx.release().unwrap();
    tx.try_push(&[0; 500]).unwrap();
    assert_eq!(tx.try_push(&[0; 500]), Err(RingError::Full));
    set(control + 8, 1000);
    assert_eq!(
        tx.try_push(&[0; 500]),
        Err(RingError::BadConsumerPosition { pos: 1000 })
    );
    set(control + 8, 8);
    assert_eq!(
        tx.try_push(&[0; 500]),
        Err(RingError::BadConsumerPosition { pos: 8 }),
        "backwards"
    );
    set(control + 8, 48);
    assert_eq!(tx.try_push(&[0; 500]), Err(RingError::Full));

    // Handles refuse to start on corrupt control blocks.
    set(control, 5000);
    assert!(matches!(
        region.consumer(0),
        Err(RingError::BadProducerPosition { .. })
    ));
    assert!(matches!(
        region.producer(0),
        Err(RingError::BadConsumerPosition { .. })
    ));
    set(control, u64::MAX - 7);
    assert!(region.producer(0).unwrap_err().is_corruption());
}

#[test]
fn geometry_outside_the_memory_is_refused() {
    let mem = heap(4096);
    let geo = RingGeometry {
        control: 0,
        data: 16,
        size: 4096,
    };
    assert_eq!(
        Producer::new(&mem[..], geo).unwrap_err(),
        RingError::OutOfBounds
    );
    assert_eq!(
        Consumer::new(&mem[..], geo).unwrap_err(),
        RingError::OutOfBounds
    );
    let odd = RingGeometry {
        control: 0,
        data: 16,
        size: 1000,
    };
    assert_eq!(
        Consumer::new(&mem[..], odd).unwrap_err(),
        RingError::OutOfBounds
    );
    let ok = RingGeometry {
        control: 0,
        data: 16,
        size: 2048,
    };
    assert!(Consumer::new(&mem[..], ok).is_ok());
}
