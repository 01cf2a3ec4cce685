//! Feeds arbitrary guest registers to the hypercall decoder (a doorbell exit from a hostile
//! guest): it must return a request or a typed error, and errors must encode to a RAX value
//! that decodes back to the same error.
#![no_main]

use hypercall::call::{HypercallRegs, Request};
use hypercall::error;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|regs: [u64; 6]| {
    let regs = HypercallRegs {
        rax: regs[0],
        rbx: regs[1],
        rcx: regs[2],
        rdx: regs[3],
        rsi: regs[4],
        rdi: regs[5],
    };
    if let Err(e) = Request::decode(&regs) {
        let rax = error::encode(Err(e));
        assert_eq!(error::decode(rax), Err(e));
    }
});
