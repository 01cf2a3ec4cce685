//! The embedded appliance image on its own (no `--appliance` wiring): it must say why it
//! cannot run and exit with its documented status; and the demo-target profile it embeds
//! (`appliance/tests/fixtures/demo-target.profile.json`) must be the one of the embedded
//! demo target, or the agent would protect and read the wrong addresses.

use std::time::Duration;

use kvmi::images::Image;
use kvmi::profile::Profile;
use vmm::{RunOutcome, UnknownIoPolicy};

/// `images/appliance`: exit status when the boot info has no ring region.
const NO_RING_REGION: u32 = 10;

#[test]
fn appliance_image_embeds_the_current_demo_target_profile() {
    let fixture = include_str!("../../../appliance/tests/fixtures/demo-target.profile.json");
    let fixture = Profile::from_json(fixture).expect("fixture parses");
    assert_eq!(
        fixture,
        kvmi_tests::common::profile(Image::DemoTarget),
        "regenerate appliance/tests/fixtures/demo-target.profile.json with \
         `kvmi profile --image demo-target` (the appliance image embeds it)"
    );
}

#[test]
fn appliance_image_alone_reports_the_missing_ring_region() {
    if !kvmi_tests::require_kvm("appliance_image_alone_reports_the_missing_ring_region") {
        return;
    }
    let (report, serial) = kvmi_tests::common::run(
        Image::Appliance,
        "",
        1,
        UnknownIoPolicy::Error,
        Duration::from_secs(30),
    );
    assert!(
        matches!(
            report.outcome,
            RunOutcome::GuestExit {
                status: NO_RING_REGION,
                vcpu: 0
            }
        ),
        "{:?}\n{serial}",
        report.outcome
    );
    assert!(
        serial.contains("appliance: no ring region or map window (bad boot info: ring region)"),
        "{serial}"
    );
}
