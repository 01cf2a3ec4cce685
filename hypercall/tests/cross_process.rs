//! Two processes (fork) exchange records over a memfd region, each with its own mapping of
//! it, woken through eventfds: millions of records of varying sizes one way, and round trips
//! both ways. Counts and checksums are asserted on both sides.

mod common;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use common::{EventFd, FNV_INIT, Mapping, checksum, make_record};
use hypercall::discovery::{Features, RingKind};
use hypercall::ring::{LayoutParams, Region, RingError, RingSizes, SharedRegion, WaitStrategy};

/// Records in the one-way stream (3 million in release builds; fewer in unoptimised ones,
/// whose per-word copies are ~10x slower, to keep `cargo test` short).
const ONE_WAY: u64 = if cfg!(debug_assertions) {
    400_000
} else {
    3_000_000
};
/// Request/reply round trips.
const ROUND_TRIPS: u64 = if cfg!(debug_assertions) {
    100_000
} else {
    1_000_000
};
/// Largest record (KVMI events are ~600 bytes).
const MAX_RECORD: usize = 1000;
/// Requests in flight in the round-trip test.
const WINDOW: u64 = 32;

type Shared = Arc<SharedRegion<Mapping>>;

fn params() -> LayoutParams {
    LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes {
            event: 64 << 10,
            event_reply: 64 << 10,
            ..RingSizes::default()
        },
        features: Features::NOTIFY,
        map_window_gpa: 0,
        map_window_size: 0,
    }
}

/// Runs `child` in a forked process (which gets its own mapping of `fd`) and returns its pid.
fn fork_child(
    fd: &OwnedFd,
    len: usize,
    child: impl FnOnce(Region<Shared>) -> Result<(), String>,
) -> libc::pid_t {
    // SAFETY: the child only maps memory, runs ring code and eventfd syscalls, and leaves
    // with `_exit` without returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid > 0 {
        return pid;
    }
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let region = Region::open(common::region(fd, len, 0)).map_err(|e| e.to_string())?;
        child(region)
    })) {
        Ok(Ok(())) => 0,
        Ok(Err(msg)) => {
            eprintln!("child failed: {msg}");
            1
        }
        Err(_) => 2,
    };
    // SAFETY: ends the child immediately, without running the parent's destructors twice.
    unsafe { libc::_exit(code) }
}

fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn setup() -> (OwnedFd, usize, Region<Shared>) {
    let p = params();
    let len = p.region_size() as usize;
    let fd = common::memfd(len);
    let region = Region::create(common::region(&fd, len, 0), &p).unwrap();
    (fd, len, region)
}

fn summary_record(count: u64, bytes: u64, sum: u64, bad: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, v) in [count, bytes, sum, bad].into_iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

#[test]
fn one_way_stream_between_processes() {
    let (fd, len, region) = setup();
    let (wake_parent, wake_child) = (EventFd::new(), EventFd::new());
    let strategy = WaitStrategy::default();
    let pid = fork_child(&fd, len, {
        let (wake_parent, wake_child) = (wake_parent.clone(), wake_child.clone());
        move |region| {
            let err = |e: RingError| e.to_string();
            let mut rx = region.consumer_for(RingKind::Event, 0).map_err(err)?;
            let mut tx = region.producer_for(RingKind::EventReply, 0).map_err(err)?;
            let (mut count, mut bytes, mut sum, mut bad) = (0u64, 0u64, FNV_INIT, 0u64);
            let mut scratch = vec![0u8; rx.max_payload()];
            let mut expect = vec![0u8; MAX_RECORD];
            while count < ONE_WAY {
                let n = rx
                    .drain(&mut scratch, &wake_parent, |rec| {
                        let want = make_record(count, MAX_RECORD, &mut expect);
                        if *rec != expect[..want] {
                            bad += 1;
                        }
                        count += 1;
                        bytes += rec.len() as u64;
                        sum = checksum(sum, rec);
                    })
                    .map_err(err)?;
                if n == 0 {
                    rx.wait_readable(&strategy, &wake_child, &wake_parent)
                        .map_err(err)?;
                }
            }
            tx.try_push(&summary_record(count, bytes, sum, bad))
                .map_err(err)?;
            tx.publish_and_notify(&wake_parent).map_err(err)
        }
    });

    let mut tx = region.producer_for(RingKind::Event, 0).unwrap();
    let mut rx = region.consumer_for(RingKind::EventReply, 0).unwrap();
    let (mut bytes, mut sum) = (0u64, FNV_INIT);
    let mut rec = vec![0u8; MAX_RECORD];
    for seq in 0..ONE_WAY {
        let n = make_record(seq, MAX_RECORD, &mut rec);
        bytes += n as u64;
        sum = checksum(sum, &rec[..n]);
        tx.push_blocking(&rec[..n], &strategy, &wake_parent, &wake_child)
            .unwrap();
        if seq % 16 == 15 {
            tx.publish_and_notify(&wake_child).unwrap();
        }
    }
    tx.publish_and_notify(&wake_child).unwrap();
    let mut summary = [0u8; 64];
    let n = rx
        .pop_blocking(&mut summary, &strategy, &wake_parent, &wake_child)
        .unwrap();
    assert_eq!(wait_child(pid), 0);
    assert_eq!(&summary[..n], &summary_record(ONE_WAY, bytes, sum, 0));
    assert!(
        bytes > ONE_WAY * 400,
        "varying sizes averaging ~500 bytes: {bytes}"
    );
}

/// The child's answer to a request: every byte flipped, same length.
fn answer(request: &[u8], out: &mut [u8]) -> usize {
    for (o, i) in out.iter_mut().zip(request) {
        *o = i ^ 0xa5;
    }
    request.len()
}

#[test]
fn round_trips_between_processes() {
    let (fd, len, region) = setup();
    let (wake_parent, wake_child) = (EventFd::new(), EventFd::new());
    let strategy = WaitStrategy::default();
    let pid = fork_child(&fd, len, {
        let (wake_parent, wake_child) = (wake_parent.clone(), wake_child.clone());
        move |region| {
            let err = |e: RingError| e.to_string();
            let mut rx = region.consumer_for(RingKind::Event, 0).map_err(err)?;
            let mut tx = region.producer_for(RingKind::EventReply, 0).map_err(err)?;
            let mut req = vec![0u8; rx.max_payload()];
            let mut reply = vec![0u8; rx.max_payload()];
            for i in 0..ROUND_TRIPS {
                if i % 16 == 0 {
                    rx.release_and_notify(&wake_parent).map_err(err)?;
                }
                let n = match rx.try_pop(&mut req).map_err(err)? {
                    Some(n) => n,
                    None => {
                        // Nothing pending: free what we read, flush replies, then wait.
                        tx.publish_and_notify(&wake_parent).map_err(err)?;
                        rx.pop_blocking(&mut req, &strategy, &wake_child, &wake_parent)
                            .map_err(err)?
                    }
                };
                let m = answer(&req[..n], &mut reply);
                tx.push_blocking(&reply[..m], &strategy, &wake_child, &wake_parent)
                    .map_err(err)?;
            }
            rx.release_and_notify(&wake_parent).map_err(err)?;
            tx.publish_and_notify(&wake_parent).map_err(err)
        }
    });

    let mut tx = region.producer_for(RingKind::Event, 0).unwrap();
    let mut rx = region.consumer_for(RingKind::EventReply, 0).unwrap();
    let mut req = vec![0u8; MAX_RECORD];
    let mut want = vec![0u8; MAX_RECORD];
    let mut reply = vec![0u8; rx.max_payload()];
    let (mut sent, mut received, mut sum_sent, mut sum_received) = (0u64, 0u64, FNV_INIT, FNV_INIT);
    while received < ROUND_TRIPS {
        while sent < ROUND_TRIPS && sent - received < WINDOW {
            let n = make_record(sent, MAX_RECORD, &mut req);
            tx.push_blocking(&req[..n], &strategy, &wake_parent, &wake_child)
                .unwrap();
            sum_sent = checksum(sum_sent, &req[..n]);
            sent += 1;
        }
        tx.publish_and_notify(&wake_child).unwrap();
        let n = rx
            .pop_blocking(&mut reply, &strategy, &wake_parent, &wake_child)
            .unwrap();
        let len = make_record(received, MAX_RECORD, &mut req);
        assert_eq!(answer(&req[..len], &mut want), n, "reply {received} length");
        assert!(reply[..n] == want[..n], "reply {received} content");
        sum_received = checksum(sum_received, &reply[..n]);
        received += 1;
        if received % 8 == 0 {
            rx.release_and_notify(&wake_child).unwrap();
        }
    }
    rx.release_and_notify(&wake_child).unwrap();
    assert_eq!(wait_child(pid), 0);
    assert_eq!(received, ROUND_TRIPS);
    assert_ne!(
        sum_sent, sum_received,
        "replies are transformed, not echoed"
    );
    // Nothing left over in either direction.
    assert_eq!(rx.available().unwrap(), 0);
}
