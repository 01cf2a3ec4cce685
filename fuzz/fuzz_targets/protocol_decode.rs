//! Arbitrary bytes through the KVMI frame parser and every v4 decoder.
//!
//! Whatever decodes must re-encode (into a buffer of exactly `*_len` bytes) and decode to
//! the same value; commands, replies and events must re-encode to the very same bytes (the
//! decoders accept only the canonical encoding). Two views of the input are tried: as a
//! stream of framed messages, and as `id (2 bytes) ‖ payload` fed to each decoder directly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::command::CommandKind;
use protocol::event::EventKind;
use protocol::frame::{Frame, HEADER_SIZE};
use protocol::wire::v4::V4;
use protocol::wire::{HostMessage, ToolMessage, WireProfile};

fn command_round_trip(id: u16, payload: &[u8]) {
    let Ok(command) = V4::decode_command(id, payload) else {
        return;
    };
    let len = V4::command_len(&command).expect("a decoded command has a length");
    let mut buf = vec![0u8; len];
    assert_eq!(V4::encode_command(1, &command, &mut buf), Ok(len));
    assert_eq!(
        &buf[HEADER_SIZE..],
        payload,
        "command re-encodes differently"
    );
    let frame = V4::parse_frame(&buf).expect("encoded command frames");
    assert_eq!(frame.header.id, id);
    assert_eq!(V4::decode_command(id, frame.payload), Ok(command));
}

fn reply_round_trip(kind: CommandKind, payload: &[u8]) {
    let Ok(result) = V4::decode_reply(kind, payload) else {
        return;
    };
    let len = V4::reply_len(kind, &result).expect("a decoded reply has a length");
    let mut buf = vec![0u8; len];
    assert_eq!(V4::encode_reply(kind, 2, &result, &mut buf), Ok(len));
    assert_eq!(&buf[HEADER_SIZE..], payload, "reply re-encodes differently");
    assert_eq!(V4::decode_reply(kind, &buf[HEADER_SIZE..]), Ok(result));
}

fn event_round_trip(payload: &[u8]) {
    let Ok(event) = V4::decode_event(payload) else {
        return;
    };
    let len = V4::event_len(&event);
    let mut buf = vec![0u8; len];
    assert_eq!(V4::encode_event(3, &event, &mut buf), Ok(len));
    assert_eq!(&buf[HEADER_SIZE..], payload, "event re-encodes differently");
    assert_eq!(V4::decode_event(&buf[HEADER_SIZE..]), Ok(event));
}

fn event_reply_round_trip(kind: EventKind, payload: &[u8]) {
    let Ok(reply) = V4::decode_event_reply(kind, payload) else {
        return;
    };
    let len = V4::event_reply_len(&reply).expect("a decoded event reply has a length");
    let mut buf = vec![0u8; len];
    assert_eq!(V4::encode_event_reply(4, &reply, &mut buf), Ok(len));
    assert_eq!(V4::decode_event_reply(kind, &buf[HEADER_SIZE..]), Ok(reply));
}

fn every_decoder(id: u16, payload: &[u8]) {
    command_round_trip(id, payload);
    for kind in CommandKind::ALL {
        reply_round_trip(kind, payload);
    }
    event_round_trip(payload);
    for kind in EventKind::ALL {
        event_reply_round_trip(kind, payload);
    }
}

fn framed(frame: Frame<'_>) {
    if let Ok(msg) = V4::decode_tool_message(frame) {
        match msg {
            ToolMessage::Command { .. } => command_round_trip(frame.header.id, frame.payload),
            ToolMessage::EventReply { payload, .. } => EventKind::ALL
                .into_iter()
                .for_each(|k| event_reply_round_trip(k, payload)),
        }
    }
    if let Ok(msg) = V4::decode_host_message(frame) {
        match msg {
            HostMessage::Event { .. } => event_round_trip(frame.payload),
            HostMessage::Reply {
                command, payload, ..
            } => reply_round_trip(command, payload),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = V4::parse_frame(data) {
        framed(frame);
    }
    let mut rest = data;
    while let Ok(Some((frame, next))) = V4::split_frame(rest) {
        framed(frame);
        rest = next;
    }
    if let [lo, hi, payload @ ..] = data {
        every_decoder(u16::from_le_bytes([*lo, *hi]), payload);
    }
});
