//! Arbitrary bytes through the libkvmi (kvmi-v7) dialect's decoders, both ways.
//!
//! Input: `pending ‖ stream`. The first byte is the ID of the event a reply could answer;
//! the rest is the byte stream a hostile tool sends the host, read as the host reads it:
//!
//! 1. [`frame::split_tool_handshake`] takes the handshake answer off the front (an error is
//!    given its [`FrameError::disposition`] and ends the stream, as does "more bytes needed");
//! 2. then [`frame::split_tool_frame`] takes message after message off the rest, and every
//!    whole message goes through [`frame::decode_request`]. Every error's disposition is
//!    asked for: `Close` ends the stream, `Reply` skips the message (`8 + size` bytes) and
//!    goes on;
//! 3. an event reply is checked with [`frame::check_event_reply`] against every event ID
//!    0..=13 and against `pending`, and its data is read with [`frame::pf_reply`] and
//!    [`frame::new_val_reply`].
//!
//! Invariants asserted (what the module promises, see its docs and proptests.rs):
//! - a split message is 8 + `size` bytes, never more than [`MAX_MSG_SIZE`], and is the front
//!   of the buffer it was split from; the rest is what follows it; a `Reply` error leaves
//!   the whole message in the buffer to skip;
//! - the frame (and every slice in the decoded request) lies inside the message's bytes;
//! - every request that decodes re-encodes with [`frame::encode_request`]: to the very same
//!   bytes (for `GET_REGISTERS`, which ignores bytes after the MSR indices, to the same bytes
//!   minus those), which parse and decode back to an equal request;
//! - `check_event_reply` accepts only an action the event accepts and data no larger than
//!   its reply struct; `pf_reply` / `new_val_reply` are the data zero-filled (or cut).
//!
//! The tool half (what a tool decodes from a hostile VMM): the stream, whole and split into
//! VMM messages, goes through [`host::decode_event`] and [`host::decode_reply`]; an event
//! that decodes with data of its exact size re-encodes with [`host::encode_event`] and
//! decodes back to itself (common `size` 544).
#![no_main]

use std::mem::size_of_val;

use libfuzzer_sys::fuzz_target;
use protocol::frame::{HEADER_SIZE, Header, split_frame};
use protocol::wire::libkvmi::frame::{self, Disposition, FrameError, Request, ToolFrame};
use protocol::wire::libkvmi::{MAX_MSG_SIZE, MSG_SIZE, actions, events, handshake, host, ids};

/// Whether `inner` lies within `outer` (by address).
fn within<T, U>(inner: &[T], outer: &[U]) -> bool {
    let (start, end) = (
        outer.as_ptr() as usize,
        outer.as_ptr() as usize + size_of_val(outer),
    );
    let at = inner.as_ptr() as usize;
    inner.is_empty() || (at >= start && at + size_of_val(inner) <= end)
}

/// The disposition of an error (must not panic); whether the host goes on.
fn goes_on(e: &FrameError) -> bool {
    match e.disposition() {
        Disposition::Close => false,
        Disposition::Reply(code) => {
            assert!(code < 0, "{e:?}: reply code {code} not negated");
            true
        }
    }
}

/// The slices a request borrows lie inside its message.
fn check_slices(req: &Request<'_>, message: &[u8]) {
    let inside = match req {
        Request::GetRegisters { msrs, .. } => within(msrs, message),
        Request::WritePhysical { data, .. } => within(data, message),
        Request::SetPageAccess { entries, .. } => within(entries, message),
        Request::EventReply { data, .. } => within(data, message),
        Request::Other { body, .. } => within(body, message),
        _ => true,
    };
    assert!(inside, "{req:?} borrows bytes outside its message");
}

/// Re-encode a decoded request and decode it back.
fn round_trip(seq: u32, req: &Request<'_>, message: &[u8]) {
    let mut buf = vec![0u8; MAX_MSG_SIZE];
    let n = frame::encode_request(seq, req, &mut buf).expect("a decoded request encodes");
    let out = &buf[..n];
    match req {
        // Bytes after the MSR indices are ignored; the rest is the same.
        Request::GetRegisters { msrs, .. } => {
            assert!(n <= message.len(), "GET_REGISTERS re-encodes longer");
            assert_eq!(n, HEADER_SIZE + 16 + 4 * msrs.len());
            assert_eq!(out[..2], message[..2], "GET_REGISTERS id");
            assert_eq!(
                out[4..],
                message[4..n],
                "GET_REGISTERS re-encodes differently"
            );
        }
        _ => assert_eq!(out, message, "{req:?} re-encodes differently"),
    }
    if matches!(req, Request::Other { .. }) {
        return;
    }
    let f = frame::parse_tool_frame(out).expect("a re-encoded request parses");
    assert_eq!(f.seq, seq);
    let back = frame::decode_request(f).expect("a re-encoded request decodes");
    assert_eq!(&back, req, "request does not decode back to itself");
}

/// What the host does with an event reply, for every event it could be pending on.
fn event_reply(pending: u8, action: u8, data: &[u8]) {
    // The payload less the vCPU header and `kvmi_event_reply`.
    assert!(data.len() <= MSG_SIZE - 8 - 16);
    for ev in (0..events::COUNT).chain([pending]) {
        match frame::check_event_reply(ev, action, data) {
            Ok(()) => {
                assert!(actions::accepted(ev, action), "event {ev}: action {action}");
                let max = events::reply_data_size(ev).expect("a replied event has a reply size");
                assert!(
                    data.len() <= max,
                    "event {ev}: {} bytes of reply",
                    data.len()
                );
            }
            Err(e) => assert_eq!(e.disposition(), Disposition::Close),
        }
    }
    // Zero-filled (or cut) to the 272-byte PF reply / the 8-byte new value.
    let mut pf = [0u8; 272];
    let n = data.len().min(pf.len());
    pf[..n].copy_from_slice(&data[..n]);
    let r = frame::pf_reply(data);
    assert_eq!(r.ctx_addr.get().to_le_bytes(), pf[0..8]);
    assert_eq!(r.ctx_size.get().to_le_bytes(), pf[8..12]);
    assert_eq!([r.singlestep, r.rep_complete], pf[12..14]);
    assert_eq!(r.padding.get().to_le_bytes(), pf[14..16]);
    assert_eq!(r.ctx_data, pf[16..]);
    assert_eq!(frame::new_val_reply(data).to_le_bytes(), pf[..8]);
}

/// One whole message from the tool: decode it; whether the host goes on.
fn message(pending: u8, tf: ToolFrame<'_>, message: &[u8]) -> bool {
    let header = Header::parse(message).expect("a split message has a header");
    assert_eq!((tf.id, tf.seq), (header.id, header.seq));
    assert_eq!(tf.vcpu.is_some(), ids::has_vcpu_hdr(tf.id));
    let vh = if tf.vcpu.is_some() { 8 } else { 0 };
    assert_eq!(tf.body.len() + vh + HEADER_SIZE, message.len());
    assert!(within(tf.body, message));
    match frame::decode_request(tf) {
        Ok(req) => {
            check_slices(&req, message);
            if let Request::EventReply { action, data, .. } = req {
                event_reply(pending, action, data);
            }
            round_trip(tf.seq, &req, message);
            true
        }
        Err(e) => goes_on(&e),
    }
}

/// The host reading a tool's stream.
fn host_side(pending: u8, stream: &[u8]) {
    let mut rest = match frame::split_tool_handshake(stream) {
        Ok(Some((cookie, rest))) => {
            let used = stream.len() - rest.len();
            assert!((handshake::TOOL_SIZE..=handshake::VMM_MAX_SIZE).contains(&used));
            assert_eq!(
                used as u32,
                u32::from_le_bytes(stream[..4].try_into().unwrap())
            );
            assert_eq!(cookie, stream[4..24]);
            assert!(within(rest, stream) && rest.len() + used == stream.len());
            rest
        }
        Ok(None) => return,
        Err(e) => {
            assert_eq!(e.disposition(), Disposition::Close);
            return;
        }
    };
    while !rest.is_empty() {
        match frame::split_tool_frame(rest) {
            Ok(None) => break,
            Ok(Some((tf, next))) => {
                let used = rest.len() - next.len();
                assert!(
                    (HEADER_SIZE..=MAX_MSG_SIZE).contains(&used),
                    "{used}-byte message"
                );
                assert!(within(next, rest) && next.as_ptr() == rest[used..].as_ptr());
                let (whole, after) = rest.split_at(used);
                if !message(pending, tf, whole) {
                    break;
                }
                rest = after;
            }
            Err(e) => {
                if !goes_on(&e) {
                    break;
                }
                // The whole message is there; skip it.
                let header = Header::parse(rest).expect("a rejected message has a header");
                assert!(header.message_len() <= MAX_MSG_SIZE);
                rest = rest
                    .get(header.message_len()..)
                    .expect("a message answered in-band is whole");
            }
        }
    }
}

/// A tool reading a VMM's message payload.
fn tool_payload(payload: &[u8]) {
    if let Ok(reply) = host::decode_reply(payload) {
        assert!(within(reply.data, payload) && reply.data.len() + 8 == payload.len());
    }
    let Ok((common, data)) = host::decode_event(payload) else {
        return;
    };
    assert!(within(data, payload));
    if events::data_size(common.event) != Some(data.len()) {
        return;
    }
    let mut buf = vec![0u8; MAX_MSG_SIZE];
    let n = host::encode_event(7, &common, data, &mut buf).expect("a decoded event encodes");
    let (f, rest) = split_frame(&buf[..n], MAX_MSG_SIZE)
        .expect("an encoded event frames")
        .expect("whole");
    assert!(rest.is_empty());
    let (back, back_data) = host::decode_event(f.payload).expect("an encoded event decodes");
    assert_eq!(
        back.size.get(),
        544,
        "an encoded event's common part is 544 bytes"
    );
    let mut want = common;
    want.size = back.size;
    assert_eq!(back, want, "event does not decode back to itself");
    assert_eq!(back_data, data);
}

/// The tool reading a hostile VMM's stream.
fn tool_side(stream: &[u8]) {
    tool_payload(stream);
    let mut rest = stream;
    while let Ok(Some((f, next))) = split_frame(rest, MAX_MSG_SIZE) {
        tool_payload(f.payload);
        rest = next;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pending, stream)) = data.split_first() else {
        return;
    };
    host_side(pending, stream);
    tool_side(stream);
});
