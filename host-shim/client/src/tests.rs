//! The client's reader against a hand-driven peer on a real socket pair: replies are matched
//! by seq while events queue, event replies are encoded for the host, garbage closes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use protocol::event::{EventCommon, EventMsrs};
use protocol::kvm::{KvmRegs, KvmSregs};
use protocol::reply::GuestInfo;
use protocol::types::CpuMode;
use protocol::{
    Action, Command, Event, EventPayload, Reply, ToolMessage, V4, WireProfile,
    event_reply::EventReplyData,
};

use super::{ClientError, KvmiClient};

fn read_message(peer: &mut UnixStream) -> Vec<u8> {
    let mut hdr = [0u8; 8];
    peer.read_exact(&mut hdr).unwrap();
    let size = u16::from_le_bytes([hdr[2], hdr[3]]) as usize;
    let mut msg = hdr.to_vec();
    msg.resize(8 + size, 0);
    peer.read_exact(&mut msg[8..]).unwrap();
    msg
}

fn msr_event() -> Event {
    Event {
        common: EventCommon {
            vcpu: 1,
            mode: CpuMode::Bits64,
            regs: KvmRegs::default(),
            sregs: KvmSregs::default(),
            msrs: EventMsrs::default(),
        },
        payload: EventPayload::Msr {
            msr: 0x174,
            old_value: 1,
            new_value: 2,
        },
    }
}

#[test]
fn replies_match_by_seq_while_events_queue_and_event_replies_encode() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let client = KvmiClient::from_stream(ours).unwrap();
    let host = std::thread::spawn(move || {
        let msg = read_message(&mut peer);
        let frame = V4::parse_frame(&msg).unwrap();
        let ToolMessage::Command { seq, command } = V4::decode_tool_message(frame).unwrap() else {
            panic!("expected a command")
        };
        assert_eq!(command, Command::GetGuestInfo);
        // An event crosses the reply on the wire.
        let mut out = vec![0u8; 4096];
        let n = V4::encode_event(77, &msr_event(), &mut out).unwrap();
        peer.write_all(&out[..n]).unwrap();
        let info = Reply::GuestInfo(GuestInfo {
            vcpu_count: 2,
            tsc_speed: 5,
        });
        let n = V4::encode_reply(command.kind(), seq, &Ok(info), &mut out).unwrap();
        peer.write_all(&out[..n]).unwrap();
        // The tool's event reply.
        let msg = read_message(&mut peer);
        let frame = V4::parse_frame(&msg).unwrap();
        let ToolMessage::EventReply { seq, payload } = V4::decode_tool_message(frame).unwrap()
        else {
            panic!("expected an event reply")
        };
        assert_eq!(seq, 77);
        let reply = V4::decode_event_reply(protocol::EventKind::Msr, payload).unwrap();
        assert_eq!(reply.action, Action::Continue);
        assert_eq!(reply.data, EventReplyData::Msr { new_val: 2 });
        peer
    });
    let info = client.get_guest_info().unwrap();
    assert_eq!((info.vcpu_count, info.tsc_speed), (2, 5));
    let ev = client.next_event(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(ev.seq, 77);
    assert_eq!(ev.event, msr_event());
    client.reply_continue(&ev).unwrap();
    let mut peer = host.join().unwrap();
    // Garbage closes the channel; a pending call fails with Closed instead of hanging.
    peer.write_all(&[0xff, 0xff, 0, 0, 1, 0, 0, 0]).unwrap(); // unknown message ID
    assert!(client.wait_closed(Duration::from_secs(5)));
    assert!(matches!(client.get_version(), Err(ClientError::Closed(_))));
}

#[test]
fn a_reply_with_an_unknown_seq_closes_the_channel() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let client = KvmiClient::from_stream(ours).unwrap();
    let mut out = [0u8; 64];
    let n = V4::encode_reply(
        protocol::CommandKind::PauseVcpu,
        999,
        &Ok(Reply::Empty),
        &mut out,
    )
    .unwrap();
    peer.write_all(&out[..n]).unwrap();
    assert!(client.wait_closed(Duration::from_secs(5)));
    assert!(client.closed().unwrap().contains("unknown seq 999"));
}

#[test]
fn error_replies_carry_the_kvm_code() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let client = KvmiClient::from_stream(ours).unwrap();
    let host = std::thread::spawn(move || {
        let msg = read_message(&mut peer);
        let frame = V4::parse_frame(&msg).unwrap();
        let ToolMessage::Command { seq, command } = V4::decode_tool_message(frame).unwrap() else {
            panic!()
        };
        let mut out = [0u8; 64];
        let n = V4::encode_reply(
            command.kind(),
            seq,
            &Err(protocol::ErrorCode::Perm),
            &mut out,
        )
        .unwrap();
        peer.write_all(&out[..n]).unwrap();
        peer
    });
    let err = client.write_physical(0x1000, &[1]).unwrap_err();
    assert_eq!(err.kvm_code(), Some(protocol::ErrorCode::Perm));
    drop(host.join().unwrap());
}
