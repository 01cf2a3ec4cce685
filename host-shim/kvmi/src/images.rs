//! The guest images embedded at build time (see `build.rs`) and their profiles.

use crate::profile::{Profile, ProfileError};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_images.rs"));
}

/// True when this build embedded every image (false with `KVMI_SKIP_IMAGES`).
pub const ALL_EMBEDDED: bool = embedded::DEMO_TARGET.is_some()
    && embedded::TEST_GUEST.is_some()
    && embedded::APPLIANCE.is_some()
    && embedded::EXAMPLE_AGENT.is_some();

/// An embedded guest image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// The demo target OS (task table, scheduler heartbeats).
    DemoTarget,
    /// The test guest (behaviour chosen by `mode=` on the command line).
    TestGuest,
    /// The appliance VM image (the introspection agent at CPL3; images/README.md).
    Appliance,
    /// The example appliance agent (`images/example-agent`: counts every target's events).
    ExampleAgent,
}

impl Image {
    /// Every embedded image.
    pub const ALL: [Image; 4] = [
        Image::DemoTarget,
        Image::TestGuest,
        Image::Appliance,
        Image::ExampleAgent,
    ];

    /// The image's name.
    pub fn name(self) -> &'static str {
        match self {
            Image::DemoTarget => "demo-target",
            Image::TestGuest => "test-guest",
            Image::Appliance => "appliance",
            Image::ExampleAgent => "example-agent",
        }
    }

    /// Looks an image up by name.
    pub fn from_name(name: &str) -> Option<Image> {
        Image::ALL.into_iter().find(|i| i.name() == name)
    }

    /// The ELF bytes, if this build embedded them.
    pub fn elf(self) -> Option<&'static [u8]> {
        match self {
            Image::DemoTarget => embedded::DEMO_TARGET,
            Image::TestGuest => embedded::TEST_GUEST,
            Image::Appliance => embedded::APPLIANCE,
            Image::ExampleAgent => embedded::EXAMPLE_AGENT,
        }
    }

    /// The profile JSON generated at build time, if embedded.
    pub fn profile_json(self) -> Option<&'static str> {
        match self {
            Image::DemoTarget => embedded::DEMO_TARGET_PROFILE,
            Image::TestGuest => embedded::TEST_GUEST_PROFILE,
            Image::Appliance => embedded::APPLIANCE_PROFILE,
            Image::ExampleAgent => embedded::EXAMPLE_AGENT_PROFILE,
        }
    }

    /// The parsed profile, if embedded.
    pub fn profile(self) -> Option<Result<Profile, ProfileError>> {
        self.profile_json().map(Profile::from_json)
    }
}
