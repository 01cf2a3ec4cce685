//! `kvmi vmm-target`: one target VM of `kvmi run --isolate` in a process of its own. It
//! builds only its entry of the run's target list, installs the KVMI engine, serves its end
//! of the vhost-user link to the appliance process ([`TargetSlot`]) and runs the VM until it
//! ends, the run's `--timeout` passes or the supervisor says stop. A new appliance process
//! (`--appliance-restarts`) comes as a [`Message::Relink`] with a fresh link and key.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use appliance_link::remote::TargetSlot;
use appliance_link::rings::DEFAULT_FULL_TIMEOUT;
use kvmi_engine::Introspector;
use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenPage};
use vmm::RunLimits;
use vmm::devices::SerialSink;
use vmm::memory::GuestRam;

use super::control::{Control, KeyBytes, Message};
use crate::app::RunArgs;

/// Which target this process is, as the supervisor assigned it.
#[derive(Debug)]
pub struct Assignment {
    /// Its place in the run's target list.
    pub index: u32,
    /// Its id.
    pub id: u64,
    /// Its token key.
    pub key: KeyBytes,
}

/// The link and the token page, in the order the supervisor sends them.
fn link_and_page(fds: Vec<OwnedFd>) -> Result<(UnixStream, Arc<TokenPage>)> {
    let [link, page]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        anyhow::anyhow!("expected 2 descriptors, got {}", fds.len())
    })?;
    let page = TokenPage::from_file(std::fs::File::from(page)).context("the token page")?;
    Ok((UnixStream::from(link), Arc::new(page)))
}

/// Rekeys `introspector`'s issuer with `key` (the epoch and notices on `page`), then attaches
/// the slot on `link`.
fn attach(
    introspector: &Arc<Introspector>,
    ram: &GuestRam,
    id: u64,
    key: &KeyBytes,
    page: &Arc<TokenPage>,
    link: UnixStream,
) -> Result<TargetSlot> {
    introspector.tokens().rekey(TargetKey::from_bytes_on_page(
        id,
        DEFAULT_TTL,
        &key.0,
        page.clone(),
    ));
    TargetSlot::attach(link, introspector.clone(), ram, DEFAULT_FULL_TIMEOUT)
        .context("the appliance link")
}

/// Runs target `who` of the run `args`; `fds` are its link and token page. Returns the
/// run's exit status for this target.
pub(crate) fn run(
    control: Control,
    mut args: RunArgs,
    who: Assignment,
    fds: Vec<OwnedFd>,
    interrupted: &'static AtomicBool,
) -> Result<u8> {
    let base = crate::app::base(&mut args, true)?;
    let plan = crate::app::plan_targets(&args, &base, false)?;
    let Some(entry) = plan.entries.get(who.index as usize) else {
        bail!("the run has no target {}", who.index);
    };
    let name = entry.name.clone();
    let (intro_config, _) = args
        .appliance
        .setup(
            &args.kvmi,
            Vec::new(),
            SerialSink::Null,
            Box::new(|_: &[u8]| {}),
        )
        .context("the target's introspection")?;
    let serial = base.serial.try_clone().context("the serial sink")?;
    let mut vm = crate::app::build_target(&plan, entry, &base.config, serial)?;
    let caps =
        vmm::probe::cached_capabilities().map_err(|e| anyhow::anyhow!("probing KVM: {e}"))?;
    let introspector = Introspector::install(&mut vm, caps, intro_config)?;
    let ram = vm.ram().clone();
    let (link, page) = link_and_page(fds)?;
    // Attached before the VM starts: its first event finds the rings ready.
    let slot = attach(&introspector, &ram, who.id, &who.key, &page, link)?;
    let slot = Arc::new(Mutex::new(Some(slot)));
    let running = vm.start()?;
    introspector.set_handle(running.handle());

    let (relinked, intro) = (slot.clone(), introspector.clone());
    let id = who.id;
    std::thread::Builder::new()
        .name("kvmi-control".into())
        .spawn(move || {
            loop {
                match control.recv() {
                    Ok((Message::Relink { key }, fds)) => {
                        let old = relinked.lock().ok().and_then(|mut s| s.take());
                        if let Some(old) = old {
                            old.stop(&intro);
                        }
                        let new = fds
                            .into_iter()
                            .next()
                            .context("no link")
                            .and_then(|fd| attach(&intro, &ram, id, &key, &page, fd.into()));
                        match new {
                            Ok(new) => {
                                if let Ok(mut s) = relinked.lock() {
                                    *s = Some(new);
                                }
                                tracing::info!("target {id}: attached to a new appliance");
                            }
                            Err(e) => vmm::devices::eprint_line(format_args!(
                                "kvmi: target {id}: the new appliance could not attach: {e:#}"
                            )),
                        }
                    }
                    Ok((Message::Stop, _)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            interrupted.store(true, Ordering::SeqCst);
        })
        .context("starting the control thread")?;
    // From here on the main thread waits, stops the slot and prints: the service list covers
    // that. (The control thread, which relinks and so maps memory and starts threads, keeps
    // no filter.)
    vmm::seccomp::install_current(vmm::seccomp::ThreadKind::Service)
        .context("the main thread's seccomp filter")?;

    let report = running.wait(RunLimits {
        timeout: base.timeout,
        interrupt: Some(interrupted),
    });
    let last = slot.lock().ok().and_then(|mut s| s.take());
    if let Some(slot) = last {
        slot.stop(&introspector);
    }
    let code = report.outcome.exit_code();
    // The lines the in-process fleet prints when a target ends and at the end of the run.
    vmm::devices::eprint_line(format_args!(
        "kvmi: target {} ({name}) ended: {}",
        who.id, report.outcome
    ));
    vmm::devices::eprint_line(format_args!(
        "kvmi: target {} ({name}): {}; exit status {code}",
        who.id, report.outcome
    ));
    // The run's status is the first target's: its message as `kvmi run` prints it.
    if who.id == 1 && !report.outcome.is_success() {
        vmm::devices::eprint_line(format_args!(
            "kvmi: {} (exit status {code})",
            report.outcome
        ));
    }
    Ok(code)
}
