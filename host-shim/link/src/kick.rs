//! The appliance's NOTIFY across a process boundary: a thread that turns the slot's doorbell
//! eventfd (vhost-user `SET_VRING_KICK`, [`crate::vhost_link`]) into the ring service's
//! wake-up.
//!
//! In one process the appliance's NOTIFY hypercall calls [`Waker::notify`] on its vCPU
//! thread, which serves the command ring inline. A target in its own process cannot be
//! reached that way: the appliance process writes the eventfd instead, and this thread, in
//! the target process, reads it and calls [`Waker::notify`] for every ring — the command ring
//! is then served on this thread, and the service thread is woken for the others. The
//! appliance may write the doorbell as often as it likes: a count of kicks is one wake-up.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use hypercall::call::NOTIFY_ALL_RINGS;
use vmm_sys_util::eventfd::EventFd;

use crate::rings::Waker;

/// Why the forwarding thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KickEnd {
    /// [`KickForwarder::stop`] was called.
    Stopped,
    /// The doorbell failed (closed, or an error reading it).
    Failed(String),
}

/// The thread forwarding one slot's doorbell to its ring service.
#[derive(Debug)]
pub struct KickForwarder {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<KickEnd>>,
    wakeups: Arc<AtomicU64>,
}

impl KickForwarder {
    /// Starts the thread (named `kvmi-kick`, seccomp-filtered as a service thread) reading
    /// `kick` and calling `waker` for each wake-up. `kick` may be blocking or not.
    pub fn start(kick: File, waker: Waker) -> io::Result<KickForwarder> {
        let stop = Arc::new(EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?);
        let wakeups = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), wakeups.clone());
        let thread = std::thread::Builder::new()
            .name("kvmi-kick".into())
            .spawn(move || {
                match vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service) {
                    Ok(_) => forward(&kick, &s, &waker, &w),
                    Err(e) => KickEnd::Failed(e.to_string()),
                }
            })?;
        Ok(KickForwarder {
            stop,
            thread: Some(thread),
            wakeups,
        })
    }

    /// Wake-ups forwarded so far (each one read of the doorbell, however many kicks it
    /// counted).
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// True once the thread has ended.
    pub fn has_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread and says why it ended (it may have failed before).
    pub fn stop(&mut self) -> KickEnd {
        let _ = self.stop.write(1);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(end)) => end,
            Some(Err(_)) => KickEnd::Failed("the doorbell thread panicked".into()),
            None => KickEnd::Stopped,
        }
    }
}

impl Drop for KickForwarder {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn forward(kick: &File, stop: &EventFd, waker: &Waker, wakeups: &AtomicU64) -> KickEnd {
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call; both
        // descriptors stay open (owned by this thread's caller and by `stop`).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return KickEnd::Failed(format!("poll on the doorbell: {e}"));
        }
        if fds[1].revents != 0 {
            return KickEnd::Stopped;
        }
        let revents = fds[0].revents;
        if revents & libc::POLLIN != 0 {
            let mut count = [0u8; 8];
            // SAFETY: `count` is 8 writable bytes; an eventfd read transfers exactly 8.
            let r = unsafe { libc::read(kick.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            if r == 8 {
                wakeups.fetch_add(1, Ordering::Relaxed);
                waker.notify(NOTIFY_ALL_RINGS);
                continue;
            }
            let e = io::Error::last_os_error();
            if r < 0
                && matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                )
            {
                continue;
            }
            return KickEnd::Failed(format!("reading the doorbell: {r} bytes, {e}"));
        }
        if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return KickEnd::Failed(format!("the doorbell failed (poll events {revents:#x})"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};

    use super::*;

    fn eventfd(flags: libc::c_int) -> File {
        // SAFETY: eventfd has no pointer arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    fn kick(doorbell: &File, n: u64) {
        (&*doorbell).write_all(&n.to_ne_bytes()).unwrap();
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn each_read_of_the_doorbell_is_one_wake_up_and_stop_ends_the_thread() {
        for flags in [0, libc::EFD_NONBLOCK] {
            let doorbell = eventfd(flags);
            let theirs = doorbell.try_clone().unwrap();
            let mut forwarder =
                KickForwarder::start(theirs, Waker::for_thread(std::thread::current())).unwrap();
            assert_eq!(forwarder.wakeups(), 0);
            kick(&doorbell, 1);
            until("the first wake-up", || forwarder.wakeups() == 1);
            // Kicks that pile up before the thread reads are one wake-up: the counter is read
            // whole.
            kick(&doorbell, 3);
            until("the second wake-up", || forwarder.wakeups() == 2);
            // The waker unparked this thread: a park returns at once.
            let t = Instant::now();
            std::thread::park_timeout(Duration::from_secs(5));
            assert!(t.elapsed() < Duration::from_secs(4));
            assert!(!forwarder.has_ended());
            assert_eq!(forwarder.stop(), KickEnd::Stopped);
            assert!(forwarder.has_ended());
            // Nothing reads the doorbell any more.
            kick(&doorbell, 1);
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(forwarder.wakeups(), 2);
        }
    }

    #[test]
    fn a_doorbell_that_is_not_an_eventfd_ends_the_thread_with_the_reason() {
        // A pipe's read end whose writer is gone: poll reports POLLHUP and read returns 0.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created; each is owned once.
        let (reader, writer) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        drop(writer);
        let mut forwarder =
            KickForwarder::start(reader, Waker::for_thread(std::thread::current())).unwrap();
        until("the thread to end", || forwarder.has_ended());
        match forwarder.stop() {
            KickEnd::Failed(reason) => assert!(reason.contains("doorbell"), "{reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(forwarder.wakeups(), 0);
    }
}
