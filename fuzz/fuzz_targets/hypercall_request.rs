//! Feeds arbitrary guest registers to the hypercall decoder (a doorbell exit from a hostile
//! guest), and arbitrary values to the window check and the RAX result codec.
//!
//! Input: nine little-endian `u64`s (zero-padded): RAX, RBX, RCX, RDX, RSI, RDI, then a map
//! window's base and size, then a raw RAX result. Checks:
//! - a decoded request is the call RAX names, carries its arguments unchanged, and satisfies
//!   every documented rule (8-aligned token whose 32 bytes do not wrap, page-aligned
//!   addresses, 1..=512 pages whose range does not wrap, the agent call's Xen sub-function);
//!   re-encoding it into registers decodes to the same request;
//! - registers a call does not use do not change its outcome (RDI for all but the agent call);
//! - an error is `NoSys` exactly when RAX is no hypercall number, is never `Unrecognized`, and
//!   survives the RAX round trip;
//! - `check_window` accepts exactly the ranges inside the window (checked in 128 bits);
//! - any RAX decodes, and a known result re-encodes to the same RAX.
#![no_main]

use hypercall::call::{
    AGENT_GUEST_REQUEST, AGENT_GUEST_REQUEST_ARG, Hypercall, HypercallRegs, MAX_RANGE_PAGES,
    PAGE_SIZE, Request, check_window,
};
use hypercall::error::{self, HcError, MAX_RESULT};
use hypercall::token::TOKEN_SIZE;
use kvmi_fuzz::take_u64s;
use libfuzzer_sys::fuzz_target;

fn token_ok(gpa: u64) {
    assert!(gpa.is_multiple_of(8), "token {gpa:#x}");
    assert!(
        gpa.checked_add(TOKEN_SIZE as u64).is_some(),
        "token {gpa:#x}"
    );
}

fn range_ok(gpa: u64, pages: u64) {
    assert!(gpa.is_multiple_of(PAGE_SIZE), "{gpa:#x}");
    assert!(
        gpa.checked_add(pages * PAGE_SIZE).is_some(),
        "{gpa:#x} + {pages} pages"
    );
}

fn check_request(regs: &HypercallRegs, request: &Request) {
    let call = Hypercall::try_from(regs.rax).expect("a request has a number");
    let [a0, a1, a2, a3] = regs.args();
    match *request {
        Request::MemMap {
            token_gpa,
            target_gpa,
            window_gpa,
        } => {
            assert_eq!(call, Hypercall::MemMap);
            assert_eq!((token_gpa, target_gpa, window_gpa), (a0, a1, a2));
            token_ok(token_gpa);
            range_ok(target_gpa, 0);
            range_ok(window_gpa, 0);
        }
        Request::MemUnmap { window_gpa } => {
            assert_eq!((call, window_gpa), (Hypercall::MemUnmap, a0));
            range_ok(window_gpa, 0);
        }
        Request::Agent => {
            assert_eq!(call, Hypercall::Agent);
            assert_eq!(
                (regs.rdi, regs.rsi),
                (AGENT_GUEST_REQUEST, AGENT_GUEST_REQUEST_ARG)
            );
        }
        Request::Version => assert_eq!(call, Hypercall::Version),
        Request::Features => assert_eq!(call, Hypercall::Features),
        Request::MapRange {
            token_gpa,
            target_gpa,
            window_gpa,
            pages,
        } => {
            assert_eq!(call, Hypercall::MapRange);
            assert_eq!((token_gpa, target_gpa, window_gpa, pages), (a0, a1, a2, a3));
            assert!((1..=MAX_RANGE_PAGES).contains(&pages), "{pages} pages");
            token_ok(token_gpa);
            range_ok(target_gpa, pages);
            range_ok(window_gpa, pages);
        }
        Request::RevokeAll => assert_eq!(call, Hypercall::RevokeAll),
        Request::Notify { ring } => assert_eq!((call, ring), (Hypercall::Notify, a0)),
    }
    assert_eq!(
        Request::decode(&request.encode()),
        Ok(*request),
        "re-encoded"
    );
}

fn check_error(regs: &HypercallRegs, e: HcError) {
    assert_ne!(e, HcError::Unrecognized);
    assert_eq!(
        e == HcError::NoSys,
        Hypercall::try_from(regs.rax).is_err(),
        "{e:?}"
    );
    assert_eq!(error::decode(error::encode(Err(e))), Err(e));
}

fn check_window_bounds(gpa: u64, pages: u64, base: u64, size: u64) {
    let inside = u128::from(gpa) >= u128::from(base)
        && u128::from(gpa) + u128::from(pages) * u128::from(PAGE_SIZE)
            <= u128::from(base) + u128::from(size)
        && base.checked_add(size).is_some();
    let got = check_window(gpa, pages, base, size);
    assert_eq!(
        got.is_ok(),
        inside,
        "{gpa:#x} +{pages} in {base:#x}+{size:#x}"
    );
    if let Err(e) = got {
        assert_eq!(e, HcError::OutsideWindow);
    }
}

fuzz_target!(|data: &[u8]| {
    let ([rax, rbx, rcx, rdx, rsi, rdi, base, size, raw], _) = take_u64s::<9>(data);
    let regs = HypercallRegs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
    };
    let decoded = Request::decode(&regs);
    match &decoded {
        Ok(request) => check_request(&regs, request),
        Err(e) => check_error(&regs, *e),
    }
    assert_eq!(Request::decode(&regs), decoded, "decoding is deterministic");
    if Hypercall::try_from(rax) != Ok(Hypercall::Agent) {
        let other = HypercallRegs { rdi: !rdi, ..regs };
        assert_eq!(Request::decode(&other), decoded, "RDI matters to {rax:#x}");
    }
    // The window check, for the request's own range and for arbitrary values.
    if let Ok(Request::MapRange {
        window_gpa, pages, ..
    }) = decoded
    {
        check_window_bounds(window_gpa, pages, base, size);
    }
    check_window_bounds(rbx, rsi, base, size);
    // Any RAX decodes; a success or a known error re-encodes to the same RAX.
    match error::decode(raw) {
        Ok(v) => {
            assert!(v <= MAX_RESULT);
            assert_eq!(error::encode(Ok(v)), raw);
        }
        Err(HcError::Unrecognized) => assert!(raw > MAX_RESULT),
        Err(e) => assert_eq!(e.to_rax(), raw),
    }
});
