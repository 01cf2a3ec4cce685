//! Host-side encoders (replies to commands, events) and their tool-side decoders, which
//! follow libkvmi's reading rules, so the two can be checked against each other.

use core::mem::size_of;

use zerocopy::little_endian::{I32, U16, U32};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::event_layout::{EVENT_COMMON_MIN_SIZE, EVENT_COMMON_SIZE, EventCommon};
use super::frame::FrameError;
use super::layout::{ErrorCodeWire, GetRegistersReply};
use super::{MSG_SIZE, events, ids};
use crate::error::{EncodeError, ProtocolError};
use crate::frame::{HEADER_SIZE, Header};
use crate::kvm::KvmMsrEntry;

/// Largest reply payload: replies are bounded only by the header's `u16` size.
pub const MAX_REPLY_PAYLOAD: usize = u16::MAX as usize;

fn write_msg(
    id: u16,
    seq: u32,
    parts: &[&[u8]],
    max: usize,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    let size: usize = parts.iter().map(|p| p.len()).sum();
    if size > max {
        return Err(EncodeError::TooLarge { size, max });
    }
    let needed = HEADER_SIZE + size;
    let available = buf.len();
    let out = buf
        .get_mut(..needed)
        .ok_or(EncodeError::BufferTooSmall { needed, available })?;
    let hdr = Header {
        id,
        size: size as u16,
        seq,
    }
    .to_wire();
    let (h, mut rest) = out.split_at_mut(HEADER_SIZE);
    h.copy_from_slice(hdr.as_bytes());
    for p in parts {
        let (dst, tail) = rest.split_at_mut(p.len());
        dst.copy_from_slice(p);
        rest = tail;
    }
    Ok(needed)
}

/// Encode a reply to command `id`: the error code 0 and `data`.
pub fn encode_reply(id: u16, seq: u32, data: &[u8], buf: &mut [u8]) -> Result<usize, EncodeError> {
    let ec = ErrorCodeWire {
        err: I32::new(0),
        padding: U32::new(0),
    };
    write_msg(id, seq, &[ec.as_bytes(), data], MAX_REPLY_PAYLOAD, buf)
}

/// Encode an error reply to command `id` (any ID, known or not): `code` is the positive
/// `KVM_E*` value ([`super::errors`]), sent negated.
pub fn encode_error_reply(
    id: u16,
    seq: u32,
    code: i32,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    let ec = ErrorCodeWire {
        err: I32::new(-code),
        padding: U32::new(0),
    };
    write_msg(id, seq, &[ec.as_bytes()], MAX_REPLY_PAYLOAD, buf)
}

/// Encode the `GET_REGISTERS` reply: exactly `472 + 16·entries.len()` data bytes, with
/// `nmsrs` set to the number of entries (which must be the number requested, in order).
pub fn encode_get_registers_reply(
    seq: u32,
    fixed: &GetRegistersReply,
    entries: &[KvmMsrEntry],
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    let mut f = *fixed;
    f.nmsrs = U32::new(
        u32::try_from(entries.len()).map_err(|_| EncodeError::TooLarge {
            size: entries.len(),
            max: u16::MAX as usize,
        })?,
    );
    let ec = ErrorCodeWire {
        err: I32::new(0),
        padding: U32::new(0),
    };
    write_msg(
        ids::GET_REGISTERS,
        seq,
        &[ec.as_bytes(), f.as_bytes(), entries.as_bytes()],
        MAX_REPLY_PAYLOAD,
        buf,
    )
}

/// Encode an event: the 544-byte common part (its `size` field set to 544) followed by the
/// event's data, which must be exactly the size its event ID calls for.
pub fn encode_event(
    seq: u32,
    common: &EventCommon,
    data: &[u8],
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    let want = events::data_size(common.event).ok_or(EncodeError::Invalid(
        ProtocolError::SizeMismatch {
            what: "event data of an unknown event",
            expected: 0,
            got: data.len(),
        },
    ))?;
    if data.len() != want {
        return Err(EncodeError::Invalid(ProtocolError::SizeMismatch {
            what: "event data",
            expected: want,
            got: data.len(),
        }));
    }
    let mut c = *common;
    c.size = U16::new(EVENT_COMMON_SIZE as u16);
    write_msg(ids::EVENT, seq, &[c.as_bytes(), data], MSG_SIZE, buf)
}

/// A command reply as a tool reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolReply<'a> {
    /// 0 or a negated `KVM_E*` code.
    pub err: i32,
    /// The data after the error code (empty unless `err == 0`).
    pub data: &'a [u8],
}

/// Decode a reply payload (tool side).
pub fn decode_reply(payload: &[u8]) -> Result<ToolReply<'_>, FrameError> {
    let (ec, data) = ErrorCodeWire::read_from_prefix(payload).map_err(|_| FrameError::Size {
        id: 0xffff,
        expected: size_of::<ErrorCodeWire>(),
        got: payload.len(),
    })?;
    Ok(ToolReply {
        err: ec.err.get(),
        data,
    })
}

/// Decode an event payload as libkvmi does (tool side): `size` must be ≥ 8 and within the
/// payload; the common part is the first `min(size, 544)` bytes, zero-filled; the event data
/// starts at `size`; an unknown event ID is an error. Returns the common part and the data.
pub fn decode_event(payload: &[u8]) -> Result<(EventCommon, &[u8]), FrameError> {
    let bad = |what| FrameError::EventReply { event: 0xff, what };
    let (size, _) = U16::read_from_prefix(payload).map_err(|_| bad("event shorter than 2"))?;
    let size = size.get() as usize;
    if size < EVENT_COMMON_MIN_SIZE || size > payload.len() {
        return Err(bad("event common size out of range"));
    }
    let mut common = EventCommon::new_zeroed();
    let n = size.min(EVENT_COMMON_SIZE);
    common.as_mut_bytes()[..n].copy_from_slice(&payload[..n]);
    if events::data_size(common.event).is_none() {
        return Err(bad("unknown event ID"));
    }
    Ok((common, &payload[size..]))
}
