//! The host-agent backend end to end (real KVM target, real unix socket, real memfds): the
//! agent is guest-driver's `HostAgent` in this process, exactly as a host tool would use it.

use std::time::Duration;

use appliance_link::host_socket::HostSocketServer;
use guest_driver::DriverError;
use guest_driver::host::HostAgent;
use hypercall::error::HcError;
use hypercall::token::MapToken;
use kvmi::images::Image;
use kvmi_engine::{Introspector, IntrospectorConfig, temp_socket_path};
use kvmi_tests::wait;
use vmm::{RunLimits, SerialSink, SharedBuffer, Vm, VmConfig};

const TARGET_BASE: u64 = 0x200_0000;

#[test]
fn a_host_agent_maps_target_pages_over_the_socket() {
    if !kvmi_tests::require_kvm("a_host_agent_maps_target_pages_over_the_socket") {
        return;
    }
    let caps = vmm::probe::cached_capabilities().expect("probe");
    let config = VmConfig {
        name: "host-agent-target".into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: "mode=spin".into(),
        unknown_io: vmm::UnknownIoPolicy::Ignore,
    };
    let mut target = Vm::new(config, kvmi_tests::common::elf(Image::TestGuest)).unwrap();
    target.set_serial(SerialSink::Buffer(SharedBuffer::new()));
    let intro = Introspector::install(&mut target, caps, IntrospectorConfig::default()).unwrap();
    for page in 0..4u64 {
        target
            .ram()
            .write(TARGET_BASE + page * 4096, &[0xC0 + page as u8; 4096])
            .unwrap();
    }
    let ram = target.ram().clone();
    let running = target.start().unwrap();
    intro.set_handle(running.handle());
    let path = temp_socket_path("host-agent");
    let server = HostSocketServer::start(intro.clone(), ram.clone(), 1, &path, 1 << 20).unwrap();

    let agent = HostAgent::connect(&path).expect("handshake");
    assert_eq!(
        agent.discovery.window_gpa,
        appliance_link::launch::MAP_WINDOW_GPA
    );
    wait::until(
        Duration::from_secs(5),
        "the agent's rings to attach",
        || intro.is_attached(),
    );
    let token = intro.tokens().issue().unwrap();
    {
        let page = agent
            .window
            .map(&token, TARGET_BASE + 4096)
            .expect("MEM_MAP");
        assert_eq!(page.to_array(), [0xC1; 4096]);
        // Replayed token.
        match agent.window.map(&token, TARGET_BASE) {
            Err(DriverError::Hypercall(e)) => assert_eq!(e, HcError::BadToken),
            other => panic!("replay must be refused: {other:?}"),
        }
        let forged = MapToken::new([1, 2, 3, 4]);
        assert!(agent.window.map(&forged, TARGET_BASE).is_err());
        let range_token = intro.tokens().issue().unwrap();
        let range = agent
            .window
            .map_range(&range_token, TARGET_BASE, 4)
            .expect("MAP_RANGE");
        let bytes = range.to_vec();
        for p in 0..4 {
            assert!(
                bytes[p * 4096..(p + 1) * 4096]
                    .iter()
                    .all(|b| *b == 0xC0 + p as u8)
            );
        }
        // Out of range.
        let t = intro.tokens().issue().unwrap();
        match agent.window.map(&t, ram.size()) {
            Err(DriverError::Hypercall(e)) => assert_eq!(e, HcError::OutOfRange),
            other => panic!("out-of-range must be refused: {other:?}"),
        }
    }
    drop(agent);
    wait::until(
        Duration::from_secs(5),
        "closing the socket to detach the agent",
        || !intro.is_attached(),
    );
    assert!(!running.handle().has_ended(), "the target runs on");
    server.stop();
    running.handle().stop();
    let _ = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(5)),
        interrupt: None,
    });
}
