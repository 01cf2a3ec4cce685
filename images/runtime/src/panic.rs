//! The panic handler: prints the message on COM1 and exits with [`status::PANIC`].

use crate::{port, println, status};

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {info}");
    port::exit(status::PANIC)
}
