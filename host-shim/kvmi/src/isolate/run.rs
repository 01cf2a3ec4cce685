//! The three programs of `kvmi run --isolate`: the supervisor ([`supervise`]), a target VM
//! process and the appliance VM process.

use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};

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
        .filter(|w| *w != "--isolate")
        .cloned()
        .collect();
    Ok((words, u8::try_from(verbose).unwrap_or(u8::MAX)))
}

/// `kvmi run --isolate`: the supervisor. Spawns the VM processes, forwards Ctrl-C as a stop,
/// waits for them, reports how each ended; the exit status is the run's, as without
/// `--isolate`.
pub fn supervise(interrupted: &AtomicBool) -> Result<u8> {
    let (words, verbose) = run_words()?;
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

fn status_of(end: Ended) -> u8 {
    match end {
        Ended::Exited(code) => code,
        Ended::Signal(_) => vmm::outcome::EXIT_VMM_ERROR,
    }
}
