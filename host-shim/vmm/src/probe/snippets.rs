//! Hand-assembled 64-bit machine code for the probe VMs (loaded at [`CODE_GPA`], entered at
//! CPL0 in the boot contract's long-mode state). Each snippet reports progress with
//! `out imm8` to [`DONE_PORT`] / [`NEXT_PORT`] and ends in `jmp $` so that a missed exit
//! spins (and the watchdog kicks it) instead of running into garbage.

/// Where the snippet is loaded and entered.
pub const CODE_GPA: u64 = 0x1000;
/// A scratch data page inside probe RAM.
pub const DATA_GPA: u64 = 0x3000;
/// Where probes map extra slots (read-only slot, remap window): inside the identity map,
/// outside probe RAM.
pub const SLOT_GPA: u64 = 0x10_0000;
/// "Done" port (`out 0x10, al` / `out 0x10, eax`).
pub const DONE_PORT: u16 = 0x10;
/// "Next step" port (`out 0x11, al`).
pub const NEXT_PORT: u16 = 0x11;

/// `int3; out 0x10, al; jmp $`.
pub const INT3: &[u8] = &[0xcc, 0xe6, 0x10, 0xeb, 0xfe];

/// `nop ×4; out 0x10, al; jmp $` — hardware breakpoints on the four nops.
pub const FOUR_NOPS: &[u8] = &[0x90, 0x90, 0x90, 0x90, 0xe6, 0x10, 0xeb, 0xfe];

/// `mov ecx, 0x174; xor eax, eax; xor edx, edx; wrmsr; out 0x10, al; jmp $`.
pub const WRMSR_SYSENTER_CS: &[u8] = &[
    0xb9, 0x74, 0x01, 0x00, 0x00, // mov ecx, 0x174
    0x31, 0xc0, // xor eax, eax
    0x31, 0xd2, // xor edx, edx
    0x0f, 0x30, // wrmsr
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xfe, // jmp $
];

/// The value [`RO_SLOT`] writes into the read-only slot.
pub const RO_WRITE_VALUE: u32 = 0x1234_5678;

/// `mov eax, [SLOT_GPA]; out 0x10, eax; mov dword [SLOT_GPA], 0x12345678; out 0x11, al; jmp $`.
pub const RO_SLOT: &[u8] = &[
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00, // mov eax, [0x100000]
    0xe7, 0x10, // out 0x10, eax
    0xc7, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00, 0x78, 0x56, 0x34,
    0x12, // mov dword [0x100000], imm
    0xe6, 0x11, // out 0x11, al
    0xeb, 0xfe, // jmp $
];

/// The value [`TWO_WRITES`] writes second (while the page is write-protected on the host).
pub const PROTECTED_WRITE_VALUE: u32 = 0xdead_beef;

/// `mov dword [DATA_GPA], 0x11111111; out 0x10, al; mov dword [DATA_GPA], 0xdeadbeef;
/// out 0x11, al; jmp $` — the host protects the page between the two writes.
pub const TWO_WRITES: &[u8] = &[
    0xc7, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0x11, 0x11, 0x11,
    0x11, // mov dword [0x3000], imm
    0xe6, 0x10, // out 0x10, al
    0xc7, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0xef, 0xbe, 0xad,
    0xde, // mov dword [0x3000], imm
    0xe6, 0x11, // out 0x11, al
    0xeb, 0xfe, // jmp $
];

/// A second scratch page, written by [`TWO_PAGES`] after the first fetch of the dirty log.
pub const DIRTY_GPA: u64 = 0x5000;

/// `mov dword [DATA_GPA], 0x11111111; out 0x10, al; mov dword [DIRTY_GPA], 0x22222222;
/// out 0x11, al; jmp $` — the dirty-log probe fetches the log at each `out`.
pub const TWO_PAGES: &[u8] = &[
    0xc7, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0x11, 0x11, 0x11,
    0x11, // mov dword [0x3000], imm
    0xe6, 0x10, // out 0x10, al
    0xc7, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0x22, 0x22, 0x22,
    0x22, // mov dword [0x5000], imm
    0xe6, 0x11, // out 0x11, al
    0xeb, 0xfe, // jmp $
];

/// The marker VM A writes for the remap probe.
pub const REMAP_MARKER: u32 = 0x5a17_c0de;

/// VM A: `mov dword [DATA_GPA], 0x5a17c0de; out 0x10, al; jmp $`.
pub const WRITE_MARKER: &[u8] = &[
    0xc7, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0xde, 0xc0, 0x17,
    0x5a, // mov dword [0x3000], imm
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xfe, // jmp $
];

/// VM B: `mov eax, [SLOT_GPA]; out 0x10, eax; jmp $`.
pub const READ_WINDOW: &[u8] = &[
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00, // mov eax, [0x100000]
    0xe7, 0x10, // out 0x10, eax
    0xeb, 0xfe, // jmp $
];

/// `test ecx, ecx; jz done; loop: dec ecx; jnz loop; done: out 0x10, al; jmp $` — RCX
/// iterations of a two-instruction loop, for timing CPL0 execution.
pub const COUNT_DOWN: &[u8] = &[
    0x85, 0xc9, // test ecx, ecx
    0x74, 0x04, // jz +4 (done)
    0xff, 0xc9, // dec ecx
    0x75, 0xfc, // jnz -4 (dec)
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xfe, // jmp $
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediates_match_the_named_constants() {
        assert_eq!(&RO_SLOT[16..20], &RO_WRITE_VALUE.to_le_bytes());
        assert_eq!(&TWO_WRITES[20..24], &PROTECTED_WRITE_VALUE.to_le_bytes());
        assert_eq!(&WRITE_MARKER[7..11], &REMAP_MARKER.to_le_bytes());
        assert_eq!(&RO_SLOT[3..7], &(SLOT_GPA as u32).to_le_bytes());
        assert_eq!(&READ_WINDOW[3..7], &(SLOT_GPA as u32).to_le_bytes());
        assert_eq!(&TWO_WRITES[3..7], &(DATA_GPA as u32).to_le_bytes());
        assert_eq!(&TWO_PAGES[3..7], &(DATA_GPA as u32).to_le_bytes());
        assert_eq!(&TWO_PAGES[16..20], &(DIRTY_GPA as u32).to_le_bytes());
    }
}
