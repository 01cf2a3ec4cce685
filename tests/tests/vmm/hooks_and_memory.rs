//! The exit hook, vCPU pause/resume and memfd-backed RAM, driven through the library API.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvmi::images::Image;
use kvmi_tests::wait;
use vmm::{
    ExitContext, ExitHook, HookResult, PioAccess, RunLimits, RunOutcome, SerialSink, SharedBuffer,
    Vm, VmConfig,
};

/// Answers every hypercall with `0x1234 + nr` and counts serial bytes.
#[derive(Default)]
struct Recorder {
    hypercalls: AtomicU64,
    serial_bytes: AtomicU64,
    last_nr: AtomicU64,
}

impl ExitHook for Recorder {
    fn pio(&self, _ctx: &mut ExitContext<'_>, io: &mut PioAccess<'_>) -> HookResult {
        if io.port == hypercall::ports::SERIAL_COM1 && io.write {
            self.serial_bytes
                .fetch_add(io.data.len() as u64, Ordering::Relaxed);
        }
        HookResult::Unhandled
    }

    fn hypercall(&self, ctx: &mut ExitContext<'_>) -> HookResult {
        let nr = ctx.regs().rax;
        self.hypercalls.fetch_add(1, Ordering::Relaxed);
        self.last_nr.store(nr, Ordering::Relaxed);
        ctx.regs_mut().rax = 0x1234 + nr;
        HookResult::Handled
    }
}

fn config(cmdline: &str) -> VmConfig {
    VmConfig {
        name: "test-hooks".into(),
        memory_bytes: 32 << 20,
        vcpus: 1,
        cmdline: cmdline.into(),
        ..VmConfig::default()
    }
}

#[test]
fn hook_answers_hypercalls_and_sees_serial_output() {
    if !kvmi_tests::require_kvm("hook_answers_hypercalls_and_sees_serial_output") {
        return;
    }
    let hook = Arc::new(Recorder::default());
    let serial = SharedBuffer::new();
    let mut vm = Vm::new(
        config("mode=hypercall"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    vm.set_hook(hook.clone());
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    let report = vm.run(RunLimits {
        timeout: Some(Duration::from_secs(20)),
        interrupt: None,
    });
    let report = report.unwrap();
    let text = serial.text();
    assert!(report.outcome.is_success(), "{}: {text}", report.outcome);
    // One hypercall from CPL0, one from CPL3; nr defaults to 34 (the agent call).
    assert_eq!(hook.hypercalls.load(Ordering::Relaxed), 2, "{text}");
    assert_eq!(hook.last_nr.load(Ordering::Relaxed), 34);
    let answer = format!("rax={:#x}", 0x1234 + 34);
    assert!(
        text.contains(&format!("hypercall nr=34 cpl=0 {answer}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("hypercall nr=34 cpl=3 {answer}")),
        "{text}"
    );
    assert_eq!(hook.serial_bytes.load(Ordering::Relaxed), text.len() as u64);
}

#[test]
fn paused_vcpu_makes_no_progress_until_resumed() {
    if !kvmi_tests::require_kvm("paused_vcpu_makes_no_progress_until_resumed") {
        return;
    }
    let counter = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("probe_counter")
        .expect("profile has sym.probe_counter");
    let serial = SharedBuffer::new();
    let mut vm = Vm::new(
        config("mode=spin"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    let ram = vm.ram().clone();
    let running = vm.start().unwrap();
    let handle = running.handle();
    let read = || ram.read_u64(counter).unwrap();
    wait::until(Duration::from_secs(5), "the guest counter to move", || {
        read() > 100
    });
    let vcpu = handle.vcpu(0).unwrap();
    vcpu.pause();
    assert!(
        vcpu.wait_paused(Duration::from_secs(2)),
        "vCPU did not pause"
    );
    let frozen = read();
    // Time passes while paused: the counter must not move (shown positively below: it moves
    // after the resume).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read(), frozen, "counter moved while paused");
    vcpu.resume();
    wait::until(Duration::from_secs(5), "progress after the resume", || {
        read() > frozen + 100
    });
    handle.stop();
    let report = running.wait(RunLimits::default());
    assert_eq!(report.outcome, RunOutcome::Interrupted);
    assert_eq!(report.stuck_vcpus, 0);
    assert!(serial.text().contains("spinning"));
}

#[test]
fn guest_writes_are_visible_through_a_second_mapping_of_the_memfd() {
    if !kvmi_tests::require_kvm("guest_writes_are_visible_through_a_second_mapping_of_the_memfd") {
        return;
    }
    let scratch = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("scratch_page")
        .expect("profile has sym.scratch_page");
    let mut vm = Vm::new(
        config("mode=mem-write n=16"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    vm.set_serial(SerialSink::Null);
    let ram = vm.ram().clone();
    let file = ram.memfd_file().clone();
    // SAFETY: a second shared mapping of the memfd; the guest writes it concurrently, which
    // we only read it after the run has ended.
    let view = unsafe { memmap2::MmapOptions::new().map(&*file) }.unwrap();
    assert_eq!(view.len() as u64, ram.size());
    let report = vm.run(RunLimits {
        timeout: Some(Duration::from_secs(20)),
        interrupt: None,
    });
    assert!(report.unwrap().outcome.is_success());
    for i in 0..16u64 {
        // 512 words per page: 8-byte words.
        let at = (scratch + 8 * i) as usize;
        let word = u64::from_le_bytes(view[at..at + 8].try_into().unwrap());
        assert_eq!(word, 0x5ca1_0000 + i, "word {i}");
    }
}

#[test]
fn bad_images_and_configs_are_clear_errors() {
    if !kvmi_tests::require_kvm("bad_images_and_configs_are_clear_errors") {
        return;
    }
    let err = Vm::new(config(""), b"definitely not an ELF").unwrap_err();
    assert!(err.to_string().contains("bad guest image"), "{err}");
    let err = Vm::new(
        VmConfig {
            vcpus: 0,
            ..config("")
        },
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap_err();
    assert!(err.to_string().contains("vCPU count"), "{err}");
    let err = Vm::new(
        config(&"x".repeat(400)),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap_err();
    assert!(err.to_string().contains("command line"), "{err}");
    // An image larger than RAM.
    let image = kvmi_tests::common::elf(Image::DemoTarget);
    let loaded = vmm::loader::validate_image(image, u64::MAX).unwrap();
    assert!(loaded.entry >= hypercall::boot::IMAGE_MIN_ADDR);
    let err = vmm::loader::validate_image(image, loaded.end - 1).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}

#[test]
fn a_page_of_one_vm_is_shared_into_another_zero_copy() {
    if !kvmi_tests::require_kvm("a_page_of_one_vm_is_shared_into_another_zero_copy") {
        return;
    }
    let scratch = kvmi_tests::common::profile(Image::TestGuest)
        .symbol("scratch_page")
        .expect("profile has sym.scratch_page");
    let limits = RunLimits {
        timeout: Some(Duration::from_secs(20)),
        interrupt: None,
    };
    // VM A fills its scratch page.
    let mut a = Vm::new(
        config("mode=mem-write n=16"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    a.set_serial(SerialSink::Null);
    let a_ram = a.ram().clone();
    assert!(a.run(limits).unwrap().outcome.is_success());
    // VM B sums its scratch page, which is A's page mapped over B's RAM.
    let serial = SharedBuffer::new();
    let mut b = Vm::new(
        config("mode=mem-read n=16"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    b.set_serial(SerialSink::Buffer(serial.clone()));
    let b_ram = b.ram().clone();
    b_ram
        .share_from(scratch, a_ram.memfd(), scratch, 4096)
        .unwrap();
    assert!(b.run(limits).unwrap().outcome.is_success());
    let expected: u64 = (0..16).map(|i| 0x5ca1_0000u64 + i).sum();
    assert!(
        serial
            .text()
            .contains(&format!("mem-read n=16 sum={expected:#x}")),
        "{}",
        serial.text()
    );
    // Zero-copy: a host write into A's page shows in B's view, and unshare restores B's own.
    a_ram.write(scratch, &7u64.to_le_bytes()).unwrap();
    assert_eq!(b_ram.read_u64(scratch).unwrap(), 7);
    b_ram.unshare(scratch, 4096).unwrap();
    assert_eq!(b_ram.read_u64(scratch).unwrap(), 0);
    assert_eq!(a_ram.read_u64(scratch).unwrap(), 7);
}

#[test]
fn extra_regions_are_checked_and_the_appliance_regions_recorded_in_boot_info() {
    if !kvmi_tests::require_kvm(
        "extra_regions_are_checked_and_the_appliance_regions_recorded_in_boot_info",
    ) {
        return;
    }
    use appliance_link::launch::{MAP_WINDOW_GPA, RING_REGION_GPA, add_appliance_regions};
    use hypercall::boot::BOOT_INFO_ADDR;
    let mut vm = Vm::new(
        config("mode=hello"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    let ram = vm.ram().clone();
    let word = |off: u64| ram.read_u64(BOOT_INFO_ADDR + off).unwrap();
    // The VMM core adds regions without touching the boot record.
    let region = vm
        .add_shared_region("test-region", 0x4000_0000, 0x10000)
        .unwrap();
    let window = vm.add_remap_window(0x5000_0000, 0x20000).unwrap();
    assert_eq!(region.size(), 0x10000);
    assert_eq!(window.len(), 0x20000);
    assert_eq!((word(32), word(40), word(48), word(56)), (0, 0, 0, 0));
    // Overlaps, RAM collisions and misaligned regions are refused.
    assert!(vm.add_remap_window(0x4000_8000, 0x1000).is_err());
    assert!(vm.add_remap_window(0x1000, 0x1000).is_err());
    assert!(
        vm.add_shared_region("test-region", 0x6000_0800, 0x1000)
            .is_err()
    );
    assert!(
        vm.add_shared_region("test-region", 0x1_0000_0000, 0x1000)
            .is_err()
    );
    // The appliance link records its ring region and map window where discovery reads them.
    let (ring, window) = add_appliance_regions(&mut vm, 0x10000, 0x20_0000).unwrap();
    assert_eq!((ring.size(), window.len()), (0x10000, 0x20_0000));
    assert_eq!((word(32), word(40)), (RING_REGION_GPA, 0x10000));
    assert_eq!((word(48), word(56)), (MAP_WINDOW_GPA, 0x20_0000));
    vm.set_serial(SerialSink::Null);
    let report = vm
        .run(RunLimits {
            timeout: Some(Duration::from_secs(20)),
            interrupt: None,
        })
        .unwrap();
    assert!(report.outcome.is_success(), "{}", report.outcome);
}

/// Counts `kicked` calls.
#[derive(Default)]
struct KickCounter(AtomicU64);

impl ExitHook for KickCounter {
    fn kicked(&self, _ctx: &mut ExitContext<'_>) -> HookResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        HookResult::Handled
    }
}

#[test]
fn a_nudge_always_reaches_the_hook_even_before_the_vcpu_runs_or_between_exits() {
    if !kvmi_tests::require_kvm("a_nudge_always_reaches_the_hook") {
        return;
    }
    // test-guest `spin` prints (serial exits the VMM handles without the hook), then spins
    // with no exit at all: a nudge lost on the way would never be noticed.
    let hook = Arc::new(KickCounter::default());
    let mut vm = Vm::new(
        config("mode=spin"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    vm.set_hook(hook.clone());
    vm.set_serial(SerialSink::Null);
    let running = vm.start().unwrap();
    let control = running.handle().vcpu(0).unwrap().clone();
    let count = || hook.0.load(Ordering::SeqCst);
    // At once after the start (the thread may not even be registered yet), then 200 more
    // at whatever moment each lands.
    for n in 1..=201 {
        let before = count();
        control.nudge();
        wait::until(
            Duration::from_secs(5),
            &format!("nudge {n} to reach the hook"),
            || count() > before,
        );
    }
    running.handle().stop();
    let _ = running.wait(RunLimits {
        timeout: Some(Duration::from_secs(10)),
        interrupt: None,
    });
}

#[test]
fn a_paused_vm_stops_when_asked_without_a_resume() {
    if !kvmi_tests::require_kvm("a_paused_vm_stops_when_asked_without_a_resume") {
        return;
    }
    let mut vm = Vm::new(
        config("mode=spin"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    vm.set_serial(SerialSink::Buffer(SharedBuffer::new()));
    let running = vm.start().unwrap();
    let handle = running.handle();
    assert!(
        handle.pause_all(Duration::from_secs(5)),
        "vCPUs did not pause"
    );
    let asked = std::time::Instant::now();
    handle.stop();
    let report = running.wait(RunLimits::default());
    assert_eq!(report.outcome, RunOutcome::Interrupted);
    assert_eq!(
        report.stuck_vcpus, 0,
        "a parked vCPU slept through the stop"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the stop took {:?}",
        asked.elapsed()
    );
}
