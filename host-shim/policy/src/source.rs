//! The source schema: what a user writes (docs/policy.md). Enumerations are read as strings
//! and checked by the compiler, which names the value and the choices when one is wrong.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Source {
    pub format: u32,
    #[serde(default)]
    pub guard: Vec<Guard>,
}

/// One `[[guard]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Guard {
    pub profile: String,
    #[serde(default)]
    pub targets: Vec<String>,
    pub scan_ms: Option<Num>,
    #[serde(default)]
    pub protect: Vec<Protect>,
    #[serde(default)]
    pub trace: Vec<Trace>,
}

/// One `[[guard.protect]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Protect {
    pub name: Option<String>,
    pub range: Option<String>,
    pub symbol: Option<String>,
    pub size: Option<Num>,
    pub start: Option<Num>,
    pub end: Option<Num>,
    pub allow: String,
    pub from: Option<String>,
    pub on_violation: Option<String>,
}

/// One `[[guard.trace]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Trace {
    pub function: String,
    pub addr: Option<Num>,
    #[serde(default)]
    pub args: Vec<Arg>,
}

/// One argument of a traced function.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Arg {
    pub reg: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub len_reg: Option<String>,
    pub max_len: Option<Num>,
}

/// A non-negative integer: a number, or a string in decimal or `0x` hexadecimal (JSON has no
/// hexadecimal numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Num(pub u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer (or a string like \"0x1000\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Num, E> {
                u64::try_from(v)
                    .map(Num)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Num, E> {
                let t = v.replace('_', "");
                let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => t.parse(),
                };
                parsed
                    .map(Num)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(Visitor)
    }
}
