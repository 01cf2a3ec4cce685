//! v4 layouts of command requests and replies (`include/uapi/linux/kvmi.h`,
//! `arch/x86/include/uapi/asm/kvmi.h` of RFC v4, docs/protocol.md), plus this project's
//! `CONTROL_BREAKPOINT`. Every struct is `Unaligned`: it can be viewed at any offset.

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

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

wire_struct! {
    /// `struct kvmi_error_code`: the start of every command reply (8 B).
    pub struct ErrorCodeWire {
        /// 0 or a negated `KVM_E*` code.
        pub err: I32,
        /// Zero.
        pub padding: U32,
    }
}

wire_struct! {
    /// `{u16 vcpu; u16 padding[3]}`: `GET_GUEST_INFO`, `PAUSE_VCPU`, `GET_XSAVE` (8 B).
    pub struct VcpuRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Zero.
        pub padding: [U16; 3],
    }
}

wire_struct! {
    /// `struct kvmi_get_version_reply` (16 B).
    pub struct GetVersionReply {
        /// `KVMI_VERSION`.
        pub version: U32,
        /// Allowed commands, bit `id − 1`.
        pub commands: U32,
        /// Allowed events, event bits.
        pub events: U32,
        /// Zero.
        pub padding: U32,
    }
}

wire_struct! {
    /// `struct kvmi_get_guest_info_reply` (16 B).
    pub struct GetGuestInfoReply {
        /// Online vCPUs.
        pub vcpu_count: U16,
        /// Zero.
        pub padding: [U16; 3],
        /// TSC frequency in Hz.
        pub tsc_speed: U64,
    }
}

wire_struct! {
    /// `struct kvmi_get_registers` (8 B), followed by `u32 msrs_idx[nmsrs]`.
    pub struct GetRegistersRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Number of MSR indices that follow.
        pub nmsrs: U16,
        /// Zero.
        pub padding: [U16; 2],
    }
}

wire_struct! {
    /// `struct kvmi_get_registers_reply` up to `kvm_msrs.entries` (472 B), followed by
    /// `struct kvm_msr_entry entries[nmsrs]`.
    pub struct GetRegistersReply {
        /// Operating mode in bytes (2, 4, 8).
        pub mode: U32,
        /// Zero.
        pub padding: U32,
        /// General-purpose registers.
        pub regs: KvmRegs,
        /// Segment and control registers.
        pub sregs: KvmSregs,
        /// `kvm_msrs.nmsrs`.
        pub nmsrs: U32,
        /// `kvm_msrs.pad`, zero.
        pub msrs_pad: U32,
    }
}

wire_struct! {
    /// `struct kvmi_set_registers` (152 B).
    pub struct SetRegistersRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Zero.
        pub padding: [U16; 3],
        /// New registers.
        pub regs: KvmRegs,
    }
}

wire_struct! {
    /// `struct kvmi_get_cpuid` (16 B).
    pub struct GetCpuidRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Zero.
        pub padding: [U16; 3],
        /// Leaf.
        pub function: U32,
        /// Sub-leaf.
        pub index: U32,
    }
}

wire_struct! {
    /// `struct kvmi_get_cpuid_reply` (16 B).
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

wire_struct! {
    /// `struct kvmi_get_page_access` / `kvmi_set_page_access` header (8 B), followed by
    /// `u64 gpa[count]` (get) or `kvmi_page_access_entry entries[count]` (set).
    pub struct PageAccessRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Number of entries.
        pub count: U16,
        /// EPT view.
        pub view: U16,
        /// Zero.
        pub padding: U16,
    }
}

wire_struct! {
    /// `struct kvmi_page_access_entry` (16 B).
    pub struct PageAccessEntryWire {
        /// Guest-physical address.
        pub gpa: U64,
        /// Allowed accesses (R = 1, W = 2, X = 4).
        pub access: u8,
        /// Zero.
        pub padding: [u8; 7],
    }
}

wire_struct! {
    /// `struct kvmi_inject_exception` (16 B).
    pub struct InjectExceptionRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Vector.
        pub nr: u8,
        /// 1 if `error_code` is pushed.
        pub has_error: u8,
        /// Error code.
        pub error_code: U16,
        /// Zero.
        pub padding: U16,
        /// #PF address.
        pub address: U64,
    }
}

wire_struct! {
    /// `struct kvmi_read_physical` and the header of `kvmi_write_physical` (16 B); the write
    /// is followed by `u8 data[size]`.
    pub struct PhysicalRequest {
        /// Guest-physical address.
        pub gpa: U64,
        /// Bytes.
        pub size: U64,
    }
}

wire_struct! {
    /// `struct kvmi_control_events` (8 B).
    pub struct ControlEventsRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Zero.
        pub padding: U16,
        /// Event bits to enable.
        pub events: U32,
    }
}

wire_struct! {
    /// `struct kvmi_control_cr` and `kvmi_control_msr` (8 B).
    pub struct ControlRegRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// 1 = enable, 0 = disable.
        pub enable: u8,
        /// Zero.
        pub padding: u8,
        /// CR number or MSR index.
        pub reg: U32,
    }
}

wire_struct! {
    /// `struct kvmi_control_ve` header (8 B), followed by `u64 gpa[count]`.
    pub struct ControlVeRequest {
        /// The vCPU.
        pub vcpu: U16,
        /// Number of GPAs that follow.
        pub count: U16,
        /// 1 = set, 0 = clear.
        pub enable: u8,
        /// Zero.
        pub padding: [u8; 3],
    }
}

wire_struct! {
    /// `struct kvmi_map_mem_token` (32 B).
    pub struct MapMemToken {
        /// The token's 32 bytes (opaque to the tool; see `docs/protocol.md`, map tokens).
        pub token: [U64; 4],
    }
}

wire_struct! {
    /// `KVMI_CONTROL_BREAKPOINT` request (this project's extension, 16 B).
    pub struct ControlBreakpointRequest {
        /// The vCPU, `0xffff` = all vCPUs.
        pub vcpu: U16,
        /// 1 = set, 0 = clear.
        pub enable: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U32,
        /// Guest-virtual address.
        pub gva: U64,
    }
}

const _: () = assert!(size_of::<ErrorCodeWire>() == 8);
const _: () = assert!(offset_of!(ErrorCodeWire, padding) == 4);
const _: () = assert!(size_of::<VcpuRequest>() == 8);
const _: () = assert!(offset_of!(VcpuRequest, padding) == 2);
const _: () = assert!(size_of::<GetVersionReply>() == 16);
const _: () = assert!(offset_of!(GetVersionReply, commands) == 4);
const _: () = assert!(offset_of!(GetVersionReply, events) == 8);
const _: () = assert!(offset_of!(GetVersionReply, padding) == 12);
const _: () = assert!(size_of::<GetGuestInfoReply>() == 16);
const _: () = assert!(offset_of!(GetGuestInfoReply, tsc_speed) == 8);
const _: () = assert!(size_of::<GetRegistersRequest>() == 8);
const _: () = assert!(offset_of!(GetRegistersRequest, nmsrs) == 2);
const _: () = assert!(offset_of!(GetRegistersRequest, padding) == 4);
const _: () = assert!(size_of::<GetRegistersReply>() == 472);
const _: () = assert!(offset_of!(GetRegistersReply, regs) == 8);
const _: () = assert!(offset_of!(GetRegistersReply, sregs) == 152);
const _: () = assert!(offset_of!(GetRegistersReply, nmsrs) == 464);
const _: () = assert!(offset_of!(GetRegistersReply, msrs_pad) == 468);
const _: () = assert!(size_of::<SetRegistersRequest>() == 152);
const _: () = assert!(offset_of!(SetRegistersRequest, regs) == 8);
const _: () = assert!(size_of::<GetCpuidRequest>() == 16);
const _: () = assert!(offset_of!(GetCpuidRequest, function) == 8);
const _: () = assert!(offset_of!(GetCpuidRequest, index) == 12);
const _: () = assert!(size_of::<GetCpuidReply>() == 16);
const _: () = assert!(offset_of!(GetCpuidReply, edx) == 12);
const _: () = assert!(size_of::<PageAccessRequest>() == 8);
const _: () = assert!(offset_of!(PageAccessRequest, count) == 2);
const _: () = assert!(offset_of!(PageAccessRequest, view) == 4);
const _: () = assert!(offset_of!(PageAccessRequest, padding) == 6);
const _: () = assert!(size_of::<PageAccessEntryWire>() == 16);
const _: () = assert!(offset_of!(PageAccessEntryWire, access) == 8);
const _: () = assert!(offset_of!(PageAccessEntryWire, padding) == 9);
const _: () = assert!(size_of::<InjectExceptionRequest>() == 16);
const _: () = assert!(offset_of!(InjectExceptionRequest, nr) == 2);
const _: () = assert!(offset_of!(InjectExceptionRequest, has_error) == 3);
const _: () = assert!(offset_of!(InjectExceptionRequest, error_code) == 4);
const _: () = assert!(offset_of!(InjectExceptionRequest, padding) == 6);
const _: () = assert!(offset_of!(InjectExceptionRequest, address) == 8);
const _: () = assert!(size_of::<PhysicalRequest>() == 16);
const _: () = assert!(offset_of!(PhysicalRequest, size) == 8);
const _: () = assert!(size_of::<ControlEventsRequest>() == 8);
const _: () = assert!(offset_of!(ControlEventsRequest, events) == 4);
const _: () = assert!(size_of::<ControlRegRequest>() == 8);
const _: () = assert!(offset_of!(ControlRegRequest, enable) == 2);
const _: () = assert!(offset_of!(ControlRegRequest, reg) == 4);
const _: () = assert!(size_of::<ControlVeRequest>() == 8);
const _: () = assert!(offset_of!(ControlVeRequest, enable) == 4);
const _: () = assert!(size_of::<MapMemToken>() == 32);
const _: () = assert!(size_of::<ControlBreakpointRequest>() == 16);
const _: () = assert!(offset_of!(ControlBreakpointRequest, enable) == 2);
const _: () = assert!(offset_of!(ControlBreakpointRequest, padding1) == 3);
const _: () = assert!(offset_of!(ControlBreakpointRequest, padding2) == 4);
const _: () = assert!(offset_of!(ControlBreakpointRequest, gva) == 8);
