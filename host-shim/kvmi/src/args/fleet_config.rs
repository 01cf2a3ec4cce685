//! `kvmi run --config FILE`: the targets one appliance guards, each with its own image,
//! vCPUs, memory, command line, profile and name, in TOML:
//!
//! ```toml
//! [[target]]
//! name = "web-1"            # required, unique, 1..=32 bytes
//! image = "demo-target"     # an embedded image or an ELF path (relative to this file)
//! vcpus = 1                 # default 1
//! memory_mib = 64           # default 64
//! cmdline = "rounds=500"    # default ""
//! profile = "demo-target"   # default: the image's name (what the policy's `profile` matches)
//! start_after_ms = 0        # default 0; later: the target joins the running appliance
//! ```
//!
//! Every error names the file, the line and the field; nothing starts before the whole file
//! is valid.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Most targets one appliance guards.
pub const MAX_TARGETS: usize = hypercall::directory::MAX_SLOTS as usize;
/// Longest target name (the directory's name field).
pub const NAME_MAX: usize = hypercall::directory::NAME_MAX;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    target: Vec<Spanned<Entry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Spanned<String>,
    image: Spanned<String>,
    #[serde(default)]
    vcpus: Option<Spanned<u32>>,
    #[serde(default)]
    memory_mib: Option<Spanned<u64>>,
    #[serde(default)]
    cmdline: Option<Spanned<String>>,
    #[serde(default)]
    profile: Option<Spanned<String>>,
    #[serde(default)]
    start_after_ms: Option<Spanned<u64>>,
}

/// An optional value with its span, or `default` (at the entry's span).
fn or<T: Clone>(
    v: &Option<Spanned<T>>,
    default: T,
    entry: std::ops::Range<usize>,
) -> (T, std::ops::Range<usize>) {
    v.as_ref()
        .map_or((default, entry), |s| (s.get_ref().clone(), s.span()))
}

/// One target of the file, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetConfig {
    /// Its name.
    pub name: String,
    /// An embedded image's name or an ELF path (made relative to the file's folder).
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// The guest's command line.
    pub cmdline: String,
    /// The profile name the policy matches (`None`: the image's name).
    pub profile: Option<String>,
    /// Milliseconds after the start before it joins the appliance.
    pub start_after_ms: u64,
}

/// A `--config` file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A syntax error, an unknown or missing key, or a value out of range.
    #[error("{file}:{line}: {field}{sep}{message}", sep = if field.is_empty() { "" } else { ": " })]
    At {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// The field (e.g. `target[1].vcpus`), empty when unknown.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at.min(text.len()))
        .map_or(1, |before| before.matches('\n').count() + 1)
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<Vec<TargetConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&path.display().to_string(), &text, base)
}

/// Checks the TOML `text` of file `file`; relative image paths are resolved against `base`
/// when such a file exists there.
pub fn parse(file: &str, text: &str, base: &Path) -> Result<Vec<TargetConfig>, ConfigError> {
    let at = |span: std::ops::Range<usize>, field: String, message: String| ConfigError::At {
        file: file.to_string(),
        line: line_of(text, span.start),
        field,
        message,
    };
    let parsed: File = toml::from_str(text).map_err(|e| {
        at(
            e.span().unwrap_or(0..0),
            String::new(),
            e.message().to_string(),
        )
    })?;
    if parsed.target.is_empty() || parsed.target.len() > MAX_TARGETS {
        return Err(at(
            0..0,
            "target".into(),
            format!("1..={MAX_TARGETS} targets, not {}", parsed.target.len()),
        ));
    }
    let mut out: Vec<TargetConfig> = Vec::new();
    for (i, entry) in parsed.target.iter().enumerate() {
        let e = entry.get_ref();
        let field = |name: &str| format!("target[{i}].{name}");
        let name = e.name.get_ref();
        if name.is_empty() || name.len() > NAME_MAX || name.chars().any(char::is_control) {
            return Err(at(
                e.name.span(),
                field("name"),
                format!("{name:?}: 1..={NAME_MAX} bytes, no control characters"),
            ));
        }
        if out.iter().any(|t| &t.name == name) {
            return Err(at(
                e.name.span(),
                field("name"),
                format!("{name:?} is already the name of another target"),
            ));
        }
        let (vcpus, vcpus_at) = or(&e.vcpus, 1, entry.span());
        if !(1..=vmm::vm::MAX_VCPUS).contains(&vcpus) {
            return Err(at(
                vcpus_at,
                field("vcpus"),
                format!("{vcpus}: 1..={} vCPUs", vmm::vm::MAX_VCPUS),
            ));
        }
        let (memory, memory_at) = or(&e.memory_mib, 64, entry.span());
        if !(2..=4096).contains(&memory) {
            return Err(at(
                memory_at,
                field("memory_mib"),
                format!("{memory}: 2..=4096 MiB"),
            ));
        }
        let (cmdline, cmdline_at) = or(&e.cmdline, String::new(), entry.span());
        if cmdline.len() >= hypercall::boot::CMDLINE_MAX {
            return Err(at(
                cmdline_at,
                field("cmdline"),
                format!("longer than {} bytes", hypercall::boot::CMDLINE_MAX - 1),
            ));
        }
        let (start_after, start_at) = or(&e.start_after_ms, 0, entry.span());
        if start_after > 3_600_000 {
            return Err(at(
                start_at,
                field("start_after_ms"),
                format!("{start_after}: at most one hour (3600000)"),
            ));
        }
        let image = e.image.get_ref();
        let local = base.join(image);
        let image = if !Path::new(image).is_absolute() && local.is_file() {
            local.display().to_string()
        } else {
            image.clone()
        };
        out.push(TargetConfig {
            name: name.clone(),
            image,
            vcpus,
            memory_mib: memory,
            cmdline,
            profile: e.profile.as_ref().map(|p| p.get_ref().clone()),
            start_after_ms: start_after,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Vec<TargetConfig>, String> {
        parse("fleet.toml", text, Path::new("/nonexistent")).map_err(|e| e.to_string())
    }

    #[test]
    fn targets_read_with_their_defaults() {
        let t = check(
            "[[target]]\nname = \"a\"\nimage = \"demo-target\"\n\n\
             [[target]]\nname = \"b\"\nimage = \"test-guest\"\nvcpus = 2\nmemory_mib = 32\n\
             cmdline = \"mode=hello\"\nprofile = \"x\"\nstart_after_ms = 500\n",
        )
        .unwrap();
        assert_eq!(
            t[0],
            TargetConfig {
                name: "a".into(),
                image: "demo-target".into(),
                vcpus: 1,
                memory_mib: 64,
                cmdline: String::new(),
                profile: None,
                start_after_ms: 0,
            }
        );
        assert_eq!(
            (t[1].vcpus, t[1].memory_mib, t[1].start_after_ms),
            (2, 32, 500)
        );
        assert_eq!(t[1].profile.as_deref(), Some("x"));
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let two = "[[target]]\nname = \"a\"\nimage = \"demo-target\"\n[[target]]\n";
        let cases = [
            (
                format!("{two}name = \"a\"\nimage = \"x\"\n"),
                "fleet.toml:5: target[1].name: \"a\" is already the name of another target",
            ),
            (
                format!("{two}name = \"b\"\nimage = \"x\"\nvcpus = 0\n"),
                "fleet.toml:7: target[1].vcpus: 0: 1..=",
            ),
            (
                format!("{two}name = \"b\"\nimage = \"x\"\nmemory_mib = 1\n"),
                "fleet.toml:7: target[1].memory_mib: 1: 2..=4096 MiB",
            ),
            (
                format!("{two}name = \"\"\nimage = \"x\"\n"),
                "fleet.toml:5: target[1].name: \"\": 1..=32 bytes",
            ),
            (
                format!("{two}name = \"b\"\nimage = \"x\"\nstart_after_ms = 9999999\n"),
                "fleet.toml:7: target[1].start_after_ms: 9999999: at most one hour",
            ),
            (
                format!("{two}name = \"b\"\n"),
                "fleet.toml:4: missing field `image`",
            ),
            (
                format!("{two}name = \"b\"\nimage = \"x\"\ncpus = 2\n"),
                "fleet.toml:7: unknown field `cpus`",
            ),
            (
                "target = []\n".to_string(),
                "fleet.toml:1: target: 1..=8 targets, not 0",
            ),
            ("[[target]\n".to_string(), "fleet.toml:1: "),
        ];
        for (text, want) in cases {
            let got = check(&text).expect_err(&text);
            assert!(got.starts_with(want), "{text}\n got: {got}\nwant: {want}");
        }
    }
}
