//! The three programs of `kvmi run --isolate`: the supervisor ([`supervise`]), a target VM
//! process and the appliance VM process.

use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};

use super::control::Role;
use super::supervisor::{Ended, VmProcess, wait_all};

/// The words of this process's command line after `run`, without `--isolate`, and the `-v`
/// count before it.
fn run_words() -> Result<(Vec<String>, u8)> {
    let all: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|w| {
            w.into_string()
                .map_err(|w| anyhow::anyhow!("argument {w:?} is not UTF-8"))
        })
        .collect::<Result<_>>()?;
    // `kvmi` alone is `kvmi run` (the main job).
    let at = all.iter().position(|w| w == "run").unwrap_or(all.len());
    if at == all.len() && all.iter().any(|w| !w.starts_with('-')) {
        bail!("--isolate is a flag of `kvmi run`");
    }
    let verbose = all[..at]
        .iter()
        .map(|w| match w.as_str() {
            "--verbose" => 1,
            w if w.starts_with('-') && !w.starts_with("--") => {
                w.chars().filter(|&c| c == 'v').count()
            }
            _ => 0,
        })
        .sum::<usize>();
    let words = all[(at + 1).min(all.len())..]
        .iter()
        .filter(|w| *w != "--isolate" && *w != "--no-isolate")
        .cloned()
        .collect();
    Ok((words, u8::try_from(verbose).unwrap_or(u8::MAX)))
}

/// `kvmi run --isolate`: the supervisor. Checks the run as `kvmi run` would (images, policy,
/// options: errors come before any VM starts), then runs it split, one process per VM, when
/// it has an appliance VM and no management API; otherwise (one VM, or `--api-socket`) all
/// of it in one VM process. Forwards Ctrl-C as a stop, reports how each process ended; the
/// exit status is the run's, as without `--isolate`.
pub fn supervise(interrupted: &AtomicBool) -> Result<u8> {
    let (words, verbose) = run_words()?;
    let mut args = crate::app::parse_run_words(&words)?;
    // Truncates a --serial file once: the VM processes append to it.
    let base = crate::app::base(&mut args, false)?;
    if base.appliance_image.is_some() && args.api_socket.is_none() {
        let plan = crate::app::plan_targets(&args, &base, true)?;
        args.appliance
            .setup(
                &args.kvmi,
                Vec::new(),
                vmm::devices::SerialSink::Null,
                Box::new(|_: &[u8]| {}),
            )
            .context("the appliance")?;
        let targets = plan
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u32, e.name.clone(), e.start_after_ms))
            .collect();
        return super::split::Split::new(
            words,
            verbose,
            targets,
            args.appliance.appliance_restarts,
        )
        .run(interrupted);
    }
    drop(base);
    let mut processes = vec![VmProcess::spawn(
        "the VM process".into(),
        Role::Fleet,
        verbose,
        &words,
        &[],
    )?];
    let ends = wait_all(&mut processes, interrupted, |_, _, _| {});
    Ok(ends
        .first()
        .map_or(vmm::outcome::EXIT_VMM_ERROR, |e| status_of(*e)))
}

/// The run's exit status for a VM process that ended so.
pub(crate) fn status_of(end: Ended) -> u8 {
    match end {
        Ended::Exited(code) => code,
        Ended::Signal(_) => vmm::outcome::EXIT_VMM_ERROR,
    }
}
