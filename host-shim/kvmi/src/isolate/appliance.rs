//! `kvmi vmm-appliance`: the appliance VM of `kvmi run --isolate` in a process of its own. It
//! boots the appliance with every slot empty ([`RemoteFleet`]), then guards each target the
//! supervisor announces ([`Message::Attach`]: the appliance's end of the target's vhost-user
//! link and its token page). It prints the findings (stdout) and each freed slot's counters,
//! and ends when its VM ends (the supervisor may start another) or when the supervisor says
//! stop (the agent's final report first).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use appliance_link::fleet::{FleetConfig, MAX_SLOT_WINDOW};
use appliance_link::remote_fleet::{RemoteFleet, RemoteTarget, SlotReport};
use appliance_link::rings::stdout_sink;
use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenPage, TokenVerifier};

use super::control::{Control, KeyBytes, Message};
use crate::app::{RunArgs, TargetPlan};

/// How often the process looks at its control messages and slots.
const WATCH_PERIOD: Duration = Duration::from_millis(10);

fn print_freed(freed: &[SlotReport]) {
    for r in freed {
        vmm::devices::eprint_line(format_args!(
            "kvmi: target {} ({}) left slot {}{}; pages mapped {} in {} calls, unmapped {}, \
             refused calls {}",
            r.id,
            r.name,
            r.slot,
            if r.final_seen {
                ""
            } else {
                " without a final summary"
            },
            r.pages.pages_mapped,
            r.pages.map_calls,
            r.pages.pages_unmapped,
            r.pages.refused,
        ));
    }
}

/// Forwards the control socket's messages to the main loop; a closed socket ends the channel.
fn forward(control: Control) -> Result<Receiver<(Message, Vec<OwnedFd>)>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("kvmi-control".into())
        .spawn(move || {
            while let Ok(message) = control.recv() {
                if tx.send(message).is_err() {
                    break;
                }
            }
        })
        .context("starting the control thread")?;
    Ok(rx)
}

/// Guards target `index` of `plan` over the link in `fds` (link, token page).
fn attach(
    fleet: &mut RemoteFleet,
    plan: &TargetPlan,
    (index, id, key): (u32, u64, KeyBytes),
    fds: Vec<OwnedFd>,
) -> Result<(String, u32)> {
    let Some(entry) = plan.entries.get(index as usize) else {
        bail!("the run has no target {index}");
    };
    let [link, page]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        anyhow::anyhow!("expected 2 descriptors, got {}", fds.len())
    })?;
    let page = TokenPage::from_file(std::fs::File::from(page)).context("the token page")?;
    let verifier = Arc::new(TokenVerifier::new(TargetKey::from_bytes_on_page(
        id,
        DEFAULT_TTL,
        &key.0,
        Arc::new(page),
    )));
    let profile = entry
        .profile
        .clone()
        .unwrap_or_else(|| plan.images[&entry.image].0.clone());
    let slot = fleet.attach(
        UnixStream::from(link),
        RemoteTarget {
            id,
            name: entry.name.clone(),
            profile,
            vcpus: entry.vcpus,
            verifier,
        },
    )?;
    Ok((entry.name.clone(), slot))
}

/// Runs the appliance process of the run `args` until its VM ends or the supervisor says
/// stop. Returns the appliance VM's exit status.
pub(crate) fn run(
    control: Control,
    mut args: RunArgs,
    interrupted: &'static AtomicBool,
) -> Result<u8> {
    let base = crate::app::base(&mut args, true)?;
    let plan = crate::app::plan_targets(&args, &base, true)?;
    let Some(image) = base.appliance_image.clone() else {
        bail!("the run has no appliance VM");
    };
    let serial = crate::args::appliance::stderr_sink().context("duplicating stderr")?;
    let (_, mut config) = args
        .appliance
        .setup(&args.kvmi, image, serial, stdout_sink())
        .context("the appliance")?;
    let booted = u32::try_from(plan.entries.len()).unwrap_or(u32::MAX);
    let slots = args.appliance.slots.unwrap_or(booted).max(booted);
    if slots > hypercall::directory::MAX_SLOTS {
        bail!("--slots must be at least the number of targets and at most 8");
    }
    if slots > 1 && config.window_size > MAX_SLOT_WINDOW {
        config.window_size = MAX_SLOT_WINDOW;
    }
    let max_vcpus = plan.entries.iter().map(|e| e.vcpus).max().unwrap_or(1);
    let mut fleet = RemoteFleet::start(FleetConfig {
        appliance: config,
        slots,
        max_vcpus,
        policy: plan.policy.clone(),
    })?;
    let messages = forward(control)?;
    let stopping = loop {
        match messages.try_recv() {
            Ok((
                Message::Attach {
                    index,
                    id,
                    key,
                    late,
                },
                fds,
            )) => {
                match attach(&mut fleet, &plan, (index, id, key), fds) {
                    Ok((name, _)) if late => vmm::devices::eprint_line(format_args!(
                        "kvmi: target {id} ({name}) joined the appliance"
                    )),
                    Ok((name, slot)) => tracing::info!("target {id} ({name}) in slot {slot}"),
                    Err(e) => vmm::devices::eprint_line(format_args!(
                        "kvmi: target {id} could not join: {e:#}"
                    )),
                }
                continue;
            }
            Ok((Message::Stop, _)) | Err(TryRecvError::Disconnected) => break true,
            Ok(_) | Err(TryRecvError::Empty) => {}
        }
        if interrupted.load(Ordering::SeqCst) {
            break true;
        }
        print_freed(&fleet.watch());
        if fleet.appliance_ended() {
            break false;
        }
        std::thread::sleep(WATCH_PERIOD);
    };
    let (freed, run) = fleet.stop(stopping);
    print_freed(&freed);
    vmm::devices::eprint_line(format_args!("kvmi: appliance {}", run.outcome));
    Ok(if stopping { 0 } else { run.outcome.exit_code() })
}
