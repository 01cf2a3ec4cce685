//! Names of events, commands and page-access rights as the CLI and the operator flags spell
//! them (the reference's names in lower case, e.g. `page_fault`, `get_registers`).

use protocol::event::EventSet;
use protocol::types::Access;
use protocol::{CommandKind, EventKind};

use super::error::ClientError;

/// The name of an event kind (`page_fault`, `msr`, `breakpoint`, ...).
pub fn event_name(kind: EventKind) -> &'static str {
    kind.name()
}

/// The event kind with this name (`pf` is accepted for `page_fault`).
pub fn parse_event_name(name: &str) -> Result<EventKind, ClientError> {
    let name = name.trim().to_ascii_lowercase();
    if name == "pf" {
        return Ok(EventKind::PageFault);
    }
    EventKind::ALL
        .into_iter()
        .find(|k| event_name(*k) == name)
        .ok_or_else(|| {
            let known: Vec<_> = EventKind::ALL.into_iter().map(event_name).collect();
            ClientError::Invalid(format!(
                "unknown event `{name}` (known: {})",
                known.join(", ")
            ))
        })
}

/// A comma-separated list of event names as a set (empty string: the empty set).
pub fn parse_event_list(list: &str) -> Result<EventSet, ClientError> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_event_name)
        .collect()
}

/// The name of a command kind (`get_registers`, `set_page_access`, ...).
pub fn command_name(kind: CommandKind) -> &'static str {
    kind.name()
}

/// Access rights from an `rwx`-style string: the letters present are allowed, `-` is a
/// placeholder (`r-x`, `rx`, `---`, `r`). An empty string or other letters are an error.
pub fn parse_access(text: &str) -> Result<Access, ClientError> {
    let bad = || ClientError::Invalid(format!("bad access `{text}`: use letters r, w, x and -"));
    if text.is_empty() {
        return Err(bad());
    }
    let mut access = Access::NONE;
    for c in text.chars() {
        access = match c.to_ascii_lowercase() {
            'r' => access.union(Access::R),
            'w' => access.union(Access::W),
            'x' => access.union(Access::X),
            '-' => access,
            _ => return Err(bad()),
        };
    }
    Ok(access)
}

/// Access rights as `rwx` with `-` for a missing right.
pub fn access_string(access: Access) -> String {
    [(Access::R, 'r'), (Access::W, 'w'), (Access::X, 'x')]
        .into_iter()
        .map(|(a, c)| if access.contains(a) { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(parse_event_name(event_name(k)).unwrap(), k);
        }
        assert_eq!(parse_event_name("PF").unwrap(), EventKind::PageFault);
        assert!(parse_event_name("bogus").is_err());
        let set = parse_event_list("page_fault, msr").unwrap();
        assert!(set.contains(EventKind::PageFault) && set.contains(EventKind::Msr));
        assert!(!set.contains(EventKind::Breakpoint));
        assert_eq!(parse_event_list("").unwrap(), EventSet::EMPTY);
    }

    #[test]
    fn access_strings() {
        assert_eq!(parse_access("r-x").unwrap(), Access::R.union(Access::X));
        assert_eq!(parse_access("rw").unwrap(), Access::R.union(Access::W));
        assert_eq!(parse_access("---").unwrap(), Access::NONE);
        assert!(parse_access("").is_err());
        assert!(parse_access("rq").is_err());
        assert_eq!(access_string(Access::R.union(Access::X)), "r-x");
        assert_eq!(access_string(Access::RWX), "rwx");
    }
}
