//! Image profiles: the facts an introspection tool needs about a guest image, read from its
//! `kvmi_profile.*` ELF symbols (see the project's profile convention) and emitted as JSON.
//!
//! This module is also compiled into `build.rs` (`#[path = "src/profile.rs"]`), so it uses no
//! crate-internal items: only std, `object`, `serde`, `serde_json` and `thiserror`.

use std::collections::BTreeMap;

use object::{Object, ObjectSymbol};
use serde::{Deserialize, Serialize};

/// Prefix of every profile symbol.
pub const SYMBOL_PREFIX: &str = "kvmi_profile.";
/// The JSON format version written in [`Profile::format`].
pub const PROFILE_FORMAT: u32 = 1;

/// Size and field offsets of one struct.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StructLayout {
    /// `size_of` in bytes.
    pub size: u64,
    /// Field name → byte offset.
    pub fields: BTreeMap<String, u64>,
}

/// An address range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrRange {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

/// A guest image's profile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Image name (e.g. "demo-target").
    pub image: String,
    /// Format version ([`PROFILE_FORMAT`]).
    pub format: u32,
    /// ELF entry point.
    pub entry: u64,
    /// Object and function addresses.
    pub symbols: BTreeMap<String, u64>,
    /// Constants.
    pub constants: BTreeMap<String, u64>,
    /// Struct layouts.
    pub structs: BTreeMap<String, StructLayout>,
    /// Address ranges.
    pub ranges: BTreeMap<String, AddrRange>,
}

/// Why an image's profile could not be built or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The bytes are not a readable ELF file.
    #[error("not a readable ELF image: {0}")]
    Elf(String),
    /// A `kvmi_profile.*` symbol name does not follow the convention.
    #[error("bad profile symbol `{0}`: {1}")]
    BadName(String, &'static str),
    /// The same fact is defined twice with different values.
    #[error("profile symbol `{0}` defined twice with different values")]
    Conflict(String),
    /// A range lacks its start or end, or ends before it starts.
    #[error("range `{0}` is incomplete or inverted")]
    BadRange(String),
    /// A struct has field offsets but no `sizeof`.
    #[error("struct `{0}` has fields but no kvmi_profile.sizeof.{0}")]
    MissingSize(String),
    /// The JSON text is not a profile.
    #[error("bad profile JSON: {0}")]
    Json(String),
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn insert_unique(
    map: &mut BTreeMap<String, u64>,
    key: &str,
    value: u64,
    full: &str,
) -> Result<(), ProfileError> {
    match map.insert(key.to_string(), value) {
        Some(old) if old != value => Err(ProfileError::Conflict(full.to_string())),
        _ => Ok(()),
    }
}

impl Profile {
    /// Builds the profile of the ELF image `elf`, named `image`.
    pub fn from_elf(image: &str, elf: &[u8]) -> Result<Profile, ProfileError> {
        let file = object::File::parse(elf).map_err(|e| ProfileError::Elf(e.to_string()))?;
        let mut profile = Profile {
            image: image.to_string(),
            format: PROFILE_FORMAT,
            entry: file.entry(),
            ..Profile::default()
        };
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        let mut fields: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut starts: BTreeMap<String, u64> = BTreeMap::new();
        let mut ends: BTreeMap<String, u64> = BTreeMap::new();
        for sym in file.symbols() {
            let Ok(name) = sym.name() else { continue };
            let Some(rest) = name.strip_prefix(SYMBOL_PREFIX) else {
                continue;
            };
            let value = sym.address();
            let parts: Vec<&str> = rest.split('.').collect();
            if !parts.iter().all(|p| valid_part(p)) {
                return Err(ProfileError::BadName(
                    name.into(),
                    "parts must be [a-z0-9_]+",
                ));
            }
            match parts.as_slice() {
                ["sym", n] => insert_unique(&mut profile.symbols, n, value, name)?,
                ["const", n] => insert_unique(&mut profile.constants, n, value, name)?,
                ["sizeof", t] => insert_unique(&mut sizes, t, value, name)?,
                ["struct", t, f] => {
                    insert_unique(fields.entry(t.to_string()).or_default(), f, value, name)?
                }
                ["range", n, "start"] => insert_unique(&mut starts, n, value, name)?,
                ["range", n, "end"] => insert_unique(&mut ends, n, value, name)?,
                _ => return Err(ProfileError::BadName(name.into(), "unknown kind or arity")),
            }
        }
        for (t, size) in &sizes {
            profile.structs.insert(
                t.clone(),
                StructLayout {
                    size: *size,
                    fields: fields.remove(t).unwrap_or_default(),
                },
            );
        }
        if let Some(t) = fields.keys().next() {
            return Err(ProfileError::MissingSize(t.clone()));
        }
        for (n, start) in &starts {
            match ends.remove(n) {
                Some(end) if end >= *start => {
                    profile
                        .ranges
                        .insert(n.clone(), AddrRange { start: *start, end });
                }
                _ => return Err(ProfileError::BadRange(n.clone())),
            }
        }
        if let Some(n) = ends.keys().next() {
            return Err(ProfileError::BadRange(n.clone()));
        }
        Ok(profile)
    }

    /// Parses a profile from its JSON text.
    pub fn from_json(text: &str) -> Result<Profile, ProfileError> {
        serde_json::from_str(text).map_err(|e| ProfileError::Json(e.to_string()))
    }

    /// The profile as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// Address of symbol `name`.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).copied()
    }

    /// Value of constant `name`.
    pub fn constant(&self, name: &str) -> Option<u64> {
        self.constants.get(name).copied()
    }

    /// Offset of `field` in struct `ty`.
    pub fn field(&self, ty: &str, field: &str) -> Option<u64> {
        self.structs.get(ty)?.fields.get(field).copied()
    }

    /// Range `name`.
    pub fn range(&self, name: &str) -> Option<AddrRange> {
        self.ranges.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_follow_the_convention() {
        assert!(valid_part("task_table"));
        assert!(valid_part("x86_64"));
        assert!(!valid_part("Task"));
        assert!(!valid_part(""));
        assert!(!valid_part("a-b"));
    }

    #[test]
    fn non_elf_bytes_are_a_clear_error() {
        let err = Profile::from_elf("x", b"not an elf").unwrap_err();
        assert!(matches!(err, ProfileError::Elf(_)), "{err}");
    }

    #[test]
    fn json_round_trip_keeps_every_fact() {
        let mut p = Profile {
            image: "demo".into(),
            format: PROFILE_FORMAT,
            entry: 0x10_0000,
            ..Profile::default()
        };
        p.symbols.insert("task_table".into(), 0x20_0000);
        p.constants.insert("max_tasks".into(), 16);
        p.ranges
            .insert("kernel_text".into(), AddrRange { start: 1, end: 2 });
        let mut s = StructLayout {
            size: 64,
            ..Default::default()
        };
        s.fields.insert("state".into(), 8);
        p.structs.insert("task".into(), s);
        let back = Profile::from_json(&p.to_json()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.field("task", "state"), Some(8));
    }
}
