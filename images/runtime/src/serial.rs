//! COM1 output (8250/16550 UART), polled, and the `print!`/`println!` macros.
//!
//! Each burst of up to 16 bytes (the 16550 FIFO depth) waits for the transmitter-holding
//! register to be empty (LSR bit 5). Lines from different vCPUs do not interleave: the
//! macros format into the port while holding [`SERIAL_LOCK`].

use core::fmt;

use hypercall::ports::SERIAL_COM1;

use crate::port::{inb, outb};
use crate::sync::SpinLock;

const LSR: u16 = SERIAL_COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
const FIFO_DEPTH: usize = 16;

/// Serialises whole `print!` calls between vCPUs.
pub static SERIAL_LOCK: SpinLock<()> = SpinLock::new(());

/// Writes raw bytes to COM1 (no locking; see [`SERIAL_LOCK`]).
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO_DEPTH) {
        while inb(LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        for &byte in chunk {
            outb(SERIAL_COM1, byte);
        }
    }
}

/// A `fmt::Write` sink on COM1.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Formats `args` to COM1 while holding [`SERIAL_LOCK`]. Used by [`print!`](crate::print).
pub fn print_args(args: fmt::Arguments<'_>) {
    let _guard = SERIAL_LOCK.lock();
    // Serial::write_str never fails.
    let _ = fmt::write(&mut Serial, args);
}

/// Prints to COM1 like `std::print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print_args(format_args!($($arg)*)) };
}

/// Prints a line to COM1 like `std::println!`.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print_args(format_args!("{}\n", format_args!($($arg)*))) };
}
