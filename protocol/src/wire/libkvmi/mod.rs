//! The libkvmi dialect: the KVM-VMI `kvmi-v7` ABI that libkvmi (and so LibVMI, libmicrovmi
//! and HVMI) speaks. See docs/protocol.md, "The libkvmi dialect".
//!
//! Differences from [`super::v4`] that shape this module: a handshake precedes any message
//! ([`layout::QemuToIntrospector`] from the VMM, [`layout::IntrospectorToQemu`] from the
//! tool); message IDs are an enum with `EVENT_REPLY` = 0 and `EVENT` = 1; every vCPU command
//! and every event reply starts with the 8-byte [`layout::VcpuHdr`]; event IDs and actions are
//! values, not bits; the common event part is 544 bytes and says its own size; the largest
//! payload is [`MSG_SIZE`] = 8184 bytes.
//!
//! So far this module holds the numbering ([`ids`], [`events`], [`actions`], [`errors`]),
//! the byte layouts ([`layout`], [`event_layout`]), host-side handshake and frame
//! validation with a close-or-reply verdict for every error ([`frame`]), and host-side
//! encoders for replies and events with libkvmi-style readers ([`host`]), and the tool side
//! in the semantic types ([`tool`]: list requests, event replies, events and registers read
//! back). It does not implement [`super::WireProfile`]: a tool's command does not map to one
//! kvmi-v7 message (e.g. `CONTROL_EVENTS` takes one event ID per message).

pub mod event_layout;
pub mod frame;
pub mod host;
pub mod layout;
pub mod tool;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use crate::frame::HEADER_SIZE;

/// The `version` a VMM answers to `GET_VERSION` (libkvmi requires ≥ 1).
pub const KVMI_VERSION: u32 = 1;

/// Largest payload after the 8-byte header: `2·4096 − 8` (`KVMI_MSG_SIZE`). A header whose
/// `size` exceeds it makes the VMM close the socket.
pub const MSG_SIZE: usize = 2 * 4096 - HEADER_SIZE;

/// Largest message, header included (8192 bytes).
pub const MAX_MSG_SIZE: usize = HEADER_SIZE + MSG_SIZE;

/// Sizes of the handshake that precedes any message.
pub mod handshake {
    /// `qemu2introspector` as a kvmi-v7 VMM sends it.
    pub const VMM_SIZE: usize = 96;
    /// `qemu2introspector` as the later kvmi-v12 VMM sends it (`u64 max_gpa` appended at 96).
    pub const VMM_SIZE_V12: usize = 104;
    /// Smallest `struct_size` libkvmi accepts from a VMM (the offset of `name`).
    pub const VMM_MIN_SIZE: usize = 32;
    /// Largest `struct_size` libkvmi accepts from a VMM.
    pub const VMM_MAX_SIZE: usize = 65_536;
    /// `introspector2qemu` as libkvmi sends it; also the smallest a VMM accepts (it reads
    /// `struct_size` bytes and ignores any beyond these 24).
    pub const TOOL_SIZE: usize = 24;
    /// Length of `cookie_hash` (SHA-1).
    pub const COOKIE_HASH_SIZE: usize = 20;
    /// Length of the VM name field (NUL-padded; libkvmi forces its last byte to 0).
    pub const NAME_SIZE: usize = 64;
}

/// Message IDs (`kvmi_msg_hdr.id`), libkvmi's names. The kernel branch uses the same numbers
/// under `KVMI_VM_*` / `KVMI_VCPU_*` names. IDs listed without a handler (12, 20, 25) and every
/// ID not listed are answered with `-KVM_ENOSYS`.
pub mod ids {
    /// Event reply (tool → VMM); carries the event's `seq`; not answered.
    pub const EVENT_REPLY: u16 = 0;
    /// Event (VMM → tool).
    pub const EVENT: u16 = 1;
    /// `GET_VERSION` (VM).
    pub const GET_VERSION: u16 = 2;
    /// `CHECK_COMMAND` (VM).
    pub const CHECK_COMMAND: u16 = 3;
    /// `CHECK_EVENT` (VM).
    pub const CHECK_EVENT: u16 = 4;
    /// `GET_GUEST_INFO` (VM; kernel `VM_GET_INFO`).
    pub const GET_GUEST_INFO: u16 = 5;
    /// `GET_VCPU_INFO` (vCPU).
    pub const GET_VCPU_INFO: u16 = 6;
    /// `PAUSE_VCPU` (vCPU header, handled on the receiving thread).
    pub const PAUSE_VCPU: u16 = 7;
    /// `CONTROL_VM_EVENTS` (VM).
    pub const CONTROL_VM_EVENTS: u16 = 8;
    /// `CONTROL_EVENTS` (vCPU).
    pub const CONTROL_EVENTS: u16 = 9;
    /// `CONTROL_CR` (vCPU).
    pub const CONTROL_CR: u16 = 10;
    /// `CONTROL_MSR` (vCPU).
    pub const CONTROL_MSR: u16 = 11;
    /// `CONTROL_VE` (numbered, no handler).
    pub const CONTROL_VE: u16 = 12;
    /// `GET_REGISTERS` (vCPU).
    pub const GET_REGISTERS: u16 = 13;
    /// `SET_REGISTERS` (vCPU).
    pub const SET_REGISTERS: u16 = 14;
    /// `GET_CPUID` (vCPU).
    pub const GET_CPUID: u16 = 15;
    /// `GET_XSAVE` (vCPU).
    pub const GET_XSAVE: u16 = 16;
    /// `READ_PHYSICAL` (VM).
    pub const READ_PHYSICAL: u16 = 17;
    /// `WRITE_PHYSICAL` (VM).
    pub const WRITE_PHYSICAL: u16 = 18;
    /// `INJECT_EXCEPTION` (vCPU).
    pub const INJECT_EXCEPTION: u16 = 19;
    /// `GET_PAGE_ACCESS` (numbered, no handler).
    pub const GET_PAGE_ACCESS: u16 = 20;
    /// `SET_PAGE_ACCESS` (VM).
    pub const SET_PAGE_ACCESS: u16 = 21;
    /// `GET_MAP_TOKEN` (VM).
    pub const GET_MAP_TOKEN: u16 = 22;
    /// `GET_MTRR_TYPE` (vCPU).
    pub const GET_MTRR_TYPE: u16 = 23;
    /// `CONTROL_SPP` (VM).
    pub const CONTROL_SPP: u16 = 24;
    /// `GET_PAGE_WRITE_BITMAP` (numbered, no handler).
    pub const GET_PAGE_WRITE_BITMAP: u16 = 25;
    /// `SET_PAGE_WRITE_BITMAP` (VM).
    pub const SET_PAGE_WRITE_BITMAP: u16 = 26;
    /// `CONTROL_CMD_RESPONSE` (VM).
    pub const CONTROL_CMD_RESPONSE: u16 = 27;
    /// `SET_VE_INFO_PAGE` (vCPU).
    pub const SET_VE_INFO_PAGE: u16 = 28;
    /// `GET_MAX_GFN` (VM).
    pub const GET_MAX_GFN: u16 = 29;
    /// `VM_SET_PAGE_SVE` (kernel only; removed from libkvmi).
    pub const SET_PAGE_SVE: u16 = 30;
    /// `GET_NEXT_AVAILABLE_GFN` (VM).
    pub const GET_NEXT_AVAILABLE_GFN: u16 = 31;
    /// `SWITCH_EPT_VIEW` (vCPU).
    pub const SWITCH_EPT_VIEW: u16 = 32;
    /// `DISABLE_VE` (vCPU).
    pub const DISABLE_VE: u16 = 33;
    /// `GET_EPT_VIEW` (vCPU).
    pub const GET_EPT_VIEW: u16 = 34;
    /// `VCPU_TRANSLATE_GVA` (vCPU).
    pub const VCPU_TRANSLATE_GVA: u16 = 35;
    /// `CONTROL_EPT_VIEW` (vCPU).
    pub const CONTROL_EPT_VIEW: u16 = 36;
    /// `VCPU_GET_XCR` (vCPU).
    pub const VCPU_GET_XCR: u16 = 37;
    /// `VCPU_SET_XSAVE` (vCPU).
    pub const VCPU_SET_XSAVE: u16 = 38;
    /// `QUERY_PHYSICAL` (VM).
    pub const QUERY_PHYSICAL: u16 = 39;
    /// `VCPU_ALLOC_GFN` (vCPU).
    pub const VCPU_ALLOC_GFN: u16 = 41;
    /// `VCPU_FREE_GFN` (vCPU).
    pub const VCPU_FREE_GFN: u16 = 42;
    /// `CREATE_EPT_VIEW` (VM).
    pub const CREATE_EPT_VIEW: u16 = 43;
    /// `DESTROY_EPT_VIEW` (VM).
    pub const DESTROY_EPT_VIEW: u16 = 44;
    /// `VCPU_CHANGE_GFN` (vCPU).
    pub const VCPU_CHANGE_GFN: u16 = 60;
    /// `VCPU_CONTROL_SINGLESTEP` (vCPU).
    pub const VCPU_CONTROL_SINGLESTEP: u16 = 63;

    /// Every numbered command in ID order (not `EVENT_REPLY` / `EVENT`).
    pub const COMMANDS: [u16; 44] = [
        GET_VERSION,
        CHECK_COMMAND,
        CHECK_EVENT,
        GET_GUEST_INFO,
        GET_VCPU_INFO,
        PAUSE_VCPU,
        CONTROL_VM_EVENTS,
        CONTROL_EVENTS,
        CONTROL_CR,
        CONTROL_MSR,
        CONTROL_VE,
        GET_REGISTERS,
        SET_REGISTERS,
        GET_CPUID,
        GET_XSAVE,
        READ_PHYSICAL,
        WRITE_PHYSICAL,
        INJECT_EXCEPTION,
        GET_PAGE_ACCESS,
        SET_PAGE_ACCESS,
        GET_MAP_TOKEN,
        GET_MTRR_TYPE,
        CONTROL_SPP,
        GET_PAGE_WRITE_BITMAP,
        SET_PAGE_WRITE_BITMAP,
        CONTROL_CMD_RESPONSE,
        SET_VE_INFO_PAGE,
        GET_MAX_GFN,
        SET_PAGE_SVE,
        GET_NEXT_AVAILABLE_GFN,
        SWITCH_EPT_VIEW,
        DISABLE_VE,
        GET_EPT_VIEW,
        VCPU_TRANSLATE_GVA,
        CONTROL_EPT_VIEW,
        VCPU_GET_XCR,
        VCPU_SET_XSAVE,
        QUERY_PHYSICAL,
        VCPU_ALLOC_GFN,
        VCPU_FREE_GFN,
        CREATE_EPT_VIEW,
        DESTROY_EPT_VIEW,
        VCPU_CHANGE_GFN,
        VCPU_CONTROL_SINGLESTEP,
    ];

    /// Whether a message from the tool with this ID starts its payload with the 8-byte vCPU
    /// header (every vCPU command, `PAUSE_VCPU`, and event replies).
    pub const fn has_vcpu_hdr(id: u16) -> bool {
        matches!(
            id,
            EVENT_REPLY
                | GET_VCPU_INFO
                | PAUSE_VCPU
                | CONTROL_EVENTS
                | CONTROL_CR
                | CONTROL_MSR
                | GET_REGISTERS
                | SET_REGISTERS
                | GET_CPUID
                | GET_XSAVE
                | INJECT_EXCEPTION
                | GET_MTRR_TYPE
                | SET_VE_INFO_PAGE
                | SWITCH_EPT_VIEW
                | DISABLE_VE
                | GET_EPT_VIEW
                | VCPU_TRANSLATE_GVA
                | CONTROL_EPT_VIEW
                | VCPU_GET_XCR
                | VCPU_SET_XSAVE
                | VCPU_ALLOC_GFN
                | VCPU_FREE_GFN
                | VCPU_CHANGE_GFN
                | VCPU_CONTROL_SINGLESTEP
        )
    }
}

/// Event IDs (`kvmi_event.event`, and the `event_id` of `CONTROL_EVENTS` /
/// `CONTROL_VM_EVENTS` / `CHECK_EVENT`): values, not bits.
pub mod events {
    /// `UNHOOK` (VM event; no reply).
    pub const UNHOOK: u8 = 0;
    /// `CR` write.
    pub const CR: u8 = 1;
    /// `MSR` write.
    pub const MSR: u8 = 2;
    /// `XSETBV`.
    pub const XSETBV: u8 = 3;
    /// `BREAKPOINT` (#BP).
    pub const BREAKPOINT: u8 = 4;
    /// `HYPERCALL`.
    pub const HYPERCALL: u8 = 5;
    /// `PF` (EPT violation on a restricted page).
    pub const PF: u8 = 6;
    /// `TRAP` (after `INJECT_EXCEPTION`; always on).
    pub const TRAP: u8 = 7;
    /// `DESCRIPTOR` table access.
    pub const DESCRIPTOR: u8 = 8;
    /// `CREATE_VCPU` (VM event).
    pub const CREATE_VCPU: u8 = 9;
    /// `PAUSE_VCPU` (one per successful `PAUSE_VCPU` command; always on).
    pub const PAUSE_VCPU: u8 = 10;
    /// `SINGLESTEP`.
    pub const SINGLESTEP: u8 = 11;
    /// `CMD_ERROR` (no reply; libkvmi cannot parse it).
    pub const CMD_ERROR: u8 = 12;
    /// `CPUID`.
    pub const CPUID: u8 = 13;
    /// Number of event IDs; `CHECK_EVENT` answers `-KVM_EINVAL` for IDs ≥ this.
    pub const COUNT: u8 = 14;

    /// The events `CONTROL_EVENTS` accepts (per vCPU).
    pub const fn is_vcpu_controllable(id: u16) -> bool {
        matches!(
            id,
            1 /* CR */ | 2 /* MSR */ | 3 /* XSETBV */ | 4 /* BREAKPOINT */ | 5 /* HYPERCALL */
                | 6 /* PF */ | 8 /* DESCRIPTOR */ | 11 /* SINGLESTEP */ | 13 /* CPUID */
        )
    }

    /// The events `CONTROL_VM_EVENTS` accepts.
    pub const fn is_vm_controllable(id: u16) -> bool {
        matches!(id, 0 /* UNHOOK */ | 9 /* CREATE_VCPU */)
    }

    /// Whether an event of this ID expects an event reply (UNHOOK and CMD_ERROR do not).
    pub const fn expects_reply(id: u8) -> bool {
        id < COUNT && id != UNHOOK && id != CMD_ERROR
    }

    /// Size of the event-specific data after the common part, or `None` for an unknown ID.
    pub const fn data_size(id: u8) -> Option<usize> {
        Some(match id {
            UNHOOK | XSETBV | HYPERCALL | CREATE_VCPU | PAUSE_VCPU => 0,
            CR | MSR | PF => 24,
            BREAKPOINT | TRAP | CMD_ERROR | CPUID => 16,
            DESCRIPTOR | SINGLESTEP => 8,
            _ => return None,
        })
    }

    /// Largest event-specific reply data (after `vh` + `kvmi_event_reply`) the VMM accepts for
    /// this event, or `None` for an unknown ID or one that takes no reply.
    pub const fn reply_data_size(id: u8) -> Option<usize> {
        Some(match id {
            CR | MSR => 8,
            PF => 272,
            XSETBV | BREAKPOINT | HYPERCALL | TRAP | DESCRIPTOR | CREATE_VCPU | PAUSE_VCPU
            | SINGLESTEP | CPUID => 0,
            _ => return None,
        })
    }
}

/// Event-reply actions (`kvmi_event_reply.action`): values, not bits.
pub mod actions {
    /// Let the guest go on (emulate/apply; a BREAKPOINT is re-injected into the guest).
    pub const CONTINUE: u8 = 0;
    /// Re-enter the guest at the same instruction.
    pub const RETRY: u8 = 1;
    /// Stop the guest at once.
    pub const CRASH: u8 = 2;

    /// Whether an event of ID `event` accepts `action`.
    pub const fn accepted(event: u8, action: u8) -> bool {
        use super::events::*;
        match action {
            CONTINUE | CRASH => expects_reply(event),
            RETRY => matches!(event, BREAKPOINT | PF | DESCRIPTOR),
            _ => false,
        }
    }
}

/// Error codes carried (negated) in `kvmi_error_code.err`: the `KVM_E*` values.
pub mod errors {
    /// `KVM_EPERM`: command/event not allowed for this VM.
    pub const EPERM: i32 = 1;
    /// `KVM_ENOENT`: GPA not backed; CPUID leaf absent.
    pub const ENOENT: i32 = 2;
    /// `KVM_E2BIG`.
    pub const E2BIG: i32 = 7;
    /// `KVM_EAGAIN`: vCPU not yet initialised; too many map tokens.
    pub const EAGAIN: i32 = 11;
    /// `KVM_ENOMEM`.
    pub const ENOMEM: i32 = 12;
    /// `KVM_EFAULT`.
    pub const EFAULT: i32 = 14;
    /// `KVM_EBUSY`: too many queued pause events; #BP already intercepted.
    pub const EBUSY: i32 = 16;
    /// `KVM_EINVAL`: bad vCPU index, non-zero padding, bad field.
    pub const EINVAL: i32 = 22;
    /// `KVM_EOPNOTSUPP`: not possible on this host.
    pub const EOPNOTSUPP: i32 = 95;
    /// `KVM_ENOSYS`: unknown/unsupported message ID.
    pub const ENOSYS: i32 = 1000;
}

/// `SET_PAGE_ACCESS` access bits.
pub mod access {
    /// Read allowed.
    pub const R: u8 = 1;
    /// Write allowed.
    pub const W: u8 = 2;
    /// Execute allowed.
    pub const X: u8 = 4;
    /// Suppress #VE (libkvmi only).
    pub const SVE: u8 = 8;
}
