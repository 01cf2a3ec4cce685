//! The libkvmi dialect (KVM-VMI `kvmi-v7`, what libkvmi, LibVMI, libmicrovmi and HVMI speak)
//! over the same engine: a codec per connection, selected with
//! [`Dialect::Libkvmi`](crate::socket::Dialect).
//!
//! A session is: the handshake ([`handshake`]: the 96-byte VMM struct out, the tool's ≥ 24-byte
//! answer in, the cookie hash checked against `--kvmi-secret`), then kvmi-v7 messages both
//! ways ([`session`]). The wire layouts and validation live in
//! [`protocol::wire::libkvmi`]; [`support`] says what is implemented; `translate` converts.
//!
//! # What a tool gets (docs/protocol.md, "The libkvmi dialect", has the full table)
//! - Commands run by the engine: GET_GUEST_INFO, GET_VCPU_INFO (TSC), PAUSE_VCPU,
//!   CONTROL_EVENTS, CONTROL_MSR, GET_REGISTERS (any readable MSRs, reply exactly
//!   472 + 16·n bytes), SET_REGISTERS, GET_CPUID, GET_XSAVE, READ/WRITE_PHYSICAL,
//!   INJECT_EXCEPTION, SET_PAGE_ACCESS (view 0), VCPU_CONTROL_SINGLESTEP,
//!   VCPU_TRANSLATE_GVA (4-level walk of the vCPU's CR3).
//! - Answered here: GET_VERSION (version 1, no features), CHECK_COMMAND, CHECK_EVENT,
//!   CONTROL_VM_EVENTS (UNHOOK, CREATE_VCPU), CONTROL_CR (accepted; never fires),
//!   CONTROL_CMD_RESPONSE, GET_MTRR_TYPE (WB for RAM, UC elsewhere), GET_MAX_GFN,
//!   GET_EPT_VIEW (view 0).
//! - Everything else: `-KVM_ENOSYS` (EPT views, SPP, #VE, XCR/XSAVE writes, map tokens,
//!   GFN allocation, GET_PAGE_ACCESS, which kvmi-v7 no longer handles).
//! - Events: PAUSE_VCPU, BREAKPOINT (guest INT3), PF, MSR, SINGLESTEP, HYPERCALL, TRAP,
//!   CREATE_VCPU, UNHOOK. CR, XSETBV, DESCRIPTOR and CPUID can be enabled (LibVMI's
//!   `vmi_init` enables CR on every vCPU) and never fire: stock KVM has no such exit.
//!   An event the tool did not enable is never sent; the engine's vCPU continues.

pub mod handshake;
pub mod session;
pub mod support;
pub(crate) mod translate;

use std::time::Duration;

/// QEMU's default time a tool has to close after the UNHOOK event.
pub const DEFAULT_UNHOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// What a libkvmi session tells the tool about the VM, and how it authenticates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibkvmiConfig {
    /// The VM's UUID (raw bytes, as the handshake carries it).
    pub uuid: [u8; 16],
    /// The VM's start time, seconds since the Unix epoch.
    pub start_time: i64,
    /// The VM's name (sent NUL-padded, cut at 63 bytes).
    pub name: String,
    /// SHA-1 of the shared secret (`--kvmi-secret`): the tool's cookie hash must match.
    /// `None`: any tool is accepted (logged as not authenticated).
    pub cookie_hash: Option<[u8; 20]>,
    /// How long the shim waits for the tool to close after UNHOOK before unhooking anyway.
    pub unhook_timeout: Duration,
}

impl Default for LibkvmiConfig {
    fn default() -> Self {
        LibkvmiConfig {
            uuid: [0; 16],
            start_time: 0,
            name: String::new(),
            cookie_hash: None,
            unhook_timeout: DEFAULT_UNHOOK_TIMEOUT,
        }
    }
}

/// Parses a UUID in its canonical text form (`8-4-4-4-12` hex digits).
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = text.split('-').collect();
    if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The canonical text form of a UUID.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A random (version 4) UUID from the kernel's random source.
pub fn random_uuid() -> std::io::Result<[u8; 16]> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse_and_format_canonically() {
        let text = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let u = parse_uuid(text).unwrap();
        assert_eq!(u[0], 0x0f);
        assert_eq!(u[15], 0xf0);
        assert_eq!(format_uuid(&u), text);
        assert_eq!(parse_uuid("0f1e2d3c4b5a69788796a5b4c3d2e1f0"), None);
        assert_eq!(parse_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg"), None);
        assert_eq!(parse_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f"), None);
        let r = random_uuid().unwrap();
        assert_eq!(r[6] >> 4, 4, "version 4");
        assert_eq!(r[8] >> 6, 2, "RFC 4122 variant");
        assert_eq!(parse_uuid(&format_uuid(&r)), Some(r));
    }
}
