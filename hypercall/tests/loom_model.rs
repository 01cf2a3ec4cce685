//! Model check of the ring's index and wake-up protocol with loom (a normal `cargo test`:
//! loom explores the thread interleavings and the weak-memory outcomes its model allows).
//!
//! The ring runs unchanged over a loom-backed [`SharedMemory`]: every word is a loom atomic,
//! and the fence is loom's, so a missing acquire/release shows up as a stale payload and a
//! missing store-load fence as a lost wake-up.

use hypercall::ring::{Consumer, Producer, RingError, RingGeometry, SharedMemory};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU64, Ordering};

/// Ring memory: one control block (16 words) and a 64-byte data area.
#[derive(Clone)]
struct LoomMem(Arc<Vec<AtomicU64>>);

const GEO: RingGeometry = RingGeometry {
    control: 0,
    data: 16,
    size: 64,
};

impl LoomMem {
    fn new() -> Self {
        LoomMem(Arc::new((0..24).map(|_| AtomicU64::new(0)).collect()))
    }
}

impl SharedMemory for LoomMem {
    fn word_count(&self) -> usize {
        self.0.len()
    }
    fn load(&self, index: usize, order: Ordering) -> Option<u64> {
        Some(self.0.get(index)?.load(order))
    }
    fn store(&self, index: usize, value: u64, order: Ordering) -> Option<()> {
        self.0.get(index)?.store(value, order);
        Some(())
    }
    fn fence(&self) {
        loom::sync::atomic::fence(Ordering::SeqCst);
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|b| (i * 40 + b + 1) as u8).collect()
}

/// Payload lengths: 24 B and 32 B records, then one that needs a wrap marker.
const LENGTHS: [usize; 3] = [16, 24, 8];

#[test]
fn records_arrive_intact_and_in_order_across_a_wrap() {
    model(|| {
        let mem = LoomMem::new();
        let mut tx = Producer::new(mem.clone(), GEO).unwrap();
        let mut rx = Consumer::new(mem, GEO).unwrap();
        let producer = loom::thread::spawn(move || {
            for (i, len) in LENGTHS.into_iter().enumerate() {
                loop {
                    match tx.try_push(&payload(i, len)) {
                        Ok(()) => break,
                        Err(RingError::Full) => {
                            let _ = tx.publish().unwrap();
                            loom::thread::yield_now();
                        }
                        Err(e) => panic!("producer: {e}"),
                    }
                }
                let _ = tx.publish().unwrap();
            }
        });
        let mut buf = [0u8; 32];
        let mut next = 0;
        while next < LENGTHS.len() {
            match rx.try_pop(&mut buf).unwrap() {
                Some(len) => {
                    assert_eq!(len, LENGTHS[next]);
                    assert_eq!(buf[..len], payload(next, len)[..], "record {next}");
                    let _ = rx.release().unwrap();
                    next += 1;
                }
                None => loom::thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}

#[test]
fn a_sleeping_consumer_is_always_notified() {
    model(|| {
        let mem = LoomMem::new();
        let mut tx = Producer::new(mem.clone(), GEO).unwrap();
        let mut rx = Consumer::new(mem, GEO).unwrap();
        let producer = loom::thread::spawn(move || {
            tx.try_push(b"wake").unwrap();
            tx.publish().unwrap()
        });
        let mut buf = [0u8; 8];
        // The consumer's side of the protocol: check, arm, re-check, sleep.
        let slept = rx.try_pop(&mut buf).unwrap().is_none() && rx.arm_wake().unwrap();
        let notified = producer.join().unwrap();
        if slept {
            assert!(
                notified,
                "lost wake-up: the consumer sleeps and nobody notifies it"
            );
        }
    });
}

#[test]
fn a_producer_waiting_for_space_is_always_notified() {
    model(|| {
        let mem = LoomMem::new();
        let mut tx = Producer::new(mem.clone(), GEO).unwrap();
        let mut rx = Consumer::new(mem, GEO).unwrap();
        // Fill the ring: two 24-byte payloads take 64 bytes.
        tx.try_push(&[1; 24]).unwrap();
        tx.try_push(&[2; 24]).unwrap();
        let _ = tx.publish().unwrap();
        let consumer = loom::thread::spawn(move || {
            let mut buf = [0u8; 32];
            rx.try_pop(&mut buf).unwrap();
            rx.release().unwrap()
        });
        let slept = tx.try_push(&[3; 24]) == Err(RingError::Full) && tx.arm_wake(24).unwrap();
        let notified = consumer.join().unwrap();
        if slept {
            assert!(
                notified,
                "lost wake-up: the producer sleeps and nobody notifies it"
            );
        }
    });
}

#[test]
fn batched_publish_and_drain_deliver_everything_once() {
    model(|| {
        let mem = LoomMem::new();
        let mut tx = Producer::new(mem.clone(), GEO).unwrap();
        let mut rx = Consumer::new(mem, GEO).unwrap();
        let producer = loom::thread::spawn(move || {
            // Two 24-byte records in one batch (one release store), then a 32-byte one that
            // needs a wrap marker and the space the consumer frees with its single release
            // of the batch.
            tx.try_push(&payload(0, 16)).unwrap();
            tx.try_push(&payload(1, 16)).unwrap();
            let _ = tx.publish().unwrap();
            loop {
                match tx.try_push(&payload(2, 24)) {
                    Ok(()) => break,
                    Err(RingError::Full) => loom::thread::yield_now(),
                    Err(e) => panic!("producer: {e}"),
                }
            }
            let _ = tx.publish().unwrap();
        });
        let mut scratch = [0u8; 32];
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let n = rx
                .drain(&mut scratch, &hypercall::ring::NoNotify, |r| {
                    seen.push(r.to_vec())
                })
                .unwrap();
            if n == 0 {
                loom::thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert_eq!(seen, vec![payload(0, 16), payload(1, 16), payload(2, 24)]);
    });
}
