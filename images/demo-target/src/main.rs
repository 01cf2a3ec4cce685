//! `demo-target`: a tiny OS to introspect (work in progress).
#![no_std]
#![no_main]

use guest_runtime::{Boot, port, println};

guest_runtime::entry!(main);

fn main(boot: Boot) -> ! {
    println!("demo-target vcpu {}", boot.vcpu);
    port::exit(0)
}
