//! Capability probe (placeholder while being written).
/// Probed capabilities.
#[derive(Debug, Clone, Default)]
pub struct Capabilities;
/// Probes.
pub fn probe_capabilities() -> Capabilities {
    Capabilities
}
