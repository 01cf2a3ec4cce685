//! A child process for the seccomp tests (`tests/vmm/seccomp.rs`): installs a real allow-list
//! of `vmm::seccomp` and then makes the syscalls its first argument names, printing a line to
//! stdout after each one that returned. A syscall outside the list kills it with SIGSYS.
//!
//! Modes: `socket` (vCPU list: allowed syscalls, then `socket(AF_INET)`), `exec-mmap` (vCPU
//! list: an executable mapping), `tty-ioctl` (vCPU list: `TCGETS`, an ioctl that is not
//! KVM's), `execve` (service list: `execve`), `panic` (vCPU list on a thread that panics
//! inside `catch_unwind`, then returns).

use std::io::Write;

use vmm::seccomp::{ThreadKind, install};

/// Prints one line and flushes it, so the parent sees it even if the next syscall kills us.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Syscalls the vCPU list allows, each checked.
fn allowed_syscalls() {
    let mut buf = [0u8; 16];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n, 16, "getrandom");
    // SAFETY: a fresh anonymous private mapping, unmapped below; no existing memory touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: p is the 4 KiB mapping made above; nothing runs from it.
    let rc = unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) };
    assert_eq!(rc, 0, "read+exec mprotect");
    // SAFETY: p is the 4 KiB mapping made above.
    assert_eq!(unsafe { libc::munmap(p, 4096) }, 0, "munmap");
    let v: Vec<u64> = (0..100_000).collect();
    assert_eq!(v.iter().sum::<u64>(), 4_999_950_000);
    std::thread::sleep(std::time::Duration::from_millis(1));
    say("allowed syscalls returned");
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "socket" => {
            install(ThreadKind::Vcpu).expect("install the vCPU filter");
            say("filter installed");
            allowed_syscalls();
            // SAFETY: socket(2) takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            say(&format!("survived socket(AF_INET): {fd}"));
        }
        "exec-mmap" => {
            install(ThreadKind::Vcpu).expect("install the vCPU filter");
            say("filter installed");
            // SAFETY: a fresh anonymous mapping; nothing existing is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            say(&format!("survived an executable mmap: {p:?}"));
        }
        "tty-ioctl" => {
            install(ThreadKind::Vcpu).expect("install the vCPU filter");
            say("filter installed");
            // SAFETY: a zeroed termios is a valid buffer for TCGETS.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: TCGETS writes one termios into t.
            let rc = unsafe { libc::ioctl(0, libc::TCGETS, &mut t) };
            say(&format!("survived ioctl(TCGETS): {rc}"));
        }
        "execve" => {
            install(ThreadKind::Service).expect("install the service filter");
            say("filter installed");
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path, NULL-terminated argv and envp that outlive the call.
            let rc = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            say(&format!("survived execve: {rc}"));
        }
        "panic" => {
            let t = std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn(|| {
                    install(ThreadKind::Vcpu).expect("install the vCPU filter");
                    say("filter installed");
                    let caught = std::panic::catch_unwind(|| panic!("a bug on a vCPU thread"));
                    let msg = caught
                        .err()
                        .and_then(|p| p.downcast_ref::<&str>().map(|s| s.to_string()));
                    say(&format!("panic caught: {}", msg.unwrap_or_default()));
                })
                .expect("spawn");
            t.join().expect("the thread ended normally");
            say("thread joined");
        }
        other => {
            eprintln!("seccomp_child: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}
