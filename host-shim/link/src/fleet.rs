//! One appliance VM guarding many targets (a fleet), in one shim process.
//!
//! The appliance gets a **target directory** (`hypercall::directory`) and one **slot** per
//! target it may guard: a ring region and a map window at fixed guest-physical addresses
//! ([`slot_ring_gpa`], [`slot_window_gpa`]), created when the appliance boots. A target that
//! joins takes a free slot: its introspector is attached to a fresh ring layout in the slot
//! (a [`RingService`]), a [`Pager`] serves the slot's window, the appliance's exit hook routes
//! the slot's hypercalls, and the directory entry turns live. The agent sees the directory
//! change and starts guarding the target; the target's vCPUs wait for the agent's answer to
//! their first event, so nothing goes unwatched.
//!
//! - **A target ends**: its slot is detached (grants revoked, rings stopped, the directory
//!   entry marked gone) and freed for another target; the others are not touched.
//! - **A target joins a running appliance** ([`Fleet::add_target`]): the same as at boot.
//! - **The appliance ends or is detached** (exit, crash, a corrupt ring or reply timeout on
//!   any slot): every slot is detached (the targets run on, unhooked) and its VM stopped;
//!   while restarts remain ([`ApplianceConfig::restarts`]) a fresh appliance VM is booted and
//!   every running target re-attached to it.
//! - **Stop** ([`Fleet::wait`] on timeout or interrupt): the directory's stop word asks the
//!   agent for its final report; the shim waits briefly for the appliance to end, then stops
//!   the targets.
//!
//! Log-ring lines are labelled by the slot they came from: the shim inserts `"target"` (the
//! target's id) and `"target_name"` into every JSON object line, so a finding always names
//! its target and an appliance cannot attribute a line to another target.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hypercall::directory::{self, Directory, MAX_SLOTS, Slot, SlotState};
use hypercall::ring::{LayoutParams, SharedRegion};

use super::hook::{ApplianceHook, SERVED_FEATURES, SlotRoute};
use super::launch::{ApplianceConfig, RING_REGION_GPA};
use super::pager::{Pager, PagerStats, hand_out_key};
use super::rings::{FleetCounter, LogSink, RingMemory, RingService, ServiceEnd, create_region_in};
use kvmi_engine::lock_order;
use kvmi_engine::{IntrospectError, Introspector, IntrospectorConfig};
use vmm::RunOutcome;
use vmm::memory::GuestRam;
use vmm::running::{RunningVm, VmHandle};
use vmm::sync::RankedMutex;
use vmm::vm::{RunLimits, RunReport, Vm};
use vmm::window::RemapWindow;

/// Guest-physical address of the target directory in the appliance (just below the slots).
pub const DIRECTORY_GPA: u64 = 0xBF00_0000;
/// Guest-physical distance between two slots (112 MiB: 16 MiB of ring region, then the
/// window); slot 0 is where a single target's ring region and window have always been.
pub const SLOT_STRIDE: u64 = 0x0700_0000;
/// Offset of a slot's map window from its ring region.
pub const SLOT_WINDOW_OFFSET: u64 = 0x0100_0000;
/// Largest map window of a slot in a fleet (96 MiB).
pub const MAX_SLOT_WINDOW: u64 = SLOT_STRIDE - SLOT_WINDOW_OFFSET;
/// How long the appliance gets to report and end after a stop request.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a stopped VM's vCPUs get to end.
pub(crate) const VM_GRACE: Duration = Duration::from_secs(2);
/// How long the agent gets to write a final summary for a target that ended.
pub const FINAL_GRACE: Duration = Duration::from_millis(500);
/// How often the fleet looks at its VMs.
const WATCH_PERIOD: Duration = Duration::from_millis(20);

/// Guest-physical base of slot `slot`'s ring region.
pub const fn slot_ring_gpa(slot: u32) -> u64 {
    RING_REGION_GPA + slot as u64 * SLOT_STRIDE
}

/// Guest-physical base of slot `slot`'s map window.
pub const fn slot_window_gpa(slot: u32) -> u64 {
    slot_ring_gpa(slot) + SLOT_WINDOW_OFFSET
}

/// Whether `needle` occurs in `haystack`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub(crate) fn err(e: impl std::fmt::Display) -> IntrospectError {
    IntrospectError::Io {
        what: "setting up the fleet".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A target VM to guard.
pub struct TargetSpec {
    /// Its name (findings carry it; at most 32 bytes are shown to the agent).
    pub name: String,
    /// Its profile's name (the image it runs), which picks the policy's rules.
    pub profile: String,
    /// The VM, built and not started.
    pub vm: Vm,
    /// Its introspector's configuration.
    pub introspection: IntrospectorConfig,
}

impl std::fmt::Debug for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetSpec")
            .field("name", &self.name)
            .field("profile", &self.profile)
            .finish()
    }
}

/// How to build the fleet's appliance.
pub struct FleetConfig {
    /// The appliance VM, its log sink, window size (at most [`MAX_SLOT_WINDOW`]), ring sizes,
    /// timeouts and restarts.
    pub appliance: ApplianceConfig,
    /// Slots: the most targets guarded at once (1..=[`MAX_SLOTS`]).
    pub slots: u32,
    /// The most vCPUs a target may have (sizes every slot's ring region).
    pub max_vcpus: u32,
    /// The compiled policy handed to the agent in the directory (may be empty).
    pub policy: Vec<u8>,
}

/// How one target's run ended.
#[derive(Clone, Debug)]
pub struct TargetReport {
    /// The target's id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The slot it used.
    pub slot: u32,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its guest RAM in bytes.
    pub memory_bytes: u64,
    /// Its run.
    pub run: RunReport,
    /// Page-call counters of every appliance that guarded it.
    pub pages: PagerStats,
    /// Event replies it received from the appliance.
    pub answered: u64,
    /// The most events of other targets the appliance answered while one event of this
    /// target waited for its reply (the fairness it got).
    pub max_others_waited: u64,
}

/// What the fleet did.
#[derive(Debug)]
pub struct FleetReport {
    /// Every target's run, in the order they ended.
    pub targets: Vec<TargetReport>,
    /// The last appliance's run.
    pub appliance: Option<RunReport>,
    /// Why the last appliance's ring services ended (the first abnormal end, if any).
    pub service: ServiceEnd,
    /// Appliances booted after the first.
    pub restarts: u32,
}

/// A running target of the fleet, as [`Fleet::targets`] lists it.
#[derive(Clone, Debug)]
pub struct TargetInfo {
    /// The target's id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its profile's name.
    pub profile: String,
    /// The slot it uses.
    pub slot: u32,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its guest RAM in bytes.
    pub memory_bytes: u64,
    /// Whether an appliance guards it now (false while the appliance is being replaced, or
    /// after it ended with no restart left).
    pub attached: bool,
    /// The control handle of its VM (pause, resume, stop; what a dump reads).
    pub handle: VmHandle,
}

/// Live counters of one running target (over every appliance that guarded it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetCounters {
    /// Introspection events its vCPUs sent to the appliance.
    pub events: u64,
    /// Event replies the appliance sent back.
    pub replies: u64,
    /// Log-ring records (findings) the appliance wrote about it.
    pub log_records: u64,
    /// Page-call counters of its map window.
    pub pages: PagerStats,
}

/// The appliance VM of a fleet, as [`Fleet::appliance`] describes it.
#[derive(Clone, Debug)]
pub struct ApplianceInfo {
    /// Its VM's name.
    pub name: String,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its guest RAM in bytes.
    pub memory_bytes: u64,
    /// Appliances booted after the first.
    pub restarts: u32,
    /// The control handle of its VM.
    pub handle: VmHandle,
}

/// Why [`Fleet::remove_target`] refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RemoveError {
    /// No target of that id ever ran in this fleet.
    #[error("no target {0}")]
    Unknown(u64),
    /// The target has ended already (its slot is free).
    #[error("target {0} has ended already")]
    Ended(u64),
}

/// What the fleet knows of a target, running or not.
struct Identity {
    id: u64,
    name: String,
    profile: String,
    vcpus: u32,
    introspector: Arc<Introspector>,
    ram: Arc<GuestRam>,
}

/// A slot's ring service and pager while its target is attached to an appliance, and
/// whether the agent's final summary for it has come through the log ring.
struct Attachment {
    service: Arc<RingService>,
    pager: Arc<Pager>,
    final_seen: Arc<AtomicBool>,
}

/// One running target in a slot.
struct Member {
    who: Identity,
    vm: RunningVm,
    attached: Option<Attachment>,
    pages: PagerStats,
    answered: u64,
    max_others_waited: u64,
    /// Log records of appliances that guarded it before the current one.
    log_records: u64,
}

/// The appliance VM and its slots' memory.
pub(crate) struct Appliance {
    pub(crate) vm: RunningVm,
    /// Replies across all its targets (fairness accounting).
    pub(crate) answered: Arc<FleetCounter>,
    pub(crate) hook: Arc<ApplianceHook>,
    pub(crate) directory: Directory<RingMemory>,
    pub(crate) rings: Vec<Arc<GuestRam>>,
    pub(crate) windows: Vec<Arc<RemapWindow>>,
}

struct State {
    appliance: Option<Appliance>,
    members: Vec<Option<Member>>,
    ended: Vec<TargetReport>,
    last_appliance: Option<RunReport>,
    service: ServiceEnd,
    restarts_left: u32,
    restarts: u32,
    next_id: u64,
    /// The fleet is stopping: an appliance that ends now did what it was asked.
    stopping: bool,
}

/// How to build the appliance, without the log sink (the fleet owns that behind a lock, so
/// the fleet can be shared between threads).
pub(crate) struct ApplianceSettings {
    pub(crate) vm: vmm::vm::VmConfig,
    pub(crate) image: Vec<u8>,
    pub(crate) serial: vmm::devices::SerialSink,
    pub(crate) window_size: u64,
    pub(crate) sizes: hypercall::ring::RingSizes,
    pub(crate) full_timeout: Duration,
}

/// [`FleetConfig`] without the log sink.
pub(crate) struct Settings {
    pub(crate) appliance: ApplianceSettings,
    pub(crate) slots: u32,
    pub(crate) max_vcpus: u32,
    pub(crate) policy: Vec<u8>,
}

impl Settings {
    /// Checks `config` and splits it into the settings, the log sink and the restarts.
    pub(crate) fn from_config(
        config: FleetConfig,
    ) -> Result<(Settings, LogSink, u32), IntrospectError> {
        if config.slots == 0 || config.slots > MAX_SLOTS {
            return Err(err(format_args!("slots must be 1..={MAX_SLOTS}")));
        }
        if config.slots > 1 && config.appliance.window_size > MAX_SLOT_WINDOW {
            return Err(err("a fleet's map windows are at most 96 MiB each"));
        }
        let FleetConfig {
            appliance:
                ApplianceConfig {
                    vm,
                    image,
                    serial,
                    log: sink,
                    window_size,
                    sizes,
                    full_timeout,
                    restarts,
                },
            slots,
            max_vcpus,
            policy,
        } = config;
        let settings = Settings {
            appliance: ApplianceSettings {
                vm,
                image,
                serial,
                window_size,
                sizes,
                full_timeout,
            },
            slots,
            max_vcpus,
            policy,
        };
        Ok((settings, sink, restarts))
    }

    /// Builds and starts an appliance VM with every slot's ring region and window and a fresh
    /// directory (all slots empty).
    pub(crate) fn boot(&self) -> Result<Appliance, IntrospectError> {
        let c = self;
        let params = c.layout(c.max_vcpus, 0)?;
        let ring_size = params.region_size().next_multiple_of(4096);
        if ring_size > SLOT_WINDOW_OFFSET {
            return Err(err("the ring region of a slot is larger than 16 MiB"));
        }
        let mut vm = Vm::new(c.appliance.vm.clone(), &c.appliance.image)?;
        vm.set_serial(c.appliance.serial.try_clone().map_err(err)?);
        let dir_size = directory::region_size(c.slots, c.policy.len());
        if dir_size > RING_REGION_GPA - DIRECTORY_GPA {
            return Err(err("the policy is too large (at most 16 MiB)"));
        }
        let dir_ram = vm.add_shared_region("kvmi-directory", DIRECTORY_GPA, dir_size)?;
        let mut rings = Vec::new();
        let mut windows = Vec::new();
        for slot in 0..c.slots {
            rings.push(vm.add_shared_region(
                &format!("kvmi-ring-region-{slot}"),
                slot_ring_gpa(slot),
                ring_size,
            )?);
            windows.push(vm.add_remap_window(slot_window_gpa(slot), c.appliance.window_size)?);
        }
        vm.update_boot_info(|boot| {
            boot.ring_region_gpa = slot_ring_gpa(0);
            boot.ring_region_size = ring_size;
            boot.map_window_gpa = slot_window_gpa(0);
            boot.map_window_size = c.appliance.window_size;
            boot.directory_gpa = DIRECTORY_GPA;
            boot.directory_size = dir_size;
        })?;
        let directory = Directory::create(shared(dir_ram)?, c.slots, &c.policy).map_err(err)?;
        for slot in 0..c.slots {
            directory
                .write_slot(&c.slot_entry(slot, SlotState::Empty, 0, 0, "", "", ring_size))
                .map_err(err)?;
        }
        let hook = Arc::new(ApplianceHook::with_slots(c.slots));
        vm.set_hook(hook.clone());
        let vm = vm.start()?;
        Ok(Appliance {
            vm,
            answered: Arc::default(),
            hook,
            directory,
            rings,
            windows,
        })
    }

    /// The ring layout of a target with `vcpus` vCPUs in slot `slot`.
    pub(crate) fn layout(&self, vcpus: u32, slot: u32) -> Result<LayoutParams, IntrospectError> {
        let params = LayoutParams {
            vcpu_count: vcpus,
            sizes: self.appliance.sizes,
            features: SERVED_FEATURES,
            map_window_gpa: slot_window_gpa(slot),
            map_window_size: self.appliance.window_size,
        };
        params.validate().map_err(err)?;
        Ok(params)
    }

    /// Slot `slot`'s directory entry.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn slot_entry(
        &self,
        slot: u32,
        state: SlotState,
        id: u64,
        vcpus: u32,
        name: &str,
        profile: &str,
        ring_size: u64,
    ) -> Slot {
        Slot {
            index: slot,
            state,
            target_id: id,
            ring_gpa: slot_ring_gpa(slot),
            ring_size,
            window_gpa: slot_window_gpa(slot),
            window_size: self.appliance.window_size,
            vcpus,
            name: directory::name_field(name),
            profile: directory::name_field(profile),
        }
    }
}

/// A running fleet: one appliance, up to `slots` targets. It can be shared between threads
/// (e.g. one that adds targets while another waits).
pub struct Fleet {
    config: Settings,
    log: Arc<RankedMutex<LogSink>>,
    state: RankedMutex<State>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("slots", &self.config.slots)
            .finish()
    }
}

/// `record` with `"target":id,"target_name":name` inserted after its opening brace (a record
/// that is not a JSON object is wrapped as a string in `"line"`).
pub fn label_line(record: &[u8], id: u64, name: &str) -> Vec<u8> {
    let record = record.strip_suffix(b"\n").unwrap_or(record);
    let name = serde_json::to_string(name).unwrap_or_else(|_| "\"?\"".into());
    let mut out = format!("{{\"target\":{id},\"target_name\":{name}").into_bytes();
    match record.strip_prefix(b"{") {
        Some(rest) if rest.trim_ascii_start().starts_with(b"}") => out.extend_from_slice(rest),
        Some(rest) => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        None => {
            let text = serde_json::to_string(&String::from_utf8_lossy(record))
                .unwrap_or_else(|_| "\"?\"".into());
            out.extend_from_slice(format!(",\"line\":{text}}}").as_bytes());
        }
    }
    out
}

impl Fleet {
    /// Boots the appliance, then attaches and starts every target of `targets` (each waits
    /// for the agent's first answer before it runs).
    pub fn start(config: FleetConfig, targets: Vec<TargetSpec>) -> Result<Fleet, IntrospectError> {
        if targets.len() > config.slots as usize {
            return Err(err(format_args!(
                "{} targets for {} slots",
                targets.len(),
                config.slots
            )));
        }
        let (config, sink, restarts) = Settings::from_config(config)?;
        let log = Arc::new(RankedMutex::new(lock_order::APPLIANCE_LOG, sink));
        let restarts_left = restarts;
        let fleet = Fleet {
            state: RankedMutex::new(
                lock_order::FLEET,
                State {
                    appliance: None,
                    members: (0..config.slots).map(|_| None).collect(),
                    ended: Vec::new(),
                    last_appliance: None,
                    service: ServiceEnd::Stopped,
                    restarts_left,
                    restarts: 0,
                    next_id: 1,
                    stopping: false,
                },
            ),
            config,
            log,
        };
        let appliance = fleet.config.boot()?;
        fleet.state.lock().appliance = Some(appliance);
        for spec in targets {
            if let Err(e) = fleet.add_target(spec) {
                fleet.shut_down();
                return Err(e);
            }
        }
        Ok(fleet)
    }

    /// Attaches target `who` in slot `slot` to `app`: a fresh ring layout and ring service, a
    /// pager for the slot's window, the hook's route, and the directory entry, live.
    fn attach(
        &self,
        app: &Appliance,
        slot: u32,
        who: &Identity,
    ) -> Result<Attachment, IntrospectError> {
        let i = slot as usize;
        let params = self.config.layout(who.vcpus, slot)?;
        // This target's layout, in a prefix of the slot's ring memory (sized for the largest).
        let ring_size = params.region_size().next_multiple_of(4096);
        let region =
            create_region_in(app.rings[i].clone(), ring_size as usize, &params).map_err(err)?;
        let log = self.log.clone();
        let (id, name) = (who.id, who.name.clone());
        let final_seen = Arc::new(AtomicBool::new(false));
        let seen = final_seen.clone();
        let sink: LogSink = Box::new(move |record: &[u8]| {
            if contains(record, b"\"final\":true") {
                seen.store(true, Ordering::SeqCst);
            }
            let line = label_line(record, id, &name);
            (log.lock())(&line)
        });
        // The supervisor's step: a fresh key for the slot's pager and the target's engine
        // (tokens issued before are dead), before the agent can ask for a token.
        let verifier = hand_out_key(&who.introspector).map_err(err)?;
        let service = Arc::new(
            RingService::start_in_fleet(
                who.introspector.clone(),
                &region,
                sink,
                self.config.appliance.full_timeout,
                app.answered.clone(),
            )
            .map_err(err)?,
        );
        let pager = Arc::new(Pager::new(
            verifier,
            who.ram.clone(),
            Vec::new(),
            app.windows[i].clone(),
            slot_window_gpa(slot),
        ));
        app.hook.set_slot(
            slot,
            Some(SlotRoute {
                pager: pager.clone(),
                waker: service.waker(),
            }),
        );
        let entry = self.config.slot_entry(
            slot,
            SlotState::Live,
            who.id,
            who.vcpus,
            &who.name,
            &who.profile,
            ring_size,
        );
        let attachment = Attachment {
            service,
            pager,
            final_seen,
        };
        if let Err(e) = app.directory.write_slot(&entry) {
            Self::release(
                Some(app),
                slot,
                &who.introspector,
                attachment,
                "the directory refused the slot",
            );
            return Err(err(e));
        }
        Ok(attachment)
    }

    /// Ends an attachment: directory entry gone, route removed, grants revoked, rings
    /// stopped, the introspector unhooked. Returns why the ring service ended and the pager's
    /// counters.
    fn release(
        app: Option<&Appliance>,
        slot: u32,
        introspector: &Introspector,
        Attachment { service, pager, .. }: Attachment,
        why: &str,
    ) -> (ServiceEnd, PagerStats, u64, u64) {
        if let Some(app) = app {
            if let Ok(mut entry) = app.directory.slot(slot) {
                entry.state = SlotState::Gone;
                let _ = app.directory.write_slot(&entry);
            }
            app.hook.set_slot(slot, None);
        }
        pager.retire();
        let end = service.stop();
        introspector.detach(service.generation(), why);
        let channel = service.channel();
        (
            end,
            pager.stats(),
            channel.answered(),
            channel.max_others_answered(),
        )
    }

    /// Detaches the member of slot `slot` from `app` (if attached); returns why its ring
    /// service ended.
    fn detach(app: Option<&Appliance>, slot: u32, member: &mut Member, why: &str) -> ServiceEnd {
        let Some(attachment) = member.attached.take() else {
            return ServiceEnd::Stopped;
        };
        member.log_records += attachment
            .service
            .stats()
            .log_records
            .load(Ordering::Relaxed);
        let (end, pages, answered, max_others) =
            Self::release(app, slot, &member.who.introspector, attachment, why);
        member.pages = member.pages.plus(pages);
        member.answered += answered;
        member.max_others_waited = member.max_others_waited.max(max_others);
        end
    }

    /// Before a target that ended is detached: its slot turns ending, and the agent gets
    /// [`FINAL_GRACE`] to write the target's final summary on the slot's log ring (still
    /// served).
    fn final_report(app: Option<&Appliance>, slot: u32, member: &Member) {
        let (Some(app), Some(attachment)) = (app, member.attached.as_ref()) else {
            return;
        };
        let Ok(mut entry) = app.directory.slot(slot) else {
            return;
        };
        entry.state = SlotState::Ending;
        if app.directory.write_slot(&entry).is_err() {
            return;
        }
        let deadline = Instant::now() + FINAL_GRACE;
        while !attachment.final_seen.load(Ordering::SeqCst)
            && Instant::now() < deadline
            && !app.vm.handle().has_ended()
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Adds a target to the running fleet: a free slot, its introspector, attached to the
    /// current appliance, then started. Returns the target's id.
    pub fn add_target(&self, spec: TargetSpec) -> Result<u64, IntrospectError> {
        let TargetSpec {
            name,
            profile,
            mut vm,
            introspection,
        } = spec;
        let caps = vmm::probe::cached_capabilities().map_err(err)?;
        let introspector = Introspector::install(&mut vm, caps, introspection)?;
        self.add_installed(name, profile, vm, introspector)
    }

    /// [`Fleet::add_target`] for a VM whose introspector is already installed (its exit hook
    /// may have been wrapped since, e.g. by a benchmark timing the exits).
    pub fn add_installed(
        &self,
        name: String,
        profile: String,
        vm: Vm,
        introspector: Arc<Introspector>,
    ) -> Result<u64, IntrospectError> {
        let vcpus = vm.boot_info().vcpu_count;
        if vcpus > self.config.max_vcpus {
            return Err(err(format_args!(
                "target {name} has {vcpus} vCPUs; the fleet's slots take at most {}",
                self.config.max_vcpus
            )));
        }
        let mut state = self.state.lock();
        if state.stopping {
            return Err(err(format_args!(
                "the fleet is stopping: target {name} not added"
            )));
        }
        let Some(slot) = state.members.iter().position(Option::is_none) else {
            return Err(err(format_args!(
                "no free slot for target {name} (all {} in use)",
                self.config.slots
            )));
        };
        let Some(app) = state.appliance.as_ref() else {
            return Err(err("no appliance is running"));
        };
        let slot = slot as u32;
        let who = Identity {
            id: state.next_id,
            name,
            profile,
            vcpus,
            introspector,
            ram: vm.ram().clone(),
        };
        // Attach before the target starts: its first event finds the rings ready.
        let attachment = self.attach(app, slot, &who)?;
        let running = match vm.start() {
            Ok(r) => r,
            Err(e) => {
                Self::release(
                    Some(app),
                    slot,
                    &who.introspector,
                    attachment,
                    "the target did not start",
                );
                return Err(e.into());
            }
        };
        who.introspector.set_handle(running.handle());
        state.next_id += 1;
        let id = who.id;
        state.members[slot as usize] = Some(Member {
            who,
            vm: running,
            attached: Some(attachment),
            pages: PagerStats::default(),
            answered: 0,
            max_others_waited: 0,
            log_records: 0,
        });
        Ok(id)
    }

    /// One look at the fleet: targets that ended are detached and reported; an appliance that
    /// ended or was detached on any slot is retired and, while restarts remain, replaced.
    /// Returns true when no target runs any more.
    fn check(&self) -> bool {
        let mut state = self.state.lock();
        let st = &mut *state;
        for slot in 0..st.members.len() {
            let ended = st.members[slot]
                .as_ref()
                .is_some_and(|m| m.vm.handle().has_ended());
            if !ended {
                continue;
            }
            let Some(mut member) = st.members[slot].take() else {
                continue;
            };
            Self::final_report(st.appliance.as_ref(), slot as u32, &member);
            Self::detach(
                st.appliance.as_ref(),
                slot as u32,
                &mut member,
                "the target ended",
            );
            let run = member.vm.wait(RunLimits {
                timeout: Some(VM_GRACE),
                interrupt: None,
            });
            vmm::devices::eprint_line(format_args!(
                "kvmi: target {} ({}) ended: {}; slot {slot} freed",
                member.who.id, member.who.name, run.outcome
            ));
            st.ended.push(TargetReport {
                id: member.who.id,
                vcpus: member.who.vcpus,
                memory_bytes: member.who.ram.size(),
                name: member.who.name,
                slot: slot as u32,
                run,
                pages: member.pages,
                answered: member.answered,
                max_others_waited: member.max_others_waited,
            });
        }
        let broken = st.appliance.as_ref().and_then(|app| {
            if app.vm.handle().has_ended() {
                return Some("the appliance VM ended".to_string());
            }
            st.members.iter().flatten().find_map(|m| {
                m.attached
                    .as_ref()
                    .filter(|a| a.service.has_ended())
                    .map(|_| format!("the appliance was detached from target {}", m.who.name))
            })
        });
        if let Some(why) = broken {
            self.retire_appliance(st, &why);
            if st.stopping {
                // Asked to report and end: not a failure, nothing to restart.
            } else if st.restarts_left == 0 {
                vmm::devices::eprint_line(format_args!(
                    "kvmi: {why}; the targets run on, unhooked"
                ));
            } else {
                st.restarts_left -= 1;
                st.restarts += 1;
                let n = st.restarts;
                match self.config.boot() {
                    Ok(app) => {
                        let mut failed = 0;
                        for slot in 0..st.members.len() {
                            if let Some(m) = st.members[slot].as_mut()
                                && let Err(e) = self.attach_member(&app, slot as u32, m)
                            {
                                failed += 1;
                                tracing::warn!("re-attaching target {}: {e}", m.who.name);
                            }
                        }
                        vmm::devices::eprint_line(format_args!(
                            "kvmi: {why}; started appliance #{n} for {} targets{}",
                            st.members.iter().flatten().count(),
                            if failed > 0 {
                                " (some not re-attached)"
                            } else {
                                ""
                            }
                        ));
                        st.appliance = Some(app);
                    }
                    Err(e) => vmm::devices::eprint_line(format_args!(
                        "kvmi: {why}; restarting it failed: {e}; the targets run on, unhooked"
                    )),
                }
            }
        }
        st.members.iter().all(Option::is_none)
    }

    fn attach_member(
        &self,
        app: &Appliance,
        slot: u32,
        m: &mut Member,
    ) -> Result<(), IntrospectError> {
        m.attached = Some(self.attach(app, slot, &m.who)?);
        Ok(())
    }

    /// Detaches every member and stops the appliance VM, recording how it ended.
    fn retire_appliance(&self, st: &mut State, why: &str) {
        let Some(app) = st.appliance.take() else {
            return;
        };
        for slot in 0..st.members.len() {
            if let Some(m) = st.members[slot].as_mut() {
                let end = Self::detach(Some(&app), slot as u32, m, why);
                if matches!(end, ServiceEnd::Detached(_))
                    && matches!(st.service, ServiceEnd::Stopped)
                {
                    st.service = end;
                }
            }
        }
        app.vm.handle().stop();
        st.last_appliance = Some(app.vm.wait(RunLimits {
            timeout: Some(VM_GRACE),
            interrupt: None,
        }));
    }

    /// One look at the fleet, as [`Fleet::wait`] takes every 20 ms: targets that ended are
    /// detached (their slots freed) and an appliance that ended is replaced. Returns true when
    /// no target runs any more. For callers that drive the fleet themselves.
    pub fn watch(&self) -> bool {
        self.check()
    }

    /// The ids and names of the targets that have ended so far, in the order they ended.
    pub fn ended(&self) -> Vec<(u64, String)> {
        self.state
            .lock()
            .ended
            .iter()
            .map(|t| (t.id, t.name.clone()))
            .collect()
    }

    /// The targets running now, by slot.
    pub fn targets(&self) -> Vec<TargetInfo> {
        let state = self.state.lock();
        state
            .members
            .iter()
            .enumerate()
            .filter_map(|(slot, m)| {
                let m = m.as_ref()?;
                Some(TargetInfo {
                    id: m.who.id,
                    name: m.who.name.clone(),
                    profile: m.who.profile.clone(),
                    slot: slot as u32,
                    vcpus: m.who.vcpus,
                    memory_bytes: m.who.ram.size(),
                    attached: m.attached.is_some(),
                    handle: m.vm.handle(),
                })
            })
            .collect()
    }

    /// The running target `id`, if it runs.
    pub fn target(&self, id: u64) -> Option<TargetInfo> {
        self.targets().into_iter().find(|t| t.id == id)
    }

    /// The reports of the targets that have ended so far, in the order they ended.
    pub fn ended_targets(&self) -> Vec<TargetReport> {
        self.state.lock().ended.clone()
    }

    /// The live counters of the running target `id`.
    pub fn counters(&self, id: u64) -> Option<TargetCounters> {
        let state = self.state.lock();
        let m = state.members.iter().flatten().find(|m| m.who.id == id)?;
        let mut counters = TargetCounters {
            events: m.who.introspector.events_sent(),
            replies: m.answered,
            log_records: m.log_records,
            pages: m.pages,
        };
        if let Some(a) = &m.attached {
            counters.replies += a.service.channel().answered();
            counters.log_records += a.service.stats().log_records.load(Ordering::Relaxed);
            counters.pages = counters.pages.plus(a.pager.stats());
        }
        Some(counters)
    }

    /// The current appliance VM (none while it is being replaced or after it ended).
    pub fn appliance(&self) -> Option<ApplianceInfo> {
        let state = self.state.lock();
        let app = state.appliance.as_ref()?;
        Some(ApplianceInfo {
            name: self.config.appliance.vm.name.clone(),
            vcpus: self.config.appliance.vm.vcpus,
            memory_bytes: self.config.appliance.vm.memory_bytes,
            restarts: state.restarts,
            handle: app.vm.handle(),
        })
    }

    /// Slots: the most targets guarded at once.
    pub fn slots(&self) -> u32 {
        self.config.slots
    }

    /// The most vCPUs a target may have.
    pub fn max_vcpus(&self) -> u32 {
        self.config.max_vcpus
    }

    /// Stops the running target `id`: its VM ends (as interrupted) and the fleet's next look
    /// ([`Fleet::watch`], every 20 ms in [`Fleet::wait`]) detaches it the normal way (the
    /// agent's final summary, then the slot freed for another target).
    pub fn remove_target(&self, id: u64) -> Result<(), RemoveError> {
        let state = self.state.lock();
        if let Some(m) = state.members.iter().flatten().find(|m| m.who.id == id) {
            let handle = m.vm.handle();
            if handle.has_ended() {
                return Err(RemoveError::Ended(id));
            }
            handle.stop();
            // A vCPU parked by a pause sleeps until a resume wakes it; it then sees the stop.
            handle.resume_all();
            return Ok(());
        }
        if state.ended.iter().any(|t| t.id == id) {
            return Err(RemoveError::Ended(id));
        }
        Err(RemoveError::Unknown(id))
    }

    /// Asks the agent for its final report and to end (the directory's stop word).
    pub fn request_stop(&self) {
        let mut state = self.state.lock();
        state.stopping = true;
        if let Some(app) = state.appliance.as_ref() {
            app.directory.request_stop();
        }
    }

    /// Whether the current appliance VM has ended.
    fn appliance_ended(&self) -> bool {
        self.state
            .lock()
            .appliance
            .as_ref()
            .is_none_or(|a| a.vm.handle().has_ended())
    }

    /// Runs until every target has ended, or `limits` expire (then the agent is asked for
    /// its final report, given 3 s to end, and the targets are stopped).
    pub fn wait(&self, limits: RunLimits) -> FleetReport {
        let start = Instant::now();
        loop {
            if self.check() {
                break;
            }
            let timed_out = limits.timeout.is_some_and(|t| start.elapsed() >= t);
            let interrupted = limits.interrupt.is_some_and(|f| f.load(Ordering::SeqCst));
            if timed_out || interrupted {
                self.stop_all(if interrupted {
                    RunOutcome::Interrupted
                } else {
                    RunOutcome::TimedOut {
                        after: start.elapsed(),
                    }
                });
                break;
            }
            std::thread::sleep(WATCH_PERIOD);
        }
        self.shut_down()
    }

    /// The stop sequence: final report from the agent, then every target stopped.
    fn stop_all(&self, outcome: RunOutcome) {
        self.request_stop();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline && !self.appliance_ended() {
            std::thread::sleep(WATCH_PERIOD);
        }
        let state = self.state.lock();
        for m in state.members.iter().flatten() {
            m.vm.handle().stop_with(outcome.clone());
        }
    }

    /// Retires everything and reports.
    fn shut_down(&self) -> FleetReport {
        self.state.lock().stopping = true;
        // Targets stopped by `stop_all` end within their grace; collect them.
        let deadline = Instant::now() + VM_GRACE;
        while !self.check() && Instant::now() < deadline {
            std::thread::sleep(WATCH_PERIOD);
        }
        let mut state = self.state.lock();
        let st = &mut *state;
        for slot in 0..st.members.len() {
            if let Some(mut m) = st.members[slot].take() {
                Self::detach(
                    st.appliance.as_ref(),
                    slot as u32,
                    &mut m,
                    "the fleet stopped",
                );
                m.vm.handle().stop();
                let run = m.vm.wait(RunLimits {
                    timeout: Some(VM_GRACE),
                    interrupt: None,
                });
                st.ended.push(TargetReport {
                    id: m.who.id,
                    vcpus: m.who.vcpus,
                    memory_bytes: m.who.ram.size(),
                    name: m.who.name,
                    slot: slot as u32,
                    run,
                    pages: m.pages,
                    answered: m.answered,
                    max_others_waited: m.max_others_waited,
                });
            }
        }
        self.retire_appliance(st, "the fleet stopped");
        FleetReport {
            targets: std::mem::take(&mut st.ended),
            appliance: st.last_appliance.take(),
            service: std::mem::replace(&mut st.service, ServiceEnd::Stopped),
            restarts: st.restarts,
        }
    }
}

/// The directory's memory as the shim sees it.
fn shared(ram: Arc<GuestRam>) -> Result<RingMemory, IntrospectError> {
    let (ptr, len) = (ram.host_base(), ram.size() as usize);
    // SAFETY: `ptr..ptr+len` is the region's shared mapping, kept alive by the `Arc<GuestRam>`
    // stored as the region's owner; the shim accesses it only through the region's atomics
    // (the appliance VM accesses it as guest memory, which is allowed).
    let region = unsafe { SharedRegion::new(ram, ptr, len) }.map_err(err)?;
    Ok(Arc::new(region))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_labelled_with_their_target() {
        assert_eq!(
            label_line(b"{\"finding\":\"x\"}\n", 3, "web \"1\""),
            b"{\"target\":3,\"target_name\":\"web \\\"1\\\"\",\"finding\":\"x\"}"
        );
        assert_eq!(
            label_line(b"{}", 1, "a"),
            b"{\"target\":1,\"target_name\":\"a\"}"
        );
        assert_eq!(
            label_line(b"not json", 2, "b"),
            b"{\"target\":2,\"target_name\":\"b\",\"line\":\"not json\"}"
        );
    }

    #[test]
    fn slots_do_not_overlap_and_stay_below_4_gib() {
        for slot in 0..MAX_SLOTS {
            assert_eq!(
                slot_window_gpa(slot) - slot_ring_gpa(slot),
                SLOT_WINDOW_OFFSET
            );
            assert!(slot_window_gpa(slot) + MAX_SLOT_WINDOW <= slot_ring_gpa(slot + 1));
        }
        assert!(slot_ring_gpa(MAX_SLOTS) <= 0xF800_0000);
        assert!(DIRECTORY_GPA + (16 << 20) <= slot_ring_gpa(0));
    }
}
