//! Helpers for the introspection tool's end-to-end tests: a start gate the tool opens with
//! `WRITE_PHYSICAL` once its interceptions are in place (so no race with early guest code),
//! and a straight-line function whose single steps have known addresses.

use core::sync::atomic::{AtomicU64, Ordering};

use guest_runtime::{Boot, port, println, status};

/// Non-zero once the tool opened the gate (`kvmi_profile.sym.gate`).
pub static GATE: AtomicU64 = AtomicU64::new(0);

unsafe extern "sysv64" {
    /// Four one-byte `nop`s then `ret` (`kvmi_profile.sym.step_target`): single steps from
    /// its entry see rip = entry, +1, +2, +3, +4 (the `ret`), then the return address.
    fn step_target();
}

core::arch::global_asm!(
    ".pushsection .text.step_target, \"ax\"",
    ".globl step_target",
    ".p2align 4",
    "step_target:",
    "nop",
    "nop",
    "nop",
    "nop",
    "ret",
    ".popsection",
    ".globl \"kvmi_profile.sym.gate\"",
    ".set \"kvmi_profile.sym.gate\", {gate}",
    ".globl \"kvmi_profile.sym.step_target\"",
    ".set \"kvmi_profile.sym.step_target\", step_target",
    gate = sym GATE,
);

/// With `gate=1` on the command line: print `gate waiting`, spin until the tool writes a
/// non-zero value to `sym.gate`, print `gate open`. Without it: return at once.
pub fn wait_gate(boot: &Boot) {
    if boot.arg("gate") != Some(b"1") {
        return;
    }
    println!("gate waiting");
    while GATE.load(Ordering::Acquire) == 0 {
        core::hint::spin_loop();
    }
    println!("gate open");
}

/// `mode=step n=<count>` (default 1): calls `step_target` n times; prints `step calls=N`;
/// exit 0.
pub fn step(boot: Boot) -> ! {
    let count = boot.arg_u64_or_exit("n").unwrap_or(1);
    for _ in 0..count {
        // SAFETY: `step_target` only executes nops and returns; it touches no memory but the
        // return address on the stack.
        unsafe { step_target() };
    }
    println!("step calls={count}");
    port::exit(status::SUCCESS)
}
