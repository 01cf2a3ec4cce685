//! End-to-end: every KVMI command through a real `kvmi run --kvmi-socket` VM, asserting on
//! the reply and on its effect in the guest.

use std::time::Duration;

use kvmi::images::Image;
use kvmi_tests::socket_target::{Target, read_u64};
use kvmi_tests::wait;
use protocol::masks::AllowedMasks;
use protocol::types::{Access, PageAccessEntry};
use protocol::{CommandKind, ErrorCode, EventKind};

const EXIT_WAIT: Duration = Duration::from_secs(30);

#[test]
fn get_version_reports_what_this_host_delivers() {
    if !kvmi_tests::require_kvm("get_version_reports_what_this_host_delivers") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    let v = c.get_version().unwrap();
    assert_eq!(v.version, 1);
    let m = v.allowed;
    for kind in [
        CommandKind::GetVersion,
        CommandKind::GetGuestInfo,
        CommandKind::PauseVcpu,
        CommandKind::GetRegisters,
        CommandKind::SetRegisters,
        CommandKind::ReadPhysical,
        CommandKind::WritePhysical,
        CommandKind::SetPageAccess,
        CommandKind::GetPageAccess,
        CommandKind::ControlEvents,
        CommandKind::InjectException,
        CommandKind::GetMapToken,
    ] {
        assert!(m.allows_command(kind), "{kind:?} missing from {m:?}");
    }
    // Stock KVM cannot deliver CR or #VE interception: reported honestly.
    assert!(!m.allows_command(CommandKind::ControlCr));
    assert!(!m.allows_command(CommandKind::ControlVe));
    for kind in [EventKind::Cr, EventKind::Xsetbv, EventKind::Descriptor] {
        assert!(!m.allows_event(kind), "{kind:?} claimed");
    }
    for kind in [
        EventKind::PageFault,
        EventKind::PauseVcpu,
        EventKind::Hypercall,
    ] {
        assert!(m.allows_event(kind), "{kind:?} missing");
    }
    // And the unsupported commands fail, without touching the channel.
    let cr = c.control_cr(0, 3, true).unwrap_err();
    assert!(cr.kvm_code().is_some(), "{cr}");
    let ve = c.control_ve(0, &[0x1000], true).unwrap_err();
    assert!(ve.kvm_code().is_some(), "{ve}");
    assert!(c.closed().is_none());
}

#[test]
fn operator_restrictions_narrow_the_masks_and_refuse_with_eperm() {
    if !kvmi_tests::require_kvm("operator_restrictions_narrow_the_masks_and_refuse_with_eperm") {
        return;
    }
    let t = Target::start(
        Image::TestGuest,
        "mode=spin",
        &[
            "--allow-commands",
            "get_guest_info,read_physical",
            "--allow-events",
            "msr",
        ],
    );
    let c = t.attach();
    let m: AllowedMasks = c.get_version().unwrap().allowed;
    assert!(m.allows_command(CommandKind::ReadPhysical));
    assert!(!m.allows_command(CommandKind::WritePhysical));
    assert!(m.allows_event(EventKind::Msr));
    assert!(!m.allows_event(EventKind::PageFault));
    // Always allowed, though the operator's lists omit them: the bits are in the reply
    // (`allows_*` would say yes for these two even without them).
    let always = AllowedMasks::always();
    assert_eq!(m.commands & always.commands, always.commands, "{m:?}");
    assert_eq!(m.events & always.events, always.events, "{m:?}");
    assert_eq!(
        c.write_physical(t.sym("scratch_page"), &[1])
            .unwrap_err()
            .kvm_code(),
        Some(ErrorCode::Perm)
    );
    assert_eq!(c.read_physical(t.sym("scratch_page"), 8).unwrap().len(), 8);
    assert_eq!(c.get_guest_info().unwrap().vcpu_count, 1);
}

#[test]
fn guest_info_counts_vcpus_and_cpuid_matches_the_guest_view() {
    if !kvmi_tests::require_kvm("guest_info_counts_vcpus_and_cpuid_matches_the_guest_view") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &["--vcpus", "2"]);
    let c = t.attach();
    let info = c.get_guest_info().unwrap();
    assert_eq!(info.vcpu_count, 2);
    let leaf0 = c.get_cpuid(0, 0, 0).unwrap();
    // SAFETY-free: the host's own vendor string; KVM passes it through to the guest.
    let host = std::arch::x86_64::__cpuid(0);
    assert_eq!(
        (leaf0.ebx, leaf0.edx, leaf0.ecx),
        (host.ebx, host.edx, host.ecx),
        "vendor string"
    );
    assert!(leaf0.eax >= 1);
    let leaf1 = c.get_cpuid(0, 1, 0).unwrap();
    assert_ne!(leaf1.edx & (1 << 0), 0, "FPU bit");
    // In mode=spin vCPU 1 halts at boot and its thread ends: while it lives it answers with
    // the same feature bits, afterwards the command is refused with -EAGAIN (never anything
    // else).
    match c.get_cpuid(1, 1, 0) {
        Ok(other) => assert_eq!(other.edx, leaf1.edx, "vCPU 1's leaf 1 feature bits"),
        Err(e) => assert_eq!(e.kvm_code(), Some(ErrorCode::Again), "vCPU 1: {e}"),
    }
    assert!(c.get_cpuid(9, 0, 0).is_err(), "vCPU 9 does not exist");
}

#[test]
fn registers_and_xsave_of_a_paused_vcpu() {
    if !kvmi_tests::require_kvm("registers_and_xsave_of_a_paused_vcpu") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    assert!(t.wait_serial("spinning", Duration::from_secs(20)));
    let paused = c.pause_all(Duration::from_secs(10)).unwrap();
    let text = t.profile.range("kernel_text").expect("range.kernel_text");
    let r = c.get_registers(0, &[0xc000_0080]).unwrap();
    let rip = r.regs.rip.get();
    assert!(
        (text.start..text.end).contains(&rip),
        "rip {rip:#x} outside kernel text"
    );
    assert_eq!(r.mode, protocol::types::CpuMode::Bits64);
    assert_eq!(r.sregs.cs.dpl, 0);
    assert_eq!(r.msrs.len(), 1);
    assert_eq!(r.msrs[0].index, 0xc000_0080);
    assert_eq!(r.msrs[0].data & (1 << 10), 1 << 10, "EFER.LMA");
    assert_eq!(r.msrs[0].data, r.sregs.efer.get());
    let xsave = c.get_xsave(0).unwrap();
    assert!(
        xsave.len() >= 512 && xsave.len().is_multiple_of(4),
        "{} bytes",
        xsave.len()
    );
    c.resume(&paused).unwrap();
}

#[test]
fn write_physical_is_what_the_guest_reads_and_read_physical_sees_guest_writes() {
    if !kvmi_tests::require_kvm(
        "write_physical_is_what_the_guest_reads_and_read_physical_sees_guest_writes",
    ) {
        return;
    }
    let mut t = Target::start(Image::TestGuest, "mode=mem-read n=4 gate=1", &[]);
    let c = t.attach();
    let page = t.sym("scratch_page");
    let words: Vec<u8> = [0x10u64, 0x200, 0x3000, 0x4_0000]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    c.write_physical(page, &words).unwrap();
    assert_eq!(c.read_physical(page, 32).unwrap(), words);
    t.open_gate(&c);
    assert_eq!(t.wait_exit(EXIT_WAIT), Some(0), "{}", t.stderr());
    assert!(
        t.serial().contains("mem-read n=4 sum=0x43210"),
        "{}",
        t.serial()
    );

    // `hold=1`: after its writes the guest prints `holding` and spins, so the VM is still
    // there to be read.
    let mut t2 = Target::start(Image::TestGuest, "mode=mem-write n=2 hold=1", &[]);
    let c2 = t2.attach();
    assert!(
        t2.wait_serial("holding", Duration::from_secs(20)),
        "{}",
        t2.serial()
    );
    assert!(
        t2.serial().contains("mem-write n=2 last=0x5ca10001"),
        "{}",
        t2.serial()
    );
    // Words 0 and 1 as the guest wrote them; word 2 untouched.
    let expected: Vec<u8> = [0x5ca1_0000u64, 0x5ca1_0001, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    assert_eq!(
        c2.read_physical(t2.sym("scratch_page"), 24).unwrap(),
        expected
    );
    assert!(t2.running(), "the held guest is still running");
}

#[test]
fn page_access_set_many_get_back_and_lift() {
    if !kvmi_tests::require_kvm("page_access_set_many_get_back_and_lift") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    // Pages the host never walks for the guest (the scratch page's neighbours hold the IDT,
    // which cannot lose R: that refusal has its own test in `survival`).
    let rodata = t
        .profile
        .range("kernel_rodata")
        .expect("range.kernel_rodata");
    let gpas = [t.sym("scratch_page"), rodata.start, rodata.start + 0x1000];
    assert!(gpas[2] < rodata.end, "kernel rodata has two pages");
    let rights = [Access::R, Access::R.union(Access::X), Access::NONE];
    let entries: Vec<PageAccessEntry> = gpas
        .iter()
        .zip(rights)
        .map(|(&gpa, access)| PageAccessEntry { gpa, access })
        .collect();
    c.set_page_access(0, &entries).unwrap();
    assert_eq!(c.get_page_access(0, &gpas).unwrap(), rights.to_vec());
    let lift: Vec<PageAccessEntry> = gpas
        .iter()
        .map(|&gpa| PageAccessEntry {
            gpa,
            access: Access::RWX,
        })
        .collect();
    c.set_page_access(0, &lift).unwrap();
    assert_eq!(c.get_page_access(0, &gpas).unwrap(), vec![Access::RWX; 3]);
    // Reads through the channel still work on a no-access page.
    c.set_page_access(0, &entries[2..]).unwrap();
    assert_eq!(c.read_physical(gpas[2], 8).unwrap().len(), 8);
}

#[test]
fn page_access_write_without_read_is_refused_and_leaves_no_trace() {
    if !kvmi_tests::require_kvm("page_access_write_without_read_is_refused_and_leaves_no_trace") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    let rodata = t
        .profile
        .range("kernel_rodata")
        .expect("range.kernel_rodata");
    let gpas = [rodata.start, rodata.start + 0x1000, t.sym("scratch_page")];
    assert!(gpas[1] < rodata.end, "kernel rodata has two pages");
    let entry = |gpa, access| PageAccessEntry { gpa, access };
    // -w- and -wx are refused; the valid entries around them still apply, in order.
    let entries = [
        entry(gpas[0], Access::W),
        entry(gpas[1], Access::R),
        entry(gpas[2], Access::W.union(Access::X)),
    ];
    let err = c.set_page_access(0, &entries).unwrap_err();
    assert_eq!(err.kvm_code(), Some(ErrorCode::Inval));
    assert_eq!(
        c.get_page_access(0, &gpas).unwrap(),
        vec![Access::RWX, Access::R, Access::RWX]
    );
}

#[test]
fn control_msr_refuses_x2apic_msrs() {
    if !kvmi_tests::require_kvm("control_msr_refuses_x2apic_msrs") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    if !c
        .get_version()
        .unwrap()
        .allowed
        .allows_command(CommandKind::ControlMsr)
    {
        eprintln!("skipped: no MSR filter on this host");
        return;
    }
    // KVM's MSR filter does not apply to x2APIC MSRs: no event could ever come.
    for msr in [0x800, 0x830, 0x8ff] {
        assert_eq!(
            c.control_msr(0, msr, true).unwrap_err().kvm_code(),
            Some(ErrorCode::Inval),
            "{msr:#x}"
        );
    }
    c.control_msr(0, 0x7ff, true).unwrap();
    c.control_msr(0, 0x900, true).unwrap();
}

#[test]
fn map_tokens_are_random_distinct_and_limited() {
    if !kvmi_tests::require_kvm("map_tokens_are_random_distinct_and_limited") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    let mut tokens = Vec::new();
    let mut again = None;
    for _ in 0..9 {
        match c.get_map_token() {
            Ok(tok) => tokens.push(tok),
            Err(e) => {
                again = e.kvm_code();
                break;
            }
        }
    }
    assert_eq!(tokens.len(), 8, "at most 8 outstanding tokens");
    assert_eq!(again, Some(ErrorCode::Again));
    for (i, a) in tokens.iter().enumerate() {
        assert_ne!(a.0, [0u8; 32]);
        for b in &tokens[i + 1..] {
            assert_ne!(a.0, b.0);
        }
    }
}

#[test]
fn pause_vcpu_freezes_the_guest_until_the_event_is_answered() {
    if !kvmi_tests::require_kvm("pause_vcpu_freezes_the_guest_until_the_event_is_answered") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    assert!(t.wait_serial("spinning", Duration::from_secs(20)));
    let counter = t.sym("probe_counter");
    c.pause_vcpu(0).unwrap();
    let ev = c
        .next_event_of(EventKind::PauseVcpu, Duration::from_secs(10))
        .unwrap()
        .expect("PAUSE_VCPU event");
    assert_eq!(ev.event.common.vcpu, 0);
    let frozen = read_u64(&c, counter);
    // Time passes while the event is unanswered: the counter must not move (shown positively
    // below: it moves once the event is answered).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read_u64(&c, counter), frozen);
    c.reply_continue(&ev).unwrap();
    wait::until(EXIT_WAIT, "the counter to move after the reply", || {
        read_u64(&c, counter) > frozen
    });
}

#[test]
fn set_registers_outside_an_event_is_refused() {
    if !kvmi_tests::require_kvm("set_registers_outside_an_event_is_refused") {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    let regs = c.get_registers(0, &[]).unwrap().regs;
    let err = c.set_registers(0, &regs).unwrap_err();
    assert!(err.kvm_code().is_some(), "{err}");
    assert!(c.closed().is_none());
}

#[test]
fn vm_connects_to_a_listening_tool_with_kvmi_connect() {
    if !kvmi_tests::require_kvm("vm_connects_to_a_listening_tool_with_kvmi_connect") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvmi-e2e-connect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tool.sock");
    let listener = kvmi_client::KvmiClient::listen(&path).unwrap();
    let mut vm = std::process::Command::new(kvmi_tests::kvmi_bin())
        .args([
            "run",
            "--image",
            "test-guest",
            "--cmdline",
            "mode=spin",
            "--timeout",
            "60",
        ])
        .arg("--kvmi-connect")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = kvmi_client::KvmiClient::accept_on(&listener, Duration::from_secs(30));
    let result = c.and_then(|c| c.get_guest_info());
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(result.unwrap().vcpu_count, 1);
}

#[test]
fn hardware_breakpoint_slots_are_limited_and_clearing_an_unset_one_fails() {
    if !kvmi_tests::require_kvm(
        "hardware_breakpoint_slots_are_limited_and_clearing_an_unset_one_fails",
    ) {
        return;
    }
    let t = Target::start(Image::TestGuest, "mode=spin", &[]);
    let c = t.attach();
    let text = t.profile.range("kernel_text").expect("range.kernel_text");
    for i in 0..4 {
        c.control_breakpoint(None, text.start + i, true).unwrap();
    }
    let busy = c
        .control_breakpoint(None, text.start + 4, true)
        .unwrap_err();
    assert_eq!(busy.kvm_code(), Some(ErrorCode::Busy));
    let none = c
        .control_breakpoint(None, text.start + 5, false)
        .unwrap_err();
    assert_eq!(none.kvm_code(), Some(ErrorCode::NoEnt));
    c.control_breakpoint(None, text.start, false).unwrap();
    c.control_breakpoint(None, text.start + 4, true).unwrap();
}
