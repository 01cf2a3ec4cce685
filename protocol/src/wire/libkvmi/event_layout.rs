//! libkvmi (`kvmi-v7`) layouts of events and event replies.

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::layout::{assert_layout, wire_struct};
use crate::kvm::{KvmRegs, KvmSregs};

wire_struct! {
    /// The nine MSRs of the common event part (72 B).
    pub struct EventMsrs {
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
        /// `MSR_KERNEL_GS_BASE`.
        pub shadow_gs: U64,
    }
}
assert_layout!(EventMsrs, 72, sysenter_cs @ 0, efer @ 24, pat @ 56, shadow_gs @ 64);

wire_struct! {
    /// `struct kvmi_event` (544 B): the common part of every event. The event-specific data
    /// starts at offset `size` of the payload.
    pub struct EventCommon {
        /// Size of this common part as the sender defines it (544).
        pub size: U16,
        /// vCPU index (0 for VM events).
        pub vcpu: U16,
        /// Event ID ([`super::events`]).
        pub event: u8,
        /// Zero.
        pub padding1: [u8; 3],
        /// CPU mode in bytes: 2, 4 or 8.
        pub mode: u8,
        /// Zero.
        pub padding2: u8,
        /// Current EPT view (0).
        pub view: U16,
        /// Zero.
        pub padding3: U32,
        /// `struct kvm_regs`.
        pub regs: KvmRegs,
        /// `struct kvm_sregs`.
        pub sregs: KvmSregs,
        /// MSRs.
        pub msrs: EventMsrs,
    }
}
assert_layout!(EventCommon, 544, size @ 0, vcpu @ 2, event @ 4, padding1 @ 5, mode @ 8,
    padding2 @ 9, view @ 10, padding3 @ 12, regs @ 16, sregs @ 160, msrs @ 472);

/// Size of the common event part this dialect sends.
pub const EVENT_COMMON_SIZE: usize = size_of::<EventCommon>();

/// Smallest `size` a tool's parser accepts in the common part.
pub const EVENT_COMMON_MIN_SIZE: usize = 8;

wire_struct! {
    /// `struct kvmi_event_reply` (8 B), after the vCPU header of an event reply.
    pub struct EventReplyHdr {
        /// Action value ([`super::actions`]).
        pub action: u8,
        /// Echo of the event ID.
        pub event: u8,
        /// Zero.
        pub padding1: U16,
        /// Zero.
        pub padding2: U32,
    }
}
assert_layout!(EventReplyHdr, 8, action @ 0, event @ 1, padding1 @ 2, padding2 @ 4);

/// Size of an event reply's fixed part: vCPU header + [`EventReplyHdr`].
pub const EVENT_REPLY_MIN_SIZE: usize = 16;

wire_struct! {
    /// CR event data (24 B).
    pub struct CrEvent {
        /// Control register.
        pub cr: U16,
        /// Zero.
        pub padding: [U16; 3],
        /// Old value.
        pub old_value: U64,
        /// Value being written.
        pub new_value: U64,
    }
}
assert_layout!(CrEvent, 24, cr @ 0, padding @ 2, old_value @ 8, new_value @ 16);

wire_struct! {
    /// MSR event data (24 B).
    pub struct MsrEvent {
        /// MSR index.
        pub msr: U32,
        /// Zero.
        pub padding: U32,
        /// Old value.
        pub old_value: U64,
        /// Value being written.
        pub new_value: U64,
    }
}
assert_layout!(MsrEvent, 24, msr @ 0, padding @ 4, old_value @ 8, new_value @ 16);

wire_struct! {
    /// CR / MSR event reply data (8 B): the value written on CONTINUE.
    pub struct NewValReply {
        /// New value.
        pub new_val: U64,
    }
}
assert_layout!(NewValReply, 8, new_val @ 0);

wire_struct! {
    /// BREAKPOINT event data (16 B).
    pub struct BreakpointEvent {
        /// Guest-physical address of the INT3.
        pub gpa: U64,
        /// Instruction length.
        pub insn_len: u8,
        /// Zero.
        pub padding: [u8; 7],
    }
}
assert_layout!(BreakpointEvent, 16, gpa @ 0, insn_len @ 8, padding @ 9);

wire_struct! {
    /// PF event data (24 B).
    pub struct PfEvent {
        /// Guest-virtual address.
        pub gva: U64,
        /// Guest-physical address.
        pub gpa: U64,
        /// Access that faulted (R 1, W 2, X 4).
        pub access: u8,
        /// Zero.
        pub padding1: u8,
        /// EPT view.
        pub view: U16,
        /// Zero.
        pub padding2: U32,
    }
}
assert_layout!(PfEvent, 24, gva @ 0, gpa @ 8, access @ 16, padding1 @ 17, view @ 18, padding2 @ 20);

/// Largest `ctx_size` of a PF reply.
pub const PF_CTX_MAX: usize = 256;

wire_struct! {
    /// PF event reply data (272 B).
    pub struct PfReply {
        /// Start of the emulation context (read data) in guest-virtual space.
        pub ctx_addr: U64,
        /// Bytes of `ctx_data` used (≤ 256; more closes the socket).
        pub ctx_size: U32,
        /// libkvmi: single-step the instruction; the kernel branch requires 0 here.
        pub singlestep: u8,
        /// Whether a REP instruction is complete.
        pub rep_complete: u8,
        /// Zero.
        pub padding: U16,
        /// Emulated read data.
        pub ctx_data: [u8; 256],
    }
}
assert_layout!(PfReply, 272, ctx_addr @ 0, ctx_size @ 8, singlestep @ 12, rep_complete @ 13,
    padding @ 14, ctx_data @ 16);

wire_struct! {
    /// TRAP event data (16 B).
    pub struct TrapEvent {
        /// Vector.
        pub vector: u8,
        /// Zero.
        pub padding1: u8,
        /// Zero.
        pub padding2: U16,
        /// Error code.
        pub error_code: U32,
        /// CR2.
        pub cr2: U64,
    }
}
assert_layout!(TrapEvent, 16, vector @ 0, padding1 @ 1, padding2 @ 2, error_code @ 4, cr2 @ 8);

wire_struct! {
    /// DESCRIPTOR event data (8 B).
    pub struct DescriptorEvent {
        /// 1 IDTR, 2 GDTR, 3 LDTR, 4 TR.
        pub descriptor: u8,
        /// 1 = write.
        pub write: u8,
        /// Zero.
        pub padding: [u8; 6],
    }
}
assert_layout!(DescriptorEvent, 8, descriptor @ 0, write @ 1, padding @ 2);

wire_struct! {
    /// SINGLESTEP event data (8 B).
    pub struct SinglestepEvent {
        /// 1 = the step failed.
        pub failed: u8,
        /// Zero.
        pub padding: [u8; 7],
    }
}
assert_layout!(SinglestepEvent, 8, failed @ 0, padding @ 1);

wire_struct! {
    /// CMD_ERROR event data (16 B).
    pub struct CmdErrorEvent {
        /// Negated error code.
        pub err: I32,
        /// `seq` of the failed command.
        pub msg_seq: U32,
        /// ID of the failed command.
        pub msg_id: U16,
        /// Zero.
        pub padding: [U16; 3],
    }
}
assert_layout!(CmdErrorEvent, 16, err @ 0, msg_seq @ 4, msg_id @ 8, padding @ 10);

wire_struct! {
    /// CPUID event data (16 B).
    pub struct CpuidEvent {
        /// Leaf.
        pub function: U32,
        /// Sub-leaf.
        pub index: U32,
        /// Instruction length.
        pub insn_length: u8,
        /// Zero.
        pub padding1: [u8; 3],
        /// Zero.
        pub padding2: U32,
    }
}
assert_layout!(CpuidEvent, 16, function @ 0, index @ 4, insn_length @ 8, padding1 @ 9, padding2 @ 12);
