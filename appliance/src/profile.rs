//! Image profiles: the facts about a guest OS an introspection tool needs (symbol addresses,
//! constants, struct layouts, address ranges), in the JSON format the host shim produces
//! (`kvmi profile --image …`; see the project's profile convention).
//!
//! ```json
//! { "image": "demo-target", "format": 1, "entry": 1048576,
//!   "symbols": { "task_table": 1110016 }, "constants": { "max_tasks": 32 },
//!   "structs": { "task": { "size": 88, "fields": { "pid": 0 } } },
//!   "ranges": { "kernel_text": { "start": 1048576, "end": 1077248 } } }
//! ```

use alloc::collections::BTreeMap;
use alloc::string::String;

use serde::Deserialize;

/// The profile format this crate reads.
pub const PROFILE_FORMAT: u32 = 1;

/// Why a profile is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The JSON does not parse or has the wrong shape.
    #[error("profile JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The format number is not [`PROFILE_FORMAT`].
    #[error("unsupported profile format {0}")]
    Format(u32),
    /// A fact the caller needs is missing.
    #[error("profile has no {kind} `{name}`")]
    Missing {
        /// "symbol", "constant", "struct", "field" or "range".
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A fact is present but impossible (a field past its struct, an empty range…).
    #[error("profile value {name} is invalid: {why}")]
    Invalid {
        /// Which value.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A struct layout: its size and field offsets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct StructLayout {
    /// Size in bytes.
    pub size: u64,
    /// Byte offset of each field.
    #[serde(default)]
    pub fields: BTreeMap<String, u64>,
}

/// An address range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct AddrRange {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

impl AddrRange {
    /// Whether `addr` is in the range.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

/// A parsed image profile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Profile {
    /// Image name.
    pub image: String,
    /// Format number ([`PROFILE_FORMAT`]).
    pub format: u32,
    /// Entry point.
    #[serde(default)]
    pub entry: u64,
    /// Symbol addresses.
    #[serde(default)]
    pub symbols: BTreeMap<String, u64>,
    /// Constants.
    #[serde(default)]
    pub constants: BTreeMap<String, u64>,
    /// Struct layouts.
    #[serde(default)]
    pub structs: BTreeMap<String, StructLayout>,
    /// Address ranges.
    #[serde(default)]
    pub ranges: BTreeMap<String, AddrRange>,
}

fn missing(kind: &'static str, name: &str) -> ProfileError {
    ProfileError::Missing {
        kind,
        name: name.into(),
    }
}

impl Profile {
    /// Parses and checks a profile.
    pub fn from_json(json: &[u8]) -> Result<Self, ProfileError> {
        let profile: Profile = serde_json::from_slice(json)?;
        if profile.format != PROFILE_FORMAT {
            return Err(ProfileError::Format(profile.format));
        }
        for (name, range) in &profile.ranges {
            if range.end < range.start {
                return Err(ProfileError::Invalid {
                    name: name.clone(),
                    why: "range ends before it starts",
                });
            }
        }
        Ok(profile)
    }

    /// The address of symbol `name`.
    pub fn symbol(&self, name: &str) -> Result<u64, ProfileError> {
        self.symbols
            .get(name)
            .copied()
            .ok_or_else(|| missing("symbol", name))
    }

    /// The constant `name`.
    pub fn constant(&self, name: &str) -> Result<u64, ProfileError> {
        self.constants
            .get(name)
            .copied()
            .ok_or_else(|| missing("constant", name))
    }

    /// The layout of struct `name`.
    pub fn layout(&self, name: &str) -> Result<&StructLayout, ProfileError> {
        self.structs
            .get(name)
            .ok_or_else(|| missing("struct", name))
    }

    /// The offset of `field` in struct `ty`, checked so that `width` bytes fit in the struct.
    pub fn field(&self, ty: &str, field: &str, width: u64) -> Result<u64, ProfileError> {
        let layout = self.layout(ty)?;
        let offset = *layout
            .fields
            .get(field)
            .ok_or_else(|| missing("field", field))?;
        if offset
            .checked_add(width)
            .is_none_or(|end| end > layout.size)
        {
            return Err(ProfileError::Invalid {
                name: alloc::format!("{ty}.{field}"),
                why: "field does not fit in its struct",
            });
        }
        Ok(offset)
    }

    /// The range `name`.
    pub fn range(&self, name: &str) -> Result<AddrRange, ProfileError> {
        self.ranges
            .get(name)
            .copied()
            .ok_or_else(|| missing("range", name))
    }
}
