//! Events the host sends to a tool, independent of any wire numbering.

use crate::error::ProtocolError;
use crate::kvm::{KvmRegs, KvmSregs};
use crate::types::{CpuMode, is_controllable_cr, is_controllable_msr};

/// Which event a message is. The discriminants are this crate's event numbers (they equal
/// the v4 bit positions and the later KVM-VMI enum values); a wire profile maps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    /// A control-register write (`KVMI_EVENT_CR`).
    Cr = 1,
    /// An MSR write (`KVMI_EVENT_MSR`).
    Msr = 2,
    /// An XCR0 write (`KVMI_EVENT_XSETBV`).
    Xsetbv = 3,
    /// A breakpoint hit (`KVMI_EVENT_BREAKPOINT`).
    Breakpoint = 4,
    /// The guest agent hypercall (`KVMI_EVENT_HYPERCALL`).
    Hypercall = 5,
    /// An access to a page whose rights the tool restricted (`KVMI_EVENT_PAGE_FAULT`).
    PageFault = 6,
    /// An exception or interrupt about to be delivered (`KVMI_EVENT_TRAP`).
    Trap = 7,
    /// A descriptor-table register access (`KVMI_EVENT_DESCRIPTOR`).
    Descriptor = 8,
    /// A vCPU was created (`KVMI_EVENT_CREATE_VCPU`).
    CreateVcpu = 9,
    /// A vCPU paused on request (`KVMI_EVENT_PAUSE_VCPU`).
    PauseVcpu = 10,
    /// A single step completed (`KVMI_EVENT_SINGLESTEP`).
    Singlestep = 11,
}

impl EventKind {
    /// The event's name as the reference spells it, in lower case without the `KVMI_EVENT_`
    /// prefix (`page_fault`, `msr`, `breakpoint`, ...): the name operators and tools use.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cr => "cr",
            Self::Msr => "msr",
            Self::Xsetbv => "xsetbv",
            Self::Breakpoint => "breakpoint",
            Self::Hypercall => "hypercall",
            Self::PageFault => "page_fault",
            Self::Trap => "trap",
            Self::Descriptor => "descriptor",
            Self::CreateVcpu => "create_vcpu",
            Self::PauseVcpu => "pause_vcpu",
            Self::Singlestep => "singlestep",
        }
    }

    /// The event kind whose [`name`](Self::name) is `name` (exact, lower case).
    pub fn from_name(name: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
    /// Every event kind.
    pub const ALL: [EventKind; 11] = [
        Self::Cr,
        Self::Msr,
        Self::Xsetbv,
        Self::Breakpoint,
        Self::Hypercall,
        Self::PageFault,
        Self::Trap,
        Self::Descriptor,
        Self::CreateVcpu,
        Self::PauseVcpu,
        Self::Singlestep,
    ];

    /// This crate's number for the event (see the type docs).
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// The kind with this number.
    pub fn from_number(number: u8) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.number() == number)
    }
}

/// A set of event kinds (bit `n` = the kind numbered `n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EventSet(u32);

impl EventSet {
    /// The empty set.
    pub const EMPTY: EventSet = EventSet(0);

    /// Every known event.
    pub const ALL: EventSet = {
        let mut bits = 0;
        let mut i = 0;
        while i < EventKind::ALL.len() {
            bits |= 1 << EventKind::ALL[i].number();
            i += 1;
        }
        EventSet(bits)
    };

    /// A set from raw bits (unknown bits are kept; see [`EventSet::is_known`]).
    pub const fn from_bits(bits: u32) -> EventSet {
        EventSet(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether only known events are in the set.
    pub const fn is_known(self) -> bool {
        self.0 & !Self::ALL.0 == 0
    }

    /// Whether `kind` is in the set.
    pub const fn contains(self, kind: EventKind) -> bool {
        self.0 & (1 << kind.number()) != 0
    }

    /// The set with `kind` added.
    pub const fn with(self, kind: EventKind) -> EventSet {
        EventSet(self.0 | 1 << kind.number())
    }

    /// The set with `kind` removed.
    pub const fn without(self, kind: EventKind) -> EventSet {
        EventSet(self.0 & !(1 << kind.number()))
    }
}

impl FromIterator<EventKind> for EventSet {
    fn from_iter<I: IntoIterator<Item = EventKind>>(iter: I) -> Self {
        iter.into_iter().fold(EventSet::EMPTY, EventSet::with)
    }
}

/// The MSRs every event carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[allow(missing_docs)] // MSR names are self-describing
pub struct EventMsrs {
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub efer: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub pat: u64,
}

/// The vCPU state every event carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventCommon {
    /// The vCPU that raised the event.
    pub vcpu: u16,
    /// Its operating mode.
    pub mode: CpuMode,
    /// General-purpose registers.
    pub regs: KvmRegs,
    /// Segment and control registers.
    pub sregs: KvmSregs,
    /// Selected MSRs.
    pub msrs: EventMsrs,
}

/// Descriptor-table registers reported by a descriptor event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DescriptorTable {
    /// IDTR (`KVMI_DESC_IDTR` = 1).
    Idtr,
    /// GDTR (`KVMI_DESC_GDTR` = 2).
    Gdtr,
    /// LDTR (`KVMI_DESC_LDTR` = 3).
    Ldtr,
    /// TR (`KVMI_DESC_TR` = 4).
    Tr,
}

impl DescriptorTable {
    /// The `KVMI_DESC_*` value.
    pub const fn value(self) -> u8 {
        match self {
            Self::Idtr => 1,
            Self::Gdtr => 2,
            Self::Ldtr => 3,
            Self::Tr => 4,
        }
    }

    /// The table for a `KVMI_DESC_*` value.
    pub const fn from_value(value: u8) -> Option<DescriptorTable> {
        match value {
            1 => Some(Self::Idtr),
            2 => Some(Self::Gdtr),
            3 => Some(Self::Ldtr),
            4 => Some(Self::Tr),
            _ => None,
        }
    }
}

/// The event-specific data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventPayload {
    /// The vCPU paused as asked by `PAUSE_VCPU`.
    PauseVcpu,
    /// A control register is about to be written.
    Cr {
        /// The register (0, 3 or 4).
        cr: u16,
        /// Its current value.
        old_value: u64,
        /// The value being written.
        new_value: u64,
    },
    /// An MSR is about to be written.
    Msr {
        /// The MSR.
        msr: u32,
        /// Its current value.
        old_value: u64,
        /// The value being written.
        new_value: u64,
    },
    /// XCR0 was written.
    Xsetbv,
    /// A breakpoint was hit.
    Breakpoint {
        /// Guest-physical address of the breakpoint instruction.
        gpa: u64,
    },
    /// The guest agent hypercall was made; its arguments are in the registers.
    Hypercall,
    /// An access violated the page rights the tool set.
    PageFault {
        /// Guest-virtual address (`!0` when unknown).
        gva: u64,
        /// Guest-physical address.
        gpa: u64,
        /// The access, as an EPT-violation exit qualification (bit 0 read, 1 write, 2 fetch).
        mode: u32,
    },
    /// An exception or interrupt is about to be delivered.
    Trap {
        /// Vector (0–255).
        vector: u32,
        /// Interruption type (as in the VMX interruption-information field).
        kind: u32,
        /// Error code.
        error_code: u32,
        /// CR2 (for #PF).
        cr2: u64,
    },
    /// A descriptor-table register was loaded or stored.
    Descriptor {
        /// Vendor exit information: VMX `{instr_info, exit_qualification}` (instruction info in
        /// the low half of word 0) or SVM `{exit_info, 0}`.
        arch: [u64; 2],
        /// The register.
        descriptor: DescriptorTable,
        /// A load (true) or a store.
        write: bool,
    },
    /// A vCPU was created.
    CreateVcpu,
    /// A single step completed.
    Singlestep,
}

impl EventPayload {
    /// The kind of event this payload belongs to.
    pub const fn kind(&self) -> EventKind {
        match self {
            Self::PauseVcpu => EventKind::PauseVcpu,
            Self::Cr { .. } => EventKind::Cr,
            Self::Msr { .. } => EventKind::Msr,
            Self::Xsetbv => EventKind::Xsetbv,
            Self::Breakpoint { .. } => EventKind::Breakpoint,
            Self::Hypercall => EventKind::Hypercall,
            Self::PageFault { .. } => EventKind::PageFault,
            Self::Trap { .. } => EventKind::Trap,
            Self::Descriptor { .. } => EventKind::Descriptor,
            Self::CreateVcpu => EventKind::CreateVcpu,
            Self::Singlestep => EventKind::Singlestep,
        }
    }
}

impl EventPayload {
    /// Field checks every wire profile makes: a CR event names CR0, CR3 or CR4, an MSR event
    /// an interceptable MSR, a trap a vector below 256.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |field, value| Err(ProtocolError::InvalidValue { field, value });
        match *self {
            Self::Cr { cr, .. } if !is_controllable_cr(cr.into()) => invalid("cr", cr.into()),
            Self::Msr { msr, .. } if !is_controllable_msr(msr) => invalid("msr", msr.into()),
            Self::Trap { vector, .. } if vector > 255 => invalid("vector", vector.into()),
            _ => Ok(()),
        }
    }
}

/// An event: the vCPU state plus the event-specific payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// vCPU state at the time of the event.
    pub common: EventCommon,
    /// What happened.
    pub payload: EventPayload,
}

impl Event {
    /// The kind of this event.
    pub const fn kind(&self) -> EventKind {
        self.payload.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_numbers_are_unique_and_round_trip() {
        for (i, a) in EventKind::ALL.iter().enumerate() {
            assert_eq!(EventKind::from_number(a.number()), Some(*a));
            for b in &EventKind::ALL[i + 1..] {
                assert_ne!(a.number(), b.number(), "{a:?} and {b:?}");
            }
        }
        assert_eq!(EventKind::from_number(0), None);
        assert_eq!(EventKind::from_number(12), None);
    }

    #[test]
    fn event_set_operations() {
        let set: EventSet = [EventKind::Cr, EventKind::PageFault].into_iter().collect();
        assert_eq!(set.bits(), (1 << 1) | (1 << 6));
        assert!(set.contains(EventKind::Cr));
        assert!(!set.contains(EventKind::Msr));
        assert!(!set.without(EventKind::Cr).contains(EventKind::Cr));
        assert!(set.is_known());
        assert_eq!(EventSet::ALL.bits(), 0b1111_1111_1110);
        assert!(!EventSet::from_bits(1).is_known());
        assert!(!EventSet::from_bits(1 << 12).is_known());
    }
}
