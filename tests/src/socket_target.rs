//! Helpers for the end-to-end introspection tests: a VM run by the real `kvmi` binary with
//! `--kvmi-socket`, and a [`KvmiClient`] attached to it. Addresses come from the image's
//! profile, never from constants.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kvmi::images::Image;
use kvmi::profile::Profile;
use kvmi_client::{KvmiClient, ReceivedEvent};
use protocol::EventKind;

use crate::wait;

/// How long a test waits for an event it expects.
pub const EVENT_WAIT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A VM started with `kvmi run --kvmi-socket`; killed when dropped.
pub struct Target {
    child: Option<Child>,
    dir: PathBuf,
    /// The KVMI socket path.
    pub socket: PathBuf,
    /// The image's profile.
    pub profile: Profile,
    exit: Option<i32>,
}

impl Target {
    /// Starts `image` with `cmdline` and extra `kvmi run` arguments.
    pub fn start(image: Image, cmdline: &str, extra: &[&str]) -> Target {
        Self::spawn(image, cmdline, None, extra, None)
    }

    /// Starts `image` with `kvmi run --kvmi-connect tool_socket`: the VM connects to a tool
    /// listening there (and reconnects after a detach); `socket` is `tool_socket`.
    /// `log` is the `RUST_LOG` filter of the VM process, if given.
    pub fn start_connecting(
        image: Image,
        cmdline: &str,
        tool_socket: &Path,
        extra: &[&str],
        log: Option<&str>,
    ) -> Target {
        Self::spawn(image, cmdline, Some(tool_socket), extra, log)
    }

    fn spawn(
        image: Image,
        cmdline: &str,
        connect: Option<&Path>,
        extra: &[&str],
        log: Option<&str>,
    ) -> Target {
        let dir = std::env::temp_dir().join(format!(
            "kvmi-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = connect.map_or_else(|| dir.join("kvmi.sock"), Path::to_path_buf);
        let stderr = File::create(dir.join("stderr.txt")).expect("stderr file");
        let mut command = Command::new(crate::kvmi_bin());
        command
            .args(["run", "--image", image.name(), "--timeout", "120"])
            .arg("--cmdline")
            .arg(cmdline)
            .arg(if connect.is_some() {
                "--kvmi-connect"
            } else {
                "--kvmi-socket"
            })
            .arg(&socket)
            .arg("--serial")
            .arg(dir.join("serial.txt"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(filter) = log {
            command.env("RUST_LOG", filter);
        }
        let child = command.spawn().expect("start kvmi run");
        Target {
            child: Some(child),
            dir,
            socket,
            profile: crate::common::profile(image),
            exit: None,
        }
    }

    /// Attaches a client (retrying while the VM sets up its socket).
    pub fn attach(&self) -> KvmiClient {
        KvmiClient::connect_retry(&self.socket, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("attach: {e}; stderr: {}", self.stderr()))
    }

    /// A profile symbol.
    pub fn sym(&self, name: &str) -> u64 {
        self.profile
            .symbol(name)
            .unwrap_or_else(|| panic!("profile has no sym.{name}"))
    }

    /// Opens the test-guest start gate (`gate=1`) through `client`.
    pub fn open_gate(&self, client: &KvmiClient) {
        client
            .write_physical(self.sym("gate"), &1u64.to_le_bytes())
            .expect("WRITE_PHYSICAL to sym.gate");
    }

    /// The serial output so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join("serial.txt")).unwrap_or_default()
    }

    /// The VMM's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap_or_default()
    }

    /// Waits until the serial output contains `needle`; whether it did within `timeout`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> bool {
        wait::within(timeout, || self.serial().contains(needle))
    }

    /// Asserts that the VM exits with status 0 within `timeout` and that its serial output
    /// contains `expected` (the guest's own report of what it saw).
    pub fn assert_clean_exit(&mut self, timeout: Duration, expected: &str) {
        assert_eq!(
            self.wait_exit(timeout),
            Some(0),
            "stderr: {}",
            self.stderr()
        );
        assert!(self.serial().contains(expected), "{}", self.serial());
    }

    /// Waits for the VM process to exit; its exit status, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        if self.exit.is_some() {
            return self.exit;
        }
        let child = self.child.as_mut()?;
        let mut exit = None;
        wait::within(timeout, || {
            if let Ok(Some(status)) = child.try_wait() {
                exit = Some(status.code().unwrap_or(-1));
            }
            exit.is_some()
        });
        if exit.is_some() {
            self.exit = exit;
            self.child = None;
        }
        exit
    }

    /// Whether the VM process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The temp directory of this VM.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for the next event of `kind`, failing the test with context if none comes.
pub fn expect_event(client: &KvmiClient, kind: EventKind, target: &Target) -> ReceivedEvent {
    match client.next_event_of(kind, EVENT_WAIT) {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!(
            "no {kind:?} event within {EVENT_WAIT:?}; serial: {}; stderr: {}",
            target.serial(),
            target.stderr()
        ),
        Err(e) => panic!(
            "waiting for {kind:?}: {e}; serial: {}; stderr: {}",
            target.serial(),
            target.stderr()
        ),
    }
}

/// SET_PAGE_ACCESS of one page (view 0), which must succeed.
pub fn set_access(client: &KvmiClient, gpa: u64, access: protocol::types::Access) {
    client
        .set_page_access(0, &[protocol::types::PageAccessEntry { gpa, access }])
        .expect("SET_PAGE_ACCESS");
}

/// Reads a little-endian u64 of guest-physical memory.
pub fn read_u64(client: &KvmiClient, gpa: u64) -> u64 {
    let b = client.read_physical(gpa, 8).expect("READ_PHYSICAL");
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Asserts the VM still makes progress: the spin mode's counter moves (read by a fresh
/// client, since the previous channel may have been closed).
pub fn assert_still_running(target: &mut Target) {
    assert!(target.running(), "the VM died; stderr: {}", target.stderr());
    let client = target.attach();
    let counter = target.sym("probe_counter");
    let before = read_u64(&client, counter);
    wait::until(EVENT_WAIT, "the guest counter to move", || {
        read_u64(&client, counter) > before
    });
    client.close();
}

/// Asserts that `client` receives no event during `window` while the guest keeps running:
/// at the end of the window the VM process is alive and `sym.probe_counter` has advanced by
/// at least `min_progress` since its start. (A dead or stalled guest raises no events either;
/// this tells the two apart.)
pub fn assert_quiet_while_running(
    target: &mut Target,
    client: &KvmiClient,
    window: Duration,
    min_progress: u64,
) {
    let counter = target.sym("probe_counter");
    let before = read_u64(client, counter);
    match client.next_event(window) {
        Ok(None) => {}
        Ok(Some(ev)) => panic!(
            "an event within {window:?}: {:?} on vCPU {} at rip {:#x}; serial: {}",
            ev.event.payload,
            ev.event.common.vcpu,
            ev.event.common.regs.rip.get(),
            target.serial()
        ),
        Err(e) => panic!(
            "waiting for events: {e}; serial: {}; stderr: {}",
            target.serial(),
            target.stderr()
        ),
    }
    assert!(
        target.running(),
        "the VM ended during the quiet window; stderr: {}",
        target.stderr()
    );
    let after = read_u64(client, counter);
    assert!(
        after >= before.saturating_add(min_progress),
        "the guest counter went from {before} to {after} in {window:?}, expected at least \
         {min_progress} more"
    );
}

impl Target {
    /// Waits until the serial output grows beyond `len` bytes; whether it did within
    /// `timeout`.
    pub fn wait_serial_growth(&self, len: usize, timeout: Duration) -> bool {
        wait::within(timeout, || self.serial().len() > len)
    }
}
