//! The compiled guard policy: what the agent guards on each target, every address already
//! resolved. The host compiles a policy file (`kvmi-policy`, `docs/policy.md`) against the
//! targets' profiles and hands the result to the appliance VM as JSON bytes; the agent decodes
//! them with [`CompiledPolicy::from_json`], which checks everything again (the bytes are
//! untrusted), picks its target's rules with [`CompiledPolicy::for_target`] and builds a
//! [`GuardPlan`](crate::guard::GuardPlan) from them.
//!
//! ```json
//! { "format": 1, "guards": [ { "profile": "demo-target", "targets": [], "scan_ms": 50,
//!     "protect": [ { "name": "kernel_text", "start": 1048576, "end": 1077248,
//!                    "allow": "rx", "from": "user", "action": "deny" } ],
//!     "trace": [ { "function": "task_create", "addr": 1054544, "args": [
//!         { "reg": "rdi", "name": "name_ptr", "kind": "pointer" },
//!         { "reg": "rdi", "name": "name", "kind": { "str": { "len_reg": "rsi", "max_len": 32 } } }
//!     ] } ] } ] }
//! ```

use alloc::collections::BTreeSet;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use protocol::kvm::KvmRegs;
use protocol::types::Access;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::profile::{Profile, ProfileError};

/// The compiled-policy format this crate reads and writes.
pub const POLICY_FORMAT: u32 = 1;
/// Largest compiled policy accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// Most guards in a policy.
pub const MAX_GUARDS: usize = 64;
/// Most target names in one guard.
pub const MAX_TARGETS: usize = 64;
/// Most protect rules in one guard (and, separately, most trace rules).
pub const MAX_RULES: usize = 64;
/// Most arguments of one traced function.
pub const MAX_ARGS: usize = 16;
/// Largest protected range, in bytes (16 MiB).
pub const MAX_RANGE_BYTES: u64 = 16 << 20;
/// Largest number of protected pages in one guard (64 MiB).
pub const MAX_PAGES: u64 = 16384;
/// Longest string argument read from the target, in bytes.
pub const MAX_STRING: u32 = 256;
/// Longest name (rule, function, argument, profile, target), in bytes.
pub const MAX_NAME: usize = 64;
/// Largest `scan_ms` (one minute).
pub const MAX_SCAN_MS: u64 = 60_000;
/// Guest-physical addresses are below 2^52 (the architectural MAXPHYADDR limit).
pub const PHYS_LIMIT: u64 = 1 << 52;
/// Field names every trace line has, which an argument may not take.
pub const RESERVED_ARG_NAMES: [&str; 3] = ["finding", "vcpu", "cr3"];

/// Why a compiled policy is refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The JSON does not parse or has the wrong shape (unknown keys included).
    #[error("policy JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The bytes are longer than [`MAX_POLICY_BYTES`].
    #[error("policy is {0} bytes, more than {MAX_POLICY_BYTES}")]
    TooLarge(usize),
    /// The format number is not [`POLICY_FORMAT`].
    #[error("unsupported policy format {0} (expected {POLICY_FORMAT})")]
    Format(u32),
    /// A value is impossible or out of bounds.
    #[error("{at}: {problem}")]
    Invalid {
        /// Where.
        at: Location,
        /// What is wrong.
        problem: Problem,
    },
}

/// What is wrong with a value of a compiled policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The policy has no guard.
    #[error("the policy has no guard")]
    NoGuards,
    /// A list is longer than its bound.
    #[error("more than {max} entries")]
    TooMany {
        /// The bound.
        max: usize,
    },
    /// A range with `start == end`.
    #[error("the range is empty")]
    EmptyRange,
    /// A range with `end < start`.
    #[error("the range ends before it starts")]
    InvertedRange,
    /// A range longer than [`MAX_RANGE_BYTES`].
    #[error("the range is {bytes} bytes, more than 16 MiB")]
    RangeTooLarge {
        /// Its length.
        bytes: u64,
    },
    /// A guest-physical address at or above [`PHYS_LIMIT`].
    #[error("address {0:#x} is beyond the 52-bit physical address space")]
    AddressTooHigh(u64),
    /// The protect rules of a guard cover more than [`MAX_PAGES`] pages.
    #[error("the protected ranges cover {pages} pages, more than {MAX_PAGES}")]
    TooManyPages {
        /// Pages covered.
        pages: u64,
    },
    /// `allow` keeps every access: the rule protects nothing.
    #[error("allow = \"rwx\" denies nothing")]
    DeniesNothing,
    /// `allow` has `w` without `r`: x86 page tables cannot express a write-only page.
    #[error("allow = \"{0}\" allows writes but not reads, which pages cannot express")]
    WriteWithoutRead(AccessBits),
    /// A name is empty, too long or not printable ASCII.
    #[error("name {0:?} is empty, longer than 64 bytes or not printable ASCII without spaces")]
    BadName(String),
    /// An argument name is not 1 to 64 letters, digits or `_`.
    #[error("argument name {0:?} is not 1 to 64 letters, digits or _")]
    BadArgName(String),
    /// An argument name is one of [`RESERVED_ARG_NAMES`].
    #[error("argument name {0:?} is taken by every trace line (finding, vcpu, cr3)")]
    ReservedName(String),
    /// A name that must be unique appears twice.
    #[error("{0:?} appears twice")]
    Duplicate(String),
    /// Two trace rules on one address.
    #[error("address {0:#x} is traced twice")]
    DuplicateAddress(u64),
    /// A string argument's `max_len` is outside `1..=MAX_STRING`.
    #[error("max_len {0} is outside 1..=256")]
    MaxLen(u32),
    /// `scan_ms` is outside `1..=MAX_SCAN_MS`.
    #[error("scan_ms {0} is outside 1..=60000")]
    ScanMs(u64),
    /// Two guards apply to the same target, so the second would never be chosen.
    #[error("{0} is already guarded by an earlier guard")]
    Shadowed(String),
}

/// Where in a compiled policy a [`Problem`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index in [`CompiledPolicy::guards`]; `None` for the policy itself, or for rules
    /// checked on their own ([`TargetRules::validate`]).
    pub guard: Option<usize>,
    /// The entry of the guard, if the problem is in one.
    pub item: Option<Item>,
    /// The field's name in the compiled JSON (`""` for the whole entry).
    pub field: &'static str,
}

/// An entry of a guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// `targets[i]`.
    Target(usize),
    /// `protect[i]`.
    Protect(usize),
    /// `trace[i]`.
    Trace(usize),
    /// `trace[i].args[j]`.
    Arg(usize, usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(g) = self.guard {
            parts.push(alloc::format!("guards[{g}]"));
        }
        match self.item {
            Some(Item::Target(i)) => parts.push(alloc::format!("targets[{i}]")),
            Some(Item::Protect(i)) => parts.push(alloc::format!("protect[{i}]")),
            Some(Item::Trace(i)) => parts.push(alloc::format!("trace[{i}]")),
            Some(Item::Arg(i, j)) => parts.push(alloc::format!("trace[{i}].args[{j}]")),
            None => {}
        }
        if !self.field.is_empty() {
            parts.push(self.field.to_string());
        }
        if parts.is_empty() {
            f.write_str("policy")
        } else {
            f.write_str(&parts.join("."))
        }
    }
}

/// A set of page accesses: bit 1 read, 2 write, 4 execute (the KVMI access bits and the
/// page-fault event's `mode` bits). In JSON a string of the letters `r`, `w`, `x` in that
/// order (`""` for none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccessBits(u8);

impl AccessBits {
    /// Nothing.
    pub const NONE: AccessBits = AccessBits(0);
    /// Read.
    pub const R: AccessBits = AccessBits(1);
    /// Write.
    pub const W: AccessBits = AccessBits(2);
    /// Execute.
    pub const X: AccessBits = AccessBits(4);
    /// Everything.
    pub const RWX: AccessBits = AccessBits(7);

    /// The set of the low three bits of `bits` (a page-fault event's `mode`).
    pub const fn from_mode(bits: u32) -> AccessBits {
        AccessBits((bits & 7) as u8)
    }

    /// The bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every access in `other` is in `self`.
    pub const fn contains(self, other: AccessBits) -> bool {
        self.0 & other.0 == other.0
    }

    /// The accesses in both.
    pub const fn intersection(self, other: AccessBits) -> AccessBits {
        AccessBits(self.0 & other.0)
    }

    /// The accesses in `self` and not in `other`.
    pub const fn difference(self, other: AccessBits) -> AccessBits {
        AccessBits(self.0 & !other.0 & 7)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The KVMI page access with the same bits.
    pub fn access(self) -> Access {
        Access::from_bits(self.0).unwrap_or(Access::NONE)
    }

    /// The letters, `rwx` order (`""` for none).
    pub const fn as_str(self) -> &'static str {
        match self.0 & 7 {
            0 => "",
            1 => "r",
            2 => "w",
            3 => "rw",
            4 => "x",
            5 => "rx",
            6 => "wx",
            _ => "rwx",
        }
    }

    /// Parses letters `r`, `w`, `x`, each at most once, in any order; `""` or `"none"` is
    /// the empty set.
    pub fn parse(text: &str) -> Option<AccessBits> {
        if text == "none" {
            return Some(AccessBits::NONE);
        }
        let mut bits = 0u8;
        for c in text.chars() {
            let bit = match c {
                'r' => 1,
                'w' => 2,
                'x' => 4,
                _ => return None,
            };
            if bits & bit != 0 {
                return None;
            }
            bits |= bit;
        }
        Some(AccessBits(bits))
    }
}

impl fmt::Display for AccessBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for AccessBits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AccessBits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = AccessBits;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("access letters r, w, x")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AccessBits, E> {
                AccessBits::parse(v)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Whose violating accesses a protect rule acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    /// User mode (CS RPL 3, see [`from_user`](crate::guard::from_user)).
    User,
    /// Kernel mode (any other CPL).
    Kernel,
    /// Everyone.
    Any,
}

impl Who {
    /// Whether an access from user mode (`user`) or the kernel is one this covers.
    pub const fn matches(self, user: bool) -> bool {
        match self {
            Who::User => user,
            Who::Kernel => !user,
            Who::Any => true,
        }
    }

    /// The JSON name.
    pub const fn name(self) -> &'static str {
        match self {
            Who::User => "user",
            Who::Kernel => "kernel",
            Who::Any => "any",
        }
    }
}

/// What a protect rule does with a violating access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Violation {
    /// Drop the access (reply SKIP) and report it.
    Deny,
    /// Let it through (reply CONTINUE) and report it.
    Log,
    /// Drop it (SKIP), report it, and ask the agent loop to pause the whole target.
    Pause,
    /// Stop the target (reply CRASH) and report it.
    Crash,
}

impl Violation {
    /// The JSON name.
    pub const fn name(self) -> &'static str {
        match self {
            Violation::Deny => "deny",
            Violation::Log => "log",
            Violation::Pause => "pause",
            Violation::Crash => "crash",
        }
    }
}

/// A general-purpose register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Reg {
    Rax,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rsp,
    Rbp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

impl Reg {
    /// Every register, in `KvmRegs` order.
    pub const ALL: [Reg; 16] = [
        Reg::Rax,
        Reg::Rbx,
        Reg::Rcx,
        Reg::Rdx,
        Reg::Rsi,
        Reg::Rdi,
        Reg::Rsp,
        Reg::Rbp,
        Reg::R8,
        Reg::R9,
        Reg::R10,
        Reg::R11,
        Reg::R12,
        Reg::R13,
        Reg::R14,
        Reg::R15,
    ];

    /// The lower-case name (`rdi`).
    pub const fn name(self) -> &'static str {
        match self {
            Reg::Rax => "rax",
            Reg::Rbx => "rbx",
            Reg::Rcx => "rcx",
            Reg::Rdx => "rdx",
            Reg::Rsi => "rsi",
            Reg::Rdi => "rdi",
            Reg::Rsp => "rsp",
            Reg::Rbp => "rbp",
            Reg::R8 => "r8",
            Reg::R9 => "r9",
            Reg::R10 => "r10",
            Reg::R11 => "r11",
            Reg::R12 => "r12",
            Reg::R13 => "r13",
            Reg::R14 => "r14",
            Reg::R15 => "r15",
        }
    }

    /// The register named `name` (lower case).
    pub fn parse(name: &str) -> Option<Reg> {
        Reg::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Its value in `regs`.
    pub fn get(self, regs: &KvmRegs) -> u64 {
        match self {
            Reg::Rax => regs.rax.get(),
            Reg::Rbx => regs.rbx.get(),
            Reg::Rcx => regs.rcx.get(),
            Reg::Rdx => regs.rdx.get(),
            Reg::Rsi => regs.rsi.get(),
            Reg::Rdi => regs.rdi.get(),
            Reg::Rsp => regs.rsp.get(),
            Reg::Rbp => regs.rbp.get(),
            Reg::R8 => regs.r8.get(),
            Reg::R9 => regs.r9.get(),
            Reg::R10 => regs.r10.get(),
            Reg::R11 => regs.r11.get(),
            Reg::R12 => regs.r12.get(),
            Reg::R13 => regs.r13.get(),
            Reg::R14 => regs.r14.get(),
            Reg::R15 => regs.r15.get(),
        }
    }
}

/// How a traced argument is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ArgKind {
    /// The register, as an unsigned 64-bit number.
    Int,
    /// The register's low 32 bits.
    U32,
    /// The register as an address (the same JSON number as `Int`).
    Pointer,
    /// A NUL-terminated string read from the target at the register's address, at most
    /// `max_len` bytes.
    #[serde(rename = "cstr")]
    CStr {
        /// Most bytes read (1..=[`MAX_STRING`]).
        max_len: u32,
    },
    /// A string at the register's address whose length is in `len_reg`, clamped to
    /// `max_len`.
    Str {
        /// The register holding the length.
        len_reg: Reg,
        /// Most bytes read (1..=[`MAX_STRING`]).
        max_len: u32,
    },
}

impl ArgKind {
    /// The bound on bytes read, for string kinds.
    pub const fn max_len(self) -> Option<u32> {
        match self {
            ArgKind::CStr { max_len } | ArgKind::Str { max_len, .. } => Some(max_len),
            _ => None,
        }
    }
}

/// One argument of a traced function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceArg {
    /// The register holding it at the function's first instruction.
    pub reg: Reg,
    /// The field name in the finding.
    pub name: String,
    /// How it is reported.
    pub kind: ArgKind,
}

/// A function to trace with a breakpoint: each call is a finding named after the function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRule {
    /// Its name (the finding's `"finding"`).
    pub function: String,
    /// The breakpoint address (guest-virtual; identity-mapped kernels: also physical).
    pub addr: u64,
    /// The arguments reported.
    #[serde(default)]
    pub args: Vec<TraceArg>,
}

/// A guest-physical range whose pages keep only some accesses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectRule {
    /// Its name (the findings' `"range"`).
    pub name: String,
    /// First guest-physical address.
    pub start: u64,
    /// One past the last (exclusive).
    pub end: u64,
    /// The accesses that stay allowed; the rule denies at least one.
    pub allow: AccessBits,
    /// Whose violating accesses `action` applies to; the others are let through (counted).
    pub from: Who,
    /// What happens to a violating access.
    pub action: Violation,
}

impl ProtectRule {
    /// Whether `gpa` is in the range.
    pub fn contains(&self, gpa: u64) -> bool {
        (self.start..self.end).contains(&gpa)
    }

    /// The accesses of `mode` this rule denies (empty: none).
    pub fn denied(&self, mode: AccessBits) -> AccessBits {
        mode.difference(self.allow)
    }

    /// The number of pages the range touches.
    pub fn pages(&self) -> u64 {
        self.end.div_ceil(4096).saturating_sub(self.start / 4096)
    }
}

fn default_scan_ms() -> u64 {
    50
}

/// The rules for the targets of one profile, or for some named targets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRules {
    /// The profile (image name) the addresses were resolved against.
    pub profile: String,
    /// The target names these rules are for; empty: every target of `profile`.
    #[serde(default)]
    pub targets: Vec<String>,
    /// How often the agent re-lists the task table, in milliseconds.
    #[serde(default = "default_scan_ms")]
    pub scan_ms: u64,
    /// Write/read/execute protection.
    #[serde(default)]
    pub protect: Vec<ProtectRule>,
    /// Traced functions.
    #[serde(default)]
    pub trace: Vec<TraceRule>,
}

/// A compiled policy: every guard with addresses resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompiledPolicy {
    /// [`POLICY_FORMAT`].
    pub format: u32,
    /// The guards, in the order the policy file gave them.
    pub guards: Vec<TargetRules>,
}

fn name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.bytes().all(|b| b.is_ascii_graphic())
}

fn arg_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl TargetRules {
    /// Checks every bound and consistency rule; `guard` is its index in the policy, for the
    /// error's [`Location`].
    pub fn validate(&self, guard: Option<usize>) -> Result<(), PolicyError> {
        let at = |item: Option<Item>, field: &'static str, problem: Problem| {
            Err(PolicyError::Invalid {
                at: Location { guard, item, field },
                problem,
            })
        };
        if !name_ok(&self.profile) {
            return at(None, "profile", Problem::BadName(self.profile.clone()));
        }
        if self.targets.len() > MAX_TARGETS {
            return at(None, "targets", Problem::TooMany { max: MAX_TARGETS });
        }
        let mut seen = BTreeSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            let item = Some(Item::Target(i));
            if !name_ok(target) {
                return at(item, "", Problem::BadName(target.clone()));
            }
            if !seen.insert(target.as_str()) {
                return at(item, "", Problem::Duplicate(target.clone()));
            }
        }
        if self.scan_ms == 0 || self.scan_ms > MAX_SCAN_MS {
            return at(None, "scan_ms", Problem::ScanMs(self.scan_ms));
        }
        if self.protect.len() > MAX_RULES {
            return at(None, "protect", Problem::TooMany { max: MAX_RULES });
        }
        if self.trace.len() > MAX_RULES {
            return at(None, "trace", Problem::TooMany { max: MAX_RULES });
        }
        let mut names = BTreeSet::new();
        let mut pages = 0u64;
        for (i, rule) in self.protect.iter().enumerate() {
            let item = Some(Item::Protect(i));
            if !name_ok(&rule.name) {
                return at(item, "name", Problem::BadName(rule.name.clone()));
            }
            if !names.insert(rule.name.as_str()) {
                return at(item, "name", Problem::Duplicate(rule.name.clone()));
            }
            if rule.start >= PHYS_LIMIT {
                return at(item, "start", Problem::AddressTooHigh(rule.start));
            }
            if rule.end > PHYS_LIMIT {
                return at(item, "end", Problem::AddressTooHigh(rule.end));
            }
            if rule.end == rule.start {
                return at(item, "end", Problem::EmptyRange);
            }
            if rule.end < rule.start {
                return at(item, "end", Problem::InvertedRange);
            }
            if rule.end - rule.start > MAX_RANGE_BYTES {
                return at(
                    item,
                    "end",
                    Problem::RangeTooLarge {
                        bytes: rule.end - rule.start,
                    },
                );
            }
            if rule.allow == AccessBits::RWX {
                return at(item, "allow", Problem::DeniesNothing);
            }
            if rule.allow.contains(AccessBits::W) && !rule.allow.contains(AccessBits::R) {
                return at(item, "allow", Problem::WriteWithoutRead(rule.allow));
            }
            pages += rule.pages();
            if pages > MAX_PAGES {
                return at(item, "end", Problem::TooManyPages { pages });
            }
        }
        let mut functions = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, rule) in self.trace.iter().enumerate() {
            let item = Some(Item::Trace(i));
            if !name_ok(&rule.function) {
                return at(item, "function", Problem::BadName(rule.function.clone()));
            }
            if !functions.insert(rule.function.as_str()) {
                return at(item, "function", Problem::Duplicate(rule.function.clone()));
            }
            if !addrs.insert(rule.addr) {
                return at(item, "addr", Problem::DuplicateAddress(rule.addr));
            }
            if rule.args.len() > MAX_ARGS {
                return at(item, "args", Problem::TooMany { max: MAX_ARGS });
            }
            let mut arg_names = BTreeSet::new();
            for (j, arg) in rule.args.iter().enumerate() {
                let item = Some(Item::Arg(i, j));
                if !arg_name_ok(&arg.name) {
                    return at(item, "name", Problem::BadArgName(arg.name.clone()));
                }
                if RESERVED_ARG_NAMES.contains(&arg.name.as_str()) {
                    return at(item, "name", Problem::ReservedName(arg.name.clone()));
                }
                if !arg_names.insert(arg.name.as_str()) {
                    return at(item, "name", Problem::Duplicate(arg.name.clone()));
                }
                if let Some(max_len) = arg.kind.max_len()
                    && !(1..=MAX_STRING).contains(&max_len)
                {
                    return at(item, "max_len", Problem::MaxLen(max_len));
                }
            }
        }
        Ok(())
    }
}

impl CompiledPolicy {
    /// Decodes and checks a compiled policy (untrusted bytes: every bound is checked).
    pub fn from_json(json: &[u8]) -> Result<Self, PolicyError> {
        if json.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge(json.len()));
        }
        let policy: CompiledPolicy = serde_json::from_slice(json)?;
        policy.validate()?;
        Ok(policy)
    }

    /// The policy as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Every field serializes infallibly (strings, numbers, unit enums).
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks the format, every guard's rules, and that no guard shadows another.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.format != POLICY_FORMAT {
            return Err(PolicyError::Format(self.format));
        }
        let at = |guard: Option<usize>, item, field, problem| {
            Err(PolicyError::Invalid {
                at: Location { guard, item, field },
                problem,
            })
        };
        if self.guards.is_empty() {
            return at(None, None, "guards", Problem::NoGuards);
        }
        if self.guards.len() > MAX_GUARDS {
            return at(None, None, "guards", Problem::TooMany { max: MAX_GUARDS });
        }
        let mut targets = BTreeSet::new();
        let mut profiles = BTreeSet::new();
        for (g, rules) in self.guards.iter().enumerate() {
            rules.validate(Some(g))?;
            if rules.targets.is_empty() && !profiles.insert(rules.profile.as_str()) {
                return at(
                    Some(g),
                    None,
                    "profile",
                    Problem::Shadowed(alloc::format!("profile {}", rules.profile)),
                );
            }
            for (i, target) in rules.targets.iter().enumerate() {
                if !targets.insert(target.as_str()) {
                    return at(
                        Some(g),
                        Some(Item::Target(i)),
                        "",
                        Problem::Shadowed(alloc::format!("target {target}")),
                    );
                }
            }
        }
        Ok(())
    }

    /// The rules for target `name` of profile `profile`: the first guard naming `name` in its
    /// `targets`, else the first guard for `profile` with no `targets`.
    pub fn for_target(&self, name: &str, profile: &str) -> Option<&TargetRules> {
        self.guards
            .iter()
            .find(|g| g.targets.iter().any(|t| t == name))
            .or_else(|| {
                self.guards
                    .iter()
                    .find(|g| g.targets.is_empty() && g.profile == profile)
            })
    }
}

/// The demo policy (`policies/demo.toml`) compiled against `profile`, built in code: write-
/// protect `kernel_text` and `task_table` (allow `rx`, user writes denied), trace
/// `task_create` with `name_ptr` (RDI), `name_len` (RSI), `parent` (EDX) and `name` (the
/// string at RDI, length in RSI, at most 32 bytes); `scan_ms` 50.
pub fn demo_rules(profile: &Profile) -> Result<TargetRules, ProfileError> {
    let mut protect = Vec::new();
    for name in ["kernel_text", "task_table"] {
        let range = profile.range(name)?;
        if range.start == range.end || range.end - range.start > MAX_RANGE_BYTES {
            return Err(ProfileError::Invalid {
                name: name.into(),
                why: "protected range empty or implausibly large",
            });
        }
        protect.push(ProtectRule {
            name: name.into(),
            start: range.start,
            end: range.end,
            allow: AccessBits(AccessBits::R.0 | AccessBits::X.0),
            from: Who::User,
            action: Violation::Deny,
        });
    }
    let arg = |reg, name: &str, kind| TraceArg {
        reg,
        name: name.into(),
        kind,
    };
    Ok(TargetRules {
        profile: profile.image.clone(),
        targets: Vec::new(),
        scan_ms: default_scan_ms(),
        protect,
        trace: alloc::vec![TraceRule {
            function: "task_create".into(),
            addr: profile.symbol("task_create")?,
            args: alloc::vec![
                arg(Reg::Rdi, "name_ptr", ArgKind::Pointer),
                arg(Reg::Rsi, "name_len", ArgKind::Int),
                arg(Reg::Rdx, "parent", ArgKind::U32),
                arg(
                    Reg::Rdi,
                    "name",
                    ArgKind::Str {
                        len_reg: Reg::Rsi,
                        max_len: 32,
                    },
                ),
            ],
        }],
    })
}
