//! `test-guest`: the image the VMM tests boot. `mode=` on the command line picks what it does
//! (see images/README.md); the default is `hello`.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use guest_runtime::{Boot, port, println, status};

guest_runtime::entry!(main);

fn main(boot: Boot) -> ! {
    let mode = boot.arg("mode").unwrap_or(b"hello");
    match mode {
        b"hello" => hello(boot),
        _ => {
            println!(
                "unknown mode {:?}",
                core::str::from_utf8(mode).unwrap_or("<not utf-8>")
            );
            port::exit(2)
        }
    }
}

/// vCPUs that have printed their greeting.
static GREETED: AtomicU32 = AtomicU32::new(0);

/// Prints a greeting from every vCPU; vCPU 0 exits with 0 once all have printed.
fn hello(boot: Boot) -> ! {
    println!("hello from vcpu {}", boot.vcpu);
    GREETED.fetch_add(1, Ordering::AcqRel);
    if boot.vcpu == 0 {
        while GREETED.load(Ordering::Acquire) < boot.vcpu_count() {
            core::hint::spin_loop();
        }
        port::exit(status::SUCCESS)
    }
    port::halt_forever()
}
