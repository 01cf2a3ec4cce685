//! The benchmark modes (`bench=events` / `bench=read` on the command line), which
//! `kvmi appliance-bench` runs to measure the agent's side inside the appliance VM. Each ends
//! with one JSON line on the log ring (`{"bench":...}`) whose durations are TSC cycles of this
//! vCPU; the shim converts them with its own TSC calibration.
//!
//! - `bench=events n=N page=GPA gate=GPA`: the target runs test-guest `mode=mem-write n=N
//!   gate=1`. The agent enables page-fault events on vCPU 0, write-protects `page`, opens
//!   `gate` with WRITE_PHYSICAL, then answers CONTINUE to `N` events with the normal agent
//!   loop (poll the event ring, spin and back off when empty, no exit on the hot path).
//! - `bench=read mib=M from=F`: maps the first `M` MiB of the target into the window with
//!   MAP_RANGE (one GET_MAP_TOKEN and one call per 512 pages), reads everything once (first
//!   touch), then again, and reports a checksum ([`content_checksum`]) of the bytes from
//!   offset `F` on (below it the target may still be booting) so the shim can check them
//!   against READ_PHYSICAL.

use alloc::vec::Vec;

use appliance::agent::{Agent, EventHandler};
use guest_driver::{PAGE, content_checksum};
use hypercall::boot::BootInfo;
use hypercall::call::MAX_RANGE_PAGES;
use protocol::Command;
use protocol::event::{EventKind, EventSet};
use protocol::list::List;
use protocol::types::{Access, PageAccessEntry};
use serde::Serialize;

use crate::job::{Fail, Link, rdtsc};

/// What to measure.
pub enum Mode {
    /// Answer `n` page-fault events on `page`, after opening `gate`.
    Events {
        /// Events to answer.
        n: u64,
        /// The write-protected target page.
        page: u64,
        /// The target's start gate (a u64 set to 1).
        gate: u64,
    },
    /// Map and read the first `mib` MiB of the target.
    Read {
        /// MiB to read.
        mib: u64,
        /// Where the checksummed bytes start (a page multiple).
        from: u64,
    },
}

impl Mode {
    /// The mode named by `bench=`, or `None` for the normal agent.
    pub fn parse(info: &BootInfo) -> Result<Option<Mode>, Fail> {
        let num = |key: &'static str| -> Result<u64, Fail> {
            info.cmdline_value(key)
                .and_then(guest_runtime::entry::parse_u64)
                .ok_or(Fail::Args(key))
        };
        Ok(match info.cmdline_value("bench") {
            None => None,
            Some(b"events") => Some(Mode::Events {
                n: num("n")?,
                page: num("page")?,
                gate: num("gate")?,
            }),
            Some(b"read") => Some(Mode::Read {
                mib: num("mib")?,
                from: num("from")?,
            }),
            Some(_) => return Err(Fail::Args("bench")),
        })
    }
}

/// Answers every event with the default reply (CONTINUE).
struct Ack;

impl EventHandler for Ack {}

#[derive(Serialize)]
struct EventsLine {
    bench: &'static str,
    events: u64,
    replies: u64,
    sleeps: u64,
    cycles: u64,
}

#[derive(Serialize)]
struct ReadLine {
    bench: &'static str,
    bytes: u64,
    map_calls: u64,
    map_cycles: u64,
    token_cycles: u64,
    read_cycles: u64,
    reread_cycles: u64,
    checksum: u64,
    checksum_again: u64,
}

/// Runs `mode` over `link` and emits its result line.
pub fn run(mode: Mode, link: &Link) -> Result<(), Fail> {
    let mut agent = Agent::new(&link.region, Ack, link.waiting.clone()).map_err(Fail::Agent)?;
    match mode {
        Mode::Events { n, page, gate } => {
            let entries = [PageAccessEntry {
                gpa: page,
                access: Access::R.union(Access::X),
            }];
            let one = 1u64.to_le_bytes();
            command(
                link,
                &Command::ControlEvents {
                    vcpu: 0,
                    events: EventSet::EMPTY.with(EventKind::PageFault),
                },
            )?;
            command(
                link,
                &Command::SetPageAccess {
                    vcpu: 0,
                    view: 0,
                    entries: List::from_slice(&entries),
                },
            )?;
            let start = rdtsc();
            command(
                link,
                &Command::WritePhysical {
                    gpa: gate,
                    data: &one,
                },
            )?;
            let stats = agent.run(|s| s.events >= n).map_err(Fail::Agent)?;
            let cycles = rdtsc() - start;
            agent.log().emit(&EventsLine {
                bench: "events",
                events: stats.events,
                replies: stats.replies,
                sleeps: stats.sleeps,
                cycles,
            });
        }
        Mode::Read { mib, from } => {
            let line = read(link, mib, from)?;
            agent.log().emit(&line);
        }
    }
    agent.flush_log().map_err(Fail::Agent)
}

/// Sends `command` and insists on success.
fn command(link: &Link, command: &Command<'_>) -> Result<(), Fail> {
    let reply = link
        .client
        .borrow_mut()
        .call(command, link.commands)
        .map_err(Fail::Command)?;
    match reply.decode() {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(code)) => Err(Fail::Refused(
            command.kind().name(),
            alloc::format!("{code:?}"),
        )),
        Err(e) => Err(Fail::Refused(command.kind().name(), alloc::format!("{e}"))),
    }
}

/// Maps `mib` MiB of the target from gpa 0, reads them twice, and reports the cycles.
fn read(link: &Link, mib: u64, from: u64) -> Result<ReadLine, Fail> {
    let pages = mib.saturating_mul((1 << 20) / PAGE);
    if pages == 0 || pages > link.window.slot_count() as u64 {
        return Err(Fail::Args("mib"));
    }
    let start = rdtsc();
    let mut ranges = Vec::new();
    let mut mapped = 0;
    let mut token_cycles = 0;
    while mapped < pages {
        let n = (pages - mapped).min(MAX_RANGE_PAGES);
        let t = rdtsc();
        let token = link
            .client
            .borrow_mut()
            .map_token(link.commands)
            .map_err(Fail::Command)?;
        token_cycles += rdtsc() - t;
        ranges.push(
            link.window
                .map_range(&token, mapped * PAGE, n)
                .map_err(Fail::Open)?,
        );
        mapped += n;
    }
    let map_cycles = rdtsc() - start;
    let mut page = [0u8; PAGE as usize];
    let mut pass = || -> Result<u64, Fail> {
        let mut sum = 0;
        let mut offset = 0;
        for range in &ranges {
            for p in 0..range.pages() {
                range
                    .read(p * PAGE as usize, &mut page)
                    .map_err(Fail::Open)?;
                if offset >= from {
                    sum = content_checksum(sum, (offset - from) / 8, &page);
                }
                offset += PAGE;
            }
        }
        Ok(sum)
    };
    let t = rdtsc();
    let checksum = pass()?;
    let read_cycles = rdtsc() - t;
    let t = rdtsc();
    let checksum_again = pass()?;
    let reread_cycles = rdtsc() - t;
    let line = ReadLine {
        bench: "read",
        bytes: pages * PAGE,
        map_calls: ranges.len() as u64,
        map_cycles,
        token_cycles,
        read_cycles,
        reread_cycles,
        checksum,
        checksum_again,
    };
    // One MEM_UNMAP per page as the ranges drop: outside the measured spans.
    drop(ranges);
    Ok(line)
}
