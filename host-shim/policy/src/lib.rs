//! Guard policies: the file a user writes to say what the appliance guards on each target
//! (TOML or JSON, schema in `docs/policy.md`), compiled against the targets' image profiles
//! into the [`CompiledPolicy`] the shim hands to the appliance VM (every range and symbol
//! resolved to an address).
//!
//! ```no_run
//! # use std::path::Path;
//! # use appliance::profile::Profile;
//! let fixture = std::fs::read("appliance/tests/fixtures/demo-target.profile.json").unwrap();
//! let profiles = |name: &str| {
//!     (name == "demo-target").then(|| Profile::from_json(&fixture).unwrap())
//! };
//! let policy = kvmi_policy::load(Path::new("policies/demo.toml"), &profiles)?;
//! let bytes = policy.to_json(); // for the appliance VM
//! # Ok::<(), kvmi_policy::PolicyError>(())
//! ```
//!
//! Every error names the file, the line (and column when the parser knows it) and the field:
//! `demo.toml:7: guard[0].protect[1].on_violation: unknown value "deni" (expected deny, log,
//! pause or crash)`.
#![deny(missing_docs)]

mod source;
mod tree;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use appliance::policy::{
    self as compiled, AccessBits, ArgKind, CompiledPolicy, Item, POLICY_FORMAT, Problem,
    ProtectRule, Reg, TargetRules, TraceArg, TraceRule, Violation, Who,
};
use appliance::profile::Profile;

use crate::source::{Num, Source};
use crate::tree::{FieldPath, Node, line_col, offset_of};

pub use appliance::policy;

/// `scan_ms` when a guard does not give it.
pub const DEFAULT_SCAN_MS: u64 = 50;
/// `max_len` of a string argument that does not give it.
pub const DEFAULT_MAX_LEN: u64 = 64;

/// The language of a policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// TOML (`.toml`).
    Toml,
    /// JSON (`.json`).
    Json,
}

impl Format {
    /// The format named by `path`'s extension (`.toml` or `.json`).
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "toml" => Some(Format::Toml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Why a policy does not compile.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file's extension is neither `.toml` nor `.json`.
    #[error("{}: unknown policy file type (expected a .toml or .json file)", path.display())]
    FileType {
        /// The file.
        path: PathBuf,
    },
    /// Something in the file is wrong.
    #[error(
        "{file}:{line}{}: {field}: {kind}",
        column.map(|c| format!(":{c}")).unwrap_or_default()
    )]
    At {
        /// The file as given (`<input>` for [`compile_str`]).
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column, when the parser reported one.
        column: Option<usize>,
        /// The field path, e.g. `guard[0].protect[1].allow` (`(document)` when none applies).
        field: String,
        /// What is wrong.
        kind: Box<ErrorKind>,
    },
}

impl PolicyError {
    /// What is wrong, for errors inside the file.
    pub fn kind(&self) -> Option<&ErrorKind> {
        match self {
            PolicyError::At { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// The line and field path, for errors inside the file.
    pub fn location(&self) -> Option<(usize, &str)> {
        match self {
            PolicyError::At { line, field, .. } => Some((*line, field)),
            _ => None,
        }
    }
}

/// What is wrong at a place in a policy file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// The text is not valid TOML or JSON.
    #[error("syntax: {0}")]
    Syntax(String),
    /// A value has the wrong type or shape.
    #[error("{0}")]
    Shape(String),
    /// A key the schema does not have.
    #[error("unknown key \"{key}\" (expected {expected})")]
    UnknownKey {
        /// The key.
        key: String,
        /// The keys allowed there.
        expected: String,
    },
    /// A required key is missing.
    #[error("missing key \"{0}\"")]
    MissingKey(String),
    /// A string that is not one of its choices.
    #[error("unknown value \"{value}\" (expected {expected})")]
    UnknownValue {
        /// The value.
        value: String,
        /// The choices.
        expected: &'static str,
    },
    /// `format` is not [`POLICY_FORMAT`].
    #[error("unsupported format {0} (expected 1)")]
    Format(u64),
    /// No profile of that name.
    #[error("no profile \"{0}\"")]
    UnknownProfile(String),
    /// The profile has no such range.
    #[error("profile {profile} has no range \"{range}\"")]
    NoRange {
        /// The profile.
        profile: String,
        /// The range.
        range: String,
    },
    /// The profile has no such symbol.
    #[error("profile {profile} has no symbol \"{symbol}\"")]
    NoSymbol {
        /// The profile.
        profile: String,
        /// The symbol.
        symbol: String,
    },
    /// Keys that exclude each other, or a missing one of a set.
    #[error("{0}")]
    Keys(&'static str),
    /// A number that does not fit.
    #[error("{0} overflows")]
    Overflow(&'static str),
    /// A value the compiled policy refuses (bounds, empty ranges, names...).
    #[error("{0}")]
    Rule(Problem),
}

/// Reads and compiles the policy file at `path` (`.toml` or `.json`), resolving ranges and
/// symbols with `profiles` (image name → profile).
pub fn load(
    path: &Path,
    profiles: &dyn Fn(&str) -> Option<Profile>,
) -> Result<CompiledPolicy, PolicyError> {
    let format = Format::from_path(path).ok_or_else(|| PolicyError::FileType {
        path: path.to_owned(),
    })?;
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    compile_named(&path.display().to_string(), &text, format, profiles)
}

/// Compiles policy `text` in `format`; errors name the file `<input>`.
pub fn compile_str(
    text: &str,
    format: Format,
    profiles: &dyn Fn(&str) -> Option<Profile>,
) -> Result<CompiledPolicy, PolicyError> {
    compile_named("<input>", text, format, profiles)
}

/// Compiles policy `text` in `format`; errors name the file `file`.
pub fn compile_named(
    file: &str,
    text: &str,
    format: Format,
    profiles: &dyn Fn(&str) -> Option<Profile>,
) -> Result<CompiledPolicy, PolicyError> {
    let doc = Doc::new(file, text, format);
    let source = doc.parse()?;
    let mut compiler = Compiler {
        profiles,
        cache: BTreeMap::new(),
        origins: Vec::new(),
    };
    let policy = compiler
        .compile(&source)
        .map_err(|(path, kind)| doc.at(&path, kind))?;
    match policy.validate() {
        Ok(()) => Ok(policy),
        Err(compiled::PolicyError::Invalid { at, problem }) => {
            Err(doc.at(&compiler.source_path(&at), ErrorKind::Rule(problem)))
        }
        Err(compiled::PolicyError::Format(n)) => Err(doc.at(
            &FieldPath::default().key("format"),
            ErrorKind::Format(n.into()),
        )),
        Err(other) => Err(doc.at(&FieldPath::default(), ErrorKind::Shape(other.to_string()))),
    }
}

/// The text of a policy with its tree of spans.
struct Doc<'a> {
    file: &'a str,
    text: &'a str,
    format: Format,
    tree: Option<Node>,
}

impl<'a> Doc<'a> {
    fn new(file: &'a str, text: &'a str, format: Format) -> Self {
        let tree = match format {
            Format::Toml => Some(Node::from_toml(text)),
            Format::Json => Node::from_json(text),
        };
        Doc {
            file,
            text,
            format,
            tree,
        }
    }

    /// An error at `path` (line of its key, or of the deepest part of it that exists).
    fn at(&self, path: &FieldPath, kind: ErrorKind) -> PolicyError {
        let offset = self.tree.as_ref().map_or(0, |t| t.offset(path));
        PolicyError::At {
            file: self.file.into(),
            line: line_col(self.text, offset).0,
            column: None,
            field: path.to_string(),
            kind: Box::new(kind),
        }
    }

    /// An error the parser reported at byte `offset`.
    fn parser_error(&self, offset: usize, message: &str, syntax: bool) -> PolicyError {
        let (line, column) = line_col(self.text, offset);
        let mut path = self
            .tree
            .as_ref()
            .map(|t| t.path_at(offset))
            .unwrap_or_default();
        let kind = if syntax {
            ErrorKind::Syntax(message.trim().into())
        } else if let Some((key, expected)) = unknown_field(message) {
            if path.0.last() != Some(&tree::Seg::Key(key.clone())) {
                path = path.key(&key);
            }
            ErrorKind::UnknownKey { key, expected }
        } else if let Some(key) = between(message, "missing field `", "`") {
            if let Some(tree) = &self.tree {
                path = tree.table_of(&path);
            }
            path = path.key(&key);
            ErrorKind::MissingKey(key)
        } else {
            ErrorKind::Shape(message.trim().into())
        };
        PolicyError::At {
            file: self.file.into(),
            line,
            column: Some(column),
            field: path.to_string(),
            kind: Box::new(kind),
        }
    }

    fn parse(&self) -> Result<Source, PolicyError> {
        match self.format {
            Format::Toml => {
                if let Err(e) = toml::de::DeTable::parse(self.text) {
                    let at = e.span().map_or(0, |s| s.start);
                    return Err(self.parser_error(at, e.message(), true));
                }
                toml::from_str(self.text).map_err(|e| {
                    let at = e.span().map_or(0, |s| s.start);
                    self.parser_error(at, e.message(), false)
                })
            }
            Format::Json => serde_json::from_str(self.text).map_err(|e| {
                let at = offset_of(self.text, e.line(), e.column());
                let syntax = matches!(
                    e.classify(),
                    serde_json::error::Category::Syntax | serde_json::error::Category::Eof
                );
                // serde_json appends " at line L column C"; the location is ours to print.
                let message = e.to_string();
                let message = message
                    .rsplit_once(" at line ")
                    .map_or(message.as_str(), |(m, _)| m);
                self.parser_error(at, message, syntax)
            }),
        }
    }
}

fn between(text: &str, open: &str, close: &str) -> Option<String> {
    let rest = &text[text.find(open)? + open.len()..];
    Some(rest[..rest.find(close)?].to_string())
}

/// serde's "unknown field `x`, expected one of `a`, `b`" as (`x`, "a, b").
fn unknown_field(message: &str) -> Option<(String, String)> {
    let key = between(message, "unknown field `", "`")?;
    let expected = message
        .split_once(", expected ")
        .map(|(_, e)| e.trim().replace('`', "").replace("one of ", "one of: "))
        .unwrap_or_else(|| "no keys here".into());
    Some((key, expected))
}

/// Which source keys a compiled value came from, to point errors at them.
#[derive(Default)]
struct Origin {
    /// Per protect rule: the key that gave the range (`range`, `symbol` or `start`).
    ranges: Vec<&'static str>,
    /// Per protect rule: whether `name` was given.
    named: Vec<bool>,
    /// Per trace rule: whether `addr` was given.
    addrs: Vec<bool>,
}

struct Compiler<'p> {
    profiles: &'p dyn Fn(&str) -> Option<Profile>,
    cache: BTreeMap<String, Option<Profile>>,
    origins: Vec<Origin>,
}

type Fail = (FieldPath, ErrorKind);

fn choice<T: Copy>(
    value: Option<&str>,
    default: T,
    choices: &[(&str, T)],
    expected: &'static str,
    path: FieldPath,
) -> Result<T, Fail> {
    let Some(value) = value else {
        return Ok(default);
    };
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            (
                path,
                ErrorKind::UnknownValue {
                    value: value.into(),
                    expected,
                },
            )
        })
}

const REG_CHOICES: &str = "rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp or r8 to r15";

fn reg(name: &str, path: FieldPath) -> Result<Reg, Fail> {
    Reg::parse(name).ok_or_else(|| {
        (
            path,
            ErrorKind::UnknownValue {
                value: name.into(),
                expected: REG_CHOICES,
            },
        )
    })
}

impl Compiler<'_> {
    fn profile(&mut self, name: &str) -> Option<Profile> {
        self.cache
            .entry(name.to_string())
            .or_insert_with(|| (self.profiles)(name))
            .clone()
    }

    fn compile(&mut self, source: &Source) -> Result<CompiledPolicy, Fail> {
        let root = FieldPath::default();
        if source.format != POLICY_FORMAT {
            return Err((root.key("format"), ErrorKind::Format(source.format.into())));
        }
        if source.guard.is_empty() {
            return Err((root.key("guard"), ErrorKind::Rule(Problem::NoGuards)));
        }
        let mut guards = Vec::new();
        for (g, guard) in source.guard.iter().enumerate() {
            let at = root.key("guard").index(g);
            guards.push(self.guard(guard, &at)?);
        }
        Ok(CompiledPolicy {
            format: POLICY_FORMAT,
            guards,
        })
    }

    fn guard(&mut self, guard: &source::Guard, at: &FieldPath) -> Result<TargetRules, Fail> {
        let profile = self.profile(&guard.profile).ok_or_else(|| {
            (
                at.key("profile"),
                ErrorKind::UnknownProfile(guard.profile.clone()),
            )
        })?;
        let mut origin = Origin::default();
        let mut protect = Vec::new();
        for (i, rule) in guard.protect.iter().enumerate() {
            let at = at.key("protect").index(i);
            let (start, end, key) = range_of(rule, &profile, &guard.profile, &at)?;
            let allow = AccessBits::parse(&rule.allow).ok_or_else(|| {
                (
                    at.key("allow"),
                    ErrorKind::UnknownValue {
                        value: rule.allow.clone(),
                        expected: "the letters r, w, x (e.g. \"rx\"), or \"none\"",
                    },
                )
            })?;
            let from = choice(
                rule.from.as_deref(),
                Who::Any,
                &[
                    ("user", Who::User),
                    ("kernel", Who::Kernel),
                    ("any", Who::Any),
                ],
                "user, kernel or any",
                at.key("from"),
            )?;
            let action = choice(
                rule.on_violation.as_deref(),
                Violation::Deny,
                &[
                    ("deny", Violation::Deny),
                    ("log", Violation::Log),
                    ("pause", Violation::Pause),
                    ("crash", Violation::Crash),
                ],
                "deny, log, pause or crash",
                at.key("on_violation"),
            )?;
            let name = rule.name.clone().unwrap_or_else(|| {
                rule.range
                    .clone()
                    .or_else(|| rule.symbol.clone())
                    .unwrap_or_else(|| format!("{start:#x}-{end:#x}"))
            });
            origin.ranges.push(key);
            origin.named.push(rule.name.is_some());
            protect.push(ProtectRule {
                name,
                start,
                end,
                allow,
                from,
                action,
            });
        }
        let mut trace = Vec::new();
        for (i, rule) in guard.trace.iter().enumerate() {
            let at = at.key("trace").index(i);
            let addr = match rule.addr {
                Some(Num(addr)) => addr,
                None => profile.symbol(&rule.function).map_err(|_| {
                    (
                        at.key("function"),
                        ErrorKind::NoSymbol {
                            profile: guard.profile.clone(),
                            symbol: rule.function.clone(),
                        },
                    )
                })?,
            };
            origin.addrs.push(rule.addr.is_some());
            let mut args = Vec::new();
            for (j, arg) in rule.args.iter().enumerate() {
                args.push(trace_arg(arg, &at.key("args").index(j))?);
            }
            trace.push(TraceRule {
                function: rule.function.clone(),
                addr,
                args,
            });
        }
        self.origins.push(origin);
        Ok(TargetRules {
            profile: guard.profile.clone(),
            targets: guard.targets.clone(),
            scan_ms: guard.scan_ms.map_or(DEFAULT_SCAN_MS, |n| n.0),
            protect,
            trace,
        })
    }

    /// The source field a compiled-policy location came from.
    fn source_path(&self, at: &compiled::Location) -> FieldPath {
        let mut path = FieldPath::default();
        let Some(g) = at.guard else {
            return path.key(if at.field == "guards" {
                "guard"
            } else {
                at.field
            });
        };
        path = path.key("guard").index(g);
        let origin = self.origins.get(g);
        match at.item {
            None => path.key(at.field),
            Some(Item::Target(i)) => path.key("targets").index(i),
            Some(Item::Protect(i)) => {
                let path = path.key("protect").index(i);
                let from_range = origin.and_then(|o| o.ranges.get(i)).copied();
                let named = origin.and_then(|o| o.named.get(i)).copied();
                let field = match (at.field, from_range) {
                    ("action", _) => "on_violation",
                    ("start" | "end", Some("range")) => "range",
                    ("start", Some("symbol")) => "symbol",
                    ("end", Some("symbol")) => "size",
                    ("name", _) if named == Some(false) => from_range.unwrap_or("name"),
                    (field, _) => field,
                };
                path.key(field)
            }
            Some(Item::Trace(i)) => {
                let path = path.key("trace").index(i);
                let addr = origin.and_then(|o| o.addrs.get(i)).copied();
                match at.field {
                    "addr" if addr == Some(false) => path.key("function"),
                    field => path.key(field),
                }
            }
            Some(Item::Arg(i, j)) => path.key("trace").index(i).key("args").index(j).key(match at
                .field
            {
                "kind" => "type",
                field => field,
            }),
        }
    }
}

/// The range of a protect rule: from `range`, `symbol` + `size`, or `start` + `end`.
fn range_of(
    rule: &source::Protect,
    profile: &Profile,
    profile_name: &str,
    at: &FieldPath,
) -> Result<(u64, u64, &'static str), Fail> {
    const ONE_OF: &str = "give exactly one of: range, symbol with size, or start with end";
    let given = [
        rule.range.is_some(),
        rule.symbol.is_some() || rule.size.is_some(),
        rule.start.is_some() || rule.end.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err((at.clone(), ErrorKind::Keys(ONE_OF)));
    }
    if let Some(name) = &rule.range {
        let r = profile.range(name).map_err(|_| {
            (
                at.key("range"),
                ErrorKind::NoRange {
                    profile: profile_name.into(),
                    range: name.clone(),
                },
            )
        })?;
        return Ok((r.start, r.end, "range"));
    }
    if given[1] {
        let (Some(symbol), Some(Num(size))) = (&rule.symbol, rule.size) else {
            let missing = if rule.symbol.is_none() {
                "symbol"
            } else {
                "size"
            };
            return Err((
                at.key(missing),
                ErrorKind::Keys("symbol and size go together"),
            ));
        };
        let start = profile.symbol(symbol).map_err(|_| {
            (
                at.key("symbol"),
                ErrorKind::NoSymbol {
                    profile: profile_name.into(),
                    symbol: symbol.clone(),
                },
            )
        })?;
        let end = start
            .checked_add(size)
            .ok_or((at.key("size"), ErrorKind::Overflow("symbol + size")))?;
        return Ok((start, end, "symbol"));
    }
    match (rule.start, rule.end) {
        (Some(Num(start)), Some(Num(end))) => Ok((start, end, "start")),
        (None, _) => Err((
            at.key("start"),
            ErrorKind::Keys("start and end go together"),
        )),
        (_, None) => Err((at.key("end"), ErrorKind::Keys("start and end go together"))),
    }
}

fn trace_arg(arg: &source::Arg, at: &FieldPath) -> Result<TraceArg, Fail> {
    let register = reg(&arg.reg, at.key("reg"))?;
    let max_len = match arg.max_len {
        Some(Num(n)) => u32::try_from(n).unwrap_or(u32::MAX),
        None => DEFAULT_MAX_LEN as u32,
    };
    let kind = match arg.kind.as_str() {
        "int" => ArgKind::Int,
        "u32" => ArgKind::U32,
        "pointer" => ArgKind::Pointer,
        "cstr" => ArgKind::CStr { max_len },
        "str" => {
            let Some(len_reg) = &arg.len_reg else {
                return Err((
                    at.key("len_reg"),
                    ErrorKind::Keys("type \"str\" needs len_reg, the register holding the length"),
                ));
            };
            ArgKind::Str {
                len_reg: reg(len_reg, at.key("len_reg"))?,
                max_len,
            }
        }
        other => {
            return Err((
                at.key("type"),
                ErrorKind::UnknownValue {
                    value: other.into(),
                    expected: "int, u32, pointer, cstr or str",
                },
            ));
        }
    };
    if arg.len_reg.is_some() && !matches!(kind, ArgKind::Str { .. }) {
        return Err((
            at.key("len_reg"),
            ErrorKind::Keys("len_reg applies to type \"str\" only"),
        ));
    }
    if arg.max_len.is_some() && kind.max_len().is_none() {
        return Err((
            at.key("max_len"),
            ErrorKind::Keys("max_len applies to types \"cstr\" and \"str\" only"),
        ));
    }
    Ok(TraceArg {
        reg: register,
        name: arg.name.clone(),
        kind,
    })
}

#[cfg(test)]
mod tests;
