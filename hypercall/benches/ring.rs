//! Ring vs crossbeam channel vs unix socketpair, carrying 600-byte records between two
//! threads: one-way throughput and round-trip latency, measured in the same run, then a
//! ratio summary with fixed iteration counts.
//!
//! Run: `cargo bench -p hypercall --bench ring`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use hypercall::discovery::{Features, RingKind};
use hypercall::ring::park::{ParkWaiter, Unparker, park_pair};
use hypercall::ring::{Consumer, LayoutParams, Producer, Region, RingSizes, WaitStrategy, Waiter};

/// Record size (a KVMI event with its header is ~600 bytes).
const RECORD: usize = 600;
/// Records published per batch in the one-way ring test.
const BATCH: u64 = 16;
/// Park timeout: a safety net only.
const PARK: Duration = Duration::from_millis(5);

type Mem = Arc<[AtomicU64]>;

/// Sleeps taken by ring waiters (reported in the summary: sleeps per operation).
static SLEEPS: AtomicU64 = AtomicU64::new(0);

/// A [`ParkWaiter`] that counts its sleeps.
struct Counted(ParkWaiter);

impl Waiter for Counted {
    fn wait(&self) {
        SLEEPS.fetch_add(1, Ordering::Relaxed);
        self.0.wait();
    }
    fn relax(&self) {
        self.0.relax();
    }
}

fn parked() -> (Counted, Unparker) {
    let (waiter, unparker) = park_pair(PARK);
    (Counted(waiter), unparker)
}

/// A region with one vCPU: ring 0 carries requests, ring 1 replies.
fn ring_pair() -> (Producer<Mem>, Consumer<Mem>, Producer<Mem>, Consumer<Mem>) {
    let params = LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes {
            event: 64 << 10,
            event_reply: 64 << 10,
            ..RingSizes::default()
        },
        features: Features::NOTIFY,
        map_window_gpa: 0,
        map_window_size: 0,
    };
    let mem: Mem = (0..params.region_size() / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    let region = Region::create(mem, &params).expect("layout");
    let ev = region.ring_index(RingKind::Event, 0).expect("ring");
    let rep = region.ring_index(RingKind::EventReply, 0).expect("ring");
    (
        region.producer(ev).expect("producer"),
        region.consumer(ev).expect("consumer"),
        region.producer(rep).expect("producer"),
        region.consumer(rep).expect("consumer"),
    )
}

/// Starts `body` on a thread that first hands back its own unparker.
fn spawn_parked<T: Send + 'static>(
    body: impl FnOnce(Counted) -> T + Send + 'static,
) -> (thread::JoinHandle<T>, Unparker) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        let (waiter, unparker) = parked();
        tx.send(unparker).expect("send unparker");
        body(waiter)
    });
    (handle, rx.recv().expect("unparker"))
}

fn ring_one_way(n: u64) -> Duration {
    let (mut tx, mut rx, _, _) = ring_pair();
    let (me_wait, me) = parked();
    let strategy = WaitStrategy::default();
    let (consumer, peer) = spawn_parked(move |waiter| {
        let mut scratch = vec![0u8; rx.max_payload()];
        let (mut count, mut sum) = (0u64, 0u64);
        while count < n {
            let got = rx
                .drain(&mut scratch, &me, |r| {
                    sum = sum.wrapping_add(u64::from(r[RECORD - 1]))
                })
                .expect("drain");
            count += got as u64;
            if got == 0 {
                rx.wait_readable(&strategy, &waiter, &me).expect("wait");
            }
        }
        sum
    });
    let record = [7u8; RECORD];
    let start = Instant::now();
    for i in 0..n {
        tx.push_blocking(&record, &strategy, &me_wait, &peer)
            .expect("push");
        if i % BATCH == BATCH - 1 {
            tx.publish_and_notify(&peer).expect("publish");
        }
    }
    tx.publish_and_notify(&peer).expect("publish");
    let sum = consumer.join().expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(sum, 7 * n);
    elapsed
}

fn ring_round_trips(n: u64) -> Duration {
    let (mut req_tx, mut req_rx, mut rep_tx, mut rep_rx) = ring_pair();
    let (me_wait, me) = parked();
    let strategy = WaitStrategy::default();
    let (echo, peer) = spawn_parked(move |waiter| {
        let mut buf = vec![0u8; RECORD];
        for _ in 0..n {
            let len = req_rx
                .pop_blocking(&mut buf, &strategy, &waiter, &me)
                .expect("pop");
            req_rx.release_and_notify(&me).expect("release");
            rep_tx.try_push(&buf[..len]).expect("push");
            rep_tx.publish_and_notify(&me).expect("publish");
        }
    });
    let record = [9u8; RECORD];
    let mut buf = vec![0u8; RECORD];
    let start = Instant::now();
    for _ in 0..n {
        req_tx.try_push(&record).expect("push");
        req_tx.publish_and_notify(&peer).expect("publish");
        let len = rep_rx
            .pop_blocking(&mut buf, &strategy, &me_wait, &peer)
            .expect("pop");
        assert_eq!(len, RECORD);
        rep_rx.release_and_notify(&peer).expect("release");
    }
    let elapsed = start.elapsed();
    echo.join().expect("echo");
    elapsed
}

fn channel_one_way(n: u64) -> Duration {
    let (tx, rx) = crossbeam_channel::bounded::<[u8; RECORD]>(64);
    let consumer = thread::spawn(move || {
        (0..n)
            .map(|_| u64::from(rx.recv().expect("recv")[RECORD - 1]))
            .sum::<u64>()
    });
    let start = Instant::now();
    for _ in 0..n {
        tx.send([7u8; RECORD]).expect("send");
    }
    let sum = consumer.join().expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(sum, 7 * n);
    elapsed
}

fn channel_round_trips(n: u64) -> Duration {
    let (req_tx, req_rx) = crossbeam_channel::bounded::<[u8; RECORD]>(1);
    let (rep_tx, rep_rx) = crossbeam_channel::bounded::<[u8; RECORD]>(1);
    let echo = thread::spawn(move || {
        for _ in 0..n {
            rep_tx.send(req_rx.recv().expect("recv")).expect("send");
        }
    });
    let start = Instant::now();
    for _ in 0..n {
        req_tx.send([9u8; RECORD]).expect("send");
        assert_eq!(rep_rx.recv().expect("recv")[0], 9);
    }
    let elapsed = start.elapsed();
    echo.join().expect("echo");
    elapsed
}

fn socket_one_way(n: u64) -> Duration {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let consumer = thread::spawn(move || {
        let mut buf = [0u8; RECORD];
        let mut sum = 0u64;
        for _ in 0..n {
            b.read_exact(&mut buf).expect("read");
            sum += u64::from(buf[RECORD - 1]);
        }
        sum
    });
    let start = Instant::now();
    for _ in 0..n {
        a.write_all(&[7u8; RECORD]).expect("write");
    }
    let sum = consumer.join().expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(sum, 7 * n);
    elapsed
}

fn socket_round_trips(n: u64) -> Duration {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let echo = thread::spawn(move || {
        let mut buf = [0u8; RECORD];
        for _ in 0..n {
            b.read_exact(&mut buf).expect("read");
            b.write_all(&buf).expect("write");
        }
    });
    let mut buf = [0u8; RECORD];
    let start = Instant::now();
    for _ in 0..n {
        a.write_all(&[9u8; RECORD]).expect("write");
        a.read_exact(&mut buf).expect("read");
        assert_eq!(buf[0], 9);
    }
    let elapsed = start.elapsed();
    echo.join().expect("echo");
    elapsed
}

type Run = fn(u64) -> Duration;

const ONE_WAY: [(&str, Run); 3] = [
    ("ring", ring_one_way),
    ("crossbeam", channel_one_way),
    ("socketpair", socket_one_way),
];
const ROUND_TRIP: [(&str, Run); 3] = [
    ("ring", ring_round_trips),
    ("crossbeam", channel_round_trips),
    ("socketpair", socket_round_trips),
];

fn criterion_runs(c: &mut Criterion) {
    let mut group = c.benchmark_group("one_way_600B");
    group.throughput(Throughput::Elements(1));
    for (name, run) in ONE_WAY {
        group.bench_function(name, |b| b.iter_custom(run));
    }
    group.finish();
    let mut group = c.benchmark_group("round_trip_600B");
    group.throughput(Throughput::Elements(1));
    for (name, run) in ROUND_TRIP {
        group.bench_function(name, |b| b.iter_custom(run));
    }
    group.finish();
}

/// Rounds of the summary: each round runs every transport once, so a change in machine load
/// (other processes on a shared host) hits all of them alike; the best round counts.
const ROUNDS: u32 = 5;

fn summary() {
    println!(
        "\n== ratio summary (600-byte records, two threads, best of {ROUNDS} interleaved rounds) =="
    );
    for (title, runs, n) in [
        ("one-way records/s", ONE_WAY, 200_000u64),
        ("round trips/s", ROUND_TRIP, 50_000),
    ] {
        SLEEPS.store(0, Ordering::Relaxed);
        let mut best = [0f64; 3];
        for _ in 0..ROUNDS {
            for (slot, (_, run)) in best.iter_mut().zip(runs.iter()) {
                *slot = slot.max(n as f64 / run(n).as_secs_f64());
            }
        }
        let sleeps = SLEEPS.load(Ordering::Relaxed) as f64 / f64::from(ROUNDS) / n as f64;
        for ((name, _), rate) in runs.iter().zip(best) {
            println!("{title:>18}  {name:<10} {rate:>12.0}");
        }
        println!("{title:>18}  ring sleeps per operation: {sleeps:.4}");
        println!(
            "{title:>18}  ring/crossbeam = {:.2}x   ring/socketpair = {:.2}x",
            best[0] / best[1],
            best[0] / best[2]
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(10)
        .configure_from_args();
    criterion_runs(&mut c);
    c.final_summary();
    summary();
}
