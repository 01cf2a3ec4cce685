//! The management API of `kvmi run --api-socket PATH` end to end (real KVM, the real `kvmi`
//! binary, a real unix socket): info, pause and resume seen in what the guests do, event
//! counters, targets added and removed in a running fleet, `kvmi ctl` exit statuses, and bad
//! requests answered with a JSON error while the VMs run on.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvmi::api::client::{Response, request};
use kvmi_tests::wait;
use serde_json::{Value, json};

/// How long anything the test waits for may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// A `kvmi run` child with its stdout and stderr lines collected.
pub(crate) struct Run {
    child: Child,
    pub(crate) socket: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(from: impl Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// A fresh socket path for `tag`.
fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvmi-api-{tag}-{}.sock", std::process::id()))
}

impl Run {
    /// `kvmi run --api-socket <fresh path> ARGS`, once its API answers.
    pub(crate) fn start(tag: &str, args: &[&str]) -> Run {
        let socket = socket_path(tag);
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(kvmi_tests::kvmi_bin())
            .arg("run")
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kvmi starts");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let mut run = Run {
            child,
            socket,
            stdout,
            stderr,
        };
        let up = wait::within(PATIENCE, || {
            run.child.try_wait().unwrap().is_none() && run.try_get("/vm/info").is_some()
        });
        assert!(up, "the API did not answer; stderr: {:?}", run.stderr());
        run
    }

    fn try_get(&self, route: &str) -> Option<Response> {
        request(
            &self.socket,
            "GET",
            route,
            None,
            Some(Duration::from_secs(10)),
        )
        .ok()
    }

    /// A request with a JSON body (or none).
    pub(crate) fn call(&self, method: &str, route: &str, body: Option<Value>) -> Response {
        let body = body.map(|b| b.to_string().into_bytes());
        request(
            &self.socket,
            method,
            route,
            body.as_deref(),
            Some(Duration::from_secs(30)),
        )
        .unwrap_or_else(|e| panic!("{method} {route}: {e}; stderr: {:?}", self.stderr()))
    }

    /// A request that must succeed with `status`; its JSON.
    pub(crate) fn ok(&self, method: &str, route: &str, body: Option<Value>, status: u16) -> Value {
        let r = self.call(method, route, body);
        assert_eq!(
            r.status,
            status,
            "{method} {route}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    fn info(&self) -> Vec<Value> {
        self.ok("GET", "/vm/info", None, 200)["vms"]
            .as_array()
            .expect("vms")
            .clone()
    }

    pub(crate) fn vm(&self, id: u64) -> Value {
        self.info()
            .into_iter()
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| panic!("no VM {id} in info"))
    }

    /// Target `id`'s event counter.
    fn events(&self, id: u64) -> u64 {
        let stats = self.ok("GET", "/vm/stats", None, 200);
        stats["targets"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["id"] == id))
            .and_then(|t| t["events"].as_u64())
            .unwrap_or_else(|| panic!("no event counter of target {id}: {stats}"))
    }

    pub(crate) fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub(crate) fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The JSON findings on stdout about target `id`.
    fn findings(&self, id: u64) -> Vec<Value> {
        self.stdout()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|f| f["target"] == id)
            .collect()
    }

    /// Stops the run with Ctrl-C; returns its exit status.
    pub(crate) fn interrupt(mut self) -> Option<i32> {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        let sent = unsafe { libc::kill(pid, libc::SIGINT) };
        assert_eq!(sent, 0);
        let status = self.child.wait().expect("kvmi ends");
        status.code()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Sends `bytes` on a fresh connection and reads the one answer (by its Content-Length).
fn raw(socket: &Path, bytes: &[u8]) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no Content-Length: {head:?}"));
            if body.len() >= length {
                return parse_answer(head, &body[..length]);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => panic!("the connection closed before a whole answer: {text:?}"),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the answer: {e}; got {text:?}"),
        }
    }
}

fn parse_answer(head: &str, body: &str) -> (u16, Value) {
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    assert!(
        head.contains("Content-Type: application/json"),
        "JSON answer: {head:?}"
    );
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: body {body:?}"));
    (status, json)
}

/// Asserts that `counter` grows within the test's patience.
#[track_caller]
fn grows(what: &str, mut counter: impl FnMut() -> u64) -> u64 {
    let before = counter();
    let mut now = before;
    wait::until(PATIENCE, what, || {
        now = counter();
        now > before
    });
    now
}

/// `counter` over `quiet`: it must not move (it is read twice, `quiet` apart).
#[track_caller]
fn frozen(what: &str, quiet: Duration, mut counter: impl FnMut() -> u64) {
    let a = counter();
    std::thread::sleep(quiet);
    let b = counter();
    assert_eq!(a, b, "{what} moved while paused");
}

/// `kvmi ctl --api-socket SOCKET ARGS`: exit status, stdout, stderr.
fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(kvmi_tests::kvmi_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("kvmi ctl runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn api_info_pause_resume_and_stats_of_a_fleet() {
    if !kvmi_tests::require_kvm("api_info_pause_resume_and_stats_of_a_fleet") {
        return;
    }
    let run = Run::start(
        "fleet",
        &[
            "--cmdline",
            "rounds=1000000",
            "--vcpus",
            "2",
            "--memory",
            "96",
            "--appliance-memory",
            "80",
        ],
    );
    let vms = run.info();
    assert_eq!(vms.len(), 2, "{vms:?}");
    let target = run.vm(1);
    assert_eq!(target["role"], "target", "{target}");
    assert_eq!(target["name"], "demo-target", "{target}");
    assert_eq!(target["vcpus"], 2, "{target}");
    assert_eq!(target["memory_mib"], 96, "{target}");
    assert_eq!(target["state"], "running", "{target}");
    assert_eq!(
        target["kvmi"],
        json!({"kind": "appliance", "slot": 0, "attached": true})
    );
    let appliance = run.vm(0);
    assert_eq!(appliance["role"], "appliance", "{appliance}");
    assert_eq!(appliance["vcpus"], 1, "{appliance}");
    assert_eq!(appliance["memory_mib"], 80, "{appliance}");
    assert_eq!(appliance["state"], "running", "{appliance}");

    // The counters grow as the target runs under the appliance's guard.
    grows("target 1's events", || run.events(1));
    let stats = run.ok("GET", "/vm/stats", None, 200);
    let t = &stats["targets"][0];
    assert!(t["replies"].as_u64().unwrap() > 0, "{stats}");
    assert!(t["log_records"].as_u64().unwrap() > 0, "{stats}");

    // Paused: the target's events and findings stop; the appliance still answers.
    let paused = run.ok("PUT", "/vm/pause", Some(json!({"target": 1})), 200);
    assert_eq!(paused, json!({"paused": [1]}));
    assert_eq!(run.vm(1)["state"], "paused");
    // Findings about what the target did (the agent's periodic summaries go on for a
    // paused target, and are not counted).
    let findings = || {
        run.findings(1)
            .iter()
            .filter(|f| f["finding"] != "summary")
            .count() as u64
    };
    frozen("target 1's events", Duration::from_millis(600), || {
        run.events(1)
    });
    frozen("target 1's findings", Duration::from_millis(300), findings);
    let heartbeats = || {
        run.stderr()
            .iter()
            .filter(|l| l.contains("heartbeat"))
            .count() as u64
    };
    frozen(
        "the heartbeat lines",
        Duration::from_millis(300),
        heartbeats,
    );
    assert_eq!(run.vm(0)["state"], "running");

    // Resumed (every target, no body): it moves again.
    assert_eq!(
        run.ok("PUT", "/vm/resume", None, 200),
        json!({"resumed": [1]})
    );
    assert_eq!(run.vm(1)["state"], "running");
    grows("target 1's events after the resume", || run.events(1));
    grows("the heartbeat lines after the resume", heartbeats);

    // `kvmi ctl`: 0 and the JSON on success, 1 and the message on an error.
    let (code, out, _) = ctl(&run.socket, &["info"]);
    assert_eq!(code, Some(0));
    let info: Value = serde_json::from_str(out.trim()).expect("ctl info prints JSON");
    assert_eq!(info["vms"][0]["name"], "demo-target");
    let (code, out, _) = ctl(&run.socket, &["pause", "--target", "1"]);
    assert_eq!((code, out.trim()), (Some(0), r#"{"paused":[1]}"#));
    let (code, _, _) = ctl(&run.socket, &["resume"]);
    assert_eq!(code, Some(0));
    let (code, out, err) = ctl(&run.socket, &["pause", "--target", "9"]);
    assert_eq!(code, Some(1), "{out} {err}");
    assert!(err.contains("no target 9") && err.contains("404"), "{err}");
    let (code, _, err) = ctl(&run.socket, &["remove", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("appliance"), "{err}");
    let (code, _, err) = ctl(Path::new("/nonexistent/kvmi.sock"), &["info"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("connecting"), "{err}");

    // A second server on the same socket is refused, and this one runs on.
    let second = Command::new(kvmi_tests::kvmi_bin())
        .args(["run", "--no-appliance", "--api-socket"])
        .arg(&run.socket)
        .output()
        .expect("kvmi runs");
    assert_eq!(second.status.code(), Some(125));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("is in use"), "{err}");
    grows("target 1's events after the refused second server", || {
        run.events(1)
    });

    // Ctrl-C ends the run as usual and removes the socket file.
    let socket = run.socket.clone();
    assert_eq!(run.interrupt(), Some(130));
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[test]
fn api_adds_and_removes_targets() {
    if !kvmi_tests::require_kvm("api_adds_and_removes_targets") {
        return;
    }
    let run = Run::start("targets", &["--cmdline", "rounds=1000000", "--slots", "2"]);
    let add = |name: &str| {
        run.call(
            "PUT",
            "/vm/targets",
            Some(json!({"name": name, "image": "demo-target", "vcpus": 2,
                        "memory_mib": 48, "cmdline": "rounds=1000000"})),
        )
    };
    let r = add("web-2");
    assert_eq!(r.status, 201, "{}", r.error_message());
    assert_eq!(r.json(), json!({"id": 2, "name": "web-2"}));
    let web = run.vm(2);
    assert_eq!(web["name"], "web-2", "{web}");
    assert_eq!(web["vcpus"], 2, "{web}");
    assert_eq!(web["memory_mib"], 48, "{web}");
    assert_eq!(web["state"], "running", "{web}");
    assert_eq!(web["kvmi"]["slot"], 1, "{web}");
    // The appliance guards it: its findings come, labelled with its id.
    wait::until(PATIENCE, "the guard finding of target 2", || {
        run.findings(2).iter().any(|f| f["finding"] == "guard")
    });
    grows("target 2's events", || run.events(2));

    // Both slots are taken; a duplicate name is refused too.
    let r = add("web-3");
    assert_eq!(r.status, 409, "{}", r.error_message());
    assert!(r.error_message().contains("no free slot"), "{:?}", r.json());
    let r = add("web-2");
    assert_eq!(r.status, 409);

    // Removed: it ends, its slot is freed, target 1 runs on.
    let removed = run.ok("DELETE", "/vm/targets/2", None, 200);
    assert_eq!(removed["state"], "ended", "{removed}");
    let web = run.vm(2);
    assert_eq!(web["state"], "ended", "{web}");
    assert!(
        run.stderr()
            .iter()
            .any(|l| l.contains("target 2 (web-2) ended") && l.contains("slot 1 freed")),
        "{:?}",
        run.stderr()
    );
    let r = run.call("DELETE", "/vm/targets/2", None);
    assert_eq!(r.status, 409, "removing an ended target");
    let r = run.call("PUT", "/vm/pause", Some(json!({"target": 2})));
    assert_eq!(r.status, 409, "pausing an ended target");
    let r = run.call("DELETE", "/vm/targets/77", None);
    assert_eq!(r.status, 404);
    grows("target 1's events after the removal", || run.events(1));

    // The freed slot takes a new target, guarded like the first.
    let (code, out, err) = ctl(
        &run.socket,
        &[
            "add",
            "--name",
            "web-4",
            "--image",
            "demo-target",
            "--cmdline",
            "rounds=1000000",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), r#"{"id":3,"name":"web-4"}"#);
    assert_eq!(run.vm(3)["kvmi"]["slot"], 1);
    wait::until(PATIENCE, "the guard finding of target 3", || {
        run.findings(3).iter().any(|f| f["finding"] == "guard")
    });
    let (code, out, _) = ctl(&run.socket, &["remove", "3"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"ended\""), "{out}");
    assert_eq!(run.interrupt(), Some(130));
}

#[test]
fn api_refuses_bad_requests_and_the_vms_run_on() {
    if !kvmi_tests::require_kvm("api_refuses_bad_requests_and_the_vms_run_on") {
        return;
    }
    let run = Run::start("bad", &["--cmdline", "rounds=1000000"]);
    let s = &run.socket;
    grows("target 1's events", || run.events(1));

    // A client that connects and sends nothing is timed out with 408 (5 s), while another
    // connection is served meanwhile.
    let silent = std::thread::spawn({
        let s = s.clone();
        move || raw(&s, b"")
    });
    let request = |bytes: &[u8]| raw(s, bytes);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "garbage",
            b"\x16\x03\x01\x00\xa5garbage\r\n\r\n".to_vec(),
            400,
        ),
        (
            "unknown route",
            b"GET /vm/nope HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
        (
            "wrong method",
            b"DELETE /vm/info HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        (
            "malformed JSON",
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"target\"".to_vec(),
            400,
        ),
        (
            "unknown field",
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"vcpu\":1}".to_vec(),
            400,
        ),
        (
            "unknown target",
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"target\":42}".to_vec(),
            404,
        ),
        (
            "oversized body",
            b"PUT /vm/targets HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n{".to_vec(),
            413,
        ),
        (
            "chunked body",
            b"PUT /vm/targets HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            411,
        ),
    ];
    for (what, bytes, status) in cases {
        let (got, body) = request(&bytes);
        assert_eq!(got, status, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
    }
    let r = run.call("PUT", "/vm/info", None);
    assert_eq!(r.status, 405);
    assert!(r.error_message().contains("allowed: GET"), "{:?}", r.json());
    let bad_targets = [
        json!({"name": "", "image": "demo-target"}),
        json!({"name": "x", "image": "demo-target", "vcpus": 0}),
        json!({"name": "x", "image": "demo-target", "memory_mib": 1}),
        json!({"name": "x", "image": "no-such-image"}),
        json!({"name": "x", "image": "relative/file.elf"}),
        json!({"name": "x"}),
    ];
    for body in bad_targets {
        let r = run.call("PUT", "/vm/targets", Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {:?}", r.json());
    }

    // Dumps: a bad format or a relative path is refused before anything is written.
    let out = std::env::temp_dir().join(format!("kvmi-api-dump-{}.lime", std::process::id()));
    let r = run.call(
        "PUT",
        "/vm/dump",
        Some(json!({"path": out, "format": "vmdk"})),
    );
    assert_eq!(r.status, 400, "{:?}", r.json());
    let r = run.call(
        "PUT",
        "/vm/dump",
        Some(json!({"path": "rel.lime", "format": "lime"})),
    );
    assert_eq!(r.status, 400, "{:?}", r.json());
    let r = run.call(
        "PUT",
        "/vm/dump",
        Some(json!({"path": out, "format": "lime", "target": 5})),
    );
    assert_eq!(r.status, 404, "{:?}", r.json());
    assert_eq!(
        run.ok("GET", "/vm/dump/progress", None, 200),
        json!({"dumps": []})
    );
    // A real dump of the guarded target (its memory size from info): a LiME file whose one
    // range covers all of its RAM.
    let ram = run.vm(1)["memory_mib"].as_u64().expect("memory_mib") << 20;
    let dump = Command::new(kvmi_tests::kvmi_bin())
        .args(["dump", "--api-socket"])
        .arg(s)
        .arg("--output")
        .arg(&out)
        .args(["--format", "lime"])
        .output()
        .expect("kvmi dump runs");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let line = String::from_utf8_lossy(&dump.stdout);
    let summary: Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert_eq!(summary["format"], "lime", "{summary}");
    assert_eq!(summary["file_bytes"], 32 + ram, "{summary}");
    let file = std::fs::read(&out).expect("the dump exists");
    let image = kvmi_tests::dump_file::ram_of(kvmi_dump::Format::Lime, &file, ram);
    assert!(
        image.iter().any(|&b| b != 0),
        "the target's RAM is not all zero"
    );
    let _ = std::fs::remove_file(&out);

    let (status, body) = silent.join().unwrap();
    assert_eq!(status, 408, "{body}");

    // Through all of it the VMs ran on: the API answers, the target is guarded and moving.
    assert_eq!(run.vm(1)["state"], "running");
    assert_eq!(run.vm(0)["state"], "running");
    let findings = run.findings(1).len();
    grows("target 1's events after the bad requests", || run.events(1));
    wait::until(PATIENCE, "new findings after the bad requests", || {
        run.findings(1).len() > findings
    });
}

#[test]
fn api_pauses_and_resumes_a_plain_vm() {
    if !kvmi_tests::require_kvm("api_pauses_and_resumes_a_plain_vm") {
        return;
    }
    let run = Run::start(
        "plain",
        &[
            "--no-appliance",
            "--image",
            "test-guest",
            "--cmdline",
            "mode=cycle every=200",
            "--memory",
            "32",
        ],
    );
    let vms = run.info();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vm = &vms[0];
    assert_eq!(vm["id"], 1, "{vm}");
    assert_eq!(vm["role"], "target", "{vm}");
    assert_eq!(vm["name"], "test-guest", "{vm}");
    assert_eq!(vm["vcpus"], 1, "{vm}");
    assert_eq!(vm["memory_mib"], 32, "{vm}");
    assert_eq!(vm["kvmi"], json!({"kind": "none"}), "{vm}");
    // The guest's serial output (stdout) counts its progress.
    let cycles = || {
        run.stdout()
            .iter()
            .filter(|l| l.starts_with("cycle i="))
            .count() as u64
    };
    grows("the cycle lines", cycles);
    assert_eq!(
        run.ok("PUT", "/vm/pause", None, 200),
        json!({"paused": [1]})
    );
    assert_eq!(run.vm(1)["state"], "paused");
    frozen("the cycle lines", Duration::from_millis(500), cycles);
    assert_eq!(
        run.ok("PUT", "/vm/resume", Some(json!({"target": 1})), 200),
        json!({"resumed": [1]})
    );
    grows("the cycle lines after the resume", cycles);
    // No fleet: targets are neither added nor removed.
    let r = run.call(
        "PUT",
        "/vm/targets",
        Some(json!({"name": "x", "image": "test-guest"})),
    );
    assert_eq!(r.status, 409, "{:?}", r.json());
    assert_eq!(run.call("DELETE", "/vm/targets/1", None).status, 409);
    // Paused at Ctrl-C: the run still ends as usual.
    run.ok("PUT", "/vm/pause", None, 200);
    let socket = run.socket.clone();
    assert_eq!(run.interrupt(), Some(130));
    assert!(!socket.exists());
}
