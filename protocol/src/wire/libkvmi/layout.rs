//! libkvmi (`kvmi-v7`) layouts of the handshake, the vCPU header and command requests and
//! replies. Every struct is built from zerocopy little-endian types, so it is `Unaligned` and
//! can be viewed at any offset; sizes and offsets are asserted at compile time.

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{I32, I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use crate::frame::MsgHdr;
use crate::kvm::{KvmRegs, KvmSregs};

macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $field: $ty,)* }
    };
}
pub(crate) use wire_struct;

/// Assert a struct's size and its fields' offsets at compile time.
macro_rules! assert_layout {
    ($name:ident, $size:expr $(, $field:ident @ $off:expr)*) => {
        const _: () = assert!(size_of::<$name>() == $size);
        $(const _: () = assert!(offset_of!($name, $field) == $off);)*
    };
}
pub(crate) use assert_layout;

// ---------------------------------------------------------------------------------------
// Handshake

wire_struct! {
    /// `struct kvmi_qemu2introspector` (96 B from a kvmi-v7 VMM): sent by the VMM right after
    /// connecting, before any message and without a message header.
    pub struct QemuToIntrospector {
        /// Size of the whole struct as sent (96; 104 from kvmi-v12).
        pub struct_size: U32,
        /// Raw VM UUID (zero when none).
        pub uuid: [u8; 16],
        /// Zero.
        pub padding: U32,
        /// Seconds since the Unix epoch when the VM was started or last reset.
        pub start_time: I64,
        /// VM name, NUL-padded.
        pub name: [u8; 64],
    }
}
assert_layout!(QemuToIntrospector, 96, struct_size @ 0, uuid @ 4, padding @ 20, start_time @ 24, name @ 32);

wire_struct! {
    /// `struct kvmi_introspector2qemu` (24 B): the tool's answer to the handshake. A VMM
    /// reads `struct_size` bytes (≥ 24) and ignores any beyond these.
    pub struct IntrospectorToQemu {
        /// Size of the struct as sent (24 from libkvmi).
        pub struct_size: U32,
        /// SHA-1 of the shared secret (zeros when not authenticating).
        pub cookie_hash: [u8; 20],
    }
}
assert_layout!(IntrospectorToQemu, 24, struct_size @ 0, cookie_hash @ 4);

// ---------------------------------------------------------------------------------------
// Framing

wire_struct! {
    /// `struct kvmi_vcpu_hdr` (8 B): starts every vCPU command and every event reply.
    pub struct VcpuHdr {
        /// vCPU index.
        pub vcpu: U16,
        /// Zero (non-zero closes the socket).
        pub padding1: U16,
        /// Zero (non-zero closes the socket).
        pub padding2: U32,
    }
}
assert_layout!(VcpuHdr, 8, vcpu @ 0, padding1 @ 2, padding2 @ 4);

wire_struct! {
    /// `struct kvmi_error_code` (8 B): starts every command reply; data follows only when
    /// `err == 0`.
    pub struct ErrorCodeWire {
        /// 0 or a negated `KVM_E*` code.
        pub err: I32,
        /// Zero.
        pub padding: U32,
    }
}
assert_layout!(ErrorCodeWire, 8, err @ 0, padding @ 4);

// ---------------------------------------------------------------------------------------
// VM commands

wire_struct! {
    /// `struct kvmi_features` (8 B) in the `GET_VERSION` reply. libkvmi reads the first four
    /// bytes; a host without SPP/VMFUNC/EPTP/#VE sends all eight zero.
    pub struct Features {
        /// Sub-page write protection.
        pub spp: u8,
        /// VMFUNC.
        pub vmfunc: u8,
        /// EPTP switching.
        pub eptp: u8,
        /// Virtualisation exceptions.
        pub ve: u8,
        /// Ignored by libkvmi (the kernel branch has `singlestep` here in one variant).
        pub other: [u8; 4],
    }
}
assert_layout!(Features, 8, spp @ 0, vmfunc @ 1, eptp @ 2, ve @ 3, other @ 4);

wire_struct! {
    /// `GET_VERSION` reply data (16 B).
    pub struct GetVersionReply {
        /// [`super::KVMI_VERSION`].
        pub version: U32,
        /// Zero.
        pub padding: U32,
        /// Optional features.
        pub features: Features,
    }
}
assert_layout!(GetVersionReply, 16, version @ 0, padding @ 4, features @ 8);

wire_struct! {
    /// `CHECK_COMMAND` / `CHECK_EVENT` request (8 B). The reply is the error code alone.
    pub struct CheckIdRequest {
        /// The command or event ID.
        pub id: U16,
        /// Zero.
        pub padding1: U16,
        /// Zero.
        pub padding2: U32,
    }
}
assert_layout!(CheckIdRequest, 8, id @ 0, padding1 @ 2, padding2 @ 4);

wire_struct! {
    /// `GET_GUEST_INFO` reply data (16 B).
    pub struct GetGuestInfoReply {
        /// Online vCPUs.
        pub vcpu_count: U32,
        /// Zero.
        pub padding: [U32; 3],
    }
}
assert_layout!(GetGuestInfoReply, 16, vcpu_count @ 0, padding @ 4);

wire_struct! {
    /// `CONTROL_VM_EVENTS` request, and `CONTROL_EVENTS` after the vCPU header (8 B).
    pub struct ControlEventsRequest {
        /// Event ID.
        pub event_id: U16,
        /// 1 = enable, 0 = disable.
        pub enable: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U32,
    }
}
assert_layout!(ControlEventsRequest, 8, event_id @ 0, enable @ 2, padding1 @ 3, padding2 @ 4);

wire_struct! {
    /// `READ_PHYSICAL` / `WRITE_PHYSICAL` request (16 B); `WRITE_PHYSICAL` is followed by
    /// `size` data bytes. `size` must be 1…4096 and stay within the page of `gpa`.
    pub struct PhysicalRequest {
        /// Guest-physical address.
        pub gpa: U64,
        /// Bytes to read or write.
        pub size: U64,
    }
}
assert_layout!(PhysicalRequest, 16, gpa @ 0, size @ 8);

wire_struct! {
    /// `SET_PAGE_ACCESS` request (8 B), followed by `count` [`PageAccessEntry`]s.
    pub struct SetPageAccessRequest {
        /// EPT view (0).
        pub view: U16,
        /// Number of entries that follow.
        pub count: U16,
        /// Zero.
        pub padding: U32,
    }
}
assert_layout!(SetPageAccessRequest, 8, view @ 0, count @ 2, padding @ 4);

wire_struct! {
    /// One `SET_PAGE_ACCESS` entry (16 B).
    pub struct PageAccessEntry {
        /// Guest-physical address.
        pub gpa: U64,
        /// Allowed access, [`super::access`] bits.
        pub access: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U16,
        /// Zero.
        pub padding3: U32,
    }
}
assert_layout!(PageAccessEntry, 16, gpa @ 0, access @ 8, padding1 @ 9, padding2 @ 10, padding3 @ 12);

wire_struct! {
    /// `GET_MAP_TOKEN` reply data (32 B).
    pub struct GetMapTokenReply {
        /// The token.
        pub token: [U64; 4],
    }
}
assert_layout!(GetMapTokenReply, 32, token @ 0);

wire_struct! {
    /// `CONTROL_CMD_RESPONSE` request (8 B).
    pub struct ControlCmdResponseRequest {
        /// 1 = send command replies, 0 = do not.
        pub enable: u8,
        /// 1 = applies to this very command, 0 = from the next one.
        pub now: u8,
        /// Bit 0: raise `CMD_ERROR` events for failing silent commands (libkvmi sends 0).
        pub flags: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U32,
    }
}
assert_layout!(ControlCmdResponseRequest, 8, enable @ 0, now @ 1, flags @ 2, padding1 @ 3, padding2 @ 4);

wire_struct! {
    /// A single `u64` (8 B): `GET_MAX_GFN` / `GET_NEXT_AVAILABLE_GFN` reply (`gfn`),
    /// `GET_VCPU_INFO` reply (`tsc_speed`), `GET_MTRR_TYPE` request (`gpa`),
    /// `VCPU_TRANSLATE_GVA` request (`gva`) and reply (`gpa`, `!0` when unmapped),
    /// `VCPU_GET_XCR` reply (`value`), `QUERY_PHYSICAL` request and `VCPU_ALLOC_GFN` /
    /// `VCPU_FREE_GFN` requests (`gfn`).
    pub struct U64Wire {
        /// The value.
        pub value: U64,
    }
}
assert_layout!(U64Wire, 8, value @ 0);

// ---------------------------------------------------------------------------------------
// vCPU commands (the struct follows the 8-byte vCPU header)

wire_struct! {
    /// `PAUSE_VCPU` request after the vCPU header (8 B).
    pub struct PauseVcpuRequest {
        /// 1 = wait until the vCPU acknowledged the kick.
        pub wait: u8,
        /// Zero (non-zero closes the socket).
        pub padding1: u8,
        /// Zero.
        pub padding2: U16,
        /// Zero.
        pub padding3: U32,
    }
}
assert_layout!(PauseVcpuRequest, 8, wait @ 0, padding1 @ 1, padding2 @ 2, padding3 @ 4);

wire_struct! {
    /// `CONTROL_CR` request after the vCPU header (8 B).
    pub struct ControlCrRequest {
        /// 1 = enable, 0 = disable.
        pub enable: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U16,
        /// Control register: 0, 3 or 4.
        pub cr: U32,
    }
}
assert_layout!(ControlCrRequest, 8, enable @ 0, padding1 @ 1, padding2 @ 2, cr @ 4);

wire_struct! {
    /// `CONTROL_MSR` request after the vCPU header (8 B).
    pub struct ControlMsrRequest {
        /// 1 = enable, 0 = disable.
        pub enable: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U16,
        /// MSR: 0–0x1fff or 0xc0000000–0xc0001fff.
        pub msr: U32,
    }
}
assert_layout!(ControlMsrRequest, 8, enable @ 0, padding1 @ 1, padding2 @ 2, msr @ 4);

wire_struct! {
    /// `GET_REGISTERS` request after the vCPU header (8 B), followed by `u32 msrs_idx[nmsrs]`.
    pub struct GetRegistersRequest {
        /// Number of MSR indices that follow.
        pub nmsrs: U16,
        /// Zero.
        pub padding1: U16,
        /// Zero.
        pub padding2: U32,
    }
}
assert_layout!(GetRegistersRequest, 8, nmsrs @ 0, padding1 @ 2, padding2 @ 4);

wire_struct! {
    /// `GET_REGISTERS` reply data up to the MSR entries (472 B), followed by
    /// `struct kvm_msr_entry entries[nmsrs]` (16 B each): exactly `472 + 16·nmsrs` bytes.
    pub struct GetRegistersReply {
        /// CPU mode in bytes: 2, 4 or 8.
        pub mode: U32,
        /// Zero.
        pub padding: U32,
        /// `struct kvm_regs`.
        pub regs: KvmRegs,
        /// `struct kvm_sregs`.
        pub sregs: KvmSregs,
        /// `kvm_msrs.nmsrs`, the count requested.
        pub nmsrs: U32,
        /// `kvm_msrs.pad`.
        pub msrs_pad: U32,
    }
}
assert_layout!(GetRegistersReply, 472, mode @ 0, padding @ 4, regs @ 8, sregs @ 152, nmsrs @ 464, msrs_pad @ 468);

/// Size of one MSR entry in the `GET_REGISTERS` reply.
pub const MSR_ENTRY_SIZE: usize = 16;

/// Exact size of `GET_REGISTERS` reply data for `nmsrs` MSRs (libkvmi rejects any other).
pub const fn get_registers_reply_size(nmsrs: u16) -> usize {
    size_of::<GetRegistersReply>() + MSR_ENTRY_SIZE * nmsrs as usize
}

wire_struct! {
    /// `GET_CPUID` request after the vCPU header (8 B).
    pub struct GetCpuidRequest {
        /// Leaf.
        pub function: U32,
        /// Sub-leaf.
        pub index: U32,
    }
}
assert_layout!(GetCpuidRequest, 8, function @ 0, index @ 4);

wire_struct! {
    /// `GET_CPUID` reply data (16 B).
    pub struct GetCpuidReply {
        /// EAX.
        pub eax: U32,
        /// EBX.
        pub ebx: U32,
        /// ECX.
        pub ecx: U32,
        /// EDX.
        pub edx: U32,
    }
}
assert_layout!(GetCpuidReply, 16, eax @ 0, ebx @ 4, ecx @ 8, edx @ 12);

wire_struct! {
    /// `INJECT_EXCEPTION` request after the vCPU header (16 B).
    pub struct InjectExceptionRequest {
        /// Vector.
        pub nr: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U16,
        /// Error code.
        pub error_code: U32,
        /// CR2 for a page fault.
        pub address: U64,
    }
}
assert_layout!(InjectExceptionRequest, 16, nr @ 0, padding1 @ 1, padding2 @ 2, error_code @ 4, address @ 8);

wire_struct! {
    /// `GET_MTRR_TYPE` reply data (8 B).
    pub struct GetMtrrTypeReply {
        /// The memory type.
        pub ty: u8,
        /// Zero.
        pub padding: [u8; 7],
    }
}
assert_layout!(GetMtrrTypeReply, 8, ty @ 0, padding @ 1);

wire_struct! {
    /// A single flag plus padding after the vCPU header (8 B): `VCPU_CONTROL_SINGLESTEP`
    /// (`enable`) and `VCPU_GET_XCR` (`xcr`, only 0).
    pub struct U8Request {
        /// The flag or selector.
        pub value: u8,
        /// Zero.
        pub padding: [u8; 7],
    }
}
assert_layout!(U8Request, 8, value @ 0, padding @ 1);

wire_struct! {
    /// `{u16 view; u16 pad[3]}` (8 B): `SWITCH_EPT_VIEW` request, `GET_EPT_VIEW` and
    /// `CREATE_EPT_VIEW` replies, `DESTROY_EPT_VIEW` request.
    pub struct ViewWire {
        /// EPT view.
        pub view: U16,
        /// Zero.
        pub padding: [U16; 3],
    }
}
assert_layout!(ViewWire, 8, view @ 0, padding @ 2);

/// Size of the `SET_REGISTERS` payload: vCPU header + `struct kvm_regs`.
pub const SET_REGISTERS_PAYLOAD: usize = size_of::<VcpuHdr>() + size_of::<KvmRegs>();
const _: () = assert!(SET_REGISTERS_PAYLOAD == 152);
