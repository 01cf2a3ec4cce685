//! Per-vCPU CPU state: GDT, TSS and IDT.

/// Sets up this vCPU's descriptor tables (called once per vCPU by the runtime).
pub(crate) fn init(_vcpu: u32) {}
