//! Waiting for a condition instead of sleeping for a guessed time.
//!
//! A fixed sleep used as synchronisation either wastes time or, on a loaded host, is too
//! short and makes the test flaky. These helpers poll a condition until it holds or a bound
//! passes: they return as soon as the condition is true, and the bound is generous because it
//! is only reached when the test fails. (A sleep that lets time pass to show that something
//! does *not* happen is a different thing; a test doing that must assert something positive
//! afterwards, e.g. that the VM still runs and made progress.)

use std::time::{Duration, Instant};

/// The first pause between two polls; it doubles after each poll up to [`MAX_POLL`].
pub const FIRST_POLL: Duration = Duration::from_micros(100);
/// The longest pause between two polls.
pub const MAX_POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns true or `timeout` has passed; returns whether it became true.
/// `cond` is always evaluated at least once, and once more at the deadline.
pub fn within(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_POLL;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Polls `cond` until it returns true; panics with `what` (what the test was waiting for) if
/// it is still false after `timeout`.
#[track_caller]
pub fn until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    if !within(timeout, cond) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `get` until it returns `Some`, and returns that value; panics with `what` if it is
/// still `None` after `timeout`.
#[track_caller]
pub fn until_some<T>(timeout: Duration, what: &str, mut get: impl FnMut() -> Option<T>) -> T {
    let mut found = None;
    until(timeout, what, || {
        found = get();
        found.is_some()
    });
    found.expect("until returned, so the value is there")
}

/// The lines `from` produces (a child's piped stdout, say), one by one on a channel, read by
/// a thread that ends with the stream or when the receiver is dropped.
pub fn line_channel(
    from: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_returns_as_soon_as_the_condition_holds() {
        let mut polls = 0;
        let start = Instant::now();
        assert!(within(Duration::from_secs(10), || {
            polls += 1;
            polls == 3
        }));
        assert_eq!(polls, 3);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn within_gives_up_at_the_deadline_after_a_last_poll() {
        let start = Instant::now();
        let mut polls = 0;
        assert!(!within(Duration::from_millis(30), || {
            polls += 1;
            false
        }));
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(polls >= 2);
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn until_panics_with_what_it_waited_for() {
        until(Duration::from_millis(1), "the impossible", || false);
    }

    #[test]
    fn until_some_returns_the_value() {
        let mut n = 0;
        let v = until_some(Duration::from_secs(10), "n to reach 2", || {
            n += 1;
            (n >= 2).then_some(n * 10)
        });
        assert_eq!(v, 20);
    }
}
