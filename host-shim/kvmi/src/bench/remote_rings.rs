//! The rings path of the event bench with the target in a process of its own: a real
//! `kvmi vmm-target` process (the program `kvmi run --isolate` runs per target) serves its
//! end of the vhost-user link, and an agent thread of this process answers its events on the
//! appliance's end ([`ApplianceSlot`]): the same shared-memory rings as the in-process
//! **rings** path, now across two processes.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_link::fleet::{slot_ring_gpa, slot_window_gpa};
use appliance_link::hook::SERVED_FEATURES;
use appliance_link::remote::{ApplianceSlot, SlotSetup};
use hypercall::ring::{LayoutParams, Region, RingSizes, SharedRegion};
use kvmi_engine::tokens::{DEFAULT_TTL, TargetKey, TokenPage, TokenVerifier};
use vmm::memory::GuestRam;

use super::events::{EventBenchError, RingAgent, fail};
use crate::isolate::control::{KeyBytes, Role};
use crate::isolate::supervisor::{Ended, VmProcess};

/// How long the target process gets to end after its last event.
const END_GRACE: Duration = Duration::from_secs(30);

/// Runs test-guest `mode=mem-write n=N gate=1` in a `vmm-target` process of the `kvmi`
/// binary `exe` and answers its `n` write events from this process; returns when each
/// arrived. Its first event, CREATE_VCPU (the target waits for its agent, as in `kvmi run`),
/// is answered and not counted.
pub(super) fn rings_across_processes(
    exe: &Path,
    n: u64,
    page: u64,
    gate: u64,
) -> Result<Vec<Instant>, EventBenchError> {
    let io = |what: &'static str| move |e: std::io::Error| fail(what)(e.to_string());
    let key = TargetKey::random_bytes().map_err(|e| fail("key")(e.to_string()))?;
    let tokens = TokenPage::create("kvmi-tokens-event-bench").map_err(io("token page"))?;
    let (appliance_end, target_end) = UnixStream::pair().map_err(io("socket pair"))?;
    let words: Vec<String> = [
        "--image",
        "test-guest",
        "--cmdline",
        &format!("mode=mem-write n={n} gate=1"),
        "--appliance",
        "--serial",
        "/dev/null",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    let mut process = VmProcess::spawn_from(
        exe,
        "the bench target process".into(),
        Role::Target {
            index: 0,
            id: 1,
            key: KeyBytes(key),
        },
        0,
        &words,
        &[target_end.as_raw_fd(), tokens.file().as_raw_fd()],
    )
    .map_err(|e| fail("spawning the target process")(e.to_string()))?;
    drop(target_end);
    let result = serve(appliance_end, key, tokens, n, page, gate);
    if result.is_err() {
        process.kill();
    }
    let deadline = Instant::now() + END_GRACE;
    let end = loop {
        if let Some(end) = process.poll() {
            break Some(end);
        }
        if Instant::now() > deadline {
            process.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The slot closes after the target ended (a slot closed first would detach it).
    let (times, slot) = result?;
    slot.close();
    match end {
        Some(Ended::Exited(0)) => Ok(times),
        other => Err(EventBenchError(format!(
            "the target process ended so: {other:?}"
        ))),
    }
}

/// The appliance's end: the slot over `link`, CREATE_VCPU answered, the agent's set-up, then
/// `n` events; returns when each arrived, and the slot (still open).
fn serve(
    link: UnixStream,
    key: [u8; 32],
    tokens: TokenPage,
    n: u64,
    page: u64,
    gate: u64,
) -> Result<(Vec<Instant>, ApplianceSlot), EventBenchError> {
    let params = LayoutParams {
        vcpu_count: 1,
        sizes: RingSizes::default(),
        features: SERVED_FEATURES,
        map_window_gpa: slot_window_gpa(0),
        map_window_size: 1 << 20,
    };
    let size = params.region_size().next_multiple_of(4096);
    let ring = Arc::new(
        GuestRam::new("kvmi-ring-event-bench", size).map_err(|e| fail("ring")(e.to_string()))?,
    );
    let verifier = Arc::new(TokenVerifier::new(TargetKey::from_bytes_on_page(
        1,
        DEFAULT_TTL,
        &key,
        Arc::new(tokens),
    )));
    let window = Arc::new(
        vmm::window::RemapWindow::new(1 << 20).map_err(|e| fail("window")(e.to_string()))?,
    );
    let slot = ApplianceSlot::connect(
        link,
        SlotSetup {
            ring: ring.clone(),
            ring_gpa: slot_ring_gpa(0),
            params,
            verifier,
            window,
            window_gpa: slot_window_gpa(0),
            target: (1, "event-bench".into()),
            sink: Box::new(|_: &[u8]| {}),
        },
    )
    .map_err(|e| fail("the link")(e.to_string()))?;
    // SAFETY: `ring.host_base()..+size` is the ring memfd's shared mapping, kept alive by the
    // `Arc<GuestRam>` the region owns; it is accessed only through the region's atomics (the
    // target process maps the same memfd and does the same).
    let memory = unsafe { SharedRegion::new(ring.clone(), ring.host_base(), size as usize) }
        .map_err(|e| fail("ring region")(e.to_string()))?;
    let app = Region::open(Arc::new(memory)).map_err(|e| fail("ring region")(e.to_string()))?;
    let mut agent = RingAgent::open(&app, slot.waker())?;
    // CREATE_VCPU first: the guest then waits at its gate until the set-up opens it.
    agent.answer_events(1)?;
    agent.set_up(page, gate)?;
    let times = agent.answer_events(n)?;
    Ok((times, slot))
}
