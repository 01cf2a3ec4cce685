//! Where things are in a policy file: a tree of the document's tables and arrays with the
//! byte span of every key and value, built from TOML (`toml::de::DeTable`) or JSON (a small
//! scanner), to turn a field path into a line and a parser's position into a field path.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A field path (`guard[0].protect[1].allow`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    pub fn key(&self, key: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.into()));
        p
    }

    pub fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A value with its span (and its key's span, for table members).
#[derive(Debug)]
pub(crate) struct Node {
    key: Option<Range<usize>>,
    span: Range<usize>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Table(Vec<(String, Node)>),
    Array(Vec<Node>),
    Leaf,
}

impl Node {
    /// The tree of a TOML document (best effort: a document with syntax errors gives what
    /// parsed).
    pub fn from_toml(text: &str) -> Node {
        let (root, _) = DeTable::parse_recoverable(text);
        let span = root.span();
        Node {
            key: None,
            span,
            kind: toml_table(root.get_ref()),
        }
    }

    /// The tree of a JSON document, if it scans.
    pub fn from_json(text: &str) -> Option<Node> {
        let mut scan = Scan {
            b: text.as_bytes(),
            i: 0,
        };
        scan.value(None, 0)
    }

    /// Where `path` is: the start of its key (or value), or of the deepest part of it that
    /// exists.
    pub fn offset(&self, path: &FieldPath) -> usize {
        let mut node = self;
        for seg in &path.0 {
            let next = match (&node.kind, seg) {
                (Kind::Table(members), Seg::Key(k)) => {
                    members.iter().find(|(name, _)| name == k).map(|(_, n)| n)
                }
                (Kind::Array(items), Seg::Index(i)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node.key.as_ref().unwrap_or(&node.span).start
    }

    /// `path`, shortened to the innermost table on it (where a missing key belongs).
    pub fn table_of(&self, path: &FieldPath) -> FieldPath {
        let mut node = self;
        let mut table = 0;
        for (depth, seg) in path.0.iter().enumerate() {
            let next = match (&node.kind, seg) {
                (Kind::Table(members), Seg::Key(k)) => {
                    members.iter().find(|(name, _)| name == k).map(|(_, n)| n)
                }
                (Kind::Array(items), Seg::Index(i)) => items.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            node = next;
            if matches!(node.kind, Kind::Table(_)) {
                table = depth + 1;
            }
        }
        FieldPath(path.0[..table].to_vec())
    }

    /// The path of the innermost value or key around byte `pos` (containers are searched
    /// through their members: a TOML array of tables has no span covering its bodies).
    pub fn path_at(&self, pos: usize) -> FieldPath {
        match self.find(pos) {
            Some(mut segs) => {
                segs.reverse();
                FieldPath(segs)
            }
            None => self.container_before(pos),
        }
    }

    /// The members of a table or the items of an array, each with its path segment.
    fn children(&self) -> Vec<(Seg, &Node)> {
        match &self.kind {
            Kind::Table(members) => members
                .iter()
                .map(|(name, n)| (Seg::Key(name.clone()), n))
                .collect(),
            Kind::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| (Seg::Index(i), n))
                .collect(),
            Kind::Leaf => Vec::new(),
        }
    }

    /// The container (table or array) of the last value that starts before `pos`: where a
    /// syntax error is when the parser dropped what it could not read.
    fn container_before(&self, pos: usize) -> FieldPath {
        fn walk(node: &Node, path: &mut Vec<Seg>, pos: usize, best: &mut (usize, Vec<Seg>)) {
            let children: Vec<(Seg, &Node)> = node.children();
            for (seg, child) in children {
                let start = child.key.as_ref().unwrap_or(&child.span).start;
                if start <= pos && start >= best.0 {
                    *best = (start, path.clone());
                }
                path.push(seg);
                walk(child, path, pos, best);
                path.pop();
            }
        }
        let mut best = (0, Vec::new());
        walk(self, &mut Vec::new(), pos, &mut best);
        FieldPath(best.1)
    }

    /// The path below `self` to `pos`, innermost first.
    fn find(&self, pos: usize) -> Option<Vec<Seg>> {
        let around = |r: &Range<usize>| r.start <= pos && pos <= r.end;
        let children: Vec<(Seg, &Node)> = self.children();
        for (seg, child) in children {
            if let Some(mut below) = child.find(pos) {
                below.push(seg);
                return Some(below);
            }
            if child.key.as_ref().is_some_and(around) || around(&child.span) {
                return Some(vec![seg]);
            }
        }
        None
    }
}

fn toml_table(table: &DeTable<'_>) -> Kind {
    Kind::Table(
        table
            .iter()
            .map(|(k, v)| {
                let mut node = toml_node(v.get_ref(), v.span());
                node.key = Some(k.span());
                (k.get_ref().to_string(), node)
            })
            .collect(),
    )
}

fn toml_node(value: &DeValue<'_>, span: Range<usize>) -> Node {
    let kind = match value {
        DeValue::Table(t) => toml_table(t),
        DeValue::Array(a) => {
            Kind::Array(a.iter().map(|v| toml_node(v.get_ref(), v.span())).collect())
        }
        _ => Kind::Leaf,
    };
    Node {
        key: None,
        span,
        kind,
    }
}

/// A JSON scanner for spans only (serde_json checks the document).
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let c = *self.b.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = *self.b.get(self.i)?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = std::str::from_utf8(self.b.get(self.i..self.i + 4)?).ok()?;
                            self.i += 4;
                            let ch = u32::from_str_radix(hex, 16)
                                .ok()
                                .and_then(char::from_u32)
                                .unwrap_or('\u{fffd}');
                            out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn value(&mut self, key: Option<Range<usize>>, depth: usize) -> Option<Node> {
        if depth > 128 {
            return None;
        }
        self.ws();
        let start = self.i;
        let kind = match *self.b.get(self.i)? {
            b'{' => {
                self.i += 1;
                let mut members = Vec::new();
                if self.eat(b'}').is_none() {
                    loop {
                        self.ws();
                        let key_start = self.i;
                        let name = self.string()?;
                        let key_span = key_start..self.i;
                        self.eat(b':')?;
                        members.push((name, self.value(Some(key_span), depth + 1)?));
                        if self.eat(b',').is_none() {
                            self.eat(b'}')?;
                            break;
                        }
                    }
                }
                Kind::Table(members)
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if self.eat(b']').is_none() {
                    loop {
                        items.push(self.value(None, depth + 1)?);
                        if self.eat(b',').is_none() {
                            self.eat(b']')?;
                            break;
                        }
                    }
                }
                Kind::Array(items)
            }
            b'"' => {
                self.string()?;
                Kind::Leaf
            }
            _ => {
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| !b",]} \t\r\n".contains(c))
                {
                    self.i += 1;
                }
                if self.i == start {
                    return None;
                }
                Kind::Leaf
            }
        };
        Some(Node {
            key,
            span: start..self.i,
            kind,
        })
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Byte offset of 1-based `line` and `column` (serde_json's error position).
pub(crate) fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (line_start + column.saturating_sub(1)).min(text.len())
}
