//! Ring vs crossbeam channel vs unix socketpair, carrying 600-byte records between two
//! threads: one-way throughput at batch 1 and batch 16, and round-trip latency, measured in
//! the same run, then a ratio summary with fixed record counts.
//!
//! # Like with like
//! In the one-way tests every transport hands records over in batches of `B` (1 or 16), with
//! one synchronisation per batch on each side:
//! - **ring**: the producer stages `B` records and publishes them with one store (notifying a
//!   sleeping consumer at most once); the consumer pops `B` records and releases them with one
//!   store.
//! - **crossbeam**: one `send` of a `[[u8; 600]; B]` by value (copied into the channel slot and
//!   out of it, as a ring record is copied in and out; no allocation per message); one `recv`
//!   per batch. The channel holds 64 records at either batch size (64 or 4 messages).
//! - **socketpair**: one `writev` of `B` separate 600-byte records (a loop only if the socket
//!   buffer takes part of them); one `read_exact` of `B * 600` bytes on the other side.
//!
//! At batch 1 every record is its own hand-off on every transport (the ring publishes and
//! releases per record); at batch 16 every transport amortises its synchronisation over 16
//! records. Record size is 600 bytes everywhere. Round trips carry one record each way.
//!
//! Run: `cargo bench -p hypercall --bench ring` (short: append
//! `-- --warm-up-time 1 --measurement-time 2`).

use std::io::{IoSlice, Read, Write};
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
/// Records a crossbeam channel holds in the one-way test (whatever the batch size).
const CHANNEL_RECORDS: usize = 64;
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

/// One-way: `batches` hand-offs of `B` records each. The producer stages `B` records and
/// publishes them with one store (and at most one notification); the consumer pops `B`
/// records and releases them with one store.
fn ring_one_way<const B: usize>(batches: u64) -> Duration {
    let (mut tx, mut rx, _, _) = ring_pair();
    let (me_wait, me) = parked();
    let strategy = WaitStrategy::default();
    let (consumer, peer) = spawn_parked(move |waiter| {
        let mut buf = vec![0u8; RECORD];
        let mut sum = 0u64;
        for _ in 0..batches {
            for _ in 0..B {
                let len = rx
                    .pop_blocking(&mut buf, &strategy, &waiter, &me)
                    .expect("pop");
                sum += u64::from(buf[len - 1]);
            }
            rx.release_and_notify(&me).expect("release");
        }
        sum
    });
    let record = [7u8; RECORD];
    let start = Instant::now();
    for _ in 0..batches {
        for _ in 0..B {
            tx.push_blocking(&record, &strategy, &me_wait, &peer)
                .expect("push");
        }
        tx.publish_and_notify(&peer).expect("publish");
    }
    let sum = consumer.join().expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(sum, 7 * batches * B as u64);
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

/// One-way: `batches` messages of `B` records each (a `[[u8; RECORD]; B]` moved through the
/// channel, copied in and out like a ring record: no allocation per message). The channel
/// holds [`CHANNEL_RECORDS`] records whatever the batch size.
fn channel_one_way<const B: usize>(batches: u64) -> Duration {
    let (tx, rx) = crossbeam_channel::bounded::<[[u8; RECORD]; B]>((CHANNEL_RECORDS / B).max(1));
    let consumer = thread::spawn(move || {
        let mut sum = 0u64;
        for _ in 0..batches {
            let batch = rx.recv().expect("recv");
            sum += batch.iter().map(|r| u64::from(r[RECORD - 1])).sum::<u64>();
        }
        sum
    });
    let batch = [[7u8; RECORD]; B];
    let start = Instant::now();
    for _ in 0..batches {
        tx.send(batch).expect("send");
    }
    let sum = consumer.join().expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(sum, 7 * batches * B as u64);
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

/// Writes every byte of `bufs` with `writev` (one call unless the socket buffer is full).
fn write_all_vectored(stream: &mut UnixStream, mut bufs: &mut [IoSlice<'_>]) {
    while !bufs.is_empty() {
        let n = stream.write_vectored(bufs).expect("writev");
        assert!(n > 0, "writev wrote nothing");
        IoSlice::advance_slices(&mut bufs, n);
    }
}

/// One-way: `batches` hand-offs of `B` records each: one `writev` of `B` separate 600-byte
/// records, and on the other side one `read_exact` of `B * RECORD` bytes.
fn socket_one_way<const B: usize>(batches: u64) -> Duration {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let consumer = thread::spawn(move || {
        let mut buf = vec![0u8; B * RECORD];
        let mut sum = 0u64;
        for _ in 0..batches {
            b.read_exact(&mut buf).expect("read");
            sum += buf
                .chunks_exact(RECORD)
                .map(|r| u64::from(r[RECORD - 1]))
                .sum::<u64>();
        }
        sum
    });
    let record = [7u8; RECORD];
    let start = Instant::now();
    for _ in 0..batches {
        let mut slices = [IoSlice::new(&record); B];
        write_all_vectored(&mut a, &mut slices);
    }
    let sum = consumer.join().expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(sum, 7 * batches * B as u64);
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

/// A one-way run takes the number of batches; a round-trip run the number of round trips.
type Run = fn(u64) -> Duration;

/// The one-way runs at batch size `B`.
const fn one_way<const B: usize>() -> [(&'static str, Run); 3] {
    [
        ("ring", ring_one_way::<B>),
        ("crossbeam", channel_one_way::<B>),
        ("socketpair", socket_one_way::<B>),
    ]
}

/// Batch sizes of the one-way comparison, with their runs.
const ONE_WAY: [(usize, [(&str, Run); 3]); 2] = [(1, one_way::<1>()), (16, one_way::<16>())];
const ROUND_TRIP: [(&str, Run); 3] = [
    ("ring", ring_round_trips),
    ("crossbeam", channel_round_trips),
    ("socketpair", socket_round_trips),
];

fn criterion_runs(c: &mut Criterion) {
    for (batch, runs) in ONE_WAY {
        // One iteration is one batch; throughput is counted in records.
        let mut group = c.benchmark_group(format!("one_way_600B_batch{batch}"));
        group.throughput(Throughput::Elements(batch as u64));
        for (name, run) in runs {
            group.bench_function(name, |b| b.iter_custom(run));
        }
        group.finish();
    }
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

/// Best rate (operations per second) of each run over [`ROUNDS`] interleaved rounds, with
/// the ring's sleeps per operation; a run of `units` units carries `ops_per_unit` operations
/// per unit.
fn best_rates(runs: &[(&str, Run); 3], units: u64, ops_per_unit: u64) -> ([f64; 3], f64) {
    SLEEPS.store(0, Ordering::Relaxed);
    let ops = (units * ops_per_unit) as f64;
    let mut best = [0f64; 3];
    for _ in 0..ROUNDS {
        for (slot, (_, run)) in best.iter_mut().zip(runs.iter()) {
            *slot = slot.max(ops / run(units).as_secs_f64());
        }
    }
    let sleeps = SLEEPS.load(Ordering::Relaxed) as f64 / f64::from(ROUNDS) / ops;
    (best, sleeps)
}

fn print_rates(title: &str, runs: &[(&str, Run); 3], best: [f64; 3], sleeps: f64) {
    for ((name, _), rate) in runs.iter().zip(best) {
        println!("{title:>24}  {name:<10} {rate:>12.0}");
    }
    println!("{title:>24}  ring sleeps per operation: {sleeps:.4}");
    println!(
        "{title:>24}  ring/crossbeam = {:.2}x   ring/socketpair = {:.2}x",
        best[0] / best[1],
        best[0] / best[2]
    );
}

/// Records per one-way summary run (a multiple of every batch size).
const ONE_WAY_RECORDS: u64 = 192_000;
/// Round trips per round-trip summary run.
const ROUND_TRIPS: u64 = 50_000;

fn summary() {
    println!(
        "\n== ratio summary (600-byte records, two threads, best of {ROUNDS} interleaved rounds) =="
    );
    let mut ratios = Vec::new();
    for (batch, runs) in ONE_WAY {
        let title = format!("one-way batch {batch} rec/s");
        let (best, sleeps) = best_rates(&runs, ONE_WAY_RECORDS / batch as u64, batch as u64);
        print_rates(&title, &runs, best, sleeps);
        ratios.push((batch, best[0] / best[1], best[0] / best[2]));
    }
    let (best, sleeps) = best_rates(&ROUND_TRIP, ROUND_TRIPS, 1);
    print_rates("round trips/s", &ROUND_TRIP, best, sleeps);
    for (batch, crossbeam, socketpair) in ratios {
        println!(
            "one-way ratios at batch {batch:>2}: ring/crossbeam = {crossbeam:.2}x   \
             ring/socketpair = {socketpair:.2}x"
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
