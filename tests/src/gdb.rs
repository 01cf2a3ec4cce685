//! Driving the real GDB against `kvmi gdb` (the GDB remote-protocol stub over a KVMI socket).
//!
//! A test starts a VM with [`Target`], writes the image's ELF with `kvmi image NAME --output
//! FILE` ([`image_elf`]), then runs one batch session ([`session`]):
//!
//! ```text
//! gdb -batch -nx
//!     -ex 'set pagination off'
//!     -ex 'set remotetimeout 20'
//!     -ex 'file DIR/demo-target.elf'
//!     -ex 'target remote | KVMI gdb --socket SOCK'
//!     -ex 'printf "SESSION_PC=%#lx\n", (unsigned long)$pc'   (fails unless attached)
//!     -ex COMMAND ...            (one -ex per command of the test)
//! ```
//!
//! Each command is its own `-ex`, so a command that fails (as the error-path tests want) does
//! not stop the ones after it, as it would in a sourced command file. stdout and stderr go to
//! one file, so the transcript keeps GDB's order. A session that runs longer than
//! [`GDB_TIMEOUT`] is killed (GDB and the stub it piped to) and the test fails with the
//! transcript; so does a stub that still runs [`STUB_EXIT`] after GDB exited.
//!
//! The tests print what they need with `printf "KEY=%#lx\n", ...` markers and read them back
//! with [`GdbOutput::values`]; other helpers parse what GDB prints itself (breakpoint hits,
//! `x/i` listings, `info registers` lines).

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvmi::images::Image;

use crate::socket_target::Target;
use crate::wait;

/// How long one GDB session may run before it is killed and the test fails.
pub const GDB_TIMEOUT: Duration = Duration::from_secs(60);

/// The GDB program the tests run.
pub const GDB: &str = "gdb";

/// Whether GDB can run here. Without it, prints `SKIPPED: <test>: ...` to the terminal and
/// returns false, or panics when `KVMI_REQUIRE_KVM=1` (CI installs GDB; a green CI run must
/// mean these tests ran).
pub fn require_gdb(test: &str) -> bool {
    let found = Command::new(GDB)
        .args(["-batch", "-nx", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    let why = "`gdb` is not on PATH (install GDB, e.g. `apt-get install gdb`)";
    if std::env::var(crate::REQUIRE_KVM).is_ok_and(|v| v == "1") {
        panic!(
            "{test}: {why}, and {}=1 requires the GDB tests to run",
            crate::REQUIRE_KVM
        );
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    false
}

/// Writes `image`'s ELF to `dir/<name>.elf` with `kvmi image NAME --output FILE` and checks
/// that the file holds exactly the embedded ELF. Returns its path.
pub fn image_elf(image: Image, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}.elf", image.name()));
    let out = Command::new(crate::kvmi_bin())
        .args(["image", image.name(), "--output"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run kvmi image");
    assert!(
        out.status.success(),
        "kvmi image {} --output {} failed ({}): {}{}",
        image.name(),
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("kvmi image wrote no {}: {e}", path.display()));
    assert!(
        written == crate::common::elf(image),
        "{} ({} bytes) is not the embedded {} ELF ({} bytes)",
        path.display(),
        written.len(),
        image.name(),
        crate::common::elf(image).len()
    );
    path
}

/// What one GDB session printed.
pub struct GdbOutput {
    /// stdout and stderr, interleaved in GDB's order.
    pub text: String,
    /// GDB's exit status (None: killed by a signal).
    pub status: Option<i32>,
    /// The command line, for failure messages.
    pub command: String,
    /// The remote-protocol packets of the session (`set remotelogfile`, written by
    /// [`session`]; empty for [`run`] without it).
    pub remote_log: String,
}

impl std::fmt::Display for GdbOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\n--- {} (exit {:?}) ---\n{}\n--- end of gdb output ---",
            self.command, self.status, self.text
        )
    }
}

/// Runs GDB on `elf`, attached to `target` through `kvmi gdb --socket`, with `commands` after
/// the prelude (see the module documentation). Panics with the transcript if GDB runs longer
/// than [`GDB_TIMEOUT`] or the stub outlives it by [`STUB_EXIT`].
pub fn session(target: &Target, elf: &Path, commands: &[String]) -> GdbOutput {
    let remote = format!(
        "target remote | {} gdb --socket {}",
        crate::kvmi_bin().display(),
        target.socket.display()
    );
    session_with(target, elf, remote, commands)
}

/// [`session`] in the libkvmi dialect: `target` was started with
/// [`Target::start_connecting`] and `--kvmi-dialect libkvmi`, and GDB attaches with
/// `target remote | kvmi gdb --libkvmi-listen SOCK`; the stub listens on `target.socket` and
/// the VM connects to it.
pub fn libkvmi_session(target: &Target, elf: &Path, commands: &[String]) -> GdbOutput {
    let remote = format!(
        "target remote | {} gdb --libkvmi-listen {} --connect-timeout 20",
        crate::kvmi_bin().display(),
        target.socket.display()
    );
    session_with(target, elf, remote, commands)
}

fn session_with(target: &Target, elf: &Path, remote: String, commands: &[String]) -> GdbOutput {
    let n = SESSIONS.load(std::sync::atomic::Ordering::Relaxed);
    let remote_log = target.dir().join(format!("remote-{n}.log"));
    let mut all = vec![
        "set pagination off".to_string(),
        "set remotetimeout 20".to_string(),
        // The packets go to a file of their own, never interleaved with GDB's output.
        format!("set remotelogfile {}", remote_log.display()),
        format!("file {}", elf.display()),
        remote,
        ATTACHED.to_string(),
    ];
    all.extend(commands.iter().cloned());
    let mut out = run(target.dir(), &all, GDB_TIMEOUT);
    out.remote_log = std::fs::read_to_string(&remote_log).unwrap_or_default();
    assert!(
        out.values("SESSION_PC").len() == 1,
        "GDB did not attach through `kvmi gdb` (no registers after `target remote`); VM \
         stderr: {}{out}",
        target.stderr()
    );
    out
}

/// The prelude's last command: prints the pc right after `target remote` (`SESSION_PC=`),
/// which fails ("No registers.") unless GDB attached.
const ATTACHED: &str = r#"printf "SESSION_PC=%#lx\n", (unsigned long)$pc"#;

static SESSIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs `gdb -batch -nx -ex C1 -ex C2 ...` with its transcript in `dir`; kills it (and the
/// processes it started) and panics with the transcript after `timeout`.
pub fn run(dir: &Path, commands: &[String], timeout: Duration) -> GdbOutput {
    let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log_path = dir.join(format!("gdb-{n}.txt"));
    let log = File::create(&log_path).expect("gdb transcript file");
    let mut cmd = Command::new(GDB);
    cmd.args(["-batch", "-nx"]);
    for c in commands {
        cmd.arg("-ex").arg(c);
    }
    let command = std::iter::once(format!("{GDB} -batch -nx"))
        .chain(commands.iter().map(|c| format!("  -ex '{c}'")))
        .collect::<Vec<_>>()
        .join("\n");
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup transcript"))
        .stderr(log);
    let mut child = cmd.spawn().expect("start gdb");
    let gdb_pid = child.id();
    let start = Instant::now();
    let mut status = None;
    // GDB starts `target remote | ...` in a session of its own (setsid), so the stub is found
    // among GDB's descendants while GDB runs, and killed by its pid if it outlives GDB.
    let mut stubs: Vec<u32> = Vec::new();
    let exited = wait::within(timeout, || {
        for pid in stub_processes(gdb_pid) {
            if !stubs.contains(&pid) {
                stubs.push(pid);
            }
        }
        match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s.code());
                true
            }
            _ => false,
        }
    });
    let text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        kill_all(&stubs);
        panic!(
            "gdb did not finish within {:?} (killed after {:?})\n--- {command} ---\n{}\n--- end ---",
            timeout,
            start.elapsed(),
            text()
        );
    }
    let output = GdbOutput {
        text: text(),
        status: status.flatten(),
        command,
        remote_log: String::new(),
    };
    if !wait::within(STUB_EXIT, || stubs.iter().all(|&pid| !alive(pid))) {
        kill_all(&stubs);
        panic!("the stub (pids {stubs:?}) still ran {STUB_EXIT:?} after gdb exited{output}");
    }
    output
}

/// How long the stub may outlive GDB (it must end when its stdin closes).
pub const STUB_EXIT: Duration = Duration::from_secs(10);

/// The descendants of `root` whose command line holds `--socket` or `--libkvmi-listen`: the
/// stub (`kvmi gdb --socket ...`) and the shell GDB runs it with (from `/proc`).
fn stub_processes(root: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // (pid, parent pid) of every process.
    let table: Vec<(u32, u32)> = dir
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            Some((pid, ppid.parse().ok()?))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, _) in table.iter().filter(|&&(_, ppid)| ppid == parent) {
            frontier.push(pid);
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.windows(8).any(|w| w == b"--socket")
                || cmdline.windows(16).any(|w| w == b"--libkvmi-listen")
            {
                found.push(pid);
            }
        }
    }
    found
}

/// Whether `pid` still runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// SIGKILL to each of `pids` (processes this harness saw GDB start) that still runs.
fn kill_all(pids: &[u32]) {
    for &pid in pids {
        if alive(pid)
            && let Ok(pid) = i32::try_from(pid)
        {
            // SAFETY: kill(2) of one process by its id; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Parses `0x`-prefixed hex or decimal.
pub fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The leading number of `s` (`0x` hex or decimal), ignoring what follows it.
fn leading_num(s: &str) -> Option<u64> {
    let s = s.trim_start();
    if let Some(hex) = s.strip_prefix("0x") {
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        return u64::from_str_radix(&hex[..end], 16).ok();
    }
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

impl GdbOutput {
    /// Every value printed as `KEY=VALUE` (a `printf` marker), in order.
    pub fn values(&self, key: &str) -> Vec<u64> {
        let pat = format!("{key}=");
        let mut found = Vec::new();
        for line in self.text.lines() {
            let mut rest = line;
            while let Some(at) = rest.find(&pat) {
                let before_ok = at == 0 || {
                    let b = rest.as_bytes()[at - 1];
                    !(b.is_ascii_alphanumeric() || b == b'_')
                };
                let after = &rest[at + pat.len()..];
                if before_ok && let Some(v) = leading_num(after) {
                    found.push(v);
                }
                rest = after;
            }
        }
        found
    }

    /// The pc GDB read right after attaching (the prelude's `SESSION_PC=` marker).
    pub fn attach_pc(&self) -> u64 {
        self.value("SESSION_PC")
    }

    /// The single value printed as `KEY=VALUE`; panics with the transcript if there is not
    /// exactly one.
    #[track_caller]
    pub fn value(&self, key: &str) -> u64 {
        let v = self.values(key);
        assert_eq!(v.len(), 1, "expected one {key}=VALUE marker{self}");
        v[0]
    }

    /// The string of the first `x/s` line (`0xADDR:\t"text"`), if any.
    pub fn first_string(&self) -> Option<String> {
        self.text.lines().find_map(|l| {
            let (addr, s) = l.split_once(":\t\"")?;
            addr.starts_with("0x")
                .then(|| s.trim_end_matches('"').to_string())
        })
    }

    /// Breakpoint stops as `(breakpoint number, address)`, from GDB's
    /// `Breakpoint N, 0xADDR in ...` (also `Thread T hit Breakpoint N, ...`).
    pub fn breakpoint_hits(&self) -> Vec<(u32, u64)> {
        let mut hits = Vec::new();
        for line in self.text.lines() {
            let Some(at) = line.find("Breakpoint ") else {
                continue;
            };
            let rest = &line[at + "Breakpoint ".len()..];
            let Some((num, addr)) = rest.split_once(", ") else {
                continue;
            };
            if !addr.starts_with("0x") {
                continue;
            }
            if let (Ok(num), Some(addr)) = (num.parse(), leading_num(addr)) {
                hits.push((num, addr));
            }
        }
        hits
    }

    /// The instruction addresses of an `x/Ni` listing (`=> 0xADDR <sym>:\tinsn` or
    /// `   0xADDR <sym>:\tinsn`), with the instruction text.
    pub fn instructions(&self) -> Vec<(u64, String)> {
        self.text
            .lines()
            .filter_map(|line| {
                let t = line
                    .strip_prefix("=> ")
                    .or_else(|| line.strip_prefix("   "))?;
                if !t.starts_with("0x") {
                    return None;
                }
                let (head, insn) = t.split_once(":\t")?;
                Some((leading_num(head)?, insn.trim().to_string()))
            })
            .collect()
    }

    /// The values of register `name` in `info registers` output (`name   0xVALUE   ...`), in
    /// order.
    pub fn register_lines(&self, name: &str) -> Vec<u64> {
        self.text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                if words.next()? != name {
                    return None;
                }
                let v = words.next()?;
                v.starts_with("0x").then(|| parse_num(v)).flatten()
            })
            .collect()
    }

    /// The (old, new) pairs of watchpoint reports (`Old value = X` / `New value = Y`).
    pub fn watch_changes(&self) -> Vec<(u64, u64)> {
        let mut pairs = Vec::new();
        let mut old = None;
        for line in self.text.lines() {
            if let Some(v) = line.strip_prefix("Old value = ") {
                old = leading_num(v);
            } else if let Some(v) = line.strip_prefix("New value = ")
                && let (Some(o), Some(n)) = (old.take(), leading_num(v))
            {
                pairs.push((o, n));
            }
        }
        pairs
    }
}

/// The function symbols of an ELF64 little-endian image: `(name, address)` from its `.symtab`
/// (what GDB itself reads from the same file).
pub fn elf_function_symbols(elf: &[u8]) -> Vec<(String, u64)> {
    fn get<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
        b.get(at..at + N)
            .and_then(|s| s.try_into().ok())
            .expect("ELF offset inside the file")
    }
    let u16_at = |at| u16::from_le_bytes(get(elf, at)) as usize;
    let u32_at = |at| u32::from_le_bytes(get(elf, at)) as usize;
    let u64_at = |at| u64::from_le_bytes(get(elf, at));
    assert_eq!(&elf[..5], b"\x7fELF\x02", "an ELF64 image");
    let shoff = u64_at(0x28) as usize;
    let shentsize = u16_at(0x3a);
    let shnum = u16_at(0x3c);
    const SHT_SYMTAB: usize = 2;
    const STT_FUNC: u8 = 2;
    const STT_NOTYPE: u8 = 0;
    let mut symbols = Vec::new();
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        if u32_at(sh + 4) != SHT_SYMTAB {
            continue;
        }
        let (off, size, entsize) = (
            u64_at(sh + 0x18) as usize,
            u64_at(sh + 0x20) as usize,
            u64_at(sh + 0x38) as usize,
        );
        let strtab = shoff + u32_at(sh + 0x28) * shentsize;
        let str_off = u64_at(strtab + 0x18) as usize;
        for sym in (off..off + size).step_by(entsize.max(1)) {
            let info = elf[sym + 4];
            let shndx = u16_at(sym + 6);
            if shndx == 0 || !matches!(info & 0xf, STT_FUNC | STT_NOTYPE) {
                continue;
            }
            let name_at = str_off + u32_at(sym);
            let end = elf[name_at..]
                .iter()
                .position(|&b| b == 0)
                .expect("NUL-terminated symbol name");
            let name = String::from_utf8_lossy(&elf[name_at..name_at + end]).into_owned();
            symbols.push((name, u64_at(sym + 8)));
        }
    }
    symbols
}

/// The address of the one function symbol of `elf` that `matches`; panics (listing near
/// misses' count) unless exactly one address matches.
#[track_caller]
pub fn function_address(elf: &[u8], what: &str, matches: impl Fn(&str) -> bool) -> u64 {
    let mut addrs: Vec<u64> = elf_function_symbols(elf)
        .into_iter()
        .filter(|(name, _)| matches(name))
        .map(|(_, addr)| addr)
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(
        addrs.len(),
        1,
        "expected one address for {what} in the ELF's symbols, found {addrs:x?}"
    );
    addrs[0]
}
