//! The KVMI wire protocol: messages, codec, validation and permission masks.
//!
//! This crate is the byte-level contract between the host shim (which plays KVM's part of
//! KVMI) and introspection tools (on a socket, or in the appliance VM over shared-memory
//! rings, which carry the same messages). It does no I/O, allocates nothing and contains no
//! `unsafe`: decoders return views borrowed from the receive buffer, encoders write into the
//! caller's `&mut [u8]`. It is `no_std` (std only for its tests).
//!
//! # Layers
//!
//! - Semantic types, independent of any numbering: [`command::Command`] /
//!   [`command::CommandKind`], [`reply::Reply`] (with [`reply::CommandResult`] =
//!   `Result<Reply, ErrorCode>`), [`event::Event`] (common vCPU state + typed
//!   [`event::EventPayload`]), [`event_reply::EventReply`] ([`event_reply::Action`] + typed
//!   data). KVM's own structs are mirrored byte-exactly in [`kvm`].
//! - Wire profiles ([`wire::WireProfile`]): numbering and layouts. [`wire::v4::V4`] is the
//!   RFC v4 (Dec 2017) ABI plus this project's extensions; every struct is in
//!   [`wire::v4::layout`] / [`wire::v4::event_layout`], built from zerocopy little-endian
//!   types (so `Unaligned`, viewable at any offset) with compile-time size/offset asserts.
//!   The later KVM-VMI `kvmi-v7` ABI (docs/protocol.md) would be a second implementation of
//!   the trait; the semantic types do not change.
//! - Framing ([`frame`]): `kvmi_msg_hdr { u16 id; u16 size; u32 seq; }` (8 bytes) followed
//!   by `size` payload bytes; the v4 maximum is [`wire::v4::MAX_MSG_SIZE`] = 8 + 65 535.
//! - Policy: [`masks::AllowedMasks`] (the `GET_VERSION` masks and the `-KVM_EPERM` check) and
//!   [`event_reply::accepted_actions`] (which actions each event accepts).
//!
//! # Wire format (v4)
//!
//! Commands (tool → host) carry their command ID; the reply reuses the ID and `seq` and
//! starts with `kvmi_error_code { s32 err; u32 padding; }`, followed by data only when
//! `err == 0`. Events (host → tool) have ID 23 (`KVMI_EVENT`): the 528-byte `kvmi_event`
//! (event bit, vCPU, mode, `kvm_regs`, `kvm_sregs`, eight MSRs incl. `cstar` and `pat`), then
//! the event's payload. Event replies have ID 24 (`KVMI_EVENT_REPLY`) and the event's `seq`:
//! `kvmi_event_reply { u32 action; u32 padding; }` then the event's reply data (CR/MSR:
//! `new_val`; PF: 264 bytes `{trap_access, ctx_size, ctx_data[256]}`). Integers are little
//! endian. Error codes are the `KVM_E*` values ([`error::ErrorCode`]), negated on the wire.
//!
//! v4 command IDs: GET_VERSION 1, PAUSE_VCPU 2, GET_GUEST_INFO 3, GET_REGISTERS 6,
//! SET_REGISTERS 7, GET_PAGE_ACCESS 10, SET_PAGE_ACCESS 11, INJECT_EXCEPTION 12,
//! READ_PHYSICAL 13, WRITE_PHYSICAL 14, GET_MAP_TOKEN 15, CONTROL_EVENTS 17, CONTROL_CR 18,
//! CONTROL_MSR 19, GET_CPUID 25, GET_XSAVE 26. Event bits: CR 1<<1, MSR 1<<2, XSETBV 1<<3,
//! BREAKPOINT 1<<4, HYPERCALL 1<<5, PAGE_FAULT 1<<6, TRAP 1<<7, DESCRIPTOR 1<<8,
//! CREATE_VCPU 1<<9, PAUSE_VCPU 1<<10. Actions: CONTINUE (v3 ALLOW) 1<<0, RETRY 1<<1,
//! CRASH 1<<2.
//!
//! ## This project's extensions (numbers v4 lacks)
//!
//! - Action **SKIP = 1<<3**, with v3's meaning: the tool emulated the operation itself
//!   (advanced RIP, changed registers/memory); the host drops the access and re-enters the
//!   guest. Accepted by PF, BREAKPOINT, MSR and SINGLESTEP events.
//! - Event **SINGLESTEP = 1<<11** (documented but unnumbered in v4; no payload, no reply data).
//! - Command **CONTROL_VE = 20** (documented but unnumbered in v4):
//!   `{u16 vcpu; u16 count; u8 enable; u8 padding[3]; u64 gpa[count]}` → error code.
//! - Command **CONTROL_BREAKPOINT = 21**: `{u16 vcpu (0xffff = all vCPUs); u8 enable;
//!   u8 padding1; u32 padding2; u64 gva}` (16 B) → error code. Sets or clears an execution
//!   breakpoint the host implements with hardware debug registers where INT3 exits are not
//!   available; `-KVM_EBUSY` when no slot is free, `-KVM_ENOENT` when clearing one not set.
//! - `PAUSE_VCPU` events also accept CONTINUE (as from v5: resume after the pause).
//!
//! Every command ID is ≤ 32, so command *n* is bit *n − 1* of the allowed-command mask.
//!
//! # Validation
//!
//! Decoders check everything before returning a value, and encoders check the same rules
//! (so anything that encodes, decodes back to itself):
//! - sizes: a payload must be exactly its fixed part plus its arrays; non-zero padding,
//!   size mismatches and array counts that overrun the message are `-KVM_EINVAL`; a
//!   `GET_REGISTERS` asking for more MSRs than a reply can carry is `-KVM_E2BIG`;
//! - unknown command IDs and event bits are `-KVM_ENOSYS`;
//! - field domains are `-KVM_EINVAL`: `CONTROL_CR` cr ∉ {0, 3, 4}; `CONTROL_MSR` outside
//!   0–0x1fff and 0xc0000000–0xc0001fff; `READ/WRITE_PHYSICAL` of 0 bytes or crossing a page;
//!   an access byte with bits other than rwx; an event mask with unknown bits; flags other
//!   than 0/1; exception vectors ≥ 32; CPU modes other than 2/4/8; an event reply action that
//!   is not exactly one known bit, or not accepted by the event;
//! - the allowed masks are checked by the host with [`masks::AllowedMasks::check_command`] /
//!   [`masks::AllowedMasks::check_event_set`] (`-KVM_EPERM`).
//!
//! Errors are [`error::ProtocolError`]; [`error::ProtocolError::code`] gives the wire code to
//! put in the reply. Values the host must judge (a vCPU index, an EPT view, a GPA's
//! existence) are left to the host.
//!
//! # Example: a tool's command, the host's side and the reply
//!
//! ```
//! use protocol::command::{Command, CommandKind};
//! use protocol::error::ErrorCode;
//! use protocol::masks::AllowedMasks;
//! use protocol::reply::Reply;
//! use protocol::wire::v4::V4;
//! use protocol::wire::{HostMessage, ToolMessage, WireProfile};
//!
//! // Tool: encode READ_PHYSICAL into a buffer.
//! let cmd = Command::ReadPhysical { gpa: 0x1000, size: 4 };
//! let mut buf = [0u8; 64];
//! let n = V4::encode_command(7, &cmd, &mut buf)?;
//! assert_eq!(n, V4::command_len(&cmd)?);
//!
//! // Host: frame, classify, decode and check permissions.
//! let frame = V4::parse_frame(&buf[..n])?;
//! let ToolMessage::Command { seq, command } = V4::decode_tool_message(frame)? else {
//!     unreachable!()
//! };
//! assert_eq!(command, cmd);
//! let masks = AllowedMasks::from_kinds([CommandKind::ReadPhysical], []);
//! masks.check_command(command.kind())?;
//!
//! // Host: reply with the bytes read.
//! let data = [0xde, 0xad, 0xbe, 0xef];
//! let mut out = [0u8; 64];
//! let m = V4::encode_reply(command.kind(), seq, &Ok(Reply::Physical(&data)), &mut out)?;
//!
//! // Tool: match the reply by seq, decode it knowing what it answers.
//! let frame = V4::parse_frame(&out[..m])?;
//! let HostMessage::Reply { seq: 7, command: CommandKind::ReadPhysical, payload } =
//!     V4::decode_host_message(frame)?
//! else {
//!     unreachable!()
//! };
//! assert_eq!(V4::decode_reply(CommandKind::ReadPhysical, payload)?, Ok(Reply::Physical(&data)));
//!
//! // A failed command carries only the error code.
//! let m = V4::encode_reply(CommandKind::ReadPhysical, 8, &Err(ErrorCode::Inval), &mut out)?;
//! assert_eq!(&out[8..12], &(-22i32).to_le_bytes());
//! # let _ = m;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod command;
pub mod error;
pub mod event;
pub mod event_reply;
pub mod frame;
pub mod kvm;
pub mod list;
pub mod masks;
pub mod reply;
pub mod types;
pub mod wire;

pub use command::{Command, CommandKind};
pub use error::{EncodeError, ErrorCode, ProtocolError};
pub use event::{Event, EventKind, EventPayload};
pub use event_reply::{Action, EventReply, EventReplyData};
pub use reply::{CommandResult, Reply};
pub use wire::v4::V4;
pub use wire::{HostMessage, ToolMessage, WireProfile};
