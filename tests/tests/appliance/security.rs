//! Security tests of the appliance's page calls and rings (real KVM, real VMs, real memfd
//! mappings): every bad call is refused with its error, the target keeps running, and no
//! target page outside a grant is ever visible in the window.
//!
//! Map tokens are MACs under a key the test hands out as the supervisor does
//! ([`hand_out_key`]): the target's engine issues, the pager's verifier checks with the key
//! alone.
//!
//! The page calls are driven through [`ApplianceHook::call`] — exactly what the appliance's
//! doorbell exit runs — with the token placed in a real appliance VM's RAM, and once by a
//! real guest (test-guest `mode=hypercall` as the appliance).

use std::sync::Arc;
use std::time::Duration;

use appliance_link::hook::SERVED_FEATURES;
use appliance_link::pager::hand_out_key;
use appliance_link::rings::{RingService, Waker, create_region};
use appliance_link::{ApplianceHook, Pager};
use hypercall::call::{Hypercall, HypercallRegs, PAGE_SIZE};
use hypercall::discovery::RingKind;
use hypercall::error::HcError;
use hypercall::ring::{LayoutParams, Region, RingSizes};
use hypercall::token::MapToken;
use kvmi::images::Image;
use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenIssuer, TokenVerifier};
use kvmi_engine::{Introspector, IntrospectorConfig};
use kvmi_tests::wait;
use vmm::window::RemapWindow;
use vmm::{GuestRam, RunLimits, RunningVm, SerialSink, SharedBuffer, Vm, VmConfig};

const WINDOW_GPA: u64 = 0xC100_0000;
const WINDOW_PAGES: u64 = 64;
/// Target pages the tests grant from (filled with a pattern; unused by test-guest).
const TARGET_BASE: u64 = 0x200_0000;
const TARGET_PAGES: u64 = 16;
/// Where the appliance's token buffer is (its RAM).
const TOKEN_GPA: u64 = 0x300_0000;

fn vm_config(name: &str, cmdline: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        cmdline: cmdline.into(),
        unknown_io: vmm::UnknownIoPolicy::Ignore,
    }
}

fn pattern(page: u64) -> u8 {
    0xA0 + page as u8
}

struct Rig {
    target: Option<RunningVm>,
    intro: Arc<Introspector>,
    target_ram: Arc<GuestRam>,
    other: Arc<Introspector>,
    _other_vm: Vm,
    appliance: Vm,
    window: Arc<RemapWindow>,
    hook: ApplianceHook,
    pager: Arc<Pager>,
}

impl Rig {
    fn new() -> Rig {
        let caps = vmm::probe::cached_capabilities().expect("probe");
        let image = kvmi_tests::common::elf(Image::TestGuest);
        let mut target = Vm::new(vm_config("sec-target", "mode=spin"), image).unwrap();
        target.set_serial(SerialSink::Buffer(SharedBuffer::new()));
        let intro =
            Introspector::install(&mut target, caps, IntrospectorConfig::default()).unwrap();
        for page in 0..TARGET_PAGES {
            let bytes = vec![pattern(page); PAGE_SIZE as usize];
            target
                .ram()
                .write(TARGET_BASE + page * PAGE_SIZE, &bytes)
                .unwrap();
        }
        let target_ram = target.ram().clone();
        let target_ram_keep = target_ram.clone();
        let running = target.start().unwrap();
        intro.set_handle(running.handle());
        let other_vm = Vm::new(vm_config("sec-other", "mode=spin"), image).unwrap();
        let other = Introspector::new(&other_vm, caps, IntrospectorConfig::default()).unwrap();
        let mut appliance = Vm::new(vm_config("sec-appliance", "mode=spin"), image).unwrap();
        let window = appliance
            .add_remap_window(WINDOW_GPA, WINDOW_PAGES * PAGE_SIZE)
            .unwrap();
        let pager = Arc::new(Pager::new(
            hand_out_key(&intro).unwrap(),
            target_ram,
            vec![hand_out_key(&other).unwrap()],
            window.clone(),
            WINDOW_GPA,
        ));
        let hook = ApplianceHook::new(pager.clone(), Waker::for_thread(std::thread::current()));
        Rig {
            target: Some(running),
            intro,
            target_ram: target_ram_keep,
            other,
            _other_vm: other_vm,
            appliance,
            window,
            hook,
            pager,
        }
    }

    fn appliance_ram(&self) -> &GuestRam {
        self.appliance.ram()
    }

    fn stage(&self, token: &MapToken) {
        self.appliance_ram()
            .write(TOKEN_GPA, &token.to_bytes())
            .unwrap();
    }

    fn call(&self, call: Hypercall, args: [u64; 4]) -> Result<u64, HcError> {
        let regs = HypercallRegs {
            rax: call.number(),
            rbx: args[0],
            rcx: args[1],
            rdx: args[2],
            rsi: args[3],
            rdi: 0,
        };
        self.hook.call(&regs, self.appliance_ram())
    }

    fn mem_map(&self, token: &MapToken, target_gpa: u64, window_gpa: u64) -> Result<u64, HcError> {
        self.stage(token);
        self.call(Hypercall::MemMap, [TOKEN_GPA, target_gpa, window_gpa, 0])
    }

    fn token(&self) -> MapToken {
        self.intro.tokens().issue().unwrap()
    }

    /// First byte of every window page that is not all zero, as (page, byte).
    fn visible(&self) -> Vec<(u64, u8)> {
        let base = self.window.host_base();
        let mut out = Vec::new();
        for page in 0..WINDOW_PAGES {
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            // SAFETY: the window mapping is PAGE_SIZE * WINDOW_PAGES bytes long and stays
            // mapped while `self.window` lives; pages are readable (zero placeholder or a
            // read-only shared target page). Bytes are copied with a volatile-free memcpy;
            // the target may write concurrently, which only changes the values read.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    base.add((page * PAGE_SIZE) as usize),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            if buf.iter().any(|b| *b != 0) {
                out.push((page, buf[0]));
            }
        }
        out
    }

    fn assert_target_running(&self) {
        let t = self.target.as_ref().unwrap();
        assert!(!t.handle().has_ended(), "the target must keep running");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            t.handle().stop();
            let _ = t.wait(RunLimits {
                timeout: Some(Duration::from_secs(5)),
                interrupt: None,
            });
        }
    }
}

fn wpage(i: u64) -> u64 {
    WINDOW_GPA + i * PAGE_SIZE
}

fn tpage(i: u64) -> u64 {
    TARGET_BASE + i * PAGE_SIZE
}

#[test]
fn valid_map_is_zero_copy_and_unmap_restores_zero() {
    if !kvmi_tests::require_kvm("valid_map_is_zero_copy_and_unmap_restores_zero") {
        return;
    }
    let rig = Rig::new();
    assert_eq!(rig.call(Hypercall::Version, [0; 4]), Ok(1));
    assert_eq!(rig.call(Hypercall::Features, [0; 4]), Ok(SERVED_FEATURES.0));
    assert_eq!(rig.visible(), vec![]);
    let t = rig.token();
    assert_eq!(rig.mem_map(&t, tpage(3), wpage(5)), Ok(0));
    assert_eq!(rig.visible(), vec![(5, pattern(3))]);
    // Zero-copy: a later write by the target shows in the window.
    rig.target_ram.write(tpage(3), &[0x5a; 8]).unwrap();
    assert_eq!(rig.visible(), vec![(5, 0x5a)]);
    assert_eq!(rig.call(Hypercall::MemUnmap, [wpage(5), 0, 0, 0]), Ok(0));
    assert_eq!(rig.visible(), vec![]);
    assert_eq!(
        rig.call(Hypercall::MemUnmap, [wpage(5), 0, 0, 0]),
        Err(HcError::NotMapped)
    );
    let s = rig.pager.stats();
    assert_eq!((s.pages_mapped, s.pages_unmapped, s.refused), (1, 1, 1));
    rig.assert_target_running();
}

#[test]
fn forged_replayed_and_foreign_tokens_are_refused() {
    if !kvmi_tests::require_kvm("forged_replayed_and_foreign_tokens_are_refused") {
        return;
    }
    let rig = Rig::new();
    let forged = MapToken::new([0x1234, 0x5678, 0x9abc, 0xdef0]);
    assert_eq!(
        rig.mem_map(&forged, tpage(0), wpage(0)),
        Err(HcError::BadToken)
    );
    let zero = MapToken::new([0; 4]);
    assert_eq!(
        rig.mem_map(&zero, tpage(0), wpage(0)),
        Err(HcError::BadToken)
    );
    let t = rig.token();
    assert_eq!(rig.mem_map(&t, tpage(1), wpage(1)), Ok(0));
    // Replay on another window page: the token was single use.
    assert_eq!(rig.mem_map(&t, tpage(2), wpage(2)), Err(HcError::BadToken));
    // A token of another target of this shim.
    let foreign = rig.other.tokens().issue().unwrap();
    assert_eq!(
        rig.mem_map(&foreign, tpage(2), wpage(2)),
        Err(HcError::WrongTarget)
    );
    assert_eq!(
        rig.other.tokens().outstanding(),
        0,
        "the foreign token is burnt"
    );
    assert_eq!(
        rig.mem_map(&foreign, tpage(2), wpage(2)),
        Err(HcError::BadToken),
        "a burnt foreign token is just unknown"
    );
    // A token bound to this target under a key the supervisor did not hand to the pager.
    let stray =
        TokenIssuer::new(TargetKey::generate(rig.intro.token_target(), DEFAULT_TTL).unwrap());
    let unkeyed = stray.issue().unwrap();
    assert_eq!(
        rig.mem_map(&unkeyed, tpage(2), wpage(2)),
        Err(HcError::BadToken)
    );
    assert_eq!(rig.visible(), vec![(1, pattern(1))]);
    rig.assert_target_running();
}

#[test]
fn expired_token_is_refused() {
    if !kvmi_tests::require_kvm("expired_token_is_refused") {
        return;
    }
    let rig = Rig::new();
    let t = rig.token();
    // Not a synchronisation: the token's lifetime is what is under test, and the
    // introspector's store runs on the system clock, so real time must pass (at least this
    // long; a slow host only makes it longer).
    std::thread::sleep(kvmi_engine::tokens::DEFAULT_TTL + Duration::from_millis(100));
    assert_eq!(
        rig.mem_map(&t, tpage(0), wpage(0)),
        Err(HcError::TokenExpired)
    );
    assert_eq!(rig.visible(), vec![]);
    rig.assert_target_running();
}

#[test]
fn bad_addresses_are_refused_without_burning_the_token() {
    if !kvmi_tests::require_kvm("bad_addresses_are_refused_without_burning_the_token") {
        return;
    }
    let rig = Rig::new();
    let t = rig.token();
    let ram = rig.target_ram.size();
    let cases: Vec<([u64; 4], HcError)> = vec![
        ([TOKEN_GPA, ram, wpage(0), 0], HcError::OutOfRange),
        ([TOKEN_GPA, !0xfff_u64, wpage(0), 0], HcError::OutOfRange),
        ([TOKEN_GPA, tpage(0) + 8, wpage(0), 0], HcError::Unaligned),
        ([TOKEN_GPA + 4, tpage(0), wpage(0), 0], HcError::Unaligned),
        (
            [TOKEN_GPA, tpage(0), wpage(0) + 0x800, 0],
            HcError::Unaligned,
        ),
        (
            [TOKEN_GPA, tpage(0), WINDOW_GPA - PAGE_SIZE, 0],
            HcError::OutsideWindow,
        ),
        (
            [TOKEN_GPA, tpage(0), wpage(WINDOW_PAGES), 0],
            HcError::OutsideWindow,
        ),
        ([TOKEN_GPA, tpage(0), 0, 0], HcError::OutsideWindow),
        ([64 << 20, tpage(0), wpage(0), 0], HcError::Fault),
        ([(64 << 20) - 16, tpage(0), wpage(0), 0], HcError::Fault),
    ];
    rig.stage(&t);
    for (args, want) in &cases {
        assert_eq!(
            rig.call(Hypercall::MemMap, *args),
            Err(*want),
            "MEM_MAP {args:x?}"
        );
        assert_eq!(rig.visible(), vec![], "nothing mapped after {args:x?}");
    }
    let range_cases: Vec<([u64; 4], HcError)> = vec![
        (
            [TOKEN_GPA, tpage(0), wpage(WINDOW_PAGES - 2), 4],
            HcError::OutsideWindow,
        ),
        (
            [TOKEN_GPA, ram - PAGE_SIZE, wpage(0), 2],
            HcError::OutOfRange,
        ),
        ([TOKEN_GPA, tpage(0), wpage(0), 0], HcError::TooManyPages),
        ([TOKEN_GPA, tpage(0), wpage(0), 513], HcError::TooManyPages),
    ];
    for (args, want) in &range_cases {
        assert_eq!(
            rig.call(Hypercall::MapRange, *args),
            Err(*want),
            "MAP_RANGE {args:x?}"
        );
    }
    assert_eq!(
        rig.call(Hypercall::MemUnmap, [WINDOW_GPA - PAGE_SIZE, 0, 0, 0]),
        Err(HcError::OutsideWindow)
    );
    assert_eq!(
        rig.call(Hypercall::Agent, [0; 4]),
        Err(HcError::InvalidArgument)
    );
    assert_eq!(
        rig.hook.call(
            &HypercallRegs {
                rax: 0x1234,
                ..Default::default()
            },
            rig.appliance_ram()
        ),
        Err(HcError::NoSys)
    );
    assert_eq!(rig.visible(), vec![]);
    // The token survived every refused call.
    assert_eq!(rig.mem_map(&t, tpage(7), wpage(9)), Ok(0));
    assert_eq!(rig.visible(), vec![(9, pattern(7))]);
    rig.assert_target_running();
}

#[test]
fn range_map_busy_revoke_all_and_retire() {
    if !kvmi_tests::require_kvm("range_map_busy_revoke_all_and_retire") {
        return;
    }
    let rig = Rig::new();
    let t = rig.token();
    rig.stage(&t);
    assert_eq!(
        rig.call(Hypercall::MapRange, [TOKEN_GPA, tpage(2), wpage(10), 4]),
        Ok(4)
    );
    let want: Vec<(u64, u8)> = (0..4).map(|i| (10 + i, pattern(2 + i))).collect();
    assert_eq!(rig.visible(), want);
    // A mapped window page is busy, and the busy check does not burn the token.
    let t2 = rig.token();
    assert_eq!(rig.mem_map(&t2, tpage(0), wpage(12)), Err(HcError::Busy));
    assert_eq!(rig.mem_map(&t2, tpage(0), wpage(20)), Ok(0));
    assert_eq!(rig.pager.mapped_pages(), 5);
    assert_eq!(rig.call(Hypercall::RevokeAll, [0; 4]), Ok(5));
    assert_eq!(rig.visible(), vec![]);
    let t3 = rig.token();
    assert_eq!(rig.mem_map(&t3, tpage(0), wpage(0)), Ok(0));
    assert_eq!(rig.pager.retire(), 1);
    assert_eq!(rig.visible(), vec![]);
    let t4 = rig.token();
    assert_eq!(
        rig.mem_map(&t4, tpage(0), wpage(0)),
        Err(HcError::NotPermitted)
    );
    rig.assert_target_running();
}

/// A ring region in a real memfd, attached to the target's introspector as its tool.
fn ring_rig(rig: &Rig) -> (RingService, Region<appliance_link::rings::RingMemory>) {
    let params = LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes::default(),
        features: SERVED_FEATURES,
        map_window_gpa: WINDOW_GPA,
        map_window_size: WINDOW_PAGES * PAGE_SIZE,
    };
    let size = params.region_size().next_multiple_of(PAGE_SIZE);
    let ram = Arc::new(GuestRam::new("sec-rings", size).unwrap());
    let region = create_region(ram, &params).unwrap();
    let service = RingService::start(
        rig.intro.clone(),
        &region,
        Box::new(|_| {}),
        Duration::from_secs(2),
    )
    .unwrap();
    (service, region)
}

#[test]
fn scribbled_ring_indices_detach_the_appliance_and_the_target_runs_on() {
    if !kvmi_tests::require_kvm(
        "scribbled_ring_indices_detach_the_appliance_and_the_target_runs_on",
    ) {
        return;
    }
    let rig = Rig::new();
    for (kind, what) in [
        (RingKind::Command, "position"),
        (RingKind::EventReply, "length"),
        (RingKind::Log, "backwards"),
    ] {
        let (service, region) = ring_rig(&rig);
        assert!(rig.intro.is_attached());
        let index = region.ring_index(kind, 0).unwrap();
        let geo = region.geometry(index).unwrap();
        let words = region.memory().words();
        match what {
            // A producer position far beyond the ring size.
            "position" => words[geo.control].store(1 << 40, std::sync::atomic::Ordering::Release),
            // A record header claiming a length beyond the ring.
            "length" => {
                words[geo.data].store(
                    (u64::from(hypercall::ring::TAG_RECORD) << 32) | 0xffff_fff0,
                    std::sync::atomic::Ordering::Relaxed,
                );
                words[geo.control].store(64, std::sync::atomic::Ordering::Release);
            }
            // A misaligned position.
            _ => words[geo.control].store(13, std::sync::atomic::Ordering::Release),
        }
        wait::until(
            Duration::from_secs(5),
            &format!("{kind:?} {what}: the appliance to be detached"),
            || !rig.intro.is_attached(),
        );
        assert!(matches!(
            service.stop(),
            appliance_link::rings::ServiceEnd::Detached(_)
        ));
        rig.assert_target_running();
    }
}

#[test]
fn a_real_appliance_guest_maps_a_target_page_by_hypercall() {
    if !kvmi_tests::require_kvm("a_real_appliance_guest_maps_a_target_page_by_hypercall") {
        return;
    }
    let rig = Rig::new();
    let cmdline = format!(
        "mode=hypercall nr=32 a0={TOKEN_GPA:#x} a1={:#x} a2={WINDOW_GPA:#x}",
        tpage(4)
    );
    let mut appliance = Vm::new(
        vm_config("sec-guest", &cmdline),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    let window = appliance
        .add_remap_window(WINDOW_GPA, WINDOW_PAGES * PAGE_SIZE)
        .unwrap();
    let pager = Arc::new(Pager::new(
        hand_out_key(&rig.intro).unwrap(),
        rig.target_ram.clone(),
        Vec::new(),
        window.clone(),
        WINDOW_GPA,
    ));
    let hook = Arc::new(ApplianceHook::new(
        pager.clone(),
        Waker::for_thread(std::thread::current()),
    ));
    appliance.set_hook(hook.clone());
    let token = rig.token();
    appliance.ram().write(TOKEN_GPA, &token.to_bytes()).unwrap();
    let serial = SharedBuffer::new();
    appliance.set_serial(SerialSink::Buffer(serial.clone()));
    let report = appliance
        .run(RunLimits {
            timeout: Some(Duration::from_secs(20)),
            interrupt: None,
        })
        .unwrap();
    let text = serial.text();
    assert!(report.outcome.is_success(), "{:?}: {text}", report.outcome);
    // CPL0 maps; the same call again from CPL3 finds the window page busy.
    assert!(text.contains("hypercall nr=32 cpl=0 rax=0x0"), "{text}");
    let busy = HcError::Busy.to_rax();
    assert!(
        text.contains(&format!("hypercall nr=32 cpl=3 rax={busy:#x}")),
        "{text}"
    );
    assert_eq!(hook.counts().0, 2);
    assert_eq!(pager.mapped_pages(), 1);
    assert_eq!(pager.retire(), 1);
    rig.assert_target_running();
}

/// The permissions `/proc/self/maps` shows for the mapping that contains `addr`.
fn host_perms(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return perms.to_string();
        }
    }
    panic!("{addr:#x} not mapped");
}

#[test]
fn granted_pages_are_mapped_read_only_and_shared() {
    if !kvmi_tests::require_kvm("granted_pages_are_mapped_read_only_and_shared") {
        return;
    }
    let rig = Rig::new();
    let page = |i: u64| rig.window.host_base() as usize + (i * PAGE_SIZE) as usize;
    assert_eq!(
        host_perms(page(6)),
        "rw-p",
        "the placeholder is private zero memory"
    );
    let t = rig.token();
    assert_eq!(rig.mem_map(&t, tpage(0), wpage(6)), Ok(0));
    // KVM maps a PROT_READ host page read-only into the appliance: its writes never reach
    // the target's page.
    assert_eq!(host_perms(page(6)), "r--s");
    assert_eq!(host_perms(page(7)), "rw-p");
    assert_eq!(rig.call(Hypercall::MemUnmap, [wpage(6), 0, 0, 0]), Ok(0));
    assert_eq!(host_perms(page(6)), "rw-p");
    assert_eq!(
        SERVED_FEATURES.0 & hypercall::discovery::Features::WRITABLE_MAPS.0,
        0,
        "writable maps are not announced"
    );
    rig.assert_target_running();
}

#[test]
fn a_notify_on_a_scribbled_command_ring_detaches_at_once_and_later_ones_are_harmless() {
    if !kvmi_tests::require_kvm("a_notify_on_a_scribbled_command_ring_detaches_at_once") {
        return;
    }
    let rig = Rig::new();
    let (service, region) = ring_rig(&rig);
    let waker = service.waker();
    // Only the NOTIFY path is left to read the command ring.
    assert_eq!(service.stop(), appliance_link::rings::ServiceEnd::Stopped);
    assert!(rig.intro.is_attached());
    let index = region.ring_index(RingKind::Command, 0).unwrap();
    let geo = region.geometry(index).unwrap();
    region.memory().words()[geo.control].store(1 << 40, std::sync::atomic::Ordering::Release);
    waker.notify(u64::from(index));
    assert!(
        !rig.intro.is_attached(),
        "detached by the NOTIFY that found the ring corrupt"
    );
    // A hostile appliance keeps ringing: nothing is served, nothing breaks.
    for ring in [u64::from(index), hypercall::call::NOTIFY_ALL_RINGS, 12345] {
        for _ in 0..1000 {
            waker.notify(ring);
        }
    }
    assert!(!rig.intro.is_attached());
    rig.assert_target_running();
}

#[test]
fn a_tampered_token_is_refused_whichever_bit_changed_and_the_good_one_still_maps() {
    if !kvmi_tests::require_kvm("a_tampered_token_is_refused_whichever_bit_changed") {
        return;
    }
    let rig = Rig::new();
    let t = rig.token();
    // One bit of each byte: the nonce (0..8), the expiry, scope and format (8..16), the tag
    // (16..32). Each fails its check: nothing mapped, nothing burnt.
    for byte in 0..32 {
        for bit in [0, 5] {
            let mut bytes = t.to_bytes();
            bytes[byte] ^= 1 << bit;
            assert_eq!(
                rig.mem_map(&MapToken::from_bytes(bytes), tpage(0), wpage(0)),
                Err(HcError::BadToken),
                "byte {byte} bit {bit}"
            );
        }
    }
    assert_eq!(rig.visible(), vec![]);
    assert_eq!(rig.mem_map(&t, tpage(6), wpage(3)), Ok(0));
    // Replayed within its lifetime, on a free window page.
    assert_eq!(rig.mem_map(&t, tpage(6), wpage(4)), Err(HcError::BadToken));
    assert_eq!(rig.visible(), vec![(3, pattern(6))]);
    assert_eq!(rig.pager.stats().refused, 65);
    rig.assert_target_running();
}

#[test]
fn a_detach_revokes_every_token_at_the_verifier() {
    if !kvmi_tests::require_kvm("a_detach_revokes_every_token_at_the_verifier") {
        return;
    }
    let rig = Rig::new();
    let (service, _region) = ring_rig(&rig);
    let before = rig.token();
    let kept = rig.token();
    assert_eq!(rig.mem_map(&before, tpage(1), wpage(1)), Ok(0));
    assert_eq!(service.stop(), appliance_link::rings::ServiceEnd::Stopped);
    rig.intro.detach(service.generation(), "the test detaches");
    assert!(!rig.intro.is_attached());
    // The engine only bumped its key's epoch: the pager refuses the token it never saw.
    assert_eq!(
        rig.mem_map(&kept, tpage(2), wpage(2)),
        Err(HcError::BadToken)
    );
    let after = rig.token();
    assert_eq!(rig.mem_map(&after, tpage(2), wpage(2)), Ok(0));
    assert_eq!(rig.visible(), vec![(1, pattern(1)), (2, pattern(2))]);
    rig.assert_target_running();
}

#[test]
fn a_pager_holding_only_the_key_bytes_verifies_the_engine_s_tokens() {
    if !kvmi_tests::require_kvm("a_pager_holding_only_the_key_bytes_verifies") {
        return;
    }
    // As across a process boundary: the engine and the pager each rebuild the key from its
    // 32 bytes; they share no memory (no epoch word, no notices), only the bytes and the
    // host's monotonic clock.
    let rig = Rig::new();
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x6b);
    let target = rig.intro.token_target();
    rig.intro
        .tokens()
        .rekey(TargetKey::from_bytes(target, DEFAULT_TTL, &bytes));
    let verifier = Arc::new(TokenVerifier::new(TargetKey::from_bytes(
        target,
        DEFAULT_TTL,
        &bytes,
    )));
    let mut appliance = Vm::new(
        vm_config("sec-keyed", "mode=spin"),
        kvmi_tests::common::elf(Image::TestGuest),
    )
    .unwrap();
    let window = appliance
        .add_remap_window(WINDOW_GPA, WINDOW_PAGES * PAGE_SIZE)
        .unwrap();
    let pager = Arc::new(Pager::new(
        verifier.clone(),
        rig.target_ram.clone(),
        Vec::new(),
        window,
        WINDOW_GPA,
    ));
    let hook = ApplianceHook::new(pager.clone(), Waker::for_thread(std::thread::current()));
    let map = |token: &MapToken, page: u64| {
        appliance.ram().write(TOKEN_GPA, &token.to_bytes()).unwrap();
        let regs = HypercallRegs {
            rax: Hypercall::MemMap.number(),
            rbx: TOKEN_GPA,
            rcx: tpage(page),
            rdx: wpage(page),
            rsi: 0,
            rdi: 0,
        };
        hook.call(&regs, appliance.ram())
    };
    let t = rig.token();
    assert_eq!(map(&t, 5), Ok(0));
    assert_eq!(map(&t, 6), Err(HcError::BadToken), "replay");
    assert_eq!(verifier.remembered(), 1);
    // The rig's own pager holds another key: it refuses this key's tokens.
    let u = rig.token();
    assert_eq!(rig.mem_map(&u, tpage(6), wpage(6)), Err(HcError::BadToken));
    assert_eq!(map(&u, 6), Ok(0));
    assert_eq!(pager.mapped_pages(), 2);
    assert_eq!(pager.retire(), 2);
    rig.assert_target_running();
}
