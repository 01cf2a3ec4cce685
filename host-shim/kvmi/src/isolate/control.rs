//! The control socket between the supervisor and one VM process: a `SOCK_SEQPACKET` socket
//! pair (one message per `send`, never merged), JSON messages, descriptors by `SCM_RIGHTS`
//! (received with `MSG_CMSG_CLOEXEC`, so none leaks into a later exec).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

/// The environment variable that names the control socket's descriptor in a VM process.
pub const CONTROL_FD_ENV: &str = "KVMI_CONTROL_FD";
/// The descriptor number the control socket gets in a VM process.
pub const CHILD_CONTROL_FD: RawFd = 3;
/// Largest control message (the configuration: the `kvmi run` words and the target list).
const MAX_MESSAGE: usize = 1 << 20;

/// Why the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A socket call failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// Sending or receiving descriptors failed.
    #[error("control socket: {0}")]
    Fds(#[from] guest_driver::DriverError),
    /// A message is not what the protocol allows.
    #[error("control socket: bad message: {0}")]
    Message(String),
    /// The peer closed its end.
    #[error("control socket: the peer closed it")]
    Closed,
    /// The VM process was started without a control socket.
    #[error("no control socket ({CONTROL_FD_ENV} not set): started by hand?")]
    Missing,
}

/// A target's 32 key bytes as they cross the control socket (never printed).
#[derive(Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyBytes(pub [u8; 32]);

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBytes(..)")
    }
}

/// What a VM process is asked to be.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Role {
    /// Every VM of the run in this one process (runs without an appliance VM, and runs with
    /// the management API).
    Fleet,
    /// Target `index` of the run's target list, with the id the supervisor gave it and its
    /// token key. Descriptors: its end of the vhost-user link, its token page.
    Target {
        /// Its place in the run's target list.
        index: u32,
        /// Its id (findings and tokens carry it).
        id: u64,
        /// Its token key (the appliance process gets the same bytes).
        key: KeyBytes,
    },
    /// The appliance VM; its targets come in [`Message::Attach`] messages. No descriptors.
    Appliance,
}

impl Role {
    /// The hidden subcommand that runs this role.
    pub fn subcommand(&self) -> &'static str {
        match self {
            Role::Fleet => "vmm-fleet",
            Role::Target { .. } => "vmm-target",
            Role::Appliance => "vmm-appliance",
        }
    }
}

/// A message on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Message {
    /// Supervisor → VM process, first message: who to be and the `kvmi run` words (the
    /// process builds only its own part of the run from them).
    Config {
        /// Its role.
        role: Role,
        /// `-v` count of the supervisor.
        verbose: u8,
        /// The words after `kvmi run`, without `--isolate`.
        args: Vec<String>,
        /// Number of descriptors that follow in [`Message::Fds`] messages.
        fds: u32,
    },
    /// Descriptors for the VM process (at most 4 per message), in the order the role
    /// documents.
    Fds,
    /// Supervisor → VM process: stop as on Ctrl-C (final summaries, then exit 130).
    Stop,
    /// Supervisor → appliance process: guard target `index` of the run's target list.
    /// Descriptors (sent with it): the appliance's end of the target's vhost-user link, the
    /// target's token page.
    Attach {
        /// Its place in the run's target list.
        index: u32,
        /// Its id.
        id: u64,
        /// Its token key.
        key: KeyBytes,
        /// It starts after the others (`start_after_ms`): say when it joined.
        late: bool,
    },
    /// Supervisor → target process: a new appliance process; attach to it over the link sent
    /// with this message, with a fresh token key.
    Relink {
        /// The new token key.
        key: KeyBytes,
    },
}

/// One end of a control socket pair.
#[derive(Debug)]
pub struct Control {
    stream: UnixStream,
}

impl Control {
    /// A connected `SOCK_SEQPACKET` pair, both ends close-on-exec.
    pub fn pair() -> Result<(Control, Control), ControlError> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: socketpair returned two new descriptors that nothing else owns.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Control::from_fd(a), Control::from_fd(b)))
    }

    /// Wraps a connected socket.
    pub fn from_fd(fd: OwnedFd) -> Control {
        Control {
            stream: UnixStream::from(fd),
        }
    }

    /// The control socket a VM process inherited ([`CONTROL_FD_ENV`]); made close-on-exec.
    pub fn inherited() -> Result<Control, ControlError> {
        let fd: RawFd = std::env::var(CONTROL_FD_ENV)
            .map_err(|_| ControlError::Missing)?
            .parse()
            .map_err(|_| ControlError::Message(format!("{CONTROL_FD_ENV} is not a number")))?;
        // SAFETY: F_GETFD only reads the flags of `fd`, and fails on a closed descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ControlError::Missing);
        }
        // SAFETY: the supervisor placed the socket at `fd` for this process, nothing else in
        // it owns the descriptor, and we take it once (the variable is removed below).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: called at start-up, before this process starts any thread.
        unsafe { std::env::remove_var(CONTROL_FD_ENV) };
        Ok(Control::from_fd(owned))
    }

    /// The raw descriptor (for placing it in a child).
    pub fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Sends `message` with `fds` attached (at most 4).
    pub fn send(&self, message: &Message, fds: &[RawFd]) -> Result<(), ControlError> {
        let bytes =
            serde_json::to_vec(message).map_err(|e| ControlError::Message(e.to_string()))?;
        guest_driver::host::send_with_fds(&self.stream, &bytes, fds)?;
        Ok(())
    }

    /// Sends `message`, then `fds` in [`Message::Fds`] messages of at most 4.
    pub fn send_all(&self, message: &Message, fds: &[RawFd]) -> Result<(), ControlError> {
        self.send(message, &[])?;
        for chunk in fds.chunks(4) {
            self.send(&Message::Fds, chunk)?;
        }
        Ok(())
    }

    /// Receives one message and the descriptors sent with it.
    pub fn recv(&self) -> Result<(Message, Vec<OwnedFd>), ControlError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, fds) = match guest_driver::host::recv_with_fds(&self.stream, &mut buf) {
            Ok(got) => got,
            Err(guest_driver::DriverError::Handshake(why)) if why.starts_with("peer closed") => {
                return Err(ControlError::Closed);
            }
            Err(e) => return Err(e.into()),
        };
        let message =
            serde_json::from_slice(&buf[..n]).map_err(|e| ControlError::Message(e.to_string()))?;
        Ok((message, fds))
    }

    /// Receives the configuration: the first message, then its descriptors.
    pub fn recv_config(&self) -> Result<(Role, u8, Vec<String>, Vec<OwnedFd>), ControlError> {
        let (message, _) = self.recv()?;
        let Message::Config {
            role,
            verbose,
            args,
            fds: count,
        } = message
        else {
            return Err(ControlError::Message("expected the configuration".into()));
        };
        let mut fds = Vec::new();
        while fds.len() < count as usize {
            match self.recv()? {
                (Message::Fds, got) if !got.is_empty() => fds.extend(got),
                _ => return Err(ControlError::Message("expected descriptors".into())),
            }
        }
        if fds.len() != count as usize {
            return Err(ControlError::Message(
                "more descriptors than announced".into(),
            ));
        }
        Ok((role, verbose, args, fds))
    }
}

/// Starts thread `kvmi-control`: it sets `interrupted` (the VM process then stops as on
/// Ctrl-C) when `control` carries [`Message::Stop`] or closes (the supervisor went).
pub fn stop_on_message(
    control: Control,
    interrupted: &'static std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("kvmi-control".into())
        .spawn(move || {
            loop {
                match control.recv() {
                    Ok((Message::Stop, _)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_the_pair() {
        let (a, b) = Control::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        a.send_all(
            &Message::Config {
                role: Role::Fleet,
                verbose: 2,
                args: vec!["--targets".into(), "2".into()],
                fds: 5,
            },
            &[file.as_raw_fd(); 5],
        )
        .unwrap();
        a.send(&Message::Stop, &[]).unwrap();
        let (role, verbose, args, fds) = b.recv_config().unwrap();
        assert_eq!(
            (role, verbose, args.len(), fds.len()),
            (Role::Fleet, 2, 2, 5)
        );
        // SAFETY: F_GETFD only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(fds[4].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert_eq!(b.recv().unwrap().0, Message::Stop);
        drop(a);
        assert!(matches!(b.recv(), Err(ControlError::Closed)));
    }
}
