//! Exit statuses written to the debug-exit port by the runtime itself.
//!
//! Images use 0 for success and small values (3..=99) for their own failures.

/// The image finished successfully.
pub const SUCCESS: u32 = 0;
/// The command line has a bad value (or, for `test-guest`, an unknown `mode=`); the reason
/// was printed first.
pub const BAD_COMMAND_LINE: u32 = 2;
/// A Rust panic (the message was printed first).
pub const PANIC: u32 = 101;
/// A vCPU index at or above [`MAX_CPUS`](crate::MAX_CPUS) started; the runtime has no stack for it.
pub const TOO_MANY_VCPUS: u32 = 102;
/// The boot-info record has the wrong magic or version.
pub const BAD_BOOT_INFO: u32 = 103;
/// An unexpected CPU exception: `EXCEPTION_BASE + vector` (e.g. 0x10e for a page fault).
pub const EXCEPTION_BASE: u32 = 0x100;

/// The status for an unexpected exception with `vector`.
pub const fn exception(vector: u8) -> u32 {
    EXCEPTION_BASE + vector as u32
}
