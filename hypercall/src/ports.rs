//! I/O ports that the VMM decodes for every guest.
//!
//! Ports below 0x100 are reachable with the immediate form of `out` (`out imm8, eax`), which
//! leaves RDX free to carry a hypercall argument.

/// COM1, an 8250/16550 UART. Output goes to the VMM's serial sink.
pub const SERIAL_COM1: u16 = 0x3f8;
/// Number of consecutive ports decoded for COM1.
pub const SERIAL_COM1_LEN: u16 = 8;

/// Debug exit: a 32-bit `out` to this port ends the VM; the value written is the guest's
/// exit status (0 = success). An 8- or 16-bit write is accepted and zero-extended.
pub const DEBUG_EXIT: u16 = 0xf4;

/// Hypercall doorbell: a 32-bit `out imm8, eax` to this port is a hypercall. RAX holds the
/// hypercall number, RBX/RCX/RDX/RSI the arguments (RDI as well for the agent call), and the
/// VMM writes the result to RAX before the guest resumes.
pub const HYPERCALL_DOORBELL: u16 = 0xe4;
