//! End-to-end: a hostile or broken tool. Each bad input gets the documented error code or a
//! closed channel, and the VM keeps running (a fresh tool can attach and sees it progress).

use std::time::Duration;

use kvmi::images::Image;
use kvmi_client::{ClientError, KvmiClient};
use kvmi_tests::socket_target::{Target, assert_still_running};
use protocol::event_reply::EventReplyData;
use protocol::{Action, ErrorCode, EventKind};

const CLOSE_WAIT: Duration = Duration::from_secs(10);

fn spinning() -> Target {
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    assert!(
        t.wait_serial("spinning", Duration::from_secs(30)),
        "{}",
        t.stderr()
    );
    t
}

/// The raw call was refused with `code`, or the host closed the channel.
fn refused_or_closed(c: &KvmiClient, result: Result<(i32, Vec<u8>), ClientError>, code: ErrorCode) {
    match result {
        Ok((err, _)) => assert_eq!(err, code.wire(), "wrong error code"),
        Err(ClientError::Closed(_)) => assert!(c.wait_closed(CLOSE_WAIT)),
        Err(e) => panic!("neither an error reply nor a closed channel: {e}"),
    }
}

#[test]
fn garbage_frame_closes_the_channel_and_the_vm_runs_on() {
    if !kvmi_tests::require_kvm("garbage_frame_closes_the_channel_and_the_vm_runs_on") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    // A whole frame of noise under an unknown ID: -KVM_ENOSYS (or a closed channel).
    let noise: Vec<u8> = (0..40u32)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8)
        .collect();
    let r = c.call_raw(0xabcd, &noise);
    refused_or_closed(&c, r, ErrorCode::NoSys);
    // Then an event-reply frame of 5 junk bytes that answers no event: the channel closes.
    c.send_raw(&[24, 0, 5, 0, 0x11, 0x22, 0x33, 0x44, 1, 2, 3, 4, 5])
        .ok();
    assert!(
        c.wait_closed(CLOSE_WAIT),
        "host kept a channel that sent garbage"
    );
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn wrong_payload_size_is_refused() {
    if !kvmi_tests::require_kvm("wrong_payload_size_is_refused") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    // READ_PHYSICAL (13) needs 16 bytes; send 12.
    let r = c.call_raw(13, &[0u8; 12]);
    refused_or_closed(&c, r, ErrorCode::Inval);
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn non_zero_padding_is_refused() {
    if !kvmi_tests::require_kvm("non_zero_padding_is_refused") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    // CONTROL_EVENTS (17): {u16 vcpu; u16 padding; u32 events} with padding = 1.
    let payload = [0, 0, 1, 0, 0, 0, 0, 0];
    let r = c.call_raw(17, &payload);
    refused_or_closed(&c, r, ErrorCode::Inval);
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn unknown_command_id_gets_enosys() {
    if !kvmi_tests::require_kvm("unknown_command_id_gets_enosys") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    let r = c.call_raw(99, &[]);
    refused_or_closed(&c, r, ErrorCode::NoSys);
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn unknown_vcpu_is_refused_and_the_channel_stays_open() {
    if !kvmi_tests::require_kvm("unknown_vcpu_is_refused_and_the_channel_stays_open") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    for r in [
        c.get_registers(7, &[]).map(|_| ()),
        c.pause_vcpu(7),
        c.control_events(7, protocol::event::EventSet::EMPTY),
        c.inject_exception(7, 6, None, 0),
    ] {
        assert_eq!(r.unwrap_err().kvm_code(), Some(ErrorCode::Inval));
    }
    assert!(c.closed().is_none());
    assert_eq!(c.get_guest_info().unwrap().vcpu_count, 1);
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn out_of_range_gpa_is_refused_and_the_channel_stays_open() {
    if !kvmi_tests::require_kvm("out_of_range_gpa_is_refused_and_the_channel_stays_open") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    let beyond = 1u64 << 40;
    assert!(c.read_physical(beyond, 8).unwrap_err().kvm_code().is_some());
    assert!(
        c.write_physical(beyond, &[1, 2])
            .unwrap_err()
            .kvm_code()
            .is_some()
    );
    let e = c
        .set_page_access(
            0,
            &[protocol::types::PageAccessEntry {
                gpa: beyond,
                access: protocol::types::Access::R,
            }],
        )
        .unwrap_err();
    assert!(e.kvm_code().is_some(), "{e}");
    // Crossing a page is refused by the codec on both sides: send it raw.
    let mut payload = Vec::new();
    payload.extend_from_slice(&0xfffu64.to_le_bytes());
    payload.extend_from_slice(&2u64.to_le_bytes());
    let r = c.call_raw(13, &payload);
    refused_or_closed(&c, r, ErrorCode::Inval);
    if c.closed().is_none() {
        assert_eq!(c.get_guest_info().unwrap().vcpu_count, 1);
    }
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn reply_to_an_event_never_sent_closes_the_channel() {
    if !kvmi_tests::require_kvm("reply_to_an_event_never_sent_closes_the_channel") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    c.reply_seq(
        0x00ab_cdef,
        EventKind::Breakpoint,
        Action::Continue,
        EventReplyData::None,
    )
    .unwrap();
    assert!(
        c.wait_closed(CLOSE_WAIT),
        "host accepted a reply to no event"
    );
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn tool_that_vanishes_mid_event_leaves_the_vm_running() {
    if !kvmi_tests::require_kvm("tool_that_vanishes_mid_event_leaves_the_vm_running") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    let paused = c.pause_all(Duration::from_secs(10)).unwrap();
    assert_eq!(paused.len(), 1);
    drop(paused);
    c.close(); // never answers the pause event
    assert_still_running(&mut t);
}

#[test]
fn wrong_size_reply_to_a_real_event_closes_and_releases_the_vcpu() {
    if !kvmi_tests::require_kvm("wrong_size_reply_to_a_real_event_closes_and_releases_the_vcpu") {
        return;
    }
    let mut t = spinning();
    let c = t.attach();
    let paused = c.pause_all(Duration::from_secs(10)).unwrap();
    let seq = paused[0].seq;
    // KVMI_EVENT_REPLY (24) for the pause event: {u32 action; u32 padding} plus 3 stray bytes.
    let mut frame = vec![24, 0, 11, 0];
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9]);
    c.send_raw(&frame).unwrap();
    assert!(
        c.wait_closed(CLOSE_WAIT),
        "host accepted a reply of the wrong size"
    );
    c.close();
    assert_still_running(&mut t);
}

#[test]
fn the_client_is_shareable_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<KvmiClient>();
    if !kvmi_tests::require_kvm("the_client_is_shareable_between_threads") {
        return;
    }
    let t = spinning();
    let c = t.attach();
    let counter = t.sym("probe_counter");
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            (0..50)
                .map(|_| c.read_physical(counter, 8).unwrap().len())
                .sum::<usize>()
        });
        let pauser = s.spawn(|| {
            let p = c.pause_all(Duration::from_secs(10)).unwrap();
            let regs = c.get_registers(0, &[]).unwrap();
            c.resume(&p).unwrap();
            regs.regs.rip.get()
        });
        assert_eq!(reader.join().unwrap(), 400);
        assert_ne!(pauser.join().unwrap(), 0);
    });
}
