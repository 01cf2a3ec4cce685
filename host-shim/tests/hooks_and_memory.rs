//! The exit hook, vCPU pause/resume and memfd-backed RAM, driven through the library API.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use host_shim::images::Image;
use host_shim::{
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
    if common::skip("hook_answers_hypercalls_and_sees_serial_output") {
        return;
    }
    let hook = Arc::new(Recorder::default());
    let serial = SharedBuffer::new();
    let mut vm = Vm::new(config("mode=hypercall"), common::elf(Image::TestGuest)).unwrap();
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
    if common::skip("paused_vcpu_makes_no_progress_until_resumed") {
        return;
    }
    let counter = common::profile(Image::TestGuest)
        .symbol("probe_counter")
        .expect("profile has sym.probe_counter");
    let serial = SharedBuffer::new();
    let mut vm = Vm::new(config("mode=spin"), common::elf(Image::TestGuest)).unwrap();
    vm.set_serial(SerialSink::Buffer(serial.clone()));
    let ram = vm.ram().clone();
    let running = vm.start().unwrap();
    let handle = running.handle();
    let read = || ram.read_u64(counter).unwrap();
    let wait_until = |cond: &dyn Fn() -> bool| {
        for _ in 0..500 {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    };
    assert!(wait_until(&|| read() > 100), "guest counter never moved");
    let vcpu = handle.vcpu(0).unwrap();
    vcpu.pause();
    assert!(
        vcpu.wait_paused(Duration::from_secs(2)),
        "vCPU did not pause"
    );
    let frozen = read();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read(), frozen, "counter moved while paused");
    vcpu.resume();
    assert!(
        wait_until(&|| read() > frozen + 100),
        "no progress after resume"
    );
    handle.stop();
    let report = running.wait(RunLimits::default());
    assert_eq!(report.outcome, RunOutcome::Interrupted);
    assert_eq!(report.stuck_vcpus, 0);
    assert!(serial.text().contains("spinning"));
}

#[test]
fn guest_writes_are_visible_through_a_second_mapping_of_the_memfd() {
    if common::skip("guest_writes_are_visible_through_a_second_mapping_of_the_memfd") {
        return;
    }
    let scratch = common::profile(Image::TestGuest)
        .symbol("scratch_page")
        .expect("profile has sym.scratch_page");
    let mut vm = Vm::new(config("mode=mem-write n=16"), common::elf(Image::TestGuest)).unwrap();
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
    if common::skip("bad_images_and_configs_are_clear_errors") {
        return;
    }
    let err = Vm::new(config(""), b"definitely not an ELF").unwrap_err();
    assert!(err.to_string().contains("bad guest image"), "{err}");
    let err = Vm::new(
        VmConfig {
            vcpus: 0,
            ..config("")
        },
        common::elf(Image::TestGuest),
    )
    .unwrap_err();
    assert!(err.to_string().contains("vCPU count"), "{err}");
    let err = Vm::new(config(&"x".repeat(400)), common::elf(Image::TestGuest)).unwrap_err();
    assert!(err.to_string().contains("command line"), "{err}");
    // An image larger than RAM.
    let image = common::elf(Image::DemoTarget);
    let loaded = host_shim::loader::validate_image(image, u64::MAX).unwrap();
    assert!(loaded.entry >= hypercall::boot::IMAGE_MIN_ADDR);
    let err = host_shim::loader::validate_image(image, loaded.end - 1).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}
