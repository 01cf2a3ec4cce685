//! v4 layouts of events and event replies (docs/protocol.md).

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::layout::wire_struct;
use crate::kvm::{KvmRegs, KvmSregs};

wire_struct! {
    /// `struct kvmi_event_msrs` as embedded in `kvmi_event` (64 B).
    pub struct EventMsrsWire {
        /// `MSR_IA32_SYSENTER_CS`.
        pub sysenter_cs: U64,
        /// `MSR_IA32_SYSENTER_ESP`.
        pub sysenter_esp: U64,
        /// `MSR_IA32_SYSENTER_EIP`.
        pub sysenter_eip: U64,
        /// `MSR_EFER`.
        pub efer: U64,
        /// `MSR_STAR`.
        pub star: U64,
        /// `MSR_LSTAR`.
        pub lstar: U64,
        /// `MSR_CSTAR`.
        pub cstar: U64,
        /// `MSR_IA32_CR_PAT`.
        pub pat: U64,
    }
}

wire_struct! {
    /// `struct kvmi_event`: the common part of every event (528 B).
    pub struct EventWire {
        /// The event bit.
        pub event: U32,
        /// The vCPU.
        pub vcpu: U16,
        /// Operating mode in bytes (2, 4, 8).
        pub mode: u8,
        /// Zero.
        pub padding: u8,
        /// General-purpose registers.
        pub regs: KvmRegs,
        /// Segment and control registers.
        pub sregs: KvmSregs,
        /// Selected MSRs.
        pub msrs: EventMsrsWire,
    }
}

wire_struct! {
    /// `struct kvmi_event_cr` (24 B).
    pub struct EventCrWire {
        /// The register.
        pub cr: U16,
        /// Zero.
        pub padding: [U16; 3],
        /// Current value.
        pub old_value: U64,
        /// Value being written.
        pub new_value: U64,
    }
}

wire_struct! {
    /// `struct kvmi_event_msr` (24 B).
    pub struct EventMsrWire {
        /// The MSR.
        pub msr: U32,
        /// Zero.
        pub padding: U32,
        /// Current value.
        pub old_value: U64,
        /// Value being written.
        pub new_value: U64,
    }
}

wire_struct! {
    /// `struct kvmi_event_cr_reply` / `kvmi_event_msr_reply` (8 B).
    pub struct EventNewValReply {
        /// Value to load.
        pub new_val: U64,
    }
}

wire_struct! {
    /// `struct kvmi_event_breakpoint` (8 B).
    pub struct EventBreakpointWire {
        /// Guest-physical address of the breakpoint.
        pub gpa: U64,
    }
}

wire_struct! {
    /// `struct kvmi_event_page_fault` (24 B).
    pub struct EventPageFaultWire {
        /// Guest-virtual address.
        pub gva: U64,
        /// Guest-physical address.
        pub gpa: U64,
        /// EPT-violation exit qualification.
        pub mode: U32,
        /// Zero.
        pub padding: U32,
    }
}

wire_struct! {
    /// `struct kvmi_event_page_fault_reply` (264 B).
    pub struct EventPageFaultReplyWire {
        /// Emulate a REP instruction only once.
        pub trap_access: u8,
        /// Zero.
        pub padding: [u8; 3],
        /// Bytes of `ctx_data` used (≤ 256).
        pub ctx_size: U32,
        /// Data emulated reads see.
        pub ctx_data: [u8; 256],
    }
}

wire_struct! {
    /// `struct kvmi_event_trap` (24 B).
    pub struct EventTrapWire {
        /// Vector.
        pub vector: U32,
        /// Interruption type.
        pub type_: U32,
        /// Error code.
        pub error_code: U32,
        /// Zero.
        pub padding: U32,
        /// CR2.
        pub cr2: U64,
    }
}

wire_struct! {
    /// `struct kvmi_event_descriptor` (24 B). `arch` is the VMX/SVM union, kept as two words.
    pub struct EventDescriptorWire {
        /// VMX `{u32 instr_info; u32 pad; u64 exit_qualification}` or SVM `{u64 exit_info; u64 pad}`.
        pub arch: [U64; 2],
        /// `KVMI_DESC_*`.
        pub descriptor: u8,
        /// 1 = load, 0 = store.
        pub write: u8,
        /// Zero.
        pub padding: [u8; 6],
    }
}

wire_struct! {
    /// `struct kvmi_event_reply`: the start of every event reply (8 B).
    pub struct EventReplyWire {
        /// One action bit.
        pub action: U32,
        /// Zero.
        pub padding: U32,
    }
}

const _: () = assert!(size_of::<EventMsrsWire>() == 64);
const _: () = assert!(size_of::<EventWire>() == 528);
const _: () = assert!(offset_of!(EventWire, event) == 0);
const _: () = assert!(offset_of!(EventWire, vcpu) == 4);
const _: () = assert!(offset_of!(EventWire, mode) == 6);
const _: () = assert!(offset_of!(EventWire, padding) == 7);
const _: () = assert!(offset_of!(EventWire, regs) == 8);
const _: () = assert!(offset_of!(EventWire, regs) + offset_of!(KvmRegs, rip) == 136);
const _: () = assert!(offset_of!(EventWire, sregs) == 152);
const _: () = assert!(offset_of!(EventWire, msrs) == 464);
const _: () = assert!(offset_of!(EventWire, msrs) + offset_of!(EventMsrsWire, sysenter_esp) == 472);
const _: () = assert!(offset_of!(EventWire, msrs) + offset_of!(EventMsrsWire, sysenter_eip) == 480);
const _: () = assert!(offset_of!(EventWire, msrs) + offset_of!(EventMsrsWire, efer) == 488);
const _: () = assert!(offset_of!(EventWire, msrs) + offset_of!(EventMsrsWire, star) == 496);
const _: () = assert!(offset_of!(EventWire, msrs) + offset_of!(EventMsrsWire, lstar) == 504);
const _: () = assert!(offset_of!(EventWire, msrs) + offset_of!(EventMsrsWire, cstar) == 512);
const _: () = assert!(offset_of!(EventWire, msrs) + offset_of!(EventMsrsWire, pat) == 520);
const _: () = assert!(size_of::<EventCrWire>() == 24);
const _: () = assert!(offset_of!(EventCrWire, old_value) == 8);
const _: () = assert!(offset_of!(EventCrWire, new_value) == 16);
const _: () = assert!(size_of::<EventMsrWire>() == 24);
const _: () = assert!(offset_of!(EventMsrWire, old_value) == 8);
const _: () = assert!(size_of::<EventNewValReply>() == 8);
const _: () = assert!(size_of::<EventBreakpointWire>() == 8);
const _: () = assert!(size_of::<EventPageFaultWire>() == 24);
const _: () = assert!(offset_of!(EventPageFaultWire, gpa) == 8);
const _: () = assert!(offset_of!(EventPageFaultWire, mode) == 16);
const _: () = assert!(size_of::<EventPageFaultReplyWire>() == 264);
const _: () = assert!(offset_of!(EventPageFaultReplyWire, ctx_size) == 4);
const _: () = assert!(offset_of!(EventPageFaultReplyWire, ctx_data) == 8);
const _: () = assert!(size_of::<EventTrapWire>() == 24);
const _: () = assert!(offset_of!(EventTrapWire, type_) == 4);
const _: () = assert!(offset_of!(EventTrapWire, error_code) == 8);
const _: () = assert!(offset_of!(EventTrapWire, cr2) == 16);
const _: () = assert!(size_of::<EventDescriptorWire>() == 24);
const _: () = assert!(offset_of!(EventDescriptorWire, descriptor) == 16);
const _: () = assert!(offset_of!(EventDescriptorWire, write) == 17);
const _: () = assert!(size_of::<EventReplyWire>() == 8);
const _: () = assert!(offset_of!(EventReplyWire, padding) == 4);
