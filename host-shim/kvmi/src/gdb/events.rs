//! What a KVMI event means to the debugger: a stop to report to gdb, or an event the stub
//! answers CONTINUE without telling gdb (a fetch elsewhere on a no-exec page, an access
//! outside a watched range, a pause the stub no longer needs).

use std::collections::BTreeSet;

use protocol::{Event, EventPayload};

use super::breakpoints::{Bookkeeping, WatchKind};

/// PF event mode bit: an instruction fetch.
const FETCH: u32 = 4;

/// Why a vCPU stopped, as gdb will hear it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// One instruction stepped (SINGLESTEP).
    Step,
    /// A hardware breakpoint (BREAKPOINT event at one of ours).
    HwBreak,
    /// A software breakpoint (fetch fault at one of ours).
    SwBreak,
    /// A watched range was accessed (`addr`: the watched byte touched).
    Watch {
        /// The watch's kind.
        kind: WatchKind,
        /// The address touched.
        addr: u64,
    },
    /// The vCPU paused (PAUSE_VCPU): no stop of its own.
    Paused,
}

/// The verdict on one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hold the vCPU and report (or keep) this stop.
    Stop(StopKind),
    /// Answer CONTINUE and go on.
    Silent,
}

/// Classifies `event` against the breakpoints set: `hw` holds the hardware breakpoint
/// addresses, `stepping` whether the vCPU was resumed for one step.
pub fn classify(event: &Event, book: &Bookkeeping, hw: &BTreeSet<u64>, stepping: bool) -> Verdict {
    let rip = event.common.regs.rip.get();
    match event.payload {
        EventPayload::PauseVcpu => Verdict::Stop(StopKind::Paused),
        EventPayload::Singlestep if stepping => Verdict::Stop(StopKind::Step),
        EventPayload::Breakpoint { .. } if hw.contains(&rip) => Verdict::Stop(StopKind::HwBreak),
        EventPayload::PageFault { gva, gpa, mode } => {
            if mode & FETCH != 0 {
                let at = if gva == u64::MAX { rip } else { gva };
                if at == rip && book.sw_at(rip, Some(gpa)).is_some() {
                    return Verdict::Stop(StopKind::SwBreak);
                }
                return Verdict::Silent;
            }
            match book.watch_hit(gpa, mode) {
                Some((watch, addr)) => Verdict::Stop(StopKind::Watch {
                    kind: watch.kind,
                    addr,
                }),
                None => Verdict::Silent,
            }
        }
        _ => Verdict::Silent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gdb::breakpoints::{SwBreakpoint, Watch};
    use protocol::kvm::{KvmRegs, KvmSregs};
    use protocol::types::CpuMode;

    fn event(rip: u64, payload: EventPayload) -> Event {
        let mut regs = KvmRegs::default();
        regs.rip.set(rip);
        Event {
            common: protocol::event::EventCommon {
                vcpu: 0,
                mode: CpuMode::from_bytes(8).unwrap(),
                regs,
                sregs: KvmSregs::default(),
                msrs: Default::default(),
            },
            payload,
        }
    }

    fn pf(gva: u64, gpa: u64, mode: u32) -> EventPayload {
        EventPayload::PageFault { gva, gpa, mode }
    }

    #[test]
    fn fetch_faults_stop_only_at_breakpoints() {
        let mut book = Bookkeeping::default();
        book.add_sw(SwBreakpoint {
            gva: 0x40_1000,
            gpa: 0x1000,
        });
        let hw = BTreeSet::new();
        let at = event(0x40_1000, pf(0x40_1000, 0x1000, 4));
        assert_eq!(
            classify(&at, &book, &hw, false),
            Verdict::Stop(StopKind::SwBreak)
        );
        let elsewhere = event(0x40_1004, pf(0x40_1004, 0x1004, 4));
        assert_eq!(classify(&elsewhere, &book, &hw, false), Verdict::Silent);
        let read = event(0x40_2000, pf(u64::MAX, 0x1000, 1));
        assert_eq!(classify(&read, &book, &hw, false), Verdict::Silent);
    }

    #[test]
    fn watches_stop_on_overlap_and_steps_and_hw_breaks_are_reported() {
        let mut book = Bookkeeping::default();
        book.add_watch(Watch {
            gva: 0x7000,
            len: 8,
            kind: WatchKind::Write,
            pieces: vec![(0x3010, 8)],
        });
        let hw: BTreeSet<u64> = [0x50_0000].into();
        let write = event(0x1, pf(u64::MAX, 0x3014, 2));
        assert_eq!(
            classify(&write, &book, &hw, false),
            Verdict::Stop(StopKind::Watch {
                kind: WatchKind::Write,
                addr: 0x7004
            })
        );
        let beside = event(0x1, pf(u64::MAX, 0x3018, 2));
        assert_eq!(classify(&beside, &book, &hw, false), Verdict::Silent);
        let bp = event(0x50_0000, EventPayload::Breakpoint { gpa: 0 });
        assert_eq!(
            classify(&bp, &book, &hw, false),
            Verdict::Stop(StopKind::HwBreak)
        );
        let stale = event(0x60_0000, EventPayload::Breakpoint { gpa: 0 });
        assert_eq!(classify(&stale, &book, &hw, false), Verdict::Silent);
        let step = event(0x2, EventPayload::Singlestep);
        assert_eq!(
            classify(&step, &book, &hw, true),
            Verdict::Stop(StopKind::Step)
        );
        assert_eq!(classify(&step, &book, &hw, false), Verdict::Silent);
    }
}
