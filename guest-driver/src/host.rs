//! The host-process backend (feature `std`): the agent runs as a normal process, a unix
//! socket stands in for the doorbell port and memfds for the ring region and the map window.
//!
//! # Protocol (stream socket, little-endian)
//! 1. **Handshake**, shim → agent, once after `accept`: the appliance's [`BootInfo`] record
//!    ([`HANDSHAKE_SIZE`] = 344 bytes; `ring_region_*` and `map_window_*` filled in, `ram_size`
//!    0) in one `sendmsg` whose `SCM_RIGHTS` carries exactly two file descriptors: the ring
//!    region memfd (`ring_region_size` bytes, laid out with `Region::create`) and the map
//!    window memfd (`map_window_size` bytes). The agent maps both `MAP_SHARED`.
//! 2. **Hypercalls**, agent → shim: a [`HostRequest`] ([`REQUEST_SIZE`] = 80 bytes: RAX,
//!    RBX, RCX, RDX, RSI, RDI, then the 4 words of a map token), answered by the new RAX
//!    ([`RESPONSE_SIZE`] = 8 bytes), one request at a time. For MEM_MAP and MAP_RANGE the
//!    agent's "RAM" is the token field: the token address `a0` must be [`HOST_TOKEN_GPA`] and
//!    the shim takes the token from the request (any other address is `HcError::Fault`).
//!    Everything else (numbers, checks, results) is exactly the doorbell ABI.
//! 3. **Mapping**, shim side: a host process cannot have pages remapped under it by the shim,
//!    so on MEM_MAP/MAP_RANGE the shim writes the granted target pages into the window memfd
//!    at `window_gpa - map_window_gpa` (a snapshot at map time — the one difference from the
//!    zero-copy VM path), and MEM_UNMAP/REVOKE_ALL zero them again. The checks are the
//!    VM path's: no byte outside a grant ever reaches the window.
//!
//! Closing the socket detaches the agent (the shim revokes everything it granted).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hypercall::boot::BootInfo;
use hypercall::ring::{Region, SharedRegion};
use hypercall::token::MapToken;
use memmap2::{MmapOptions, MmapRaw};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{Discovery, DriverError, Hypercalls, MapWindow};

/// Size of the handshake record (a [`BootInfo`]).
pub const HANDSHAKE_SIZE: usize = core::mem::size_of::<BootInfo>();
/// Size of a hypercall request.
pub const REQUEST_SIZE: usize = core::mem::size_of::<HostRequest>();
/// Size of a hypercall response (RAX).
pub const RESPONSE_SIZE: usize = 8;
/// The token address a host agent passes in `a0` of the map calls.
pub const HOST_TOKEN_GPA: u64 = 0;

/// One hypercall on the socket.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HostRequest {
    /// RAX, RBX, RCX, RDX, RSI, RDI.
    pub regs: [u64; 6],
    /// The staged map token (zero when none was staged).
    pub token: [u64; 4],
}

const _: () = assert!(REQUEST_SIZE == 80 && HANDSHAKE_SIZE == 344);

impl HostRequest {
    /// The registers as the shim's doorbell path sees them.
    pub fn regs(&self) -> hypercall::call::HypercallRegs {
        let [rax, rbx, rcx, rdx, rsi, rdi] = self.regs;
        hypercall::call::HypercallRegs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
        }
    }
}

/// A `MAP_SHARED` read-write mapping of a file descriptor, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    map: MmapRaw,
}

impl Mapping {
    /// Maps `len` bytes of `fd` read-write and shared.
    pub fn map(fd: RawFd, len: usize) -> Result<Self, DriverError> {
        if len == 0 {
            return Err(DriverError::Handshake("zero-length mapping"));
        }
        // `map_raw` is `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)`: a fresh
        // mapping at an address of the kernel's choice; `MmapRaw` hands out only raw pointers.
        let map = MmapOptions::new().len(len).map_raw(fd)?;
        Ok(Mapping { map })
    }

    /// The base address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Wraps the mapping as shared atomic words.
    pub fn into_region(self) -> Result<Arc<SharedRegion<Mapping>>, DriverError> {
        let (ptr, len) = (self.as_ptr(), self.len());
        // SAFETY: `ptr..ptr+len` is our read-write mapping, kept alive by the owner moved into
        // the region; this process touches it only through the region's atomics.
        let region = unsafe { SharedRegion::new(self, ptr, len) }?;
        Ok(Arc::new(region))
    }
}

/// Creates an anonymous memfd of `len` zero bytes.
pub fn memfd(name: &core::ffi::CStr, len: u64) -> Result<OwnedFd, DriverError> {
    // SAFETY: `name` is a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = i64::try_from(len).map_err(|_| DriverError::Handshake("memfd too large"))?;
    // SAFETY: `owned` is a valid descriptor.
    if unsafe { libc::ftruncate(owned.as_raw_fd(), len) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(owned)
}

/// Shared memory of the host backend.
pub type HostMemory = Arc<SharedRegion<Mapping>>;

/// The hypercall half of the host backend: requests on the socket.
#[derive(Debug)]
pub struct HostHypercalls {
    stream: Mutex<UnixStream>,
    token: Mutex<[u64; 4]>,
}

impl Hypercalls for HostHypercalls {
    fn raw_call(&self, nr: u64, args: [u64; 5]) -> Result<u64, DriverError> {
        let token = core::mem::take(&mut *self.token.lock().unwrap_or_else(|p| p.into_inner()));
        let request = HostRequest {
            regs: [nr, args[0], args[1], args[2], args[3], args[4]],
            token,
        };
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        stream.write_all(request.as_bytes())?;
        let mut rax = [0u8; RESPONSE_SIZE];
        stream.read_exact(&mut rax)?;
        Ok(u64::from_le_bytes(rax))
    }

    fn stage_token(&self, token: &MapToken) -> Result<u64, DriverError> {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token.words;
        Ok(HOST_TOKEN_GPA)
    }
}

/// A connected host agent: the boot info, the opened ring region and the map window.
pub struct HostAgent {
    /// The validated discovery record.
    pub discovery: Discovery,
    /// The boot info the shim sent.
    pub boot: BootInfo,
    /// The ring region.
    pub region: Region<HostMemory>,
    /// The map window, served over the socket.
    pub window: MapWindow<HostHypercalls, HostMemory>,
}

impl core::fmt::Debug for HostAgent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostAgent")
            .field("discovery", &self.discovery)
            .finish()
    }
}

impl HostAgent {
    /// Connects to the shim's socket at `path` and performs the handshake.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, DriverError> {
        Self::from_stream(UnixStream::connect(path)?)
    }

    /// Performs the handshake on a connected stream: receives the boot info and the two
    /// memfds, validates the boot info, maps both areas and opens the ring region.
    pub fn from_stream(mut stream: UnixStream) -> Result<Self, DriverError> {
        let mut bytes = [0u8; HANDSHAKE_SIZE];
        let (got, fds) = recv_with_fds(&stream, &mut bytes)?;
        let [ring_fd, window_fd] = <[OwnedFd; 2]>::try_from(fds)
            .map_err(|_| DriverError::Handshake("expected exactly two file descriptors"))?;
        stream.read_exact(&mut bytes[got..])?;
        let boot = Discovery::parse_boot_info(&bytes)?;
        let discovery = Discovery::from_boot_info(&boot)?;
        check_fd_len(&ring_fd, discovery.ring_size)?;
        check_fd_len(&window_fd, discovery.window_size)?;
        let ring =
            Mapping::map(ring_fd.as_raw_fd(), discovery.ring_size as usize)?.into_region()?;
        let window_len = usize::try_from(discovery.window_size)
            .map_err(|_| DriverError::BadBootInfo("map window size"))?;
        let window_mem = Mapping::map(window_fd.as_raw_fd(), window_len)?.into_region()?;
        let region = discovery.open_region(ring)?;
        let calls = HostHypercalls {
            stream: Mutex::new(stream),
            token: Mutex::new([0; 4]),
        };
        let window = MapWindow::new(calls, window_mem, discovery.window_gpa)?;
        Ok(HostAgent {
            discovery,
            boot,
            region,
            window,
        })
    }
}

fn check_fd_len(fd: &OwnedFd, want: u64) -> Result<(), DriverError> {
    let file = std::fs::File::from(fd.try_clone()?);
    if file.metadata()?.len() < want {
        return Err(DriverError::Handshake("memfd shorter than announced"));
    }
    Ok(())
}

/// Most descriptors accepted in one message.
const MAX_FDS: usize = 4;

/// Receives bytes into `buf` and any `SCM_RIGHTS` descriptors with them.
///
/// Hand-written rather than vmm-sys-util's `ScmSocket::recv_with_fds`, which calls `recvmsg`
/// with no flags: the memfds would arrive without close-on-exec and stay inheritable until a
/// later `fcntl`, a window in which another thread's fork+exec leaks them into the child.
/// Here `MSG_CMSG_CLOEXEC` sets it atomically, and every descriptor comes back owned.
pub fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), DriverError> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    debug_assert!(space <= size_of_val(&control));
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (our buffer) and `control`, both live for the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if n == 0 {
        return Err(DriverError::Handshake("peer closed before the handshake"));
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg`; the CMSG macros walk the control buffer within
    // `msg_controllen`, and every descriptor in an SCM_RIGHTS message is ours to own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(DriverError::Handshake("too many file descriptors"));
    }
    Ok((n as usize, fds))
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`): the shim's half of the handshake.
///
/// One `sendmsg(MSG_NOSIGNAL)` with the descriptors in one `SCM_RIGHTS` header (vmm-sys-util's
/// [`ScmSocket::send_with_fds`]); at most 4 descriptors, as many as [`recv_with_fds`] takes.
pub fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[RawFd],
) -> Result<usize, DriverError> {
    if fds.len() > MAX_FDS {
        return Err(DriverError::Handshake("too many file descriptors"));
    }
    Ok(stream
        .send_with_fds(&[bytes], fds)
        .map_err(std::io::Error::from)?)
}
