//! Byte-exact mirrors of the KVM structs that KVMI messages embed.
//!
//! KVMI carries `struct kvm_regs`, `struct kvm_sregs` and `struct kvm_msr_entry` verbatim, so
//! these are KVM's own x86-64 layouts, shared by every wire profile. The fields use zerocopy's
//! little-endian integer types, so every struct is `Unaligned` and can be viewed in place at
//! any offset of a socket or ring buffer. KVM's own padding fields are carried verbatim (KVM
//! ignores them), so they are not validated. The host shim converts these to and from
//! `kvm-bindings`.

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct kvm_regs`: the general-purpose registers (144 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
#[allow(missing_docs)] // register names are self-describing
pub struct KvmRegs {
    pub rax: U64,
    pub rbx: U64,
    pub rcx: U64,
    pub rdx: U64,
    pub rsi: U64,
    pub rdi: U64,
    pub rsp: U64,
    pub rbp: U64,
    pub r8: U64,
    pub r9: U64,
    pub r10: U64,
    pub r11: U64,
    pub r12: U64,
    pub r13: U64,
    pub r14: U64,
    pub r15: U64,
    pub rip: U64,
    pub rflags: U64,
}

/// `struct kvm_segment`: one segment register with its hidden descriptor cache (24 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct KvmSegment {
    /// Segment base address.
    pub base: U64,
    /// Segment limit.
    pub limit: U32,
    /// Selector.
    pub selector: U16,
    /// Descriptor type.
    pub type_: u8,
    /// Present bit.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B bit).
    pub db: u8,
    /// Descriptor type (S bit: 1 = code/data).
    pub s: u8,
    /// 64-bit code segment (L bit).
    pub l: u8,
    /// Granularity bit.
    pub g: u8,
    /// Available-for-software bit.
    pub avl: u8,
    /// KVM's "unusable" flag.
    pub unusable: u8,
    /// KVM padding.
    pub padding: u8,
}

/// `struct kvm_dtable`: a descriptor-table register, GDTR or IDTR (16 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct KvmDtable {
    /// Table base address.
    pub base: U64,
    /// Table limit.
    pub limit: U16,
    /// KVM padding.
    pub padding: [U16; 3],
}

/// `struct kvm_sregs`: segment, control and system registers (312 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
#[allow(missing_docs)] // register names are self-describing
pub struct KvmSregs {
    pub cs: KvmSegment,
    pub ds: KvmSegment,
    pub es: KvmSegment,
    pub fs: KvmSegment,
    pub gs: KvmSegment,
    pub ss: KvmSegment,
    pub tr: KvmSegment,
    pub ldt: KvmSegment,
    pub gdt: KvmDtable,
    pub idt: KvmDtable,
    pub cr0: U64,
    pub cr2: U64,
    pub cr3: U64,
    pub cr4: U64,
    pub cr8: U64,
    pub efer: U64,
    pub apic_base: U64,
    /// Pending external interrupts, one bit per vector.
    pub interrupt_bitmap: [U64; 4],
}

/// `struct kvm_msr_entry`: one MSR index and value (16 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct KvmMsrEntry {
    /// MSR index.
    pub index: U32,
    /// Reserved, zero on the wire.
    pub reserved: U32,
    /// MSR value.
    pub data: U64,
}

const _: () = assert!(size_of::<KvmRegs>() == 144);
const _: () = assert!(offset_of!(KvmRegs, r8) == 64);
const _: () = assert!(offset_of!(KvmRegs, rip) == 128);
const _: () = assert!(offset_of!(KvmRegs, rflags) == 136);

const _: () = assert!(size_of::<KvmSegment>() == 24);
const _: () = assert!(offset_of!(KvmSegment, limit) == 8);
const _: () = assert!(offset_of!(KvmSegment, selector) == 12);
const _: () = assert!(offset_of!(KvmSegment, type_) == 14);
const _: () = assert!(offset_of!(KvmSegment, padding) == 23);

const _: () = assert!(size_of::<KvmDtable>() == 16);
const _: () = assert!(offset_of!(KvmDtable, limit) == 8);

const _: () = assert!(size_of::<KvmSregs>() == 312);
const _: () = assert!(offset_of!(KvmSregs, cs) == 0);
const _: () = assert!(offset_of!(KvmSregs, ds) == 24);
const _: () = assert!(offset_of!(KvmSregs, es) == 48);
const _: () = assert!(offset_of!(KvmSregs, fs) == 72);
const _: () = assert!(offset_of!(KvmSregs, gs) == 96);
const _: () = assert!(offset_of!(KvmSregs, ss) == 120);
const _: () = assert!(offset_of!(KvmSregs, tr) == 144);
const _: () = assert!(offset_of!(KvmSregs, ldt) == 168);
const _: () = assert!(offset_of!(KvmSregs, gdt) == 192);
const _: () = assert!(offset_of!(KvmSregs, idt) == 208);
const _: () = assert!(offset_of!(KvmSregs, cr0) == 224);
const _: () = assert!(offset_of!(KvmSregs, cr2) == 232);
const _: () = assert!(offset_of!(KvmSregs, cr3) == 240);
const _: () = assert!(offset_of!(KvmSregs, cr4) == 248);
const _: () = assert!(offset_of!(KvmSregs, cr8) == 256);
const _: () = assert!(offset_of!(KvmSregs, efer) == 264);
const _: () = assert!(offset_of!(KvmSregs, apic_base) == 272);
const _: () = assert!(offset_of!(KvmSregs, interrupt_bitmap) == 280);

const _: () = assert!(size_of::<KvmMsrEntry>() == 16);
const _: () = assert!(offset_of!(KvmMsrEntry, reserved) == 4);
const _: () = assert!(offset_of!(KvmMsrEntry, data) == 8);
