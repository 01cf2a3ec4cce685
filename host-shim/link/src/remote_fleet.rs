//! The appliance process's fleet (`kvmi run --isolate`, docs/isolation.md): the appliance VM
//! with its directory, slots and hook, as [`crate::fleet::Fleet`] boots it, guarding targets
//! that each run in a process of their own. A target joins over its vhost-user link
//! ([`RemoteFleet::attach`], an [`ApplianceSlot`] per target); a target whose process ends
//! (its link hangs up) gets [`crate::fleet::FINAL_GRACE`] for the agent's final summary, then
//! its slot is marked gone and freed ([`RemoteFleet::watch`]). This process holds no target's
//! engine, no writable target memory and no target's registers.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypercall::directory::SlotState;
use kvmi_engine::IntrospectError;
use kvmi_engine::lock_order;
use kvmi_engine::tokens::TokenVerifier;
use vmm::RunOutcome;
use vmm::sync::RankedMutex;
use vmm::vm::{RunLimits, RunReport};

use crate::fleet::{
    Appliance, FINAL_GRACE, FleetConfig, STOP_GRACE, Settings, VM_GRACE, err, slot_ring_gpa,
    slot_window_gpa,
};
use crate::hook::SlotRoute;
use crate::pager::PagerStats;
use crate::remote::{ApplianceSlot, SlotSetup};
use crate::rings::LogSink;

/// A target that runs in another process, as the supervisor describes it.
#[derive(Debug)]
pub struct RemoteTarget {
    /// Its id (findings carry it; its tokens are bound to it).
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its profile's name (what the policy matches).
    pub profile: String,
    /// Its vCPUs (sizes its ring layout).
    pub vcpus: u32,
    /// The verifier of its map tokens (its key and token page from the supervisor).
    pub verifier: Arc<TokenVerifier>,
}

/// How a remote target's slot ended, as [`RemoteFleet::watch`] reports it.
#[derive(Clone, Debug)]
pub struct SlotReport {
    /// The target's id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The slot it used.
    pub slot: u32,
    /// Whether the agent's final summary for it came through before the slot was freed.
    pub final_seen: bool,
    /// Log records (findings) printed for it.
    pub log_records: u64,
    /// Its pager's counters.
    pub pages: PagerStats,
}

/// One slot's target.
struct Member {
    id: u64,
    name: String,
    vcpus: u32,
    profile: String,
    slot: ApplianceSlot,
    /// When the target's process was seen gone (the final summary's grace runs from then).
    gone_at: Option<Instant>,
}

/// The appliance VM and the slots of targets in other processes.
pub struct RemoteFleet {
    config: Settings,
    log: Arc<RankedMutex<LogSink>>,
    app: Appliance,
    members: Vec<Option<Member>>,
}

impl std::fmt::Debug for RemoteFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteFleet")
            .field("slots", &self.config.slots)
            .finish()
    }
}

impl RemoteFleet {
    /// Boots the appliance VM with every slot empty (`config.appliance.restarts` is the
    /// supervisor's business: a new appliance is a new process).
    pub fn start(config: FleetConfig) -> Result<RemoteFleet, IntrospectError> {
        let (config, sink, _) = Settings::from_config(config)?;
        let app = config.boot()?;
        Ok(RemoteFleet {
            members: (0..config.slots).map(|_| None).collect(),
            log: Arc::new(RankedMutex::new(lock_order::APPLIANCE_LOG, sink)),
            config,
            app,
        })
    }

    /// Attaches `target`, whose process serves the other end of `link`, in a free slot: its
    /// ring layout, the link (ring region and doorbell out, its RAM in read-only), the hook's
    /// route and the directory entry, live. Returns the slot.
    pub fn attach(
        &mut self,
        link: UnixStream,
        target: RemoteTarget,
    ) -> Result<u32, IntrospectError> {
        if target.vcpus > self.config.max_vcpus {
            return Err(err(format_args!(
                "target {} has {} vCPUs; the slots take at most {}",
                target.name, target.vcpus, self.config.max_vcpus
            )));
        }
        let Some(free) = self.members.iter().position(Option::is_none) else {
            return Err(err(format_args!(
                "no free slot for target {} (all {} in use)",
                target.name, self.config.slots
            )));
        };
        let slot = free as u32;
        let params = self.config.layout(target.vcpus, slot)?;
        let ring_size = params.region_size().next_multiple_of(4096);
        let log = self.log.clone();
        let sink: LogSink = Box::new(move |line: &[u8]| (log.lock())(line));
        let joined = ApplianceSlot::connect(
            link,
            SlotSetup {
                ring: self.app.rings[free].clone(),
                ring_gpa: slot_ring_gpa(slot),
                params,
                verifier: target.verifier,
                window: self.app.windows[free].clone(),
                window_gpa: slot_window_gpa(slot),
                target: (target.id, target.name.clone()),
                sink,
            },
        )
        .map_err(err)?;
        self.app.hook.set_slot(
            slot,
            Some(SlotRoute {
                pager: joined.pager().clone(),
                waker: joined.waker(),
            }),
        );
        let entry = self.config.slot_entry(
            slot,
            SlotState::Live,
            target.id,
            target.vcpus,
            &target.name,
            &target.profile,
            ring_size,
        );
        if let Err(e) = self.app.directory.write_slot(&entry) {
            self.app.hook.set_slot(slot, None);
            joined.close();
            return Err(err(e));
        }
        self.members[free] = Some(Member {
            id: target.id,
            name: target.name,
            vcpus: target.vcpus,
            profile: target.profile,
            slot: joined,
            gone_at: None,
        });
        Ok(slot)
    }

    /// One look at the slots: a target whose process went is marked ending (the agent writes
    /// its final summary); once the summary came or [`FINAL_GRACE`] passed, its slot is
    /// marked gone, its route removed and the slot freed. Returns the slots freed now.
    pub fn watch(&mut self) -> Vec<SlotReport> {
        let mut freed = Vec::new();
        for i in 0..self.members.len() {
            let Some(m) = self.members[i].as_mut() else {
                continue;
            };
            if !m.slot.is_gone() {
                continue;
            }
            let slot = i as u32;
            let first = m.gone_at.is_none();
            let gone_at = *m.gone_at.get_or_insert_with(Instant::now);
            let final_seen = m.slot.final_seen();
            if first {
                self.set_state(slot, SlotState::Ending);
            }
            let ended = self.app.vm.handle().has_ended();
            if !final_seen && gone_at.elapsed() < FINAL_GRACE && !ended {
                continue;
            }
            if let Some(m) = self.members[i].take() {
                freed.push(self.release(slot, m));
            }
        }
        freed
    }

    fn set_state(&self, slot: u32, state: SlotState) {
        if let Ok(mut entry) = self.app.directory.slot(slot) {
            entry.state = state;
            let _ = self.app.directory.write_slot(&entry);
        }
    }

    /// Frees slot `slot`: entry gone, route removed, the link closed (the target's process,
    /// if it still runs, detaches the appliance), every grant revoked.
    fn release(&self, slot: u32, m: Member) -> SlotReport {
        self.set_state(slot, SlotState::Gone);
        self.app.hook.set_slot(slot, None);
        let final_seen = m.slot.final_seen();
        let pager = m.slot.pager().clone();
        let log_records = m.slot.close();
        tracing::debug!(vcpus = m.vcpus, profile = %m.profile, "slot {slot} freed");
        SlotReport {
            id: m.id,
            name: m.name,
            slot,
            final_seen,
            log_records,
            pages: pager.stats(),
        }
    }

    /// Whether the appliance VM has ended.
    pub fn appliance_ended(&self) -> bool {
        self.app.vm.handle().has_ended()
    }

    /// Targets attached now.
    pub fn attached(&self) -> usize {
        self.members.iter().flatten().count()
    }

    /// Ends the appliance: with `ask_agent`, the directory's stop word asks the agent for its
    /// final report and it gets [`STOP_GRACE`] to end; then every slot is freed and the VM
    /// stopped. Returns the slots freed and the appliance VM's run.
    pub fn stop(mut self, ask_agent: bool) -> (Vec<SlotReport>, RunReport) {
        let mut freed = self.watch();
        if ask_agent && !self.appliance_ended() {
            self.app.directory.request_stop();
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline && !self.appliance_ended() {
                freed.extend(self.watch());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for i in 0..self.members.len() {
            if let Some(m) = self.members[i].take() {
                freed.push(self.release(i as u32, m));
            }
        }
        self.app.vm.handle().stop_with(RunOutcome::Interrupted);
        let run = self.app.vm.wait(RunLimits {
            timeout: Some(VM_GRACE),
            interrupt: None,
        });
        (freed, run)
    }
}
