//! What the API serves: the [`Backend`] trait, implemented for a fleet (one appliance VM
//! guarding targets, [`FleetBackend`]) and for one plain VM ([`SingleBackend`]).

use std::sync::Arc;

use appliance_link::fleet::{Fleet, RemoveError, TargetSpec};
use kvmi_engine::{Introspector, IntrospectorConfig};
use serde::{Deserialize, Serialize};
use vmm::VmHandle;

use super::error::ApiError;

/// A VM's role in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A VM being introspected (or run plainly).
    Target,
    /// The appliance VM that introspects the targets.
    Appliance,
}

/// How a target is attached to an introspection tool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Attachment {
    /// Guarded by the appliance VM through a slot.
    Appliance {
        /// The slot's index.
        slot: u32,
        /// Whether an appliance serves the slot now.
        attached: bool,
    },
    /// A KVMI socket (`--kvmi-socket` / `--kvmi-connect`).
    Socket {
        /// The socket's path.
        path: String,
        /// Whether a tool is attached now.
        attached: bool,
    },
    /// No introspection.
    None,
}

/// One VM as the backend knows it (the server adds the paused state).
#[derive(Clone, Debug)]
pub struct VmEntry {
    /// Its id: targets from 1, the appliance 0.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Target or appliance.
    pub role: Role,
    /// The profile the policy matched (fleet targets).
    pub profile: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Its introspection attachment (targets).
    pub kvmi: Option<Attachment>,
    /// Its control handle while it runs; `None` once it ended.
    pub handle: Option<VmHandle>,
    /// How it ended, once it did.
    pub outcome: Option<String>,
}

/// Page-call counters of a target's map window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageCounters {
    /// Pages mapped.
    pub mapped: u64,
    /// Successful map calls.
    pub map_calls: u64,
    /// Pages unmapped.
    pub unmapped: u64,
    /// Refused page calls.
    pub refused: u64,
}

/// The event counters of one running target; `None` where its tool does not count that.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetStats {
    /// The target's id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Introspection events its vCPUs sent to the tool or appliance.
    pub events: Option<u64>,
    /// Event replies the appliance sent back.
    pub replies: Option<u64>,
    /// Log records (findings) the appliance wrote about it.
    pub log_records: Option<u64>,
    /// Page calls on its map window.
    pub pages: Option<PageCounters>,
}

/// A target to add (`PUT /vm/targets`): the fields of a `--config` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AddTarget {
    /// Its name (1..=32 bytes, unique among running targets).
    pub name: String,
    /// An embedded image's name or an absolute ELF path.
    pub image: String,
    /// vCPUs (default 1).
    #[serde(default = "one")]
    pub vcpus: u32,
    /// RAM in MiB (default 64).
    #[serde(default = "sixty_four")]
    pub memory_mib: u64,
    /// The guest's command line (default empty).
    #[serde(default)]
    pub cmdline: String,
    /// The profile the policy matches (default: the image's name).
    #[serde(default)]
    pub profile: Option<String>,
}

fn one() -> u32 {
    1
}

fn sixty_four() -> u64 {
    64
}

impl AddTarget {
    /// Checks the values' ranges (as `--config` does).
    pub fn check(&self) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        let max_name = crate::args::fleet_config::NAME_MAX;
        if self.name.is_empty()
            || self.name.len() > max_name
            || self.name.chars().any(char::is_control)
        {
            return bad(format!(
                "name {:?}: 1..={max_name} bytes, no control characters",
                self.name
            ));
        }
        if !(1..=vmm::vm::MAX_VCPUS).contains(&self.vcpus) {
            return bad(format!("vcpus {}: 1..={}", self.vcpus, vmm::vm::MAX_VCPUS));
        }
        if !(2..=4096).contains(&self.memory_mib) {
            return bad(format!("memory_mib {}: 2..=4096", self.memory_mib));
        }
        if self.cmdline.len() >= hypercall::boot::CMDLINE_MAX {
            return bad(format!(
                "cmdline: longer than {} bytes",
                hypercall::boot::CMDLINE_MAX - 1
            ));
        }
        if self.image.is_empty() || self.image.contains('\0') {
            return bad("image: an embedded image's name or an absolute ELF path".into());
        }
        if self.image.contains('/') && !std::path::Path::new(&self.image).is_absolute() {
            return bad(format!(
                "image {:?}: a file must be given as an absolute path",
                self.image
            ));
        }
        Ok(())
    }
}

/// The VMs of one `kvmi run`, as the API sees them.
pub trait Backend: Send + Sync {
    /// Every VM: running and ended targets, then the appliance (if any).
    fn vms(&self) -> Vec<VmEntry>;
    /// The control handle of the running target `id` (404 unknown, 409 ended).
    fn target(&self, id: u64) -> Result<VmHandle, ApiError>;
    /// The ids of the running targets.
    fn running_targets(&self) -> Vec<u64>;
    /// The counters of every running target.
    fn stats(&self) -> Vec<TargetStats>;
    /// Builds and starts a target; returns its id.
    fn add_target(&self, target: &AddTarget) -> Result<u64, ApiError>;
    /// Stops the running target `id`; its slot is freed once it has ended.
    fn remove_target(&self, id: u64) -> Result<(), ApiError>;
}

/// Builds a new target's VM (name, profile, VM) from a request: `kvmi run` gives the image
/// loading, the serial sink and the VM settings of its flags.
pub type TargetFactory =
    Box<dyn Fn(&AddTarget) -> Result<crate::args::appliance::FleetTarget, ApiError> + Send + Sync>;

/// A fleet: one appliance VM guarding targets in slots.
pub struct FleetBackend {
    fleet: Arc<Fleet>,
    factory: TargetFactory,
    introspection: IntrospectorConfig,
}

impl FleetBackend {
    /// Serves `fleet`; added targets are built by `factory` and introspected with
    /// `introspection`.
    pub fn new(
        fleet: Arc<Fleet>,
        factory: TargetFactory,
        introspection: IntrospectorConfig,
    ) -> FleetBackend {
        FleetBackend {
            fleet,
            factory,
            introspection,
        }
    }
}

impl Backend for FleetBackend {
    fn vms(&self) -> Vec<VmEntry> {
        let ended = self.fleet.ended_targets();
        let mut out: Vec<VmEntry> = self
            .fleet
            .targets()
            .into_iter()
            .map(|t| VmEntry {
                id: t.id,
                name: t.name,
                role: Role::Target,
                profile: Some(t.profile),
                vcpus: t.vcpus,
                memory_bytes: t.memory_bytes,
                kvmi: Some(Attachment::Appliance {
                    slot: t.slot,
                    attached: t.attached,
                }),
                handle: Some(t.handle),
                outcome: None,
            })
            .collect();
        out.extend(ended.into_iter().map(|t| VmEntry {
            id: t.id,
            name: t.name,
            role: Role::Target,
            profile: None,
            vcpus: t.vcpus,
            memory_bytes: t.memory_bytes,
            kvmi: Some(Attachment::None),
            handle: None,
            outcome: Some(t.run.outcome.to_string()),
        }));
        out.sort_by_key(|v| v.id);
        if let Some(app) = self.fleet.appliance() {
            out.push(VmEntry {
                id: 0,
                name: app.name,
                role: Role::Appliance,
                profile: None,
                vcpus: app.vcpus,
                memory_bytes: app.memory_bytes,
                kvmi: None,
                handle: Some(app.handle),
                outcome: None,
            });
        }
        out
    }

    fn target(&self, id: u64) -> Result<VmHandle, ApiError> {
        if let Some(t) = self.fleet.target(id) {
            return Ok(t.handle);
        }
        if self.fleet.ended().iter().any(|(e, _)| *e == id) {
            return Err(ApiError::Conflict(format!("target {id} has ended")));
        }
        Err(not_a_target(id))
    }

    fn running_targets(&self) -> Vec<u64> {
        self.fleet.targets().iter().map(|t| t.id).collect()
    }

    fn stats(&self) -> Vec<TargetStats> {
        self.fleet
            .targets()
            .into_iter()
            .filter_map(|t| {
                let c = self.fleet.counters(t.id)?;
                Some(TargetStats {
                    id: t.id,
                    name: t.name,
                    events: Some(c.events),
                    replies: Some(c.replies),
                    log_records: Some(c.log_records),
                    pages: Some(PageCounters {
                        mapped: c.pages.pages_mapped,
                        map_calls: c.pages.map_calls,
                        unmapped: c.pages.pages_unmapped,
                        refused: c.pages.refused,
                    }),
                })
            })
            .collect()
    }

    fn add_target(&self, target: &AddTarget) -> Result<u64, ApiError> {
        target.check()?;
        let max = self.fleet.max_vcpus();
        if target.vcpus > max {
            return Err(ApiError::BadRequest(format!(
                "vcpus {}: this fleet's slots take targets of at most {max} vCPUs",
                target.vcpus
            )));
        }
        let running = self.fleet.targets();
        if running.iter().any(|t| t.name == target.name) {
            return Err(ApiError::Conflict(format!(
                "a running target is named {:?} already",
                target.name
            )));
        }
        if running.len() >= self.fleet.slots() as usize {
            return Err(ApiError::Conflict(format!(
                "no free slot: all {} slots are in use",
                self.fleet.slots()
            )));
        }
        let built = (self.factory)(target)?;
        let spec = TargetSpec {
            name: built.name,
            profile: built.profile,
            vm: built.vm,
            introspection: self.introspection.clone(),
        };
        let id = self
            .fleet
            .add_target(spec)
            .map_err(|e| ApiError::Conflict(format!("the target could not join: {e}")))?;
        tracing::info!("api: target {id} ({}) added", target.name);
        Ok(id)
    }

    fn remove_target(&self, id: u64) -> Result<(), ApiError> {
        self.fleet.remove_target(id).map_err(|e| match e {
            RemoveError::Unknown(_) => not_a_target(id),
            RemoveError::Ended(_) => ApiError::Conflict(e.to_string()),
        })?;
        tracing::info!("api: target {id} removed");
        Ok(())
    }
}

fn not_a_target(id: u64) -> ApiError {
    if id == 0 {
        ApiError::NotFound("0 is the appliance VM, not a target".into())
    } else {
        ApiError::NotFound(format!("no target {id}"))
    }
}

/// One VM without an appliance: plain, or with a KVMI socket.
pub struct SingleBackend {
    name: String,
    vcpus: u32,
    memory_bytes: u64,
    handle: VmHandle,
    introspector: Option<(Arc<Introspector>, String)>,
}

impl SingleBackend {
    /// Serves the VM `name` (`vcpus`, `memory_bytes`) behind `handle`; `introspector` is its
    /// introspector and KVMI socket path, if it has one.
    pub fn new(
        name: String,
        vcpus: u32,
        memory_bytes: u64,
        handle: VmHandle,
        introspector: Option<(Arc<Introspector>, String)>,
    ) -> SingleBackend {
        SingleBackend {
            name,
            vcpus,
            memory_bytes,
            handle,
            introspector,
        }
    }
}

/// The id of the one VM of a [`SingleBackend`].
const SINGLE_ID: u64 = 1;

impl Backend for SingleBackend {
    fn vms(&self) -> Vec<VmEntry> {
        let ended = self.handle.has_ended();
        vec![VmEntry {
            id: SINGLE_ID,
            name: self.name.clone(),
            role: Role::Target,
            profile: None,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            kvmi: Some(match &self.introspector {
                Some((intro, path)) => Attachment::Socket {
                    path: path.clone(),
                    attached: intro.is_attached(),
                },
                None => Attachment::None,
            }),
            handle: (!ended).then(|| self.handle.clone()),
            outcome: ended.then(|| "ended".to_string()),
        }]
    }

    fn target(&self, id: u64) -> Result<VmHandle, ApiError> {
        if id != SINGLE_ID {
            return Err(ApiError::NotFound(format!(
                "no target {id} (this run has one VM, id {SINGLE_ID})"
            )));
        }
        if self.handle.has_ended() {
            return Err(ApiError::Conflict(format!("target {id} has ended")));
        }
        Ok(self.handle.clone())
    }

    fn running_targets(&self) -> Vec<u64> {
        if self.handle.has_ended() {
            Vec::new()
        } else {
            vec![SINGLE_ID]
        }
    }

    fn stats(&self) -> Vec<TargetStats> {
        if self.handle.has_ended() {
            return Vec::new();
        }
        vec![TargetStats {
            id: SINGLE_ID,
            name: self.name.clone(),
            events: self.introspector.as_ref().map(|(i, _)| i.events_sent()),
            replies: None,
            log_records: None,
            pages: None,
        }]
    }

    fn add_target(&self, target: &AddTarget) -> Result<u64, ApiError> {
        target.check()?;
        Err(no_fleet())
    }

    fn remove_target(&self, id: u64) -> Result<(), ApiError> {
        self.target(id)?;
        Err(no_fleet())
    }
}

fn no_fleet() -> ApiError {
    ApiError::Conflict(
        "this run has no appliance VM: targets are added and removed only in a fleet \
         (`kvmi run` with an appliance)"
            .into(),
    )
}
